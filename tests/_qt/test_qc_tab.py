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
    # a folder of the user's own is refused with the fix, its files untouched (issue 20)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "qc_fields.csv").write_text("mine\n")
    with qtbot.waitSignal(panel.runner.finished, timeout=20_000):
        tab.export(str(mine))
    assert "not empty" in panel.status.text() and "new or empty folder" in panel.status.text()
    assert "--force" not in panel.status.text()  # the GUI has none: it says what the GUI can do
    assert (mine / "qc_fields.csv").read_text() == "mine\n"


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


def _press(panel, qtbot, widget, key):
    """Press ``key`` (a Qt key code or a character) in ``widget``; wait until the field it
    opens is shown."""
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        qtbot.keyClick(widget, key)


def _open_field(panel):
    layer = next(lyr for lyr in panel.viewer.layers if "cellmae_field" in lyr.metadata)
    meta = layer.metadata["cellmae_field"]
    return meta["Metadata_Well"], int(meta["Metadata_Site"])


def test_keyboard_labelling_steps_through_flagged_fields(panel, qtbot):
    from napari._qt.widgets.qt_keyboard_settings import ShortcutEditor
    from napari.utils.action_manager import action_manager
    from qtpy.QtCore import Qt

    from napari_cellmae._qt import qc_keys
    from napari_cellmae._qt.qc_tab import KEY_ROLE

    tab = _run(panel, qtbot)
    tab.slider.setValue(2)  # a low threshold: several flagged fields to step through
    qtbot.waitUntil(lambda: tab.fields["QC_Threshold"].iloc[0] == 0.02, timeout=2000)
    flagged = tab.table_keys(flagged=True)
    assert len(flagged) >= 3
    # registered with napari: listed in its shortcut preferences, bound to the shown keys
    editor = ShortcutEditor()
    viewer_actions = editor.key_bindings_strs[editor.VIEWER_KEYBINDINGS]
    assert {"napari-cellmae:qc_next_field", "napari-cellmae:qc_label_blur"} <= set(viewer_actions)
    assert [str(k) for k in action_manager._shortcuts["napari-cellmae:qc_label_ok"]] == ["K"]
    assert "K ok" in tab.keys_label.text() and ". / , next / previous field" in (
        tab.keys_label.text()
    )
    assert qc_keys.tab_for(panel.viewer) is tab

    canvas = panel.viewer.window._qt_viewer.canvas.native  # keys pressed on napari's canvas
    canvas.setFocus()
    _press(panel, qtbot, canvas, Qt.Key.Key_Period)  # opens the first flagged field
    assert tab.current_key == flagged[0]
    assert _open_field(panel) == flagged[0][-2:]
    _press(panel, qtbot, canvas, Qt.Key.Key_K)  # ok, then the next one opens
    assert tab.labels == {flagged[0]: "ok"}
    assert tab.current_key == flagged[1] and _open_field(panel) == flagged[1][-2:]
    _press(panel, qtbot, canvas, Qt.Key.Key_F)  # blur
    assert tab.labels[flagged[1]] == "blur" and tab.current_key == flagged[2]
    _press(panel, qtbot, canvas, Qt.Key.Key_Comma)  # back
    assert tab.current_key == flagged[1] and _open_field(panel) == flagged[1][-2:]

    tab.table.setFocus()  # the same keys with the focus on the table
    _press(panel, qtbot, tab.table, "d")
    assert tab.labels[flagged[1]] == "debris" and tab.current_key == flagged[2]
    shown = {
        tuple(tab.table.item(r, 0).data(KEY_ROLE)): tab.table.item(r, 7).text()
        for r in range(tab.table.rowCount())
    }
    assert shown[flagged[0]] == "ok" and shown[flagged[1]] == "debris"
    _run(panel, qtbot, "retrain_button", timeout=20_000)  # the key labels train the head
    assert tab.head.training["new_labels"] == {"ok": 2, "debris": 1}  # ok: both channels
    assert not _flagged(tab)[flagged[0][-2:]]  # labelled ok: passes now, at the threshold in use
    assert tab.fields["QC_Threshold"].iloc[0] == 0.02


def test_suggested_fields_open_on_click_and_are_labelled_by_keys(panel, qtbot):
    from qtpy.QtCore import Qt

    from napari_cellmae._qt.qc_tab import KEY_ROLE

    tab = _run(panel, qtbot)
    assert tab.suggest_button.isEnabled()
    keys = tab.suggest(n=4)
    assert not tab.suggestions.isHidden() and tab.suggestions.count() == len(keys) == 4
    fields = tab.fields
    margin = {tab._key(r): abs(r["QC_Score"] - tab.threshold()) for r in fields.to_dict("records")}
    flagged = {tab._key(r) for r in fields.to_dict("records") if r["QC_Flag"]}
    first_side = [k for k in keys if (k in flagged) == (keys[0] in flagged)]
    assert [margin[k] for k in first_side] == sorted(margin[k] for k in first_side)
    assert keys[0] in flagged  # the least sure flagged field first (flagged fields exist)
    item = tab.suggestions.item(0)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.suggestions.itemClicked.emit(item)  # as a click does
    assert tab.current_key == keys[0] and _open_field(panel) == keys[0][-2:]
    tab.suggestions.setFocus()
    _press(panel, qtbot, tab.suggestions, Qt.Key.Key_K)  # ok, then the next suggestion opens
    assert tab.labels == {keys[0]: "ok"} and tab.current_key == keys[1]
    assert keys[0] not in tab.suggest(n=4)  # labelled fields are not suggested again
    _run(panel, qtbot, "retrain_button", timeout=20_000)
    shown = [tab.suggestions.item(i).data(KEY_ROLE) for i in range(tab.suggestions.count())]
    assert len(shown) == 4 and keys[0] not in map(tuple, shown)  # the new head's suggestions


def test_train_head_from_plate_keeps_the_better_head_and_says_so(panel, qtbot):
    from napari_cellmae.qc.training import better_head

    tab = _run(panel, qtbot)
    current = tab.head
    assert current.matches(panel.get_model())
    tab.n_fields.setValue(2)
    with qtbot.waitSignal(panel.runner.finished, timeout=120_000):
        tab.train_button.click()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=120_000)
    report = tab.comparison
    assert set(report) == {"current", "new"}
    for scores in report.values():
        assert 0 <= scores["balanced_accuracy"] <= 1 and scores["held_out"]
        assert scores["fields"] == 4  # the 6 fields minus the 2 it learnt from
    log = panel.log_view.toPlainText()
    assert "held-out accuracy on" in log and "current head" in log and "new head" in log
    if better_head(report) == "current":
        assert tab.head is current and "kept the current head" in log
        assert not tab.use_candidate_button.isHidden()
        with qtbot.waitSignal(panel.runner.finished, timeout=60_000):
            tab.use_candidate_button.click()  # the user insists
        assert tab.head is not current and tab.result.head is tab.head
        assert "using the trained head, as asked" in panel.log_view.toPlainText()
    else:
        assert tab.head is not current and "using the new head (it scores better)" in log
