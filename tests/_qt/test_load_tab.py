"""The Load tab in a real viewer: scan, pick, Open field, click the plate map, name channels."""

import json

import numpy as np
import pytest

from napari_cellmae._qt.load_tab import channel_map_path
from napari_cellmae.synthetic import write_plate

pytestmark = pytest.mark.gui


@pytest.fixture
def panel(make_napari_viewer):
    from napari_cellmae._qt.main_panel import TABS, MainPanel

    assert TABS[0] == ("Load", "napari_cellmae._qt.load_tab:LoadTab")
    viewer = make_napari_viewer()
    widget = MainPanel(viewer)
    viewer.window.add_dock_widget(widget, name="CellMAE")
    return widget


@pytest.fixture
def plate(tmp_path):
    write_plate(tmp_path, "imagexpress", wells=3, sites=2, n_channels=3, size=64, seed=2)
    return tmp_path


def _scan(panel, qtbot, folder, layout_index=0, regex=""):
    tab = panel.tabs["Load"]
    tab.path_edit.setText(str(folder))
    tab.layout_combo.setCurrentIndex(layout_index)
    tab.regex_edit.setText(regex)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000) as done:
        tab.scan_button.click()
    return tab, done.args[0]


def test_scan_and_open_field(panel, qtbot, plate):
    tab, state = _scan(panel, qtbot, plate)
    assert state == "done"
    assert tab.index is not None and len(tab.index) == 3 * 2 * 3
    assert "imagexpress: 6 fields in 3 wells" in tab.summary.text()
    assert [tab.well_combo.itemText(i) for i in range(tab.well_combo.count())] == [
        "A01",
        "A02",
        "A03",
    ]
    assert tab.site_combo.count() == 2
    viewer = panel.viewer
    assert len(viewer.layers["plate map"].data) == 6

    opened = []
    tab.field_opened.connect(opened.append)
    tab.well_combo.setCurrentIndex(1)
    tab.site_combo.setCurrentIndex(1)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_button.click()
    assert [layer.name for layer in viewer.layers] == ["plate wells", "plate map", "w1", "w2", "w3"]
    assert all(viewer.layers[n].data.dtype == np.uint16 for n in ("w1", "w2", "w3"))
    assert viewer.layers["w1"].data.shape == (64, 64)
    info = opened[0]
    assert info["metadata"]["Metadata_Well"] == "A02" and info["metadata"]["Metadata_Site"] == 2
    assert info["image"].shape == (3, 64, 64) and info["channel_names"] == ["w1", "w2", "w3"]
    assert "opened SYNTH-P1 A02 site 2: 3 channels, 64×64 uint16" in panel.log_view.toPlainText()


def test_clicking_the_plate_map_opens_that_field(panel, qtbot, plate):
    tab, _ = _scan(panel, qtbot, plate)
    layer = panel.viewer.layers["plate map"]
    opened = []
    tab.field_opened.connect(opened.append)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        layer.selected_data = {5}  # select mode: selecting the point opens it
    assert opened[-1]["metadata"]["Metadata_Well"] == "A03"
    assert opened[-1]["metadata"]["Metadata_Site"] == 2

    class Click:  # what napari passes to a mouse callback in pan/zoom mode
        type = "mouse_press"
        position = tuple(layer.data[2])

    layer.mode = "pan_zoom"
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        for callback in layer.mouse_drag_callbacks:
            callback(layer, Click())
    assert opened[-1]["metadata"]["Metadata_Well"] == "A02"
    assert opened[-1]["metadata"]["Metadata_Site"] == 1
    assert panel.viewer.layers["w2"].metadata["cellmae_field"]["Metadata_Well"] == "A02"


def test_channel_names_rename_layers_and_are_remembered(panel, qtbot, plate):
    tab, _ = _scan(panel, qtbot, plate)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_field("A01", 1)
    tab.channel_table.item(0, 1).setText("DNA")  # as if typed in the table
    assert "DNA" in panel.viewer.layers and "w1" not in panel.viewer.layers
    assert tab.index.attrs["channel_names"]["w1"] == "DNA"
    saved = json.loads(channel_map_path(str(plate)).read_text())
    assert saved["channel_names"] == {"w1": "DNA", "w2": "w2", "w3": "w3"}
    assert saved["channels"] == ["w1", "w2", "w3"]
    tab.preset_combo.setCurrentIndex(tab.preset_combo.findData("JUMP Cell Painting"))
    tab.preset_combo.activated.emit(tab.preset_combo.currentIndex())
    assert tab.channel_names() == ["DNA", "ER", "RNA"]
    assert tab.channel_table.item(1, 1).text() == "ER"
    # scanning the plate again brings the names back
    tab2, _ = _scan(panel, qtbot, plate)
    assert tab2.channel_names() == ["DNA", "ER", "RNA"]
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_field("A03", 2)
    assert {"DNA", "ER", "RNA"} <= {layer.name for layer in panel.viewer.layers}


def test_regex_layout_on_real_speckles(panel, qtbot, real_data):
    tab = panel.tabs["Load"]
    regex_index = tab.layout_combo.findData("regex")
    assert not tab.regex_edit.isEnabled()
    tab.layout_combo.setCurrentIndex(regex_index)
    assert tab.regex_edit.isEnabled()
    tab, state = _scan(
        panel, qtbot, real_data / "speckles", regex_index, r"1-162hr(?P<channel>[a-z0-9]+?)2\.tif"
    )
    assert state == "done" and tab.index.attrs["layout"] == "regex"
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_button.click()
    hoe = panel.viewer.layers["hoe"]
    assert hoe.data.dtype == np.uint16 and hoe.data.shape == (1000, 1200)
    assert hoe.colormap.name == "blue"


