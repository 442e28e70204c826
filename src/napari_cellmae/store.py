"""Atomic output files and the run record saved next to every output.

Every writer here writes to a temporary file in the destination folder and renames it into place,
so a reader never sees a half-written file and an interrupted run leaves either the old file or the
new one (plus, after a kill, its locked-while-written ``.<name>.<random>.part`` temporary, which
:func:`napari_cellmae.outputs.clean_stale_parts` removes on the next run). Inputs are never
touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so libraries that pick a format by
    extension still work. On error the temporary file is removed and ``path`` is left as it was.
    The temporary file is held under an exclusive ``flock`` until it is renamed, so that
    :func:`part_is_stale` tells a killed writer's leftover from a file being written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".part", dir=path.parent
    )
    if fcntl is not None:  # held until renamed: a later run sees the file is not stale
        # on a file system without locks a later run cannot lock it either: it keeps the file
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # Windows cannot rename a file that is open
        os.close(fd)
        fd = -1
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files: give the output the permissions a plain open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        if fd >= 0:
            os.close(fd)


STALE_WITHOUT_LOCKS_S = 24 * 3600  # where files cannot be locked: a .part file untouched this long


def part_is_stale(path: str | os.PathLike, now: float | None = None) -> bool:
    """True when the temporary file ``path`` of :func:`atomic_path` was left by a writer that
    died: no live writer holds its lock (without ``fcntl``: untouched for a day)."""
    if fcntl is None:
        import time

        age = (time.time() if now is None else now) - os.stat(path).st_mtime
        return age > STALE_WITHOUT_LOCKS_S
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: being written right now
        return False
    finally:
        os.close(fd)
    return True


def _umask() -> int:
    # read once per process: os.umask can only be read by setting it, which is not thread-safe
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def frame_to_arrow(df: pd.DataFrame) -> Any:
    """``df`` (its index dropped) as a pyarrow Table, fast for wide numeric frames.

    ``pa.Table.from_pandas`` spends ~40 µs per column; an embedding table has one column per
    dimension (1,280 for 5 channels pooled channelwise), so each same-dtype group of NumPy
    columns is taken out as one 2-D array instead (~10× faster). Other columns (strings,
    nullable or categorical dtypes) go through pyarrow's own pandas conversion.
    """
    import numpy as np
    import pyarrow as pa

    names = [str(n) for n in df.columns]
    dtypes = list(df.dtypes)
    numeric: dict[int, Any] = {}
    for dtype in {d for d in dtypes if isinstance(d, np.dtype) and d.kind in "fiub"}:
        cols = [i for i, d in enumerate(dtypes) if d == dtype]
        numeric.update(zip(cols, df.iloc[:, cols].to_numpy().T))
    arrays = [
        pa.array(numeric[i]) if i in numeric else pa.array(df.iloc[:, i], from_pandas=True)
        for i in range(len(names))
    ]
    return pa.Table.from_arrays(arrays, names=names)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` (index dropped) as parquet at ``path`` (not atomic: see write_table_atomic)."""
    import pyarrow.parquet as pq

    pq.write_table(frame_to_arrow(df), path)


def write_table_atomic(df: pd.DataFrame, path: str | os.PathLike, csv_twin: bool = False) -> Path:
    """Write ``df`` as parquet (pyarrow) atomically; optionally a ``.csv`` twin beside it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_parquet(df, tmp)
    if csv_twin:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_record(**fields: Any) -> dict[str, Any]:
    """The config saved beside an output: package version plus whatever the caller passes
    (model id and checksum, channel mapping, options)."""
    import platform
    from datetime import datetime, timezone

    return {
        "napari_cellmae_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **fields,
    }
