"""The model and device pickers shared by every tab of the main panel."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..registry import ModelEntry, attribution_for, list_models

_KIND_SUFFIX = {
    "bundled": " (bundled)",
    "local": " (local folder)",
    "hub-cached": " (downloaded)",
    "hub": " (Hugging Face, download)",
}


class ModelPicker(QWidget):
    """Choose a model: bundled ones first, the user's model folders, downloaded and known Hugging
    Face repositories, or any local folder / hub id. Shows the licence/attribution line where a
    model needs one (OpenPhenom)."""

    source_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setToolTip("Model used by every tab")
        self.folder_button = QPushButton("Folder…")
        self.folder_button.setToolTip(
            "Use a model folder (ours, fine-tuned, or an OpenPhenom snapshot)"
        )
        self.hub_button = QPushButton("HF id…")
        self.hub_button.setToolTip("Use a Hugging Face repository id (downloads when online)")
        self.attribution = QLabel("")
        self.attribution.setWordWrap(True)
        self.attribution.setOpenExternalLinks(True)
        self.attribution.setStyleSheet("font-size: 10px; color: #c8a040;")

        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.folder_button)
        row.addWidget(self.hub_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.attribution)

        self.folder_button.clicked.connect(self._browse_folder)
        self.hub_button.clicked.connect(self._ask_hub_id)
        self.combo.currentIndexChanged.connect(self._changed)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the available models, keeping the current choice when it still exists."""
        current = self.source()
        self.combo.blockSignals(True)
        self.combo.clear()
        for entry in list_models():
            self._add_entry(entry)
        self.combo.blockSignals(False)
        if current:
            self.set_source(current)
        else:
            self._changed()

    def _add_entry(self, entry: ModelEntry) -> None:
        self.combo.addItem(entry.name + _KIND_SUFFIX.get(entry.kind, ""), entry.source)

    def source(self) -> str:
        """What to pass to ``load_model``: a bundled name, a folder path or a hub repo id."""
        data = self.combo.currentData()
        return str(data) if data is not None else ""

    def set_source(self, source: str) -> None:
        """Select ``source``, adding it to the list if it is new (a folder or a hub id)."""
        index = self.combo.findData(source)
        if index < 0:
            kind = "local" if Path(source).expanduser().exists() else "hub"
            name = Path(source).name if kind == "local" else source
            self._add_entry(ModelEntry(name, source, kind))
            index = self.combo.count() - 1
        self.combo.setCurrentIndex(index)
        self._changed()

    def _changed(self, *_: object) -> None:
        note = attribution_for(self.source())
        self.attribution.setText(note)
        self.attribution.setVisible(bool(note))
        self.source_changed.emit(self.source())

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder")
        if folder:
            self.set_source(folder)

    def _ask_hub_id(self) -> None:
        repo, ok = QInputDialog.getText(self, "Hugging Face model", "Repository id (owner/name):")
        if ok and repo.strip():
            self.set_source(repo.strip())


class DevicePicker(QWidget):
    """Choose the compute device: auto (cuda > mps > cpu) or a specific one, with free memory."""

    device_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setToolTip("Where the model runs; auto picks cuda > mps > cpu")
        self.refresh_button = QPushButton("↻")
        self.refresh_button.setToolTip("Refresh free memory")
        self.refresh_button.setMaximumWidth(30)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.refresh_button)
        self.refresh_button.clicked.connect(self.refresh)
        self.combo.currentIndexChanged.connect(lambda *_: self.device_changed.emit(self.device()))
        self.refresh()

    def refresh(self) -> None:
        from ..devices import available_devices

        current = self.device() if self.combo.count() else "auto"
        devices = available_devices()
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem(f"auto ({devices[0].name})", "auto")
        for d in devices:
            bf16 = ", bf16" if d.bf16 else ""
            self.combo.addItem(d.label() + bf16, d.name)
        index = self.combo.findData(current)
        self.combo.setCurrentIndex(max(index, 0))
        self.combo.blockSignals(False)

    def set_device(self, device: str) -> None:
        """Select ``device`` (``"auto"``, ``"cpu"``…) when it is in the list."""
        index = self.combo.findData(device)
        if index >= 0:
            self.combo.setCurrentIndex(index)

    def device(self) -> str:
        """``"auto"``, ``"cpu"``, ``"cuda:0"``, ``"mps"``…"""
        data = self.combo.currentData()
        return str(data) if data is not None else "auto"
