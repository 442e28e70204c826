"""The Reconstruct tab: hide patches of the open field, let the model predict them, show it.

Channels are the Image layers ticked in the channel table (a field opened by the Load tab ticks its
own layers); "hide" hides a whole channel (predict a missing stain). **Reconstruct masked view**
runs :func:`napari_cellmae.reconstruct.reconstruct_field` in the panel's task runner and shows,
side by side with stable names, input | ``masked <channel>`` | ``reconstruction <channel>`` (the
MAE figure: visible patches pasted back from the input, hidden ones predicted) | ``prediction
<channel>`` (the model's raw output for every patch), all in the input's colormap and contrast,
and a ``reconstruction error`` heatmap on top, over the holes of
the masked view (hidden patches only, averaged over the channels hidden there; 0..2 standardised
MSE, 1 ≈ the mean-fill baseline; visible patches transparent). Running again updates the same
layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..progress import Progress
from .layers import FIELD_KEY, layer_named
from .main_panel import MainPanel
from .worker import gui_text

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from ..reconstruct import FieldReconstruction

OUTPUT_KEY = "cellmae_reconstruct"  # layer.metadata flag of the layers this tab makes
ERROR_LAYER = "reconstruction error"
ERROR_LIMITS = (0.0, 2.0)  # standardised MSE; 1 ≈ filling the patch with the channel's mean
USE, NAME, HIDE = range(3)


def masked_name(channel: str) -> str:
    return f"masked {channel}"


def reconstruction_name(channel: str) -> str:
    """The MAE figure: visible patches from the input, hidden ones predicted."""
    return f"reconstruction {channel}"


def prediction_name(channel: str) -> str:
    """The model's raw output for every patch, visible ones too."""
    return f"prediction {channel}"


VIEWS = (  # kind, attribute of FieldReconstruction, layer name, views to the right of the input
    ("masked", "masked", masked_name, 1),
    ("reconstruction", "composite", reconstruction_name, 2),
    ("prediction", "reconstruction", prediction_name, 3),
)


def error_colormap() -> Any:
    """magma with a transparent 0: visible patches (error 0 in the overlay) show what is below."""
    from napari.utils.colormaps import AVAILABLE_COLORMAPS, Colormap

    colors = np.asarray(AVAILABLE_COLORMAPS["magma"].map(np.linspace(0.2, 1.0, 16)))
    colors = np.concatenate([[[0.0, 0.0, 0.0, 0.0]], colors])
    controls = np.concatenate([[0.0], np.linspace(1e-3, 1.0, 16)])
    return Colormap(colors, controls=controls, name="cellmae error")


def _reconstruct_task(
    get_model: Any,
    datas: list[Any],
    names: list[str],
    mask_ratio: float,
    seed: int,
    hidden: list[int],
):
    from ..reconstruct import reconstruct_field

    yield Progress(0, None, "loading model")
    model = get_model()
    image = np.stack([np.asarray(d) for d in datas])  # (C, H, W); lazy layers are read here
    return (
        yield from reconstruct_field(
            model, image, mask_ratio, seed, hidden_channels=hidden, channel_names=names
        )
    )


def _save_task(result: FieldReconstruction, folder: str):
    from ..reconstruct import save_reconstruction

    yield Progress(0, 1, f"saving to {folder}")
    paths = save_reconstruction(result, folder, stem="reconstruction")
    yield Progress(1, 1, "saved")
    return paths


