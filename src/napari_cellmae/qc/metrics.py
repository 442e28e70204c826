"""Classic image-quality metrics as CellProfiler's MeasureImageQuality computes them (every metric
matches values CellProfiler's own code produced on the real images to <= 1e-7 relative:
tests/test_qc_fidelity.py, docs/qc.md).

Every function takes a stack of images ``(C, H, W)`` (one image per channel; a 2-D image is one
channel) and returns one value per image, computed for all channels at once (one FFT call, one
``bincount`` per statistic). Integer images are first scaled to [0, 1] as CellProfiler's default
loader does: divided by the file's TIFF ``MaxSampleValue`` when it carries one (12-bit data in a
16-bit TIFF: / 4095; read it with :func:`file_max_value` and pass ``max_value``), else by the
dtype's maximum (uint8 / 255, uint16 / 65535); float images are used as they are.

Definitions (x = the pixels of one image, N = |x|, μ = mean(x)):

- ``FocusScore`` = var(x) / μ (population variance); 0 when μ ≤ 0.
- ``LocalFocusScore_N``: the image is cut into ⌈H/N⌉ × ⌈W/N⌉ tiles (pixel row i goes to tile
  ⌊i·⌈H/N⌉/H⌋); per tile v_t = var_t / μ_t (tiles with μ_t = 0 skipped); the score is
  var(v_t) / median(v_t) (CellProfiler's code, although its manual says "mean"); 0 when the
  median is not positive.
- ``Correlation_N``: Haralick's correlation (H3) of the grey-level co-occurrence matrix at offset
  (0, N) (each pixel and the one N columns to its right), after rescaling the image to [0, 1] by
  its own min and max and quantising to 8 levels (``clip(x // (1/8), 0, 7)``). Higher = blurrier.
- ``PowerLogLogSlope``: the image divided by median(|x − μ|) (when not constant), P = |FFT2(x −
  μ)|²; ring r = ⌊d⌋ + 1 with d the distance from the DC term folded as CellProfiler folds it
  (row distance min(i, H−1−i), column distance min(j, W−1−j)); S(r) = the SUM of P over ring r for
  r = 2 … ⌊min(H, W)/8⌋ − 1 (rings whose magnitude sum is 0 dropped); the slope of the
  least-squares line of log S(r) against log r (finite values only). 0 for a constant image.
  White noise gives +1, blur makes it more negative, empty or noise-dominated fields go towards
  0 or above.
- ``PercentMaximal`` / ``PercentMinimal`` = 100·#{x = max(x)}/N and 100·#{x = min(x)}/N (the
  image's own extremes, not the bit-depth ceiling).
- Intensities: ``TotalIntensity``, ``MeanIntensity``, ``MedianIntensity``, ``StdIntensity``
  (ddof 0), ``MADIntensity`` = median(|x − median(x)|) (no 1.4826 factor), ``MinIntensity``,
  ``MaxIntensity``, ``LowerQuartileIntensity``, ``UpperQuartileIntensity``.
- ``ThresholdOtsu``: MeasureImageQuality's two-class Otsu threshold with weighted variance
  (CellProfiler's ``ThresholdOtsu_<image>_2W``), computed as centrosome's ``get_otsu_threshold``:
  the float32 pixels (negative ones dropped) are clipped below at min + (max − min)/256, log
  transformed and stretched to [0, 1]; of the sorted values, every ⌊N/256⌋-th is a candidate and
  the one minimising the weighted within-class variance (sample variances of the running sums)
  wins, averaged with its two neighbouring candidates; the result is transformed back.

:func:`measure` also returns the plate-independent cues of :mod:`.cues` (illumination, bright
objects, clipping), which are ours, not CellProfiler's (``metric_names(cues=False)`` lists only
CellProfiler's). Masks are not supported: every pixel counts. :func:`measure_field` returns one
row per channel with ``QC_``-prefixed columns; a 512×512 image takes about 25 ms on one CPU core
(``benchmarks/eval_qc.py`` prints the measured time).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cues import cues

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DEFAULT_SCALES: tuple[int, ...] = (20,)
CORRELATION_LEVELS = 8

INTENSITY_COLUMNS = (
    "TotalIntensity",
    "MeanIntensity",
    "MedianIntensity",
    "StdIntensity",
    "MADIntensity",
    "MinIntensity",
    "MaxIntensity",
    "LowerQuartileIntensity",
    "UpperQuartileIntensity",
)


def metric_names(scales: Sequence[int] = DEFAULT_SCALES, cues: bool = True) -> list[str]:
    """Metric names (without the ``QC_`` prefix) in column order: CellProfiler's, then (``cues``)
    the plate-independent cues of :mod:`.cues`, which are ours."""
    from .cues import CUE_NAMES

    names = ["FocusScore"]
    names += [f"LocalFocusScore_{n}" for n in scales]
    names += [f"Correlation_{n}" for n in scales]
    names += ["PowerLogLogSlope", "PercentMaximal", "PercentMinimal"]
    return [*names, *INTENSITY_COLUMNS, "ThresholdOtsu", *(CUE_NAMES if cues else ())]


MaxValue = float | Sequence[float | None] | None  # one for all channels, or one per channel


def file_max_value(path: str | os.PathLike | None) -> float | None:
    """The TIFF ``MaxSampleValue`` tag of ``path``'s first page, or None (no tag, not a TIFF,
    unreadable: the dtype's range applies).

    CellProfiler's default loader (python-bioformats ``ImageReader.read(rescale=False,
    wants_max_intensity=True)``) divides by this tag when the file has one, so 12-bit data saved
    in 16-bit TIFFs (``MaxSampleValue`` 4095) is scaled to [0, 1] by 4095, not 65535. The one
    place the QC path reads it: pass the value as ``max_value`` to :func:`measure`.
    """
    if path is None or str(path) == "" or Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tag = tif.pages.first.tags.get("MaxSampleValue")
            value = tag.value if tag is not None else None
    except Exception:  # the reader reports a broken file; here it only means "no tag"
        return None
    if isinstance(value, (tuple, list, np.ndarray)):  # one value per sample: take the first
        value = value[0] if len(value) else None
    if value is None or not np.isfinite(float(value)) or float(value) <= 0:
        return None
    return float(value)


def to_unit(image: np.ndarray, max_value: float | None = None) -> np.ndarray:
    """float64 copy scaled as CellProfiler loads images: integers / ``max_value`` (the file's
    ``MaxSampleValue``) or / the dtype's maximum when None; floats as is."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        top = float(np.iinfo(arr.dtype).max) if max_value is None else float(max_value)
        if not np.isfinite(top) or top <= 0:
            raise ValueError(f"max_value must be a positive number, got {max_value}.")
        return arr.astype(np.float64) / top
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float64, copy=False)  # never written to: no copy needed
    raise ValueError(f"Expected a numeric image, got dtype {arr.dtype}.")


