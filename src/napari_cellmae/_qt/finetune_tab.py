"""The Fine-tune tab: adapt the picked model to your plate folders, watch the loss, see whether it
helped, and use the new model everywhere.

Start runs ``python -m napari_cellmae.cli finetune … --progress-json`` in a SUBPROCESS, so the
memory the training takes (GPU memory included) is returned to the system when it ends. The tab
reads the child's JSON lines in a worker thread of its own task runner (progress, ETA, Cancel;
other tabs stay usable meanwhile) and draws a live loss plot. Cancel asks the child to stop (a
``stop`` line on its stdin): it finishes its step, writes a checkpoint and exits; Resume
continues from that checkpoint. When the run ends the report is shown and every model picker is
refreshed, so the new model is offered in every tab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..progress import Progress
from .embed_plot import BACKGROUND, FOREGROUND, MARK, POINT, dark_axes
from .main_panel import MainPanel
from .pickers import ModelPicker
from .worker import TaskRunner

if TYPE_CHECKING:  # pragma: no cover
    import napari

STOP_TIMEOUT_S = 120  # how long Cancel waits for the child's checkpoint before terminating it


def finetune_process(cmd: list[str]):
    """Run a ``cellmae finetune --progress-json`` command; yield its events as Progress (the JSON
    object in ``payload["event"]``); return the final event. Closing the generator asks the
    child to stop gracefully (``stop`` on stdin) and waits for its checkpoint."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    errors: deque[str] = deque(maxlen=20)
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    last: dict[str, Any] = {}
    done, total = 0, None  # other events keep the bar where the last progress left it
    try:
        yield Progress(0, None, "starting the training process", {"event": {"event": "spawned"}})
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            last = event
            if event.get("event") == "progress":
                done, total = event["done"], event["total"]
                yield Progress(done, total, event["message"], {"event": event})
            else:
                yield Progress(done, total, event.get("event", ""), {"event": event})
        proc.wait()
    finally:
        if proc.poll() is None:  # cancelled: let the child checkpoint, then make sure it ends
            try:
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            except OSError:
                pass
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=30)
        reader.join(timeout=5)
    if proc.returncode not in (0, 130):
        if last.get("event") == "error" and last.get("gui_message"):  # the fix in GUI words
            raise ValueError(str(last["gui_message"]))
        message = next(
            (e.strip() for e in reversed(errors) if "error:" in e), "".join(errors)[-500:]
        )
        raise ValueError(message.split("error: ", 1)[-1] or f"exit code {proc.returncode}")
    return last


