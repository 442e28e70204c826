"""Every CellMAE dock of a viewer shares one model/device choice, one loaded model, one plate
(the Load tab) and the log; the single-capability widgets of the Plugins menu are compact."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui

WIDGETS = ("Load plate", "Reconstruct masked view", "Embed", "Artefact QC", "Fine-tune")


@pytest.fixture
def docks(make_napari_viewer):
    """The five single-capability widgets docked from the Plugins menu, in its order."""
    viewer = make_napari_viewer()
    widgets = {}
    for name in WIDGETS:
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-cellmae", name)
        widgets[name] = widget
    return viewer, widgets


def test_standalone_widgets_share_model_device_plate_and_log(docks, qtbot, tmp_path):
    from napari_cellmae.synthetic import write_plate

    _viewer, widgets = docks
    load_widget, qc_widget = widgets["Load plate"], widgets["Artefact QC"]
    # one session: one model cache, one Load tab (the Load widget's)
    sessions = {id(w.session) for w in widgets.values()}
    assert len(sessions) == 1
    assert len({id(w.models) for w in widgets.values()}) == 1
    load = load_widget.tabs["Load"]
    for name, widget in widgets.items():
        assert widget.tabs["Load"] is load, name
        if name != "Load plate":  # no second Load tab, no log box, pickers on one row
            assert widget.tab_widget.count() == 1 and list(widget.tabs) != ["Load"], name
        assert widget.log_view.parent() is None or not widget.log_view.isVisibleTo(widget)

    # choosing a model or device in one dock chooses it in every dock
    qc_widget.model_picker.set_source(str(tmp_path))
    assert {w.model_source() for w in widgets.values()} == {str(tmp_path)}
    embed = widgets["Embed"]
    embed.device_picker.combo.setCurrentIndex(embed.device_picker.combo.findData("cpu"))
    assert {w.device() for w in widgets.values()} == {"cpu"}

    # the plate scanned in the Load widget is the QC widget's default plate
    write_plate(tmp_path / "plate", "imagexpress", wells=2, sites=1, n_channels=2, size=64)
    with qtbot.waitSignal(load_widget.runner.finished, timeout=10_000):
        load.scan(str(tmp_path / "plate"))
    qc = qc_widget.tabs["QC"]
    assert qc.path_edit.text() == "" and qc.plate_source() is load.index
    assert "Load: imagexpress" in qc_widget.log_view.toPlainText()  # the shared log


def test_five_docked_widgets_are_compact(docks):
    """Each widget used to carry its own two-row pickers and a log box: 3,661 px with all five
    docked (measured under Xvfb by the issue). The shared state lets them drop both."""
    viewer, widgets = docks
    heights = {name: w.minimumSizeHint().height() for name, w in widgets.items()}
    for name, widget in widgets.items():
        header = widget.layout().itemAt(0)
        assert header.layout().__class__.__name__ == "QHBoxLayout", name  # one row
    full = widgets["Load plate"].__class__.__mro__[1](viewer, tabs=("Load",))
    assert full.minimumSizeHint().height() > heights["Load plate"]


def test_the_embed_widget_brings_a_load_tab_the_others_share(make_napari_viewer, qtbot, tmp_path):
    from napari_cellmae.synthetic import write_plate

    viewer = make_napari_viewer()
    _dock, qc_widget = viewer.window.add_plugin_dock_widget("napari-cellmae", "Artefact QC")
    assert list(qc_widget.tabs) == ["QC"] and "Load" not in qc_widget.tabs  # none in the viewer
    qc = qc_widget.tabs["QC"]
    assert "if any" in qc.path_edit.placeholderText()  # it does not claim a plate it lacks
    _dock, embed_widget = viewer.window.add_plugin_dock_widget("napari-cellmae", "Embed")
    tabs = embed_widget.tab_widget
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["Load", "Embed"]
    load = embed_widget.tabs["Load"]
    assert qc_widget.tabs["Load"] is load  # opened later, found when asked
    write_plate(tmp_path / "plate", "imagexpress", wells=2, sites=1, n_channels=2, size=64)
    with qtbot.waitSignal(embed_widget.runner.finished, timeout=10_000):
        load.scan(str(tmp_path / "plate"))
    assert qc.plate_source() is load.index
    assert str(tmp_path / "plate") in qc.path_edit.placeholderText()  # followed the late tab


def test_panel_and_widgets_of_another_viewer_are_separate(make_napari_viewer):
    from napari_cellmae._qt.main_panel import MainPanel

    a, b = make_napari_viewer(), make_napari_viewer()
    pa, pb = MainPanel(a, tabs=("Load",)), MainPanel(b, tabs=("Load",))
    assert pa.session is not pb.session and pa.tabs["Load"] is not pb.tabs["Load"]