def _stack(images: np.ndarray, max_value: MaxValue = None) -> np.ndarray:
    """(H, W) or (C, H, W) -> (C, H, W) float64 in CellProfiler's scaling; ``max_value``: one
    value for all channels or one per channel (None: the dtype's range)."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape[1:]) < 1:
        raise ValueError(f"Expected images (C, H, W) or (H, W), got shape {arr.shape}.")
    if max_value is None or np.ndim(max_value) == 0:
        x = to_unit(arr, max_value)  # type: ignore[arg-type]
    else:
        tops = list(max_value)  # type: ignore[arg-type]
        if len(tops) != len(arr):
            raise ValueError(f"{len(tops)} max_value entries for {len(arr)} channels.")
        x = np.stack([to_unit(a, t) for a, t in zip(arr, tops)])
    if not np.isfinite(x).all():
        raise ValueError("Images contain NaN or inf values: replace them first (np.nan_to_num).")
    return x


def focus_score(images: np.ndarray) -> np.ndarray:
    """var(x) / mean(x) per image (0 when the mean is not positive) -> (C,)."""
    x = _stack(images)
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(axis=1)
    var = flat.var(axis=1)
    return np.where(mean > 0, var / np.where(mean > 0, mean, 1.0), 0.0)


def _tile_rows_cols(shape: tuple[int, int], scale: int) -> tuple[np.ndarray, np.ndarray]:
    """CellProfiler's tiles for spatial scale ``scale``: the tile row of every pixel row (H,)
    and the tile column of every pixel column (W,), ⌈H/scale⌉ × ⌈W/scale⌉ tiles."""
    h, w = shape
    m, n = (h + scale - 1) // scale, (w + scale - 1) // scale
    rows = (np.arange(h, dtype=np.float64) * m / h).astype(np.int64)
    cols = (np.arange(w, dtype=np.float64) * n / w).astype(np.int64)
    return rows, cols


def tile_grid(shape: tuple[int, int], scale: int) -> tuple[np.ndarray, int]:
    """CellProfiler's tile labels (H, W) for spatial scale ``scale`` and the number of tiles."""
    rows, cols = _tile_rows_cols(shape, scale)
    m, n = int(rows[-1]) + 1, int(cols[-1]) + 1
    return rows[:, None] * n + cols[None, :], m * n


