"""Plate folders in, fields out.

>>> from napari_cellmae.plates import scan_plate, read_field, iter_fields  # doctest: +SKIP
>>> index = scan_plate("/data/plate1")              # auto-detects the instrument's naming
>>> field = read_field(index, well="B03", site=1)    # (C, H, W), native dtype
>>> for meta, image, error in iter_fields(index):    # prefetching, bad fields recorded
...     ...

The index is a pandas DataFrame, one row per image file: ``Metadata_Plate``, ``Metadata_Well``,
``Metadata_Row``, ``Metadata_Col``, ``Metadata_Site``, ``Metadata_Channel`` (+ ``Metadata_Plane`` /
``Metadata_Timepoint``) and ``path``; ``index.attrs`` holds ``layout``, ``root``, ``channels`` and
``channel_names``.
"""

from .channels import (
    PRESETS,
    apply_preset,
    load_channel_map,
    normalize_channel_names,
    save_channel_map,
)
from .errors import (
    CorruptFileError,
    FieldNotFoundError,
    FileAccessError,
    LayoutError,
    MissingChannelError,
    NonFiniteError,
    PlaneError,
    PlateError,
    SizeMismatchError,
)
from .layouts import LAYOUTS, Layout, get_layout, regex_layout, split_well, well_name
from .read import (
    FieldResult,
    iter_fields,
    read_channel,
    read_field,
    read_image,
    select_field,
)
from .scan import field_keys, list_fields, scan_plate

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "CorruptFileError",
    "FieldNotFoundError",
    "FieldResult",
    "FileAccessError",
    "Layout",
    "LayoutError",
    "MissingChannelError",
    "NonFiniteError",
    "PlaneError",
    "PlateError",
    "SizeMismatchError",
    "apply_preset",
    "field_keys",
    "get_layout",
    "iter_fields",
    "list_fields",
    "load_channel_map",
    "normalize_channel_names",
    "read_channel",
    "read_field",
    "read_image",
    "regex_layout",
    "save_channel_map",
    "scan_plate",
    "select_field",
    "split_well",
    "well_name",
]
