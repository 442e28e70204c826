"""One CellMAE state per napari viewer, shared by the main panel and the single-capability widgets.

Every CellMAE dock of a viewer (the panel, *Load plate*, *Reconstruct*, *Embed*, *Artefact QC*,
*Fine-tune*) works on the same:

- **model and device**: choosing a model or device in any dock selects it in all of them, and
  one :class:`ModelCache` holds the loaded model (loaded once, not once per dock);
- **plate**: the viewer's Load tab (the first one opened: the panel's, the *Load plate*
  widget's, or the *Embed* widget's, which brings one when the viewer has none);
- **log**: each dock's messages also reach the others' log.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from qtpy.QtCore import QObject, Signal

logger = logging.getLogger(__name__)


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


class Session(QObject):
    """The model/device choice, the loaded model, the plate (Load tab) and the log of a viewer."""

    source_changed = Signal(str)
    device_changed = Signal(str)
    message = Signal(object, str)  # (the dock that said it, the message)
    load_tab_opened = Signal(object)  # the viewer's Load tab, when it is first registered

    def __init__(self) -> None:
        super().__init__()
        self.models = ModelCache()
        self.source: str | None = None  # None until the first dock's picker reports
        self.device: str | None = None
        self._load: weakref.ref | None = None
        self.panels: weakref.WeakSet = weakref.WeakSet()

    @property
    def load_tab(self) -> Any:
        """The viewer's Load tab (None when no dock has one, or it was closed)."""
        tab = self._load() if self._load is not None else None
        try:
            if tab is not None:
                tab.objectName()  # raises once Qt deleted the widget
        except RuntimeError:
            tab = None
        return tab

    def set_load_tab(self, tab: Any) -> None:
        if self.load_tab is None:
            self._load = weakref.ref(tab)
            self.load_tab_opened.emit(tab)

    def set_source(self, source: str) -> None:
        if source != self.source:
            self.source = source
            self.source_changed.emit(source)

    def set_device(self, device: str) -> None:
        if device != self.device:
            self.device = device
            self.device_changed.emit(device)


_SESSIONS: dict[int, tuple[weakref.ref, Session]] = {}


def session_for(viewer: Any) -> Session:
    """The :class:`Session` of ``viewer`` (napari hands widgets a proxy: its target counts)."""
    real = getattr(viewer, "__wrapped__", viewer)
    key = id(real)
    entry = _SESSIONS.get(key)
    if entry is not None and entry[0]() is real:
        return entry[1]
    for k in [k for k, (ref, _) in _SESSIONS.items() if ref() is None]:
        del _SESSIONS[k]  # viewers that are gone
    session = Session()
    try:
        ref = weakref.ref(real)
    except TypeError:  # not weak-referenceable (a test double): keep it alive with the session
        ref = lambda real=real: real  # noqa: E731
    _SESSIONS[key] = (ref, session)
    return session
