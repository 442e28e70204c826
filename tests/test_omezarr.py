"""OME-Zarr HCS plates (NGFF 0.4 and 0.5, written with ome-zarr-py) scan into the usual field
index, read one field at a time, and fail with the field and the fix named."""

import numpy as np
import pytest

pytest.importorskip("ome_zarr")

from _ome_zarr_plates import write_zarr_plate
from napari_cellmae.plates import (
    CorruptFileError,
    LayoutError,
    iter_fields,
    list_fields,
    read_field,
    scan_plate,
)
from napari_cellmae.plates.read import read_index_image


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_hcs_plate_scans_and_reads_like_a_folder(tmp_path, version):
    written = write_zarr_plate(tmp_path / "plate.zarr", version, wells=("B03", "A01", "P24"))
    index = scan_plate(tmp_path / "plate.zarr")
    assert index.attrs["layout"] == "ome-zarr" and index.attrs["ngff_version"] == version
    assert list(index.columns) == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Row",
        "Metadata_Col",
        "Metadata_Site",
        "Metadata_Channel",
        "path",
    ]
    assert set(index["Metadata_Plate"]) == {"ZPLATE"}  # the plate metadata's name
    assert index["Metadata_Well"].drop_duplicates().tolist() == ["A01", "B03", "P24"]
    assert index.attrs["channels"] == ["1", "2", "3"]
    assert index.attrs["channel_names"] == {"1": "DNA", "2": "ER", "3": "RNA"}  # omero labels
    assert index.attrs["n_fields"] == 6
    assert index.attrs["summary"].startswith(
        f"ome-zarr (NGFF {version}): 6 fields in 3 wells of 1 plate, 3 channels (DNA, ER, RNA)"
    )
    # the path is the field's image group: one string every table carries
    b3 = index[(index["Metadata_Well"] == "B03") & (index["Metadata_Site"] == 2)]
    assert set(b3["path"]) == {str((tmp_path / "plate.zarr" / "B" / "3" / "1").resolve())}

    field = read_field(index, "B03", site=2)
    assert field.dtype == np.uint16 and np.array_equal(field, written[("B03", 2)])
    assert np.array_equal(read_field(index, "P24", channels=["RNA", "DNA"]),
                          written[("P24", 1)][[2, 0]])  # fmt: skip
    assert np.array_equal(read_index_image(b3["path"].iloc[0], "2")[0], written[("B03", 2)][1])
    fields = list_fields(index)
    assert fields["complete"].all() and len(fields) == 6
    results = list(iter_fields(index, prefetch=2))
    assert [r.metadata["Metadata_Well"] for r in results] == ["A01"] * 2 + ["B03"] * 2 + ["P24"] * 2
    assert all(r.ok and r.image.shape == (3, 64, 64) for r in results)


def test_fields_are_read_lazily_and_a_broken_one_is_named(tmp_path):
    # scanning reads metadata only: a field whose chunks are gone still scans, the others read,
    # and reading it names the field's zarr path
    write_zarr_plate(tmp_path / "p.zarr", "0.5", wells=("A01", "A02"), sites=1)
    chunks = tmp_path / "p.zarr" / "A" / "2" / "0" / "s0" / "c"
    for chunk in chunks.rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"\x00garbage")
    index = scan_plate(tmp_path / "p.zarr")
    assert index.attrs["n_fields"] == 2
    assert read_field(index, "A01").shape == (3, 64, 64)
    with pytest.raises(CorruptFileError, match=r"p\.zarr/A/2/0 .*well A02.*re-copy"):
        read_field(index, "A02")
    errors = [r for r in iter_fields(index) if not r.ok]
    assert [e.metadata["Metadata_Well"] for e in errors] == ["A02"]


def test_z_stacks_become_planes(tmp_path):
    written = write_zarr_plate(tmp_path / "z.zarr", "0.4", wells=("C05",), sites=1, planes=3)
    index = scan_plate(tmp_path / "z.zarr")
    assert index["Metadata_Plane"].drop_duplicates().tolist() == [1, 2, 3]
    assert index.attrs["n_fields"] == 3
    assert np.array_equal(read_field(index, "C05", plane=2), written[("C05", 1)][:, 1])
    assert np.array_equal(read_field(index, "C05"), written[("C05", 1)][:, 0])  # the first


def test_user_channel_names_and_wrong_layouts_or_folders(tmp_path):
    write_zarr_plate(tmp_path / "p.zarr", "0.5", wells=("A01",), sites=1, n_channels=2)
    index = scan_plate(tmp_path / "p.zarr", channel_names={"2": "Mito"})
    assert index.attrs["channel_names"] == {"1": "DNA", "2": "Mito"}
    with pytest.raises(LayoutError, match="OME-Zarr HCS plate.*layout 'auto'"):
        scan_plate(tmp_path / "p.zarr", layout="imagexpress")
    with pytest.raises(LayoutError, match=r"is a well of the OME-Zarr plate .*open the plate"):
        scan_plate(tmp_path / "p.zarr" / "A" / "1")
    with pytest.raises(LayoutError, match=r"is a field image of the OME-Zarr plate"):
        scan_plate(tmp_path / "p.zarr" / "A" / "1" / "0")
