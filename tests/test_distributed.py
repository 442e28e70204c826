"""Scale-out: a local Dask cluster of 2 worker processes gives the serial tables (embed and QC), a
worker killed mid-run then a rerun leaves no gap and no duplicate, --shard halves cover the plate
exactly once, the CLI options, and the executor helpers (window, GPUs, SLURM)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_cellmae.cli import main
from napari_cellmae.embed import EmbedConfig, embed_plates, embedding_columns, well_dir
from napari_cellmae.executors import (
    ExecutorConfig,
    SerialExecutor,
    Shard,
    map_bounded,
    open_executor,
    pin_gpu,
    plan_local_workers,
    slurm_options,
)
from napari_cellmae.progress import run
from napari_cellmae.synthetic import write_plate

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:Port 8787 is already in use"),  # two clusters at once
]

CONFIG = EmbedConfig(batch_size=4, precision="fp32", device="cpu", prefetch=1)
WELLS = [f"A{c:02d}" for c in range(1, 7)]
KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Crop", "Metadata_Channel"]


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    """6 wells × 1 site × 2 channels, 300 px (4 crops a field), A02 channel 2 defocused."""
    import tifffile

    from napari_cellmae.qc.artefacts import apply_artefact

    root = tmp_path_factory.mktemp("screen") / "plate"
    write_plate(root, "imagexpress", wells=6, sites=1, n_channels=2, size=300, seed=3)
    blurred = next(root.rglob("SYNTH-P1_A02_s1_w2*.tif"))
    tifffile.imwrite(blurred, apply_artefact(tifffile.imread(blurred), "defocus", 5, seed=0))
    return root


@pytest.fixture(scope="module")
def model(test_model_dir):
    from napari_cellmae import load_model

    return load_model(test_model_dir, device="cpu", encoder_only=True, precision="fp32")


@pytest.fixture(scope="module")
def config(test_model_dir) -> EmbedConfig:
    from dataclasses import replace

    return replace(CONFIG, model=str(test_model_dir))


@pytest.fixture(scope="module")
def serial(plate, model, config, tmp_path_factory) -> Path:
    """The reference: the serial streaming run."""
    out = tmp_path_factory.mktemp("serial") / "emb"
    run(embed_plates([plate], out, config, model=model))
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Dask cluster of 2 worker processes × 1 thread (CPU). A task whose worker dies
    fails at once (allowed-failures 0) instead of being retried, so the rerun must finish it."""
    import dask

    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        open_executor(ExecutorConfig("dask", local_workers=2), device="cpu") as executor,
    ):
        yield executor


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keys = [k for k in KEYS if k in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def assert_same_tables(got: Path, want: Path, names=("crops", "fields", "wells", "features")):
    """Same rows, same metadata, same values (embeddings to float32 rounding)."""
    for name in names:
        a = _sorted(pd.read_parquet(got / f"{name}.parquet"))
        b = _sorted(pd.read_parquet(want / f"{name}.parquet"))
        meta = [c for c in a.columns if c.startswith("Metadata_")]
        assert not a.duplicated(meta).any(), name
        emb = embedding_columns(a)
        pd.testing.assert_frame_equal(a.drop(columns=emb), b.drop(columns=emb))
        np.testing.assert_allclose(a[emb], b[emb], atol=1e-5, err_msg=name)
    assert len(pd.read_parquet(got / "errors.parquet")) == 0


# -- a local cluster of processes -----------------------------------------------------------------
def test_two_worker_processes_give_the_serial_tables(
    plate, model, config, serial, cluster, tmp_path
):
    import json

    pids = cluster._client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()  # real processes
    threads = cluster._client.run(lambda: __import__("torch").get_num_threads())
    assert set(threads.values()) == {1}  # 2 workers × 1 thread × 1 torch thread = 2 cores

    out = tmp_path / "emb"
    events = []
    result = run(embed_plates([plate], out, config, model=model, executor=cluster), events.append)
    assert (result.n_wells, result.n_fields, result.n_errors) == (6, 6, 0)
    assert events[-1].done == events[-1].total == 6
    assert_same_tables(out, serial)
    record = json.loads((out / "config.json").read_text())
    assert record["status"] == "complete" and record["workers"] == ["cpu fp32"]


def test_qc_on_the_cluster_gives_the_serial_report(
    plate, test_model_dir, qc_head_file, cluster, tmp_path
):
    from napari_cellmae import load_model
    from napari_cellmae.qc import QCHead, run_qc

    model = load_model(test_model_dir, device="cpu")
    head = QCHead.load(qc_head_file)
    ref = run(run_qc(plate, tmp_path / "serial", model, head))
    got = run(run_qc(plate, tmp_path / "dask", model, head, executor=cluster, device="cpu"))
    assert got["method"] == ref["method"] == "head" and got["pending_wells"] == 0
    assert sorted(p.stem for p in (tmp_path / "dask" / "wells" / "SYNTH-P1").iterdir()) == WELLS
    for name in ("qc_images", "qc_fields", "qc_summary", "passing_fields"):
        a = pd.read_parquet(tmp_path / "dask" / f"{name}.parquet")
        b = pd.read_parquet(tmp_path / "serial" / f"{name}.parquet")
        num = [c for c in a.columns if pd.api.types.is_float_dtype(a[c])]
        pd.testing.assert_frame_equal(a.drop(columns=num), b.drop(columns=num))  # same verdicts
        np.testing.assert_allclose(a[num], b[num], rtol=1e-4, atol=1e-6, err_msg=name)
    blurred = got["fields"].set_index("Metadata_Well").loc["A02"]
    assert blurred["QC_Flag"] and "w2" in blurred["QC_Reason"]


def test_a_killed_worker_then_a_rerun_leaves_no_gap_and_no_duplicate(
    plate, model, config, serial, cluster, tmp_path
):
    out = tmp_path / "emb"
    marker = str(tmp_path / "killed-once")

    def install_a_fatal_write(marker=marker):
        """In each worker: the first process to write A03 leaves a half-written folder behind
        and dies at once (SIGKILL: no cleanup, as an out-of-memory kill or a lost node)."""
        import signal

        import napari_cellmae.embed as embed

        real = embed.write_well

        def write_well(tables, path):
            path = Path(path)
            if path.name == "A03" and not os.path.exists(marker):
                Path(marker).touch()
                half = path.parent / ".A03.k1ll3d.part"
                half.mkdir(parents=True)
                (half / "fields.parquet").write_bytes(b"PAR1 half")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tables, path)

        embed.write_well = write_well

    client = cluster._client
    client.run(install_a_fatal_write)
    first = run(embed_plates([plate], out, config, model=model, executor=cluster))
    errors = pd.read_parquet(out / "errors.parquet")
    assert "A03" in set(errors["Metadata_Well"]) and os.path.exists(marker)
    assert (errors["error_type"] == "KilledWorker").all()
    lost = sorted(errors["Metadata_Well"])  # A03, and any task queued on the same worker
    assert first.n_wells == 6 - len(lost)
    assert not well_dir(out, "SYNTH-P1", "A03").exists()
    assert (out / "SYNTH-P1" / "wells" / ".A03.k1ll3d.part").is_dir()

    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
    again = run(embed_plates([plate], out, config, model=model, executor=cluster))
    assert again.n_wells_skipped == 6 - len(lost) and again.n_wells == 6
    assert not list((out / "SYNTH-P1" / "wells").glob(".*"))  # the half-written folder is gone
    assert_same_tables(out, serial)


