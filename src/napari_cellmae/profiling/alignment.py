"""Alignment on negative controls, per batch (EFAAR's "align" step; Celik et al. 2024).

``center-scale`` (subtract the batch's control mean, divide by its control std); ``pca-cs`` (PCA
fit on all controls, then center-scale); ``tvn`` (typical variation normalisation: PCA fit on
controls, center-scale, then per batch whitening with the inverse square root of the batch's
control covariance + 0.5·I). How ``tvn`` differs from EFAAR's reference code, and why: see
docs/embeddings.md. :func:`baseline_pca` makes the baseline representation. numpy only.
"""

from __future__ import annotations

import numpy as np

ALIGNMENTS = ("none", "center-scale", "pca-cs", "tvn")
TVN_REGULARIZATION = 0.5
_EPS = 1e-8


def center_scale(x: np.ndarray, controls: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Per batch: subtract the controls' mean, divide by their standard deviation (features
    whose control std is ~0 are only centred). x: (N, D) -> (N, D) float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for b in np.unique(batches):
        rows = batches == b
        ctrl = x[rows & controls]
        if len(ctrl) == 0:
            raise ValueError(
                f"batch {str(b)!r} has no control wells: every batch (plate) needs negative "
                "controls to align on; check the platemap's control column or --batch-column"
            )
        mean, std = ctrl.mean(axis=0), ctrl.std(axis=0)
        std[std < _EPS * max(1.0, float(np.abs(x[rows]).max(initial=0.0)))] = 1.0
        out[rows] = (x[rows] - mean) / std
    return out


def pca_on_controls(
    x: np.ndarray, controls: np.ndarray, n_components: int | None = None
) -> np.ndarray:
    """Project ``x`` onto the principal axes of its control rows (centred on the controls'
    mean); components with ~zero control variance are dropped. (N, D) -> (N, K)."""
    x = np.asarray(x, dtype=np.float64)
    ctrl = x[controls]
    if len(ctrl) < 2:
        raise ValueError("PCA on controls needs at least 2 control wells; add controls")
    mean = ctrl.mean(axis=0)
    _, s, vt = np.linalg.svd(ctrl - mean, full_matrices=False)
    keep = s > s[0] * 1e-6 if s[0] > 0 else np.zeros_like(s, bool)
    k = int(keep.sum()) if n_components is None else min(int(n_components), int(keep.sum()))
    return (x - mean) @ vt[:k].T


def tvn(
    x: np.ndarray,
    controls: np.ndarray,
    batches: np.ndarray,
    regularization: float = TVN_REGULARIZATION,
    n_components: int | None = None,
) -> np.ndarray:
    """Typical variation normalisation: PCA fit on controls, center-scale on each batch's
    controls, then per batch ``x @ (cov(controls_b) + r·I)^(-1/2)``. (N, D) -> (N, K)."""
    z = center_scale(pca_on_controls(x, controls, n_components), controls, batches)
    out = np.empty_like(z)
    for b in np.unique(batches):
        rows = batches == b
        ctrl = z[rows & controls]
        cov = np.cov(ctrl, rowvar=False, ddof=1) if len(ctrl) > 1 else np.zeros((z.shape[1],) * 2)
        cov = np.atleast_2d(cov) + regularization * np.eye(z.shape[1])
        w, v = np.linalg.eigh(cov)  # symmetric positive definite: the inverse root is exact
        out[rows] = z[rows] @ (v * w**-0.5) @ v.T
    return out


def align(
    x: np.ndarray,
    controls: np.ndarray,
    batches: np.ndarray,
    method: str = "tvn",
    n_components: int | None = None,
) -> np.ndarray:
    """Align features on controls per batch: ``none``, ``center-scale``, ``pca-cs`` or ``tvn``."""
    controls = np.asarray(controls, dtype=bool)
    batches = np.asarray(batches)
    if method == "none":
        return np.asarray(x, dtype=np.float64)
    if method == "center-scale":
        return center_scale(x, controls, batches)
    if method == "pca-cs":
        return center_scale(pca_on_controls(x, controls, n_components), controls, batches)
    if method == "tvn":
        return tvn(x, controls, batches, n_components=n_components)
    raise ValueError(f"unknown alignment {method!r}: choose one of {', '.join(ALIGNMENTS)}")


def baseline_pca(features: np.ndarray, n_components: int | None = None) -> np.ndarray:
    """The baseline representation: z-scored statistics (constant ones dropped) -> PCA.
    (N, F) -> (N, K), K = min(n_components or 64, F, N - 1)."""
    x = np.asarray(features, dtype=np.float64)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    std = x.std(axis=0)
    x = (x[:, std > _EPS] - x.mean(axis=0)[std > _EPS]) / std[std > _EPS]
    k = max(1, min(n_components or 64, x.shape[1], max(1, x.shape[0] - 1)))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:k].T
