"""OME-Zarr HCS plates (NGFF 0.4, 0.5) and scan^R folders open in napari through our reader:
plate wells, plate map (features = field metadata) and the first field's channels by name."""

import numpy as np
import pytest

from _ome_zarr_plates import write_zarr_plate
from napari_cellmae._napari.reader import get_reader
from napari_cellmae._qt.layers import PLATE_MAP_KEY, field_at_point
from napari_cellmae.synthetic import write_plate

pytestmark = pytest.mark.gui


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_open_ome_zarr_plate(make_napari_viewer, tmp_path, version):
    root = tmp_path / "screen.zarr"
    written = write_zarr_plate(root, version, wells=("A01", "C05"), sites=2, size=48)
    assert get_reader(str(root)) is not None
    assert get_reader(str(root / "A" / "1")) is None  # a well alone: not ours to open
    viewer = make_napari_viewer()
    viewer.open(str(root), plugin="napari-cellmae")
    names = [layer.name for layer in viewer.layers]
    assert names == ["plate wells", "plate map", "DNA", "ER", "RNA"]  # omero labels
    plate_map = viewer.layers["plate map"]
    assert plate_map.metadata[PLATE_MAP_KEY] and plate_map.metadata["layout"] == "ome-zarr"
    assert len(plate_map.data) == 4
    assert field_at_point(plate_map, 3)["Metadata_Well"] == "C05"
    assert len(viewer.layers["plate wells"].data) == 96
    dna = viewer.layers["DNA"]
    assert dna.data.dtype == np.uint16 and np.array_equal(dna.data, written[("A01", 1)][0])


def test_open_scanr_folder(make_napari_viewer, tmp_path):
    root = write_plate(tmp_path, "scanr", wells=["A01", "P24"], sites=1, n_channels=2, size=48)
    viewer = make_napari_viewer()
    viewer.open(str(root), plugin="napari-cellmae")
    plate_map = viewer.layers["plate map"]
    assert plate_map.metadata["layout"] == "scanr"
    # W00384 on a 384-well plate is P24: the wells layer shows the whole 384-well plate
    assert field_at_point(plate_map, 1)["Metadata_Well"] == "P24"
    assert len(viewer.layers["plate wells"].data) == 384
    assert [layer.name for layer in viewer.layers][2:] == ["355nm", "405nm"]


def test_load_tab_chooses_the_scanr_plate_format(make_napari_viewer, qtbot, tmp_path):
    from napari_cellmae._qt.main_panel import MainPanel

    # wells A01, B02 written as numbers 1 and 14 of a 96-well plate: read as a 384-well plate,
    # number 14 is A14
    root = write_plate(tmp_path, "scanr", wells=["A01", "B02"], sites=1, n_channels=1, size=32)
    panel = MainPanel(make_napari_viewer(), tabs=("Load",))
    tab = panel.tabs["Load"]
    tab.path_edit.setText(str(root))
    tab.layout_combo.setCurrentIndex(tab.layout_combo.findData("scanr:384"))
    with qtbot.waitSignal(panel.runner.finished, timeout=10_000):
        tab.scan_button.click()
    assert tab.index.attrs["layout"] == "scanr:384"
    assert tab.index["Metadata_Well"].tolist() == ["A01", "A14"]
    assert "384-well plate (chosen)" in tab.summary.text()
