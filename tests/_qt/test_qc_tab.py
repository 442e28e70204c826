"""The QC tab in a real viewer: run on a plate, the flagged table, click to open, relabel +
Retrain, the threshold, the plate heatmap, the encoder-mismatch notice, export."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """6 fields × 2 channels (256², 12-bit); A02 site 1 channel w2 defocused."""
    import tifffile

    from napari_cellmae.qc.artefacts import apply_artefact
    from napari_cellmae.synthetic import write_plate

    root = tmp_path_factory.mktemp("qc_plate")
    write_plate(root, "imagexpress", wells=3, sites=2, n_channels=2, size=256, seed=6)
    spoilt = next(root.rglob("*_A02_s1_w2.tif"))
    tifffile.imwrite(spoilt, apply_artefact(tifffile.imread(spoilt), "defocus", 5, seed=0))
    return root


@pytest.fixture
def panel(make_napari_viewer, qtbot, plate, test_model_dir, qc_head_file):
    from napari_cellmae._qt.main_panel import TABS, MainPanel
    from napari_cellmae.qc import QCHead

    titles = [t for t, _ in TABS]
    assert titles.index("QC") > titles.index("Embed") > titles.index("Load")
    viewer = make_napari_viewer()
    widget = MainPanel(viewer, tabs=("Load", "QC"))
    viewer.window.add_dock_widget(widget, name="CellMAE")
    widget.model_picker.set_source(str(test_model_dir))
    load = widget.tabs["Load"]
    load.path_edit.setText(str(plate))
    with qtbot.waitSignal(widget.runner.finished, timeout=10_000):
        load.scan_button.click()
    widget.tabs["QC"].set_head(QCHead.load(qc_head_file))
    return widget


def _run(panel, qtbot, button="run_button", timeout=60_000):
    tab = panel.tabs["QC"]
    with qtbot.waitSignal(panel.runner.finished, timeout=timeout) as done:
        getattr(tab, button).click()
    assert done.args == ["done"], panel.status.text()
    return tab


def _flagged(tab):
    return {
        (r["Metadata_Well"], r["Metadata_Site"]): bool(r["QC_Flag"])
        for r in tab.fields.to_dict("records")
    }


def test_run_fills_table_heatmap_and_a_click_opens_the_field(panel, qtbot):
    tab = _run(panel, qtbot)
    assert tab.result.method == "head" and not tab.notice.isVisible()
    flagged = [k for k, v in _flagged(tab).items() if v]
    assert tab.table.rowCount() == len(flagged) > 0
    assert f"{len(flagged)} of 6 fields flagged" in tab.counts.text()
    layer = panel.viewer.layers["plate map"]
    assert {"QC_Score", "QC_Class", "QC_Reason"} <= set(layer.features.columns)
    assert layer.face_color_mode == "colormap"  # the plate heatmap
    scores = layer.features["QC_Score"].to_numpy()
    assert not np.allclose(layer.face_color[scores.argmax()], layer.face_color[scores.argmin()])

    tab.flagged_only.setChecked(False)  # all fields, sorted by score (descending)
    assert tab.table.rowCount() == 6
    shown = [float(tab.table.item(r, 3).text()) for r in range(6)]
    assert shown == sorted(shown, reverse=True)
    row = next(r for r in range(6) if tab.table.item(r, 1).text() == "A02"
               and tab.table.item(r, 2).text() == "1")  # fmt: skip
    offending = tab.table.item(row, 5).text()
    assert offending == "w2" and tab.table.item(row, 4).text() == "blur"
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.table.selectRow(row)
    viewer = panel.viewer
    assert viewer.layers["w2"].opacity == 1.0 and viewer.layers["w1"].opacity < 0.5
    assert viewer.layers["w2"].metadata["cellmae_field"]["Metadata_Well"] == "A02"
    assert "w2 highlighted" in panel.log_view.toPlainText()


def test_relabel_and_retrain_change_verdicts_and_threshold_changes_counts(panel, qtbot, tmp_path):
    tab = _run(panel, qtbot)
    # weighed by the classic evidence, the test head flags no clean field of this small plate at
    # 0.5: judge at 0.2, where it still takes some of them for artefacts, to relabel them
    tab.slider.setValue(20)
    qtbot.waitUntil(lambda: tab.fields["QC_Threshold"].iloc[0] == 0.2, timeout=2000)
    before = _flagged(tab)
    tab.flagged_only.setChecked(False)
    clean = [("A01", 1), ("A01", 2), ("A03", 2)]  # say these flagged-or-not fields are fine
    rows = [
        r
        for r in range(tab.table.rowCount())
        if (tab.table.item(r, 1).text(), int(tab.table.item(r, 2).text())) in clean
    ]
    tab.table.clearSelection()
    mode = tab.table.selectionMode()
    tab.table.setSelectionMode(tab.table.SelectionMode.MultiSelection)
    for r in rows:
        tab.table.selectRow(r)
    tab.table.setSelectionMode(mode)
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=10_000)
    tab.label_combo.setCurrentText("ok")
    tab.mark_button.click()
    assert sorted(tab.labels) == sorted(("SYNTH-P1", w, s) for w, s in clean)
    labelled = [tab.table.item(r, 7).text() for r in range(tab.table.rowCount())]
    assert labelled.count("ok") == 3
    _run(panel, qtbot, "retrain_button", timeout=20_000)
    after = _flagged(tab)
    assert all(not after[k] for k in clean)  # the verdicts follow the labels
    assert any(before[k] for k in clean)  # and at least one of them changed
    assert after[("A02", 1)]  # the defocused field is still flagged
    assert "unsaved" in tab.head_label.text()
    tab.save_head(str(tmp_path / "mine.npz"))
    assert (tmp_path / "mine.npz").is_file()

    def n_flagged():
        return int(tab.fields["QC_Flag"].sum())

    tab.slider.setValue(99)
    qtbot.waitUntil(lambda: "> 0.99" in tab.threshold_label.text(), timeout=2000)
    qtbot.waitUntil(lambda: tab.fields["QC_Threshold"].iloc[0] == 0.99, timeout=2000)
    high = n_flagged()
    tab.slider.setValue(1)
    qtbot.waitUntil(lambda: tab.fields["QC_Threshold"].iloc[0] == 0.01, timeout=2000)
    low = n_flagged()
    assert low > high and f"{low} of 6 fields flagged" in tab.counts.text()

    with qtbot.waitSignal(panel.runner.finished, timeout=20_000):
        tab.export(str(tmp_path / "report"), str(tmp_path / "mirror"), "copy")
    assert (tmp_path / "report" / "qc_fields.csv").is_file()
    passing = 6 - low
    assert len(list((tmp_path / "mirror").rglob("*.tif"))) == 2 * passing


def test_a_head_for_another_encoder_gives_a_notice_and_training_fixes_it(panel, qtbot, tmp_path):
    import torch

    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model

    torch.manual_seed(5)
    save_model(create_model("cellmae_vit_test_patch16_256"), tmp_path / "other")
    panel.model_picker.set_source(str(tmp_path / "other"))
    tab = _run(panel, qtbot)
    assert tab.result.method == "classic" and not tab.notice.isHidden()
    assert "only the classic metrics" in tab.notice.text()
    assert "classic metrics" in tab.counts.text() and tab.train_button.isEnabled()
    assert "z >" in tab.threshold_label.text()

    tab.n_fields.setValue(2)
    with qtbot.waitSignal(panel.runner.finished, timeout=60_000):
        tab.train_button.click()  # trains, then re-runs QC with the new head
    qtbot.waitUntil(lambda: not panel.runner.busy and tab.result.method == "head", timeout=60_000)
    assert tab.notice.isHidden() and tab.head.encoder["checksum"] == panel.get_model().checksum
    assert tab.table.horizontalHeaderItem(4).text() == "Class"


def test_the_qc_widget_alone_opens_fields_from_the_plate_map(make_napari_viewer, qtbot, plate):
    from napari_cellmae._qt.qc_tab import QCWidget

    viewer = make_napari_viewer()
    widget = QCWidget(viewer)
    viewer.window.add_dock_widget(widget)
    tab = widget.tabs["QC"]
    assert list(widget.tabs) == ["QC"]
    tab.set_head(None)  # classic metrics only: no model needed
    tab.path_edit.setText(str(plate))
    _run(widget, qtbot)
    layer = viewer.layers["plate map"]
    assert layer.features["QC_Score"].notna().all()
    with qtbot.waitSignal(widget.runner.finished, timeout=10_000):
        layer.selected_data = {0}
    assert {"w1", "w2"} <= {lyr.name for lyr in viewer.layers}