def local_focus_score(images: np.ndarray, scale: int = 20) -> np.ndarray:
    """var(v_t) / median(v_t) over tiles t of about ``scale`` px, v_t = var_t / mean_t -> (C,)."""
    if int(scale) < 1:
        raise ValueError(f"scale must be a positive number of pixels, got {scale}.")
    x = _stack(images)
    # CellProfiler's tiles (tile_grid) are rectangles of whole pixel rows and columns: sum them
    # with reduceat, one band of tile rows at a time (no full-size label or difference arrays)
    h, w = x.shape[1:]
    m, n = (h + scale - 1) // scale, (w + scale - 1) // scale
    rows, cols = _tile_rows_cols((h, w), scale)
    r0 = np.searchsorted(rows, np.arange(m))  # first pixel row of each tile row
    c0 = np.searchsorted(cols, np.arange(n))
    nr, nc = np.diff(np.append(r0, h)), np.diff(np.append(c0, w))
    counts = (nr[:, None] * nc[None, :]).ravel().astype(np.float64)  # (T,)
    c = x.shape[0]
    means = np.empty((c, m, n))
    sums = np.empty((c, m, n))
    for t in range(m):
        band = x[:, r0[t] : r0[t] + nr[t]]  # (C, rows, W)
        means[:, t] = np.add.reduceat(band.sum(axis=1), c0, axis=1) / (nr[t] * nc)
        sq = (band - np.repeat(means[:, t], nc, axis=1)[:, None, :]) ** 2
        sums[:, t] = np.add.reduceat(sq.sum(axis=1), c0, axis=1)
    means, sums = means.reshape(c, -1), sums.reshape(c, -1)
    out = np.zeros(x.shape[0])
    for c in range(x.shape[0]):
        keep = (means[c] != 0) & np.isfinite(means[c])
        if not keep.any():
            continue
        v = sums[c, keep] / (counts[keep] * means[c, keep])
        med = np.median(v)
        if np.isfinite(med) and med > 0:
            out[c] = np.var(v) / med
    return out


def quantize(images: np.ndarray, levels: int = CORRELATION_LEVELS) -> np.ndarray:
    """Rescale each image to [0, 1] by its own min/max and quantise: ``clip(x // (1/levels),
    0, levels - 1)`` -> (C, H, W) int64 (a constant image becomes all 0)."""
    x = _stack(images)
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    divisor = np.where(hi > lo, hi - lo, 1.0)
    normalized = (x - lo) / divisor
    return np.clip(np.floor_divide(normalized, 1.0 / levels), 0, levels - 1).astype(np.int64)