class LossPlot(QWidget):
    """Training loss per step and validation loss per epoch, redrawn at most twice a second."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.figure = Figure(figsize=(4, 2.4), dpi=100, facecolor=BACKGROUND, layout="tight")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.ax = self.figure.add_subplot()
        self.train_points: list[tuple[int, float]] = []
        self.val_points: list[tuple[int, float]] = []
        (self.train_line,) = self.ax.plot([], [], color=POINT, lw=1, label="train")
        (self.val_line,) = self.ax.plot([], [], "o-", color=MARK, label="validation")
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("masked MSE")
        dark_axes(self.ax)
        self.ax.legend(fontsize=7, facecolor=BACKGROUND, labelcolor=FOREGROUND)
        # shown while there is no point: an empty autoscaled axis would read -0.04…0.04
        self.empty_note = self.ax.text(
            0.5,
            0.5,
            "the loss appears here once training starts",
            transform=self.ax.transAxes,
            ha="center",
            va="center",
            color=FOREGROUND,
            fontsize=8,
        )
        self._show_empty(True)
        self._drawn = 0.0
        # a throttled redraw is not dropped: the latest points are drawn when the window ends
        self._pending = QTimer(self)
        self._pending.setSingleShot(True)
        # bound methods, not lambdas, as slots here: PyQt drops a bound method's connection
        # when its widget is destroyed; a lambda holding `self` can be called after that
        self._pending.timeout.connect(self._redraw_pending)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def clear(self) -> None:
        self.train_points.clear()
        self.val_points.clear()
        self.redraw(force=True)

    def add(self, payload: dict[str, Any]) -> None:
        kind = payload.get("kind")
        if kind == "start":  # a run (re)starting: the curves so far are the checkpoint's
            self.train_points[:] = [(s[0], s[1]) for s in payload.get("steps_so_far") or []]
            self.val_points[:] = [
                (h["step"], h["val_loss"])
                for h in payload.get("history") or []
                if h.get("val_loss") is not None
            ]
        elif kind == "step" and payload.get("train_loss") is not None:
            self.train_points.append((payload["step"], payload["train_loss"]))
        elif kind in ("val", "epoch") and payload.get("val_loss") is not None:
            self.val_points.append((payload["step"], payload["val_loss"]))
        self.redraw(force=kind != "step")

    def _redraw_pending(self) -> None:
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.5:
            if not self._pending.isActive():
                self._pending.start(max(1, int(1000 * (0.5 - (now - self._drawn)))))
            return
        self._pending.stop()
        self._drawn = now
        for line, points in (
            (self.train_line, self.train_points),
            (self.val_line, self.val_points),
        ):
            line.set_data([p[0] for p in points], [p[1] for p in points])
        empty = not (self.train_points or self.val_points)
        self._show_empty(empty)
        if not empty:
            self.ax.relim()
            self.ax.autoscale_view()
        self.canvas.draw_idle()

    def _show_empty(self, empty: bool) -> None:
        """No points: no ticks (no made-up scale), a note instead; points: normal axes."""
        self.empty_note.set_visible(empty)
        if empty:
            self.ax.set_xlim(0, 1)
            self.ax.set_ylim(0, 1)
        self.ax.tick_params(labelbottom=not empty, labelleft=not empty, length=0 if empty else 3.5)


class FinetuneTab(QWidget):
    """Choose data, starting model (the panel's picker, or random weights), budget and options;
    Start / Cancel / Resume; live loss plot; the report when done."""

    def __init__(self, panel: MainPanel):
        super().__init__()
        self.panel = panel
        self.result: dict[str, Any] | None = None
        self.runner = TaskRunner(status=panel.log)  # its own: other tabs stay usable meanwhile

        # data
        self.plates = QListWidget()
        self.plates.setMaximumHeight(70)
        self.plates.setToolTip("Plate folders to train on (default: the Load tab's plate)")
        self.add_button = QPushButton("Add folder…")
        self.remove_button = QPushButton("Remove")
        data_buttons = QHBoxLayout()
        data_buttons.addWidget(self.add_button)
        data_buttons.addWidget(self.remove_button)
        data_box = QGroupBox("Data")
        data_layout = QVBoxLayout(data_box)
        data_layout.addWidget(self.plates)
        data_layout.addLayout(data_buttons)

        # start, budget, options
        self.scratch = QCheckBox("from random weights")
        self.preset = QComboBox()
        from ..model import PRESETS

        self.preset.addItems(list(PRESETS))
        self.preset.setEnabled(False)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100_000)
        self.epochs.setValue(10)
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0, 10_000)
        self.minutes.setSpecialValueText("no limit")
        self.minutes.setSuffix(" min")
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.batch_size.setValue(8)
        self.lr = QLineEdit("1e-4")
        self.freeze = QSpinBox()
        self.freeze.setRange(0, 48)
        self.freeze.setToolTip("Freeze the patch embedding and the first K encoder blocks")
        self.train_only = QComboBox()
        self.train_only.addItems(["all", "norms+last"])
        self.train_only.setToolTip("norms+last: only LayerNorms + the last block (small data)")
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.patience = QSpinBox()
        self.patience.setRange(0, 1000)
        self.patience.setValue(3)
        self.patience.setSpecialValueText("off")
        self.platemap = QLineEdit()
        self.platemap.setPlaceholderText("optional: platemap CSV for linear probes")
        self.label_column = QComboBox()
        self.label_column.setEditable(True)
        self.out = QLineEdit()
        self.out.setPlaceholderText("new model folder")
        self.out_button = QPushButton("…")
        self.out_button.setMaximumWidth(30)
        start_row = QHBoxLayout()
        start_row.addWidget(self.scratch)
        start_row.addWidget(self.preset, 1)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(self.out_button)
        form = QFormLayout()
        form.addRow("Start", start_row)
        form.addRow("Epochs", self.epochs)
        form.addRow("Time budget", self.minutes)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Learning rate", self.lr)
        form.addRow("Freeze blocks", self.freeze)
        form.addRow("Train", self.train_only)
        form.addRow("Validation wells", self.val_fraction)
        form.addRow("Patience (epochs)", self.patience)
        form.addRow("Platemap", self.platemap)
        form.addRow("Label column", self.label_column)
        form.addRow("Output", out_row)

        self.start_button = QPushButton("Start training")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the run of the output folder from its checkpoint")
        self.use_button = QPushButton("Use the new model")
        self.use_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.resume_button)
        buttons.addWidget(self.use_button)
        self.plot = LossPlot()
        self.summary = QLabel("Train on your plates; the starting model is the panel's picker.")
        self.summary.setWordWrap(True)
        self.report = QTextBrowser()
        self.report.setVisible(False)
        self.report.setMinimumHeight(220)

        layout = QVBoxLayout(self)
        layout.addWidget(data_box)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.runner)
        layout.addWidget(self.plot)
        layout.addWidget(self.summary)
        layout.addWidget(self.report, 1)

        self.add_button.clicked.connect(self._browse_plate)
        self.remove_button.clicked.connect(self._remove_plate)
        self.scratch.toggled.connect(self.preset.setEnabled)
        self.out_button.clicked.connect(self._browse_out)
        self.platemap.editingFinished.connect(self._read_columns)
        self.start_button.clicked.connect(self._start_clicked)
        self.resume_button.clicked.connect(self._resume_clicked)
        self.use_button.clicked.connect(self._use_model)
        self.runner.started.connect(self._run_started)
        self.runner.finished.connect(self._run_finished)
        load = panel.tabs.get("Load")
        if load is not None:
            load.plate_loaded.connect(self._plate_loaded)
            if getattr(load, "index", None) is not None:
                self._plate_loaded(load.index)
        self.out.textChanged.connect(self._update_resume)
        self._update_resume()

    # -- inputs -----------------------------------------------------------------------------
    def plate_folders(self) -> list[str]:
        return [self.plates.item(i).text() for i in range(self.plates.count())]

    def add_plate(self, folder: str) -> None:
        if folder and folder not in self.plate_folders():
            self.plates.addItem(str(folder))

    def _plate_loaded(self, index: Any) -> None:
        root = index.attrs.get("root")
        if root and not self.plate_folders():
            self.add_plate(str(root))

    def _browse_plate(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Plate folder")
        if folder:
            self.add_plate(folder)

    def _remove_plate(self) -> None:
        for item in self.plates.selectedItems():
            self.plates.takeItem(self.plates.row(item))

    def _browse_out(self) -> None:
        folder, _ = QFileDialog.getSaveFileName(self, "New model folder")
        if folder:
            self.out.setText(folder)

    def _read_columns(self) -> None:
        path = Path(self.platemap.text().strip())
        if path.is_file():
            with open(path) as f:
                header = f.readline().strip().split(",")
            self.label_column.clear()
            self.label_column.addItems([c for c in header if c != "Metadata_Well"])

    def default_out(self) -> str:
        from ..registry import cellmae_home

        start = self.preset.currentText() if self.scratch.isChecked() else self.panel.model_source()
        name = Path(start or "cellmae-tiny").name.replace("/", "-")
        return str(cellmae_home() / "models" / f"{name}-finetuned-{time.strftime('%Y%m%d-%H%M%S')}")

    def _checkpoint_exists(self) -> bool:
        out = self.out.text().strip()
        return bool(out) and Path(f"{Path(out).expanduser()}-checkpoints/last.pt").is_file()

    def _update_resume(self) -> None:
        self.resume_button.setEnabled(not self.runner.busy and self._checkpoint_exists())

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self._update_resume()

    # slots (bound methods: see LossPlot)
    def _start_clicked(self) -> None:
        self.start()

    def _resume_clicked(self) -> None:
        self.start(resume=True)

    def _run_started(self, *_: Any) -> None:
        self._set_running(True)

    def _run_finished(self, *_: Any) -> None:
        self._set_running(False)

    def command(self, resume: bool = False) -> list[str]:
        """The ``cellmae finetune`` command line the Start (or Resume) button runs."""
        out = self.out.text().strip()
        if not out:
            out = self.default_out()
            self.out.setText(out)
        plates = self.plate_folders()
        if not plates and not resume:
            raise ValueError("Fine-tune: add a plate folder (or load one in the Load tab) first.")
        try:
            lr = float(self.lr.text())
        except ValueError:
            raise ValueError(
                f"Fine-tune: learning rate {self.lr.text()!r} is not a number."
            ) from None
        cmd = [sys.executable, "-m", "napari_cellmae.cli", "finetune", *plates, "--out", out]
        if self.scratch.isChecked():
            cmd += ["--from-scratch", self.preset.currentText()]
        elif self.panel.model_source():
            cmd += ["--from", self.panel.model_source()]
        cmd += ["--epochs", str(self.epochs.value()), "--batch-size", str(self.batch_size.value())]
        cmd += ["--lr", repr(lr), "--freeze-blocks", str(self.freeze.value())]
        cmd += ["--train-only", self.train_only.currentText()]
        cmd += ["--val-fraction", str(self.val_fraction.value())]
        cmd += ["--patience", str(self.patience.value()), "--device", self.panel.device()]
        if self.minutes.value() > 0:
            cmd += ["--minutes", str(self.minutes.value())]
        if self.platemap.text().strip():
            cmd += ["--platemap", self.platemap.text().strip()]
            cmd += ["--label-column", self.label_column.currentText()]
        if resume:
            cmd.append("--resume")
        return [*cmd, "--progress-json"]

    # -- running ----------------------------------------------------------------------------
    def start(self, resume: bool = False) -> Any:
        """Start (or resume) training in a subprocess; returns the worker (None on bad input)."""
        try:
            cmd = self.command(resume)
        except ValueError as exc:
            self.panel.log(str(exc))
            return None
        self.result = None
        self.report.setVisible(False)
        self.use_button.setEnabled(False)
        if not resume:
            self.plot.clear()
        self.summary.setText("Starting the training process…")
        return self.runner.start(
            finetune_process,
            cmd,
            description="fine-tune",
            on_progress=self._progress,
            on_result=self._finished,
        )

    def _progress(self, event: Progress) -> None:
        data = (event.payload or {}).get("event", {})
        kind = data.get("event")
        if kind == "progress":
            payload = data.get("payload") or {}
            self.plot.add(payload)
            if payload.get("kind") in ("start", "val", "epoch", "probe"):
                self.summary.setText(event.message)
        elif kind == "probes":
            self.panel.log(
                f"probe ({data['model']}): {data['best_accuracy']:.1%} at block "
                f"{data['best_block']} (chance {data['chance']:.1%})"
            )

    def _finished(self, last: dict[str, Any]) -> None:
        self.plot.redraw(force=True)
        if last.get("event") == "cancelled":
            self.summary.setText(
                f"Stopped; checkpoint in {last['checkpoint_dir']}. Resume continues from it."
            )
            return
        if last.get("event") != "done":
            return
        self.result = last
        refresh_model_pickers()
        m = last["metrics"]
        text = f"New model: {last['folder']} ({m['steps']} steps, stopped by {m['stopped']})."
        if m.get("val_loss_before") is not None:
            text += (
                f" Validation loss {m['val_loss_before']:.4f} → {m['val_loss_best']:.4f} "
                f"(mean-fill {m['val_mean_fill']:.4f})."
            )
        self.summary.setText(text + " It is now in every model picker.")
        self.use_button.setEnabled(True)
        self.panel.log(f"fine-tune: {text}")
        if last.get("report"):
            self.show_report(last["report"])

    def show_report(self, path: str) -> None:
        report = Path(path)
        self.report.setSearchPaths([str(report.parent)])
        self.report.setMarkdown(report.read_text())
        self.report.setVisible(True)

    def _use_model(self) -> None:
        if self.result:
            self.panel.model_picker.set_source(str(Path(self.result["folder"]).resolve()))


def refresh_model_pickers() -> None:
    """Re-read the registry in every model picker of every CellMAE panel."""
    for widget in QApplication.allWidgets():
        if isinstance(widget, ModelPicker):
            widget.refresh()


class FinetuneWidget(MainPanel):
    """The "Fine-tune" widget of the Plugins menu: this tab, compact, sharing the viewer's
    model, device and Load tab with the other CellMAE docks."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(napari_viewer, tabs=("Fine-tune",), compact=True)
