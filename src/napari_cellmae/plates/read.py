"""Read fields of an indexed plate: ``(C, H, W)`` arrays in the files' native dtype.

A plate channel is one 2-D grayscale plane per file (most instruments); only a plate with one file
per field may keep its channels in that file, along a declared channel axis (OME-TIFF, ImageJ
hyperstack). RGB(A) files, Z stacks, time series, unlabelled multi-page files and NaN/inf floats
are refused with an error naming the file (:func:`read_channel`). A field stacks the planes of its
files in channel order. :func:`read_field`
raises a typed, named error for a bad field; :func:`iter_fields` reads ahead in a thread pool (the
decoders release the GIL, so reading overlaps the caller's compute) and records a bad field's error
in its result instead of stopping.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .channels import index_channels
from .errors import (
    CorruptFileError,
    FieldNotFoundError,
    FileAccessError,
    MissingChannelError,
    NonFiniteError,
    PlaneError,
    PlateError,
    SizeMismatchError,
)
from .omezarr import is_zarr_image, read_zarr_field
from .scan import field_keys, list_fields

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_TIFF = (".tif", ".tiff")
_CHANNEL_AXES = "CS"  # OME/ImageJ channel axis, RGB samples


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file as ``(P, H, W)``: P = 1 for a plain single-channel image.

    TIFF (any compression imagecodecs decodes: LZW, Deflate, Zstd …; multi-page; OME/ImageJ axes:
    channels kept, other axes at their first index), PNG (8/16-bit), JPEG 2000. Raises
    :class:`CorruptFileError` naming the file when it is truncated or not decodable, and its
    :class:`FileAccessError` subclass when it cannot be opened (permission denied, a dangling
    symbolic link, gone since the scan). This reads any file as planes; a plate channel must be
    one plane: see :func:`read_channel`.
    """
    return _read_planes(path)[0]


class _Layout(NamedTuple):
    """What a file's planes are: declared channels, RGB(A) samples, and the other axes (Z, T,
    unlabelled pages …) with their lengths, as found in the file before any reduction."""

    channels: int
    samples: int
    other: dict[str, int]


_PAGES = "pages (a Z stack, a time series, or channels without a declared channel axis)"
_AXIS_WORDS = {"Z": "Z planes (a Z stack)", "T": "time points", "I": _PAGES, "Q": _PAGES}


def _read_planes(
    path: str | os.PathLike, check: Callable[[_Layout], None] | None = None
) -> tuple[np.ndarray, _Layout]:
    """``(P, H, W)`` planes and their layout; ``check(layout)`` may refuse the file before its
    pixels are decoded (TIFF: from the header alone, so a large Z stack is never read)."""
    path = Path(path)
    if is_zarr_image(path):  # a field of an OME-Zarr plate: its channels (first plane, time)
        planes = read_zarr_field(path)
        return planes, _Layout(channels=len(planes), samples=1, other={})
    ext = path.suffix.lower()
    try:
        if ext in _TIFF:
            planes, layout = _read_tiff(path, check)
        else:
            import imagecodecs

            data = path.read_bytes()
            if ext == ".png":
                image = imagecodecs.png_decode(data)
            elif ext in (".jp2", ".j2k", ".jpx"):
                image = imagecodecs.jpeg2k_decode(data)
            else:
                image = imagecodecs.imread(data)
            image = np.asarray(image)
            planes = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
            layout = _Layout(1, 1 if image.ndim == 2 else image.shape[-1], {})
            if check is not None:
                check(layout)
    except (CorruptFileError, PlaneError, MemoryError):
        raise
    except PermissionError:
        raise FileAccessError(
            f"{path}: permission denied (the file exists but this user may not read it): give "
            "read access to it (e.g. chmod a+r, or ask the owner), or leave the field out"
        ) from None
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileAccessError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist (a "
                "dangling link): restore its target, point the link at the file, or remove the link"
            ) from None
        raise FileAccessError(
            f"{path} is listed in the plate index but no longer exists: re-scan the folder"
        ) from None
    except IsADirectoryError:
        raise FileAccessError(f"{path} is a folder, not an image file: rename it") from None
    except Exception as exc:  # decoders raise many types; all mean "this file is broken"
        raise CorruptFileError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}): the file is truncated or "
            "corrupt (interrupted acquisition or copy?); re-export or re-copy it, or leave the "
            "field out"
        ) from exc
    if planes.ndim != 3 or planes.shape[-1] == 0 or planes.shape[-2] == 0 or planes.shape[0] == 0:
        raise CorruptFileError(
            f"{path} holds no 2-D image (shape {planes.shape}): the file is truncated or corrupt; "
            "re-export or re-copy it"
        )
    return planes, layout


