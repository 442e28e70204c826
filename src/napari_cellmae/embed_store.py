"""Where embeddings are kept: one folder per finished well, gathered into the final tables.

``OUT/<plate>/wells/<well>/`` holds a well's ``fields``, ``well``, ``crops``, ``features`` and
``errors`` parquet files and a ``done.json``; it is built under a hidden temporary name and
renamed into place, so it exists only when complete (a rerun skips it; a killed run leaves only a
``.<well>.*.part`` folder, removed by the next run). :func:`assemble` streams the wells, one at a
time, into ``crops``/``fields``/``wells``/``features``/``errors`` ``.parquet`` (+ CSV twins of
the small ones); ``config.json`` guards a resumed run against other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .store import atomic_path, write_parquet, write_table_atomic

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .embed import WellTables

EMB_PREFIX = "emb_"
LEVELS = ("crop", "field", "well")
TABLES = ("crops", "fields", "wells", "features", "errors")
# settings a resumed run must share with the run it continues
FINGERPRINT = (
    "model_checksum",
    "pooling",
    "block",
    "normalization",
    "channels",
    "precision",
    "levels",
    "features",
)


# -- the per-well output folder --------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A plate or well name as a folder name that no other name maps to.

    Letters, digits and ``.-_`` are kept; anything else becomes ``_``. Whenever that changes the
    name (or leaves one starting with ``.``: hidden, or ``..``), the first 8 hex digits of the
    SHA-256 of the exact name are appended, so ``"Screen ü"`` and ``"Screen ä"`` (both
    ``Screen__``) get folders of their own. Every output keyed by plate or well (embedding wells,
    QC wells) goes through here.
    """
    name = str(name)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe == name and name and not name.startswith("."):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{safe.lstrip('.')[:200] or '_'}-{digest}"  # within any file system's name limit


def well_dir(out_dir: str | os.PathLike, plate: str, well: str) -> Path:
    """``OUT/<plate>/wells/<well>``: where one well's tables go (exists only when complete)."""
    return Path(out_dir) / safe_name(plate) / "wells" / safe_name(well)


def write_well(tables: WellTables, path: str | os.PathLike) -> bool:
    """Write a well's tables into folder ``path`` atomically (built beside it, then renamed).

    Returns False when ``path`` already exists (another worker finished that well first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        for name in ("fields", "well", "features", "errors", "crops"):
            df = getattr(tables, name)
            if df is not None and len(df):
                write_parquet(df, tmp / f"{name}.parquet")
        counts = {
            "fields": len(tables.fields),
            "errors": len(tables.errors),
            "crops": int(tables.fields["Metadata_NCrops"].sum()) if len(tables.fields) else 0,
        }
        (tmp / "done.json").write_text(json.dumps(counts) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:
            if path.is_dir():  # finished elsewhere meanwhile: keep theirs
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_partial(out_dir: Path, wells: set[tuple[str, str]] | None = None) -> int:
    """Remove half-written well folders left by a killed run (given ``wells``, only theirs: a
    shard leaves the wells other shards may be writing right now alone)."""
    mine = None if wells is None else {(safe_name(p), safe_name(w)) for p, w in wells}
    n = 0
    for tmp in out_dir.glob("*/wells/.*.part"):
        well = tmp.name[1:].rsplit(".", 2)[0]  # ".<well>.<random>.part"
        if mine is not None and (tmp.parent.parent.name, well) not in mine:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        n += 1
    return n


def retry_failed(out_dir: Path, wells: set[tuple[str, str]] | None = None) -> list[str]:
    """Take back the finished wells that hold failed fields, so the run embeds them again.

    A well folder is final once written, errors included; a file the user has fixed since (a
    corrupt copy replaced, a permission granted) would never be read again. So on every (re)run
    each well whose ``done.json`` counts errors is renamed to a hidden ``.part`` name (removed by
    :func:`clean_partial` if the run is killed) and deleted: its fields, the good ones too, are
    embedded again. ``wells``: only these (a shard's own). Returns ``plate-folder/well`` names.
    """
    mine = None if wells is None else {(safe_name(p), safe_name(w)) for p, w in wells}
    retried = []
    for done in sorted(out_dir.glob("*/wells/*/done.json")):
        folder = done.parent
        if mine is not None and (folder.parent.parent.name, folder.name) not in mine:
            continue
        try:
            errors = int(json.loads(done.read_text()).get("errors", 0))
        except (OSError, ValueError, AttributeError):
            errors = 1  # an unreadable record: embed the well again
        if not errors:
            continue
        aside = folder.with_name(f".{folder.name}.{os.urandom(4).hex()}.part")
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
        retried.append(f"{folder.parent.parent.name}/{folder.name}")
    return retried


def check_resume(out: Path, record: dict[str, Any]) -> None:
    """A rerun must use the settings of the run it continues (mixed embeddings are useless)."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): delete it or use another --out") from None
    diffs = [
        f"{key} {old.get(key)!r} (now {record.get(key)!r})"
        for key in FINGERPRINT
        if key in old and old.get(key) != record.get(key)
    ]
    if diffs:
        raise ValueError(
            f"{out} holds embeddings made with other settings: {'; '.join(diffs)}. Choose another "
            f"output folder, or delete {out} to start over."
        )


