"""The Embed tab in a real viewer: embed a plate, plate-map features, the scatter plot linked to
the fields, embed one field, export, profile."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from qtpy.QtCore import QPoint, Qt

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    from napari_cellmae.synthetic import make_screen

    root = tmp_path_factory.mktemp("screen")
    # one plate: 3 perturbations × 2 replicates + 3 controls, 9 fields of 256² (3 channels)
    make_screen(
        root, n_plates=1, perturbations=3, replicates=2, controls=3, n_channels=3, size=256, seed=1
    )
    return root


@pytest.fixture
def panel(make_napari_viewer, qtbot, screen, test_model_dir):
    from napari_cellmae._qt.main_panel import TABS, MainPanel

    titles = [t for t, _ in TABS]
    assert "Embed" in titles and titles.index("Embed") > titles.index("Load")
    if "Reconstruct" in titles:
        assert titles.index("Embed") == titles.index("Reconstruct") + 1
    viewer = make_napari_viewer()
    widget = MainPanel(viewer, tabs=("Load", "Embed"))
    viewer.window.add_dock_widget(widget, name="CellMAE")
    widget.model_picker.set_source(str(test_model_dir))
    load = widget.tabs["Load"]
    load.path_edit.setText(str(screen / "SCREEN-1"))
    with qtbot.waitSignal(widget.runner.finished, timeout=10_000):
        load.scan_button.click()
    return widget


def _embed(panel, qtbot, tmp_path):
    tab = panel.tabs["Embed"]
    tab.out_edit.setText(str(tmp_path / "emb"))
    with qtbot.waitSignal(panel.runner.finished, timeout=30_000) as done:
        tab.embed_plate_button.click()
    assert done.args == ["done"], panel.status.text()
    return tab


def test_embedding_a_plate_fills_the_plate_map_and_the_plot(panel, qtbot, tmp_path):
    tab = _embed(panel, qtbot, tmp_path)
    assert (tmp_path / "emb" / "fields.parquet").is_file()
    assert "9 fields (9 crops) in 9 wells" in panel.log_view.toPlainText()
    layer = panel.viewer.layers["plate map"]
    features = layer.features
    assert {"embedding_pc1", "embedding_pc2", "embedding_similarity"} <= set(features.columns)
    assert np.isfinite(features[["embedding_pc1", "embedding_pc2"]].to_numpy()).all()
    # the PCA columns belong to the right fields (the plate map keeps its own order)
    table = tab.table.set_index(["Metadata_Well", "Metadata_Site"])
    for row in features.itertuples():
        assert row.embedding_pc1 == pytest.approx(
            table.loc[(row.Metadata_Well, row.Metadata_Site)].embedding_pc1
        )
    plot = tab.plot
    assert plot is not None and len(plot.coords) == 9
    assert len(plot._points.get_offsets()) == 9
    assert "CellMAE embedding" in panel.viewer.window.dock_widgets


def test_clicking_a_point_opens_its_field_and_marks_it(panel, qtbot, tmp_path):
    tab = _embed(panel, qtbot, tmp_path)
    plot = tab.plot
    plot.canvas.resize(400, 400)
    plot.canvas.draw()
    load = panel.tabs["Load"]
    target = 4
    want = tab.table.iloc[target]
    x, y = plot.widget_position(target)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        qtbot.mouseClick(plot.canvas, Qt.MouseButton.LeftButton, pos=QPoint(round(x), round(y)))
    meta = load.current["metadata"]
    assert (meta["Metadata_Well"], meta["Metadata_Site"]) == (
        want["Metadata_Well"],
        want["Metadata_Site"],
    )
    # opening the field selected it: its point is marked and the similarities are to it
    assert plot.marked == target and tab.selected == target
    features = panel.viewer.layers["plate map"].features
    this = features[features["Metadata_Well"] == want["Metadata_Well"]]
    assert this["embedding_similarity"].iloc[0] == pytest.approx(1.0)
    assert features["embedding_similarity"].between(-1.0001, 1.0001).all()
    # opening another field from the plate map moves the mark
    other = int(features.index[features["Metadata_Well"] != want["Metadata_Well"]][0])
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        panel.viewer.layers["plate map"].selected_data = {other}
    row = tab._row_of(load.current["metadata"])
    assert plot.marked == row != target


def test_embed_field_export_and_profile(panel, qtbot, tmp_path, screen, monkeypatch):
    tab = _embed(panel, qtbot, tmp_path)
    load = panel.tabs["Load"]
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        load.open_field(tab.table.at[2, "Metadata_Well"], 1)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.embed_field_button.click()
    assert "1 crops -> 32 dimensions; most similar: " in panel.log_view.toPlainText()
    assert tab.table.at[2, "embedding_similarity"] == pytest.approx(1.0, abs=1e-4)

    from qtpy.QtWidgets import QFileDialog

    for button, name in (
        (tab.export_parquet_button, "f.parquet"),
        (tab.export_csv_button, "f.csv"),
    ):
        target = str(tmp_path / name)
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, t=target, **k: (t, ""))
        button.click()
    exported = pd.read_parquet(tmp_path / "f.parquet")
    assert len(exported) == 9 and {"embedding_pc1", "embedding_similarity", "emb_0031"} <= set(
        exported
    )
    assert len(pd.read_csv(tmp_path / "f.csv")) == 9

    tab.platemap_edit.setText(str(screen / "platemap.csv"))
    tab.align_combo.setCurrentIndex(tab.align_combo.findData("center-scale"))
    with qtbot.waitSignal(panel.runner.finished, timeout=60_000) as done:  # copairs imports ~10 s
        tab.profile_button.click()
    assert done.args == ["done"], panel.status.text()
    assert (tmp_path / "emb" / "profile-center-scale" / "report.md").is_file()
    text = tab.report_view.toPlainText()
    assert "Profiling report" in text and "Replicate retrieval mAP" in text


def test_the_platemap_picked_before_embedding_annotates_the_tables(panel, qtbot, tmp_path, screen):
    tab = panel.tabs["Embed"]
    tab.platemap_edit.setText(str(screen / "platemap.csv"))
    _embed(panel, qtbot, tmp_path)
    wells = pd.read_parquet(tmp_path / "emb" / "wells.parquet")
    want = pd.read_csv(screen / "platemap.csv")
    got = wells.merge(want, on=["Metadata_Plate", "Metadata_Well"], suffixes=("", "_csv"))
    assert (
        len(got) == 9 and (got["Metadata_Perturbation"] == got["Metadata_Perturbation_csv"]).all()
    )
    assert wells["Metadata_IsControl"].sum() == 3
    # Profile without a platemap reads the annotations the tables carry
    tab.platemap_edit.clear()
    with qtbot.waitSignal(panel.runner.finished, timeout=60_000) as done:
        tab.profile_button.click()
    assert done.args == ["done"], panel.status.text()
    assert "the annotations in the embedding tables" in tab.report_view.toPlainText()


def test_plate_normalisation_from_the_tab_and_the_open_field_embedded_alike(
    panel, qtbot, tmp_path, monkeypatch
):
    import json

    from napari_cellmae.embed import embedding_columns

    tab = panel.tabs["Embed"]
    assert tab.normalization_combo.currentData() is None  # the model's default
    tab.normalization_combo.setCurrentIndex(tab.normalization_combo.findData("plate"))
    tab = _embed(panel, qtbot, tmp_path)
    record = json.loads((tmp_path / "emb" / "config.json").read_text())
    assert record["normalization"] == "plate" and "SCREEN-1" in record["plate_reference"]
    # "Embed field" uses the plate's reference: the open field gets its row's vector
    got = []
    monkeypatch.setattr(tab, "_field_embedded", lambda value: got.append(value))
    load = panel.tabs["Load"]
    well = tab.table.at[3, "Metadata_Well"]
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        load.open_field(well, 1)
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.embed_field_button.click()
    (_, vector, _), row = got[0], tab.table.iloc[3]
    np.testing.assert_allclose(vector, row[embedding_columns(tab.table)].to_numpy(float), atol=1e-5)


def test_embed_widget_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cellmae", "Embed")
    assert list(widget.tabs) == ["Load", "Embed"]


def test_projection_pca_signs_and_umap_hook(monkeypatch):
    import sys
    import types

    from napari_cellmae._qt.embed_tab import project

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)) * [5, 3, 1, 1, 1, 1]
    pcs = project(x)
    c = x - x.mean(axis=0)
    vt = np.linalg.svd(c, full_matrices=False)[2]
    np.testing.assert_allclose(np.abs(pcs), np.abs(c @ vt[:2].T), atol=1e-9)
    np.testing.assert_allclose(project(-x)[:, 0], -pcs[:, 0], atol=1e-9)  # signs follow the data
    assert project(x[:1]).shape == (1, 2)

    fake = types.ModuleType("umap")

    class UMAP:
        def __init__(self, n_components, random_state):
            assert (n_components, random_state) == (2, 0)

        def fit_transform(self, data):
            return data[:, :2] * 2

    fake.UMAP = UMAP
    monkeypatch.setitem(sys.modules, "umap", fake)
    np.testing.assert_allclose(project(x, "UMAP"), x[:, :2] * 2)


def test_a_copy_of_the_plate_does_not_inherit_its_embeddings(panel, qtbot, tmp_path, screen):
    """Identity is the scanned folder, not the plate name: a copy of SCREEN-1 (a QC mirror has
    the same Metadata_Plate) must not show the original's embeddings."""
    import shutil

    tab = _embed(panel, qtbot, tmp_path)
    load = panel.tabs["Load"]
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        load.scan(str(screen / "SCREEN-1"))  # the same folder again: kept
    assert tab.table is not None and "embedding_pc1" in panel.viewer.layers["plate map"].features

    plates = set(tab.table["Metadata_Plate"].astype(str))
    copy = shutil.copytree(screen / "SCREEN-1", tmp_path / "mirror" / "SCREEN-1")
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        load.scan(str(copy))
    assert set(load.index["Metadata_Plate"].astype(str)) == plates  # the same plate name
    assert tab.table is None and tab.out_dir is None
    assert len(tab.plot.coords) == 0  # the scatter plot no longer shows the other folder
    assert "embedding_pc1" not in panel.viewer.layers["plate map"].features
    tab.platemap_edit.setText(str(screen / "platemap.csv"))
    assert tab.profile() is None  # nothing of this folder to profile
    assert "embed a plate before profiling it" in panel.status.text()
