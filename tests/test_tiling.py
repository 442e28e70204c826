import numpy as np
import pytest

from napari_cellmae import tiling


@pytest.mark.parametrize(
    ("size", "starts"),
    [
        (256, [0]),
        (300, [0, 44]),
        (512, [0, 256]),
        (1000, [0, 248, 496, 744]),
        (1080, [0, 206, 412, 618, 824]),
    ],
)
def test_crop_starts_cover_the_axis_with_least_overlap(size, starts):
    got = tiling.crop_starts(size)
    assert got.tolist() == starts
    assert got[0] == 0 and got[-1] + 256 == size  # first and last pixel covered
    assert np.all(np.diff(got) <= 256)  # no gaps
    assert len(got) == int(np.ceil(size / 256))  # as few crops as possible


def test_short_side_is_rejected_by_the_grid_and_padded_by_pad_to_min():
    with pytest.raises(ValueError, match="pad the field first"):
        tiling.crop_starts(200)
    field = np.arange(3 * 200 * 300, dtype=np.float32).reshape(3, 200, 300)
    padded = tiling.pad_to_min(field)
    assert padded.shape == (3, 256, 300)
    np.testing.assert_array_equal(padded[:, :200], field)
    np.testing.assert_array_equal(padded[:, 200], field[:, 198])  # reflection
    big = np.zeros((1, 300, 300))
    assert tiling.pad_to_min(big) is big


def test_tiling_a_1000_field_and_stitching_it_back():
    rng = np.random.default_rng(0)
    field = rng.random((2, 1000, 1000), dtype=np.float32)
    pos = tiling.crop_grid(1000, 1000)
    assert pos.shape == (16, 2)
    assert pos[:5].tolist() == [[0, 0], [0, 248], [0, 496], [0, 744], [248, 0]]
    crops = tiling.extract_crops(field, pos)
    assert crops.shape == (16, 2, 256, 256)
    np.testing.assert_array_equal(crops[5], field[:, 248:504, 248:504])
    np.testing.assert_allclose(tiling.stitch_crops(crops, pos, (1000, 1000)), field, rtol=1e-6)


def test_stitch_averages_overlaps():
    pos = tiling.crop_grid(256, 300)  # x starts 0 and 44: 212 px overlap
    crops = np.stack([np.zeros((256, 256)), np.ones((256, 256))])
    out = tiling.stitch_crops(crops, pos, (256, 300))
    assert out[0, 0] == 0 and out[0, 299] == 1 and out[0, 100] == 0.5
    with pytest.raises(ValueError, match="does not fit"):
        tiling.extract_crops(np.zeros((1, 100, 100)), np.array([[0, 0]]))


def test_upsample_patch_maps_to_pixels():
    maps = np.arange(4).reshape(1, 2, 2)
    up = tiling.upsample_patches(maps, 16)
    assert up.shape == (1, 32, 32)
    assert up[0, 15, 15] == 0 and up[0, 16, 0] == 2 and up[0, 31, 31] == 3
