"""Plates in, embeddings out: per-crop, per-field and per-well tables, resumable, streaming.

The unit of work is one well (:func:`embed_well`): its fields are read, tiled into 256×256 crops
(:mod:`napari_cellmae.tiling`), embedded, and summarised (field = mean of its crops, well = mean
of its fields); the classic baseline statistics of :mod:`napari_cellmae.features` are computed
from the same fields. Each finished well is written as one folder, ``OUT/<plate>/wells/<well>/``,
built under a temporary name and renamed into place, so a folder exists only when complete: a
rerun skips finished wells and a killed run resumes with no duplicates.

:func:`embed_plates` is the pipeline (a progress generator). Serially it streams every pending
field of a plate through three overlapping stages: reading in background threads
(:func:`~napari_cellmae.plates.iter_fields` prefetch), tiling + statistics in a small thread pool,
and the model on the calling thread, with crops from consecutive fields packed into batches of
the device's size. Given a ``concurrent.futures``-style ``executor`` it hands one task per well
to it instead (:func:`run_well_task`: the model is loaded once per worker process; see
:mod:`napari_cellmae.executors`), and given a ``shard`` it embeds only that shard's wells (job
arrays). Memory stays bounded by the read-ahead, not the plate. At the end the wells are
gathered, one at a time (:mod:`napari_cellmae.embed_store` keeps the folder layout), into
these tables, each also written as a ``.csv`` twin:

- ``crops.parquet``    Metadata_* + Metadata_Crop/CropY/CropX + emb_0000…
- ``fields.parquet``   Metadata_* + Metadata_NCrops + emb_*
- ``wells.parquet``    Metadata_Plate/Well/Row/Col + Metadata_NFields + emb_*
- ``features.parquet`` per-field baseline statistics feat_*
- ``errors.parquet``   fields that could not be read or embedded
- ``config.json``      the run record: model name and checksum, channels, pooling, block,
  normalisation (with each plate's reference), version

Normalisation ("crop" or "plate", default: the model's): with "plate", before embedding a plate
the pipeline reads up to :data:`REFERENCE_FIELDS` fields spread over it and takes the
median crop mean and standard deviation of each channel
(:meth:`~napari_cellmae.inference.CellMAEModel.plate_reference`); every crop of that plate is
then standardised by these, so that a stain that is brighter in some wells stays brighter for the
model. The references are saved in ``config.json`` and reused when the run resumes.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .embed_store import (
    EMB_PREFIX,
    LEVELS,
    TABLES,
    assemble,
    check_resume,
    clean_partial,
    embedding_columns,
    read_table,
    retry_failed,
    safe_name,
    totals,
    well_dir,
    write_well,
)
from .executors import (
    Shard,
    cached_model,
    check_checksum,
    client_device,
    map_bounded,
    shares_memory,
    worker_source,
)
from .outputs import check_output_dir, prepare_output_dir
from .progress import Progress
from .store import run_record, write_json_atomic

__all__ = [
    "EMB_PREFIX",
    "LEVELS",
    "NORMALIZATIONS",
    "POOLINGS",
    "TABLES",
    "EmbedConfig",
    "EmbedResult",
    "WellTables",
    "WellTask",
    "assemble",
    "embed_plates",
    "embed_well",
    "embedding_columns",
    "plate_references",
    "read_table",
    "recorded_reference",
    "run_well_task",
    "safe_name",
    "well_dir",
    "well_tables",
    "write_well",
]

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .inference import CellMAEModel

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "channelwise", "cls")
NORMALIZATIONS = ("crop", "plate")
REFERENCE_FIELDS = 24  # fields per plate the "plate" normalisation reference is taken from


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed plates (saved in ``config.json`` beside the tables).

    Parameters
    ----------
    model : str, optional
        Model source for :func:`~napari_cellmae.load_model` (None = the bundled default).
    pooling : {"mean", "channelwise", "cls"}, optional
        Token pooling (None = the model's default, "mean" unless its folder says otherwise).
    block : int, optional
        1-based encoder block (None = the model's best block, else the last).
    normalization : {"crop", "plate"}, optional
        Input normalisation (None = the model's ``default_normalization``): "crop" standardises
        each crop and channel by itself (blind to brightness), "plate" by the plate's reference
        statistics (see the module doc).
    batch_size : int, optional
        Crops per forward pass (None = by device: 4 on CPU, 64 on CUDA; halved on out-of-memory).
    device, precision : str, optional
        As in :func:`~napari_cellmae.load_model` (None = best available / "auto").
    channels : tuple of str, optional
        Channel ids or names to read, in the order the model gets them (default: all).
    layout : str
        Plate layout for :func:`~napari_cellmae.plates.scan_plate` ("auto", a name or a regex).
    levels : tuple of str
        Tables to write among "crop", "field", "well" (fields are always computed).
    features : bool
        Also compute the baseline statistics (:mod:`napari_cellmae.features`).
    prefetch : int
        Fields read ahead in background threads.
    platemap : str, optional
        A platemap CSV/TSV (:func:`~napari_cellmae.profiling.read_platemap`): its ``Metadata_*``
        columns (perturbation, control flag, mechanism …) are joined into the crop, field, well
        and feature tables, by plate and well. Not part of a run's identity: a rerun with another
        platemap re-annotates the tables.
    controls : tuple of str, optional
        Perturbation names of the negative controls, for a platemap without a control column.
    """

    model: str | None = None
    pooling: str | None = None
    block: int | None = None
    normalization: str | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    channels: tuple[str, ...] | None = None
    layout: str = "auto"
    levels: tuple[str, ...] = LEVELS
    features: bool = True
    prefetch: int = 4
    platemap: str | None = None
    controls: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        if self.platemap is not None:
            object.__setattr__(self, "platemap", os.fspath(self.platemap))
        if self.controls is not None:
            object.__setattr__(self, "controls", tuple(str(c) for c in self.controls))
        object.__setattr__(self, "levels", tuple(self.levels))
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is unknown: use one of {POOLINGS}.")
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization {self.normalization!r} is unknown: use one of {NORMALIZATIONS}."
            )
        if self.block is not None and int(self.block) < 1:
            raise ValueError(f"block must be >= 1 (1-based), got {self.block}.")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        unknown = set(self.levels) - set(LEVELS)
        if unknown or not self.levels:
            raise ValueError(f"levels {self.levels} must be a non-empty subset of {LEVELS}.")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}.")


