"""Whole-field masked reconstruction: seconds per field, and the share the field pipeline adds.

``reconstruct_field`` (tiling, seeded masks, the model, mean-fill baseline, stitching) is timed as
a whole while the time spent inside the model (``CellMAEModel.reconstruct``) is summed within the
same calls: the ratio model time ÷ total is measured on the very same runs, so load from other jobs
hits both alike. Also the time to write the outputs (``save_reconstruction``: four OME-TIFFs, the
PNG preview, the summary and the run record). Random weights (speed does not depend on them), a
synthetic 12-bit Cell Painting field.

    python benchmarks/bench_reconstruct.py                      # tiny preset, 1080² × 5, fp32+bf16
    python benchmarks/bench_reconstruct.py --size 2160 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from napari_cellmae.inference import CellMAEModel
from napari_cellmae.model import create_model
from napari_cellmae.progress import run
from napari_cellmae.reconstruct import reconstruct_field, save_reconstruction
from napari_cellmae.synthetic import make_field


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedModel:
    """The model, with the seconds spent in ``reconstruct`` summed up."""

    def __init__(self, model: CellMAEModel) -> None:
        self.model, self.seconds = model, 0.0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def reconstruct(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.model.reconstruct(*args, **kwargs)
        _sync()
        self.seconds += time.perf_counter() - t0
        return out


def timed_run(model: CellMAEModel, field) -> tuple[float, float]:
    """(total seconds, seconds inside the model) of one ``reconstruct_field``."""
    timed = TimedModel(model)
    t0 = time.perf_counter()
    run(reconstruct_field(timed, field))
    _sync()
    return time.perf_counter() - t0, timed.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cellmae_vit_tiny_patch16_256")
    parser.add_argument("--size", type=int, default=1080, help="field side in pixels")
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    field = make_field(n_channels=args.channels, size=args.size, seed=0)
    module = create_model(args.preset)
    print(
        f"{args.preset}, field {args.channels}×{args.size}×{args.size} {field.dtype}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print("dtype | tiles | field s (best) | in the model | model ÷ total | save s")
    for dtype in args.dtypes:
        model = CellMAEModel(module, args.device, dtype, name=args.preset)
        result = run(reconstruct_field(model, field))  # also the warm-up
        runs = [timed_run(model, field) for _ in range(args.repeats)]
        total, inside = min(runs)
        share = np.median([m / t for t, m in runs])
        with tempfile.TemporaryDirectory() as tmp:
            save = min(_save_time(result, tmp) for _ in range(args.repeats))
        print(
            f"{dtype} | {len(result.positions)} | {total:.2f} | {inside:.2f} | {share:.3f} | "
            f"{save:.2f}"
        )


def _save_time(result, folder: str) -> float:
    t0 = time.perf_counter()
    save_reconstruction(result, folder)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
