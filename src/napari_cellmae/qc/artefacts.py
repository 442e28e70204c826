"""Synthetic imaging artefacts, for training QC heads and for evaluating them.

Each artefact works on one image scaled to [0, 1] and has five severity levels (1 = mild … 5 =
severe; the parameter of each level is in :data:`ARTEFACTS`). :func:`apply_artefact` takes a
whole field ``(C, H, W)`` (or one image) in any dtype, applies the artefact to the chosen channels
(default: all) and returns the field in its own dtype (integers: scaled by the dtype's maximum,
processed, rounded and clipped back, so a saturated pixel lands on the dtype's ceiling as a camera
would write it). The same seed gives the same result; channels get independent random streams,
except debris, which is one physical object seen in every channel.

Recipes (see docs/qc.md):

- ``defocus``: convolution with the scalar defocused PSF of a circular pupil (λ 500 nm, NA 0.5,
  n 1.0; Born & Wolf's defocus integral) sampled at the data's pixel size (``pixel_um``, default
  0.65 µm), defocus z = 2, 4, 7, 12, 20 µm.
- ``gaussian_blur``: Gaussian of σ = 0.25·F px (BBBC005), F = 4, 8, 16, 28, 48.
- ``saturation``: x′ = min(1, (max(0, x·P − O)·e + O) / P), P = 65535, O = 100, with the exposure
  e chosen so that the image's 99.9th percentile reaches 1.1, 1.6, 2.5, 5, 12 × the ceiling.
- ``noise``: the same field captured with less light, at the source's own photon level: the
  image's photon transfer (gain, offset, read noise, N0 e⁻ at its bright level) is estimated
  from the image alone (:func:`estimate_photon_level`), its electrons are thinned binomially to
  N_eff = N · min(1, N0 / 240) at the bright level (:func:`noise_target`; exactly N on sources
  with N0 ≥ 240 e⁻, the levels' photon fractions on dimmer ones), Gaussian read noise is brought
  to the camera's (≥ 2 e⁻), and the result is rescaled so that the bright level stays; N = 120,
  50, 20, 8, 3.
- ``debris``: bright, out-of-focus irregular blobs (thresholded smooth noise) and fibres (smooth
  random curves), 4–12 × brighter than the cells' bright level; 1, 2, 3, 5, 8 objects of growing
  size.
- ``empty``: no cells at all: the field's own background (a smooth low-percentile surface plus
  noise matching the background's) with every cell removed, the background's level above the
  image's black level kept at 100%, 80%, 60%, 40%, 25% (a dimmer or missing stain; not a
  dark frame, which on an 8-bit camera is a constant image that no metric can tell from a
  saturated one). *Empty* means no cells, not few cells: :func:`sparse_field` thins a field to a
  handful of its cells, which is a good ("ok") field, for training heads that must tell the two
  apart.
- ``background``: a smooth additive or multiplicative bias field (a random 2-D polynomial of
  degree 2–3 through a sigmoid) of amplitude a = 0.4, 0.8, 1.5, 2.5, 4: additive (a × the cells'
  contrast, the image then rescaled so that its bright level does not move) or multiplicative (the
  dim side keeps 1/(1 + a) of the signal).
- ``vignetting``: illumination falling off from an off-centre optical axis, to 45, 35, 25, 15, 8%
  at the far corner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

SEVERITIES = (1, 2, 3, 4, 5)
SATURATION_P = 65535.0
SATURATION_O = 100.0
READ_NOISE_E = 2.0
# the microscope of QC.md's defocus recipe
WAVELENGTH_UM = 0.5
NUMERICAL_APERTURE = 0.5
REFRACTIVE_INDEX = 1.0
PIXEL_UM = 0.65


@dataclass(frozen=True)
class Artefact:
    """One artefact recipe.

    Attributes
    ----------
    name : str
        Key in :data:`ARTEFACTS`.
    qc_class : str
        The QC class it produces (``blur``, ``saturation``, ``noise``, ``debris``, ``empty``,
        ``background``).
    levels : tuple
        The recipe's parameter at severities 1..5.
    func : callable
        ``func(image (H, W) float64 in [0, 1], level, rng) -> (H, W)``.
    description : str
        One line for docs and tooltips.
    """

    name: str
    qc_class: str
    levels: tuple[float, ...]
    func: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
    description: str


def _bright(x: np.ndarray) -> float:
    """The image's bright level (99.9th percentile), never 0."""
    return max(float(np.percentile(x, 99.9)), 1e-6)