@dataclass
class WellTables:
    """The tables of one well (DataFrames; ``crops`` None when the crop level is off)."""

    fields: pd.DataFrame
    well: pd.DataFrame
    features: pd.DataFrame | None
    errors: pd.DataFrame
    crops: pd.DataFrame | None = None


@dataclass
class EmbedResult:
    """What :func:`embed_plates` returns: the output folder, its tables and the counts."""

    out_dir: Path
    tables: dict[str, Path]
    n_wells: int
    n_wells_skipped: int
    n_fields: int
    n_errors: int
    n_crops: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    n_wells_pending: int = 0  # wells of other shards not written yet (tables not assembled)
    n_wells_retried: int = 0  # finished wells with failed fields, embedded again by this run


# -- fields -> crops -> embeddings ----------------------------------------------------------------
@dataclass
class _Field:
    """One field on its way through the pipeline."""

    meta: dict[str, Any]
    crops: np.ndarray | None = None  # (n, C, 256, 256) input crops, dropped once embedded
    positions: np.ndarray | None = None  # (n, 2) (y, x)
    features: np.ndarray | None = None  # (F,)
    error: str | None = None
    error_type: str | None = None
    emb: np.ndarray | None = None  # (n, D) filled batch by batch
    filled: int = 0
    channels: int = 0

    @property
    def complete(self) -> bool:
        return self.error is not None or (self.emb is not None and self.filled == len(self.emb))


def _prepare(model: CellMAEModel, result: Any, features: bool) -> _Field:
    """FieldResult -> crops, positions and statistics (thread-safe; runs in the prepare pool)."""
    meta, image, error = result
    item = _Field(dict(meta))
    if error is not None:
        item.error, item.error_type = str(error), type(error).__name__
        return item
    try:
        crops, positions = model.field_crops(image)
        model.check_images(crops)
        if features:
            from .features import field_features

            item.features = field_features(image)
    except ValueError as exc:  # a field the model cannot take (too small, NaN): record it
        item.error, item.error_type = str(exc), type(exc).__name__
        return item
    item.crops, item.positions, item.channels = crops, positions, crops.shape[1]
    return item


def _prepared(
    model: CellMAEModel, results: Iterable[Any], features: bool, workers: int, ahead: int
) -> Iterator[_Field]:
    """:func:`_prepare` over ``results`` in a thread pool, ``ahead`` fields in flight, in order."""
    if workers <= 0:
        for result in results:
            yield _prepare(model, result, features)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
    pending: deque[Future] = deque()
    try:
        for result in results:
            pending.append(pool.submit(_prepare, model, result, features))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _crop_references(
    model: CellMAEModel, item: _Field, start: int, stop: int, references: dict[str, np.ndarray]
) -> np.ndarray:
    """(stop - start, C, 2) references for crops ``start:stop`` of ``item``: its plate's, or the
    crops' own statistics when the plate has none (the same as "crop" normalisation)."""
    ref = references.get(str(item.meta["Metadata_Plate"]))
    if ref is None:
        return model.crop_statistics(item.crops[start:stop])
    return np.broadcast_to(np.asarray(ref), (stop - start, *np.shape(ref)))