class ReconstructTab(QWidget):
    """Pick channels, mask ratio, seed and hidden channels; reconstruct; see layers and summary."""

    def __init__(self, panel: MainPanel):
        super().__init__()
        self.panel = panel
        self.viewer: napari.Viewer = panel.viewer
        self.result: FieldReconstruction | None = None
        self._rows: list[Any] = []  # the Image layer of each table row
        self._state: dict[str, tuple[bool, bool]] = {}  # layer key -> (use, hide)
        self._hooked: set[str] = set()

        self.channel_table = QTableWidget(0, 3)
        self.channel_table.setHorizontalHeaderLabels(["use", "Image layer", "hide"])
        self.channel_table.verticalHeader().setVisible(False)
        self.channel_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.channel_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.channel_table.horizontalHeader()
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)
        for col in (USE, HIDE):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.channel_table.setToolTip(
            "use: the layer is a channel of the field (a field opened in the Load tab ticks its "
            "own layers). hide: hide the whole channel, so the model predicts it from the others."
        )

        self.mask_ratio = QDoubleSpinBox()
        self.mask_ratio.setRange(0.0, 0.95)
        self.mask_ratio.setSingleStep(0.05)
        self.mask_ratio.setDecimals(2)
        self.mask_ratio.setValue(0.75)
        self.mask_ratio.setToolTip("Fraction of the visible channels' patches hidden in each crop")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("Same seed, same mask")
        self.run_button = QPushButton("Reconstruct masked view")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip(
            "Write OME-TIFF stacks, a PNG preview, the summary and a run record to a folder"
        )
        self.save_button.setEnabled(False)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.summary_table = QTableWidget(0, 5)
        self.summary_table.setHorizontalHeaderLabels(
            ["channel", "hidden patches", "masked-patch error", "mean-fill", "ratio"]
        )
        self.summary_table.verticalHeader().setVisible(False)
        self.summary_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.summary_table.horizontalHeader().setSectionResizeMode(
            QHeaderView.ResizeMode.ResizeToContents
        )
        self.summary_table.setToolTip(
            "Mean error of the hidden patches (MSE of the standardised channel) vs filling each "
            "hidden patch with the mean of the channel's visible pixels in its crop; ratio < 1: "
            "the model beats the mean."
        )

        channels_box = QGroupBox("Channels")
        QVBoxLayout(channels_box).addWidget(self.channel_table)
        form = QFormLayout()
        form.addRow("Mask ratio", self.mask_ratio)
        form.addRow("Seed", self.seed)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.save_button)
        summary_box = QGroupBox("Summary")
        QVBoxLayout(summary_box).addWidget(self.summary_table)

        layout = QVBoxLayout(self)
        layout.addWidget(channels_box, 1)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.message)
        layout.addWidget(summary_box, 1)

        self.run_button.clicked.connect(self.reconstruct)
        self.save_button.clicked.connect(self._browse_save)
        self.channel_table.itemChanged.connect(self._item_changed)
        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        self.viewer.layers.events.moved.connect(self._layers_changed)
        load = panel.tabs.get("Load")
        if load is not None and hasattr(load, "field_opened"):
            load.field_opened.connect(self._field_opened)
        self.refresh()

    # -- the channel table ------------------------------------------------------------------
    @staticmethod
    def _key(layer: Any) -> str:
        return str(getattr(layer, "unique_id", id(layer)))

    def candidate_layers(self) -> list[Any]:
        """2-D single-channel Image layers that are not this tab's outputs, in layer order."""
        from napari.layers import Image

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.rgb
            and layer.ndim == 2
            and OUTPUT_KEY not in layer.metadata
        ]

    def refresh(self) -> None:
        """Rebuild the table from the viewer's layers, keeping ticks; a new layer of a field
        (from the Load tab or the reader) starts ticked."""
        self._rows = self.candidate_layers()
        table = self.channel_table
        table.blockSignals(True)
        table.setRowCount(len(self._rows))
        for row, layer in enumerate(self._rows):
            key = self._key(layer)
            if key not in self._hooked:
                self._hooked.add(key)
                layer.events.name.connect(self._layers_changed)
            use, hide = self._state.setdefault(key, (FIELD_KEY in layer.metadata, False))
            for col, checked in ((USE, use), (HIDE, hide)):
                item = QTableWidgetItem()
                item.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
                table.setItem(row, col, item)
            name = QTableWidgetItem(layer.name)
            name.setFlags(Qt.ItemFlag.ItemIsEnabled)
            table.setItem(row, NAME, name)
        table.blockSignals(False)

    def _layers_changed(self, *_: Any) -> None:
        try:
            self.refresh()
        except RuntimeError:  # the widget was closed (Qt object deleted): stop listening
            self._disconnect()

    def _disconnect(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.disconnect(self._layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._layers_changed)

    def _item_changed(self, item: QTableWidgetItem) -> None:
        row = item.row()
        if row >= len(self._rows) or item.column() == NAME:
            return
        key = self._key(self._rows[row])
        use, hide = self._state.get(key, (False, False))
        checked = item.checkState() == Qt.CheckState.Checked
        self._state[key] = (checked, hide) if item.column() == USE else (use, checked)

    def set_channels(self, layers: list[Any], hidden: tuple[str, ...] = ()) -> None:
        """Tick exactly ``layers`` as channels (and hide those named in ``hidden``)."""
        wanted = {self._key(layer) for layer in layers}
        for layer in self.candidate_layers():
            key = self._key(layer)
            self._state[key] = (key in wanted, key in wanted and layer.name in hidden)
        self.refresh()

    def set_hidden(self, names: tuple[str, ...] | list[str]) -> None:
        """Hide the channels called ``names`` completely (the others: not hidden)."""
        for layer in self._rows:
            key = self._key(layer)
            use, _ = self._state.get(key, (False, False))
            self._state[key] = (use, layer.name in names)
        self.refresh()

    def selected(self) -> tuple[list[Any], list[int]]:
        """The ticked channel layers and the indices (among them) of the hidden ones.

        Channels of one opened field keep the field's channel order (what OpenPhenom's decoder
        needs) even if the layers were reordered; other layers go in layer-list order.
        """
        ticked = [
            (layer, self._state.get(self._key(layer), (False, False))[1])
            for layer in self._rows
            if self._state.get(self._key(layer), (False, False))[0]
        ]
        if ticked and all("channel_index" in layer.metadata for layer, _ in ticked):
            ticked.sort(key=lambda pair: pair[0].metadata["channel_index"])
        return [layer for layer, _ in ticked], [i for i, (_, hide) in enumerate(ticked) if hide]

    def _field_opened(self, info: dict[str, Any]) -> None:
        hidden = tuple(
            layer.name
            for layer in self._rows
            if self._state.get(self._key(layer), (False, False))[1]
        )
        self.set_channels(list(info.get("layers") or []), hidden)

    # -- running ----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.message.setText(text)
        self.panel.log(f"Reconstruct: {text}")

    def reconstruct(self) -> Any:
        """Run the reconstruction in the task runner (returns the worker, or None)."""
        layers, hidden = self.selected()
        if not layers:
            self._say("tick the Image layers of the field as channels (or open a field in Load)")
            return None
        shapes = {tuple(layer.data.shape) for layer in layers}
        if len(shapes) > 1:
            sizes = ", ".join(f"{layer.name} {layer.data.shape}" for layer in layers)
            self._say(f"the ticked layers differ in size ({sizes}): tick layers of one field")
            return None
        if self.panel.runner.busy:
            self._say("another task is running; wait or press Cancel")
            return None
        self.message.setText("")
        sources = [self._source_style(layer) for layer in layers]
        return self.panel.runner.start(
            _reconstruct_task,
            self.panel.get_model,
            [layer.data for layer in layers],
            [layer.name for layer in layers],
            float(self.mask_ratio.value()),
            int(self.seed.value()),
            hidden,
            description="reconstruct",
            on_result=lambda result: self.show_result(result, sources),
            on_error=lambda exc: self.message.setText(gui_text(exc)),
        )

    @staticmethod
    def _source_style(layer: Any) -> dict[str, Any]:
        return {
            "colormap": layer.colormap,
            "contrast_limits": list(layer.contrast_limits),
            "gamma": layer.gamma,
            "blending": layer.blending,
            "scale": np.asarray(layer.scale, float),
            "translate": np.asarray(layer.translate, float),
        }

    # -- showing ----------------------------------------------------------------------------
    def show_result(self, result: FieldReconstruction, sources: list[dict[str, Any]]) -> None:
        """Add or update the output layers and the summary table."""
        self.result = result
        w = result.image.shape[-1]
        record = result.record()
        made = []
        arrays = {attribute: getattr(result, attribute) for _, attribute, _, _ in VIEWS}
        for i, (name, style) in enumerate(zip(result.channel_names, sources)):
            step = self._step(style, w)
            for kind, attribute, layer_name_of, offset in VIEWS:
                data = arrays[attribute][i]
                layer_name = layer_name_of(name)
                kwargs = {
                    "colormap": style["colormap"],
                    "contrast_limits": style["contrast_limits"],
                    "gamma": style["gamma"],
                    "blending": style["blending"],
                    "scale": style["scale"],
                    "translate": style["translate"] + offset * step,
                    "metadata": {OUTPUT_KEY: kind, "channel": name, "run": record},
                }
                made.append(self._put_image(layer_name, data, kwargs))
        first = sources[0]
        err = result.hidden_error()
        count = result.mask.sum(axis=0)
        overlay = np.where(count > 0, err.sum(axis=0) / np.maximum(count, 1), 0.0)
        made.append(
            self._put_image(
                ERROR_LAYER,
                overlay.astype(np.float32),
                {
                    "colormap": error_colormap(),
                    "contrast_limits": list(ERROR_LIMITS),
                    "blending": "translucent",
                    "opacity": 0.7,
                    "scale": first["scale"],
                    "translate": first["translate"] + self._step(first, w),  # over the masked
                    "metadata": {OUTPUT_KEY: "error", "channel": "", "run": record},
                },
            )
        )
        index = self.viewer.layers.index(made[-1])
        if index != len(self.viewer.layers) - 1:  # the heatmap stays on top
            self.viewer.layers.move(index, len(self.viewer.layers))
        keep = {self._key(layer) for layer in made}  # napari may hand us proxies: not id()
        for layer in [lyr for lyr in self.viewer.layers if OUTPUT_KEY in lyr.metadata]:
            if self._key(layer) not in keep:  # outputs of channels no longer reconstructed
                self.viewer.layers.remove(layer)
        self._fill_summary(result)
        self.save_button.setEnabled(True)
        hidden = [result.channel_names[i] for i in result.hidden_channels]
        self._say(
            f"{len(result.channel_names)} channels, {len(result.positions)} tiles, mask ratio "
            f"{result.mask_ratio:g}, seed {result.seed}"
            + (f", hidden: {', '.join(hidden)}" if hidden else "")
        )

    @staticmethod
    def _step(style: dict[str, Any], width: int) -> np.ndarray:
        """World offset from one view to the next (input | masked | reconstruction | prediction)."""
        step = np.zeros_like(style["translate"])
        step[-1] = (width + max(8, round(0.04 * width))) * style["scale"][-1]
        return step

    def _put_image(self, name: str, data: np.ndarray, kwargs: dict[str, Any]) -> Any:
        from napari.layers import Image

        layer = layer_named(self.viewer, name)
        if isinstance(layer, Image) and layer.ndim == data.ndim:
            layer.data = data
            layer.reset_contrast_limits_range()
            for key, value in kwargs.items():
                if key == "metadata":
                    layer.metadata.update(value)
                else:
                    setattr(layer, key, value)
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        return self.viewer.add_image(data, name=name, **kwargs)

    def _fill_summary(self, result: FieldReconstruction) -> None:
        table = self.summary_table
        table.setRowCount(len(result.summary))
        for row, rec in enumerate(result.summary.itertuples(index=False)):
            hidden = " (hidden)" if rec.hidden_channel else ""
            scored = rec.hidden_patches > 0  # nothing hidden in this channel: nothing to score
            cells = (
                f"{rec.channel}{hidden}",
                f"{rec.hidden_patches}",
                f"{rec.masked_error:.3f}" if scored else "–",
                f"{rec.mean_fill_error:.3f}" if scored else "–",
                f"{rec.ratio:.2f}" if scored else "–",
            )
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col:
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                table.setItem(row, col, item)

    # -- saving -----------------------------------------------------------------------------
    def save_results(self, folder: str) -> Any:
        """Write the last result to ``folder`` in the task runner (returns the worker, or None)."""
        if self.result is None:
            self._say("nothing to save yet: press Reconstruct masked view first")
            return None
        if self.panel.runner.busy:
            self._say("another task is running; wait or press Cancel")
            return None
        return self.panel.runner.start(
            _save_task,
            self.result,
            folder,
            description="save reconstruction",
            on_result=lambda paths: self._say(f"saved {len(paths)} files to {folder}"),
        )

    def _browse_save(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the reconstruction to a folder")
        if folder:
            self.save_results(folder)


class ReconstructWidget(MainPanel):
    """The "Reconstruct masked view" widget of the Plugins menu: this tab, compact, sharing the
    viewer's model, device and Load tab (channels are the Image layers you tick)."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(napari_viewer, tabs=("Reconstruct",), compact=True)
