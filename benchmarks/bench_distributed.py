"""Does embedding a screen scale with Dask workers? Throughput with 1 vs 2 local workers.

A synthetic plate (LZW-compressed 16-bit TIFFs, 512², 4 crops per field) is embedded by
``embed_plates`` on a local Dask cluster (:mod:`napari_cellmae.executors`) of 1 worker process
and of 2 worker processes, each worker running one well at a time with one torch thread (what a
CPU worker gets: Dask sets ``OMP_NUM_THREADS=1``). Both clusters are started and warmed up first
(every worker has imported torch and loaded the model), then the runs alternate, each into a
fresh output folder, so startup is not timed and both configurations see the same load.

Printed: crops/s of every run, the best of each, and the **ratio** 2 workers ÷ 1 worker (ideal 2×
on 2 idle cores, less on a shared machine), plus the load average before and after. Also a
serial in-process run (the streaming pipeline, torch on every core) for reference.

Random weights (speed does not depend on them); the bundled architecture by default.

    python benchmarks/bench_distributed.py [--preset cellmae_vit_tiny_patch16_256] [--wells 8]
        [--sites 2] [--repeats 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def warm_up(source: str, precision: str) -> None:
    """In a worker: import torch and load the model into the per-process cache."""
    from napari_cellmae.executors import cached_model

    cached_model(source, "cpu", precision, encoder_only=True)


def timed_run(plate: Path, out: Path, config, model, executor) -> tuple[float, int]:
    """Seconds and crops of one ``embed_plates`` into a fresh folder."""
    from napari_cellmae.embed import embed_plates
    from napari_cellmae.progress import run

    t0 = time.perf_counter()
    result = run(embed_plates([plate], out, config, model=model, executor=executor))
    seconds = time.perf_counter() - t0
    assert result.n_errors == 0 and result.n_wells_pending == 0
    return seconds, result.n_crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cellmae_vit_tiny_patch16_256")
    parser.add_argument("--wells", type=int, default=8)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "Port 8787 is already in use")  # two clusters at once

    import torch

    from napari_cellmae import load_model
    from napari_cellmae.devices import available_devices
    from napari_cellmae.embed import EmbedConfig
    from napari_cellmae.executors import ExecutorConfig, open_executor
    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model
    from napari_cellmae.synthetic import write_plate

    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    plate = write_plate(
        tmp / "plate",
        "imagexpress",
        wells=args.wells,
        sites=args.sites,
        n_channels=args.channels,
        size=512,
        compression="lzw",
        seed=3,
    )
    torch.manual_seed(0)
    model_dir = tmp / "model"
    save_model(create_model(args.preset), model_dir)
    config = EmbedConfig(
        model=str(model_dir),
        device="cpu",
        precision=args.precision,
        batch_size=args.batch_size,
        prefetch=2,
    )
    model = load_model(model_dir, device="cpu", encoder_only=True, precision=args.precision)
    fields = args.wells * args.sites
    cpu = next(d for d in available_devices() if d.name == "cpu")
    print(f"machine: {cpu.description}, {platform.python_version()}, torch {torch.__version__}")
    print(
        f"plate: {fields} fields ({args.wells} wells × {args.sites} sites) of "
        f"{args.channels}×512² LZW TIFFs, {args.preset}, {args.precision}, batch "
        f"{args.batch_size}; load average before: {load_average()}"
    )

    rates: dict[str, list[float]] = {"1 worker": [], "2 workers": [], "serial": []}
    with (
        open_executor(ExecutorConfig("dask", local_workers=1, threads_per_worker=1), "cpu") as one,
        open_executor(ExecutorConfig("dask", local_workers=2, threads_per_worker=1), "cpu") as two,
    ):
        for executor in (one, two):  # warm-up: torch imported and the model loaded everywhere
            executor._client.run(warm_up, str(model_dir), args.precision)
        for r in range(args.repeats):
            for name, executor in (("1 worker", one), ("2 workers", two), ("serial", None)):
                seconds, crops = timed_run(
                    plate, tmp / f"out-{name}-{r}".replace(" ", ""), config, model, executor
                )
                rates[name].append(crops / seconds)
                print(
                    f"  round {r + 1} {name:<9}: {crops} crops in {seconds:6.2f} s = "
                    f"{crops / seconds:6.2f} crops/s"
                )
    best = {name: max(values) for name, values in rates.items()}
    print(f"load average after: {load_average()}")
    for name, value in best.items():
        print(f"best {name:<9}: {value:6.2f} crops/s")
    print(
        f"ratio 2 workers / 1 worker: {best['2 workers'] / best['1 worker']:.2f}x (best of "
        f"{args.repeats}); per round: "
        + ", ".join(f"{b / a:.2f}" for a, b in zip(rates["1 worker"], rates["2 workers"]))
    )
    print(f"ratio 2 workers / serial in-process: {best['2 workers'] / best['serial']:.2f}x")


if __name__ == "__main__":
    main()