def test_cli_runs_on_a_local_cluster_and_on_a_running_scheduler(
    plate, test_model_dir, serial, cluster, tmp_path, capsys
):
    qc = ["qc", str(plate), "--classic-only", "--out"]
    assert main([*qc, str(tmp_path / "qc-serial")]) == 0
    assert main([*qc, str(tmp_path / "qc"), "--executor", "dask", "--local-workers", "2"]) == 0
    text = capsys.readouterr()
    assert "a local Dask cluster of 2 worker process(es) × 1 thread(s)" in text.err
    assert "judged by: classic" in text.out and "SYNTH-P1: " in text.out
    assert main([*qc, str(tmp_path / "qc-pool"), "--executor", "processes", "--workers", "2"]) == 0
    assert "processes: 2 worker processes, 1 torch thread(s) each" in capsys.readouterr().err
    for name in ("qc_images", "qc_fields", "passing_images"):
        want = pd.read_parquet(tmp_path / "qc-serial" / f"{name}.parquet")
        for run_ in ("qc", "qc-pool"):
            got = pd.read_parquet(tmp_path / run_ / f"{name}.parquet")
            pd.testing.assert_frame_equal(got, want)

    address = cluster._client.scheduler.address
    argv = ["embed", str(plate), "--model", str(test_model_dir), "--device", "cpu"]
    argv += ["--batch-size", "4", "--precision", "fp32", "--prefetch", "1"]
    assert main([*argv, "--out", str(tmp_path / "emb"), "--scheduler", address]) == 0
    text = capsys.readouterr()
    assert f"the Dask cluster at {address}" in text.err
    assert "embedded 6 fields (24 crops) in 6 wells" in text.out
    assert_same_tables(tmp_path / "emb", serial)