def read_channel(path: str | os.PathLike, multichannel: bool = False) -> np.ndarray:
    """Read one channel file of a plate as ``(P, H, W)``, applying the plate's plane rule.

    A plate channel is one 2-D grayscale plane with finite values. Refused, with a
    :class:`PlaneError` naming the file and what was found: RGB(A) files (samples per pixel),
    Z stacks, time series and other multi-page files without a declared channel axis. A file with a
    declared channel axis (OME-TIFF, ImageJ hyperstack) gives one plane per channel only when
    ``multichannel`` (the plate has one file per field); otherwise it is refused too. Float images
    with NaN or infinite values raise :class:`NonFiniteError`.
    """

    def rule(layout: _Layout) -> None:
        _check_planes(path, layout, multichannel)

    planes, _ = _read_planes(path, rule)
    return check_finite(path, planes)


def check_finite(path: str | os.PathLike, planes: np.ndarray) -> np.ndarray:
    """``planes`` itself, or :class:`NonFiniteError` naming ``path`` when a float image holds NaN
    or infinite values."""
    if planes.dtype.kind in "fc":
        bad = int(planes.size - np.count_nonzero(np.isfinite(planes)))
        if bad:
            raise NonFiniteError(
                f"{path} has {bad} NaN or infinite pixel values ({100 * bad / planes.size:.2g}% "
                "of the image): intensities must be finite; re-export it with finite values "
                "(e.g. 0 where a correction divided by zero), or leave the field out"
            )
    return planes


def read_index_image(
    path: str | os.PathLike,
    channel: str,
    meta: dict[str, Any] | None = None,
    multichannel: bool = False,
) -> np.ndarray:
    """What one row of a plate index points at, as ``(P, H, W)``: the image file by the plane rule
    of :func:`read_channel`, or for an OME-Zarr field (all channels share its ``path``) that one
    ``channel`` of the field."""
    if is_zarr_image(path):
        return check_finite(path, read_zarr_field(path, [channel], meta))
    return read_channel(path, multichannel)


def _check_planes(path: str | os.PathLike, layout: _Layout, multichannel: bool) -> None:
    """PlaneError when ``layout`` cannot be one channel (see :func:`read_channel`)."""
    found = []
    if layout.samples > 1:
        kind = {3: "an RGB", 4: "an RGBA", 2: "a grey + alpha"}.get(
            layout.samples, "a multi-sample"
        )
        found.append(f"{kind} image ({layout.samples} samples per pixel)")
    for axis, n in layout.other.items():
        if n > 1:
            found.append(f"{n} {_AXIS_WORDS.get(axis, f'planes along axis {axis}')}")
    if layout.channels > 1 and not multichannel:
        found.append(f"{layout.channels} channels")
    if found:
        raise PlaneError(
            f"{path} holds {' and '.join(found)}, but a plate channel is one 2-D grayscale plane "
            f"per file{' (several only along a declared channel axis)' if multichannel else ''}: "
            "export each channel as a single-plane grayscale image (a Z stack: the plane you want, "
            "or its maximum projection), or leave the field out"
        )


def _read_tiff(
    path: Path, check: Callable[[_Layout], None] | None = None
) -> tuple[np.ndarray, _Layout]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise CorruptFileError(f"{path} holds no image: it is truncated or corrupt")
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        # pages written one by one (no shared metadata) come as one series per page: stack the
        # ones like the first (skipping thumbnails and other sizes)
        alike = [
            s
            for s in tif.series[1:]
            if s.shape == series.shape and s.dtype == series.dtype and s.axes == axes
        ]
        stack_alike = bool(alike) and axes == "YX"
        if stack_alike:
            axes, shape = "IYX", (1 + len(alike), *shape)
        sizes = dict(zip(axes, shape))
        layout = _Layout(
            channels=sizes.get("C", 1),
            samples=sizes.get("S", 1),
            other={a: n for a, n in sizes.items() if a not in "CSYX"},
        )
        if check is not None and "Y" in axes and "X" in axes:
            check(layout)  # from the header: a refused file is not decoded
        data = series.asarray(maxworkers=1)  # the prefetch pool already runs files in parallel
        if stack_alike:
            data = np.stack([data, *(s.asarray(maxworkers=1) for s in alike)])
    if data.size == 0 or "Y" not in axes or "X" not in axes:
        raise CorruptFileError(f"{path} holds no 2-D image (axes {axes!r}, shape {data.shape})")
    # channels and samples become planes; any other axis (T, Z …) is taken at its first index
    # when a channel axis exists, else flattened into planes (a plain multi-page file)
    has_channels = any(a in axes for a in _CHANNEL_AXES)
    keep = []
    for i, a in enumerate(axes):
        if a in "YX":
            continue
        if has_channels and a not in _CHANNEL_AXES:
            data = np.take(data, [0], axis=i)
        keep.append(i)
    order = [*keep, axes.index("Y"), axes.index("X")]
    data = np.transpose(data, order)
    return data.reshape(-1, data.shape[-2], data.shape[-1]), layout


