"""CellProfiler MeasureImageQuality definitions against hand-computed values and a literal
transcription of CellProfiler's (centrosome's) loops (tests/test_qc_fidelity.py: against
CellProfiler's own values on the real images)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_cellmae.qc import metrics as m


def test_focus_score_by_hand_and_integer_scaling():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])  # mean 2.5, population variance 1.25
    assert m.focus_score(x)[0] == pytest.approx(1.25 / 2.5)
    u8 = np.array([[0, 255], [255, 0]], np.uint8)  # CellProfiler scales by 255: 0, 1, 1, 0
    assert m.focus_score(u8)[0] == pytest.approx(0.25 / 0.5)
    assert m.focus_score(np.zeros((4, 4)))[0] == 0.0  # mean <= 0


def test_local_focus_score_by_hand():
    # 4×4 at scale 2: four 2×2 tiles with var/mean 0.5, 0, 4/3, 0
    x = np.array(
        [
            [1, 3, 2, 2],
            [1, 3, 2, 2],
            [1, 5, 4, 4],
            [1, 5, 4, 4],
        ],
        float,
    )
    v = np.array([0.5, 0.0, 4 / 3, 0.0])
    expected = np.var(v) / np.median(v)  # variance over MEDIAN (CellProfiler's code)
    assert expected == pytest.approx(0.296875 / 0.25)
    assert m.local_focus_score(x, 2)[0] == pytest.approx(expected)


def test_tile_grid_follows_cellprofiler_for_uneven_sizes():
    grid, n = m.tile_grid((5, 7), 2)  # ceil(5/2) = 3 rows, ceil(7/2) = 4 columns of tiles
    assert n == 12
    assert grid[:, 0].tolist() == [0, 0, 4, 4, 8]  # row i -> floor(i * 3 / 5)
    assert grid[0].tolist() == [0, 0, 1, 1, 2, 2, 3]  # col j -> floor(j * 4 / 7)


def _local_focus_reference(x: np.ndarray, scale: int) -> float:
    """CellProfiler's calculate_focus_scores, written as loops over tiles."""
    h, w = x.shape
    m_, n_ = (h + scale - 1) // scale, (w + scale - 1) // scale
    ti = (np.arange(h) * m_ / h).astype(int)
    tj = (np.arange(w) * n_ / w).astype(int)
    v = []
    for a in range(m_):
        for b in range(n_):
            tile = x[np.ix_(ti == a, tj == b)]
            if tile.size and tile.mean() != 0:
                v.append(((tile - tile.mean()) ** 2).sum() / (tile.size * tile.mean()))
    v = np.array(v)
    med = np.median(v)
    return float(np.var(v) / med) if med > 0 else 0.0


@pytest.mark.parametrize("shape,scale", [((64, 64), 20), ((50, 37), 7), ((33, 80), 10)])
def test_local_focus_score_matches_the_loop_definition(shape, scale):
    x = np.random.default_rng(1).random(shape) ** 3
    assert m.local_focus_score(x, scale)[0] == pytest.approx(_local_focus_reference(x, scale))


def test_correlation_by_hand():
    # levels [[0,0,7,7]] twice; pairs at offset 1: (0,0), (0,7), (7,7) -> correlation 0.5
    x = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert m.correlation(x, 1)[0] == pytest.approx(0.5)
    checker = np.indices((6, 6)).sum(axis=0) % 2  # neighbours always differ -> -1
    assert m.correlation(checker.astype(float), 1)[0] == pytest.approx(-1.0)
    assert m.correlation(np.ones((8, 8)), 1)[0] == 0.0  # constant: marginals have no spread


def test_quantize_uses_eight_levels_of_the_own_range():
    x = np.array([[10.0, 12.5, 15.0, 17.5, 20.0]])  # min 10, max 20 -> 0, .25, .5, .75, 1
    assert m.quantize(x)[0, 0].tolist() == [0, 2, 4, 6, 7]  # 1.0 // (1/8) = 8 -> clipped to 7


def test_correlation_grows_with_blur():
    x = np.random.default_rng(0).random((128, 128))
    values = [m.correlation(ndi.gaussian_filter(x, s), 20)[0] for s in (0.5, 2, 6)]
    assert values == sorted(values)


def _plls_reference(img: np.ndarray) -> float:
    """CellProfiler's calculate_power_spectrum + centrosome.radial_power_spectrum.rps, literal."""
    if len(np.unique(img)) <= 1:
        return 0.0
    radii2 = np.arange(img.shape[0])[:, None] ** 2 + np.arange(img.shape[1]) ** 2
    radii2 = np.minimum(radii2, np.flipud(radii2))
    radii2 = np.minimum(radii2, np.fliplr(radii2))
    maxwidth = min(img.shape) / 8.0
    img = img / np.median(np.abs(img - img.mean()))
    mag = np.abs(np.fft.fft2(img - np.mean(img)))
    power = mag**2
    radii = np.floor(np.sqrt(radii2)).astype(int) + 1
    labels = np.arange(2, np.floor(maxwidth)).astype(int)
    magsum = ndi.sum(mag, radii, labels)
    powersum = ndi.sum(power, radii, labels)
    valid = magsum > 0
    r, p = labels[valid], powersum[valid]
    idx = np.isfinite(np.log(p))
    a = np.stack([np.log(r)[idx], np.ones(idx.sum())], axis=1)
    return float(np.linalg.lstsq(a, np.log(p)[idx], rcond=None)[0][0])