def _well_sort_key(name: str) -> tuple:
    from .plates.layouts import row_to_index, split_well

    try:
        row, col = split_well(name)
        return (0, row_to_index(row), col, name)
    except ValueError:
        return (1, 0, 0, name)


# -- gathering the wells into tables --------------------------------------------------------------
_PARTS = {
    "crops": "crops.parquet",
    "fields": "fields.parquet",
    "wells": "well.parquet",
    "features": "features.parquet",
    "errors": "errors.parquet",
}


ROW_GROUP_BYTES = 16 << 20  # wells are gathered into row groups of about this size


def _annotate(table, annotations):
    """Left-join the platemap ``annotations`` (an Arrow table: join keys + ``Metadata_*``) onto a
    well's Arrow table, row order kept; the platemap's columns replace any the table has."""
    import numpy as np
    import pyarrow as pa

    keys = [k for k in ("Metadata_Plate", "Metadata_Well") if k in annotations.column_names]
    table = table.drop_columns(
        [c for c in annotations.column_names if c in table.column_names and c not in keys]
    )
    annotations = annotations.cast(
        pa.schema(
            [
                pa.field(f.name, table.schema.field(f.name).type) if f.name in keys else f
                for f in annotations.schema
            ]
        )
    )
    row = "__cellmae_row"
    table = table.append_column(row, pa.array(np.arange(len(table), dtype=np.int64)))
    joined = table.join(annotations, keys, join_type="left outer").sort_by(row)
    return joined.drop_columns([row])


