import time

import pytest

from napari_cellmae.progress import Progress

pytestmark = pytest.mark.gui


@pytest.fixture
def panel(make_napari_viewer, qtbot):
    from napari_cellmae._qt.main_panel import MainPanel

    viewer = make_napari_viewer()
    widget = MainPanel(viewer)
    viewer.window.add_dock_widget(widget, name="CellMAE")
    return widget


def test_panel_docks_via_plugin_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    assert type(widget).__name__ == "MainPanel"
    # napari injects a proxy of the viewer: a layer added through it lands in this viewer
    widget.viewer.add_points([[1, 1]], name="via-panel")
    assert "via-panel" in viewer.layers
    assert any(name.startswith("CellMAE") for name in viewer.window.dock_widgets)


def test_model_picker_offers_openphenom_with_attribution(panel, tmp_path):
    picker = panel.model_picker
    sources = [picker.combo.itemData(i) for i in range(picker.combo.count())]
    assert "recursionpharma/OpenPhenom" in sources
    picker.set_source("recursionpharma/OpenPhenom")
    assert picker.source() == "recursionpharma/OpenPhenom"
    assert "Recursion" in picker.attribution.text()
    # a local folder becomes a new entry and is selected
    picker.set_source(str(tmp_path))
    assert picker.source() == str(tmp_path)
    assert picker.attribution.text() == ""


def test_device_picker_lists_cpu_with_memory(panel):
    picker = panel.device_picker
    assert picker.device() == "auto"
    labels = [picker.combo.itemText(i) for i in range(picker.combo.count())]
    data = [picker.combo.itemData(i) for i in range(picker.combo.count())]
    assert "cpu" in data
    assert any("GiB free" in t for t in labels if t.startswith("cpu"))
    picker.combo.setCurrentIndex(data.index("cpu"))
    assert picker.device() == "cpu"


def _slow_counter(n, delay, cleanup):
    try:
        for i in range(n):
            time.sleep(delay)
            yield Progress(i + 1, n, "counting")
        return n
    finally:
        cleanup.append("closed")


def test_worker_runs_generator_with_progress_and_result(panel, qtbot):
    runner = panel.runner
    results, events, cleanup = [], [], []
    with qtbot.waitSignal(runner.finished, timeout=10_000) as sig:
        runner.start(
            _slow_counter,
            5,
            0.01,
            cleanup,
            description="count",
            on_progress=events.append,
            on_result=results.append,
        )
        assert runner.busy
        with pytest.raises(RuntimeError, match="busy"):
            runner.start(_slow_counter, 1, 0.0, [])
    assert sig.args == ["done"]
    assert results == [5]
    assert [e.done for e in events] == [1, 2, 3, 4, 5]
    assert runner.bar.value() == runner.bar.maximum() == 5
    assert cleanup == ["closed"]
    assert not runner.busy
    assert "count: done" in panel.status.text()


def test_worker_cancel_stops_generator(panel, qtbot):
    runner = panel.runner
    events, results, cleanup = [], [], []
    with qtbot.waitSignal(runner.finished, timeout=10_000) as sig:
        runner.start(
            _slow_counter,
            10_000,
            0.005,
            cleanup,
            description="long",
            on_progress=events.append,
            on_result=results.append,
        )
        qtbot.waitUntil(lambda: len(events) >= 3, timeout=5_000)
        assert runner.cancel_button.isEnabled()
        assert runner.eta_label.text().startswith("ETA ")
        runner.cancel_button.click()
    assert sig.args == ["cancelled"]
    assert results == []
    assert cleanup == ["closed"]
    assert len(events) < 10_000
    assert "cancelled" in panel.status.text()


def test_closing_the_panel_mid_task_stops_it_quietly(qtbot):
    """A dock closed while its task runs: the task stops, its cleanup runs, no Qt errors."""
    from napari_cellmae._qt.worker import TaskRunner

    runner = TaskRunner()
    events, cleanup = [], []
    worker = runner.start(_slow_counter, 10_000, 0.005, cleanup, on_progress=events.append)
    qtbot.waitUntil(lambda: len(events) >= 3, timeout=5_000)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        runner.deleteLater()
    qtbot.wait(50)  # late progress signals arrive after the widget is gone
    assert cleanup == ["closed"]
    assert len(events) < 10_000


def _fails(path):
    yield Progress(0, 1)
    raise FileNotFoundError(f"{path} does not exist: choose a plate folder")


def test_worker_user_error_goes_to_status_line(panel, qtbot):
    errors = []
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000) as sig:
        panel.runner.start(_fails, "/nowhere", description="scan", on_error=errors.append)
    assert sig.args == ["error"]
    assert isinstance(errors[0], FileNotFoundError)
    assert "/nowhere does not exist" in panel.status.text()


@pytest.mark.parametrize(
    ("menu", "command", "dock_name"),
    [
        ("napari/layers/visualize", "napari-cellmae.reconstruct_widget", "Reconstruct masked view"),
        ("napari/layers/measure", "napari-cellmae.embed_widget", "Embed"),
        ("napari/layers/classify", "napari-cellmae.qc_widget", "Artefact QC"),
    ],
)
def test_layer_menus_open_the_single_capability_widgets(
    make_napari_viewer, menu, command, dock_name
):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    app = get_app_model()
    ids = [getattr(getattr(i, "command", None), "id", None) for i in app.menus.get_menu(menu)]
    assert command in ids
    app.commands.execute_command(command)
    assert any(name.startswith(dock_name) for name in viewer.window.dock_widgets)


def _fails_at_once(path):
    raise FileNotFoundError(f"{path} does not exist: choose a plate folder")
    yield  # a generator that fails before its first event


def _nothing_to_do():
    return "every well was already done"
    yield


@pytest.mark.parametrize(
    ("task", "state", "text"),
    [(_fails_at_once, "error", "QC: failed"), (_nothing_to_do, "done", "QC: done in")],
)
def test_bar_stops_when_a_task_ends_before_its_first_event(panel, qtbot, task, state, text):
    """The bar was left in its busy (bouncing) state, without text, when a task failed before
    its first progress event or had nothing to do."""
    runner = panel.runner
    args = ("/nowhere",) if task is _fails_at_once else ()
    with qtbot.waitSignal(runner.finished, timeout=10_000) as sig:
        runner.start(task, *args, description="QC")
    assert sig.args == [state]
    assert runner.bar.maximum() > 0  # a still bar (0, 0 is Qt's busy indicator)
    assert runner.bar.format().startswith(text)
    assert runner.bar.value() == (runner.bar.maximum() if state == "done" else 0)
    assert not runner.cancel_button.isEnabled() and runner.eta_label.text() == ""


def test_qc_on_a_missing_folder_leaves_a_still_bar(make_napari_viewer, qtbot, tmp_path):
    from napari_cellmae._qt.main_panel import MainPanel

    viewer = make_napari_viewer()
    panel = MainPanel(viewer, tabs=("Load", "QC"))
    viewer.window.add_dock_widget(panel, name="CellMAE")
    tab = panel.tabs["QC"]
    tab.set_head(None)  # classic metrics: no model to load before the scan fails
    tab.path_edit.setText(str(tmp_path / "missing"))
    with qtbot.waitSignal(panel.runner.finished, timeout=20_000) as sig:
        tab.run_button.click()
    assert sig.args == ["error"]
    assert panel.runner.bar.maximum() > 0 and panel.runner.bar.format().endswith(": failed")
    assert "does not exist" in panel.status.text()
