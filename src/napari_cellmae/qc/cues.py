"""Plate-independent physical cues of one image, beside CellProfiler's metrics.

CellProfiler's MeasureImageQuality metrics (:mod:`.metrics`) say little about three artefacts that
a QC head must recognise on a microscope it has never seen, and the classic z-scores that do see
them assume that most of the plate is good. These cues read each image alone, in the same [0, 1]
scaling as the metrics (integers divided by the file's ``MaxSampleValue`` or the dtype's maximum),
and are scale-invariant except where they compare with that ceiling on purpose:

*Illumination* (uneven background, vignetting). The image is cut into an 8 × 8 grid of blocks; per
block the 10th percentile (the background under the cells) and the 95th (the bright level), and a
least-squares quadratic surface in (y, x) through each 8 × 8 map (a smooth illumination field,
which cell density is not):

- ``BackgroundRange``: (max − min) of the block backgrounds / the image's dynamic range (99.9th −
  0.1th percentile);
- ``BackgroundSmoothAmplitude``: the same for the fitted surface;
- ``BackgroundSmoothFraction``: the share of the block backgrounds' variance the surface explains;
- ``BackgroundRatio``: 95th / 5th percentile of the block backgrounds above the black level (0.1th
  percentile), each plus 10⁻⁴ of the dynamic range (multiplicative shading with an offset);
- ``ForegroundSmoothAmplitude`` / ``ForegroundSmoothFraction``: the fitted surface's range over the
  median bright level above black, and the share of variance explained, of the bright levels.

*Bright objects* (debris, fibres). Foreground: pixels above CellProfiler's ``ThresholdOtsu``
(:func:`.metrics.threshold_otsu`, Otsu on log intensities, which a few very bright objects do not
pull up as a linear Otsu does); its median above black (on at most ~1 M of its pixels, through a
stride) is the cells' typical brightness B:

- ``BrightFraction3`` / ``BrightFraction6``: the fraction of pixels more than 3 × / 6 × B above
  black (debris is several times brighter than any cell);
- ``ForegroundFraction``: the fraction of foreground pixels;
- ``RangeOverForeground``: the dynamic range / B.

*Clipping* (over-exposure):

- ``PercentCeiling``: 100 × the fraction of pixels at the ceiling (1.0 in this scaling: the
  camera's or file's maximum, which an image of the cells alone rarely reaches);
- ``MaxPlateauFraction``: the largest 8-connected patch of pixels at the image's maximum, as a
  fraction of the image (clipped regions are plateaus; a sharp maximum is one pixel);
- ``MaxInPlateaus``: the share of the pixels at the maximum that lie in patches of at least 4.

The black level, the dynamic range and B are taken on at most 2¹⁸ of the pixels (every k-th
row and column). Images over 4 M pixels are read through a regular stride (every k-th row and
column, k the smallest that leaves at most 4 M pixels): percentiles and fractions of a strided
sample estimate the full image's, and the memory stays that of the sample. The cues are ours,
not CellProfiler's; their value to the default head is measured leave-one-source-out in docs/qc.md.
"""

from __future__ import annotations

import numpy as np

CUE_NAMES: tuple[str, ...] = (
    "BackgroundRange",
    "BackgroundSmoothAmplitude",
    "BackgroundSmoothFraction",
    "BackgroundRatio",
    "ForegroundSmoothAmplitude",
    "ForegroundSmoothFraction",
    "BrightFraction3",
    "BrightFraction6",
    "ForegroundFraction",
    "RangeOverForeground",
    "PercentCeiling",
    "MaxPlateauFraction",
    "MaxInPlateaus",
)
GRID = 8  # blocks per side of the illumination maps
SAMPLE_PIXELS = 1 << 22  # larger images are read through a stride
FEW_PIXELS = 1 << 18  # the black level, the dynamic range and B are taken on at most these
_TINY = 1e-12


def _sample(x: np.ndarray, budget: int = SAMPLE_PIXELS) -> np.ndarray:
    """``x`` through the smallest regular stride (every k-th row and column) that leaves at
    most ``budget`` pixels (a view, no copy)."""
    step = int(np.ceil(np.sqrt(x.size / budget))) if x.size > budget else 1
    return x[::step, ::step] if step > 1 else x


