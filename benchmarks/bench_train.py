"""Training throughput: one MAE training step (forward, backward, AdamW) in fp32 and in bf16
autocast, and the crop pipeline (random crop + flips + gamma jitter + channel subsets) that feeds
it, measured in one run on this machine.

    python benchmarks/bench_train.py [--preset cellmae_vit_tiny_patch16_256] [--batch-size 8]
        [--channels 5] [--steps 6] [--device auto]

Prints crops/s per precision, the bf16 ÷ fp32 speed-up, and how many crops/s the (single-thread)
crop pipeline makes ÷ what the fastest training step consumes (> 1: the loader keeps up).
"""

from __future__ import annotations

import argparse
import os
import time


def step_rate(preset: str, batch: int, channels: int, steps: int, device, dtype) -> float:
    """Crops per second of full training steps (after 2 warm-up steps)."""
    import torch

    from napari_cellmae.model import create_model
    from napari_cellmae.training import _autocast, _backward_and_step

    torch.manual_seed(0)
    module = create_model(preset).to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    imgs = torch.rand(batch, channels, 256, 256, device=device)
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with _autocast(device, dtype):
            loss, _, _ = module(imgs, 0.75)
        _backward_and_step(loss, module, opt, None, 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def crop_rate(channels: int, n: int = 64) -> float:
    """Crops per second of the augmentation pipeline on 1080×1080 uint16 fields, one thread."""
    from napari_cellmae.synthetic import make_field
    from napari_cellmae.training_data import make_batch, make_crop

    field = make_field(channels, 1080, seed=0)
    t0 = time.perf_counter()
    crops = [make_crop(field, seed=i) for i in range(n)]
    for i in range(0, n, 8):
        make_batch(crops[i : i + 8], seed=i, subset_prob=0.5)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cellmae_vit_tiny_patch16_256")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    import torch

    from napari_cellmae.devices import resolve_device

    device = resolve_device(None if args.device == "auto" else args.device)
    print(f"{args.preset}, batch {args.batch_size} × {args.channels} channels, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    rates = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        rates[name] = step_rate(
            args.preset, args.batch_size, args.channels, args.steps, device, dtype
        )
        print(f"  training step {name}: {rates[name]:.2f} crops/s")
    print(f"  bf16 ÷ fp32 speed-up: {rates['bf16'] / rates['fp32']:.2f}×")
    crops = crop_rate(args.channels)
    print(f"  crop pipeline (1 thread): {crops:.1f} crops/s = "
          f"{crops / max(rates.values()):.1f}× what the fastest step consumes")  # fmt: skip


if __name__ == "__main__":
    main()
