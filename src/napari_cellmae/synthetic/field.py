"""Synthetic Cell-Painting-like fields: stains, phenotypes, batch effects and the camera model.

:func:`make_field` places cells (:mod:`.cells`), renders each stain's structure, applies the
phenotype with its strength, and acquires the image through illumination falloff, background,
shot and read noise and a 12-bit camera.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .cells import place_cells, points_in_cells, rasterize, smooth_noise, splat

STAINS = (
    "DNA",
    "ER",
    "RNA",
    "AGP",
    "Mito",
    "Golgi",
    "Brightfield",
    "Tubulin",
    "Lysosome",
    "Membrane",
    "Cytosol",
)
MAX_CHANNELS = len(STAINS)

# phenotype -> what strength 1 does (strength scales linearly; 0 = control)
PHENOTYPES: dict[str, str] = {
    "nucleus_size": "nuclei 50% larger in radius",
    "cell_size": "cells 40% larger in radius",
    "er_intensity": "ER twice as bright",
    "mito_fragmentation": "tubular mitochondria break into many small round puncta",
    "actin_stress": "strong, regular actin stress fibres",
    "mitotic_arrest": "a third of the cells rounded up in mitosis with condensed DNA",
    "golgi_dispersal": "the compact perinuclear Golgi scatters through the cytoplasm",
    "nucleoli": "larger, brighter nucleoli (RNA)",
    "cytotoxic": "60% fewer cells",
}

# peak signal of each stain in 12-bit camera counts (before gains, illumination and noise)
_BRIGHTNESS = {
    "DNA": 2600,
    "ER": 1400,
    "RNA": 1500,
    "AGP": 1600,
    "Mito": 2000,
    "Golgi": 1800,
    "Brightfield": 1900,
    "Tubulin": 1300,
    "Lysosome": 2000,
    "Membrane": 1500,
    "Cytosol": 1200,
}
_CAMERA_OFFSET = 100.0
_READ_NOISE = 4.0
_FULL_SCALE = 4095.0  # 12-bit camera


def parse_phenotype(phenotype: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"nucleus_size"``, ``"nucleus_size=1;er_intensity=0.5"`` or a dict -> ``{name: weight}``."""
    if phenotype is None or (isinstance(phenotype, float) and np.isnan(phenotype)):
        return {}
    if isinstance(phenotype, Mapping):
        spec = {str(k): float(v) for k, v in phenotype.items()}
    else:
        spec = {}
        for part in str(phenotype).replace(",", ";").split(";"):
            part = part.strip()
            if not part or part.lower() in ("none", "control"):
                continue
            name, _, weight = part.partition("=")
            spec[name.strip()] = float(weight) if weight else 1.0
    unknown = set(spec) - set(PHENOTYPES)
    if unknown:
        raise ValueError(f"unknown phenotype(s) {sorted(unknown)}: choose from {list(PHENOTYPES)}")
    return spec


def format_phenotype(spec: Mapping[str, float]) -> str:
    """Inverse of :func:`parse_phenotype` (``""`` for a control)."""
    return ";".join(f"{k}={v:.3g}" for k, v in spec.items())


def batch_effect(batch: int | None, n_channels: int) -> dict[str, Any]:
    """Per-plate/batch acquisition differences: channel gains and offsets, illumination centre and
    falloff. ``batch=None`` is the neutral instrument."""
    if batch is None:
        return {
            "gain": np.ones(n_channels),
            "offset": np.zeros(n_channels),
            "center": (0.5, 0.5),
            "falloff": 0.3,
        }
    rng = np.random.default_rng([7919, int(batch)])
    return {
        "gain": rng.lognormal(0.0, 0.15, n_channels),
        "offset": rng.normal(0.0, 25.0, n_channels),
        "center": tuple(0.5 + rng.uniform(-0.15, 0.15, 2)),
        "falloff": float(rng.uniform(0.15, 0.45)),
    }