def _concat_parquet(files: list[Path], path: Path, annotations=None) -> Path:
    """Concatenate parquet files into ``path`` a few at a time (bounded memory; row groups of
    about :data:`ROW_GROUP_BYTES`); columns are the union (Metadata_* first), missing ones null.
    ``annotations`` (an Arrow table, see :func:`assemble`) are joined onto every file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(f) for f in files]
    if annotations is not None:
        schemas.append(annotations.schema)
    unified = pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()
    order = [n for n in unified.names if n.startswith("Metadata_")]
    order += [n for n in unified.names if not n.startswith("Metadata_")]
    types = {n: unified.field(n).type for n in order}  # by name: Schema.field(name) is O(width)
    unified = pa.schema([pa.field(n, types[n]) for n in order])
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, unified) as writer:
        pending: list = []
        pending_bytes = 0  # a running sum: Table.nbytes walks every buffer of every column
        for i, f in enumerate(files):
            table = pq.read_table(f)
            if annotations is not None:
                table = _annotate(table, annotations)
            have = dict(zip(table.column_names, table.columns))
            columns = [
                (have[n] if have[n].type == types[n] else have[n].cast(types[n]))
                if n in have
                else pa.nulls(len(table), types[n])
                for n in order
            ]
            pending.append(pa.Table.from_arrays(columns, schema=unified))
            pending_bytes += pending[-1].nbytes
            if i == len(files) - 1 or pending_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.concat_tables(pending))
                pending, pending_bytes = [], 0
    return path


def assemble(
    out_dir: str | os.PathLike,
    plates: Sequence[str],
    levels: Sequence[str] = LEVELS,
    features: bool = True,
    failures: Sequence[dict[str, Any]] = (),
    platemap: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Gather the finished wells of ``plates`` into the final tables (see the module docstring).

    ``platemap`` (from :func:`napari_cellmae.profiling.read_platemap`): its ``Metadata_*``
    columns are joined onto the crops, fields, wells and features tables, by plate (when it
    names plates) and well; wells it does not name get empty annotations."""
    import pandas as pd
    import pyarrow as pa

    annotations = None
    if platemap is not None:
        from .profiling.platemap import platemap_annotations

        _, pm = platemap_annotations(platemap)
        annotations = pa.Table.from_pandas(pm, preserve_index=False)

    out = Path(out_dir)
    wells = []
    for plate in plates:
        folder = out / safe_name(plate) / "wells"
        if folder.is_dir():
            found = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
            wells += sorted(found, key=lambda d: _well_sort_key(d.name))
    wanted = {"crops": "crop" in levels, "fields": "field" in levels, "wells": "well" in levels}
    wanted |= {"features": bool(features), "errors": True}
    tables: dict[str, Path] = {}
    for name, part in _PARTS.items():
        if not wanted[name]:
            continue
        files = [d / part for d in wells if (d / part).is_file()]
        path = out / f"{name}.parquet"
        if name == "errors" and (failures or not files):
            frames = [pd.read_parquet(f) for f in files] + [pd.DataFrame(list(failures))]
            errors = pd.concat([f for f in frames if len(f)] or [_empty_errors()])
            write_table_atomic(errors.reset_index(drop=True), path)
        elif files:
            _concat_parquet(files, path, annotations if name != "errors" else None)
        else:  # nothing embedded (every field failed): an empty table, not a missing one
            write_table_atomic(_empty_errors().iloc[:, :2], path)
        tables[name] = path
    for path in tables.values():  # every table has a CSV twin (spreadsheets, tools without parquet)
        with atomic_path(path.with_suffix(".csv")) as tmp:
            pd.read_parquet(path).to_csv(tmp, index=False)
    return tables


def totals(out: Path, plates: Sequence[str]) -> dict[str, int]:
    """Wells with at least one embedded field, fields and crops, from the wells' done.json."""
    totals = {"n_wells": 0, "n_fields": 0, "n_crops": 0}
    for plate in plates:
        for done in (out / safe_name(plate) / "wells").glob("*/done.json"):
            counts = json.loads(done.read_text())
            totals["n_wells"] += counts["fields"] > 0
            totals["n_fields"] += counts["fields"]
            totals["n_crops"] += counts["crops"]
    return totals


def _empty_errors() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {
            "Metadata_Plate": pd.Series(dtype=str),
            "Metadata_Well": pd.Series(dtype=str),
            "Metadata_Site": pd.Series(dtype="Int64"),
            "error_type": pd.Series(dtype=str),
            "error": pd.Series(dtype=str),
        }
    )


def read_table(out_dir: str | os.PathLike, level: str = "wells") -> pd.DataFrame:
    """Read one table of an embedding folder (``crops``, ``fields``, ``wells``, ``features`` or
    ``errors``); FileNotFoundError names what is missing and how to make it."""
    import pandas as pd

    if level not in TABLES:
        raise ValueError(f"unknown table {level!r}: choose one of {TABLES}")
    path = Path(out_dir) / f"{level}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `cellmae embed PLATE_DIR --out {Path(out_dir)}` first"
            + (" (with the crop level)" if level == "crops" else "")
        )
    return pd.read_parquet(path)


def embedding_columns(df: pd.DataFrame, prefix: str = EMB_PREFIX) -> list[str]:
    """The feature columns of a table: ``emb_0000`` … (``prefix`` + digits)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\d+$")
    return [c for c in df.columns if pattern.match(str(c))]