# -- shards: job arrays without Dask -------------------------------------------------------------
def test_shard_halves_cover_the_plate_exactly_once(plate, model, config, serial, tmp_path):
    out = tmp_path / "emb"
    first = run(embed_plates([plate], out, config, model=model, shard="1/2"))
    half = {p.name for p in (out / "SYNTH-P1" / "wells").iterdir()}
    assert first.n_wells_pending == 3 and first.tables == {} and len(half) == 3
    assert not (out / "wells.parquet").exists()  # the other half is missing: no tables yet
    with pytest.raises(ValueError, match=r"3 of 6 wells are not embedded yet .*--shard"):
        run(embed_plates([plate], out, config, model=model, assemble_only=True))

    second = run(embed_plates([plate], out, config, model=model, shard=Shard(2, 2)))
    other = {p.name for p in (out / "SYNTH-P1" / "wells").iterdir()} - half
    assert half.isdisjoint(other) and half | other == set(WELLS) and len(other) == 3
    assert second.n_wells_pending == 0 and second.n_wells == 6  # the last shard assembled
    assert_same_tables(out, serial)
    again = run(embed_plates([plate], out, config, model=model, assemble_only=True))
    assert again.n_fields == 6 and again.n_wells_skipped == 0
    assert_same_tables(out, serial)

    # the partition is deterministic, balanced, and the same whatever the key order
    keys = [("P2", f"B{i:02d}") for i in range(7)] + [("P1", f"A{i:02d}") for i in range(7)]
    parts = [Shard(k, 3).owned(keys) for k in (1, 2, 3)]
    assert sorted(len(p) for p in parts) == [4, 5, 5] and set().union(*parts) == set(keys)
    assert Shard(2, 3).owned(reversed(keys)) == parts[1]


def test_embed_shards_through_the_cli(plate, test_model_dir, serial, tmp_path, capsys):
    argv = ["embed", str(plate), "--model", str(test_model_dir), "--device", "cpu"]
    argv += ["--batch-size", "4", "--precision", "fp32", "--out", str(tmp_path / "emb")]
    assert main([*argv, "--shard", "2/2"]) == 0
    text = capsys.readouterr().out
    assert "shard 2/2: 3 wells embedded so far" in text and "3 well(s) of other shards" in text
    assert main([*argv, "--shard", "1/2"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 6 fields (24 crops) in 6 wells; " in printed and "failed" not in printed
    assert_same_tables(tmp_path / "emb", serial)


def test_qc_shards_through_the_cli_match_the_serial_report(
    plate, test_model_dir, qc_head_file, tmp_path, capsys
):
    base = ["qc", str(plate), "--classic-only"]
    assert main([*base, "--out", str(tmp_path / "serial")]) == 0
    out = str(tmp_path / "sharded")
    assert main([*base, "--out", out, "--shard", "2/2"]) == 0
    assert (
        "shard 2/2: measured; 3 well(s) of other shards not written yet" in capsys.readouterr().out
    )
    assert not (tmp_path / "sharded" / "qc_fields.parquet").exists()
    assert main([*base, "--out", out, "--assemble"]) == 2
    assert "3 of 6 wells are not measured yet" in capsys.readouterr().err
    assert main([*base, "--out", out, "--shard", "1/2"]) == 0
    assert "fields pass" in capsys.readouterr().out  # the last shard judged and reported
    for name in ("qc_images", "qc_fields", "qc_summary", "passing_images"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "sharded" / f"{name}.parquet"),
            pd.read_parquet(tmp_path / "serial" / f"{name}.parquet"),
        )
    other = ["qc", str(plate), "--out", out, "--shard", "1/2", "--z-threshold", "3"]
    assert main([*other, "--classic-only"]) == 0  # the judging settings may change on a rerun
    head = ["--head", str(qc_head_file), "--model", str(test_model_dir), "--device", "cpu"]
    assert main(["qc", str(plate), "--out", out, "--shard", "1/2", *head]) == 2  # measuring: no
    assert "wells measured with other settings" in capsys.readouterr().err


def test_cli_options_are_documented_and_checked(plate, tmp_path, capsys):
    for command in ("embed", "qc"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in (
            "--executor", "--workers", "--scheduler", "--local-workers", "--threads-per-worker",
            "--slurm-jobs", "--slurm-queue", "--slurm-account", "--slurm-cores", "--slurm-memory",
            "--slurm-gpus", "--slurm-walltime", "--max-in-flight", "--shard", "--assemble",
        ):  # fmt: skip
            assert option in text, (command, option)
    out = ["--out", str(tmp_path / "x")]
    assert main(["embed", str(plate), *out, "--shard", "3/2"]) == 2
    assert "1 <= K <= N" in capsys.readouterr().err
    assert main(["embed", str(plate), *out, "--shard", "half"]) == 2
    assert "is not K/N" in capsys.readouterr().err
    assert main(["qc", str(plate), *out, "--executor", "threads", "--local-workers", "2"]) == 2
    assert "need --executor dask" in capsys.readouterr().err
    assert main(["embed", str(plate), *out, "--shard", "1/2", "--assemble"]) == 2
    assert "leave out --shard" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- the executor helpers -------------------------------------------------------------------------
def test_tasks_in_flight_stay_within_the_window():
    lock, running, peak = threading.Lock(), [0], [0]

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i * i

    submitted = []
    with ThreadPoolExecutor(8) as pool:
        tasks = (submitted.append(i) or i for i in range(40))
        results = {}
        for i, future in map_bounded(pool, task, tasks, max_in_flight=3):
            results[i] = future.result()
            assert len(submitted) - len(results) <= 3  # never more than 3 submitted unfinished
    assert results == {i: i * i for i in range(40)} and peak[0] <= 3
    done = [t for t, _ in map_bounded(SerialExecutor(), task, range(5))]
    assert done == list(range(5))


def test_cached_model_loads_once_per_process(monkeypatch):
    import napari_cellmae.executors as executors
    import napari_cellmae.hub as hub

    calls = []
    monkeypatch.setattr(hub, "load_model", lambda *a, **k: calls.append((a, k)) or object())
    monkeypatch.setattr(executors, "_MODELS", executors.OrderedDict())
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: executors.cached_model("m", "cpu"), range(8)))
    assert len(calls) == 1 and all(m is models[0] for m in models)
    executors.cached_model("other", "cpu")
    executors.cached_model("third", "cpu")
    assert len(executors._MODELS) == executors.MAX_CACHED_MODELS