def _embed_stream(
    model: CellMAEModel,
    items: Iterable[_Field],
    pooling: str,
    block: int | None,
    batch_size: int,
    references: dict[str, np.ndarray] | None = None,
) -> Iterator[_Field]:
    """Embed the crops of a stream of fields in batches that span fields; yields every field (in
    order) once all its crops are embedded. ``references``: {plate: (C, 2)} for the "plate"
    normalisation (None: each crop by itself)."""
    queue: deque[_Field] = deque()
    segments: list[tuple[_Field, int, int]] = []  # (field, first crop, end) waiting for a batch
    n_waiting = 0
    kind: tuple | None = None  # (dtype, channels) of the waiting crops: a batch has one

    def run_batch(limit: int) -> None:
        nonlocal n_waiting
        take, parts, count = [], [], 0
        while segments and count < limit:
            item, start, stop = segments[0]
            n = min(stop - start, limit - count)
            take.append((item, start, start + n))
            parts.append(item.crops[start : start + n])
            count += n
            if start + n == stop:
                segments.pop(0)
            else:
                segments[0] = (item, start + n, stop)
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (count, C, 256, 256)
        ref = None
        if references is not None:  # (count, C, 2): each crop gets its plate's reference
            ref = np.concatenate(
                [
                    _crop_references(model, item, start, stop, references)
                    for item, start, stop in take
                ]
            )
        emb = model.embed(batch, pooling=pooling, block=block, batch_size=batch_size, reference=ref)
        offset = 0
        for item, start, stop in take:
            if item.emb is None:
                item.emb = np.empty((len(item.crops), emb.shape[1]), np.float32)
            item.emb[start:stop] = emb[offset : offset + stop - start]
            item.filled += stop - start
            offset += stop - start
            if item.complete:
                item.crops = None  # free the pixels as soon as they are embedded
        n_waiting -= count

    for item in items:
        queue.append(item)
        if item.error is None:
            this = (item.crops.dtype, item.crops.shape[1])
            if kind is not None and this != kind and n_waiting:
                while n_waiting:
                    run_batch(n_waiting)
            kind = this
            segments.append((item, 0, len(item.crops)))
            n_waiting += len(item.crops)
        while n_waiting >= batch_size:
            run_batch(batch_size)
        while queue and queue[0].complete:
            yield queue.popleft()
    while n_waiting:
        run_batch(batch_size)
    while queue:
        yield queue.popleft()


# -- one well's tables ----------------------------------------------------------------------------
def _emb_columns(width: int) -> list[str]:
    return [f"{EMB_PREFIX}{i:04d}" for i in range(width)]