def _block_percentiles(x: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """(len(qs), GRID, GRID) percentiles of each block (blocks of unequal size where H or W is not
    a multiple of GRID; an image smaller than the grid gives fewer, repeated blocks)."""
    h, w = x.shape
    rows = np.linspace(0, h, GRID + 1).astype(int)
    cols = np.linspace(0, w, GRID + 1).astype(int)
    out = np.empty((len(qs), GRID, GRID))
    for i in range(GRID):
        r0, r1 = rows[i], max(rows[i + 1], rows[i] + 1)
        for j in range(GRID):
            c0, c1 = cols[j], max(cols[j + 1], cols[j] + 1)
            block = x[min(r0, h - 1) : r1, min(c0, w - 1) : c1]
            out[:, i, j] = np.percentile(block, qs)
    return out


def _quadratic_fit(m: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares quadratic surface through a GRID × GRID map: (fitted map, share of the map's
    variance it explains; 0 for a flat map)."""
    yy, xx = np.meshgrid(
        np.linspace(-1, 1, m.shape[0]), np.linspace(-1, 1, m.shape[1]), indexing="ij"
    )
    a = np.stack([np.ones_like(yy), yy, xx, yy * yy, xx * xx, yy * xx], -1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(a, m.ravel(), rcond=None)
    fit = (a @ coef).reshape(m.shape)
    total = float(m.var())
    explained = 1.0 - float((m - fit).var()) / total if total > _TINY else 0.0
    return fit, explained


def _plateaus(x: np.ndarray) -> tuple[float, float]:
    """(largest 8-connected patch at the maximum / pixels, share of max pixels in patches >= 4)."""
    from scipy import ndimage as ndi

    at_max = x == x.max()
    count = int(np.count_nonzero(at_max))
    if count == 1:  # a sharp maximum: no plateau
        return 1.0 / x.size, 0.0
    labels = np.empty(x.shape, np.int32)
    n = ndi.label(at_max, structure=np.ones((3, 3), bool), output=labels)
    if n == 0:
        return 0.0, 0.0
    sizes = np.bincount(labels.ravel())[1:]
    return float(sizes.max() / x.size), float(sizes[sizes >= 4].sum() / max(count, 1))


def image_cues(image: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Every cue of :data:`CUE_NAMES` of one (H, W) image already in [0, 1] scaling (see the
    module docstring); ``threshold``: its ``ThresholdOtsu`` when already measured."""
    x = _sample(np.asarray(image, np.float64))
    few = _sample(x, FEW_PIXELS)  # the percentiles and the median copy what they read
    black, bright = np.percentile(few, [0.1, 99.9])
    span = max(float(bright - black), _TINY)
    background, top = _block_percentiles(x, (10.0, 95.0))
    bg_fit, bg_explained = _quadratic_fit(background)
    top_fit, top_explained = _quadratic_fit(top)
    bg_lo, bg_hi = np.percentile(background, [5, 95])
    if threshold is None:
        from .metrics import threshold_otsu  # here: metrics imports this module

        threshold = float(threshold_otsu(x[None])[0])
    cut = float(threshold) if bright > black else float(bright)
    foreground = x > cut
    fg_share = float(foreground.mean())
    del foreground
    values = few[few > cut]
    level = float(np.median(values)) if values.size else float(bright)
    cells = max(level - float(black), _TINY)
    plateau, in_plateaus = _plateaus(x)
    return {
        "BackgroundRange": float(background.max() - background.min()) / span,
        "BackgroundSmoothAmplitude": float(bg_fit.max() - bg_fit.min()) / span,
        "BackgroundSmoothFraction": bg_explained,
        "BackgroundRatio": float((bg_hi - black + 1e-4 * span) / (bg_lo - black + 1e-4 * span)),
        "ForegroundSmoothAmplitude": float(top_fit.max() - top_fit.min())
        / max(float(np.median(top)) - float(black), _TINY),
        "ForegroundSmoothFraction": top_explained,
        "BrightFraction3": float(np.count_nonzero(x > black + 3 * cells)) / x.size,
        "BrightFraction6": float(np.count_nonzero(x > black + 6 * cells)) / x.size,
        "ForegroundFraction": fg_share,
        "RangeOverForeground": span / cells,
        "PercentCeiling": 100.0 * float(np.mean(x >= 1.0)),
        "MaxPlateauFraction": plateau,
        "MaxInPlateaus": in_plateaus,
    }


def cues(images: np.ndarray, thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`image_cues` of each image of a (C, H, W) stack in [0, 1] scaling -> {name: (C,)};
    ``thresholds``: their ``ThresholdOtsu`` when already measured."""
    arr = np.asarray(images)
    tops = [None] * len(arr) if thresholds is None else list(thresholds)
    per = [image_cues(im, t) for im, t in zip(arr, tops)]
    return {name: np.array([p[name] for p in per], np.float64) for name in CUE_NAMES}
