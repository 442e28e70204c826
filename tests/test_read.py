"""read_image / read_field / iter_fields: formats, real images, and every way a file can be bad."""

import threading
import time

import imagecodecs
import numpy as np
import pytest
import tifffile

from napari_cellmae.plates import (
    CorruptFileError,
    FieldNotFoundError,
    MissingChannelError,
    PlateError,
    SizeMismatchError,
    iter_fields,
    list_fields,
    read_field,
    read_image,
    scan_plate,
)
from napari_cellmae.synthetic import write_plate

RNG = np.random.default_rng(0)
IMG16 = RNG.integers(0, 4096, (40, 48), dtype=np.uint16)


@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "zstd"])
def test_compressed_tiffs(tmp_path, compression):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, IMG16, compression=compression)
    out = read_image(path)
    assert out.shape == (1, 40, 48) and out.dtype == np.uint16
    np.testing.assert_array_equal(out[0], IMG16)


def test_multipage_tiff_pages_are_planes(tmp_path):
    stack = RNG.integers(0, 255, (3, 20, 30), dtype=np.uint8)
    # one 3-page series
    tifffile.imwrite(tmp_path / "shaped.tif", stack, compression="zlib", photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "shaped.tif"), stack)
    rgb = np.moveaxis(stack, 0, -1)  # an RGB file: the samples become planes
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), stack)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:  # pages written one by one
        for page in stack:
            tif.write(page, compression="lzw", photometric="minisblack")
        tif.write(stack[0, ::4, ::4])  # a thumbnail page is not a plane
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif"), stack)


def test_ome_tiff_channel_axis_kept_other_axes_first_index(tmp_path):
    data = RNG.integers(0, 4096, (2, 3, 4, 16, 16), dtype=np.uint16)  # T C Z Y X
    path = tmp_path / "field.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TCZYX"})
    out = read_image(path)
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out, data[0, :, 0])


def test_png_8_and_16_bit_and_jpeg2000(tmp_path):
    img8 = RNG.integers(0, 255, (24, 32), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(img8))
    (tmp_path / "b.png").write_bytes(imagecodecs.png_encode(IMG16))
    (tmp_path / "c.jp2").write_bytes(imagecodecs.jpeg2k_encode(img8, reversible=True))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png")[0], img8)
    assert read_image(tmp_path / "b.png").dtype == np.uint16
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[0], IMG16)
    np.testing.assert_array_equal(read_image(tmp_path / "c.jp2")[0], img8)


def test_regex_plate_of_ome_tiffs_one_file_per_field(tmp_path):
    for well in ("A01", "A02"):
        data = RNG.integers(0, 4096, (4, 16, 16), dtype=np.uint16)
        tifffile.imwrite(tmp_path / f"{well}.ome.tif", data, ome=True, metadata={"axes": "CYX"})
    index = scan_plate(tmp_path, r"(?P<well>[A-P]\d{2})\.ome\.tif")
    assert read_field(index, "A02").shape == (4, 16, 16)


def test_real_example_human_channels_in_order(real_data):
    folder = real_data / "ExampleHuman"
    field = read_field(scan_plate(folder), well="D03", site=1)
    assert field.shape == (3, 512, 512) and field.dtype == np.uint8
    for c in range(3):
        own = tifffile.imread(folder / f"AS_09125_050116030001_D03f00d{c}.tif")
        np.testing.assert_array_equal(field[c], own)


def test_real_transfluor_fields(real_data):
    index = scan_plate(real_data / "transfluor-plate")
    field = read_field(index, "O12", site=3)
    assert field.shape == (1, 512, 512) and field.dtype == np.uint8
    own = tifffile.imread(real_data / "transfluor-plate" / "AS_09047_050428030001_O12f02d2.TIF")
    np.testing.assert_array_equal(field[0], own)
    results = list(iter_fields(index, prefetch=4))
    assert len(results) == 72 and all(r.ok for r in results)
    assert [r.metadata["Metadata_Well"] for r in results[:4]] == ["O01", "O01", "O01", "O02"]


def test_real_speckles_12_bit_in_16_bit(real_data):
    index = scan_plate(real_data / "speckles", r"1-162hr(?P<channel>[a-z0-9]+?)2\.tif")
    field = read_field(index, "A01")
    assert field.shape == (2, 1000, 1200) and field.dtype == np.uint16
    assert 255 < field.max() <= 4095  # 12-bit data, kept as is
    hoe = read_field(index, "A01", channels=["hoe"])
    np.testing.assert_array_equal(hoe[0], field[1])


@pytest.fixture
def plate(tmp_path):
    """A 4-well, 1-site, 3-channel ImageXpress plate (16-bit, 32×32)."""
    write_plate(tmp_path, "imagexpress", wells=4, sites=1, n_channels=3, size=32, seed=1)
    return tmp_path


def _file(plate, well, channel):
    return next(plate.rglob(f"*_{well}_s1_{channel}.tif"))