def _meta_frame(metas: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(metas)
    for col in ("Metadata_Col", "Metadata_Site", "Metadata_Plane", "Metadata_Timepoint"):
        if col in df:
            df[col] = df[col].astype("int64")
    return df


def _with_matrix(meta: pd.DataFrame, matrix: np.ndarray, columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    values = pd.DataFrame(matrix.astype(np.float32, copy=False), columns=columns)
    return pd.concat([meta.reset_index(drop=True), values], axis=1)


def well_tables(items: Sequence[_Field], width: int, levels: Sequence[str]) -> WellTables:
    """Build one well's tables from its embedded fields (``width`` = embedding length)."""
    import pandas as pd

    cols = _emb_columns(width)
    ok = [f for f in items if f.error is None]
    bad = [f for f in items if f.error is not None]
    field_meta = _meta_frame([f.meta for f in ok]) if ok else pd.DataFrame()
    field_meta = field_meta.assign(Metadata_NCrops=[len(f.emb) for f in ok]) if ok else field_meta
    field_emb = np.stack([f.emb.mean(axis=0) for f in ok]) if ok else np.zeros((0, width), "f4")
    fields = _with_matrix(field_meta, field_emb, cols) if ok else pd.DataFrame()
    well = pd.DataFrame()
    if ok:
        keep = ["Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Col"]
        meta = field_meta[keep].iloc[:1].assign(Metadata_NFields=len(ok))
        well = _with_matrix(meta, field_emb.mean(axis=0, keepdims=True), cols)
    features = None
    if ok and ok[0].features is not None:
        from .features import feature_names

        names = feature_names(ok[0].channels)
        features = _with_matrix(field_meta, np.stack([f.features for f in ok]), names)
    errors = _meta_frame([f.meta for f in bad]) if bad else pd.DataFrame()
    if bad:
        errors["error_type"] = [f.error_type for f in bad]
        errors["error"] = [f.error for f in bad]
    crops = None
    if "crop" in levels and ok:
        rows, mats = [], []
        for f in ok:
            for i, (y, x) in enumerate(f.positions):
                rows.append(
                    {**f.meta, "Metadata_Crop": i, "Metadata_CropY": y, "Metadata_CropX": x}
                )
            mats.append(f.emb)
        meta = _meta_frame(rows)
        for col in ("Metadata_Crop", "Metadata_CropY", "Metadata_CropX"):
            meta[col] = meta[col].astype("int64")
        crops = _with_matrix(meta, np.concatenate(mats), cols)
    return WellTables(fields=fields, well=well, features=features, errors=errors, crops=crops)


def embed_well(
    model: CellMAEModel,
    well_index: pd.DataFrame,
    config: EmbedConfig = EmbedConfig(),
    references: dict[str, Any] | None = None,
) -> WellTables:
    """Embed every field of one well.

    Parameters
    ----------
    model : CellMAEModel
        From :func:`~napari_cellmae.load_model`.
    well_index : DataFrame
        The rows of one well in a :func:`~napari_cellmae.plates.scan_plate` index (its ``attrs``
        give the channels).
    config : EmbedConfig
        Pooling, block, normalisation, batch size, channels, levels, statistics.
    references : dict, optional
        {plate: (C, 2)} from :func:`plate_references` for the "plate" normalisation; without it
        the reference is taken from this well's own fields.

    Returns
    -------
    WellTables
        Unreadable fields are in ``errors``; the others in ``fields`` (and ``crops``).
    """
    from .plates import iter_fields

    pooling = config.pooling or model.default_pooling
    bs = _batch_size(model, config)
    if _normalization(model, config) == "plate" and references is None:
        references = plate_references(model, [well_index], config)
    refs = None if references is None else {k: np.asarray(v) for k, v in references.items()}
    results = iter_fields(well_index, prefetch=config.prefetch, channels=config.channels)
    items = (_prepare(model, r, config.features) for r in results)
    done = list(_embed_stream(model, items, pooling, config.block, bs, refs))
    n_channels = len(_channels([well_index], config)[0])
    return well_tables(done, _embedding_width(model, pooling, n_channels), config.levels)


def _batch_size(model: CellMAEModel, config: EmbedConfig) -> int:
    from .inference import default_batch_size

    return int(config.batch_size or default_batch_size(model.device))


def _normalization(model: CellMAEModel, config: EmbedConfig) -> str:
    return config.normalization or model.default_normalization


def _task_references(references: dict[str, np.ndarray] | None, plate: str) -> dict | None:
    """What a well task of ``plate`` carries: its plate's reference as lists (None: "crop")."""
    if references is None:
        return None
    return {plate: references[plate].tolist()} if plate in references else {}


def _saved_references(out: Path) -> dict[str, np.ndarray] | None:
    """The plate references of the run being resumed in ``out`` (None: none saved)."""
    import json

    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {p: recorded_reference(saved, p) for p in saved.get("plate_reference") or {}}


def recorded_reference(record: dict[str, Any], plate: str) -> np.ndarray | None:
    """The "plate" normalisation reference of ``plate`` in a run's ``config.json`` record:
    (C, 2) mean, std per channel (None: not a "plate" run, or not that plate)."""
    ref = (record.get("plate_reference") or {}).get(str(plate))
    return None if ref is None else np.stack([ref["mean"], ref["std"]], axis=1)


def plate_references(
    model: CellMAEModel,
    indexes: Sequence[pd.DataFrame],
    config: EmbedConfig = EmbedConfig(),
    n_fields: int = REFERENCE_FIELDS,
) -> dict[str, np.ndarray]:
    """The "plate" normalisation reference of every plate in ``indexes``: {plate: (C, 2)}.

    Up to ``n_fields`` fields evenly spread over each plate's field list are read (with
    ``config.channels``) and passed to ``model.plate_reference``
    (:meth:`~napari_cellmae.inference.CellMAEModel.plate_reference`); unreadable or unusable
    fields are passed over (the embedding run records them). A plate with no usable field gets
    no reference (its crops are then standardised each by itself).
    """
    from .plates import iter_fields, list_fields

    out: dict[str, np.ndarray] = {}
    for index in indexes:
        table = list_fields(index)
        for plate, rows in table.groupby("Metadata_Plate", sort=False):
            picks = np.unique(np.linspace(0, len(rows) - 1, min(n_fields, len(rows))).round())
            sample = rows.iloc[picks.astype(int)]
            results = iter_fields(
                index, prefetch=config.prefetch, channels=config.channels, fields=sample
            )
            usable = (
                image
                for _, image, error in results
                if error is None and min(image.shape[1:]) >= model.patch_size
            )
            try:
                out[str(plate)] = model.plate_reference(usable)
            except ValueError as exc:  # no usable field: none of them can be embedded anyway
                logger.warning("plate %s: no plate normalisation reference (%s)", plate, exc)
    return out


# -- executor tasks (napari_cellmae.executors runs them anywhere) ---------------------------------
@dataclass
class WellTask:
    """One well to embed, self-contained so that it can be shipped to another process."""

    well_index: Any  # DataFrame: the well's rows of the plate index (attrs kept)
    path: Path
    config: EmbedConfig
    model_checksum: str
    model: Any = None  # the caller's model (threads); None = load config.model in the worker
    n_fields: int = 0  # for progress
    references: dict[str, Any] | None = None  # {plate: (C, 2)} for the "plate" normalisation


def _worker_model(config: EmbedConfig) -> CellMAEModel:
    """The model of ``config``, loaded once per process (thread-safe)."""
    return cached_model(config.model, config.device, config.precision, encoder_only=True)


def run_well_task(task: WellTask) -> dict[str, Any]:
    """Embed and write one well (what an executor runs); returns its counts."""
    model = task.model if task.model is not None else _worker_model(task.config)
    check_checksum(model, task.model_checksum, task.config.model)
    meta = task.well_index.iloc[0]
    if task.path.is_dir():
        return {"plate": meta["Metadata_Plate"], "well": meta["Metadata_Well"], "skipped": True}
    tables = embed_well(model, task.well_index, task.config, task.references)
    write_well(tables, task.path)
    return {
        "plate": meta["Metadata_Plate"],
        "well": meta["Metadata_Well"],
        "fields": len(tables.fields),
        "errors": len(tables.errors),
        "skipped": False,
        "worker": f"{model.device} {model.precision}",
    }


# -- the pipeline ---------------------------------------------------------------------------------
def _embedding_width(model: CellMAEModel, pooling: str, n_channels: int) -> int:
    return model.embed_dim * (n_channels if pooling == "channelwise" else 1)


def _plates(plates: Sequence[Any], config: EmbedConfig) -> list[pd.DataFrame]:
    import pandas as pd

    from .plates import scan_plate

    if isinstance(plates, (str, os.PathLike, pd.DataFrame)):
        plates = [plates]
    if not plates:
        raise ValueError("no plate given: pass at least one plate folder")
    indexes = [p if isinstance(p, pd.DataFrame) else scan_plate(p, config.layout) for p in plates]
    seen: dict[str, str] = {}
    for index in indexes:
        root = str(index.attrs.get("root", "?"))
        for plate in index["Metadata_Plate"].unique():
            if plate in seen and seen[plate] != root:
                raise ValueError(
                    f"plate {plate!r} is both in {seen[plate]} and {root}: embed them into "
                    "separate output folders, or rename one of the plate folders"
                )
            seen[str(plate)] = root
    return indexes


def _channels(indexes: list[pd.DataFrame], config: EmbedConfig) -> list[list[str]]:
    from .plates.read import _resolve_channels

    per_plate = [_resolve_channels(index, config.channels) for index in indexes]
    counts = {len(c) for c in per_plate}
    if len(counts) > 1:
        detail = ", ".join(f"{i.attrs.get('root')}: {c}" for i, c in zip(indexes, per_plate))
        raise ValueError(
            f"the plates have different channel counts ({detail}): pass --channels with the "
            "channels they share, in the same order"
        )
    return per_plate


def _pending(
    index: pd.DataFrame, out: Path, owned: set[tuple[str, str]] | None = None
) -> tuple[pd.DataFrame, dict[tuple[str, str], int], int]:
    """Fields of the wells not yet written, their field counts per well, and the wells skipped
    (only among the ``owned`` wells when a shard runs)."""
    from .plates import list_fields

    fields = list_fields(index)
    keys = list(zip(fields["Metadata_Plate"].astype(str), fields["Metadata_Well"].astype(str)))
    counts: dict[tuple[str, str], int] = {}
    for key in keys:
        if owned is None or key in owned:
            counts[key] = counts.get(key, 0) + 1
    done = {k for k in counts if well_dir(out, *k).is_dir()}
    keep = np.array([k in counts and k not in done for k in keys], dtype=bool)
    return fields[keep], {k: n for k, n in counts.items() if k not in done}, len(done)


def _well_keys(indexes: list[pd.DataFrame]) -> list[tuple[str, str]]:
    """Every (plate, well) of the plates, in index order."""
    keys: dict[tuple[str, str], None] = {}
    for index in indexes:
        for key in zip(index["Metadata_Plate"].astype(str), index["Metadata_Well"].astype(str)):
            keys[key] = None
    return list(keys)


def _output_guard(indexes: Sequence[pd.DataFrame], force: bool) -> dict[str, Any]:
    """The output-folder rule's arguments for these plates: their folders are inputs, and each
    plate's folder ``OUT/<plate>/`` must not land on one of them."""
    roots = [i.attrs["root"] for i in indexes if i.attrs.get("root")]
    # the first folder well_dir puts under OUT for each plate (whatever its naming rule)
    names = {
        well_dir(Path(), p, "_").parts[0] for i in indexes for p in i["Metadata_Plate"].unique()
    }
    return {"inputs": roots, "subfolders": sorted(names), "force": force, "what": "plate folder"}


def _read_platemap(config: EmbedConfig, indexes: list[pd.DataFrame]) -> pd.DataFrame | None:
    """The platemap of ``config`` (None without one), checked against the scanned wells: a
    platemap that names none of them is refused; the wells it does not name are listed in
    ``attrs["wells_unannotated"]`` (config.json) and get empty annotations."""
    if config.platemap is None:
        return None
    from .profiling.platemap import read_platemap

    pm = read_platemap(config.platemap, config.controls)
    wells = {k for i in indexes for k in _well_keys([i])}
    if "Metadata_Plate" in pm:
        named = set(zip(pm["Metadata_Plate"], pm["Metadata_Well"]))
        missing = [k for k in wells if k not in named]
    else:
        named_wells = set(pm["Metadata_Well"])
        missing = [k for k in wells if k[1] not in named_wells]
    if wells and len(missing) == len(wells):
        plates = sorted({p for p, _ in wells})
        theirs = sorted(set(pm["Metadata_Plate"])) if "Metadata_Plate" in pm else []
        raise ValueError(
            f"platemap {config.platemap} names none of the {len(wells)} wells to embed: the "
            f"plates are {plates}"
            + (f", the platemap's {theirs[:5]}" if theirs else "")
            + "; fix the plate names in its plate column (or drop that column to annotate "
            "wells on every plate)"
        )
    pm.attrs["wells_unannotated"] = [f"{p} {w}" for p, w in sorted(missing)]
    if missing:
        logger.warning("platemap %s does not name %d wells", config.platemap, len(missing))
    return pm


def embed_plates(
    plates: Sequence[str | os.PathLike | pd.DataFrame] | str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EmbedConfig = EmbedConfig(),
    model: CellMAEModel | None = None,
    executor: Any = None,
    max_in_flight: int | None = None,
    prepare_workers: int | None = None,
    shard: Shard | str | None = None,
    assemble_only: bool = False,
    force: bool = False,
):
    """Embed whole plates into ``out_dir`` (a progress generator; returns :class:`EmbedResult`).

    Parameters
    ----------
    plates : folder, index, or a sequence of them
        Plate folders (scanned with ``config.layout``) or :func:`~napari_cellmae.scan_plate`
        indexes (the Load tab passes its own, with the channel names the user gave).
    out_dir : path
        Output folder; an existing one made with the same settings is resumed.
    config : EmbedConfig
        Model, pooling, block, batch size, channels, levels.
    model : CellMAEModel, optional
        An already loaded model (else ``config.model`` is loaded, encoder only).
    executor : concurrent.futures.Executor, optional
        Run one task per well on it (:func:`run_well_task`); default serial, streaming.
    max_in_flight : int, optional
        Well tasks submitted at once to ``executor`` (default twice its workers).
    prepare_workers : int, optional
        Threads tiling fields and computing statistics next to the model (default: a CPU core
        not used by reading, 1 to 4).
    shard : Shard or "K/N", optional
        Embed only this shard's wells (:class:`~napari_cellmae.executors.Shard`); the tables are
        assembled by the shard that finds every well of the plates written.
    assemble_only : bool
        Embed nothing: gather the wells written by the shards into the tables (every well must
        be there; ValueError lists the missing ones).
    force : bool
        Write into an existing folder that cellmae did not make (files of the same names are
        replaced); without it such a folder is refused (:mod:`napari_cellmae.outputs`).

    Yields
    ------
    Progress
        One event per field embedded (per well with an executor).
    """
    import pyarrow.parquet as pq

    from .plates.channels import index_channel_names, save_channel_map

    t0 = time.monotonic()
    out = Path(out_dir).expanduser()
    yield Progress(0, None, "scanning plates")
    indexes = _plates(plates, config)
    guard = _output_guard(indexes, force)
    check_output_dir(out, "embed", **guard)  # before the model loads: refuse early
    channel_ids = _channels(indexes, config)
    platemap = _read_platemap(config, indexes)  # before hours of embedding: a bad one stops here
    if model is None:
        from .hub import load_model

        yield Progress(0, None, f"loading model {config.model or '(bundled default)'}")
        device = client_device(config.device, executor)  # the workers load their own
        model = load_model(
            config.model, device=device, encoder_only=True, precision=config.precision
        )
    n_channels = len(channel_ids[0])
    size = model.config.img_size
    model.module.check_input((1, n_channels, size, size))  # wrong channel count: stop here
    if config.block is not None and config.block > model.depth:
        raise ValueError(f"block {config.block} is not in 1..{model.depth} for {model.name}.")
    pooling = config.pooling or model.default_pooling
    normalization = _normalization(model, config)
    width = _embedding_width(model, pooling, n_channels)
    bs = _batch_size(model, config)
    names = index_channel_names(indexes[0], channel_ids[0])
    record = run_record(
        command="embed",
        model=model.name,
        model_source=str(model.source or config.model or ""),
        model_checksum=model.checksum,
        attribution=model.attribution,
        pooling=pooling,
        block=int(config.block or model.default_block or model.depth),
        normalization=normalization,
        precision=model.precision,
        channels=list(channel_ids[0]),
        channel_names=list(names.values()),
        levels=list(config.levels),
        features=bool(config.features),
        embedding_width=width,
        crop_size=size,
        tiling="napari_cellmae.tiling.crop_grid: ceil(side/256) evenly spaced crops; "
        "field = mean of crops, well = mean of fields",
        plates=[
            {
                "root": str(i.attrs.get("root", "")),
                "layout": i.attrs.get("layout"),
                "plates": [str(p) for p in i["Metadata_Plate"].unique()],
                "channels": list(c),
            }
            for i, c in zip(indexes, channel_ids)
        ],
        config=asdict(config),
        device=str(model.device),
        batch_size=bs,
    )
    check_resume(out, record)
    references = None
    if normalization == "plate" and not assemble_only:
        yield Progress(0, None, "plate normalisation: reading reference fields")
        references = _saved_references(out) or {}
        todo = [i for i in indexes if set(map(str, i["Metadata_Plate"].unique())) - set(references)]
        if todo:
            references |= plate_references(model, todo, config)
        record["plate_reference"] = {
            plate: {"mean": ref[:, 0].tolist(), "std": ref[:, 1].tolist()}
            for plate, ref in references.items()
        }
    prepare_output_dir(out, "embed", **guard)  # marks the folder, removes stale temp files
    write_json_atomic(out / "config.json", {**record, "status": "running"})
    save_channel_map(out, names, channel_ids[0])
    all_keys = _well_keys(indexes)
    shard = Shard.parse(shard) if shard is not None else None
    owned = shard.owned(all_keys) if shard is not None else None
    if assemble_only:
        owned = set()
    if n := clean_partial(out, owned):  # a shard leaves the other shards' unfinished wells alone
        logger.info("removed %d half-written wells of an interrupted run", n)
    retried = [] if assemble_only else retry_failed(out, owned)
    if retried:
        logger.info(
            "%d wells with failed fields are embedded again (a file may have been fixed): %s",
            len(retried),
            ", ".join(retried[:8]) + (" …" if len(retried) > 8 else ""),
        )

    plans = [(index, *_pending(index, out, owned)) for index in indexes]
    total = sum(len(fields) for _, fields, _, _ in plans)
    skipped = sum(s for *_, s in plans)
    failures: list[dict[str, Any]] = []
    if skipped:
        logger.info("resuming: %d wells already embedded are skipped", skipped)
    resumed = f", {skipped} wells already done" if skipped else ""
    if retried:
        resumed += f", {len(retried)} wells with failed fields retried"
    yield Progress(0, total, f"{total} fields to embed{resumed}")
    if executor is None:
        workers = prepare_workers
        if workers is None:
            workers = max(1, min(4, (os.cpu_count() or 2) - 1))
        done = 0
        for index, fields, counts, _ in plans:
            yield from _run_serial(
                model,
                index,
                fields,
                counts,
                out,
                config,
                pooling,
                bs,
                width,
                workers,
                done,
                total,
                references,
            )
            done += len(fields)
    else:
        task_config = replace(config, model=worker_source(model.source or config.model))
        share = shares_memory(executor)  # threads: the caller's model, no second copy
        tasks = []
        for index, _, counts, _ in plans:
            for (plate, well), rows in index.groupby(
                ["Metadata_Plate", "Metadata_Well"], sort=False
            ):
                key = (str(plate), str(well))
                if key not in counts:
                    continue
                rows = rows.copy()
                rows["path"] = [os.path.abspath(p) for p in rows["path"]]  # for any worker's cwd
                rows.attrs = dict(index.attrs)
                tasks.append(
                    WellTask(
                        well_index=rows,
                        path=well_dir(out.absolute(), *key),
                        config=task_config,
                        model_checksum=model.checksum,
                        model=model if share else None,
                        n_fields=counts[key],
                        references=_task_references(references, key[0]),
                    )
                )
        workers = set()
        yield from _run_executor(executor, tasks, max_in_flight, total, failures, workers)
        if workers:  # where the tasks ran: device and resolved precision of the workers
            record["workers"] = sorted(workers)

    plate_names = [str(p) for index in indexes for p in index["Metadata_Plate"].unique()]
    missing = [k for k in all_keys if not well_dir(out, *k).is_dir()]
    if assemble_only and missing:
        shown = ", ".join(f"{p} {w}" for p, w in missing[:8]) + (" …" if len(missing) > 8 else "")
        raise ValueError(
            f"{len(missing)} of {len(all_keys)} wells are not embedded yet ({shown}): rerun "
            f"the shards that hold them, or run the same command without --shard/--assemble to "
            f"embed the missing wells and assemble the tables in {out}"
        )
    if shard is not None and missing:  # other shards are still running: they will assemble
        counts = totals(out, plate_names)
        return EmbedResult(
            out_dir=out,
            tables={},
            n_wells=counts["n_wells"],
            n_wells_skipped=skipped,
            n_fields=counts["n_fields"],
            n_errors=len(failures),
            n_crops=counts["n_crops"],
            seconds=time.monotonic() - t0,
            config={**record, "status": "running", "shard": str(shard)},
            n_wells_pending=len(missing),
            n_wells_retried=len(retried),
        )
    yield Progress(total, total, "gathering tables")
    tables = assemble(out, plate_names, config.levels, config.features, failures, platemap)
    counts = {k: pq.read_metadata(p).num_rows for k, p in tables.items()}
    counts |= totals(out, plate_names)
    seconds = time.monotonic() - t0
    final = {
        **record,
        "status": "complete",
        "counts": counts,
        "tables": {k: p.name for k, p in tables.items()},
        "seconds": round(seconds, 2),
    }
    if platemap is not None:
        final["platemap"] = {
            "path": str(Path(config.platemap).resolve()),
            "columns": [c for c in platemap.columns if c.startswith("Metadata_")],
            "wells_unannotated": platemap.attrs.get("wells_unannotated", []),
        }
    write_json_atomic(out / "config.json", final)
    return EmbedResult(
        out_dir=out,
        tables=tables,
        n_wells=counts["n_wells"],
        n_wells_skipped=skipped,
        n_fields=counts["n_fields"],
        n_errors=counts["errors"],
        n_crops=counts["n_crops"],
        seconds=seconds,
        config=final,
        n_wells_retried=len(retried),
    )


def _run_serial(
    model: CellMAEModel,
    index: pd.DataFrame,
    fields: pd.DataFrame,
    counts: dict[tuple[str, str], int],
    out: Path,
    config: EmbedConfig,
    pooling: str,
    bs: int,
    width: int,
    workers: int,
    done: int,
    total: int,
    references: dict[str, np.ndarray] | None = None,
):
    """Stream the pending fields of one plate index: read ahead, prepare, embed, write wells."""
    from .plates import iter_fields

    if not len(fields):
        return
    results = iter_fields(index, prefetch=config.prefetch, channels=config.channels, fields=fields)
    prepared = _prepared(model, results, config.features, workers, ahead=max(1, config.prefetch))
    stream = _embed_stream(model, prepared, pooling, config.block, bs, references)
    buckets: dict[tuple[str, str], list[_Field]] = {}
    try:
        for item in stream:
            key = (str(item.meta["Metadata_Plate"]), str(item.meta["Metadata_Well"]))
            bucket = buckets.setdefault(key, [])
            bucket.append(item)
            if len(bucket) == counts[key]:
                write_well(well_tables(buckets.pop(key), width, config.levels), well_dir(out, *key))
            done += 1
            site = item.meta.get("Metadata_Site")
            yield Progress(done, total, f"{key[0]} {key[1]} site {site}")
    finally:  # stopped early (Cancel, should_stop): the reader and prepare pools shut down
        stream.close()
        prepared.close()
        results.close()


def _run_executor(
    executor: Any,
    tasks: list[WellTask],
    limit: int | None,
    total: int,
    failures: list[dict[str, Any]],
    workers: set[str],
):
    """Hand well tasks to ``executor``, at most ``limit`` in flight (default: twice what it runs
    at once); a failed well is recorded (and left unwritten, so a rerun retries it)."""
    done = 0
    for task, future in map_bounded(executor, run_well_task, tasks, limit):
        meta = task.well_index.iloc[0]
        try:
            if worker := future.result().get("worker"):
                workers.add(worker)
        except Exception as exc:  # one bad well must not stop a screen
            logger.error("well %s failed: %s", task.path, exc)
            failures.append(
                {
                    "Metadata_Plate": str(meta["Metadata_Plate"]),
                    "Metadata_Well": str(meta["Metadata_Well"]),
                    "error_type": type(exc).__name__,
                    "error": f"the whole well failed: {exc}",
                }
            )
        done += task.n_fields
        yield Progress(done, total, f"{meta['Metadata_Plate']} {meta['Metadata_Well']}")
