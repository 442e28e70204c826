"""QC's memory on large fields (issue 20, item 10): the classic metrics are measured one channel
at a time and in bands of rows, with the same values as the whole-image definitions."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from napari_cellmae.qc import metrics as m


def _field(channels: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = rng.normal(900, 150, (channels, h, w))
    field[:, : h // 3] += 400  # structure: not white noise everywhere
    field[0, 5:40, 7:60] = 65535  # a saturated patch
    return field.clip(0, 65535).astype(np.uint16)


def _whole_image(images: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics from the public whole-image functions (the definitions)."""
    x = m._stack(images)
    out = {
        "FocusScore": m.focus_score(x),
        "LocalFocusScore_20": m.local_focus_score(x, 20),
        "Correlation_20": m.correlation(x, 20),
        "PowerLogLogSlope": m.power_log_log_slope(x),
        "PercentMaximal": m.percent_maximal(x),
        "PercentMinimal": m.percent_minimal(x),
        "ThresholdOtsu": m.threshold_otsu(x),
    }
    return out | m.intensity_stats(x)


@pytest.mark.parametrize("band", [m._BAND_PIXELS, 997])
def test_banded_per_channel_measure_keeps_the_values(band, monkeypatch):
    monkeypatch.setattr(m, "_BAND_PIXELS", band)  # 997: many bands, uneven edges
    field = _field(3, 257, 301)
    got = m.measure(field)
    expected = _whole_image(field)
    for name, values in expected.items():
        assert got[name] == pytest.approx(values, rel=1e-9, abs=1e-12), name
    # the quantised levels and co-occurrences are integers: exactly the same
    q = m._quantize_uint8(m._stack(field))
    assert np.array_equal(q, m.quantize(field))
    assert np.array_equal(m._cooccurrence_banded(q, 20), m.cooccurrence(m.quantize(field), 20))


def test_measure_peak_memory_is_a_few_copies_of_one_channel(monkeypatch):
    """Before: 52 bytes per pixel of the whole field (float64 copies of every channel at once,
    int64 labels, a float64 ring-label grid); now about 18 per pixel of one channel."""
    monkeypatch.setattr(m, "_BAND_PIXELS", 1 << 16)  # a 1/16 band, as on an 8000² field
    field = _field(3, 1024, 1024)
    m.measure(field[:, :64, :64])  # imports and caches outside the measurement
    tracemalloc.start()
    m.measure(field)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    per_channel_pixel = peak / field[0].size
    assert per_channel_pixel < 24, f"{per_channel_pixel:.1f} bytes per pixel of one channel"
