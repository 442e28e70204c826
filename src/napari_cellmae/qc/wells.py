"""Plate QC one well at a time: per-well measurement files, for executors and job-array shards.

With an ``executor`` or a ``shard``, :func:`~napari_cellmae.qc.run.run_qc` measures each well as
a task (:func:`run_well_task`, the model loaded once per worker process) that writes

- ``OUT/wells/<plate>/<well>.parquet``: the well's per-image rows (metadata, metrics,
  ``QC_Error``) and, when a head judges, its absolute features ``feature_0000…``;
- ``OUT/wells/measure.json``: what the wells were measured with (model checksum, feature spec,
  scale, channels): a rerun with other settings is refused rather than mixed.

A well's file is written under a temporary name and renamed, so it exists only when complete: a
rerun skips it, and a killed run resumes. Judging needs the whole plate (z-scores and the head's
plate-relative features), so once every well is there the files are gathered in field order into
the rows a serial run measures (:func:`gather`), and judged and reported the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..executors import (
    Shard,
    cached_model,
    check_checksum,
    map_bounded,
    shares_memory,
    worker_source,
)
from ..progress import Progress
from .head import FeatureSpec, QCHead

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

WELLS_DIR = "wells"
FEATURE_PREFIX = "feature_"
MEASURE_RECORD = "measure.json"


def well_file(out: str | os.PathLike, plate: str, well: str) -> Path:
    """``OUT/wells/<plate>/<well>.parquet``: one well's QC measurements (exists only when done)."""
    from ..embed_store import safe_name

    return Path(out) / WELLS_DIR / safe_name(plate) / f"{safe_name(well)}.parquet"


@dataclass
class QCWellTask:
    """One well to measure, self-contained so that it can be shipped to another process."""

    well_index: Any  # DataFrame: the well's rows of the plate index (attrs kept)
    path: Path
    spec: FeatureSpec | None  # None: classic metrics only (no model needed)
    scale: int
    model_source: str | None = None
    device: str | None = None
    model_checksum: str | None = None
    batch_size: int | None = None
    prefetch: int = 2
    model: Any = None  # the caller's model (same process); None = load model_source here


def run_well_task(task: QCWellTask) -> dict[str, Any]:
    """Measure and write one well (what an executor runs); returns its counts."""
    import pandas as pd

    from ..progress import run
    from ..store import write_table_atomic
    from .run import measure_rows

    meta = task.well_index.iloc[0]
    summary = {"plate": str(meta["Metadata_Plate"]), "well": str(meta["Metadata_Well"])}
    if task.path.is_file():
        return {**summary, "skipped": True}
    model = task.model
    if model is None and task.spec is not None and task.spec.uses_encoder:
        model = cached_model(task.model_source, task.device)
        check_checksum(model, task.model_checksum, task.model_source)
    measuring = measure_rows(
        task.well_index, model, task.spec, task.scale, task.batch_size, task.prefetch
    )
    rows, feats = run(measuring)
    frame = pd.DataFrame(rows)
    if task.spec is not None:
        matrix = np.asarray(feats, np.float64).reshape(len(rows), task.spec.n_absolute)
        columns = [f"{FEATURE_PREFIX}{i:04d}" for i in range(task.spec.n_absolute)]
        frame = pd.concat([frame, pd.DataFrame(matrix, columns=columns)], axis=1)
    write_table_atomic(frame, task.path)
    return {**summary, "skipped": False, "images": len(frame)}


def _check_record(out: Path, record: dict[str, Any]) -> None:
    """The wells already measured in ``out`` must have been measured like this run's."""
    from ..store import write_json_atomic

    path = out / WELLS_DIR / MEASURE_RECORD
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diffs = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in record.items() if old.get(k) != v]
        if diffs:
            raise ValueError(
                f"{out / WELLS_DIR} holds wells measured with other settings: {'; '.join(diffs)}. "
                f"Choose another --out, or delete {out / WELLS_DIR} to measure again."
            )
        return
    write_json_atomic(path, record)


def _clean_partial(out: Path, keys: set[tuple[str, str]]) -> None:
    """Remove the temporary files a killed run left for these wells (others may be running)."""
    for plate, well in keys:
        final = well_file(out, plate, well)
        for tmp in final.parent.glob(f".{final.name}.*.part"):
            tmp.unlink(missing_ok=True)


def _retry_failed(out: Path, keys: set[tuple[str, str]]) -> int:
    """Delete the measured wells (of ``keys``) that hold unreadable images, so this run measures
    them again: a file fixed since (replaced, permission granted) is picked up. Returns how many."""
    import pyarrow.parquet as pq

    n = 0
    for plate, well in keys:
        path = well_file(out, plate, well)
        if not path.is_file():
            continue
        try:
            errors = pq.read_table(path, columns=["QC_Error"]).column(0).to_pylist()
        except Exception:  # unreadable or without the column: measure it again
            errors = ["?"]
        if any(errors):
            path.unlink(missing_ok=True)
            n += 1
    return n


