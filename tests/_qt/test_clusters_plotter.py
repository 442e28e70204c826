"""napari-clusters-plotter on our plate map: the features it offers (embedding PCs as axes, text
as hues), and a selection drawn in it (MANUAL_CLUSTER_ID) honoured by the Embed tab: outlined on
the plate map, summarised, exported."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def embedded(make_napari_viewer, qtbot, tmp_path, test_model_dir):
    """A panel (Load + Embed) with an embedded 6-field plate (ImageXpress, 3 wells × 2 sites)."""
    from napari_cellmae._qt.main_panel import MainPanel
    from napari_cellmae.synthetic import write_plate

    plate = write_plate(tmp_path, "imagexpress", wells=3, sites=2, n_channels=3, size=256)
    viewer = make_napari_viewer()
    panel = MainPanel(viewer, tabs=("Load", "Embed"))
    viewer.window.add_dock_widget(panel, name="CellMAE")
    panel.model_picker.set_source(str(test_model_dir))
    load = panel.tabs["Load"]
    load.path_edit.setText(str(plate))
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        load.scan_button.click()
    tab = panel.tabs["Embed"]
    tab.out_edit.setText(str(tmp_path / "emb"))
    with qtbot.waitSignal(panel.runner.finished, timeout=60_000) as done:
        tab.embed_plate_button.click()
    assert done.args == ["done"], panel.status.text()
    return panel, tab


def test_plotter_lists_our_features_and_its_selection_is_honoured(embedded, qtbot, tmp_path):
    from napari_clusters_plotter._new_plotter_widget import PlotterWidget

    panel, tab = embedded
    viewer = panel.viewer
    layer = viewer.layers["plate map"]
    features = layer.features
    emb = tab.table[[c for c in tab.table if c.startswith("emb_")]].to_numpy(np.float64)
    n_pcs = min(10, emb.shape[1])
    pcs = [f"embedding_pc{i}" for i in range(1, n_pcs + 1)]
    assert set(pcs) <= set(features.columns)
    # the PCs are the embeddings' principal components (up to sign) …
    u, sv, _ = np.linalg.svd(emb - emb.mean(axis=0), full_matrices=False)
    k = min(n_pcs, len(sv))
    table_pcs = tab.table[pcs[:k]].to_numpy()
    np.testing.assert_allclose(np.abs(table_pcs), np.abs(u[:, :k] * sv[:k]), atol=1e-6)
    # … on the plate map at their own fields (the plate map keeps its order)
    keys = ["Metadata_Well", "Metadata_Site"]
    on_map = features.astype({"Metadata_Well": str}).set_index(keys)[pcs]
    by_field = tab.table.set_index(keys)[pcs].loc[on_map.index]
    np.testing.assert_allclose(on_map.to_numpy(), by_field.to_numpy())

    plotter = PlotterWidget(viewer)
    viewer.window.add_dock_widget(plotter, name="clusters plotter")
    viewer.layers.selection.active = layer
    qtbot.waitUntil(lambda: plotter.layers == [layer], timeout=5_000)
    axes = [plotter._selectors["x"].itemText(i) for i in range(plotter._selectors["x"].count())]
    assert set(pcs) <= set(axes)  # our PCs are plottable axes …
    assert "Metadata_Well" not in axes and "Metadata_Plate" not in axes  # … text is a hue only
    hues = [plotter._selectors["hue"].itemText(i) for i in range(plotter._selectors["hue"].count())]
    assert {"Metadata_Well", "embedding_similarity"} <= set(hues)
    plotter.x_axis, plotter.y_axis = "embedding_pc1", "embedding_pc2"

    # a lasso in the plot: the first three fields in cluster 1, the last one in cluster 2
    n = len(layer.data)
    drawn = np.zeros(n, dtype=int)
    drawn[:3], drawn[-1] = 1, 2
    plotter._on_finish_draw(drawn)
    assert np.array_equal(layer.features["MANUAL_CLUSTER_ID"].astype(int), drawn)
    qtbot.waitUntil(lambda: tab.export_selection_button.isEnabled(), timeout=5_000)
    assert tab.selection_label.text().startswith("clusters-plotter selection: 4 fields in")
    assert "cluster 1: 3, 2: 1" in tab.selection_label.text()
    # outlined in their cluster's colour, the others thin and black
    assert (layer.border_width[:3] > layer.border_width[3]).all()
    assert not np.allclose(layer.border_color[0], layer.border_color[-1])
    assert np.allclose(layer.border_color[3], (0, 0, 0, 1))

    out = tab.export_selection(tmp_path / "selected.csv")
    exported = pd.read_csv(out)
    assert exported["MANUAL_CLUSTER_ID"].tolist() == [1, 1, 1, 2]
    wanted = features.iloc[[0, 1, 2, n - 1]]
    assert exported["Metadata_Well"].tolist() == wanted["Metadata_Well"].astype(str).tolist()
    assert exported["Metadata_Site"].tolist() == wanted["Metadata_Site"].tolist()
    assert any(c.startswith("emb_") for c in exported.columns)

    # clearing the selection in the plotter (all 0) clears ours
    plotter._on_finish_draw(np.zeros(n, dtype=int))
    qtbot.waitUntil(lambda: not tab.export_selection_button.isEnabled(), timeout=5_000)
    with pytest.raises(ValueError, match="no fields are selected in napari-clusters-plotter"):
        tab.export_selection(tmp_path / "none.csv")


def test_plate_map_features_are_typed_for_the_plotter():
    from napari_cellmae._qt.layers import plotter_features

    table = pd.DataFrame(
        {
            "Metadata_Well": ["A01", "B02"],
            "Metadata_Site": [1, 2],
            "QC_Score": [0.1, 0.9],
            "QC_Class": ["ok", "blur"],
            "QC_Flag": [False, True],
        }
    )
    typed = plotter_features(table)
    categorical = [c for c in typed if isinstance(typed[c].dtype, pd.CategoricalDtype)]
    assert categorical == ["Metadata_Well", "QC_Class", "QC_Flag"]
    assert typed["QC_Score"].dtype == np.float64 and typed["Metadata_Site"].dtype == np.int64
