"""Is the embedding pipeline as fast as the model, and is its memory independent of plate size?

On a synthetic plate (LZW-compressed 16-bit TIFFs, 512², 5 channels, 4 crops per field), in one
run:

1. **Throughput ratio**: end-to-end crops/s of ``embed_plates`` (scan, read-ahead, tiling, baseline
   statistics, model, per-well parquet, final tables) divided by model-only crops/s
   (``model.embed`` on the same crops already in memory, same batch size). Target >= 0.85: reading
   and writing hidden behind the model. Reported with and without the baseline statistics.
2. **Peak memory**: the RSS high-water mark (Linux ``VmHWM``, reset once the model and the
   libraries are loaded) of a fresh process that embeds the plate, and of one that embeds a plate
   4× larger. Target: within 10%. Also printed: how much the RSS grew while embedding.

Random weights (speed does not depend on them); the bundled architecture by default.

    python benchmarks/bench_pipeline.py [--preset cellmae_vit_tiny_patch16_256] [--wells 8]
        [--sites 2] [--device cpu] [--precision auto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write(folder: Path, wells: int, sites: int, size: int, channels: int, name: str) -> Path:
    from napari_cellmae.synthetic import write_plate

    return write_plate(
        folder,
        "imagexpress",
        wells=wells,
        sites=sites,
        n_channels=channels,
        size=size,
        compression="lzw",
        plate_name=name,
        seed=3,
    )


def plate_crops(model, plate: Path) -> np.ndarray:
    """Every crop of the plate, in memory (N, C, 256, 256)."""
    from napari_cellmae.plates import iter_fields, scan_plate

    return np.concatenate(
        [model.field_crops(image)[0] for _, image, _ in iter_fields(scan_plate(plate))]
    )


def model_only(model, crops: np.ndarray, batch_size: int) -> float:
    """Seconds of model.embed over ``crops`` already in memory."""
    t0 = time.perf_counter()
    model.embed(crops, batch_size=batch_size)
    return time.perf_counter() - t0


def end_to_end(model, plate: Path, out: Path, batch_size: int, features: bool) -> tuple[float, int]:
    """Seconds and crops of embed_plates into a fresh folder."""
    from napari_cellmae.embed import EmbedConfig, embed_plates
    from napari_cellmae.progress import run

    config = EmbedConfig(batch_size=batch_size, features=features)
    t0 = time.perf_counter()
    result = run(embed_plates([plate], out, config, model=model))
    return time.perf_counter() - t0, result.n_crops


def peak_rss_child(plate: Path, out: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(plate),
        str(out),
        str(model_dir),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` memory line (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child(plate: str, out: str, model_dir: str, device: str, precision: str) -> None:
    """Load the model, reset the RSS high-water mark, embed the plate, print the marks as JSON."""
    from napari_cellmae import load_model
    from napari_cellmae.embed import EmbedConfig, embed_plates
    from napari_cellmae.progress import run

    model = load_model(model_dir, device=device, encoder_only=True, precision=precision)
    model.embed(np.zeros((4, 5, 256, 256), np.uint16))  # allocator warm-up at the batch shape
    # the libraries the pipeline loads once (parquet, scikit-image): not the plate's memory
    import pyarrow.parquet  # noqa: F401
    from skimage.feature import graycomatrix  # noqa: F401
    from skimage.filters import threshold_otsu  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    loaded = _status_kib("VmHWM")
    result = run(embed_plates([plate], out, EmbedConfig(), model=model))
    print(
        json.dumps(
            {
                "fields": result.n_fields,
                "rss_loaded_kib": loaded,
                "rss_peak_kib": _status_kib("VmHWM"),
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cellmae_vit_tiny_patch16_256")
    parser.add_argument("--wells", type=int, default=8, help="wells of the small plate")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--child", nargs=3, metavar=("PLATE", "OUT", "MODEL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.device, args.precision)
        return

    import torch

    from napari_cellmae import load_model
    from napari_cellmae.hub import save_model
    from napari_cellmae.inference import default_batch_size
    from napari_cellmae.model import create_model

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_model(create_model(args.preset), tmp / "model")
        model = load_model(
            tmp / "model", device=args.device, encoder_only=True, precision=args.precision
        )
        bs = args.batch_size or default_batch_size(model.device)
        small = write(tmp, args.wells, args.sites, args.size, args.channels, "SMALL")
        n_fields = args.wells * args.sites
        print(
            f"model {args.preset} ({model.precision}), batch {bs}; plate {n_fields} fields "
            f"({args.wells} wells × {args.sites} sites) of {args.channels}×{args.size}² LZW TIFF"
        )
        crops = plate_crops(model, small)
        model.embed(crops[:bs], batch_size=bs)  # warm-up
        # interleaved, best of each: other jobs on the machine slow all three alike
        best = {"model": np.inf, "e2e": np.inf, "plain": np.inf}
        for r in range(args.repeats):
            best["model"] = min(best["model"], model_only(model, crops, bs))
            for key, features in (("e2e", True), ("plain", False)):
                seconds, n = end_to_end(model, small, tmp / f"{key}{r}", bs, features)
                assert n == len(crops)
                best[key] = min(best[key], seconds)
        rate = {k: len(crops) / v for k, v in best.items()}
        print(f"model only:              {rate['model']:8.2f} crops/s ({len(crops)} crops)")
        for key, name in (("e2e", "embed_plates"), ("plain", "  without baseline stats")):
            print(f"{name:<24} {rate[key]:8.2f} crops/s   ratio {rate[key] / rate['model']:.3f}")
        print(f"load average now: {os.getloadavg()[0]:.1f} (other jobs on this machine)")
        if args.skip_memory:
            return
        large = write(tmp, 4 * args.wells, args.sites, args.size, args.channels, "LARGE")
        a = peak_rss_child(small, tmp / "mem-small", tmp / "model", args)
        b = peak_rss_child(large, tmp / "mem-large", tmp / "model", args)
        for name, m in (("plate", a), ("plate ×4", b)):
            growth = (m["rss_peak_kib"] - m["rss_loaded_kib"]) / 1024
            print(
                f"peak RSS, {name:<8}: {m['rss_peak_kib'] / 1024:7.1f} MiB ({m['fields']} fields;"
                f" {m['rss_loaded_kib'] / 1024:.1f} MiB with the model loaded, +{growth:.1f} MiB "
                "while embedding)"
            )
        print(f"peak RSS ratio ×4 / ×1: {b['rss_peak_kib'] / a['rss_peak_kib']:.3f}")
        grow_a = a["rss_peak_kib"] - a["rss_loaded_kib"]
        grow_b = b["rss_peak_kib"] - b["rss_loaded_kib"]
        print(f"growth while embedding, ×4 / ×1: {grow_b / max(grow_a, 1):.2f}")


if __name__ == "__main__":
    main()