def _failed_rows(task: QCWellTask, error: BaseException) -> pd.DataFrame:
    """Rows for a well whose task failed: every image unreadable, with the reason (not written,
    so a rerun measures the well again)."""
    import pandas as pd

    from ..plates import list_fields
    from ..plates.channels import index_channel_names, index_channels

    index = task.well_index
    channels = index_channels(index)
    names = index_channel_names(index, channels)
    keys = [c for c in list_fields(index).columns if c.startswith("Metadata_")]
    paths = {
        (*k, ch): p
        for *k, ch, p in index[[*keys, "Metadata_Channel", "path"]].itertuples(index=False)
    }
    rows = []
    for meta in list_fields(index)[keys].to_dict("records"):
        for ch in channels:
            row = {**meta, "Metadata_Channel": ch, "channel_name": names[ch]}
            row["path"] = paths.get((*meta.values(), ch), "")
            row["QC_Error"] = f"the whole well failed: {type(error).__name__}: {error}"
            rows.append(row)
    frame = pd.DataFrame(rows)
    if task.spec is not None:
        columns = [f"{FEATURE_PREFIX}{i:04d}" for i in range(task.spec.n_absolute)]
        nan = pd.DataFrame(np.nan, index=frame.index, columns=columns)
        frame = pd.concat([frame, nan], axis=1)
    return frame


def gather(
    index: pd.DataFrame, frames: list[pd.DataFrame], spec: FeatureSpec | None
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The wells' rows as one plate's, in the serial run's order (fields as ``list_fields``
    lists them, channels in plate order), split into (images, absolute features)."""
    import pandas as pd

    from ..plates import list_fields
    from ..plates.scan import field_keys

    keys = field_keys(index)
    frames = [f for f in frames if len(f)]
    images = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(images):
        order = {tuple(k): i for i, k in enumerate(list_fields(index)[keys].to_numpy().tolist())}
        position = [order.get(tuple(k), len(order)) for k in images[keys].to_numpy().tolist()]
        images = images.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
    columns = [c for c in images.columns if str(c).startswith(FEATURE_PREFIX)]
    feats = images[columns].to_numpy(np.float64) if spec is not None else None
    return images.drop(columns=columns), feats


def measure_wells(
    index: pd.DataFrame,
    out: str | os.PathLike,
    model: Any,
    head: QCHead | None,
    *,
    executor: Any = None,
    shard: Shard | str | None = None,
    assemble_only: bool = False,
    max_in_flight: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    prefetch: int = 2,
    scale: int = 20,
) -> Generator[Progress, None, tuple[Any, int]]:
    """Measure a plate one well per task (progress generator, one event per well).

    Returns ``(QCResult, 0)`` once every well of the plate is measured, else ``(None, n)`` with
    the ``n`` wells that other shards have not written yet. ``device`` is where workers in other
    processes load the model (None = the best they have); a failed well task is reported as
    unreadable images and measured again by the next run. ``assemble_only`` measures nothing.
    """
    import time

    import pandas as pd

    from ..executors import SerialExecutor
    from .run import finish_measurement, head_status

    t0 = time.monotonic()
    out = Path(out).absolute()
    used, notice = head_status(head, model)
    spec = used.spec if used is not None else None
    scale = spec.scale if spec is not None else scale
    channels = list(index.attrs.get("channels") or sorted(index["Metadata_Channel"].unique()))
    _check_record(
        out,
        {
            "plate": os.path.abspath(str(index.attrs.get("root", ""))),
            "channels": [str(c) for c in channels],
            "scale": int(scale),
            "spec": None if spec is None else json.loads(json.dumps(asdict(spec))),
            "model_checksum": str(model.checksum) if spec is not None and model else None,
        },
    )
    wells = {}
    for (plate, well), rows in index.groupby(["Metadata_Plate", "Metadata_Well"], sort=False):
        rows = rows.copy()
        rows["path"] = [os.path.abspath(p) for p in rows["path"]]  # for any worker's cwd
        rows.attrs = dict(index.attrs)
        wells[(str(plate), str(well))] = rows
    shard = Shard.parse(shard) if shard is not None else None
    owned = set() if assemble_only else shard.owned(wells) if shard else set(wells)
    _clean_partial(out, owned)
    retried = _retry_failed(out, owned)
    share = shares_memory(executor)
    tasks = [
        QCWellTask(
            well_index=rows,
            path=well_file(out, *key),
            spec=spec,
            scale=scale,
            model_source=worker_source(model.source) if model is not None else None,
            device=device,
            model_checksum=str(model.checksum) if model is not None else None,
            batch_size=batch_size,
            prefetch=prefetch,
            model=model if share else None,
        )
        for key, rows in wells.items()
        if key in owned and not well_file(out, *key).is_file()
    ]
    failed: dict[tuple[str, str], pd.DataFrame] = {}
    again = f" ({retried} with unreadable images, measured again)" if retried else ""
    yield Progress(0, len(tasks), f"{len(tasks)} wells to measure{again}")
    for done, (task, future) in enumerate(
        map_bounded(executor or SerialExecutor(), run_well_task, tasks, max_in_flight), 1
    ):
        meta = task.well_index.iloc[0]
        key = (str(meta["Metadata_Plate"]), str(meta["Metadata_Well"]))
        try:
            future.result()
        except Exception as exc:  # one bad well must not stop the plate
            failed[key] = _failed_rows(task, exc)
        yield Progress(done, len(tasks), f"QC {key[0]} {key[1]}")

    missing = [k for k in wells if k not in failed and not well_file(out, *k).is_file()]
    if missing and assemble_only:
        shown = ", ".join(f"{p} {w}" for p, w in missing[:8]) + (" …" if len(missing) > 8 else "")
        raise ValueError(
            f"{len(missing)} of {len(wells)} wells are not measured yet ({shown}): rerun the "
            "shards that hold them, or run the same command without --shard/--assemble to "
            f"measure the missing wells and write the report in {out}"
        )
    if missing:
        return None, len(missing)
    frames = [failed[k] if k in failed else pd.read_parquet(well_file(out, *k)) for k in wells]
    images, feats = gather(index, frames, spec)
    seconds = time.monotonic() - t0
    return finish_measurement(index, images, feats, used, notice, model, seconds, scale), 0
