"""scan_plate / list_fields: every layout round-trips through a synthetic plate; the real plates
parse as their instruments wrote them; bad folders get errors that say what to do."""

import json
import logging
import shutil
import time

import numpy as np
import pytest

from napari_cellmae.plates import (
    LAYOUTS,
    LayoutError,
    apply_preset,
    list_fields,
    load_channel_map,
    read_field,
    save_channel_map,
    scan_plate,
)
from napari_cellmae.synthetic import channel_ids, write_plate

COLUMNS = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Row",
    "Metadata_Col",
    "Metadata_Site",
    "Metadata_Channel",
]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_round_trips(tmp_path, layout):
    wells = ["A01", "B02", "AA03"] if layout.startswith("rxrx") else ["A01", "B02", "H12"]
    plate_name = "HUVEC-1/Plate1" if layout == "rxrx" else "SYN-P1"
    plate_dir = write_plate(
        tmp_path, layout, wells=wells, sites=2, n_channels=3, size=32, seed=3, plate_name=plate_name
    )
    assert plate_dir == tmp_path / plate_name
    for root in (tmp_path, plate_dir):  # the screen folder and the plate folder itself
        index = scan_plate(root)
        assert index.attrs["layout"] == layout
        assert index.attrs["channels"] == channel_ids(layout, 3)
        assert list(index.columns[:6]) == COLUMNS and index.columns[-1] == "path"
        assert len(index) == 3 * 2 * 3
        assert set(index["Metadata_Plate"]) == {plate_name.replace("/", "_")}
        assert index["Metadata_Well"].drop_duplicates().tolist() == wells  # A.. before AA..
        assert index["Metadata_Site"].drop_duplicates().tolist() == [1, 2]
        assert index.attrs["n_fields"] == 6
        assert f"{layout}: 6 fields in 3 wells of 1 plate, 3 channels" in index.attrs["summary"]
    field = read_field(index, wells[-1], site=2)
    expected_dtype = np.uint8 if layout.startswith("rxrx") else np.uint16
    assert field.shape == (3, 32, 32) and field.dtype == expected_dtype


def test_index_types_and_field_order(tmp_path):
    write_plate(tmp_path, "rxrx", wells=["AB01", "B10", "AA02", "B02", "Z24"], sites=2, size=16)
    index = scan_plate(tmp_path)
    assert index["Metadata_Col"].dtype == np.int64 and index["Metadata_Site"].dtype == np.int64
    assert all(isinstance(v, str) for v in index["Metadata_Channel"])
    fields = list_fields(index)
    assert fields["Metadata_Well"].tolist() == [
        w for w in ["B02", "B10", "Z24", "AA02", "AB01"] for _ in (1, 2)
    ]
    assert fields["complete"].all() and (fields["n_channels"] == 5).all()
    assert fields.attrs["layout"] == "rxrx"
    assert index.attrs["channel_names"]["w1"] == "Hoechst"  # RxRx stains are known


def test_imagexpress_guid_timepoints_zsteps_and_thumbnails(tmp_path):
    write_plate(
        tmp_path,
        "imagexpress",
        wells=2,
        sites=1,
        n_channels=2,
        size=16,
        planes=3,
        timepoints=2,
        guid=True,
        thumbnails=True,
    )
    index = scan_plate(tmp_path)
    assert index.attrs["n_thumbnails"] == 2 * 3 * 2 * 2
    assert not index["path"].str.contains("_thumb").any()
    assert sorted(index["Metadata_Plane"].unique()) == [1, 2, 3]
    assert sorted(index["Metadata_Timepoint"].unique()) == [1, 2]
    assert index.attrs["n_fields"] == 2 * 3 * 2
    assert index["path"].str.contains("TimePoint_2").any()
    fields = list_fields(index)
    assert list(fields.columns[-4:]) == [
        "Metadata_Plane",
        "Metadata_Timepoint",
        "n_channels",
        "complete",
    ]
    focus = read_field(index, "A01", plane=2, timepoint=2)  # the middle plane is in focus
    blurred = read_field(index, "A01", plane=1, timepoint=2)
    assert focus.astype(float).std() > blurred.astype(float).std()


def test_harmony_channel_names_from_index_xml(tmp_path):
    write_plate(tmp_path, "harmony", wells=1, sites=1, n_channels=4, size=16)
    index = scan_plate(tmp_path)
    assert index.attrs["channel_names"] == {"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP"}
    renamed = scan_plate(tmp_path, channel_names={"4": "Actin"})
    assert renamed.attrs["channel_names"]["4"] == "Actin"
    assert renamed.attrs["channel_names"]["1"] == "DNA"
    listed = scan_plate(tmp_path, channel_names=["a", "b", "c", "d"])
    assert listed.attrs["channel_names"] == {"1": "a", "2": "b", "3": "c", "4": "d"}
    with pytest.raises(ValueError, match="4 channels"):
        scan_plate(tmp_path, channel_names=["a"])


