"""Scan speed on a big plate folder: 384 wells × 9 sites × 5 channels = 17,280 files.

The scan reads file names only (never pixels), so the files are written empty; the names and the
folder structure are those of each instrument. Prints wall times and ratios measured in this run:
scan time ÷ a bare ``os.scandir`` walk of the same folder (the floor any scanner pays).

    python benchmarks/bench_scan.py            # ImageXpress, Harmony, Cellomics
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from napari_cellmae.plates import list_fields, scan_plate
from napari_cellmae.plates.layouts import index_to_row
from napari_cellmae.synthetic import channel_ids, instrument_relpath


def make_folder(root: Path, layout: str, rows: int, cols: int, sites: int, channels: int) -> int:
    ids = channel_ids(layout, channels)
    n = 0
    made: set[Path] = set()
    for r in range(1, rows + 1):
        row = index_to_row(r)
        for col in range(1, cols + 1):
            for site in range(1, sites + 1):
                for c, cid in enumerate(ids):
                    path = root / instrument_relpath(
                        layout, "BENCH-P1", row, col, site, c, cid, None, None, guid=True
                    )
                    if path.parent not in made:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        made.add(path.parent)
                    path.touch()
                    n += 1
    return n


def bare_walk(root: Path) -> int:
    count, stack = 0, [str(root)]
    while stack:
        for entry in os.scandir(stack.pop()):
            if entry.is_dir():
                stack.append(entry.path)
            else:
                count += 1
    return count


def best_of(repeats: int, func, *args) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = func(*args)
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["imagexpress", "harmony", "cellomics"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )
    for layout in args.layouts:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            n = make_folder(root, layout, 16, 24, 9, 5)
            walk_s, walked = best_of(args.repeats, bare_walk, root)
            auto_s, index = best_of(args.repeats, scan_plate, root)
            named_s, _ = best_of(args.repeats, scan_plate, root, layout)
            fields_s, fields = best_of(args.repeats, list_fields, index)
            assert walked == n and len(index) == n and len(fields) == 384 * 9
            print(
                f"{layout:<12} {n} files: walk {walk_s:.3f} s, scan auto {auto_s:.3f} s "
                f"({n / auto_s:,.0f} files/s, {auto_s / walk_s:.1f}× the bare walk), "
                f"scan layout={layout} {named_s:.3f} s, list_fields {fields_s:.3f} s; "
                f"{index.attrs['summary']}"
            )


if __name__ == "__main__":
    main()
