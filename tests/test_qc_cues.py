"""The plate-independent cues (qc/cues.py): each reads the artefact it is for on a real field,
alone (no plate), and stays quiet on the clean field."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cellmae.plates import read_image
from napari_cellmae.qc import cues as q
from napari_cellmae.qc.artefacts import apply_artefact
from napari_cellmae.qc.metrics import measure, metric_names, to_unit


@pytest.fixture(scope="module")
def field(real_data):
    return read_image(real_data / "bbbc022-cellpainting" / "plate1_A14_site1_Ch1.tif")[0]


def _cues(image, max_value=None):
    return q.image_cues(to_unit(image, max_value))


def test_measure_returns_the_cues_after_cellprofilers_metrics(field):
    values = measure(field[:128, :128])
    assert list(values) == metric_names()
    assert metric_names()[-len(q.CUE_NAMES) :] == list(q.CUE_NAMES)
    assert not set(q.CUE_NAMES) & set(metric_names(cues=False))


def test_uneven_illumination_is_a_smooth_background_surface(field):
    clean = _cues(field)
    for kind in ("background", "vignetting"):
        spoilt = _cues(apply_artefact(field, kind, 4, seed=3))
        assert spoilt["BackgroundSmoothAmplitude"] > 2 * clean["BackgroundSmoothAmplitude"], kind
        assert spoilt["BackgroundSmoothFraction"] > 0.8, kind


def test_debris_is_many_times_brighter_than_the_cells(field):
    clean = _cues(field)
    spoilt = _cues(apply_artefact(field, "debris", 4, seed=1))
    assert clean["BrightFraction6"] < 1e-4
    assert spoilt["BrightFraction6"] > 10 * max(clean["BrightFraction6"], 1e-5)


def test_clipping_is_read_against_the_cameras_ceiling(field):
    clean = _cues(field)
    spoilt = _cues(apply_artefact(field, "saturation", 3, seed=0))
    assert clean["PercentCeiling"] == 0.0 and clean["MaxInPlateaus"] < 0.5
    assert spoilt["PercentCeiling"] > 0.1
    assert spoilt["MaxPlateauFraction"] > 100 * clean["MaxPlateauFraction"]
    assert spoilt["MaxInPlateaus"] > 0.9
    # 12-bit data in a 16-bit file clips at 4095: the file's MaxSampleValue is the ceiling
    twelve = np.minimum(field.astype(np.int64) * 4, 4095).astype(np.uint16)
    assert _cues(twelve)["PercentCeiling"] == 0.0  # / 65535: far below the dtype's ceiling
    assert _cues(twelve, 4095.0)["PercentCeiling"] == pytest.approx(
        100 * np.mean(twelve == 4095), rel=1e-9
    )


def test_flat_and_tiny_images_give_finite_cues():
    for image in (np.zeros((64, 64)), np.full((5, 7), 0.3), np.eye(3)):
        values = q.image_cues(image)
        assert set(values) == set(q.CUE_NAMES)
        assert all(np.isfinite(v) for v in values.values())


def test_large_images_are_read_through_a_stride(field, monkeypatch):
    tile = to_unit(field[:256, :256])
    big = np.tile(tile, (4, 4))  # 1024²
    exact = q.image_cues(big)
    monkeypatch.setattr(q, "SAMPLE_PIXELS", 1 << 16)  # 256²: every 4th row and column
    strided = q.image_cues(big)
    for name in ("BackgroundRange", "ForegroundFraction", "RangeOverForeground"):
        assert strided[name] == pytest.approx(exact[name], rel=0.25), name