def cooccurrence(quantized: np.ndarray, scale: int, levels: int = CORRELATION_LEVELS) -> np.ndarray:
    """Normalised co-occurrence matrices at offset (0, scale): (C, H, W) -> (C, levels, levels),
    P[c, i, j] = fraction of pixel pairs (y, x), (y, x + scale) with levels (i, j)."""
    c, _, w = quantized.shape
    if w <= scale:
        return np.zeros((c, levels, levels))
    a, b = quantized[:, :, :-scale], quantized[:, :, scale:]
    idx = (np.arange(c)[:, None, None] * levels * levels + a * levels + b).ravel()
    counts = np.bincount(idx, minlength=c * levels * levels).reshape(c, levels, levels)
    return counts / float(a[0].size)


def haralick_correlation(p: np.ndarray) -> np.ndarray:
    """Haralick H3 of co-occurrence matrices (C, L, L) -> (C,); 0 where a marginal is constant."""
    levels = np.arange(1, p.shape[-1] + 1, dtype=np.float64)  # centrosome counts levels from 1
    px, py = p.sum(axis=2), p.sum(axis=1)  # (C, L)
    mux, muy = px @ levels, py @ levels
    sx = np.sqrt(((levels[None] - mux[:, None]) ** 2 * px).sum(axis=1))
    sy = np.sqrt(((levels[None] - muy[:, None]) ** 2 * py).sum(axis=1))
    summed = np.einsum("i,j,cij->c", levels, levels, p)
    denom = sx * sy
    return np.where(denom > 0, (summed - mux * muy) / np.where(denom > 0, denom, 1.0), 0.0)


def correlation(images: np.ndarray, scale: int = 20) -> np.ndarray:
    """Haralick correlation at offset (0, ``scale``) on 8 grey levels -> (C,)."""
    if int(scale) < 1:
        raise ValueError(f"scale must be a positive number of pixels, got {scale}.")
    return haralick_correlation(cooccurrence(quantize(images), int(scale)))


