"""The npe2 reader and sample data in a real viewer: plate folder -> plate map + first field;
one file -> its whole field; layers named by channel, additive, 16-bit kept."""

import numpy as np
import pytest
import tifffile

from napari_cellmae._napari.reader import get_reader
from napari_cellmae._qt.layers import (
    FIELD_KEY,
    PLATE_MAP_KEY,
    channel_colormaps,
    field_at_point,
    open_field,
    plate_map_layer,
)
from napari_cellmae.plates import list_fields, scan_plate
from napari_cellmae.synthetic import write_plate

pytestmark = pytest.mark.gui


def test_get_reader_claims_plates_only(tmp_path, real_data):
    assert get_reader(str(real_data / "transfluor-plate")) is not None
    assert get_reader([str(real_data / "ExampleHuman")]) is not None
    assert get_reader(str(real_data / "speckles")) is None  # no known layout: napari's turn
    (tmp_path / "notes.tif").write_bytes(b"")
    assert get_reader(str(tmp_path / "notes.tif")) is None
    assert get_reader(str(tmp_path)) is None
    assert get_reader([str(real_data / "ExampleHuman"), str(real_data / "speckles")]) is None


def test_open_real_plate_folder(make_napari_viewer, real_data):
    viewer = make_napari_viewer()
    viewer.open(str(real_data / "transfluor-plate"), plugin="napari-cellmae")
    plate_map = viewer.layers["plate map"]
    assert type(plate_map).__name__ == "Points"
    assert len(plate_map.data) == 72  # one point per field
    assert plate_map.metadata[PLATE_MAP_KEY] and plate_map.metadata["layout"] == "cellomics"
    features = plate_map.features
    assert {"Metadata_Well", "Metadata_Site", "complete"} <= set(features.columns)
    assert field_at_point(plate_map, 5) == {
        "Metadata_Plate": "AS_09047_050428030001",
        "Metadata_Well": "O02",
        "Metadata_Row": "O",
        "Metadata_Col": 2,
        "Metadata_Site": 3,
        "n_channels": 1,
        "complete": True,
    }
    # plate geometry: sites of a well side by side, wells in column order, above the field
    y, x = plate_map.data[:, 0], plate_map.data[:, 1]
    assert (y < 0).all() and x[3] > x[0] and x.max() <= 512
    wells = viewer.layers["plate wells"]  # the whole 384-well plate behind the fields
    assert len(wells.data) == 384 and wells.features["Metadata_Well"].iloc[-1] == "P24"
    assert viewer.layers.index(wells) < viewer.layers.index(plate_map)
    image = viewer.layers["d2"]
    assert image.data.shape == (512, 512) and image.data.dtype == np.uint8
    assert image.metadata["cellmae_field"]["Metadata_Well"] == "O01"


def test_open_one_file_opens_its_whole_field(make_napari_viewer, real_data):
    viewer = make_napari_viewer()
    viewer.open(
        str(real_data / "ExampleHuman" / "AS_09125_050116030001_D03f00d1.tif"),
        plugin="napari-cellmae",
    )
    assert [layer.name for layer in viewer.layers] == ["d0", "d1", "d2"]
    assert all(layer.blending == "additive" for layer in viewer.layers)
    assert viewer.layers["d0"].colormap.name == "blue"
    lo, hi = viewer.layers["d2"].contrast_limits
    assert 0 <= lo < hi <= 255


def test_sixteen_bit_harmony_plate_with_channel_names(make_napari_viewer, tmp_path):
    write_plate(tmp_path, "harmony", wells=3, sites=2, n_channels=5, size=64)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path), plugin="napari-cellmae")
    names = [layer.name for layer in viewer.layers]
    assert names == ["plate wells", "plate map", "DNA", "ER", "RNA", "AGP", "Mito"]
    assert all(viewer.layers[n].data.dtype == np.uint16 for n in names[2:])
    assert viewer.layers["DNA"].colormap.name == "blue"
    assert len(viewer.layers["plate map"].data) == 6


def test_open_field_updates_layers_in_place(make_napari_viewer, tmp_path):
    write_plate(tmp_path, "cellomics", wells=2, sites=1, n_channels=2, size=48)
    index = scan_plate(tmp_path)
    viewer = make_napari_viewer()
    from napari_cellmae.plates import read_field

    first = open_field(viewer, read_field(index, "A01"), ["DNA", "ER"], metadata={"w": "A01"})
    second = open_field(viewer, read_field(index, "A02"), ["DNA", "ER"], metadata={"w": "A02"})
    assert [id(a) for a in first] == [id(b) for b in second] and len(viewer.layers) == 2
    np.testing.assert_array_equal(viewer.layers["DNA"].data, read_field(index, "A02")[0])
    assert viewer.layers["ER"].metadata["cellmae_field"] == {"w": "A02"}
    fields = list_fields(index)
    layer = plate_map_layer(viewer, fields)
    again = plate_map_layer(viewer, fields.iloc[:1])
    assert layer is again and len(layer.data) == 1
    assert len(viewer.layers["plate wells"].data) == 96
    names = [layer.name for layer in viewer.layers]
    assert names.index("plate wells") == names.index("plate map") - 1


def test_colormaps_follow_stain_names():
    assert channel_colormaps(["DNA", "ER", "RNA", "AGP", "Mito"]) == [
        "blue",
        "green",
        "yellow",
        "red",
        "magenta",
    ]
    assert channel_colormaps(["GFP"]) == ["green"] and channel_colormaps(["d2"]) == ["gray"]
    assert len(set(channel_colormaps([f"c{i}" for i in range(8)]))) == 8


def test_sample_data(make_napari_viewer, real_data):
    viewer = make_napari_viewer()
    # the real field shipped in the package: BBBC022's pixels, unchanged, with their source
    viewer.open_sample("napari-cellmae", "bbbc022-field")
    assert [layer.name for layer in viewer.layers] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    dna = viewer.layers["DNA"]
    assert dna.data.shape == (520, 696) and dna.data.dtype == np.uint16
    source = real_data / "bbbc022-cellpainting" / "plate1_A14_site1_Ch1.tif"
    np.testing.assert_array_equal(dna.data, tifffile.imread(source))
    source_text = dna.metadata[FIELD_KEY]["source"]
    assert "BBBC022" in source_text and "CC0" in source_text
    assert dna.colormap.name == "blue" and tuple(dna.scale) == (0.656, 0.656)
    viewer.layers.clear()
    viewer.open_sample("napari-cellmae", "synthetic-field")
    assert [layer.name for layer in viewer.layers] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert viewer.layers["DNA"].data.shape == (512, 512)
    assert viewer.layers["DNA"].data.dtype == np.uint16
    viewer.layers.clear()
    viewer.open_sample("napari-cellmae", "mini-plate")
    assert len(viewer.layers["plate map"].data) == 16  # 8 wells × 2 sites
    assert viewer.layers["DNA"].data.shape == (256, 256)
    features = viewer.layers["plate map"].features
    assert features["Metadata_Well"].nunique() == 8