def _render(
    stains: tuple[str, ...], cells: dict, shape: tuple[int, int], rng: np.random.Generator, ph: dict
) -> np.ndarray:
    """Noise-free stain signals (C, H, W), roughly 0..1.5 per stain."""
    label, rho, en = rasterize(cells, shape)
    inside = label > 0
    lab = np.maximum(label - 1, 0)
    rho = np.where(inside, rho, 1.0).astype(np.float32)
    nucleus = np.clip((1.0 - en) / 0.12 + 0.5, 0, 1).astype(np.float32)
    cyto = inside * (1 - nucleus)
    mitotic_px = cells["mitotic"][lab] & inside
    n = cells["n"]
    level = rng.lognormal(0.0, 0.25, (len(stains), n)).astype(np.float32)  # per-cell stain levels
    edges = np.zeros(shape, bool)
    edges[:-1] |= label[:-1] != label[1:]
    edges[:, :-1] |= label[:, :-1] != label[:, 1:]
    membrane = ndi.gaussian_filter(edges.astype(np.float32), 1.0) * 2.5
    membrane = np.minimum(membrane + inside * np.clip((rho - 0.88) / 0.12, 0, 1), 1.5)
    areas = np.bincount(lab[inside], minlength=n)

    out = np.zeros((len(stains), *shape), np.float32)
    for c, stain in enumerate(stains):
        lv = level[c][lab] * inside
        if stain == "DNA":
            texture = 1 + 0.25 * smooth_noise(rng, shape, 1.2)
            spots_yx = cells["nuc_yx"][np.repeat(np.arange(n), 6)]
            spots_yx = (
                spots_yx
                + rng.normal(0, 1, (len(spots_yx), 2)) * 0.35 * np.repeat(cells["nb"], 6)[:, None]
            )
            spots = splat(shape, spots_yx, 0.35, 1.0)
            sig = nucleus * (0.75 * texture + spots) * lv
            sig = np.where(mitotic_px, sig * 2.4, sig)
        elif stain == "ER":
            network = np.clip(1 - np.abs(smooth_noise(rng, shape, 1.6)), 0, 1) ** 2
            envelope = np.exp(-(((en - 1.0) / 0.13) ** 2)) * inside
            body = cyto * (1 - rho) ** 0.7 * (0.35 + 0.9 * network)
            sig = (body + 0.6 * envelope) * lv * (1 + pheno_get(ph, "er_intensity"))
        elif stain == "RNA":
            k = rng.integers(1, 5, n)
            owner = np.repeat(np.arange(n), k)
            yx = (
                cells["nuc_yx"][owner]
                + rng.normal(0, 0.3, (len(owner), 2)) * cells["nb"][owner, None]
            )
            size = 1.6 * (1 + 0.6 * pheno_get(ph, "nucleoli"))
            nucleoli = splat(shape, yx, 1.0 + 0.5 * pheno_get(ph, "nucleoli"), size)
            sig = (0.25 * nucleus + nucleoli * nucleus + 0.35 * cyto * (1 - rho) ** 0.5) * lv
        elif stain == "AGP":
            theta = cells["fibre_angle"][lab]
            u = (np.arange(shape[1])[None, :] - cells["yx"][lab, 1]) * np.cos(theta) + (
                np.arange(shape[0])[:, None] - cells["yx"][lab, 0]
            ) * np.sin(theta)
            fibres = (0.5 + 0.5 * np.cos(2 * np.pi * u / 5.0)) ** 6
            patchy = 0.5 + 0.5 * np.tanh(
                smooth_noise(rng, shape, 6) + 0.8 * pheno_get(ph, "actin_stress")
            )
            amp = 0.2 + 0.9 * pheno_get(ph, "actin_stress")
            golgi = _golgi(rng, cells, shape, ph) * 0.4 if "Golgi" not in stains else 0
            sig = (membrane * 0.8 + cyto * (0.15 + amp * fibres * patchy) + golgi) * lv
            sig = np.where(mitotic_px, sig + 0.6 * inside * lv, sig)
        elif stain == "Mito":
            sig = _mitochondria(rng, cells, shape, areas, pheno_get(ph, "mito_fragmentation"))
            sig = sig * cyto * lv
        elif stain == "Golgi":
            sig = _golgi(rng, cells, shape, ph) * inside * lv
        elif stain == "Brightfield":
            sig = 1.0 - 0.12 * inside + 0.25 * membrane - 0.1 * nucleus
            sig = sig + 0.05 * smooth_noise(rng, shape, 2.0) * inside
        elif stain == "Tubulin":
            yx = cells["nuc_yx"][lab]
            ang = np.arctan2(
                np.arange(shape[0])[:, None] - yx[..., 0], np.arange(shape[1]) - yx[..., 1]
            )
            rays = (0.5 + 0.5 * np.cos(ang * 24 + cells["golgi_angle"][lab])) ** 4
            sig = cyto * (0.2 + 0.8 * rays) * (1 - rho) ** 0.3 * lv
        elif stain == "Lysosome":
            yx, _ = points_in_cells(rng, cells, np.maximum(areas // 120, 1), 0.45, 1.8)
            sig = splat(shape, yx, 1.0, 1.3) * cyto * lv
        elif stain == "Membrane":
            sig = membrane * lv
        else:  # Cytosol: whole cell body
            sig = inside * (0.7 + 0.15 * smooth_noise(rng, shape, 3.0)) * (1 - 0.3 * nucleus) * lv
        out[c] = sig
    return out


def pheno_get(spec: dict, name: str) -> float:
    return float(spec.get(name, 0.0))


def _mitochondria(
    rng: np.random.Generator, cells: dict, shape: tuple[int, int], areas: np.ndarray, frag: float
) -> np.ndarray:
    """Tubules (short chains of spots) that fragment into isolated puncta as ``frag`` grows."""
    seeds = np.maximum(areas // 35, 1)
    yx, _ = points_in_cells(rng, cells, seeds, 0.4, 1.6)
    fragmented = rng.random(len(yx)) < min(1.0, 0.1 + 0.9 * frag)
    direction = rng.uniform(0, 2 * np.pi, len(yx))
    length = rng.uniform(6, 14, len(yx))
    steps = np.linspace(-0.5, 0.5, 8)
    tub = ~fragmented
    along = steps[None, :] * length[tub, None]
    ty = yx[tub, 0:1] + along * np.sin(direction[tub, None])
    tx = yx[tub, 1:2] + along * np.cos(direction[tub, None])
    tubules = np.stack([ty.ravel(), tx.ravel()], 1)
    puncta = yx[fragmented]
    extra = int(len(puncta) * 0.8 * frag)  # fission makes more, smaller pieces
    if extra:
        puncta = np.vstack(
            [puncta, puncta[rng.integers(0, len(puncta), extra)] + rng.normal(0, 3, (extra, 2))]
        )
    return splat(shape, tubules, 0.4, 0.9) + splat(shape, puncta, 1.0, 0.7)


def _golgi(rng: np.random.Generator, cells: dict, shape: tuple[int, int], ph: dict) -> np.ndarray:
    """A compact ribbon beside the nucleus; dispersal scatters it through the cell."""
    n, k = cells["n"], 14
    disp = pheno_get(ph, "golgi_dispersal")
    owner = np.repeat(np.arange(n), k)
    ang = cells["golgi_angle"][owner]
    dist = cells["na"][owner] * 1.15
    centre = cells["nuc_yx"][owner] + np.stack([np.sin(ang), np.cos(ang)], 1) * dist[:, None]
    spread = 2.5 + disp * 0.45 * cells["r"][owner]
    yx = centre + rng.normal(0, 1, (len(owner), 2)) * spread[:, None]
    keep = ~cells["mitotic"][owner]
    return splat(shape, yx[keep], 0.7, 1.2)


def _acquire(
    signal: np.ndarray,
    stains: tuple[str, ...],
    rng: np.random.Generator,
    effect: dict,
    dtype: np.dtype,
) -> np.ndarray:
    """Camera model: illumination falloff, background, gain, shot + read noise, bit depth."""
    _, h, w = signal.shape
    cy, cx = effect["center"]
    yy = (np.arange(h, dtype=np.float32)[:, None] / h - cy) ** 2
    xx = (np.arange(w, dtype=np.float32)[None, :] / w - cx) ** 2
    illum = 1 - effect["falloff"] * (yy + xx) / 0.5
    background = 40 * (1 + 0.2 * smooth_noise(rng, (h, w), 24))
    peak = np.array([_BRIGHTNESS[s] for s in stains], np.float32) * effect["gain"]
    counts = signal * peak[:, None, None] * illum + background * illum
    counts = np.maximum(counts, 0)
    counts = counts + rng.standard_normal(counts.shape).astype(np.float32) * np.sqrt(counts)
    counts += _CAMERA_OFFSET + effect["offset"][:, None, None]
    counts += rng.standard_normal(counts.shape).astype(np.float32) * _READ_NOISE
    counts = np.clip(counts, 0, _FULL_SCALE)
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.round(counts * (255 / _FULL_SCALE)).astype(np.uint8)
    if dtype.kind == "f":
        return (counts / _FULL_SCALE).astype(dtype)
    if dtype.kind in "ui":
        return np.round(counts).astype(dtype)
    raise ValueError(f"dtype {dtype} is not supported: use uint8, uint16 or float32")


def make_field(
    n_channels: int = 5,
    size: tuple[int, int] | int = (512, 512),
    seed: int | np.random.SeedSequence = 0,
    phenotype: str | Mapping[str, float] | None = None,
    strength: float = 1.0,
    density: float = 1.0,
    dtype: Any = np.uint16,
    batch: int | None = None,
) -> np.ndarray:
    """One synthetic field ``(C, H, W)``.

    Parameters
    ----------
    n_channels : int
        1..11; the stains are the first ``n_channels`` of :data:`STAINS` (DNA, ER, RNA, AGP, Mito,
        Golgi, Brightfield, Tubulin, Lysosome, Membrane, Cytosol).
    size : (H, W) or int
    seed : int
        Same seed, same field.
    phenotype : str or dict, optional
        A name from :data:`PHENOTYPES`, ``"a=1;b=0.5"`` or ``{name: weight}``; None = control.
    strength : float
        Multiplies every phenotype weight (0 = control, 1 = the effect in :data:`PHENOTYPES`).
    density : float
        Relative cell density (1 ≈ 60% confluent).
    dtype : numpy dtype
        ``uint16`` (12-bit values, as most cameras), ``uint8`` or ``float32`` (0..1).
    batch : int, optional
        Plate/batch id: per-channel gain/offset and illumination of that batch (None = neutral).
    """
    if not 1 <= int(n_channels) <= MAX_CHANNELS:
        raise ValueError(f"n_channels must be 1..{MAX_CHANNELS}, got {n_channels}")
    shape = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if min(shape) < 16:
        raise ValueError(f"size {shape} is too small: use at least 16×16 pixels")
    spec = {k: v * float(strength) for k, v in parse_phenotype(phenotype).items()}
    stains = STAINS[: int(n_channels)]
    rng = np.random.default_rng(seed)
    cells = place_cells(rng, shape, density, spec)
    signal = _render(stains, cells, shape, rng, spec)
    return _acquire(signal, stains, rng, batch_effect(batch, len(stains)), dtype)


def field_seed(seed: int, *parts: Any) -> np.random.SeedSequence:
    """A stable seed for one field from the plate seed and (plate, well, site …) parts."""
    return np.random.SeedSequence([int(seed), *(zlib.crc32(str(p).encode()) for p in parts)])