def test_power_log_log_slope_matches_cellprofiler_and_behaves():
    rng = np.random.default_rng(0)
    noise = rng.random((256, 256))
    assert m.power_log_log_slope(noise)[0] == pytest.approx(_plls_reference(noise), abs=1e-4)
    assert m.power_log_log_slope(noise)[0] == pytest.approx(1.0, abs=0.15)  # white noise: +1
    odd = rng.random((100, 140)) ** 2
    assert m.power_log_log_slope(odd)[0] == pytest.approx(_plls_reference(odd), abs=1e-4)
    slopes = [m.power_log_log_slope(ndi.gaussian_filter(noise, s))[0] for s in (0.5, 1, 2, 4)]
    assert slopes == sorted(slopes, reverse=True) and slopes[-1] < -1.5  # blur: more negative
    assert m.power_log_log_slope(np.full((64, 64), 3.0))[0] == 0.0
    assert m.power_log_log_slope(np.ones((12, 12)))[0] == 0.0  # too small for any ring


def test_percent_maximal_minimal_and_intensities_by_hand():
    x = np.array([[1.0, 1.0], [0.0, 0.5]])
    assert m.percent_maximal(x)[0] == 50.0  # the image's own maximum, not the dtype's
    assert m.percent_minimal(x)[0] == 25.0
    stats = m.intensity_stats(np.array([[1.0, 2.0, 3.0, 4.0, 100.0]]))
    assert stats["MADIntensity"][0] == 1.0  # median |x - 3| = median(2,1,0,1,97), no 1.4826
    assert stats["MedianIntensity"][0] == 3.0
    assert stats["TotalIntensity"][0] == 110.0
    assert stats["StdIntensity"][0] == pytest.approx(np.std([1, 2, 3, 4, 100]))  # ddof 0
    assert stats["MinIntensity"][0] == 1.0 and stats["MaxIntensity"][0] == 100.0


def _centrosome_otsu_reference(x: np.ndarray) -> float:
    """centrosome get_otsu_threshold (two classes, weighted variance), written with plain loops
    over the candidate thresholds (CellProfiler/centrosome, BSD-3)."""
    data = np.asarray(x, np.float32).ravel()
    lo, hi = data.min(), data.max()
    noise_min = lo + (hi - lo) / np.float32(256) + np.finfo(np.float32).eps
    logged = np.log(np.maximum(data, noise_min)).astype(np.float64)
    a, b = logged.min(), logged.max()
    s = np.sort((logged - a) / (b - a))
    n = len(s)
    step = n // min(256, n)
    cands, scores = [], []
    for i in range(0, n - 1, step):  # split after s[i]: low = s[:i+1], high = s[i+1:]
        low, high = s[: i + 1], s[i + 1 :]
        var_low = low.var(ddof=1) if len(low) > 1 else 0.0
        var_high = high.var(ddof=1) if len(high) > 1 else 0.0
        cands.append(s[i + 1])
        scores.append(var_low * i + var_high * (n - i - 1))
    k = int(np.argmin(scores))
    t = (cands[max(k - 1, 0)] + cands[min(k + 1, len(cands) - 1)]) / 2
    return float(np.exp(t * (b - a) + a))


def test_otsu_is_centrosomes_log_otsu():
    rng = np.random.default_rng(3)
    bimodal = np.concatenate([rng.normal(0.2, 0.03, 500), rng.normal(0.7, 0.05, 300)])
    images = [bimodal.reshape(20, 40), rng.random((30, 30)), rng.gamma(2.0, size=(40, 40)) / 20]
    for image in images:
        assert m.threshold_otsu(image)[0] == pytest.approx(
            _centrosome_otsu_reference(image), rel=1e-5
        )
    assert 0.3 < m.threshold_otsu(bimodal.reshape(20, 40))[0] < 0.6
    assert m.threshold_otsu(np.full((4, 4), 0.25))[0] == pytest.approx(0.25)
    # log intensities: a dim-background image with a few bright cells is split near the cells'
    # faint edge, far below the linear histogram's midpoint
    cells = np.full((64, 64), 0.01) + rng.normal(0, 0.001, (64, 64))
    cells[20:30, 20:30] = 0.5
    assert m.threshold_otsu(cells)[0] < 0.1


def test_measure_is_per_channel_and_vectorised():
    rng = np.random.default_rng(0)
    field = (rng.random((3, 96, 80)) * 4095).astype(np.uint16)
    field[1] = ndi.gaussian_filter(field[1], 3)
    table = m.measure_field(field, ["DNA", "ER", "RNA"])
    assert table["channel"].tolist() == ["DNA", "ER", "RNA"]
    assert [c for c in table.columns if c != "channel"] == [f"QC_{n}" for n in m.metric_names()]
    one = m.measure(field[1])  # one channel alone gives the same numbers
    for name, values in one.items():
        assert table.loc[1, f"QC_{name}"] == pytest.approx(values[0], rel=1e-9), name
    assert table.loc[1, "QC_PowerLogLogSlope"] < table.loc[0, "QC_PowerLogLogSlope"]
    with pytest.raises(ValueError, match="NaN"):
        m.measure(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="channel names"):
        m.measure_field(field, ["DNA"])
