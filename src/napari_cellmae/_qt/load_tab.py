"""The Load tab: plate folder -> detected layout, well/site picker, channel names, open a field.

Other tabs use ``load_tab.index`` (the current plate index), ``load_tab.open_field(well, site)``
and the signals ``plate_loaded(index)`` and ``field_opened(info)`` where ``info`` is a dict with
``metadata`` (Metadata_* values), ``image`` (C, H, W), ``channel_names`` and ``layers``.
Scanning and reading run in the panel's task runner (progress, Cancel, errors on the status line).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..plates.channels import load_channel_map, save_channel_map
from ..plates.layouts import LAYOUTS, REGEX_EXAMPLE, REGEX_GROUPS_HELP
from ..progress import Progress
from .channel_names import ChannelNamesBox
from .field_picker import FieldPicker
from .layers import (
    FIELD_CHANNELS_KEY,
    FIELD_KEY,
    PLATE_MAP_KEY,
    field_at_point,
    plate_map_layer,
    point_under_cursor,
)
from .main_panel import MainPanel
from .worker import gui_text

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd

AUTO, REGEX = "auto", "regex"


def channel_map_path(root: str) -> Path:
    """Where the channel names of a plate are kept between sessions (inputs are never written)."""
    from ..registry import cellmae_home

    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cellmae_home() / "channel_maps" / f"{digest}.json"


def _scan_task(folder: str, layout: str):
    from ..plates import scan_plate

    yield Progress(0, 1, f"scanning {folder}")
    index = scan_plate(folder, layout)
    yield Progress(1, 1, "scanned")
    return index


def read_field_task(index: pd.DataFrame, meta: dict[str, Any]):
    """Task for TaskRunner: read the field ``meta`` names from ``index``; returns (meta, image)."""
    from ..plates import read_field

    yield Progress(0, 1, f"reading {meta['Metadata_Well']} site {meta['Metadata_Site']}")
    image = read_field(
        index,
        meta["Metadata_Well"],
        meta["Metadata_Site"],
        plate=meta.get("Metadata_Plate"),
        plane=meta.get("Metadata_Plane"),
        timepoint=meta.get("Metadata_Timepoint"),
    )
    yield Progress(1, 1, "read")
    return meta, image


class LoadTab(QWidget):
    """Choose a plate folder, see what was detected, name channels, open fields."""

    plate_loaded = Signal(object)  # the index DataFrame
    field_opened = Signal(object)  # {"metadata", "image", "channel_names", "layers"}

    def __init__(self, panel: MainPanel):
        super().__init__()
        self.panel = panel
        self.viewer: napari.Viewer = panel.viewer
        self.index: pd.DataFrame | None = None
        self.fields: pd.DataFrame | None = None
        self.current: dict[str, Any] | None = None
        self._hooked: set[str] = set()

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("plate folder (or drop it on the viewer)")
        self.browse_button = QPushButton("Browse…")
        self.layout_combo = QComboBox()
        self.layout_combo.addItem("auto (detect)", AUTO)
        for name, layout in LAYOUTS.items():
            self.layout_combo.addItem(name, name)
            self.layout_combo.setItemData(
                self.layout_combo.count() - 1, layout.description, Qt.ItemDataRole.ToolTipRole
            )
        for wells in (96, 384, 1536):  # scan^R numbers wells: the plate format maps them
            self.layout_combo.addItem(f"scanr, {wells}-well plate", f"scanr:{wells}")
        self.layout_combo.addItem("regex (named groups)", REGEX)
        self.regex_edit = QLineEdit()
        self.regex_edit.setPlaceholderText(REGEX_EXAMPLE)
        self.regex_edit.setToolTip(
            f"A regular expression with {REGEX_GROUPS_HELP}. Searched in the path below the folder."
        )
        self.regex_edit.setEnabled(False)
        self.scan_button = QPushButton("Scan")
        self.summary = QLabel("No plate loaded.")
        self.summary.setWordWrap(True)

        self.picker = FieldPicker()
        self.plate_combo = self.picker.plate_combo
        self.well_combo = self.picker.well_combo
        self.site_combo = self.picker.site_combo
        self.open_button = QPushButton("Open field")
        self.open_button.setEnabled(False)

        self.channel_box = ChannelNamesBox()
        self.channel_table = self.channel_box.table
        self.preset_combo = self.channel_box.preset_combo

        folder_row = QHBoxLayout()
        folder_row.addWidget(self.path_edit, 1)
        folder_row.addWidget(self.browse_button)
        layout_row = QHBoxLayout()
        layout_row.addWidget(self.layout_combo)
        layout_row.addWidget(self.regex_edit, 1)
        layout_row.addWidget(self.scan_button)
        field_box = QGroupBox("Field")
        field_layout = QVBoxLayout(field_box)
        field_layout.addWidget(self.picker)
        field_layout.addWidget(self.open_button)

        layout = QVBoxLayout(self)
        layout.addLayout(folder_row)
        layout.addLayout(layout_row)
        layout.addWidget(self.summary)
        layout.addWidget(field_box)
        layout.addWidget(self.channel_box)
        layout.addStretch(1)

        self.browse_button.clicked.connect(self._browse)
        self.path_edit.returnPressed.connect(self.scan)
        self.scan_button.clicked.connect(self.scan)
        self.layout_combo.currentIndexChanged.connect(self._layout_changed)
        self.open_button.clicked.connect(self._open_picked)
        self.channel_box.names_changed.connect(self.set_channel_names)
        self.channel_box.save_requested.connect(self.save_channel_map)
        self.viewer.layers.events.inserted.connect(self._layer_inserted)

    # -- scanning ---------------------------------------------------------------------------
    def layout_choice(self) -> str:
        """``"auto"``, a layout name, or the regex typed by the user."""
        choice = self.layout_combo.currentData()
        return self.regex_edit.text().strip() if choice == REGEX else choice

    def scan(self, folder: str | None = None) -> Any:
        """Scan ``folder`` (default: the path field) in the task runner."""
        if folder:
            self.path_edit.setText(str(folder))
        folder = self.path_edit.text().strip()
        if not folder:
            self.panel.log("Load: choose a plate folder first (Browse… or type its path)")
            return None
        layout = self.layout_choice()
        if not layout:
            self.panel.log(f"Load: type a regular expression, e.g. {REGEX_EXAMPLE}")
            return None
        if self.panel.runner.busy:
            self.panel.log("Load: another task is running; wait or press Cancel")
            return None
        return self.panel.runner.start(
            _scan_task,
            folder,
            layout,
            description="scan plate",
            on_result=self.set_index,
            on_error=partial(self._scan_failed, folder),
        )

    def _scan_failed(self, folder: str, exc: BaseException) -> None:
        """The summary says the scan failed (not the previous plate's line, as if it worked)."""
        text = f"Could not scan {folder}: {gui_text(exc)}"
        if self.index is not None:
            text += f"\nStill loaded: {self.index.attrs['root']}"
        self.summary.setText(text)

    def set_index(self, index: pd.DataFrame) -> None:
        """Show a scanned plate: summary, pickers, channel table, plate map."""
        self._adopt(index, emit=False)
        layer = plate_map_layer(
            self.viewer,
            self.fields,
            root=index.attrs["root"],
            layout=index.attrs["layout"],
            summary=index.attrs["summary"],
        )
        self._hook_plate_map(layer)
        self.panel.log(f"Load: {index.attrs['summary']}")
        self.plate_loaded.emit(index)

    # -- opening fields ---------------------------------------------------------------------
    def open_field(
        self,
        well: str,
        site: int = 1,
        plate: str | None = None,
        plane: int | None = None,
        timepoint: int | None = None,
    ) -> Any:
        """Read the field in the task runner and show it (returns the worker, or None)."""
        if self.index is None:
            self.panel.log("Load: scan a plate folder first")
            return None
        if self.panel.runner.busy:
            self.panel.log("Load: another task is running; wait or press Cancel")
            return None
        meta: dict[str, Any] = {"Metadata_Well": well, "Metadata_Site": int(site)}
        if plate is not None:
            meta["Metadata_Plate"] = plate
        if plane is not None:
            meta["Metadata_Plane"] = int(plane)
        if timepoint is not None:
            meta["Metadata_Timepoint"] = int(timepoint)
        return self.panel.runner.start(
            read_field_task,
            self.index,
            meta,
            description=f"open {well} site {site}",
            on_result=self._show_field,
        )

    def channel_names(self) -> list[str]:
        """Current channel names in channel order."""
        if self.index is None:
            return []
        names = self.index.attrs["channel_names"]
        return [names.get(c, c) for c in self.index.attrs["channels"]]

    def _show_field(self, result: tuple[dict[str, Any], Any]) -> None:
        from .layers import open_field

        meta, image = result
        rows = self.fields
        assert rows is not None
        mask = (rows["Metadata_Well"] == meta["Metadata_Well"]) & (
            rows["Metadata_Site"] == meta["Metadata_Site"]
        )
        if "Metadata_Plate" in meta:
            mask &= rows["Metadata_Plate"] == meta["Metadata_Plate"]
        full = rows[mask].iloc[0].to_dict() if mask.any() else dict(meta)
        full = {k: (v.item() if hasattr(v, "item") else v) for k, v in full.items()}
        full = {k: v for k, v in full.items() if k.startswith("Metadata_")} | {
            k: v for k, v in meta.items() if k.startswith("Metadata_")
        }
        names = self.channel_names()
        layers = open_field(self.viewer, image, names, metadata=full)
        self.current = {"metadata": full, "image": image, "channel_names": names, "layers": layers}
        self.panel.log(
            f"Load: opened {full.get('Metadata_Plate')} {full['Metadata_Well']} site "
            f"{full['Metadata_Site']}: {image.shape[0]} channels, {image.shape[1]}×"
            f"{image.shape[2]} {image.dtype}"
        )
        self.field_opened.emit(self.current)

    def _open_picked(self) -> None:
        picked = self.picker.current()
        if self.index is not None and picked is not None:
            self.open_field(**picked)

    def open_point(self, layer: Any, index: int) -> Any:
        """Open the field of point ``index`` of a plate-map layer."""
        meta = field_at_point(layer, index)
        return self.open_field(
            meta["Metadata_Well"],
            meta["Metadata_Site"],
            plate=meta.get("Metadata_Plate"),
            plane=meta.get("Metadata_Plane"),
            timepoint=meta.get("Metadata_Timepoint"),
        )

    # -- the plate map ----------------------------------------------------------------------
    def _hook_plate_map(self, layer: Any) -> None:
        # napari may hand us the same layer directly or through a proxy: key by its unique id
        key = str(getattr(layer, "unique_id", id(layer)))
        if key in self._hooked:
            return
        self._hooked.add(key)

        def on_selection(*_: Any) -> None:
            selected = list(layer.selected_data)
            if len(selected) == 1:
                self.open_point(layer, selected[0])

        def on_click(layer_: Any, event: Any) -> None:
            # in select mode the selection event opens the field; elsewhere a click does
            if layer_.mode == "select" or getattr(event, "type", "mouse_press") != "mouse_press":
                return
            index = point_under_cursor(layer_, event.position)
            if index is not None:
                self.open_point(layer_, index)

        # napari >= 0.6 selections are psygnal sets (items_changed); older ones emit "changed"
        events = layer.selected_data.events
        signal = getattr(events, "items_changed", None)
        (events.changed if signal is None else signal).connect(on_selection)
        layer.mouse_drag_callbacks.append(on_click)

    def _layer_inserted(self, event: Any) -> None:
        """A plate map from the reader (a dropped folder) becomes the tab's plate."""
        layer = event.value
        if not layer.metadata.get(PLATE_MAP_KEY):
            return
        root = layer.metadata.get("root")
        if root and (self.index is None or self.index.attrs["root"] != root):
            from .._napari.reader import scan_cached

            try:
                index = scan_cached(root)
            except (ValueError, OSError) as exc:
                self.panel.log(f"Load: {gui_text(exc)}")
                return
            self._adopt(index)
        self._hook_plate_map(layer)

    def _adopt(self, index: pd.DataFrame, emit: bool = True) -> None:
        """Make ``index`` the tab's plate: summary, pickers, channel names."""
        from ..plates import list_fields

        saved = channel_map_path(index.attrs["root"])
        if saved.is_file():  # the names the user gave this plate last time
            try:
                names = load_channel_map(saved)
                current = index.attrs["channel_names"]
                index.attrs["channel_names"] = {c: names.get(c, current[c]) for c in current}
            except ValueError as exc:
                self.panel.log(f"Load: ignoring saved channel names: {exc}")
        self.index = index
        self.fields = list_fields(index)
        self.path_edit.setText(index.attrs["root"])
        self.summary.setText(index.attrs["summary"])
        self._fill_channels()
        self.picker.set_fields(self.fields)
        self.open_button.setEnabled(True)
        if emit:
            self.plate_loaded.emit(index)

    # -- channel names ----------------------------------------------------------------------
    def _fill_channels(self) -> None:
        assert self.index is not None
        self.channel_box.set_channels(
            self.index.attrs["channels"], self.index.attrs["channel_names"]
        )

    def set_channel_names(self, names: dict[str, str]) -> None:
        """Rename channels (``{id: name}``), update open layers, and remember the mapping."""
        if self.index is None:
            return
        old = dict(self.index.attrs["channel_names"])
        new = {c: (str(names.get(c, old.get(c, c))).strip() or c) for c in old}
        self.index.attrs["channel_names"] = new
        self._fill_channels()
        for layer in list(self.viewer.layers):  # rename the open field's layers to match
            if FIELD_KEY in layer.metadata:
                for cid, before in old.items():
                    if layer.name == before and new[cid] != before:
                        layer.name = new[cid]
                if layer.metadata.get(FIELD_CHANNELS_KEY) == list(old.values()):
                    # still this plate's field: the next field updates it in place
                    layer.metadata[FIELD_CHANNELS_KEY] = list(new.values())
        save_channel_map(
            channel_map_path(self.index.attrs["root"]),
            new,
            self.index.attrs["channels"],
            root=self.index.attrs["root"],
            layout=self.index.attrs["layout"],
        )

    def save_channel_map(self, path: str) -> None:
        """Write the current mapping to ``path`` (a ``.json`` file or a folder)."""
        if self.index is None:
            return
        saved = save_channel_map(
            path,
            self.index.attrs["channel_names"],
            self.index.attrs["channels"],
            root=self.index.attrs["root"],
            layout=self.index.attrs["layout"],
        )
        self.panel.log(f"Load: channel mapping saved to {saved}")

    # -- misc -------------------------------------------------------------------------------
    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Plate folder", self.path_edit.text())
        if folder:
            self.scan(folder)

    def _layout_changed(self, *_: Any) -> None:
        self.regex_edit.setEnabled(self.layout_combo.currentData() == REGEX)


class LoadPlateWidget(MainPanel):
    """The "Load plate" widget of the Plugins menu: this tab, compact (the viewer's plate for the
    other CellMAE docks when it is the first Load tab).

    A class, not a function: napari passes the viewer to a dock widget by inspecting
    ``__init__`` for a ``napari_viewer`` parameter.
    """

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(napari_viewer, tabs=("Load",), compact=True)
