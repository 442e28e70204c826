"""Tile fields of any size into fixed-size crops and stitch per-crop outputs back together.

Policy (every module uses it, so embeddings and reconstructions of a field line up): along each
axis of length ``size`` there are n = ceil(size / crop) crops, their starts evenly spaced from 0 to
``size - crop`` (rounded to whole pixels). That covers every pixel with the least overlap n crops
allow: 512 px -> starts 0, 256 (no overlap); 1000 px -> 0, 248, 496, 744 (8 px overlaps);
1080 px -> 0, 206, 412, 618, 824 (~50 px overlaps). A side shorter than the crop is padded first
(:func:`pad_to_min`, reflection). Stitching averages the crops where they overlap.

numpy only (no torch).
"""

from __future__ import annotations

import math

import numpy as np

CROP = 256


def crop_starts(size: int, crop: int = CROP) -> np.ndarray:
    """Start offsets of the crops along one axis of length ``size`` (>= ``crop``)."""
    if size < crop:
        raise ValueError(
            f"A side of {size} px is shorter than the {crop}-px crop: pad the field first "
            "(napari_cellmae.tiling.pad_to_min)."
        )
    n = math.ceil(size / crop)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    return np.round(np.linspace(0, size - crop, n)).astype(np.int64)


def crop_grid(height: int, width: int, crop: int = CROP) -> np.ndarray:
    """Top-left corners (n, 2) as (y, x), row-major, of the crops that tile a (height, width)
    field (see the module docstring for the policy)."""
    ys, xs = crop_starts(height, crop), crop_starts(width, crop)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def pad_to_min(field: np.ndarray, crop: int = CROP, mode: str = "reflect") -> np.ndarray:
    """Pad the last two axes at the bottom/right up to ``crop`` where they are shorter (returns
    ``field`` itself when no padding is needed). ``mode`` as in :func:`numpy.pad`."""
    h, w = field.shape[-2:]
    pad_h, pad_w = max(0, crop - h), max(0, crop - w)
    if not pad_h and not pad_w:
        return field
    widths = [(0, 0)] * (field.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(field, widths, mode=mode)


def extract_crops(field: np.ndarray, positions: np.ndarray, crop: int = CROP) -> np.ndarray:
    """field (..., H, W) -> crops (n, ..., crop, crop) at ``positions`` (n, 2) (y, x)."""
    h, w = field.shape[-2:]
    out = np.empty((len(positions), *field.shape[:-2], crop, crop), dtype=field.dtype)
    for i, (y, x) in enumerate(np.asarray(positions)):
        if y < 0 or x < 0 or y + crop > h or x + crop > w:
            raise ValueError(f"Crop at (y={y}, x={x}) does not fit in a {h}×{w} field.")
        out[i] = field[..., y : y + crop, x : x + crop]
    return out


def stitch_crops(crops: np.ndarray, positions: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Put per-crop outputs (n, ..., crop, crop) back into a field (..., H, W) float32,
    averaging where crops overlap. Pixels no crop covers (only if the positions do not tile the
    field) are NaN."""
    crops = np.asarray(crops)
    crop = crops.shape[-1]
    if crops.shape[-2] != crop or len(crops) != len(positions):
        raise ValueError(
            f"Expected crops (n, ..., c, c) matching {len(positions)} positions, got {crops.shape}."
        )
    h, w = shape
    total = np.zeros((*crops.shape[1:-2], h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    for tile, (y, x) in zip(crops, np.asarray(positions)):
        total[..., y : y + crop, x : x + crop] += tile
        count[y : y + crop, x : x + crop] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    return out.astype(np.float32)


def upsample_patches(maps: np.ndarray, patch_size: int) -> np.ndarray:
    """Per-patch maps (..., h, w) -> per-pixel (..., h·p, w·p) by repetition (e.g. to stitch
    reconstruction error maps with :func:`stitch_crops`)."""
    return np.asarray(maps).repeat(patch_size, axis=-2).repeat(patch_size, axis=-1)
