"""Cell geometry for synthetic fields: where cells and nuclei are, and the small drawing tools
(smooth noise, Gaussian spots, random points inside cells) the stains are rendered with."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

CELL_RADIUS = 22.0  # px, at the default magnification


def place_cells(
    rng: np.random.Generator, shape: tuple[int, int], density: float, pheno: dict
) -> dict:
    """Per-cell parameters: centres spaced by dart throwing, radii, shapes, nuclei, states."""
    h, w = shape
    radius = CELL_RADIUS * (1 + 0.4 * pheno.get("cell_size", 0.0))
    density = density * max(0.05, 1 - 0.6 * pheno.get("cytotoxic", 0.0))
    density *= rng.lognormal(0.0, 0.15)  # field-to-field variation
    n_target = max(1, int(round(0.6 * density * h * w / (np.pi * radius**2))))
    margin = radius * 0.5
    candidates = rng.uniform((-margin, -margin), (h + margin, w + margin), (n_target * 4, 2))
    min_dist = 1.15 * radius
    centres = np.empty((0, 2))
    for c in candidates:
        if len(centres) and np.min(np.sum((centres - c) ** 2, axis=1)) < min_dist**2:
            continue
        centres = np.vstack([centres, c])
        if len(centres) == n_target:
            break
    n = len(centres)
    mitotic = rng.random(n) < 0.03 + 0.3 * pheno.get("mitotic_arrest", 0.0)
    r = radius * rng.lognormal(0.0, 0.18, n)
    r[mitotic] *= 0.7
    harm = rng.uniform(0, 1, (n, 2)) * (0.22, 0.1)
    harm[mitotic] = 0.0
    rn = 0.42 * r * rng.lognormal(0.0, 0.1, n) * (1 + 0.5 * pheno.get("nucleus_size", 0.0))
    ecc = rng.uniform(0.0, 0.3, n)
    na, nb = rn * (1 + ecc), rn / (1 + ecc)
    na[mitotic], nb[mitotic] = rn[mitotic] * 0.62, rn[mitotic] * 0.24  # metaphase plate
    return {
        "n": n,
        "yx": centres,
        "r": r,
        "harm": harm,
        "phase": rng.uniform(0, 2 * np.pi, (n, 2)),
        "nuc_yx": centres + rng.normal(0, 0.08, (n, 2)) * r[:, None],
        "na": na,
        "nb": nb,
        "nuc_angle": rng.uniform(0, np.pi, n),
        "mitotic": mitotic,
        "fibre_angle": rng.uniform(0, np.pi, n),
        "golgi_angle": rng.uniform(0, 2 * np.pi, n),
    }


def rasterize(cells: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label (H, W) int32 (0 = background), rho (H, W) radial coordinate in the cell (1 = edge),
    en (H, W) elliptical nucleus coordinate (< 1 inside the nucleus)."""
    h, w = shape
    label = np.zeros(shape, np.int32)
    rho = np.full(shape, np.inf, np.float32)
    en = np.full(shape, np.inf, np.float32)
    ys = np.arange(h, dtype=np.float32)
    xs = np.arange(w, dtype=np.float32)
    for i in range(cells["n"]):
        (cy, cx), r = cells["yx"][i], cells["r"][i]
        a2, a3 = cells["harm"][i]
        ext = r * (1 + a2 + a3) + 1
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 2, h)
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = ys[y0:y1, None] - cy, xs[None, x0:x1] - cx
        theta = np.arctan2(dy, dx)
        p2, p3 = cells["phase"][i]
        rr = r * (1 + a2 * np.cos(2 * theta - p2) + a3 * np.cos(3 * theta - p3))
        q = np.hypot(dy, dx) / rr
        sub = rho[y0:y1, x0:x1]
        take = q < np.minimum(sub, 1.0)
        sub[take] = q[take]
        label[y0:y1, x0:x1][take] = i + 1
    for i in range(cells["n"]):
        (cy, cx), a, b = cells["nuc_yx"][i], cells["na"][i], cells["nb"][i]
        ext = a * 1.5 + 2
        y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 2, h)
        x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = ys[y0:y1, None] - cy, xs[None, x0:x1] - cx
        ca, sa = np.cos(cells["nuc_angle"][i]), np.sin(cells["nuc_angle"][i])
        e = np.hypot((dx * ca + dy * sa) / a, (-dx * sa + dy * ca) / b)
        mine = label[y0:y1, x0:x1] == i + 1
        sub = en[y0:y1, x0:x1]
        sub[mine] = np.minimum(sub[mine], e[mine])
    return label, rho, en


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation (correlation length ~ sigma px)."""
    if sigma >= 4:  # large scales: draw small and zoom (much faster than a wide filter)
        step = int(sigma // 2)
        small = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2))
        small = ndi.gaussian_filter(small, sigma / step)
        field = ndi.zoom(small, step, order=1)[: shape[0], : shape[1]]
    else:
        field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field / (field.std() + 1e-9)).astype(np.float32)


def splat(
    shape: tuple[int, int], yx: np.ndarray, weight: np.ndarray | float, sigma: float
) -> np.ndarray:
    """Gaussian spots of ``sigma`` px at points ``yx`` (N, 2), peak height ~ weight."""
    h, w = shape
    iy, ix = np.round(yx[:, 0]).astype(int), np.round(yx[:, 1]).astype(int)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    weight = np.broadcast_to(np.asarray(weight, np.float64), (len(yx),))[ok]
    flat = np.bincount(iy[ok] * w + ix[ok], weights=weight, minlength=h * w)
    img = ndi.gaussian_filter(flat.reshape(h, w).astype(np.float32), sigma)
    return img * np.float32(2 * np.pi * sigma**2)


def points_in_cells(
    rng: np.random.Generator, cells: dict, counts: np.ndarray, inner: float, bias: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random points in each cell's cytoplasm ring (inner..1 of the radius), denser near the
    nucleus for ``bias`` > 1. Returns (yx (N, 2), cell index (N,))."""
    owner = np.repeat(np.arange(cells["n"]), counts)
    t = inner + (1 - inner) * rng.random(len(owner)) ** bias
    angle = rng.uniform(0, 2 * np.pi, len(owner))
    rad = t * cells["r"][owner] * 0.95
    yx = cells["yx"][owner] + np.stack([np.sin(angle), np.cos(angle)], 1) * rad[:, None]
    return yx, owner
