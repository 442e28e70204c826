"""Run a core progress generator off the GUI thread, with a progress bar, ETA and Cancel.

The core's long-running functions are generators that ``yield Progress(...)`` and ``return`` a
result (:mod:`napari_cellmae.progress`). :class:`TaskRunner` runs one in a napari
``thread_worker``; Cancel stops the generator at its next ``yield`` (its ``finally`` blocks run),
so the GUI never freezes and nothing is left half-written.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from ..progress import EtaEstimator, Progress, format_seconds

logger = logging.getLogger(__name__)

# errors a user can cause: shown as one line, no traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def gui_text(exc: BaseException) -> str:
    """An error's message for the GUI: its ``gui_message`` where it has one (it names the
    widgets to use, where ``str(exc)`` speaks Python/CLI: ``layout=…``, ``--layout``)."""
    return str(getattr(exc, "gui_message", None) or exc)


def _on_destroyed(alive: dict[str, Any], *_: Any) -> None:
    alive["alive"] = False
    if alive["worker"] is not None:
        alive["worker"].quit()


class TaskRunner(QWidget):
    """Progress bar + ETA + Cancel button driving one background task at a time.

    Parameters
    ----------
    status : callable, optional
        Receives one-line status messages (the panel's log line).
    """

    started = Signal(str)  # description
    finished = Signal(str)  # "done" | "cancelled" | "error"

    def __init__(self, parent: QWidget | None = None, status: Callable[[str], None] | None = None):
        super().__init__(parent)
        self._status = status or (lambda msg: None)
        self._worker: Any = None
        self._eta: EtaEstimator | None = None
        self._t0 = 0.0
        self._description = ""
        # Set when Qt destroys this widget: a worker still running then is told to stop, and
        # its late signals are dropped instead of touching deleted widgets.
        # (the handler holds this dict, not the widget, so it can run while the widget dies)
        self._alive: dict[str, Any] = {"alive": True, "worker": None}
        self.destroyed.connect(partial(_on_destroyed, self._alive))

        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setFormat("idle")
        self.bar.setValue(0)
        self.eta_label = QLabel("")
        self.eta_label.setMinimumWidth(90)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)

        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.eta_label)
        layout.addWidget(self.cancel_button)

    # -- public API ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._worker is not None

    @property
    def worker(self) -> Any:
        """The running napari worker, or None."""
        return self._worker

    def start(
        self,
        func: Callable[..., Any],
        *args: Any,
        description: str = "",
        on_progress: Callable[[Progress], None] | None = None,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_finished: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run generator function ``func(*args, **kwargs)`` in a worker thread.

        ``on_progress`` gets every yielded :class:`Progress` (on the GUI thread), ``on_result`` the
        generator's return value, ``on_error`` an exception, ``on_finished`` one of
        ``"done"``/``"cancelled"``/``"error"``. Raises RuntimeError while another task runs.
        """
        from napari.qt.threading import create_worker

        if self.busy:
            raise RuntimeError(f"busy with {self._description!r}: wait or press Cancel first")
        gen = func(*args, **kwargs)
        if not hasattr(gen, "send"):
            raise TypeError(f"{func!r} must be a generator function yielding Progress events")

        def _task() -> Any:
            return (yield from gen)

        # errors are ours to show (no re-raise into the Qt event loop)
        worker = create_worker(_task, _start_thread=False, _ignore_errors=True)
        # On Cancel the worker leaves its loop without closing the generator: close it in the
        # worker thread (DirectConnection) so the task's `finally` blocks run there, not on the GUI.
        worker.aborted.connect(gen.close, Qt.ConnectionType.DirectConnection)
        self._worker = worker
        self._description = description or getattr(func, "__name__", "task")
        self._eta = EtaEstimator()
        self._t0 = time.monotonic()
        outcome = {"state": "done"}
        alive = self._alive
        alive["worker"] = worker

        def _yielded(event: Any) -> None:
            if not alive["alive"]:
                return
            if isinstance(event, Progress):
                self._show(event)
                if on_progress is not None:
                    on_progress(event)

        def _returned(value: Any) -> None:
            if alive["alive"] and on_result is not None:
                on_result(value)

        def _errored(exc: BaseException) -> None:
            outcome["state"] = "error"
            if not alive["alive"]:
                logger.error("".join(traceback.format_exception(exc)))
                return
            if isinstance(exc, USER_ERRORS):
                self._status(f"{self._description}: {gui_text(exc)}")
            else:
                logger.error("".join(traceback.format_exception(exc)))
                self._status(f"{self._description} failed: {type(exc).__name__}: {exc}")
            if on_error is not None:
                on_error(exc)

        def _aborted() -> None:
            outcome["state"] = "cancelled"

        def _finished() -> None:
            if not alive["alive"]:
                return
            state = outcome["state"]
            elapsed = format_seconds(time.monotonic() - self._t0)
            # leave the busy indicator whatever happened (a task can end before its first
            # event with a total: failed at once, or nothing to do): a still bar with text
            if self.bar.maximum() == 0:
                self.bar.setRange(0, 1)
                self.bar.setValue(0)
            if state == "done":
                self.bar.setValue(self.bar.maximum())
                self.bar.setFormat(f"{self._description}: done in {elapsed}")
                self._status(f"{self._description}: done in {elapsed}")
            elif state == "cancelled":
                self.bar.setFormat(f"{self._description}: cancelled")
                self._status(f"{self._description}: cancelled after {elapsed}")
            else:
                self.bar.setFormat(f"{self._description}: failed")
            self.eta_label.setText("")
            self.cancel_button.setEnabled(False)
            self._worker = None
            alive["worker"] = None
            self.finished.emit(state)
            if on_finished is not None:
                on_finished(state)

        worker.yielded.connect(_yielded)
        worker.returned.connect(_returned)
        worker.errored.connect(_errored)
        worker.aborted.connect(_aborted)
        worker.finished.connect(_finished)

        self.bar.setRange(0, 0)  # busy indicator until the first event with a total
        self.bar.setFormat(f"{self._description}…")
        self.eta_label.setText("ETA --:--")
        self.cancel_button.setEnabled(True)
        self._status(f"{self._description}: started")
        self.started.emit(self._description)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running task to stop at its next progress event."""
        if self._worker is not None:
            self.cancel_button.setEnabled(False)
            self.bar.setFormat(f"{self._description}: cancelling…")
            self._worker.quit()

    # -- internals --------------------------------------------------------------------------
    def _show(self, event: Progress) -> None:
        if event.total:
            self.bar.setRange(0, int(event.total))
            self.bar.setValue(min(int(event.done), int(event.total)))
            text = f"{event.done}/{event.total}"
        else:
            self.bar.setRange(0, 0)
            text = f"{event.done}"
        if event.message:
            text = f"{event.message} ({text})"
        self.bar.setFormat(text)
        assert self._eta is not None
        self.eta_label.setText(f"ETA {format_seconds(self._eta.update(event.done, event.total))}")