def _contrast(x: np.ndarray) -> float:
    """Cells' contrast over the background: 99th minus 20th percentile, never 0."""
    lo, hi = np.percentile(x, [20, 99])
    return max(float(hi - lo), 1e-6)


# -- blur -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def defocus_psf(z_um: float, pixel_um: float = PIXEL_UM) -> np.ndarray:
    """The defocused PSF (2-D, sums to 1) of an aberration-free circular pupil.

    PSF(r) ∝ |∫₀¹ J0(k·NA·r·ρ) · exp(i·k·z·(n − √(n² − NA²ρ²))) ρ dρ|², k = 2π/λ, evaluated on a
    3×3 sub-pixel grid and summed per pixel; the kernel extends 1.5× the geometric blur radius
    z·tan(asin(NA/n)) plus 3 Airy radii.
    """
    from scipy.special import j0

    k = 2 * np.pi / WAVELENGTH_UM
    na, n = NUMERICAL_APERTURE, REFRACTIVE_INDEX
    geometric = abs(z_um) * np.tan(np.arcsin(na / n))
    airy = 0.61 * WAVELENGTH_UM / na
    half = int(np.ceil((1.5 * geometric + 3 * airy) / pixel_um))
    sub = 3
    coords = (np.arange(-half * sub, (half + 1) * sub) - (sub - 1) / 2) / sub * pixel_um
    rr = np.hypot(coords[:, None], coords[None, :])
    r_grid = np.linspace(0, rr.max() + pixel_um, 400)
    rho = (np.arange(256) + 0.5) / 256
    phase = k * z_um * (n - np.sqrt(n * n - (na * rho) ** 2))
    pupil = np.exp(1j * phase) * rho / len(rho)
    amplitude = j0(k * na * r_grid[:, None] * rho[None]) @ pupil
    profile = np.abs(amplitude) ** 2
    psf = np.interp(rr, r_grid, profile)
    size = 2 * half + 1
    psf = psf[: size * sub, : size * sub].reshape(size, sub, size, sub).sum(axis=(1, 3))
    psf = psf / psf.sum()
    psf.flags.writeable = False  # cached: shared by every call with the same z
    return psf


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy.signal import fftconvolve

    pad = kernel.shape[0] // 2
    padded = np.pad(x, pad, mode="reflect") if pad < min(x.shape) else np.pad(x, pad, "edge")
    return fftconvolve(padded, kernel, mode="same")[pad : -pad or None, pad : -pad or None]


def _defocus(
    x: np.ndarray, z_um: float, rng: np.random.Generator, pixel_um: float = PIXEL_UM
) -> np.ndarray:
    return np.clip(_convolve(x, defocus_psf(z_um, float(pixel_um))), 0, None)


def _gaussian_blur(x: np.ndarray, f: float, rng: np.random.Generator) -> np.ndarray:
    return ndi.gaussian_filter(x, 0.25 * f, mode="reflect")


# -- exposure and noise ---------------------------------------------------------------------------
def exposure(x: np.ndarray, e: float) -> np.ndarray:
    """QC.md's exposure formula: x′ = min(1, (max(0, x·P − O)·e + O) / P), P = 65535, O = 100."""
    p, o = SATURATION_P, SATURATION_O
    return np.minimum(1.0, (np.maximum(0.0, x * p - o) * e + o) / p)


def _saturation(x: np.ndarray, overshoot: float, rng: np.random.Generator) -> np.ndarray:
    # the exposure that takes the bright level to `overshoot` × the ceiling, whatever the image's
    # bit depth (a 12-bit image stored in 16 bits needs a larger e than an 8-bit one)
    level = _bright(x) * SATURATION_P - SATURATION_O
    e = (overshoot * SATURATION_P - SATURATION_O) / max(level, 1.0)
    return exposure(x, max(e, 1.0))


# the Immerkær (1996) mask: [1, -2, 1] ⊗ [1, -2, 1] / 6 removes any structure that is linear
# along rows or columns and keeps the variance of white noise (Σ m² = 1)
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64) / 6.0
# bright level of a source with no measurable shot noise (flat image, photon-transfer slope ≤ 0)
HIGH_PHOTON_LEVEL_E = 1e5
# the noise recipe keeps N (its level) at the bright level exactly on sources with at least
# NOISE_MARGIN × the mildest level's electrons; dimmer sources keep the levels' photon fractions
NOISE_MARGIN = 2.0


