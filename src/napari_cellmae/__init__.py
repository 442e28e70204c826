"""napari-cellmae: channel-agnostic masked autoencoders for cell microscopy, in napari.

The public API resolves lazily so that ``import napari_cellmae`` stays cheap: torch, Qt and
napari are imported only when a name that needs them is first used.

>>> from napari_cellmae import load_model, scan_plate, read_field  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> module that defines it (imported on first attribute access)
_LAZY: dict[str, str] = {
    "load_model": "napari_cellmae.hub",
    "save_model": "napari_cellmae.hub",
    "CellMAE": "napari_cellmae.model",
    "CellMAEConfig": "napari_cellmae.model",
    "scan_plate": "napari_cellmae.plates",
    "read_field": "napari_cellmae.plates",
    "iter_fields": "napari_cellmae.plates",
    "EmbedConfig": "napari_cellmae.embed",
    "embed_plates": "napari_cellmae.embed",
    "profile_report": "napari_cellmae.profiling",
    "train_qc_head": "napari_cellmae.qc",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    try:
        module_name = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'napari_cellmae' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
