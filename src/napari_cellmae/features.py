"""Classic per-field image statistics: the baseline every embedding is compared against.

For each channel: intensity mean, standard deviation and 5th/50th/95th percentiles, mean gradient
magnitude (Sobel), the spread of the Laplacian (fine texture), the fraction of pixels above the
channel's Otsu threshold (how much of the field the stain covers), and four Haralick texture
measures (contrast, homogeneity, correlation, energy of the grey-level co-occurrence matrix at
distance 1 px averaged over four directions, 32 grey levels between the 1st and 99.5th
percentiles). Between every two channels: the Pearson correlation of their pixels.

The statistics are computed on every second pixel in each direction (a 512×512 field costs a few
milliseconds per channel), so they can run next to the model without slowing it much. Column
names use channel positions, ``feat_c0_mean`` … ``feat_c0_c1_corr``, so plates whose channels
carry different names still line up; the channel names are saved in the run's ``config.json``.

numpy, scipy and scikit-image only (no torch).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

PREFIX = "feat_"
CHANNEL_STATS = (
    "mean",
    "std",
    "p05",
    "p50",
    "p95",
    "gradient",
    "laplacian",
    "coverage",
    "contrast",
    "homogeneity",
    "correlation",
    "energy",
)
GLCM_LEVELS = 32
STEP = 2  # sub-sampling stride of the statistics (pixels)


def feature_names(n_channels: int) -> list[str]:
    """Column names of :func:`field_features` for a field of ``n_channels`` channels."""
    names = [f"{PREFIX}c{c}_{s}" for c in range(n_channels) for s in CHANNEL_STATS]
    names += [
        f"{PREFIX}c{a}_c{b}_corr" for a in range(n_channels) for b in range(a + 1, n_channels)
    ]
    return names


def _haralick(image: np.ndarray, lo: float, hi: float) -> tuple[float, float, float, float]:
    """Contrast, homogeneity, correlation and energy of ``image`` quantised to GLCM_LEVELS."""
    from skimage.feature import graycomatrix, graycoprops

    if not hi > lo:
        return 0.0, 1.0, 1.0, 1.0  # a flat channel: one grey level
    q = np.clip((image - lo) * (GLCM_LEVELS / (hi - lo)), 0, GLCM_LEVELS - 1).astype(np.uint8)
    glcm = graycomatrix(
        q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], GLCM_LEVELS, symmetric=True, normed=True
    )
    out = []
    for prop in ("contrast", "homogeneity", "correlation", "energy"):
        value = graycoprops(glcm, prop).mean()
        out.append(float(np.nan_to_num(value, nan=1.0)))  # correlation of a flat GLCM is NaN
    return out[0], out[1], out[2], out[3]


def _otsu_coverage(image: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if image.min() == image.max():
        return 0.0
    return float((image > threshold_otsu(image)).mean())


def channel_statistics(image: np.ndarray) -> list[float]:
    """The :data:`CHANNEL_STATS` of one 2-D channel (already sub-sampled, float32)."""
    p05, p50, p95, p01, p995 = np.percentile(image, [5, 50, 95, 1, 99.5])
    gradient = np.hypot(ndi.sobel(image, 0), ndi.sobel(image, 1)).mean()
    laplacian = ndi.laplace(image).std()
    return [
        float(image.mean()),
        float(image.std()),
        float(p05),
        float(p50),
        float(p95),
        float(gradient),
        float(laplacian),
        _otsu_coverage(image),
        *_haralick(image, float(p01), float(p995)),
    ]


def field_features(field: np.ndarray) -> np.ndarray:
    """Baseline statistics of one field.

    Parameters
    ----------
    field : np.ndarray
        (C, H, W), any real dtype (values are used as they are: raw camera counts).

    Returns
    -------
    np.ndarray
        float32 (F,), in the order of :func:`feature_names` ``(C)``.
    """
    arr = np.asarray(field)
    if arr.ndim != 3:
        raise ValueError(f"Expected a field (C, H, W), got shape {arr.shape}.")
    sub = arr[:, ::STEP, ::STEP].astype(np.float32)  # (C, H/2, W/2)
    values: list[float] = []
    for c in range(sub.shape[0]):
        values += channel_statistics(sub[c])
    flat = sub.reshape(sub.shape[0], -1)
    if sub.shape[0] > 1:
        centred = flat - flat.mean(axis=1, keepdims=True)
        norms = np.sqrt((centred.astype(np.float64) ** 2).sum(axis=1))
        gram = centred.astype(np.float64) @ centred.T.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = gram / np.outer(norms, norms)
        rows, cols = np.triu_indices(sub.shape[0], k=1)
        values += np.nan_to_num(corr[rows, cols], nan=0.0).tolist()
    return np.asarray(values, dtype=np.float32)
