"""Synthetic artefacts: shapes, dtypes, seeds, channel choice, recipes and severity order."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cellmae.qc import metrics
from napari_cellmae.qc.artefacts import (
    ARTEFACTS,
    HIGH_PHOTON_LEVEL_E,
    SEVERITIES,
    apply_artefact,
    defocus_psf,
    estimate_photon_level,
    exposure,
    kinds_for_class,
    noise_target,
    sparse_field,
)
from napari_cellmae.synthetic import make_field


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return make_field(2, (192, 192), seed=4)  # uint16, 12-bit values


def _metric(image: np.ndarray, name: str) -> float:
    return float(metrics.measure(image)[name][0])


@pytest.mark.parametrize("kind", sorted(ARTEFACTS))
def test_every_artefact_keeps_shape_dtype_input_and_is_seeded(field, kind):
    before = field.copy()
    out = apply_artefact(field, kind, 4, channels=[1], seed=3)
    assert out.shape == field.shape and out.dtype == field.dtype
    assert np.array_equal(field, before)  # the input is never modified
    assert np.array_equal(out[0], field[0])  # channel 0 untouched
    assert not np.array_equal(out[1], field[1])
    assert np.array_equal(out, apply_artefact(field, kind, 4, channels=[1], seed=3))
    single = apply_artefact(field[1], kind, 4, seed=3)  # one (H, W) image works too
    assert single.shape == field.shape[1:]


def test_random_recipes_change_with_the_seed(field):
    for kind in ("noise", "debris", "empty", "background", "vignetting"):
        a = apply_artefact(field, kind, 3, seed=1)
        b = apply_artefact(field, kind, 3, seed=2)
        assert not np.array_equal(a, b), kind


def test_debris_is_one_object_in_every_channel(field):
    out = apply_artefact(field, "debris", 5, seed=0)
    changed = np.abs(out.astype(float) - field) > 200
    overlap = (changed[0] & changed[1]).sum() / max(changed[0].sum(), 1)
    assert changed[0].sum() > 50 and overlap > 0.8


def test_exposure_formula():
    x = np.array([0.0, 0.25, 0.5, 1.0])
    assert exposure(x, 1.0) == pytest.approx([100 / 65535, 0.25, 0.5, 1.0])
    assert exposure(x, 100.0)[1:].tolist() == [1.0, 1.0, 1.0]  # e >> 1 saturates
    assert exposure(x, 1e-4) == pytest.approx(100 / 65535, abs=2e-4)  # e ≈ 1e-4: empty field


def test_defocus_psf_is_normalised_and_widens_with_z():
    def spread(z):
        psf = defocus_psf(z)
        assert psf.sum() == pytest.approx(1.0)
        assert np.allclose(psf, psf[::-1, ::-1])  # symmetric
        r = np.hypot(*np.indices(psf.shape) - psf.shape[0] // 2)
        return float((psf * r**2).sum())

    widths = [spread(z) for z in (0.5, 2, 7, 20)]
    assert widths == sorted(widths)
    assert defocus_psf(0.5).max() > 0.2  # nearly in focus: most light in the centre pixel


def test_severity_makes_each_artefact_worse(field):
    image = field[0]
    lo, hi = 1, 5

    def m(kind, sev, name):
        return _metric(apply_artefact(image, kind, sev, seed=0), name)

    assert m("defocus", hi, "PowerLogLogSlope") < m("defocus", lo, "PowerLogLogSlope")
    assert m("gaussian_blur", hi, "Correlation_20") > m("gaussian_blur", lo, "Correlation_20")
    assert m("saturation", hi, "PercentMaximal") > m("saturation", lo, "PercentMaximal") > 0.01
    assert m("noise", hi, "PowerLogLogSlope") > m("noise", lo, "PowerLogLogSlope")
    assert m("empty", hi, "StdIntensity") < 0.5 * _metric(image, "StdIntensity")
    assert m("debris", hi, "MaxIntensity") > m("debris", lo, "MaxIntensity") * 0.99
    vig = apply_artefact(image, "vignetting", hi, seed=0).astype(float)
    assert vig.sum() < 0.8 * image.astype(float).sum()


def test_bad_arguments_say_what_to_use(field):
    with pytest.raises(ValueError, match="Unknown artefact"):
        apply_artefact(field, "smudge")
    with pytest.raises(ValueError, match="severity"):
        apply_artefact(field, "noise", 9)
    with pytest.raises(ValueError, match="not in this field"):
        apply_artefact(field, "noise", 2, channels=[5])
    with pytest.raises(ValueError, match="Unknown QC class"):
        kinds_for_class("dust")
    assert kinds_for_class("blur") == ["defocus", "gaussian_blur"]
    assert set(SEVERITIES) == {1, 2, 3, 4, 5}


def test_float_images_stay_float_in_unit_range():
    x = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    out = apply_artefact(x, "saturation", 5, seed=0)
    assert out.dtype == np.float32 and out.max() == pytest.approx(1.0)


def _cells(image: np.ndarray) -> int:
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    x = image.astype(float)
    smooth = ndi.gaussian_filter(x, 2)
    return int(ndi.label(smooth > threshold_otsu(smooth))[1])


def test_empty_means_no_cells_and_a_sparse_field_keeps_a_few(real_data):
    from napari_cellmae.plates import read_image

    path = next((real_data / "bbbc022-raw-imagexpress").glob("IXMtest_A01_s1_*.tif"))
    dna = read_image(path)[0][:256, :256]
    n = _cells(dna)
    assert n >= 10
    for severity in SEVERITIES:  # every level removes every cell, not just most of them
        empty = apply_artefact(dna, "empty", severity, seed=1).astype(float)
        assert empty.max() < dna.min() + 0.2 * (dna.max() - dna.min()), severity
    sparse = sparse_field(dna, keep=0.0, seed=1, min_cells=4)
    assert sparse.dtype == dna.dtype and sparse.shape == dna.shape
    assert 3 <= _cells(sparse) <= 8 < n
    assert sparse.max() > 0.8 * dna.max()  # the nuclei kept are as bright as they were


def test_defocus_follows_the_pixel_size(field):
    image = field[0]
    fine = apply_artefact(image, "defocus", 3, seed=0, pixel_um=0.3)
    coarse = apply_artefact(image, "defocus", 3, seed=0, pixel_um=1.3)
    assert np.array_equal(
        apply_artefact(image, "defocus", 3, seed=0),
        apply_artefact(image, "defocus", 3, seed=0, pixel_um=0.65),
    )
    # the same z spreads over more of the smaller pixels: blurrier
    assert _metric(fine, "PowerLogLogSlope") < _metric(coarse, "PowerLogLogSlope")
    with pytest.raises(ValueError, match="pixel_um"):
        apply_artefact(image, "defocus", 3, pixel_um=0)


def _photon_field(n0: float, bits: int = 16, seed: int = 0) -> np.ndarray:
    """A smooth cell-like field (256², 45 cells on a background at 3% of their brightness)
    imaged with n0 e⁻ (Poisson) at its bright level (99.9th percentile) and 2 e⁻ read noise,
    written as integers: offset 100 DN, bright level at 4000 DN (16-bit) or 10 and 200 DN."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    f = np.zeros((256, 256))
    for _ in range(45):
        cy, cx = rng.uniform(0, 256, 2)
        f += rng.uniform(0.4, 1.0) * (np.hypot(yy - cy, xx - cx) < rng.uniform(8, 18))
    f = ndi.gaussian_filter(f, 2.0) + 0.03
    electrons = n0 * f / np.percentile(f, 99.9)
    counts = rng.poisson(electrons) + rng.normal(0, 2.0, f.shape)
    offset, bright, dtype = (100, 4000, np.uint16) if bits == 16 else (10, 200, np.uint8)
    image = np.round(offset + counts * (bright - offset) / n0)
    return np.clip(image, 0, np.iinfo(dtype).max).astype(dtype)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("n0", [2000, 60])
