"""File-name parsing of every layout, on the names instruments really write."""

import re

import pytest

from napari_cellmae.plates import LayoutError
from napari_cellmae.plates.layouts import (
    LAYOUTS,
    Parsed,
    get_layout,
    index_to_row,
    natural_key,
    order_channels,
    regex_layout,
    row_to_index,
    split_well,
    well_from_number,
    well_name,
)


def parse(layout, relpath):
    return get_layout(layout).match(relpath, relpath.rsplit("/", 1)[-1])


@pytest.mark.parametrize(
    ("layout", "relpath", "expected"),
    [
        (
            "imagexpress",
            "MIP-2P-2sub_C05_s1_w146C9B2CD-0BB3-4B1C-8D9B-8A2A5F7B2A10.tif",
            Parsed("C", 5, 1, "w1", "MIP-2P-2sub"),
        ),
        ("imagexpress", "A01_s1_w1.tif", Parsed("A", 1, 1, "w1")),
        ("imagexpress", "A01_s3_w2_z4.tif", Parsed("A", 1, 3, "w2", plane=4)),
        (
            "imagexpress",
            "2024-01-05/PLATE7/TimePoint_3/ZStep_2/PLATE7_B12_s2_w3.TIF",
            Parsed("B", 12, 2, "w3", "PLATE7", plane=2, timepoint=3),
        ),
        ("imagexpress", "my_plate_B03.tif", Parsed("B", 3, 1, "w1", "my_plate")),
        ("harmony", "r01c01f01p01-ch1sk1fk1fl1.tiff", Parsed("A", 1, 1, "1", None, 1, 1)),
        ("harmony", "r16c24f09p03-ch5sk2fk1fl1.tiff", Parsed("P", 24, 9, "5", None, 3, 2)),
        (
            "cellomics",
            "AS_09125_050116030001_D03f00d0.tif",
            Parsed("D", 3, 1, "d0", "AS_09125_050116030001"),
        ),
        (
            "cellomics",
            "AS_09047_050428030001_O24f02d2.TIF",
            Parsed("O", 24, 3, "d2", "AS_09047_050428030001"),
        ),
        ("cellomics", "PLATE_A01f10o1.tif", Parsed("A", 1, 11, "o1", "PLATE")),
        ("incell", "A - 01(fld 1 wv 390 - Blue).tif", Parsed("A", 1, 1, "390 - Blue")),
        (
            "incell",
            "H - 12(fld 4 wv Cy5 - Cy5 z 2 time 3 - 120000 ms).tif",
            Parsed("H", 12, 4, "Cy5 - Cy5", plane=2, timepoint=3),
        ),
        (
            "incucyte",
            "name_A2_1_03d06h40m.tif",
            Parsed("A", 2, 1, "phase", "name", timepoint=3 * 1440 + 6 * 60 + 40),
        ),
        (
            "incucyte",
            "VID12_green_B10_3_00d04h00m.tif",
            Parsed("B", 10, 3, "green", "VID12", timepoint=240),
        ),
        ("rxrx", "HUVEC-1/Plate1/M23_s2_w3.png", Parsed("M", 23, 2, "w3")),
        ("rxrx", "HUVEC-1/Plate1/AF48_s1_w6.png", Parsed("AF", 48, 1, "w6")),
        ("rxrx3", "AA02_s1_3.jp2", Parsed("AA", 2, 1, "3")),
        # scan^R: well numbers row-major (96-well: W00014 = B02), Z and T counted from 0
        (
            "scanr",
            "--W00014--P00002--Z00000--T00000--DAPI.tif",
            Parsed("B", 2, 2, "DAPI", None, 1, 1),
        ),
        (
            "scanr",
            "B2--W00014--P00001--Z00002--T00001--TRITC.tif",
            Parsed("B", 2, 1, "TRITC", None, 3, 2),
        ),
        (
            "scanr:384",
            "--W00014--P00001--Z00000--T00000--GFP.tif",
            Parsed("A", 14, 1, "GFP", None, 1, 1),
        ),
        (
            "scanr:1536",
            "--W00049--P00001--Z00000--T00000--GFP.ome.tif",
            Parsed("B", 1, 1, "GFP", None, 1, 1),
        ),
        (
            "scanr:24",
            "--W00007--P00001--Z00000--T00000--GFP.tif",
            Parsed("B", 1, 1, "GFP", None, 1, 1),
        ),
    ],
)
def test_layout_parses_instrument_names(layout, relpath, expected):
    assert parse(layout, relpath) == expected


