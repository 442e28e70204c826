"""The CellMAE main panel: shared model/device pickers, one tab per capability, and a task bar
(progress, ETA, Cancel) with a status line. ``napari -w napari-cellmae`` opens it.

Tabs are registered in :data:`TABS` as ``(title, "module:Class")``; a tab class is built as
``Class(panel)`` and uses ``panel.viewer``, ``panel.runner`` (the shared :class:`TaskRunner`),
``panel.models`` (a :class:`ModelCache`), ``panel.model_picker``/``panel.device_picker``,
``panel.log`` and ``panel.tabs.get("Load")`` (the viewer's Load tab, possibly another dock's).

The single-capability widgets of the Plugins menu are this panel with one tab, in compact form
(pickers on one row, no log box). Every panel of a viewer shares one :class:`Session`: the
model and device choice, the loaded model, the plate (Load tab) and the log.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .pickers import DevicePicker, ModelPicker
from .session import ModelCache, Session, session_for
from .worker import TaskRunner

__all__ = ["NEEDS_LOAD", "TABS", "MainPanel", "ModelCache", "Session", "Tabs"]

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


# tabs that cannot work without a Load tab: their compact widget brings one when the viewer
# has none (the others use the viewer's Load tab when there is one: Reconstruct works on any
# Image layers, QC and Fine-tune take plate folders of their own)
NEEDS_LOAD = {"Embed"}


class Tabs(dict):
    """A panel's own tabs by title. ``tabs["Load"]``, ``tabs.get("Load")`` and ``"Load" in tabs``
    also find the viewer's Load tab of another CellMAE dock (looked up when asked, so one opened
    later counts); iterating gives the panel's own tabs only."""

    def __init__(self, session: Session):
        super().__init__()
        self._session = session

    def _shared(self, key: str) -> Any:
        return self._session.load_tab if key == "Load" else None

    def own(self, key: str) -> Any:
        return dict.get(self, key)

    def __missing__(self, key: str) -> Any:
        tab = self._shared(key)
        if tab is None:
            raise KeyError(key)
        return tab

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (
            isinstance(key, str) and self._shared(key) is not None
        )