def test_several_plates_in_one_folder(tmp_path):
    for name in ("P2", "P1"):
        write_plate(tmp_path, "cellomics", wells=2, sites=1, n_channels=2, size=16, plate_name=name)
    index = scan_plate(tmp_path)
    assert index["Metadata_Plate"].drop_duplicates().tolist() == ["P1", "P2"]
    with pytest.raises(ValueError, match="on 2 plates"):
        read_field(index, "A01")
    assert read_field(index, "A01", plate="P2").shape == (2, 16, 16)


def test_incomplete_fields_are_listed(tmp_path):
    write_plate(tmp_path, "imagexpress", wells=2, sites=1, n_channels=3, size=16)
    next(tmp_path.rglob("*_A02_s1_w3.tif")).unlink()
    fields = list_fields(scan_plate(tmp_path))
    assert fields.set_index("Metadata_Well")["complete"].to_dict() == {"A01": True, "A02": False}
    assert fields.set_index("Metadata_Well")["n_channels"].to_dict() == {"A01": 3, "A02": 2}


def test_duplicate_files_are_dropped_with_a_warning(tmp_path, caplog):
    plate = write_plate(
        tmp_path, "cellomics", wells=1, sites=1, n_channels=1, size=16, plate_name="SYN-P1"
    )
    (plate / "copy").mkdir()
    shutil.copy(plate / "SYN-P1_A01f00d0.tif", plate / "copy" / "SYN-P1_A01f00d0.TIF")
    with caplog.at_level(logging.WARNING):
        index = scan_plate(plate)
    assert len(index) == 1 and index.attrs["n_duplicates"] == 1
    assert "same field and channel" in caplog.text


def test_real_transfluor_plate(real_data):
    index = scan_plate(real_data / "transfluor-plate")
    assert index.attrs["layout"] == "cellomics"
    assert len(index) == 72 and index.attrs["n_fields"] == 72
    assert index.attrs["channels"] == ["d2"]
    assert set(index["Metadata_Plate"]) == {"AS_09047_050428030001"}
    assert index["Metadata_Well"].drop_duplicates().tolist() == [f"O{c:02d}" for c in range(1, 25)]
    assert index["Metadata_Site"].tolist()[:3] == [1, 2, 3]  # f00..f02
    assert index["path"].str.endswith(".TIF").all()
    first = index.iloc[0]
    assert first["path"].endswith("AS_09047_050428030001_O01f00d2.TIF")
    fields = list_fields(index)
    assert len(fields) == 72 and fields["complete"].all()


def test_real_example_human(real_data):
    index = scan_plate(real_data / "ExampleHuman")
    assert index.attrs["layout"] == "cellomics"
    assert index.attrs["channels"] == ["d0", "d1", "d2"]
    assert index[["Metadata_Well", "Metadata_Site"]].drop_duplicates().values.tolist() == [
        ["D03", 1]
    ]


def test_real_speckles_need_a_regex(real_data):
    folder = real_data / "speckles"
    with pytest.raises(LayoutError) as err:
        scan_plate(folder)
    message = str(err.value)
    assert "no known plate layout" in message and "1-162hrh2ax2.tif" in message
    assert "imagexpress 0" in message and "(?P<well>" in message
    index = scan_plate(folder, r"1-162hr(?P<channel>[a-z0-9]+?)2\.tif")
    assert index.attrs["layout"] == "regex"
    assert index.attrs["channels"] == ["h2ax", "hoe"]
    assert index["Metadata_Well"].unique().tolist() == ["A01"]
    assert index["Metadata_Plate"].unique().tolist() == ["speckles"]


def test_ambiguous_folder_lists_layouts_counts_and_regex_hint(tmp_path):
    write_plate(tmp_path, "imagexpress", wells=2, sites=1, n_channels=2, size=16, plate_name="A")
    write_plate(tmp_path, "cellomics", wells=2, sites=1, n_channels=2, size=16, plate_name="B")
    with pytest.raises(LayoutError) as err:
        scan_plate(tmp_path)
    message = str(err.value)
    assert "ambiguous" in message
    assert "imagexpress 4" in message and "cellomics 4" in message and "of 8" in message
    assert "layout=" in message and "(?P<well>" in message
    assert scan_plate(tmp_path, "cellomics").attrs["n_unmatched"] == 4