@pytest.mark.parametrize(
    "name",
    [
        "PLATE_A01_s1_w1_thumb46C9B2CD-0BB3-4B1C-8D9B-8A2A5F7B2A10.tif",
        "PLATE_A01_s1_w1_thumb.tif",
    ],
)
def test_imagexpress_skips_thumbnails(name):
    assert parse("imagexpress", name) is None


def test_layouts_do_not_claim_each_others_names():
    examples = {
        "imagexpress": "PLATE_B03_s1_w1.tif",
        "harmony": "r02c03f01p01-ch1sk1fk1fl1.tiff",
        "cellomics": "PLATE_B03f00d0.tif",
        "incell": "B - 03(fld 1 wv 390 - Blue).tif",
        "incucyte": "VID1_B3_1_00d00h00m.tif",
        "rxrx": "B03_s1_w1.png",
        "rxrx3": "B03_s1_1.jp2",
        "scanr": "B3--W00015--P00001--Z00000--T00000--DAPI.tif",
    }
    assert set(examples) == set(LAYOUTS)
    for owner, name in examples.items():
        claimed = [n for n in LAYOUTS if parse(n, name) is not None]
        assert claimed == [owner], (name, claimed)


def test_rows_beyond_z_and_wells():
    assert [row_to_index(r) for r in ("A", "Z", "AA", "AF")] == [1, 26, 27, 32]
    assert [index_to_row(i) for i in (1, 16, 26, 27, 32)] == ["A", "P", "Z", "AA", "AF"]
    assert split_well("b3") == ("B", 3)
    assert split_well("AA02") == ("AA", 2)
    assert well_name("B", 3) == "B03"
    with pytest.raises(ValueError, match="not a well name"):
        split_well("3B")
    with pytest.raises(ValueError, match=">= 1"):
        index_to_row(0)


def test_channel_order_is_natural_and_instrument_first():
    assert sorted(["w10", "w2", "w1"], key=natural_key) == ["w1", "w2", "w10"]
    assert order_channels({"red", "green", "phase"}, LAYOUTS["incucyte"]) == [
        "phase",
        "green",
        "red",
    ]
    assert order_channels({"475 - Green", "390 - Blue"}, LAYOUTS["incell"]) == [
        "390 - Blue",
        "475 - Green",
    ]


def test_user_regex_groups_and_defaults():
    layout = regex_layout(r"(?P<plate>[^/]+)/(?P<well>[A-P]\d+)-(?P<site>\d)-(?P<channel>\w+)\.tif")
    assert layout.match("P1/C7-2-dapi.tif", "C7-2-dapi.tif") == Parsed("C", 7, 2, "dapi", "P1")
    by_number = regex_layout(r"r(?P<row>\d+)c(?P<col>\d+)_(?P<channel>\w+)\.tif")
    assert by_number.match("r28c2_gfp.tif", "r28c2_gfp.tif") == Parsed("AB", 2, 1, "gfp")
    bare = regex_layout(r"1-162hr(?P<channel>[a-z0-9]+?)2\.tif")
    assert bare.match("1-162hrhoe2.tif", "1-162hrhoe2.tif") == Parsed("A", 1, 1, "hoe")
    assert get_layout(re.compile(r"(?P<channel>\w+)\.tif")).name == "regex"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(?P<well>[A-P]\d+", "invalid regular expression"),
        (r"(?P<wells>\w+)_(?P<channel>\d)", "not known"),
        (r"(?P<row>[A-P])_(?P<channel>\d)", "'col' group"),
    ],
)
def test_bad_user_regex_is_explained(pattern, message):
    with pytest.raises(ValueError, match=message):
        regex_layout(pattern)


def test_unknown_layout_name_lists_the_choices():
    with pytest.raises(ValueError, match="imagexpress.*regular expression"):
        get_layout("operetta")


def test_scanr_well_numbers_and_plate_formats():
    assert well_from_number(1) == ("A", 1)
    assert well_from_number(96) == ("H", 12)
    assert well_from_number(97, 384) == ("E", 1)
    assert well_from_number(1536, 1536) == ("AF", 48)
    with pytest.raises(ValueError, match="not on a 96-well plate"):
        well_from_number(97)
    # a number beyond the chosen plate names the file and the fix
    with pytest.raises(LayoutError, match=r"W00200.*not on a 96-well plate.*scanr:384"):
        parse("scanr:96", "--W00200--P00001--Z00000--T00000--GFP.tif")
    with pytest.raises(ValueError, match="plate format after 'scanr:'.*384"):
        get_layout("scanr:100")