def power_log_log_slope(images: np.ndarray) -> np.ndarray:
    """Slope of log(radial power sum) against log(radius) -> (C,); 0 for constant images.

    CellProfiler divides the image by median(|x − μ|) first; that only shifts log S(r) and
    leaves the slope unchanged, so the cheaper standard deviation is used to keep the float32
    FFT well scaled.
    """
    import scipy.fft

    x = _stack(images)
    c, h, w = x.shape
    out = np.zeros(c)
    radii = np.arange(2, int(np.floor(min(h, w) / 8.0)))
    if len(radii) == 0:
        return out
    flat = x.reshape(c, -1)
    constant = flat.max(axis=1) == flat.min(axis=1)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    scale = np.where(std > 0, std, 1.0)
    n = len(radii)
    mag_sum, pow_sum = np.zeros((c, n)), np.zeros((c, n))
    # only rows and columns within radii[-1] of an edge hold the rings (4 corner discs); the ring
    # labels (centrosome ``rps``: ⌊distance from DC, wrapped⌋ + 1) are made one band of rows at a
    # time (memory: the spectrum only)
    dj = np.minimum(np.arange(w), w - 1 - np.arange(w)).astype(np.float64) ** 2
    near = np.flatnonzero(np.minimum(np.arange(h), h - 1 - np.arange(h)) < radii[-1])
    for ch in range(c):
        spectrum = np.zeros((h, w), np.complex64)  # filled (in bands) and transformed in place
        step = max(1, _BAND_PIXELS // w)
        for r in range(0, h, step):
            spectrum.real[r : r + step] = (x[ch, r : r + step] - mean[ch]) / scale[ch]
        spectrum = scipy.fft.fft2(spectrum, workers=-1, overwrite_x=True)
        for start in range(0, len(near), 256):
            band = near[start : start + 256]
            di = np.minimum(band, h - 1 - band).astype(np.float64) ** 2
            labels = np.floor(np.sqrt(di[:, None] + dj[None, :])).astype(np.int64) + 1
            inside = (labels >= radii[0]) & (labels <= radii[-1])
            ring = labels[inside] - radii[0]  # 0 .. len(radii)-1
            mag = np.abs(spectrum[band][inside]).astype(np.float64)
            mag_sum[ch] += np.bincount(ring, weights=mag, minlength=n)
            pow_sum[ch] += np.bincount(ring, weights=mag * mag, minlength=n)
        del spectrum
    log_r = np.log(radii.astype(np.float64))
    for i in range(c):
        if constant[i] or mag_sum[i].sum() <= 0:
            continue
        valid = mag_sum[i] > 0
        with np.errstate(divide="ignore"):
            log_p = np.log(pow_sum[i, valid])
        finite = np.isfinite(log_p)
        if finite.sum() <= 1:
            continue
        a = np.stack([log_r[valid][finite], np.ones(int(finite.sum()))], axis=1)
        out[i] = np.linalg.lstsq(a, log_p[finite], rcond=None)[0][0]
    return out


def percent_maximal(images: np.ndarray) -> np.ndarray:
    """100 × fraction of pixels equal to the image's maximum -> (C,)."""
    flat = _stack(images)
    flat = flat.reshape(flat.shape[0], -1)
    return 100.0 * (flat == flat.max(axis=1, keepdims=True)).mean(axis=1)


def percent_minimal(images: np.ndarray) -> np.ndarray:
    """100 × fraction of pixels equal to the image's minimum -> (C,)."""
    flat = _stack(images)
    flat = flat.reshape(flat.shape[0], -1)
    return 100.0 * (flat == flat.min(axis=1, keepdims=True)).mean(axis=1)


def intensity_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Total, mean, median, std (ddof 0), MAD (no 1.4826), min, max, quartiles -> {name: (C,)}."""
    flat = _stack(images)
    flat = flat.reshape(flat.shape[0], -1)
    q1, median, q3 = np.percentile(flat, [25, 50, 75], axis=1)
    deviation = flat - median[:, None]  # one full-size temporary, reused in place
    np.abs(deviation, out=deviation)
    mad = np.median(deviation, axis=1, overwrite_input=True)
    del deviation
    return {
        "TotalIntensity": flat.sum(axis=1),
        "MeanIntensity": flat.mean(axis=1),
        "MedianIntensity": median,
        "StdIntensity": flat.std(axis=1),
        "MADIntensity": mad,
        "MinIntensity": flat.min(axis=1),
        "MaxIntensity": flat.max(axis=1),
        "LowerQuartileIntensity": q1,
        "UpperQuartileIntensity": q3,
    }


def _otsu_log(values: np.ndarray, counts: np.ndarray, bins: int = 256) -> float:
    """centrosome ``get_otsu_threshold(two_class_otsu=True, use_weighted_variance=True)`` of one
    image given as its distinct float32 pixel values (sorted, ≥ 0) and their counts.

    As centrosome: clip below at min + (max − min)/256, log, stretch to [0, 1]; of the N sorted
    pixels, every ⌊N/256⌋-th split is a candidate, scored by the sum of squared deviations below
    it plus the sample variance above it × the count above it (centrosome's running variances);
    the threshold is the mean of the candidates on either side of the best split, transformed
    back. The running sums are taken over the distinct values with their counts, so a 16-bit
    image costs a histogram, not a sort of its pixels. Adapted from CellProfiler/centrosome
    threshold.py and otsu.py (BSD-3-Clause).
    """
    n = int(counts.sum())
    if n == 0:
        return 1.0
    lo, hi = values[0], values[-1]
    noise_min = lo + (hi - lo) / np.float32(256.0) + np.finfo(np.float32).eps  # float32
    logged = np.log(np.maximum(values, noise_min))  # float32, as centrosome's log_transform
    log_min, log_max = float(logged[0]), float(logged[-1])
    u = logged.astype(np.float64)
    if log_max > log_min:
        u = (u - log_min) / (log_max - log_min)
    elif log_min < 0:
        u = np.zeros_like(u)
    elif log_min > 1:
        u = np.ones_like(u)
    if n == 1:
        t = float(u[0])
    else:
        step = n // min(bins, n)
        split = np.arange(0, n - 1, step)  # the low class is pixels 0 … split
        ends = np.cumsum(counts)  # pixel positions < ends[j] hold values ≤ u[j]
        s1, s2 = np.cumsum(counts * u), np.cumsum(counts * u * u)

        def prefix(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Sums of x and x² over the first ``size`` sorted pixels (size ≥ 1)."""
            j = np.searchsorted(ends, size, side="left")  # pixel size−1 has value u[j]
            before = np.where(j > 0, ends[j - 1], 0)
            extra = size - before
            a = np.where(j > 0, s1[j - 1], 0.0) + extra * u[j]
            b = np.where(j > 0, s2[j - 1], 0.0) + extra * u[j] * u[j]
            return a, b

        size_low = split + 1
        a1, a2 = prefix(size_low)
        size_high = n - size_low
        b1, b2 = s1[-1] - a1, s2[-1] - a2
        ssd_low = np.maximum(a2 - a1 * a1 / size_low, 0.0)
        ssd_high = np.maximum(b2 - b1 * b1 / size_high, 0.0)
        factor = np.where(size_high > 1, size_high / np.maximum(size_high - 1, 1), 0.0)
        score = ssd_low + ssd_high * factor
        thresholds = u[np.searchsorted(ends, split + 1, side="right")]  # pixel split + 1
        k = int(np.flatnonzero(score == score.min())[0])
        t = float((thresholds[max(k - 1, 0)] + thresholds[min(k + 1, len(thresholds) - 1)]) / 2)
    return float(np.exp(t * (log_max - log_min) + log_min))


def _distinct(image: np.ndarray, top: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct non-negative float32 pixel values of one image as CellProfiler holds it (scaled
    like :func:`to_unit`, cast to float32), sorted, with their counts; integer images of up to
    16 bits by a histogram of the raw values."""
    if image.dtype in (np.uint8, np.uint16):
        counts = np.bincount(image.ravel())
        raw = np.flatnonzero(counts)
        scale = float(np.iinfo(image.dtype).max) if top is None else float(top)
        return (raw / scale).astype(np.float32), counts[raw]
    x = to_unit(image, top).astype(np.float32).ravel()
    values, counts = np.unique(x[x >= 0], return_counts=True)
    return values, counts


def _tops(n: int, max_value: MaxValue) -> list[float | None]:
    if max_value is None or np.ndim(max_value) == 0:
        return [max_value] * n  # type: ignore[list-item]
    return list(max_value)  # type: ignore[arg-type]


def threshold_otsu(images: np.ndarray, max_value: MaxValue = None) -> np.ndarray:
    """MeasureImageQuality's ``ThresholdOtsu`` (two classes, weighted variance) per image -> (C,).

    As CellProfiler: the image (scaled to [0, 1] like :func:`to_unit`) cast to float32, then
    centrosome's ``get_otsu_threshold``, which thresholds log intensities (see the module doc).
    A constant image gives its own value (to float32 precision).
    """
    arr = np.asarray(images)
    arr = arr[None] if arr.ndim == 2 else arr
    _stack(arr[:, :1, :1] if arr.ndim == 3 else arr, max_value)  # checks shape, dtype, max_value
    if not np.isfinite(arr).all():
        raise ValueError("Images contain NaN or inf values: replace them first (np.nan_to_num).")
    tops = _tops(len(arr), max_value)
    return np.array([_otsu_log(*_distinct(arr[c], tops[c])) for c in range(len(arr))])


def measure(
    images: np.ndarray,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_value: MaxValue = None,
) -> dict[str, np.ndarray]:
    """Every metric of :func:`metric_names` for each image -> {name: (C,)}.

    ``max_value``: what integer images are divided by, one value or one per channel (the files'
    :func:`file_max_value`); None = the dtype's maximum.
    """
    arr = np.asarray(images)
    if arr.ndim == 3 and len(arr) > 1:  # one channel at a time: memory of one float64 image
        _stack(arr[:, :1, :1], max_value)  # checks shape, dtype and max_value first
        tops = _tops(len(arr), max_value)
        per = [measure(arr[i : i + 1], scales, tops[i]) for i in range(len(arr))]
        return {k: np.concatenate([p[k] for p in per]) for k in metric_names(scales)}
    x = _stack(arr, max_value)  # convert once: the functions below take float64 unchanged
    out: dict[str, np.ndarray] = {"FocusScore": focus_score(x)}
    for n in scales:
        out[f"LocalFocusScore_{n}"] = local_focus_score(x, n)
    q = _quantize_uint8(x)
    for n in scales:
        out[f"Correlation_{n}"] = haralick_correlation(_cooccurrence_banded(q, int(n)))
    del q
    out["PowerLogLogSlope"] = power_log_log_slope(x)
    out["PercentMaximal"] = percent_maximal(x)
    out["PercentMinimal"] = percent_minimal(x)
    out.update(intensity_stats(x))
    out["ThresholdOtsu"] = threshold_otsu(arr, max_value)  # from the raw values: a histogram
    out.update(cues(x, out["ThresholdOtsu"]))  # ours, not CellProfiler's: see qc/cues.py
    return {k: out[k] for k in metric_names(scales)}


_BAND_PIXELS = 1 << 22  # pixels per band when a large image is processed in bands (4 M)


def _quantize_uint8(x: np.ndarray, levels: int = CORRELATION_LEVELS) -> np.ndarray:
    """:func:`quantize` of a float64 stack as uint8, one band of rows at a time (the same
    arithmetic per pixel, so the same levels; 1 byte per pixel instead of 8 plus temporaries)."""
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    divisor = np.where(hi > lo, hi - lo, 1.0)
    out = np.empty(x.shape, np.uint8)
    step = max(1, _BAND_PIXELS // max(1, x.shape[2]))
    for r in range(0, x.shape[1], step):
        normalized = (x[:, r : r + step] - lo) / divisor
        out[:, r : r + step] = np.clip(np.floor_divide(normalized, 1.0 / levels), 0, levels - 1)
    return out


def _cooccurrence_banded(
    quantized: np.ndarray, scale: int, levels: int = CORRELATION_LEVELS
) -> np.ndarray:
    """:func:`cooccurrence` counted one band of rows at a time (same counts, bounded memory)."""
    c, h, w = quantized.shape
    if w <= scale:
        return np.zeros((c, levels, levels))
    counts = np.zeros(c * levels * levels, np.int64)
    step = max(1, _BAND_PIXELS // w)
    for r in range(0, h, step):
        band = quantized[:, r : r + step].astype(np.int64)
        a, b = band[:, :, :-scale], band[:, :, scale:]
        idx = (np.arange(c)[:, None, None] * levels * levels + a * levels + b).ravel()
        counts += np.bincount(idx, minlength=c * levels * levels)
    return counts.reshape(c, levels, levels) / float(h * (w - scale))


def measure_field(
    field: np.ndarray,
    channel_names: Sequence[str] | None = None,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_value: MaxValue = None,
) -> pd.DataFrame:
    """One row per channel of ``field`` (C, H, W): ``channel`` plus ``QC_<metric>`` columns
    (``max_value`` as :func:`measure`)."""
    import pandas as pd

    arr = np.asarray(field)
    if arr.ndim == 2:
        arr = arr[None]
    values = measure(arr, scales, max_value)
    names = list(channel_names) if channel_names is not None else [str(i) for i in range(len(arr))]
    if len(names) != len(arr):
        raise ValueError(f"{len(names)} channel names for a field with {len(arr)} channels.")
    df = pd.DataFrame({f"QC_{k}": v for k, v in values.items()})
    df.insert(0, "channel", names)
    return df