def test_a_few_stray_files_do_not_make_a_folder_ambiguous(tmp_path):
    write_plate(tmp_path, "imagexpress", wells=4, sites=2, n_channels=2, size=16)
    write_plate(tmp_path, "cellomics", wells=1, sites=1, n_channels=1, size=16, plate_name="X")
    index = scan_plate(tmp_path)
    assert index.attrs["layout"] == "imagexpress"
    assert index.attrs["n_unmatched"] == 1
    assert "1 image files not matching the layout ignored" in index.attrs["summary"]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_plate(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a plate folder"):
        scan_plate(tmp_path / "a.txt")
    with pytest.raises(ValueError, match="no image files"):
        scan_plate(tmp_path)
    write_plate(tmp_path, "cellomics", wells=1, sites=1, n_channels=1, size=16)
    with pytest.raises(LayoutError, match="matches none"):
        scan_plate(tmp_path, "harmony")
    with pytest.raises(ValueError, match="unknown layout"):
        scan_plate(tmp_path, "phenix")


def test_scan_logs_the_chosen_layout(tmp_path, caplog):
    write_plate(tmp_path, "incell", wells=1, sites=1, n_channels=2, size=16)
    with caplog.at_level(logging.INFO, logger="napari_cellmae.plates.scan"):
        scan_plate(tmp_path)
    assert "incell: 1 field in 1 well of 1 plate, 2 channels (390 - Blue, 438 - Cyan)" in (
        caplog.text
    )


def test_big_plate_scans_in_seconds(tmp_path):
    # 384 wells × 9 sites × 5 channels; the scan reads names only, so empty files will do
    from napari_cellmae.plates.layouts import index_to_row

    plate = tmp_path / "BIG"
    plate.mkdir()
    for r in range(1, 17):
        for c in range(1, 25):
            for s in range(1, 10):
                for w in range(1, 6):
                    (plate / f"BIG_{index_to_row(r)}{c:02d}_s{s}_w{w}.tif").touch()
    t0 = time.perf_counter()
    index = scan_plate(plate)
    elapsed = time.perf_counter() - t0
    assert len(index) == 17_280 and index.attrs["n_fields"] == 3456
    assert elapsed < 3.0, f"scan took {elapsed:.2f} s"


def test_channel_map_save_load_and_presets(tmp_path):
    names = {"w1": "DNA", "w2": "ER"}
    path = save_channel_map(tmp_path / "out", names, ["w1", "w2"], layout="imagexpress")
    assert path == tmp_path / "out" / "channels.json"
    record = json.loads(path.read_text())
    assert record["channels"] == ["w1", "w2"] and record["layout"] == "imagexpress"
    assert load_channel_map(tmp_path / "out") == names
    assert load_channel_map(path) == names
    assert apply_preset(["a", "b", "c"], "RxRx (Recursion)") == {
        "a": "Hoechst",
        "b": "ConA",
        "c": "Phalloidin",
    }
    with pytest.raises(FileNotFoundError, match="no channel map"):
        load_channel_map(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no channel mapping"):
        load_channel_map(tmp_path / "bad.json")


def _scanr_file(folder, number, channel="DAPI", prefix="", site=1):
    from napari_cellmae.synthetic.writers import _write_image

    path = folder / f"{prefix}--W{number:05d}--P{site:05d}--Z00000--T00000--{channel}.tif"
    _write_image(path, np.full((8, 8), number, np.uint16), None)


def test_scanr_folder_plate_format_from_the_folder(tmp_path):
    # the data/ folder scan^R writes is not the plate's name; wells 1..96 default to a 96-well
    # plate, a number above 96 needs 384 wells, and scanr:384 chooses it
    data = tmp_path / "Screen7" / "data"
    for number in (1, 14, 96):
        for channel in ("DAPI", "GFP"):
            _scanr_file(data, number, channel)
    for root in (tmp_path / "Screen7", data):
        index = scan_plate(root)
        assert index.attrs["layout"] == "scanr"
        assert set(index["Metadata_Plate"]) == {"Screen7"}
        assert index["Metadata_Well"].drop_duplicates().tolist() == ["A01", "B02", "H12"]
        assert "96-well plate (the default" in index.attrs["summary"]
    assert read_field(index, "B02").shape == (2, 8, 8)
    assert int(read_field(index, "H12")[0, 0, 0]) == 96  # the file of well number 96

    wide = scan_plate(tmp_path / "Screen7", layout="scanr:384")
    assert wide["Metadata_Well"].drop_duplicates().tolist() == ["A01", "A14", "D24"]
    assert wide.attrs["layout"] == "scanr:384"  # what run records keep: a re-scan reads alike
    assert "384-well plate (chosen)" in wide.attrs["summary"]

    _scanr_file(data, 200)  # only a 384-well plate has a well 200 (I08)
    index = scan_plate(data)
    assert index["Metadata_Well"].drop_duplicates().tolist() == ["A01", "A14", "D24", "I08"]
    assert "384-well plate (well numbers up to 200)" in index.attrs["summary"]
    with pytest.raises(LayoutError, match=r"W00200.*scanr:384"):
        scan_plate(data, layout="scanr:96")


def test_scanr_well_names_in_file_names_win(tmp_path):
    # newer scan^R versions write the well before --W: those names are used as written
    for number, well in ((14, "B2"), (27, "C3")):
        _scanr_file(tmp_path, number, prefix=well)
    index = scan_plate(tmp_path)
    assert index["Metadata_Well"].tolist() == ["B02", "C03"]
    assert "well names in the file names" in index.attrs["summary"]
