"""Does iter_fields overlap reading with the consumer's compute?

Writes a synthetic plate (LZW-compressed 16-bit TIFFs, 512², 5 channels), then times, in one run:
reading every field alone, the consumer's compute alone, both in series (``prefetch=0``) and both
with background read-ahead (``prefetch=4``). Prints the speed-up of read-ahead over the serial loop
and how close it gets to the ideal (the longer of read or compute).

``--compute accelerator`` stands in for a model running on a GPU (the CPU waits, idle, for a fixed
time per field: what read-ahead is for); ``--compute fft`` is CPU work (float32 FFTs), which on a
machine with one free core competes with decoding and cannot overlap.

    python benchmarks/bench_read.py [--fields 32] [--compression lzw] [--compute accelerator]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from napari_cellmae.plates import iter_fields, list_fields, scan_plate
from napari_cellmae.synthetic import write_plate


def compute(image: np.ndarray, kind: str, seconds: float) -> float:
    if kind == "accelerator":  # the GPU works, this thread waits without holding the GIL
        time.sleep(seconds)
        return 0.0
    x = image.astype(np.float32)
    return float(sum(np.abs(np.fft.rfft2(x)).mean() for _ in range(2)))


def timed(func) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=32)
    parser.add_argument("--compression", default="lzw")
    parser.add_argument("--compute", choices=["accelerator", "fft"], default="accelerator")
    parser.add_argument(
        "--seconds", type=float, default=0.02, help="accelerator time per field (default 0.02)"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_plate(
            tmp,
            "imagexpress",
            wells=args.fields,
            sites=1,
            n_channels=5,
            size=512,
            compression=args.compression,
        )
        index = scan_plate(tmp)
        n = len(list_fields(index))
        images = [r.image for r in iter_fields(index, prefetch=0)]  # warm the page cache

        read_s = timed(lambda: [r.image for r in iter_fields(index, prefetch=0)])
        compute_s = timed(lambda: [compute(im, args.compute, args.seconds) for im in images])

        def loop(prefetch: int) -> None:
            for r in iter_fields(index, prefetch=prefetch):
                compute(r.image, args.compute, args.seconds)

        serial_s = timed(lambda: loop(0))
        ahead_s = timed(lambda: loop(4))
    ideal = max(read_s, compute_s)
    print(
        f"{n} fields, {args.compression} TIFF, compute={args.compute}: read {read_s:.2f} s, "
        f"compute {compute_s:.2f} s, "
        f"read+compute serial {serial_s:.2f} s, with prefetch=4 {ahead_s:.2f} s"
    )
    print(
        f"speed-up of read-ahead: {serial_s / ahead_s:.2f}×; prefetched loop ÷ ideal "
        f"max(read, compute): {ahead_s / ideal:.2f}"
    )


if __name__ == "__main__":
    main()