def test_channel_selection_by_id_and_name(plate):
    index = scan_plate(plate, channel_names={"w1": "DNA", "w3": "Mito"})
    full = read_field(index, "A02")
    picked = read_field(index, "A02", channels=["Mito", "w1"])
    np.testing.assert_array_equal(picked, full[[2, 0]])
    with pytest.raises(MissingChannelError, match="'w9' is not in this plate"):
        read_field(index, "A02", channels=["w9"])
    # the names every output records: unnamed channels keep their ids
    from napari_cellmae.plates.channels import index_channel_names, index_channels

    assert index_channels(index) == ["w1", "w2", "w3"]
    assert index_channel_names(index) == {"w1": "DNA", "w2": "w2", "w3": "Mito"}
    assert index_channel_names(index, ["w3", "w1"]) == {"w3": "Mito", "w1": "DNA"}


def test_field_not_found_messages(plate):
    index = scan_plate(plate)
    with pytest.raises(FieldNotFoundError, match="well H07 is not in.*A01, A02, A03, A04"):
        read_field(index, "H07")
    with pytest.raises(FieldNotFoundError, match=r"no site 5: its sites are \[1\]"):
        read_field(index, "A01", site=5)
    with pytest.raises(FieldNotFoundError, match="not a well name"):
        read_field(index, "7")
    with pytest.raises(FieldNotFoundError, match="no planes"):
        read_field(index, "A01", plane=2)


def test_bad_fields_raise_typed_named_errors_and_iter_fields_goes_on(plate):
    # A01 truncated, A02 a channel missing, A03 a channel of another size, A04 fine
    a01 = _file(plate, "A01", "w2")
    a01.write_bytes(a01.read_bytes()[: a01.stat().st_size // 2])
    index_before_delete = scan_plate(plate)
    _file(plate, "A02", "w3").unlink()
    tifffile.imwrite(_file(plate, "A03", "w1"), np.zeros((16, 16), np.uint16))
    index = scan_plate(plate)

    with pytest.raises(CorruptFileError) as err:
        read_field(index, "A01")
    assert a01.name in str(err.value) and "truncated or corrupt" in str(err.value)
    with pytest.raises(MissingChannelError, match=r"well A02, site 1 has no file for .*'w3'"):
        read_field(index, "A02")
    with pytest.raises(SizeMismatchError, match=r"SYNTH-P1_A03_s1_w1.tif: \(16, 16\)"):
        read_field(index, "A03")
    with pytest.raises(CorruptFileError, match="no longer exists"):  # deleted after the scan
        read_field(index_before_delete, "A02")
    assert read_field(index, "A02", channels=["w1", "w2"]).shape == (2, 32, 32)

    results = list(iter_fields(index, prefetch=2))
    assert [r.metadata["Metadata_Well"] for r in results] == ["A01", "A02", "A03", "A04"]
    errors = [type(r.error) for r in results]
    assert errors == [CorruptFileError, MissingChannelError, SizeMismatchError, type(None)]
    assert all(isinstance(r.error, PlateError) for r in results[:3])
    assert results[3].image.shape == (3, 32, 32) and results[3].ok
    meta, image, error = results[0]  # a result unpacks as (metadata, image, error)
    assert image is None and error is not None and meta["Metadata_Site"] == 1


def test_corrupt_png_and_empty_tiff(tmp_path):
    (tmp_path / "A01_s1_w1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CorruptFileError, match="A01_s1_w1.png"):
        read_image(tmp_path / "A01_s1_w1.png")
    (tmp_path / "x.tif").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="x.tif"):
        read_image(tmp_path / "x.tif")
    (tmp_path / "y.tif").write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(CorruptFileError, match="y.tif"):
        read_image(tmp_path / "y.tif")


def test_iter_fields_reads_ahead_in_background_threads(plate, monkeypatch):
    from napari_cellmae.plates import read as read_module

    index = scan_plate(plate)
    threads = set()
    original = read_module.read_image

    def slow_read(path):
        threads.add(threading.current_thread().name)
        time.sleep(0.02)
        return original(path)

    monkeypatch.setattr(read_module, "read_image", slow_read)
    gen = iter_fields(index, prefetch=4, workers=4)
    first = next(gen)
    time.sleep(0.15)  # the consumer "computes"; the other fields are read meanwhile
    t0 = time.perf_counter()
    rest = list(gen)
    assert time.perf_counter() - t0 < 0.05  # already read: no 3 × 3 × 20 ms wait
    assert first.ok and len(rest) == 3
    assert all(name.startswith("read") for name in threads)

    serial = list(iter_fields(index, prefetch=0))
    for a, b in zip([first, *rest], serial):
        np.testing.assert_array_equal(a.image, b.image)


def test_iter_fields_subset_and_early_stop(plate):
    index = scan_plate(plate)
    fields = list_fields(index)
    subset = fields[fields["Metadata_Well"].isin(["A03", "A04"])]
    got = [r.metadata["Metadata_Well"] for r in iter_fields(index, fields=subset)]
    assert got == ["A03", "A04"]
    gen = iter_fields(index, prefetch=2)
    next(gen)
    gen.close()  # must not hang or leak a running pool