def test_local_workers_get_one_gpu_each_or_share_the_cores():
    plans = plan_local_workers(None, "auto", gpus=["2", "3"], cpu_count=16)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["2", "3"]
    assert [p.nthreads for p in plans] == [1, 1] and plans[0].env["OMP_NUM_THREADS"] == "8"
    three = plan_local_workers(3, "cuda", gpus=["0", "1"], cpu_count=16)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in three] == ["0", "1", "0"]
    cpu = plan_local_workers(2, "cpu", gpus=["0"], cpu_count=8)
    assert [p.nthreads for p in cpu] == [4, 4] and cpu[0].env["OMP_NUM_THREADS"] == "1"
    assert cpu[0].env["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(ValueError, match="each worker gets its own GPU"):
        plan_local_workers(2, "cuda:1", gpus=["0", "1"])
    with pytest.raises(ValueError, match="no CUDA GPU"):
        plan_local_workers(2, "cuda", gpus=[])


def test_slurm_jobs_pin_one_gpu_per_worker_process(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert pin_gpu("cellmae-job-1") == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert pin_gpu("cellmae-job-1") is None  # one GPU left: nothing to choose

    config = ExecutorConfig(
        slurm_jobs=4, slurm_queue="gpu", slurm_gpus=2, slurm_cores=16, slurm_memory="64GB"
    )
    assert config.kind == "dask"  # --slurm-jobs implies --executor dask
    options = slurm_options(config)
    assert options["processes"] == 2 and options["job_extra_directives"] == ["--gres=gpu:2"]
    assert options["worker_extra_args"] == ["--resources", "GPU=1"]
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(**options, scheduler_options={"dashboard_address": None}) as slurm:
        script = slurm.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=16", "#SBATCH --gres=gpu:2"):
        assert line in script
    assert "--nworkers 2" in script and "--resources GPU=1" in script

    import sys

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    with (
        pytest.raises(ValueError, match=r"dask-jobqueue, which is not installed.*\[distributed\]"),
        open_executor(config),
    ):
        pass


def test_executor_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown"):
        ExecutorConfig("spark")
    with pytest.raises(ValueError, match="leave out --local-workers"):
        ExecutorConfig(scheduler="tcp://x:8786", local_workers=2)
    with pytest.raises(ValueError, match="--local-workers must be >= 1"):
        ExecutorConfig(local_workers=0)
    assert ExecutorConfig(local_workers=2).kind == "dask"