@dataclass(frozen=True)
class PhotonLevel:
    """An image's photon transfer, in the units of the image scaled to [0, 1] (integers divided
    by their dtype's maximum, as :func:`apply_artefact` does).

    Attributes
    ----------
    gain : float
        Photo-electrons per intensity unit: intensity x holds (x − offset)·gain electrons.
    offset : float
        Black level (intensity of zero electrons), in [0, the image's dark level].
    read_noise : float
        Read noise in e⁻ left by the fit at ``offset`` (see :func:`estimate_photon_level`).
    electrons_at_bright : float
        N0: electrons at the bright level (the signal's 99.9th percentile; see
        :func:`estimate_photon_level`).
    fitted : bool
        False where the image showed no shot noise and the high-photon-level fallback was used.
    """

    gain: float
    offset: float
    read_noise: float
    electrons_at_bright: float
    fitted: bool


def _unit(image: Any) -> tuple[np.ndarray, float]:
    """An image as float64 in [0, 1] (integers by their dtype's maximum) and its step (1 DN)."""
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"Expected one numeric image (H, W), got {arr.dtype} {arr.shape}.")
    x = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(np.iinfo(arr.dtype).max)
        return x / top, 1.0 / top
    return x, 0.0


def estimate_photon_level(image: Any) -> PhotonLevel:
    """The photon transfer of one image (H, W, any dtype), estimated from the image alone.

    Shot + read noise give a noise variance linear in the signal: var(x) = (x − offset)/gain +
    read²/gain² (+ 1/12 DN² of quantisation for integer images); this fits that line (the
    photon-transfer curve, Foi et al. 2008's Poissonian–Gaussian model). scikit-image's
    ``estimate_sigma`` and Immerkær's estimator give one Gaussian σ for the whole image, not how
    the variance grows with the signal, so they are used as a building block only:

    - the noise residual is Immerkær's mask (second difference along rows ⊗ along columns / 6:
      removes smooth structure, keeps white noise's variance);
    - pixels are put into 40 bins of a local mean (Gaussian σ 2 px over the even-parity pixels
      outside the 3 × 3) and each bin is placed at a second local mean over the odd-parity
      pixels: no pixel is shared, so noise in the binning neither sorts the residuals nor spreads
      the bins along the signal axis (which flattens the slope at low photon counts);
    - in each bin, only the flatter half (gradient of the σ 2 px smoothing) is used, as cell edges
      leak structure into the residual, and the variance is a trimmed mean of r² (above 9 × the
      median-based variance dropped, corrected for the trimming);
    - a bin where more than a fifth of the pixels touch a clipped pixel (0 or the ceiling) is
      measured instead from its raw values as a Gaussian censored at 0 (the clipped fraction and
      the truncated normal's mean and variance give the latent mean and variance); a bin clipped
      at its median or 84th percentile is dropped;
    - a line is fitted with weights n / var² (each bin's inverse variance) and refitted twice
      without bins more than 3 standard errors off.

    One image cannot separate the black level from the read noise (both move the line's
    intercept): the offset is where the line leaves :data:`READ_NOISE_E` (2 e⁻, a cooled CCD or
    sCMOS) of read noise, bounded to [0, the image's dark level (the signal's 0.1th percentile)];
    ``read_noise`` is what the line leaves at that offset (2 e⁻ unless a bound acts). The bright
    and dark levels are the signal's 99.9th and 0.1th percentiles: pixels ranked by one of the
    two local means, read off the other, so that noise does not move them (on the tests' 256²
    field the bright level moved −4…+1% at 20 e⁻, −9…0% at 8 e⁻, −20…+7% at 3 e⁻).

    Fallback: a constant image, fewer than 3 usable bins, or a slope ≤ 0 (no measurable shot
    noise: a very bright source, or noise below the quantisation step) is taken as a high photon
    level: ``electrons_at_bright`` = :data:`HIGH_PHOTON_LEVEL_E`, the offset the dark level, read
    noise :data:`READ_NOISE_E`, ``fitted`` False. Estimates above that cap are capped. The result
    is never NaN or inf. Spatially correlated noise (binned, interpolated or compressed images)
    reads as less noise, i.e. more photons.
    """
    return _photon_level(*_unit(image))