def one_file_per_field(index: pd.DataFrame) -> bool:
    """True when the plate has one channel id: its file may hold the field's channels."""
    return len(index_channels(index)) == 1


class FieldResult(NamedTuple):
    """One field from :func:`iter_fields`: metadata, image ``(C, H, W)`` or None, error or None."""

    metadata: dict[str, Any]
    image: np.ndarray | None
    error: PlateError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _resolve_channels(index: pd.DataFrame, channels: Sequence[str] | None) -> list[str]:
    """Channel ids to read, in order; accepts ids or channel names."""
    all_ids = index_channels(index)
    if channels is None:
        return all_ids
    by_name = {v: k for k, v in (index.attrs.get("channel_names") or {}).items()}
    out = []
    for c in channels:
        c = str(c)
        if c in all_ids:
            out.append(c)
        elif c in by_name:
            out.append(by_name[c])
        else:
            raise MissingChannelError(
                f"channel {c!r} is not in this plate: its channels are {all_ids} "
                f"(names {list(by_name)})"
            )
    return out


def _describe(meta: dict[str, Any]) -> str:
    parts = [f"plate {meta.get('Metadata_Plate')}", f"well {meta.get('Metadata_Well')}"]
    parts.append(f"site {meta.get('Metadata_Site')}")
    for key in ("Metadata_Plane", "Metadata_Timepoint"):
        if key in meta:
            parts.append(f"{key[9:].lower()} {meta[key]}")
    return ", ".join(parts)


def _read_files(
    meta: dict[str, Any], files: dict[str, str], channels: list[str], multichannel: bool = False
) -> np.ndarray:
    """Stack the files of one field in ``channels`` order -> (C, H, W); each file by the plane
    rule of :func:`read_channel` (``multichannel``: the plate has one file per field)."""
    missing = [c for c in channels if c not in files]
    if missing:
        problem = (
            f"{_describe(meta)} has no file for channel(s) {missing} (found {sorted(files)}): "
            "the acquisition may have stopped early"
        )
        raise MissingChannelError(
            f"{problem}; pass channels=[...] to read the others, or skip this field",
            f"{problem}; open another field (the site list marks incomplete ones)",
        )
    if is_zarr_image(files[channels[0]]):  # OME-Zarr: one array holds the field's channels
        return check_finite(files[channels[0]], read_zarr_field(files[channels[0]], channels, meta))
    planes = [read_channel(files[c], multichannel) for c in channels]
    shapes = {p.shape[-2:] for p in planes}
    if len(shapes) > 1:
        detail = "; ".join(
            f"{Path(files[c]).name}: {p.shape[-2:]}" for c, p in zip(channels, planes)
        )
        raise SizeMismatchError(
            f"{_describe(meta)}: channel images differ in size ({detail}) in "
            f"{Path(files[channels[0]]).parent}: re-export the field at one size or pass "
            "channels=[...] with the channels that match"
        )
    dtype = np.result_type(*planes)
    return np.concatenate([p.astype(dtype, copy=False) for p in planes], axis=0)


def select_field(
    index: pd.DataFrame,
    well: str,
    site: int = 1,
    plate: str | None = None,
    plane: int | None = None,
    timepoint: int | None = None,
) -> pd.DataFrame:
    """The index rows (one per channel file) of one field; FieldNotFoundError when absent.

    ``plate`` may be left out when the well is on one plate only; ``plane`` and ``timepoint``
    default to the lowest present.
    """
    from .layouts import split_well, well_name

    try:
        well = well_name(*split_well(str(well)))
    except ValueError as exc:
        raise FieldNotFoundError(str(exc)) from None
    rows = index[index["Metadata_Well"] == well]
    if rows.empty:
        wells = index["Metadata_Well"].unique().tolist()
        shown = ", ".join(wells[:12]) + (" …" if len(wells) > 12 else "")
        raise FieldNotFoundError(
            f"well {well} is not in the plate index of {index.attrs.get('root', '?')}: "
            f"choose one of {shown}"
        )
    if plate is None:
        plates = rows["Metadata_Plate"].unique().tolist()
        if len(plates) > 1:
            problem = f"well {well} is on {len(plates)} plates ({', '.join(plates)})"
            raise FieldNotFoundError(
                f"{problem}: pass plate=...", f"{problem}: choose the plate in the plate list"
            )
    else:
        rows = rows[rows["Metadata_Plate"] == str(plate)]
        if rows.empty:
            raise FieldNotFoundError(
                f"well {well} is not on plate {plate!r}: plates are "
                f"{index['Metadata_Plate'].unique().tolist()}"
            )
    by_site = rows[rows["Metadata_Site"] == int(site)]
    if by_site.empty:
        raise FieldNotFoundError(
            f"well {well} has no site {site}: its sites are "
            f"{sorted(rows['Metadata_Site'].unique().tolist())}"
        )
    rows = by_site
    for column, value in (("Metadata_Plane", plane), ("Metadata_Timepoint", timepoint)):
        if column not in rows.columns:
            if value is not None:
                raise FieldNotFoundError(f"this plate has no {column[9:].lower()}s: leave it out")
            continue
        want = rows[column].min() if value is None else int(value)
        picked = rows[rows[column] == want]
        if picked.empty:
            raise FieldNotFoundError(
                f"well {well} site {site} has no {column[9:].lower()} {value}: present are "
                f"{sorted(rows[column].unique().tolist())}"
            )
        rows = picked
    return rows