def test_unknown_folder_error_on_the_status_line(panel, qtbot, real_data):
    tab, state = _scan(panel, qtbot, real_data / "speckles")
    assert state == "error"
    assert "no known plate layout" in panel.status.text()
    assert "(?P<well>" in panel.status.text()
    assert tab.index is None
    # GUI words, not Python/CLI ones; and no group is said to be required
    status = panel.status.text()
    assert "layout box" in status and "layout=" not in status and "--layout" not in status
    assert "each optional" in status and "without well every field is well A01" in status
    assert status.split(": ", 1)[1] in tab.summary.text()  # the summary says it too


def test_regex_without_a_well_group_reads_well_a01(panel, qtbot, real_data):
    """What the error text promises: a pattern with only a channel group works."""
    regex_index = panel.tabs["Load"].layout_combo.findData("regex")
    tab, state = _scan(
        panel, qtbot, real_data / "speckles", regex_index, r"1-162hr(?P<channel>[a-z0-9]+?)2\.tif"
    )
    assert state == "done"
    assert set(tab.index["Metadata_Well"]) == {"A01"} and set(tab.index["Metadata_Site"]) == {1}


def test_a_failed_scan_replaces_the_previous_summary(panel, qtbot, plate, tmp_path):
    tab, state = _scan(panel, qtbot, plate)
    assert state == "done" and "imagexpress: 6 fields" in tab.summary.text()
    missing = tmp_path / "no-such-plate"
    tab, state = _scan(panel, qtbot, missing)
    assert state == "error"
    summary = tab.summary.text()
    assert summary.startswith(f"Could not scan {missing}") and "does not exist" in summary
    assert "imagexpress: 6 fields" not in summary
    assert f"Still loaded: {plate}" in summary  # what the pickers still show
    bar = panel.runner.bar
    assert bar.maximum() > 0 and bar.format() == "scan plate: failed"  # not a busy bar


def test_dropped_folder_becomes_the_tabs_plate(panel, qtbot, real_data):
    tab = panel.tabs["Load"]
    panel.viewer.open(str(real_data / "transfluor-plate"), plugin="napari-cellmae")
    assert tab.index is not None and tab.index.attrs["layout"] == "cellomics"
    assert tab.well_combo.count() == 24
    assert tab.path_edit.text().endswith("transfluor-plate")
    opened = []
    tab.field_opened.connect(opened.append)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        panel.viewer.layers["plate map"].selected_data = {71}
    assert opened[0]["metadata"]["Metadata_Well"] == "O24"
    assert opened[0]["metadata"]["Metadata_Site"] == 3


def test_load_plate_widget_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cellmae", "Load plate")
    assert list(widget.tabs) == ["Load"]


def test_planes_timepoints_and_incomplete_sites_in_the_picker(panel, qtbot, tmp_path):
    write_plate(tmp_path, "harmony", wells=1, sites=2, n_channels=2, size=32, planes=3)
    next(tmp_path.rglob("r01c01f02p01-ch2sk1fk1fl1.tiff")).unlink()
    tab, _ = _scan(panel, qtbot, tmp_path)
    picker = tab.picker
    assert not picker.plate_combo.isVisibleTo(tab)  # one plate: no plate row
    assert picker.plane_combo.isVisibleTo(tab) and picker.plane_combo.count() == 3
    assert picker.time_combo.count() == 1
    assert [picker.site_combo.itemText(i) for i in range(2)] == ["1", "2 (incomplete)"]
    picker.plane_combo.setCurrentIndex(2)
    opened = []
    tab.field_opened.connect(opened.append)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_button.click()
    assert opened[0]["metadata"]["Metadata_Plane"] == 3
    assert opened[0]["metadata"]["Metadata_Timepoint"] == 1
    picker.site_combo.setCurrentIndex(1)
    picker.plane_combo.setCurrentIndex(0)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000) as done:
        tab.open_button.click()
    assert done.args == ["error"]
    assert "has no file for channel(s) ['2']" in panel.status.text()
    # GUI words: no "pass channels=[...]" (that is for Python)
    assert "channels=" not in panel.status.text() and "site list" in panel.status.text()


def _field_layers(viewer):
    return {layer.name: layer for layer in viewer.layers if "cellmae_field" in layer.metadata}


def test_another_plate_replaces_the_field_layers(panel, qtbot, real_data):
    """ExampleHuman (d0, d1, d2) then transfluor (d2 alone): d0 and d1 go, d2 is transfluor's
    with transfluor's colormap; within one plate a user's colormap stays."""
    viewer = panel.viewer
    tab, state = _scan(panel, qtbot, real_data / "ExampleHuman")
    assert state == "done"
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_button.click()
    assert sorted(_field_layers(viewer)) == ["d0", "d1", "d2"]
    assert viewer.layers["d2"].colormap.name != "gray"

    tab, state = _scan(panel, qtbot, real_data / "transfluor-plate")
    assert state == "done"
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_field("O01", 1)
    layers = _field_layers(viewer)
    assert list(layers) == ["d2"]  # no ExampleHuman channel left on screen
    d2 = layers["d2"]
    assert d2.colormap.name == "gray"  # a lone channel: grey, not ExampleHuman's d2 colour
    assert d2.metadata["cellmae_field"]["Metadata_Well"] == "O01"
    assert d2.data.shape == tab.current["image"].shape[1:]

    d2.colormap = "magenta"  # the user's choice survives browsing the same plate
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.open_field("O02", 2)
    assert viewer.layers["d2"] is d2 and d2.colormap.name == "magenta"
    assert d2.metadata["cellmae_field"]["Metadata_Well"] == "O02"
