"""OME-Zarr HCS plates: scan (metadata only) and per-field read times.

Writes a 96-well × 4-field × 5-channel plate of 512² uint16 fields (one chunk per channel plane,
one pyramid level below full resolution) with ome-zarr-py as NGFF 0.4 and 0.5, then times
``scan_plate`` (it opens every well and field group's metadata, never a chunk; zarr imported
beforehand) and ``read_field``
(one field's chunks at level 0), and ``iter_fields`` over the whole plate (reads ahead in threads).

    python benchmarks/bench_omezarr.py [--wells 96] [--sites 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def write(root: Path, version: str, wells: int, sites: int, channels: int, size: int) -> None:
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(str(root), mode="w", zarr_format=2 if version == "0.4" else 3)
    names = [f"{chr(65 + i // 12)}/{i % 12 + 1}" for i in range(wells)]
    rows = sorted({n.split("/")[0] for n in names})
    write_plate_metadata(group, rows, [str(c) for c in range(1, 13)], names, fmt=fmt)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4096, (channels, size, size), dtype=np.uint16)
    for name in names:
        row, col = name.split("/")
        well = group.require_group(row).require_group(col)
        write_well_metadata(well, [str(s) for s in range(sites)], fmt=fmt)
        for s in range(sites):
            write_image(data, well.require_group(str(s)), axes="cyx", fmt=fmt, scale_factors=[2])


def main() -> None:
    from napari_cellmae.plates import iter_fields, read_field, scan_plate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wells", type=int, default=96)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )
    t0 = time.perf_counter()
    import zarr  # once per process: not part of any scan below

    print(f"import zarr {zarr.__version__}: {time.perf_counter() - t0:.2f} s")
    for version in ("0.4", "0.5"):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "plate.zarr"
            t0 = time.perf_counter()
            write(root, version, args.wells, args.sites, args.channels, args.size)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            index = scan_plate(root)
            scan_s = time.perf_counter() - t0
            n_fields = index.attrs["n_fields"]
            wells = index["Metadata_Well"].unique()[:8]
            t0 = time.perf_counter()
            for well in wells:
                read_field(index, well, 1)
            read_s = (time.perf_counter() - t0) / len(wells)
            t0 = time.perf_counter()
            n = sum(r.ok for r in iter_fields(index, prefetch=4))
            iter_s = time.perf_counter() - t0
            print(
                f"NGFF {version}: {n_fields} fields ({args.channels}×{args.size}²) written in "
                f"{write_s:.1f} s; scan {scan_s:.2f} s ({1000 * scan_s / n_fields:.1f} ms/field); "
                f"read_field {1000 * read_s:.1f} ms; iter_fields {n} fields in {iter_s:.2f} s "
                f"({n / iter_s:.0f} fields/s)"
            )


if __name__ == "__main__":
    main()
