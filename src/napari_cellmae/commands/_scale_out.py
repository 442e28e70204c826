"""The scale-out options that ``cellmae embed`` and ``cellmae qc`` share (not a subcommand).

They map onto :class:`napari_cellmae.executors.ExecutorConfig` and
:class:`~napari_cellmae.executors.Shard`; see docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser, what: str = "well") -> None:
    """Add the scale-out argument group to ``parser``."""
    group = parser.add_argument_group(
        "scale-out", "run whole screens on several workers, a Dask cluster or a job array"
    )
    group.add_argument(
        "--executor",
        default="serial",
        choices=("serial", "threads", "processes", "dask"),
        help=f"where the {what} tasks run: serial (this process, default), threads, processes "
        "(this machine) or dask (a cluster; implied by the options below)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads/processes: pool size (default: 2 threads, one process per core)",
    )
    group.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="dask: a running scheduler (tcp://host:8786) or its scheduler file; the workers "
        "need napari-cellmae and must see the plate and output folders at the same paths",
    )
    group.add_argument(
        "--local-workers",
        type=int,
        default=None,
        metavar="N",
        help="dask: start N worker processes here (default: one per GPU, each seeing only its "
        "own GPU via CUDA_VISIBLE_DEVICES; one without GPU)",
    )
    group.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        metavar="N",
        help=f"dask local workers: {what}s per worker at once (default: 1 on a GPU, else the "
        "cores divided among the workers)",
    )
    group.add_argument(
        "--slurm-jobs",
        type=int,
        default=None,
        metavar="N",
        help="dask: submit N SLURM jobs as workers (dask-jobqueue, in the [distributed] extra)",
    )
    group.add_argument("--slurm-queue", default=None, metavar="PARTITION", help="SLURM partition")
    group.add_argument("--slurm-account", default=None, metavar="ACCOUNT", help="SLURM account")
    group.add_argument(
        "--slurm-cores", type=int, default=8, metavar="N", help="cores per job (default: 8)"
    )
    group.add_argument(
        "--slurm-memory", default="32GB", metavar="SIZE", help="memory per job (default: 32GB)"
    )
    group.add_argument(
        "--slurm-gpus",
        type=int,
        default=0,
        metavar="N",
        help="GPUs per job, one worker process each (default: 0)",
    )
    group.add_argument(
        "--slurm-walltime",
        default="04:00:00",
        metavar="HH:MM:SS",
        help="wall time per job (default: 04:00:00); a job that ends early loses only its "
        f"unfinished {what}s",
    )
    group.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        metavar="N",
        help=f"{what}s submitted at once (default: twice what the workers run at once)",
    )
    group.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help=f"process only shard K of N of the {what}s (1 <= K <= N; a job array without "
        "Dask, e.g. --shard ${SLURM_ARRAY_TASK_ID}/8); the shard that finds every well done "
        "writes the final tables",
    )
    group.add_argument(
        "--assemble",
        action="store_true",
        help=f"process nothing: write the final tables from the {what}s the shards wrote "
        "(every well must be there)",
    )


def executor_config(args: argparse.Namespace) -> Any:
    """The :class:`~napari_cellmae.executors.ExecutorConfig` of the parsed options."""
    from ..executors import ExecutorConfig

    return ExecutorConfig(
        kind=args.executor,
        workers=args.workers,
        scheduler=args.scheduler,
        local_workers=args.local_workers,
        threads_per_worker=args.threads_per_worker,
        slurm_jobs=args.slurm_jobs,
        slurm_queue=args.slurm_queue,
        slurm_account=args.slurm_account,
        slurm_cores=args.slurm_cores,
        slurm_memory=args.slurm_memory,
        slurm_gpus=args.slurm_gpus,
        slurm_walltime=args.slurm_walltime,
        max_in_flight=args.max_in_flight,
    )


def shard(args: argparse.Namespace) -> Any:
    """The :class:`~napari_cellmae.executors.Shard` of ``--shard`` (None without it)."""
    from ..executors import Shard

    if args.shard is None:
        return None
    if args.assemble:
        raise ValueError("--assemble gathers every shard's wells: leave out --shard")
    return Shard.parse(args.shard)


def say(message: str) -> None:
    """One line on stderr beside the progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def pending_message(pending: int, what: str) -> str:
    """What a shard that is not the last one says about the final tables."""
    return (
        f"{pending} {what}(s) of other shards not written yet: the shard that finishes last "
        "writes the final tables (or run the same command with --assemble once every shard is "
        "done)"
    )