def test_photon_level_is_recovered_from_the_image_alone(n0, bits):
    image = _photon_field(n0, bits)
    level = estimate_photon_level(image)
    top = float(np.iinfo(image.dtype).max)
    offset, bright = (100, 4000) if bits == 16 else (10, 200)
    assert level.fitted
    assert level.electrons_at_bright == pytest.approx(n0, rel=0.3)
    # e⁻ per unit of the image scaled to [0, 1], as apply_artefact scales it
    assert level.gain == pytest.approx(n0 / (bright - offset) * top, rel=0.3)
    assert level.offset * top == pytest.approx(offset, abs=0.05 * bright)
    assert 0 <= level.read_noise <= 2.0 + 1e-9  # one image cannot tell more (docstring)


def test_photon_level_of_flat_and_noiseless_images_is_the_high_fallback():
    flat = estimate_photon_level(np.full((64, 64), 1000, np.uint16))
    ramp = estimate_photon_level(np.tile(np.arange(0, 64000, 500, dtype=np.uint16), (128, 1)))
    for level in (flat, ramp):  # no shot noise to measure: a very bright source
        assert not level.fitted
        assert level.electrons_at_bright == HIGH_PHOTON_LEVEL_E
        assert np.isfinite([level.gain, level.offset, level.read_noise]).all()
    with pytest.raises(ValueError, match="one numeric image"):
        estimate_photon_level(np.zeros((2, 8, 8)))