class MainPanel(QWidget):
    """The CellMAE panel.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Injected by napari.
    tabs : sequence of str, optional
        Titles of the tabs to show (default: all).
    compact : bool
        The single-capability widgets of the Plugins menu: the pickers on one row, no log box
        (the messages still reach the other docks' logs), no tab bar for a single tab, and a Load
        tab added for a tab of :data:`NEEDS_LOAD` when the viewer has none yet (it then serves
        every CellMAE dock of the viewer).
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        tabs: tuple[str, ...] | None = None,
        compact: bool = False,
    ):
        super().__init__()
        self.viewer = napari_viewer
        self.setObjectName("CellMAEPanel")
        self.compact = compact
        self.session: Session = session_for(napari_viewer)
        self.session.panels.add(self)
        self.models = self.session.models

        self.model_picker = ModelPicker()
        self.device_picker = DevicePicker()
        self._adopt_session_choice()
        if compact:
            header: Any = QHBoxLayout()
            header.addWidget(QLabel("Model"))
            header.addWidget(self.model_picker, 1)
            header.addWidget(QLabel("Device"))
            header.addWidget(self.device_picker)
        else:
            header = QFormLayout()
            header.addRow("Model", self.model_picker)
            header.addRow("Device", self.device_picker)

        # the log first: tabs may log while they are built
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(500)
        self.log_view.setMaximumHeight(90)
        self.log_view.setPlaceholderText("Messages appear here.")
        self.runner = TaskRunner(status=self.log)

        wanted = list(tabs) if tabs is not None else [t for t, _ in TABS]
        if compact and NEEDS_LOAD & set(wanted) and self.session.load_tab is None:
            wanted.insert(0, "Load")  # no plate in this viewer yet: this dock brings one
        self.tab_widget = QTabWidget()
        self.tab_widget.setObjectName("CellMAETabs")
        self.tabs = Tabs(self.session)
        for title, target in TABS:
            if title not in wanted:
                continue
            module_name, class_name = target.split(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            widget = cls(self)
            self.tabs[title] = widget
            self.tab_widget.addTab(widget, title)
            if title == "Load":
                self.session.set_load_tab(widget)
        self.tab_widget.setVisible(self.tab_widget.count() > 0)
        self.tab_widget.tabBar().setVisible(self.tab_widget.count() > 1)  # one tab: no tab bar

        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addWidget(self.tab_widget, 1)
        layout.addWidget(self.runner)
        layout.addWidget(self.status)
        if not compact:
            layout.addWidget(self.log_view)

        self.model_picker.source_changed.connect(self._source_picked)
        self.device_picker.device_changed.connect(self._device_picked)
        self.session.source_changed.connect(self._session_source)
        self.session.device_changed.connect(self._session_device)
        self.session.message.connect(self._session_message)
        self.session.load_tab_opened.connect(self._load_tab_opened)
        # a tab with a task bar of its own (Fine-tune): the panel's bar only while it works
        self.tab_widget.currentChanged.connect(self._update_task_bar)
        self.runner.started.connect(self._update_task_bar)
        self.runner.finished.connect(self._update_task_bar)
        self._update_task_bar()

    # -- the shared model/device choice -----------------------------------------------------
    def _adopt_session_choice(self) -> None:
        if self.session.source is None:
            self.session.set_source(self.model_picker.source())
        elif self.session.source != self.model_picker.source():
            self.model_picker.set_source(self.session.source)
        if self.session.device is None:
            self.session.set_device(self.device_picker.device())
        else:
            self.device_picker.set_device(self.session.device)

    def _source_picked(self, source: str) -> None:
        if source != self.session.source:
            self.session.set_source(source)
            self.log(f"model: {source or '(none)'}")

    def _device_picked(self, device: str) -> None:
        if device != self.session.device:
            self.session.set_device(device)
            self.log(f"device: {device}")

    def _session_source(self, source: str) -> None:
        if source != self.model_picker.source():
            self.model_picker.set_source(source)

    def _session_device(self, device: str) -> None:
        if device != self.device_picker.device():
            self.device_picker.set_device(device)

    # -- the shared Load tab ----------------------------------------------------------------
    def _load_tab_opened(self, load: Any) -> None:
        """A Load tab opened after this panel (another dock's): follow its plate and fields as
        the tabs do with a Load tab present when they are built."""
        if load is self.tabs.own("Load"):
            return
        for tab in self.tabs.values():
            for signal, slot in (
                ("plate_loaded", "_plate_loaded"),
                ("field_opened", "_field_opened"),
            ):
                if hasattr(tab, slot):
                    getattr(load, signal).connect(getattr(tab, slot))

    # -- the task bar -----------------------------------------------------------------------
    def _update_task_bar(self, *_: Any) -> None:
        own = getattr(self.tab_widget.currentWidget(), "runner", None)
        self.runner.setVisible(own is None or own is self.runner or self.runner.busy)

    # -- shared helpers for tabs ------------------------------------------------------------
    def log(self, message: str) -> None:
        """Show ``message`` on the status line and append it to the panel's log (and to the
        logs of the viewer's other CellMAE docks)."""
        self.status.setText(message)
        self.log_view.appendPlainText(message)
        logger.info(message)
        self.session.message.emit(self, message)

    def _session_message(self, sender: Any, message: str) -> None:
        if sender is not self:
            self.log_view.appendPlainText(message)

    def model_source(self) -> str:
        return self.model_picker.source()

    def device(self) -> str:
        return self.device_picker.device()

    def get_model(self) -> Any:
        """The current model on the current device (loads it the first time; call from a worker)."""
        return self.models.get(self.model_source(), self.device())

    def closeEvent(self, event: Any) -> None:
        self.runner.cancel()
        self.session.panels.discard(self)
        if not len(self.session.panels):  # the viewer's last CellMAE dock: free the model
            self.models.clear()
        super().closeEvent(event)