def _photon_level(x: np.ndarray, dn: float) -> PhotonLevel:
    """:func:`estimate_photon_level` of an image ``x`` in [0, 1] with step ``dn`` (0: float)."""
    quant = dn * dn / 12.0
    means = [_ring_mean(x, parity) for parity in (0, 1)]
    dark, bright = _level(*means, 0.1), _level(*means, 99.9)
    fit = _photon_transfer(x, *means, quant) if bright > dark else None
    if fit is None:
        offset = min(max(dark, 0.0), bright)
        gain = HIGH_PHOTON_LEVEL_E / max(bright - offset, dn or 1e-6)
        return PhotonLevel(gain, offset, READ_NOISE_E, HIGH_PHOTON_LEVEL_E, False)
    slope, intercept, lowest = fit
    gain = 1.0 / slope
    dark = min(dark, lowest)  # a clipped background reads too bright; its latent mean does not
    # the offset where the line leaves READ_NOISE_E of read noise, at most the dark level
    offset = min(max((READ_NOISE_E**2 / gain**2 - intercept) / slope, 0.0), max(dark, 0.0))
    read = float(np.sqrt(max(intercept + slope * offset, 0.0))) * gain
    electrons = (bright - offset) * gain
    if electrons > HIGH_PHOTON_LEVEL_E:
        gain *= HIGH_PHOTON_LEVEL_E / electrons
        electrons = HIGH_PHOTON_LEVEL_E
    return PhotonLevel(float(gain), float(offset), float(read), float(electrons), True)


def _bin_variance(
    local: np.ndarray, raw: np.ndarray, r2: np.ndarray, near_clip: np.ndarray, quant: float
) -> tuple[float, float, int] | None:
    """(mean, noise variance, pixels) of one intensity bin, from its Immerkær residuals ``r2``,
    or, where a fifth of the bin touches a clipped pixel, from its ``raw`` values as a Gaussian
    censored at 0 (its latent mean and variance)."""
    if near_clip.mean() <= 0.2:
        sq = r2[~near_clip]
        cut = 9.0 * max(float(np.median(sq)) / 0.4549, quant, 1e-30)  # 0.4549: median of χ²₁
        kept = sq[sq <= cut]
        # 0.9733: E[z²; |z| ≤ 3]; placed at the independent local mean
        return float(local.mean()), float(kept.mean()) / 0.9733 - quant, kept.size
    from scipy.special import ndtri

    q50, q84 = np.percentile(raw, [50, 84.13])
    if q50 <= 0 or q84 >= 1:  # half the bin clipped: nothing left to measure
        return None
    # a Gaussian censored at 0, from the clipped fraction c and the moments of the rest (the
    # truncated normal's: mean μ + σλ, variance σ²(1 + αλ − λ²), α = Φ⁻¹(c), λ = φ(α)/(1 − c))
    shown = raw[(raw > 0) & (raw < 1)]
    c = float(np.mean(raw <= 0))
    alpha = float(ndtri(c)) if c > 0 else -np.inf
    lam = float(np.exp(-0.5 * alpha * alpha) / np.sqrt(2 * np.pi) / (1 - c)) if c > 0 else 0.0
    shrink = 1 + (alpha * lam if c > 0 else 0.0) - lam * lam
    sigma = float(np.sqrt(shown.var() / shrink))
    return float(shown.mean() - sigma * lam), sigma * sigma - quant, raw.size


def _ring_mean(x: np.ndarray, parity: int, sigma: float = 2.0) -> np.ndarray:
    """Gaussian-weighted mean (σ px) of the pixels outside each pixel's 3 × 3 whose (row +
    column) has ``parity``: two such means (parity 0 and 1) share no pixel."""
    sites = (np.add.outer(np.arange(x.shape[0]), np.arange(x.shape[1])) % 2 == parity) * 1.0
    half = int(3 * sigma + 0.5)  # gaussian_filter's kernel (truncate 3)
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    taps /= taps.sum()
    centre = np.outer(taps[half - 1 : half + 2], taps[half - 1 : half + 2])

    def ring(values: np.ndarray) -> np.ndarray:  # the separable Gaussian less its 3 × 3 centre
        full = ndi.gaussian_filter(values, sigma, mode="reflect", truncate=3.0)
        return full - ndi.convolve(values, centre, mode="reflect")

    return ring(x * sites) / ring(sites)


def _level(select: np.ndarray, mean: np.ndarray, q: float) -> float:
    """The q-th percentile of the signal: the median of ``mean`` over the pixels that ``select``
    (an independent local mean) ranks within ±0.05 percentile of q. Ranking and reading on one
    noisy mean would move the bright level up (and the dark level down) with the noise."""
    lo, hi = np.percentile(select, [max(q - 0.05, 0), min(q + 0.05, 100)])
    band = (select >= lo) & (select <= hi)
    return float(np.median(mean[band]))


