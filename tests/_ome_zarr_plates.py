"""Write small OME-Zarr HCS plates with ome-zarr-py (the maintained writer), NGFF 0.4 or 0.5."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from napari_cellmae.plates.layouts import split_well
from napari_cellmae.synthetic import make_field

STAIN_COLORS = ("0000FF", "00FF00", "FF0000", "FF00FF", "FFFF00")


def write_zarr_plate(
    path: Path,
    version: str = "0.5",
    wells: tuple[str, ...] = ("A01", "B03"),
    sites: int = 2,
    n_channels: int = 3,
    size: int = 64,
    planes: int = 1,
    names: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito"),
    plate_name: str = "ZPLATE",
) -> dict[tuple[str, int], np.ndarray]:
    """A plate at ``path`` (wells ``B/3``…, ``sites`` fields, CYX or CZYX uint16, two levels);
    returns the written level-0 arrays by (well, site)."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    parts = [split_well(w) for w in wells]
    rows = sorted({r for r, _ in parts})
    cols = sorted({c for _, c in parts})
    paths = [f"{r}/{c}" for r, c in parts]
    write_plate_metadata(
        root, rows, [str(c) for c in cols], paths, fmt=fmt, name=plate_name, field_count=sites
    )
    omero = {
        "channels": [
            {
                "label": names[c],
                "color": STAIN_COLORS[c % len(STAIN_COLORS)],
                "window": {"start": 0, "end": 4095, "min": 0, "max": 65535},
                "active": True,
            }
            for c in range(n_channels)
        ]
    }
    written = {}
    for (row, col), well in zip(parts, wells):
        well_group = root.require_group(row).require_group(str(col))
        write_well_metadata(well_group, [str(s) for s in range(sites)], fmt=fmt)
        for site in range(sites):
            data = make_field(n_channels, size, seed=zlib.crc32(f"{well}/{site}".encode()))
            if planes > 1:  # a z stack: plane p is the field plus p (tells planes apart)
                data = np.stack([data + p for p in range(planes)], axis=1)
            axes = "czyx" if planes > 1 else "cyx"
            write_image(
                data,
                well_group.require_group(str(site)),
                axes=axes,
                fmt=fmt,
                scale_factors=[2],
                omero=omero,
            )
            written[(well, site + 1)] = data
    return written
