"""The CellMAE main panel: shared model/device pickers, one tab per capability, and a task bar
(progress, ETA, Cancel) with a status line. ``napari -w napari-cellmae`` opens it.

Tabs are registered in :data:`TABS` as ``(title, "module:Class")``; a tab class is built as
``Class(panel)`` and uses ``panel.viewer``, ``panel.runner`` (the shared :class:`TaskRunner`),
``panel.models`` (a :class:`ModelCache`), ``panel.model_picker``/``panel.device_picker`` and
``panel.log``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QLabel,
    QPlainTextEdit,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .pickers import DevicePicker, ModelPicker
from .worker import TaskRunner

if TYPE_CHECKING:  # pragma: no cover
    import napari

logger = logging.getLogger(__name__)

# (tab title, "module:Class") in display order; a feature adds its tab here once it works.
TABS: tuple[tuple[str, str], ...] = (
    ("Load", "napari_cellmae._qt.load_tab:LoadTab"),
    ("Reconstruct", "napari_cellmae._qt.reconstruct_tab:ReconstructTab"),
    ("Embed", "napari_cellmae._qt.embed_tab:EmbedTab"),
    ("QC", "napari_cellmae._qt.qc_tab:QCTab"),
    ("Fine-tune", "napari_cellmae._qt.finetune_tab:FinetuneTab"),
)


class ModelCache:
    """Keeps the last loaded model so tabs share it; thread-safe, loads in the caller's thread
    (call it from a worker). Switching model or device drops the old one (frees GPU memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._model: Any = None

    def get(self, source: str, device: str = "auto") -> Any:
        from .. import load_model

        key = (source, device)
        with self._lock:
            if self._key != key:
                self._model = None
                self._key = None
                _free_accelerator_memory()
                self._model = load_model(
                    source or None, device=None if device == "auto" else device
                )
                self._key = key
            return self._model

    def clear(self) -> None:
        with self._lock:
            self._model, self._key = None, None
        _free_accelerator_memory()


def _free_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")  # only if something already imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class MainPanel(QWidget):
    """The CellMAE panel.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.
    tabs : sequence of str, optional
        Titles of the tabs to show (default: all); the single-capability widgets of the Plugins menu
        are this panel with one tab.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, tabs: tuple[str, ...] | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.setObjectName("CellMAEPanel")
        self.models = ModelCache()

        self.model_picker = ModelPicker()
        self.device_picker = DevicePicker()
        header = QFormLayout()
        header.addRow("Model", self.model_picker)
        header.addRow("Device", self.device_picker)

        self.tab_widget = QTabWidget()
        self.tab_widget.setObjectName("CellMAETabs")
        self.tabs: dict[str, QWidget] = {}
        for title, target in TABS:
            if tabs is not None and title not in tabs:
                continue
            module_name, class_name = target.split(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            widget = cls(self)
            self.tabs[title] = widget
            self.tab_widget.addTab(widget, title)
        self.tab_widget.setVisible(bool(self.tabs))

        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(500)
        self.log_view.setMaximumHeight(90)
        self.log_view.setPlaceholderText("Messages appear here.")
        self.runner = TaskRunner(status=self.log)

        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addWidget(self.tab_widget, 1)
        layout.addWidget(self.runner)
        layout.addWidget(self.status)
        layout.addWidget(self.log_view)

        self.model_picker.source_changed.connect(lambda s: self.log(f"model: {s or '(none)'}"))
        self.device_picker.device_changed.connect(lambda d: self.log(f"device: {d}"))

    # -- shared helpers for tabs ------------------------------------------------------------
    def log(self, message: str) -> None:
        """Show ``message`` on the status line and append it to the panel's log."""
        self.status.setText(message)
        self.log_view.appendPlainText(message)
        logger.info(message)

    def model_source(self) -> str:
        return self.model_picker.source()

    def device(self) -> str:
        return self.device_picker.device()

    def get_model(self) -> Any:
        """The current model on the current device (loads it the first time; call from a worker)."""
        return self.models.get(self.model_source(), self.device())

    def closeEvent(self, event: Any) -> None:
        self.runner.cancel()
        self.models.clear()
        super().closeEvent(event)
