"""npe2 writer: save Image layers as one OME-TIFF channel stack (axes CYX, one named channel per
layer), e.g. the ``reconstruction <channel>`` layers of the Reconstruct tab.

*File → Save Selected Layers…* with a ``.ome.tif`` name (or ``viewer.layers.save(path,
selected=True, plugin="napari-cellmae")``). Channel names are the layers' channel (the
Reconstruct tab's layers carry it in their metadata) or else their names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXTENSIONS = (".ome.tif", ".ome.tiff")


def stack_channel_names(metas: Sequence[dict[str, Any]]) -> list[str]:
    """One name per layer: the ``channel`` its metadata carries when those are unique, else the
    layer names."""
    channels = [str((m.get("metadata") or {}).get("channel") or "") for m in metas]
    if all(channels) and len(set(channels)) == len(channels):
        return channels
    return [str(m.get("name") or f"ch{i}") for i, m in enumerate(metas)]


def write_ome_stack(path: str, layer_data: list[tuple[Any, dict[str, Any], str]]) -> list[str]:
    """Write image layers (2-D, all the same size) as one (C, Y, X) OME-TIFF; returns [path]."""
    from ..reconstruct import write_ome_tiff

    if not str(path).lower().endswith(EXTENSIONS):
        raise ValueError(f"{path}: the OME-TIFF stack writer needs a .ome.tif name.")
    images = [(data, meta) for data, meta, kind in layer_data if kind == "image"]
    if not images:
        raise ValueError("Select at least one Image layer to save as an OME-TIFF stack.")
    planes = []
    for data, meta in images:
        arr = np.asarray(data)
        if arr.ndim != 2 or meta.get("rgb"):
            raise ValueError(
                f"Layer {meta.get('name')!r} has shape {arr.shape}: the OME-TIFF stack writer "
                "saves 2-D single-channel layers; save this one with napari's own .tif writer."
            )
        planes.append(arr)
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        sizes = ", ".join(f"{m.get('name')} {p.shape}" for p, (_, m) in zip(planes, images))
        raise ValueError(f"The layers differ in size ({sizes}): select layers of one field.")
    names = stack_channel_names([meta for _, meta in images])
    write_ome_tiff(Path(path), np.stack(planes), names)
    return [str(path)]