def read_field(
    index: pd.DataFrame,
    well: str,
    site: int = 1,
    plate: str | None = None,
    plane: int | None = None,
    timepoint: int | None = None,
    channels: Sequence[str] | None = None,
) -> np.ndarray:
    """Read one field as ``(C, H, W)`` in native dtype, channels in index order.

    Parameters
    ----------
    index : DataFrame
        From :func:`scan_plate`.
    well, site, plate, plane, timepoint
        The field (``plate`` only needed when the well is on several plates; ``plane`` and
        ``timepoint`` default to the first).
    channels : list of str, optional
        Channel ids or names to read, in this order (default: all, in index order).

    Raises
    ------
    FieldNotFoundError, MissingChannelError, SizeMismatchError, CorruptFileError
        With the file or field named and what to do.
    """
    rows = select_field(index, well, site, plate, plane, timepoint)
    wanted = _resolve_channels(index, channels)
    keys = field_keys(index)
    meta = {k: rows[k].iloc[0] for k in keys}
    files = dict(zip(rows["Metadata_Channel"], rows["path"]))
    return _read_files(meta, files, wanted, one_file_per_field(index))


def iter_fields(
    index: pd.DataFrame,
    prefetch: int = 4,
    channels: Sequence[str] | None = None,
    fields: pd.DataFrame | None = None,
    workers: int | None = None,
) -> Iterator[FieldResult]:
    """Read every field of ``index`` in field order, reading ahead in background threads.

    Parameters
    ----------
    index : DataFrame
        From :func:`scan_plate`.
    prefetch : int
        Fields read ahead of the consumer (0 reads in the caller's thread).
    channels : list of str, optional
        Channel ids or names (default: all, in index order).
    fields : DataFrame, optional
        A subset of :func:`list_fields` rows to read (default: all fields).
    workers : int, optional
        Reader threads (default ``min(prefetch, 4)``).

    Yields
    ------
    FieldResult
        ``(metadata, image, error)``: ``image`` ``(C, H, W)`` or None; ``error`` the
        :class:`PlateError` that made the field unreadable (missing channel, size mismatch,
        corrupt file), recorded so a whole-plate run goes on.
    """
    wanted = _resolve_channels(index, channels)
    multichannel = one_file_per_field(index)
    keys = field_keys(index)
    if fields is None:
        fields = list_fields(index)
    groups = {
        key if isinstance(key, tuple) else (key,): dict(zip(g["Metadata_Channel"], g["path"]))
        for key, g in index.groupby(keys, sort=False)
    }
    meta_columns = [c for c in fields.columns if c.startswith("Metadata_")]
    tasks = []
    for row in fields.itertuples(index=False):
        meta = {c: getattr(row, c) for c in meta_columns}
        files = groups.get(tuple(meta[k] for k in keys), {})
        tasks.append((meta, files))

    def load(meta: dict[str, Any], files: dict[str, str]) -> FieldResult:
        try:
            return FieldResult(meta, _read_files(meta, files, wanted, multichannel), None)
        except PlateError as exc:
            return FieldResult(meta, None, exc)

    if prefetch <= 0:
        for meta, files in tasks:
            yield load(meta, files)
        return

    pool = ThreadPoolExecutor(max_workers=workers or min(prefetch, 4), thread_name_prefix="read")
    pending: deque[Future] = deque()
    try:
        todo = iter(tasks)
        for meta, files in todo:
            pending.append(pool.submit(load, meta, files))
            if len(pending) >= prefetch:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(load, *nxt))
            yield result
    finally:  # the consumer stopped early (break, Cancel): drop what was queued
        pool.shutdown(wait=False, cancel_futures=True)
