"""The QC tab's summary says so when most of a plate is artefacts (and not otherwise)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def panel(make_napari_viewer, qtbot, tmp_path, test_model_dir, qc_head_file):
    """A QC tab on a 4-field plate (2 wells × 2 sites, 256², 12-bit), test encoder and head."""
    from napari_cellmae._qt.main_panel import MainPanel
    from napari_cellmae.qc import QCHead
    from napari_cellmae.synthetic import write_plate

    write_plate(tmp_path / "plate", "imagexpress", wells=2, sites=2, n_channels=1, size=256, seed=3)
    viewer = make_napari_viewer()
    widget = MainPanel(viewer, tabs=("Load", "QC"))
    viewer.window.add_dock_widget(widget, name="CellMAE")
    widget.model_picker.set_source(str(test_model_dir))
    load = widget.tabs["Load"]
    load.path_edit.setText(str(tmp_path / "plate"))
    with qtbot.waitSignal(widget.runner.finished, timeout=10_000):
        load.scan_button.click()
    widget.tabs["QC"].set_head(QCHead.load(qc_head_file))
    return widget


def test_the_summary_warns_when_most_of_the_plate_is_flagged(panel, qtbot):
    tab = panel.tabs["QC"]
    with qtbot.waitSignal(panel.runner.finished, timeout=60_000) as done:
        tab.run_button.click()
    assert done.args == ["done"], panel.status.text()
    tab.slider.setValue(0)  # threshold 0: every field flagged, the plate "mostly artefacts"
    qtbot.waitUntil(lambda: tab.fields["QC_Threshold"].iloc[0] == 0.0, timeout=2000)
    assert int(tab.fields["QC_Flag"].sum()) == 4
    text = tab.counts.text()
    assert "4 of 4 fields flagged" in text
    assert "⚠" in text and "% of fields" in text and "check" in text
    tab.slider.setValue(100)  # nothing flagged: no warning
    qtbot.waitUntil(lambda: tab.fields["QC_Threshold"].iloc[0] == 1.0, timeout=2000)
    assert "0 of 4 fields flagged" in tab.counts.text() and "⚠" not in tab.counts.text()
