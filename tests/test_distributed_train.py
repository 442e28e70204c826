"""DistributedDataParallel training: 2 gloo processes on the CPU end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from napari_cellmae.hub import save_model
    from napari_cellmae.progress import run
    from napari_cellmae.synthetic import make_field
    from napari_cellmae.training import TrainConfig, train
    from napari_cellmae.training_data import ArraySource

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fields = [make_field(2, 256, seed=i) for i in range(5)]
        cfg = TrainConfig(
            out=f"{folder}/model",
            from_scratch="cellmae_vit_test_patch16_256",
            epochs=1,
            batch_size=2,
            crops_per_field=2,
            lr=1e-3,
            precision="fp32",
            device="cpu",
            val_crops=2,
            register=False,
        )
        result = run(train(cfg, ArraySource(fields[:4], val_fields=fields[4:])))
        # every rank's final weights, for the parent to compare
        save_model(result.module, f"{folder}/rank{rank}")
        Path(folder, f"rank{rank}.steps").write_text(str(result.metrics["steps"]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    from napari_cellmae.hub import read_state_dict

    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w0, _ = read_state_dict(tmp_path / "rank0" / "model.safetensors")
    w1, _ = read_state_dict(tmp_path / "rank1" / "model.safetensors")
    final, _ = read_state_dict(tmp_path / "model" / "model.safetensors")  # written by rank 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w0[k], final[k]) for k in w0)
    # the 2 processes shared the epoch: 4 fields × 2 crops / (batch 2 × 2 processes) = 2 steps
    assert (tmp_path / "rank0.steps").read_text() == (tmp_path / "rank1.steps").read_text() == "2"


@pytest.mark.slow
def test_torchrun_cli(small_screen, tmp_path):
    """The documented command: torchrun --nproc-per-node 2 -m napari_cellmae.cli finetune …"""
    plate, _ = small_screen
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "napari_cellmae.cli",
        "finetune",
        str(plate),
        "--from-scratch",
        "cellmae_vit_test_patch16_256",
        "--out",
        str(tmp_path / "ddp-model"),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp-model" / "config.json").is_file()
    assert '"processes": 2' in (tmp_path / "ddp-model" / "config.json").read_text()
