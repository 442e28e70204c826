"""npe2 reader: a plate folder opens as a plate map plus its first field; one image file of a plate
opens as its whole field (every channel).

A folder is claimed only when :func:`~napari_cellmae.plates.scan_plate` recognises a layout, and a
file only when its folder is such a plate and the file is in it, so napari's own readers keep
everything else.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jp2")
_CACHE: OrderedDict[tuple[str, int], pd.DataFrame] = OrderedDict()
_CACHE_SIZE = 4

LayerData = tuple[Any, dict[str, Any], str]


def scan_cached(folder: str | os.PathLike) -> pd.DataFrame:
    """``scan_plate(folder)`` remembered per folder and modification time: napari asks
    ``get_reader`` and then the reader, and a tab may ask again."""
    from ..plates import scan_plate

    folder = Path(folder).resolve()
    key = (str(folder), folder.stat().st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    index = scan_plate(folder)
    _CACHE[key] = index
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return index


def _single(path: str | list[str]) -> str | None:
    if isinstance(path, (list, tuple)):
        return str(path[0]) if len(path) == 1 else None
    return str(path)


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The npe2 ``get_reader`` hook."""
    single = _single(path)
    if single is None:
        return None
    p = Path(single)
    try:
        if p.is_dir():
            scan_cached(p)
            return read_plate_folder
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            index = scan_cached(p.parent)
            if str(p.resolve()) in set(index["path"]):
                return read_plate_image
    except (ValueError, OSError) as exc:  # not a plate: let other readers have it
        logger.debug("napari-cellmae does not read %s: %s", p, exc)
    return None


def _field_meta(rows: pd.DataFrame) -> dict[str, Any]:
    from ..plates import field_keys

    first = rows.iloc[0]
    meta = {k: first[k] for k in (*field_keys(rows), "Metadata_Row", "Metadata_Col")}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in meta.items()}


def _channel_names(index: pd.DataFrame) -> list[str]:
    names = index.attrs.get("channel_names", {})
    return [names.get(c, c) for c in index.attrs.get("channels", [])]


def field_layers(index: pd.DataFrame, meta: dict[str, Any]) -> list[LayerData]:
    """Channel layers of the field ``meta`` (Metadata_* values)."""
    from .._qt.layers import field_layer_data
    from ..plates import read_field

    image = read_field(
        index,
        meta["Metadata_Well"],
        meta["Metadata_Site"],
        plate=meta["Metadata_Plate"],
        plane=meta.get("Metadata_Plane"),
        timepoint=meta.get("Metadata_Timepoint"),
    )
    return field_layer_data(
        image, _channel_names(index), metadata={**meta, "root": index.attrs.get("root")}
    )


def read_plate_folder(path: str | list[str]) -> list[LayerData]:
    """Plate wells (the plate's geometry), plate map (one point per field, ``features`` =
    metadata) and the first complete field."""
    from .._qt.layers import plate_map_layer_data, plate_wells_layer_data
    from ..plates import list_fields

    index = scan_cached(_single(path) or "")
    fields = list_fields(index)
    layers: list[LayerData] = []
    width = 512.0
    complete = fields[fields["complete"]]
    first = complete.iloc[0] if len(complete) else fields.iloc[0]
    meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in first.items()}
    meta = {k: v for k, v in meta.items() if k.startswith("Metadata_")}
    try:
        layers = field_layers(index, meta)
        width = float(layers[0][0].shape[-1])
    except ValueError as exc:  # a broken first field must not hide the plate
        logger.warning("could not open the first field of %s: %s", path, exc)
    plate_map = plate_map_layer_data(
        fields,
        width=width,
        root=index.attrs["root"],
        layout=index.attrs["layout"],
        summary=index.attrs["summary"],
    )
    return [plate_wells_layer_data(fields, width), plate_map, *layers]


def read_plate_image(path: str | list[str]) -> list[LayerData]:
    """Every channel of the field that the file belongs to."""
    p = Path(_single(path) or "").resolve()
    index = scan_cached(p.parent)
    rows = index[index["path"] == str(p)]
    if rows.empty:
        raise ValueError(f"{p} is not part of the plate in {p.parent}: open the folder instead")
    return field_layers(index, _field_meta(rows))