def test_noise_is_the_lower_light_capture_of_a_bright_source():
    image = _photon_field(2000)
    levels = ARTEFACTS["noise"].levels
    for severity, electrons in zip(SEVERITIES, levels, strict=True):
        out = apply_artefact(image, "noise", severity, seed=0)
        assert estimate_photon_level(out).electrons_at_bright == pytest.approx(electrons, rel=0.3)
        # rescaled, not dimmed: the cells' level stays where it was (median: 0 clips the mean)
        cells = image > np.percentile(image, 80)
        assert np.median(out[cells]) == pytest.approx(np.median(image[cells]), rel=0.1)


def _residual_std(image: np.ndarray, out: np.ndarray) -> float:
    return float(np.std(out.astype(np.float64) - image))


def test_noise_on_a_source_already_that_noisy_still_adds_noise_in_order():
    from scipy import ndimage as ndi

    image = _photon_field(60)  # noisier than severity 1 (120 e⁻ at the bright level) already
    own = _residual_std(image, ndi.gaussian_filter(image.astype(np.float64), 2))
    stds = [_residual_std(image, apply_artefact(image, "noise", s, seed=0)) for s in SEVERITIES]
    assert stds[0] > 0.5 * own  # severity 1 keeps at most half of the source's photons
    assert stds == sorted(stds)
    # the levels are relative to the source's own photons: N · N0 / 240 e⁻ (≈ 30 and 12 here,
    # where re-drawing 120 and 50 e⁻ over the image's noise gave ≈ 35 and 22)
    source = estimate_photon_level(image)
    for severity in (1, 2):
        out = apply_artefact(image, "noise", severity, seed=0)
        target = noise_target(ARTEFACTS["noise"].levels[severity - 1], source)
        assert target == pytest.approx(source.electrons_at_bright * (120, 50)[severity - 1] / 240)
        assert estimate_photon_level(out).electrons_at_bright == pytest.approx(target, rel=0.3)


@pytest.mark.parametrize(
    "source, pattern",
    [("transfluor-plate", "*O01f00d2.TIF"), ("bbbc022-raw-imagexpress", "*_A01_s1_*")],
)
def test_noise_on_real_images_follows_their_photon_level(real_data, source, pattern):
    from napari_cellmae.plates import read_image

    image = read_image(next((real_data / source).glob(pattern)))[0][:256, :256]
    level = estimate_photon_level(image)
    assert level.fitted and 0 < level.electrons_at_bright < HIGH_PHOTON_LEVEL_E
    stds = [_residual_std(image, apply_artefact(image, "noise", s, seed=0)) for s in SEVERITIES]
    assert stds[0] > 0 and stds == sorted(stds)
