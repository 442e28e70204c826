"""Peak memory of `cellmae qc` and `cellmae embed` on one large field (issue 20, item 10).

Writes one synthetic 16-bit field (default 8000 × 8000, one channel, ImageXpress naming) as a
TIFF in a temporary folder, then runs each command as a child of a fresh Python process and
prints the child's peak resident set size (``ru_maxrss`` of ``RUSAGE_CHILDREN``, Linux: KiB) and
its wall time. Commands: `cellmae qc --classic-only` (CellProfiler's metrics only), `cellmae qc`
(the bundled encoder and QC head as well) and `cellmae embed` (the bundled model). Target: QC's
peak within 2× of embed's.

    python benchmarks/bench_qc_memory.py [--size 8000] [--skip-embed] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = """
import resource, subprocess, sys, time
t0 = time.monotonic()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.monotonic() - t0
if done.returncode:
    sys.exit(done.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, seconds)
"""


def write_field(folder: Path, size: int) -> Path:
    import tifffile

    plate = folder / "BIG"
    plate.mkdir(parents=True)
    rng = np.random.default_rng(0)
    field = np.empty((size, size), np.uint16)
    for r in range(0, size, 500):  # in bands: the writer itself stays small
        band = rng.normal(1000, 200, (min(500, size - r), size))
        field[r : r + 500] = band.clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(plate / "BIG_A01_s1_w1.tif", field)
    return plate


def peak(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of ``argv`` run as a child of a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, check=True
    )
    kib, seconds = done.stdout.split()
    return int(kib) / 2**20, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8000, help="field side in pixels (8000)")
    parser.add_argument("--skip-embed", action="store_true", help="measure QC only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    cellmae = [sys.executable, "-m", "napari_cellmae.cli"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_qc_memory_"))
    try:
        plate = write_field(tmp, args.size)
        runs = {
            "qc --classic-only": [*cellmae, "qc", str(plate), "--classic-only"],
            "qc (encoder + head)": [*cellmae, "qc", str(plate)],
        }
        if not args.skip_embed:
            runs["embed"] = [*cellmae, "embed", str(plate), "--levels", "well"]
        results = {}
        for i, (name, argv) in enumerate(runs.items()):
            gib, seconds = peak([*argv, "--out", str(tmp / f"out{i}"), "--device", "cpu"])
            results[name] = {"peak_gib": round(gib, 2), "seconds": round(seconds, 1)}
            print(f"{name:<22} peak {gib:5.2f} GiB  {seconds:7.1f} s", flush=True)
        if "embed" in results:
            for name in [n for n in results if n.startswith("qc")]:
                ratio = results[name]["peak_gib"] / results["embed"]["peak_gib"]
                print(f"{name}: {ratio:.2f}× embed's peak (target <= 2)")
        field_gib = args.size**2 * 2 / 2**30
        print(
            json.dumps(
                {
                    "field": f"{args.size}x{args.size} uint16 ({field_gib:.3f} GiB)",
                    "machine": platform.processor() or platform.machine(),
                    **results,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
