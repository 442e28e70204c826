"""The Reconstruct tab in a real viewer: a real field from the Load tab, hiding a channel,
re-running, Cancel, the channel-count message, saving, and the OME-TIFF writer."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from qtpy.QtCore import Qt

from _openphenom_ref import SMALL_OPENPHENOM
from napari_cellmae._qt.reconstruct_tab import ERROR_LAYER, HIDE, OUTPUT_KEY, USE
from napari_cellmae.model import CellMAE
from napari_cellmae.synthetic import write_plate

pytestmark = pytest.mark.gui

TIMEOUT = 30_000


@pytest.fixture
def panel(make_napari_viewer, test_model_dir):
    from napari_cellmae._qt.main_panel import TABS

    assert [t for t, _ in TABS[:2]] == ["Load", "Reconstruct"]
    viewer = make_napari_viewer()
    # as a user opens it: napari hands the panel a proxy of the viewer (and of its layers)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cellmae", "CellMAE")
    widget.model_picker.set_source(str(test_model_dir))
    return widget


def _open(panel, qtbot, folder, well, site=1):
    load = panel.tabs["Load"]
    load.path_edit.setText(str(folder))
    with qtbot.waitSignal(panel.runner.finished, timeout=TIMEOUT):
        load.scan_button.click()
    load.well_combo.setCurrentIndex(load.well_combo.findData(well))
    load.site_combo.setCurrentIndex(load.site_combo.findData(site))
    with qtbot.waitSignal(panel.runner.finished, timeout=TIMEOUT):
        load.open_button.click()
    return load


def _press(panel, qtbot, tab):
    with qtbot.waitSignal(panel.runner.finished, timeout=TIMEOUT) as done:
        tab.run_button.click()
    return done.args[0]


def _row(tab, name):
    table = tab.channel_table
    return next(r for r in range(table.rowCount()) if table.item(r, 1).text() == name)


def _outputs(viewer):
    return [layer.name for layer in viewer.layers if OUTPUT_KEY in layer.metadata]


def test_real_field_gives_the_four_views_and_rerun_updates_them(panel, qtbot, real_data):
    viewer = panel.viewer
    _open(panel, qtbot, real_data / "ExampleHuman", "D03")
    tab = panel.tabs["Reconstruct"]
    viewer.layers.move(viewer.layers.index("d0"), len(viewer.layers))  # d0 on top of the list
    layers, hidden = tab.selected()  # the opened field's channels are ticked, in field order
    assert [layer.name for layer in layers] == ["d0", "d1", "d2"] and hidden == []
    assert tab.channel_table.item(2, 1).text() == "d0"  # the table follows the layer list
    tab.mask_ratio.setValue(0.5)
    tab.seed.setValue(1)
    assert _press(panel, qtbot, tab) == "done"

    kinds = ("masked", "reconstruction", "prediction")
    names = [f"{kind} d{c}" for kind in kinds for c in range(3)]
    assert {*names, ERROR_LAYER} == set(_outputs(viewer))
    assert viewer.layers[-1].name == ERROR_LAYER  # the heatmap is on top
    for name in (*names, ERROR_LAYER):
        assert viewer.layers[name].data.shape == (512, 512)
    d0 = viewer.layers["d0"]
    rec0, masked0 = viewer.layers["reconstruction d0"], viewer.layers["masked d0"]
    assert rec0.colormap.name == d0.colormap.name and masked0.colormap.name == d0.colormap.name
    np.testing.assert_allclose(rec0.contrast_limits, d0.contrast_limits)
    assert masked0.translate[-1] > 512 and rec0.translate[-1] > masked0.translate[-1]
    pred0 = viewer.layers["prediction d0"]
    assert pred0.translate[-1] > rec0.translate[-1] and pred0.colormap.name == d0.colormap.name
    # the MAE figure: visible patches are the input's pixels, hidden ones the model's prediction
    hid = tab.result.mask[0]
    np.testing.assert_array_equal(rec0.data[~hid], np.asarray(d0.data, np.float32)[~hid])
    np.testing.assert_array_equal(rec0.data[hid], pred0.data[hid])
    assert not np.array_equal(pred0.data[~hid], rec0.data[~hid])  # raw output differs there
    np.testing.assert_allclose(viewer.layers[ERROR_LAYER].translate, masked0.translate)
    overlay = viewer.layers[ERROR_LAYER].data  # hidden patches only: visible ones are 0
    hidden_any = tab.result.mask.any(axis=0)
    assert (overlay[~hidden_any] == 0).all() and (overlay[hidden_any] > 0).all()
    assert 0.45 < (masked0.data == 0).mean() < 0.6  # half of the patches hidden (plus dark pixels)
    assert tab.summary_table.rowCount() == 3
    assert tab.summary_table.item(0, 0).text() == "d0"
    assert "3 channels, 9 tiles, mask ratio 0.5, seed 1" in tab.message.text()
    assert tab.result.model["source"] == panel.model_source()

    # hide d1 through its checkbox, new seed: the same layers are updated in place
    before = {name: viewer.layers[name].unique_id for name in _outputs(viewer)}
    tab.channel_table.item(_row(tab, "d1"), HIDE).setCheckState(Qt.CheckState.Checked)
    tab.seed.setValue(2)
    assert _press(panel, qtbot, tab) == "done"
    assert {name: viewer.layers[name].unique_id for name in _outputs(viewer)} == before
    assert not viewer.layers["masked d1"].data.any()  # the hidden channel is all blank
    assert viewer.layers["masked d0"].data.any()
    assert tab.summary_table.item(1, 0).text() == "d1 (hidden)"
    assert tab.result.hidden_channels == (1,) and tab.result.seed == 2


def test_ticked_layers_hidden_channel_save_and_writer(make_napari_viewer, qtbot, tmp_path,
                                                      test_model_dir):  # fmt: skip
    viewer = make_napari_viewer()
    # the single-tab widget of the Plugins menu
    _dock, widget = viewer.window.add_plugin_dock_widget(
        "napari-cellmae", "Reconstruct masked view"
    )
    assert type(widget).__name__ == "ReconstructWidget" and list(widget.tabs) == ["Reconstruct"]
    widget.model_picker.set_source(str(test_model_dir))
    tab = widget.tabs["Reconstruct"]
    rng = np.random.default_rng(0)
    for name in ("nuclei", "actin", "other"):
        viewer.add_image(rng.integers(0, 4000, (200, 300)).astype(np.uint16), name=name)
    viewer.add_image(np.zeros((10, 20, 20)), name="a stack")  # not a 2-D channel: not listed
    assert [tab.channel_table.item(r, 1).text() for r in range(3)] == ["nuclei", "actin", "other"]
    assert tab.channel_table.rowCount() == 3
    assert tab.selected() == ([], [])
    tab.run_button.click()  # nothing ticked: a message, no task
    assert "tick the Image layers" in tab.message.text() and not widget.runner.busy

    tab.channel_table.item(0, USE).setCheckState(Qt.CheckState.Checked)
    tab.channel_table.item(1, USE).setCheckState(Qt.CheckState.Checked)
    tab.channel_table.item(1, HIDE).setCheckState(Qt.CheckState.Checked)
    assert _press(widget, qtbot, tab) == "done"
    assert sorted(_outputs(viewer)) == sorted(
        ["masked nuclei", "masked actin", "reconstruction nuclei", "reconstruction actin",
         "prediction nuclei", "prediction actin", ERROR_LAYER]
    )  # fmt: skip
    assert not viewer.layers["masked actin"].data.any()
    assert viewer.layers["reconstruction actin"].data.shape == (200, 300)
    # the rows keep their ticks when outputs are added; outputs are not offered as channels
    assert tab.channel_table.rowCount() == 3 and tab.selected()[1] == [1]

    with qtbot.waitSignal(widget.runner.finished, timeout=TIMEOUT):
        tab.save_results(str(tmp_path / "saved"))
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "reconstruction_preview.png" in saved and "reconstruction_run.json" in saved

    # the writer contribution: selected reconstruction layers -> one OME-TIFF channel stack
    viewer.layers.selection = {viewer.layers["reconstruction nuclei"],
                               viewer.layers["reconstruction actin"]}  # fmt: skip
    out = tmp_path / "rec.ome.tif"
    written = viewer.layers.save(str(out), selected=True)
    assert written == [str(out)]
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "CYX" and tif.series[0].shape == (2, 200, 300)
        assert 'Name="nuclei"' in tif.ome_metadata and 'Name="actin"' in tif.ome_metadata
        data = tif.asarray()
    np.testing.assert_array_equal(data[0], viewer.layers["reconstruction nuclei"].data)


def test_cancel_leaves_no_layers(panel, qtbot):
    viewer = panel.viewer
    tab = panel.tabs["Reconstruct"]
    rng = np.random.default_rng(1)
    layers = [viewer.add_image(rng.integers(0, 255, (2048, 2048), dtype=np.uint8)) for _ in "ab"]
    tab.set_channels(layers)
    pressed = []

    def cancel_on_first_tile(*_):
        if not pressed and panel.runner.worker is not None:
            pressed.append(True)
            panel.runner.cancel_button.click()

    with qtbot.waitSignal(panel.runner.started, timeout=TIMEOUT):
        worker = tab.reconstruct()
    worker.yielded.connect(cancel_on_first_tile)
    with qtbot.waitSignal(panel.runner.finished, timeout=TIMEOUT) as done:
        pass
    assert pressed and done.args[0] == "cancelled"
    assert _outputs(viewer) == [] and tab.result is None
    assert "cancelled" in panel.status.text()


def test_channel_count_mismatch_is_a_message(panel, qtbot, tmp_path):
    from napari_cellmae.hub import save_model

    torch.manual_seed(0)
    folder = save_model(CellMAE(SMALL_OPENPHENOM), tmp_path / "six", metadata={"name": "six-ch"})
    panel.model_picker.set_source(str(folder))
    plate = write_plate(tmp_path, "imagexpress", wells=1, sites=1, n_channels=3, size=64)
    _open(panel, qtbot, plate, "A01")
    tab = panel.tabs["Reconstruct"]
    assert _press(panel, qtbot, tab) == "error"
    assert "six-ch reconstructs exactly 6 channels; the field has 3" in tab.message.text()
    assert "exactly 6 channels" in panel.status.text()
    assert "Traceback" not in panel.log_view.toPlainText()
    assert _outputs(panel.viewer) == []