def _photon_transfer(
    x: np.ndarray, even: np.ndarray, odd: np.ndarray, quant: float, bins: int = 40
) -> tuple[float, float, float] | None:
    """(slope, intercept) of the noise variance (less quantisation) against the local mean, and
    the darkest bin's mean; None where there is no positive slope to fit."""
    inner = (slice(1, -1), slice(1, -1))
    resid = ndi.convolve(x, _IMMERKAER, mode="reflect")[inner]
    clipped = (x <= 0) | (x >= 1)
    near_clip = ndi.maximum_filter(clipped, 3)[inner].ravel()
    # two local means from disjoint pixels outside the residual's 3 × 3: bins chosen on one are
    # placed at the other's mean, so that noise in the binning neither sorts the residuals nor
    # stretches the bins' means (in a flat background every bin has the same mean)
    select, mean = even[inner].ravel(), odd[inner].ravel()
    smooth = ndi.gaussian_filter(x, 2.0, mode="reflect")
    grad = np.hypot(ndi.sobel(smooth, 0), ndi.sobel(smooth, 1))[inner].ravel()
    raw, r2 = x[inner].ravel(), resid.ravel() ** 2
    lo, hi = np.percentile(select, [0.5, 99.9])
    if hi <= lo or mean.size < 3 * 64:
        return None
    which = np.clip(((select - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    order = np.argsort(which, kind="stable")
    starts = np.searchsorted(which[order], np.arange(bins + 1))
    m, v, n = [], [], []
    for k in range(bins):
        idx = order[starts[k] : starts[k + 1]]
        if idx.size < 64:
            continue
        idx = idx[grad[idx] <= np.median(grad[idx])]  # the flatter half of the bin
        got = _bin_variance(mean[idx], raw[idx], r2[idx], near_clip[idx], quant)
        if got is not None:
            m.append(got[0])
            v.append(got[1])
            n.append(got[2])
    if len(m) < 3:
        return None
    m_, v_, n_ = np.array(m), np.array(v), np.array(n, np.float64)
    keep = np.ones(len(m_), bool)
    slope = intercept = 0.0
    for _ in range(3):
        scale = np.maximum(np.abs(v_), max(quant, 1e-30))
        w = np.sqrt(n_ / 2.0) / scale  # 1 / standard error of each bin's variance
        design = np.stack([m_, np.ones_like(m_)], axis=1)
        slope, intercept = np.linalg.lstsq(design[keep] * w[keep, None], v_[keep] * w[keep])[0]
        off = np.abs(v_ - (slope * m_ + intercept)) * w > 3.0
        if keep.sum() - off.sum() < 3 or not (off & keep).any():
            break
        keep &= ~off
    if not np.isfinite(slope) or slope <= 0:
        return None
    return float(slope), float(intercept), float(m_.min())


def noise_target(electrons: float, source: PhotonLevel) -> float:
    """The electrons at the bright level the ``noise`` recipe leaves for level ``electrons``.

    N_eff = N · min(1, N0 / (NOISE_MARGIN · 120)): exactly N on a source with N0 ≥ 240 e⁻ at its
    bright level (every level then keeps at most half the photons); a dimmer source keeps the
    fraction N / 240 of its own photons, so that every level is at least twice as noisy (in
    shot-noise variance) as the source and the levels stay in order. A per-level rule (exact
    where N0 > N·margin) would make adjacent levels cross on sources between 20 and 240 e⁻.
    """
    mildest = max(ARTEFACTS["noise"].levels)
    n0 = source.electrons_at_bright
    return float(electrons) * min(1.0, n0 / (NOISE_MARGIN * mildest))


def _noise(
    x: np.ndarray, electrons: float, rng: np.random.Generator, dn: float = 0.0
) -> np.ndarray:
    source = _photon_level(x, dn)
    gain, offset = source.gain, source.offset
    p = noise_target(electrons, source) / source.electrons_at_bright  # ≤ 1/2
    est = (x - offset) * gain  # the source's electrons (with its read noise)
    whole = np.maximum(np.rint(est), 0).astype(np.int64)
    # a Poisson count thinned binomially with p is Poisson at p × the rate: the lower-light
    # capture; the rest (rounding, negative read noise) scales as the mean does
    kept = rng.binomial(whole, p) + p * (est - whole)
    read = max(source.read_noise, READ_NOISE_E)
    # thinning left p × the source's read noise; add what brings it to the camera's
    kept += rng.normal(0.0, np.sqrt(max(read**2 - (p * source.read_noise) ** 2, 0.0)), x.shape)
    # rescaled so that the bright level stays (the user's exposure/display normalisation)
    return np.clip(offset + kept / (gain * p), 0, 1)


# -- debris ---------------------------------------------------------------------------------------
def _fibre(shape: tuple[int, int], length: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random curve (a walk whose direction drifts) rasterised as a 1-px line."""
    h, w = shape
    mask = np.zeros(shape, bool)
    pos = rng.uniform([0, 0], [h, w])
    angle = rng.uniform(0, 2 * np.pi)
    turn = 0.0
    for _ in range(int(length)):
        turn = 0.9 * turn + rng.normal(0, 0.05)
        angle += turn
        pos = pos + np.array([np.sin(angle), np.cos(angle)])
        i, j = int(pos[0]), int(pos[1])
        if 0 <= i < h and 0 <= j < w:
            mask[i, j] = True
    return mask


def _blob(shape: tuple[int, int], radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob: smooth noise thresholded inside a random disc."""
    h, w = shape
    cy, cx = rng.uniform([0, 0], [h, w])
    yy, xx = np.ogrid[:h, :w]
    d = np.hypot(yy - cy, xx - cx) / radius
    texture = ndi.gaussian_filter(rng.standard_normal(shape), max(radius / 4, 1.0))
    texture /= texture.std() + 1e-12
    return (1.0 - d + 0.35 * texture) > 0.2


def debris_mask(shape: tuple[int, int], count: float, rng: np.random.Generator) -> np.ndarray:
    """Debris density (H, W) in [0, 1]: ``count`` blobs and fibres, out of focus."""
    n = int(round(count))
    scale = min(shape) / 512
    density = np.zeros(shape)
    for _ in range(n):
        if rng.random() < 0.6:
            radius = rng.uniform(6, 10 + 4 * n) * scale
            obj = _blob(shape, radius, rng).astype(np.float64)
        else:
            obj = ndi.binary_dilation(
                _fibre(shape, rng.uniform(80, 250) * scale, rng), iterations=1
            )
            obj = obj.astype(np.float64)
        obj = ndi.gaussian_filter(obj, rng.uniform(1.0, 3.0))  # out of focus
        density = np.maximum(density, obj / max(obj.max(), 1e-12) * rng.uniform(0.6, 1.0))
    return density


def _debris(
    x: np.ndarray, count: float, rng: np.random.Generator, density: np.ndarray | None = None
) -> np.ndarray:
    if density is None:
        density = debris_mask(x.shape, count, rng)
    brightness = rng.uniform(4, 12) * _bright(x)
    return np.clip(x + density * brightness, 0, 1)


# -- empty field ----------------------------------------------------------------------------------
def background_estimate(x: np.ndarray) -> tuple[np.ndarray, float]:
    """A smooth background surface under the cells and the noise level around it."""
    from skimage.filters import threshold_otsu

    low = np.percentile(x, 30)
    small = x[::4, ::4]
    base = ndi.gaussian_filter(np.minimum(small, low), 8)
    surface = ndi.zoom(base, (x.shape[0] / small.shape[0], x.shape[1] / small.shape[1]), order=1)
    surface = surface[: x.shape[0], : x.shape[1]]
    if surface.shape != x.shape:
        surface = np.pad(
            surface,
            [(0, x.shape[0] - surface.shape[0]), (0, x.shape[1] - surface.shape[1])],
            "edge",
        )
    cut = threshold_otsu(x) if x.max() > x.min() else x.max() + 1
    resid = (x - surface)[x < min(cut, np.percentile(x, 50))]
    noise = float(np.std(resid)) if resid.size > 16 else 0.0
    return surface, noise


def _cell_mask(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels of the cells (Otsu on a smoothed image, dilated to take in their halo)."""
    from skimage.filters import threshold_otsu

    smooth = ndi.gaussian_filter(x, 2)
    cut = threshold_otsu(smooth) if smooth.max() > smooth.min() else np.inf
    return ndi.label(ndi.binary_dilation(smooth > cut, iterations=6))


def _remove_cells(
    x: np.ndarray, keep: np.ndarray, labels: np.ndarray, bg: np.ndarray
) -> np.ndarray:
    soft = ndi.gaussian_filter(keep[labels].astype(np.float64), 2)
    return np.clip(soft * x + (1 - soft) * bg, 0, 1)


def _empty(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    surface, noise = background_estimate(x)
    black = float(x.min())
    surface = black + level * (surface - black)
    labels, n = _cell_mask(x)
    bg = surface + rng.normal(0.0, noise * max(level, 0.3), x.shape)
    return _remove_cells(x, np.zeros(n + 1, bool), labels, bg)


def sparse_field(
    image: np.ndarray, keep: float = 0.15, seed: int = 0, min_cells: int = 3
) -> np.ndarray:
    """A good field with few cells: ``image`` (H, W, any dtype) with a random ``keep`` fraction
    of its cells left (at least ``min_cells`` where it has them) and the rest replaced by the
    field's own background. Not an artefact: sparse wells are ok, only a field with no cells is
    *empty*; heads are trained on both so that they tell them apart."""
    arr = np.asarray(image)
    rng = np.random.default_rng(seed)
    x = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        x /= float(np.iinfo(arr.dtype).max)
    labels, n = _cell_mask(x)
    kept = np.zeros(n + 1, bool)
    if n:
        chosen = rng.random(n) < keep
        if chosen.sum() < min(min_cells, n):
            chosen[rng.permutation(n)[: min(min_cells, n)]] = True
        kept[1:] = chosen
    surface, noise = background_estimate(x)
    y = _remove_cells(x, kept, labels, surface + rng.normal(0.0, noise, x.shape))
    return _from_unit(y, arr.dtype)


# -- uneven background and vignetting -------------------------------------------------------------
def bias_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth field in [0, 1]: a random polynomial of degree 2–3 in (y, x) through a sigmoid."""
    h, w = shape
    yy = np.linspace(-1, 1, h)[:, None]
    xx = np.linspace(-1, 1, w)[None, :]
    degree = int(rng.integers(2, 4))
    poly = np.zeros(shape)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            poly = poly + rng.normal() * yy**i * xx**j
    poly = (poly - poly.mean()) / (poly.std() + 1e-12)
    return 1 / (1 + np.exp(-2.0 * poly))


def _background(x: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    bias = bias_field(x.shape, rng)
    if rng.random() < 0.5:  # additive auto-fluorescence
        added = amplitude * _contrast(x)
        # rescaled so that the bright level stays where it was (as the exposure would be set):
        # the artefact is the uneven background, not saturation
        return np.clip((x + added * bias) / (1 + added / _bright(x)), 0, 1)
    # multiplicative uneven background: the dim side keeps 1/(1 + amplitude) of the signal
    return np.clip(x * (1 + amplitude * bias) / (1 + amplitude), 0, 1)


def _vignetting(x: np.ndarray, corner: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape
    cy, cx = rng.uniform(0.3, 0.7, 2)
    yy = np.linspace(0, 1, h)[:, None] - cy
    xx = np.linspace(0, 1, w)[None, :] - cx
    r2 = yy**2 + xx**2
    falloff = 1 - (1 - corner) * r2 / r2.max()  # `corner` left at the farthest corner
    return np.clip(x * falloff, 0, 1)


ARTEFACTS: dict[str, Artefact] = {
    a.name: a
    for a in (
        Artefact(
            "defocus", "blur", (2, 4, 7, 12, 20), _defocus, "defocused PSF, z µm (λ .5, NA .5)"
        ),
        Artefact(
            "gaussian_blur", "blur", (4, 8, 16, 28, 48), _gaussian_blur, "Gaussian σ = 0.25·F px"
        ),
        Artefact(
            "saturation",
            "saturation",
            (1.1, 1.6, 2.5, 5, 12),
            _saturation,
            "over-exposure: bright level × ceiling",
        ),
        Artefact(
            "noise", "noise", (120, 50, 20, 8, 3), _noise, "less light: e⁻ left at the bright level"
        ),
        Artefact("debris", "debris", (1, 2, 3, 5, 8), _debris, "bright blobs and fibres, count"),
        Artefact(
            "empty",
            "empty",
            (1.0, 0.8, 0.6, 0.4, 0.25),
            _empty,
            "no cells; background kept above the black level",
        ),
        Artefact(
            "background",
            "background",
            (0.4, 0.8, 1.5, 2.5, 4),
            _background,
            "smooth bias field, × cell contrast",
        ),
        Artefact(
            "vignetting",
            "background",
            (0.45, 0.35, 0.25, 0.15, 0.08),
            _vignetting,
            "illumination left at the far corner",
        ),
    )
}

QC_CLASSES = ("blur", "saturation", "debris", "noise", "empty", "background")


def kinds_for_class(qc_class: str) -> list[str]:
    """Artefact names that produce ``qc_class``."""
    kinds = [a.name for a in ARTEFACTS.values() if a.qc_class == qc_class]
    if not kinds:
        raise ValueError(f"Unknown QC class {qc_class!r}: use one of {', '.join(QC_CLASSES)}.")
    return kinds


def _from_unit(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        top = float(np.iinfo(dtype).max)
        return np.clip(np.round(x * top), 0, top).astype(dtype)
    return x.astype(dtype)


def apply_artefact(
    field: Any,
    kind: str,
    severity: int = 3,
    channels: Sequence[int] | int | None = None,
    seed: int | np.random.SeedSequence = 0,
    pixel_um: float | None = None,
) -> np.ndarray:
    """Apply artefact ``kind`` to some channels of a field.

    Parameters
    ----------
    field : array-like
        (C, H, W) or (H, W), any numeric dtype. Integers are scaled by their dtype's maximum;
        floats are taken to be in [0, 1] (values above 1 are clipped where an artefact saturates).
    kind : str
        A key of :data:`ARTEFACTS`.
    severity : int
        1 (mild) … 5 (severe).
    channels : int or sequence of int, optional
        Channels to spoil (default: all).
    seed : int or SeedSequence
        Same seed, same artefact.
    pixel_um : float, optional
        The data's pixel size in µm, for ``defocus`` (the PSF is sampled at it; default
        :data:`PIXEL_UM`, 0.65 µm, a 20× objective on a 6.5 µm camera).

    Returns
    -------
    np.ndarray
        Same shape and dtype as ``field``; the input is not modified.
    """
    if kind not in ARTEFACTS:
        raise ValueError(f"Unknown artefact {kind!r}: use one of {', '.join(ARTEFACTS)}.")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}.")
    if pixel_um is not None and not 0.01 <= float(pixel_um) <= 20:
        raise ValueError(f"pixel_um is the pixel size in µm (0.01–20), got {pixel_um}.")
    arr = np.asarray(field)
    squeeze = arr.ndim == 2
    stack = arr[None] if squeeze else arr
    if stack.ndim != 3:
        raise ValueError(f"Expected a field (C, H, W) or an image (H, W), got shape {arr.shape}.")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"Expected a numeric image, got dtype {arr.dtype}.")
    n = stack.shape[0]
    if channels is None:
        chosen = list(range(n))
    else:
        chosen = [int(channels)] if np.isscalar(channels) else [int(c) for c in channels]
    bad = [c for c in chosen if not 0 <= c < n]
    if bad:
        raise ValueError(f"channels {bad} are not in this field's 0..{n - 1}.")
    recipe = ARTEFACTS[kind]
    level = recipe.levels[int(severity) - 1]
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))

    def stream(k: int) -> np.random.Generator:  # child k of root, without mutating root
        return np.random.default_rng(
            np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, k))
        )

    density = debris_mask(stack.shape[1:], level, stream(0)) if kind == "debris" else None
    out = stack.copy()
    for c in chosen:
        rng = stream(c + 1)
        x = stack[c].astype(np.float64)
        if np.issubdtype(arr.dtype, np.integer):
            x /= float(np.iinfo(arr.dtype).max)
        if kind == "debris":
            y = _debris(x, level, rng, density)
        elif kind == "defocus" and pixel_um is not None:
            y = _defocus(x, level, rng, pixel_um)
        elif kind == "noise" and np.issubdtype(arr.dtype, np.integer):
            y = _noise(x, level, rng, 1.0 / float(np.iinfo(arr.dtype).max))  # 1 DN
        else:
            y = recipe.func(x, level, rng)
        out[c] = _from_unit(y, arr.dtype)
    return out[0] if squeeze else out


def spoil_copy(
    files: Sequence[Any],
    folder: Any,
    spoil: dict[str, str],
    severity: int = 4,
) -> Any:
    """Copy single-plane image ``files`` into ``folder`` (created), putting artefact
    ``spoil[key]`` into each file whose name contains ``_<key>`` followed by the channel tag
    ``d`` (Cellomics names: ``{"O03f01": "defocus"}`` spoils well O03, field 01), at
    ``severity``, seeded by the file's position. The originals are only read. Returns ``folder``
    as a Path: a plate with known artefacts, for demonstrations, tests and benchmarks."""
    from pathlib import Path

    import tifffile

    from ..plates import read_image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(Path(f) for f in files)):
        image = read_image(path)[0]
        kind = next((k for key, k in spoil.items() if f"_{key}d" in path.name), None)
        if kind:
            image = apply_artefact(image, kind, severity, seed=i)
        tifffile.imwrite(out / path.name, image)
    return out
