"""Scale-out: one task per well on any ``concurrent.futures``-style executor, or one shard of them.

The embedding and QC pipelines cut a screen into wells; each well task writes its own output,
atomically, at a fixed path, so whoever runs it (a thread, a process, a Dask worker on another
machine, a job of a SLURM array) the output is the same and a rerun skips what is done. This
module is the seam between those pipelines and the machines that run them:

- :class:`ExecutorConfig` + :func:`open_executor`: ``serial`` (none: the pipeline's own streaming
  loop), ``threads``, ``processes`` (spawned, torch threads split between them), ``dask`` on an
  existing scheduler, a local cluster (one worker per GPU, each seeing only its own GPU through
  ``CUDA_VISIBLE_DEVICES``) or SLURM jobs through dask-jobqueue;
- :func:`map_bounded`: submit a window of tasks, never the whole screen, and hand back each as it
  finishes;
- :func:`cached_model`: the model of a task, loaded once per worker process;
- :class:`Shard`: a deterministic partition of the wells for job arrays without Dask.

This is the only module that imports Dask, and only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

EXECUTORS = ("serial", "threads", "processes", "dask")
INSTALL_HINT = "pip install 'napari-cellmae[distributed]'"


# -- shards: job arrays without a scheduler ------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based, as in ``--shard 2/8``).

    The wells of all plates, sorted by (plate, well), are dealt round-robin: well ``i`` (0-based)
    belongs to shard ``i % count + 1``. Every shard computes the same partition from the same
    plate folders, so the shards of a job array cover each well exactly once.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ValueError(
                f"shard {self.index}/{self.count} is impossible: use K/N with 1 <= K <= N "
                "(e.g. --shard ${SLURM_ARRAY_TASK_ID}/8 with #SBATCH --array=1-8)"
            )

    @classmethod
    def parse(cls, text: str | Shard | Sequence[int]) -> Shard:
        """``"2/8"``, ``(2, 8)`` or a Shard -> Shard (ValueError naming the expected form)."""
        if isinstance(text, Shard):
            return text
        if not isinstance(text, str):
            index, count = text
            return cls(int(index), int(count))
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"--shard {text!r} is not K/N: write e.g. --shard 1/4 (shard 1 of 4)")
        return cls(int(match[1]), int(match[2]))

    def owned(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (plate, well) keys among ``keys`` that belong to this shard."""
        ordered = sorted({(str(p), str(w)) for p, w in keys})
        return {k for i, k in enumerate(ordered) if i % self.count == self.index - 1}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# -- executors ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecutorConfig:
    """Where well tasks run (the CLI's scale-out options map onto this).

    Parameters
    ----------
    kind : {"serial", "threads", "processes", "dask"}
        ``serial`` runs in the calling process (no executor).
    workers : int, optional
        Size of the ``threads`` / ``processes`` pool (default: 2 threads, one process per core).
    scheduler : str, optional
        ``dask``: address of a running scheduler (``tcp://host:8786``) or a scheduler file.
    local_workers : int, optional
        ``dask``: start a local cluster of this many worker processes (default: one per GPU, or
        one when there is none).
    threads_per_worker : int, optional
        ``dask`` local cluster: tasks per worker at once (default: 1 on GPUs, else the cores
        divided among the workers).
    slurm_jobs : int, optional
        ``dask``: submit this many SLURM jobs, one Dask worker per GPU in each (dask-jobqueue).
    slurm_queue, slurm_account, slurm_memory, slurm_walltime : str, optional
        Partition, account, memory per job (``"32GB"``), wall time (``"04:00:00"``).
    slurm_cores, slurm_gpus : int
        Cores and GPUs per job.
    max_in_flight : int, optional
        Well tasks submitted at once (default: twice the tasks the workers can run at once).
    """

    kind: str = "serial"
    workers: int | None = None
    scheduler: str | None = None
    local_workers: int | None = None
    threads_per_worker: int | None = None
    slurm_jobs: int | None = None
    slurm_queue: str | None = None
    slurm_account: str | None = None
    slurm_cores: int = 8
    slurm_memory: str = "32GB"
    slurm_gpus: int = 0
    slurm_walltime: str = "04:00:00"
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        dask_only = {
            "--scheduler": self.scheduler,
            "--local-workers": self.local_workers,
            "--threads-per-worker": self.threads_per_worker,
            "--slurm-jobs": self.slurm_jobs,
        }
        given = [flag for flag, value in dask_only.items() if value is not None]
        if given and self.kind == "serial":  # the dask options imply --executor dask
            object.__setattr__(self, "kind", "dask")
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor {self.kind!r} is unknown: use one of {EXECUTORS}")
        if given and self.kind != "dask":
            raise ValueError(f"{', '.join(given)} need --executor dask (not {self.kind!r})")
        if self.scheduler is not None and (self.local_workers or self.slurm_jobs):
            raise ValueError(
                "--scheduler uses a running cluster: leave out --local-workers and --slurm-jobs"
            )
        if self.local_workers is not None and self.slurm_jobs is not None:
            raise ValueError("choose --local-workers or --slurm-jobs, not both")
        for name in ("workers", "local_workers", "threads_per_worker", "slurm_jobs"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.slurm_cores < 1 or self.slurm_gpus < 0:
            raise ValueError("--slurm-cores must be >= 1 and --slurm-gpus >= 0")


class SerialExecutor(Executor):
    """Runs each task at once in the calling thread (per-well outputs without any parallelism)."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def shares_memory(executor: Executor | None) -> bool:
    """True when tasks run in this process (they can use the caller's loaded model)."""
    return executor is None or isinstance(executor, (SerialExecutor, ThreadPoolExecutor))


@dataclass
class _DaskWidth:
    """Tasks a Dask cluster runs at once, asked of the scheduler at most every few seconds
    (SLURM workers arrive while the run goes on)."""

    client: Any
    every: float = 5.0
    _value: int = 0
    _when: float = field(default=-1e9)

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._when > self.every:
            try:
                info = self.client.scheduler_info(n_workers=-1)  # all of them (Dask >= 2025)
            except TypeError:
                info = self.client.scheduler_info()
            workers = info["workers"].values()
            self._value = sum(
                min(int(w.get("nthreads", 1)), int(w.get("resources", {}).get("GPU", 1e9)))
                for w in workers
            )
            self._when = now
        return self._value


_WIDTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def executor_width(executor: Executor | None) -> int:
    """How many tasks ``executor`` runs at once (1 when it cannot tell)."""
    if executor is None or isinstance(executor, SerialExecutor):
        return 1
    width = getattr(executor, "_max_workers", None)  # thread and process pools
    if width:
        return int(width)
    client = getattr(executor, "_client", None)  # distributed's ClientExecutor
    if client is not None:
        probe = _WIDTHS.get(executor)
        if probe is None:
            probe = _WIDTHS[executor] = _DaskWidth(client)
        return max(1, probe())
    return 1


def map_bounded(
    executor: Executor,
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    max_in_flight: int | None = None,
) -> Iterator[tuple[Any, Future]]:
    """Submit ``fn(task)`` for each task, at most ``max_in_flight`` at once (default twice
    :func:`executor_width`, asked again as the cluster grows); yield ``(task, future)`` as each
    finishes. Closing the generator (Cancel) cancels the tasks not started yet."""
    todo = iter(tasks)
    in_flight: dict[Future, tuple[int, Any]] = {}
    order = 0
    exhausted = False
    try:
        while True:
            limit = max_in_flight or 2 * executor_width(executor)
            while not exhausted and len(in_flight) < limit:
                task = next(todo, _END)
                if task is _END:
                    exhausted = True
                    break
                in_flight[executor.submit(fn, task)] = (order, task)
                order += 1
            if not in_flight:
                return
            finished, _ = wait(list(in_flight), timeout=10.0, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: in_flight[f][0]):
                yield in_flight.pop(future)[1], future
    finally:
        for future in in_flight:
            future.cancel()


_END = object()


# -- the model, once per worker process -----------------------------------------------------------
_MODELS: OrderedDict[tuple, Any] = OrderedDict()
_MODELS_LOCK = threading.Lock()
MAX_CACHED_MODELS = 2


def worker_source(source: Any) -> str | None:
    """A model source as a worker elsewhere can load it: local folders as absolute paths."""
    if source is None or str(source) == "":
        return None
    text = str(source)
    path = os.path.expanduser(text)
    return os.path.abspath(path) if os.path.isdir(path) else text


def cached_model(
    source: str | None,
    device: str | None = None,
    precision: str | None = None,
    encoder_only: bool = True,
) -> Any:
    """:func:`~napari_cellmae.load_model` once per process and (source, device, precision):
    every task a worker runs shares the model (thread-safe; the last two models are kept)."""
    key = (source, device, precision, encoder_only)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        from .hub import load_model

        model = load_model(source, device=device, encoder_only=encoder_only, precision=precision)
        _MODELS[key] = model
        while len(_MODELS) > MAX_CACHED_MODELS:
            _MODELS.popitem(last=False)
        return model


def client_device(device: str | None, executor: Executor | None) -> str | None:
    """The device on which the submitting process loads its copy of the model: the requested
    one, except when the tasks run elsewhere and this machine lacks it (a SLURM login node
    without GPUs), where the CPU serves (that copy only gives the run record its checksum)."""
    if shares_memory(executor):
        return device
    from .devices import resolve_device

    try:
        resolve_device(device)
    except ValueError:
        logger.info(
            "device %s is not on this machine: the workers use it, this process the CPU", device
        )
        return "cpu"
    return device


def check_checksum(model: Any, expected: str | None, source: Any) -> None:
    """A worker must have loaded the very model of the run (same weights checksum)."""
    if expected and model.checksum != expected:
        raise ValueError(
            f"the worker loaded model {source!r} with checksum {str(model.checksum)[:12]}…, not "
            f"the run's {expected[:12]}…: give every worker the same model folder"
        )


# -- local workers: GPUs and threads --------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    """One local Dask worker process: its name, task threads and environment."""

    name: str
    nthreads: int
    env: dict[str, str]


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    listed = [d for d in listed if d]
    return listed[:n] if listed else [str(i) for i in range(n)]


def plan_local_workers(
    n_workers: int | None,
    device: str | None,
    threads_per_worker: int | None = None,
    gpus: Sequence[str] | None = None,
    cpu_count: int | None = None,
) -> list[WorkerPlan]:
    """Worker processes for a local cluster: one per GPU (each sees only its GPU, one task at a
    time), or on CPUs the cores divided among them (each task's torch uses one thread, as Dask
    sets it, so ``workers × threads`` tasks fill the cores)."""
    cpus = cpu_count or os.cpu_count() or 1
    kind = str(device or "auto").split(":")[0]
    if kind == "cuda" and ":" in str(device):
        raise ValueError(
            f"--device {device} with a local cluster: each worker gets its own GPU, so use "
            "--device cuda (or auto); to use only some GPUs set CUDA_VISIBLE_DEVICES"
        )
    if gpus is None:
        gpus = visible_gpus() if kind in ("auto", "cuda") else []
    if kind == "cuda" and not gpus:
        raise ValueError("--device cuda but no CUDA GPU is visible: use --device cpu")
    gpus = list(gpus) if kind in ("auto", "cuda") else []
    n = int(n_workers or len(gpus) or 1)
    plans = []
    for i in range(n):
        if gpus:
            threads = threads_per_worker or 1
            env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
            env["OMP_NUM_THREADS"] = str(max(1, cpus // n))
        else:
            threads = threads_per_worker or max(1, cpus // n)
            env = {"OMP_NUM_THREADS": str(max(1, cpus // (n * threads)))}
            if kind == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
        env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
        plans.append(WorkerPlan(f"cellmae-{i}", int(threads), env))
    return plans


def pin_gpu(worker_name: str) -> str | None:
    """In a worker process that shares a job with others (dask-jobqueue names them ``job-0``,
    ``job-1`` …): keep only the GPU of this process in ``CUDA_VISIBLE_DEVICES``. Returns it."""
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    match = re.search(r"-(\d+)$", str(worker_name))
    if len(listed) < 2 or not match:
        return None
    chosen = listed[int(match[1]) % len(listed)].strip()
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def _pin_gpu_plugin() -> Any:
    from distributed import WorkerPlugin

    class PinGPU(WorkerPlugin):
        name = "cellmae-pin-gpu"

        def setup(self, worker: Any) -> None:
            pin_gpu(worker.name)

    return PinGPU()


def slurm_options(config: ExecutorConfig) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for ``config``: one worker process
    per GPU of a job (one task at a time each, ``GPU=1`` resource), else one process whose task
    threads fill the job's cores."""
    gpus = int(config.slurm_gpus)
    options: dict[str, Any] = {
        "cores": int(config.slurm_cores),
        "memory": config.slurm_memory,
        "processes": max(1, gpus),
        "walltime": config.slurm_walltime,
        "job_name": "cellmae",
    }
    if config.slurm_queue:
        options["queue"] = config.slurm_queue
    if config.slurm_account:
        options["account"] = config.slurm_account
    if gpus:
        options["job_extra_directives"] = [f"--gres=gpu:{gpus}"]
        options["worker_extra_args"] = ["--resources", "GPU=1"]
    return options


def _import_dask(what: str) -> None:
    if importlib.util.find_spec("distributed") is None:
        raise ValueError(f"{what} needs Dask's distributed scheduler: {INSTALL_HINT}")


def _slurm_cluster(config: ExecutorConfig) -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ValueError(
            f"--slurm-jobs needs dask-jobqueue, which is not installed: {INSTALL_HINT}"
        ) from None
    return SLURMCluster(**slurm_options(config))


def _local_cluster(plans: list[WorkerPlan]) -> Any:
    from distributed import Nanny, Scheduler, SpecCluster

    dashboard = importlib.util.find_spec("bokeh") is not None
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard": dashboard, "dashboard_address": ":8787"},
    }
    workers = {
        p.name: {
            "cls": Nanny,
            "options": {
                "nthreads": p.nthreads,
                "env": p.env,
                "host": "127.0.0.1",
                "name": p.name,
                "silence_logs": logging.WARNING,
            },
        }
        for p in plans
    }
    return SpecCluster(
        workers=workers, scheduler=scheduler, name="cellmae", silence_logs=logging.WARNING
    )


def _init_process(threads: int) -> None:
    """Each pool process gets its share of the cores (set before torch starts its threads)."""
    import sys

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(max(1, threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, threads))


@contextlib.contextmanager
def open_executor(
    config: ExecutorConfig,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[Executor | None]:
    """The executor that ``config`` describes, shut down on exit (None for ``serial``).

    ``device`` is the model device the user asked for (None = auto): it decides whether a local
    cluster gets one worker per GPU. ``log`` receives one line saying where the tasks run.
    """
    say = log or logger.info
    if config.kind == "serial":
        yield None
        return
    if config.kind == "threads":
        with ThreadPoolExecutor(config.workers or 2, thread_name_prefix="cellmae-well") as pool:
            say(f"threads: {pool._max_workers} well tasks at once in this process")
            yield pool
        return
    if config.kind == "processes":
        import multiprocessing

        n = config.workers or os.cpu_count() or 1
        threads = max(1, (os.cpu_count() or 1) // n)
        ctx = multiprocessing.get_context("spawn")  # fork after torch has started is unsafe
        with ProcessPoolExecutor(n, ctx, _init_process, (threads,)) as pool:
            say(f"processes: {n} worker processes, {threads} torch thread(s) each")
            yield pool
        return
    _import_dask("--executor dask")
    from distributed import Client

    cluster = None
    resources = None
    try:
        if config.scheduler:
            if os.path.isfile(config.scheduler):
                client = Client(scheduler_file=config.scheduler)
            else:
                client = Client(config.scheduler)
            where = f"the Dask cluster at {config.scheduler}"
        elif config.slurm_jobs:
            cluster = _slurm_cluster(config)
            cluster.scale(jobs=config.slurm_jobs)
            client = Client(cluster)
            if config.slurm_gpus > 1:
                client.register_plugin(_pin_gpu_plugin())
            resources = {"GPU": 1} if config.slurm_gpus else None
            where = (
                f"{config.slurm_jobs} SLURM job(s) ({config.slurm_cores} cores, "
                f"{config.slurm_gpus} GPU(s), {config.slurm_memory} each), scheduler "
                f"{cluster.scheduler_address}"
            )
        else:
            plans = plan_local_workers(config.local_workers, device, config.threads_per_worker)
            cluster = _local_cluster(plans)
            client = Client(cluster)
            gpus = [g for p in plans if (g := p.env.get("CUDA_VISIBLE_DEVICES"))]
            where = (
                f"a local Dask cluster of {len(plans)} worker process(es) × "
                f"{plans[0].nthreads} thread(s)" + (f" on GPUs {', '.join(gpus)}" if gpus else "")
            )
        link = client.dashboard_link if importlib.util.find_spec("bokeh") else None
        say(f"dask: {where}" + (f"; dashboard {link}" if link else ""))
        executor = client.get_executor(pure=False, resources=resources)
        try:
            yield executor
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
