"""OME-Zarr HCS plates (NGFF 0.4 and 0.5): plate -> wells -> fields, read lazily with ``zarr``.

What IDR, the BioImage Archive, Fractal and napari-ome-zarr serve. The plate's metadata
(``plate``: rows, columns, wells; each well's ``well``: its field images; each image's
``multiscales`` and ``omero``) becomes the same field index a plate folder gives: one row per
(field, channel [, plane, timepoint]) with the usual ``Metadata_*`` columns, and as ``path`` the
field's image group (``/data/plate.zarr/B/3/0``), which every table can carry and
:func:`read_zarr_field` reads. Only the chunks of one field at full resolution (the first
``multiscales`` dataset) are read, when the field is asked for.

NGFF 0.4 keeps the metadata at the top of the group attributes (zarr v2 store); 0.5 keeps it
under ``attributes["ome"]`` of a zarr v3 store (needs ``zarr>=3``, Python >= 3.11).

Conventions: channel ids are the 1-based positions on the ``c`` axis (``"1"``, ``"2"`` …), named by
the ``omero`` channel labels of the plate's first field; sites are the well's images in the order
the well lists them (1-based); planes and timepoints (1-based) become ``Metadata_Plane`` /
``Metadata_Timepoint`` rows when an image has more than one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CorruptFileError, LayoutError, MissingChannelError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

logger = logging.getLogger(__name__)

LAYOUT_NAME = "ome-zarr"
_V2_ATTRS = ".zattrs"
_V3_META = "zarr.json"


def _attrs(folder: Path) -> dict[str, Any] | None:
    """The NGFF attributes of a zarr group folder (0.4 ``.zattrs`` or 0.5 ``zarr.json`` ``ome``),
    without importing zarr; None when the folder is not a zarr group with attributes."""
    try:
        if (folder / _V3_META).is_file():
            meta = json.loads((folder / _V3_META).read_text())
            attrs = meta.get("attributes") or {}
            return attrs.get("ome", attrs)
        if (folder / _V2_ATTRS).is_file():
            return json.loads((folder / _V2_ATTRS).read_text())
    except (OSError, ValueError):
        return None
    return None


def is_ome_zarr_plate(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is the top of an OME-Zarr HCS plate (its attributes hold ``plate``)."""
    attrs = _attrs(Path(folder))
    return bool(attrs) and "plate" in attrs


def zarr_node_hint(folder: str | os.PathLike) -> str | None:
    """For a folder inside an OME-Zarr plate (a well or a field): what to open instead."""
    folder = Path(folder)
    attrs = _attrs(folder)
    if not attrs or not ({"well", "multiscales"} & set(attrs)):
        return None
    for parent in folder.parents:
        if is_ome_zarr_plate(parent):
            return (
                f"{folder} is a {'well' if 'well' in attrs else 'field image'} of the OME-Zarr "
                f"plate {parent}: open the plate folder {parent}"
            )
    return None


def is_zarr_image(path: str | os.PathLike) -> bool:
    """True when ``path`` (an index ``path``) is a zarr image group rather than an image file."""
    return os.path.isdir(path)


def _open(path: Path):
    """The zarr group at ``path``, read-only; a clear error when zarr cannot read it."""
    import zarr

    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises many types for a missing or foreign store
        hint = ""
        if (path / _V3_META).is_file() and int(zarr.__version__.split(".")[0]) < 3:
            hint = " NGFF 0.5 plates are zarr v3 stores: pip install 'zarr>=3' (Python >= 3.11)."
        raise CorruptFileError(
            f"{path} cannot be opened as a zarr group ({type(exc).__name__}: {exc}).{hint}"
        ) from exc


def _ngff(group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs)


def _multiscale(image_group, where: Path) -> tuple[str, list[str]]:
    """Level-0 dataset path and the axis names of an image group."""
    attrs = _ngff(image_group)
    try:
        ms = attrs["multiscales"][0]
        dataset = ms["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError):
        raise CorruptFileError(
            f"{where} has no NGFF 'multiscales' metadata: it is not an OME-Zarr image; "
            "re-export the plate (e.g. with ome-zarr-py or bioformats2raw)"
        ) from None
    axes = ms.get("axes") or ["t", "c", "z", "y", "x"][-len(image_group[dataset].shape) :]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    return dataset, [n.lower() for n in names]


def _row_name(name: str, index: int) -> str:
    from .layouts import index_to_row

    name = str(name).strip()
    return name.upper() if name.isalpha() else index_to_row(index + 1)


def _col_number(name: str, index: int) -> int:
    name = str(name).strip()
    return int(name) if name.isdigit() else index + 1


def scan_zarr_plate(
    folder: str | os.PathLike,
    layout: Any = "auto",
    channel_names: dict[str, str] | list[str] | None = None,
) -> pd.DataFrame:
    """The field index of an OME-Zarr HCS plate (what :func:`~napari_cellmae.plates.scan_plate`
    returns for one); ``layout`` must be ``"auto"`` or ``"ome-zarr"``."""
    import pandas as pd

    from .channels import normalize_channel_names
    from .scan import sort_index

    root = Path(folder).resolve()
    if not (isinstance(layout, str) and layout.lower() in ("auto", LAYOUT_NAME)):
        raise LayoutError(
            f"{root} is an OME-Zarr HCS plate: its wells and fields come from its metadata, not "
            f"from file names; use layout 'auto' (or '{LAYOUT_NAME}') instead of {layout!r}"
        )
    group = _open(root)
    ngff = _ngff(group)
    plate = ngff.get("plate") or {}
    version = str(ngff.get("version") or plate.get("version") or "")
    try:
        row_names = [r["name"] for r in plate["rows"]]
        col_names = [c["name"] for c in plate["columns"]]
        wells = list(plate["wells"])
    except (KeyError, TypeError):
        raise LayoutError(
            f"{root}: the 'plate' metadata lacks rows, columns or wells (NGFF HCS spec): "
            "re-export the plate"
        ) from None
    plate_name = str(plate.get("name") or (root.stem if root.suffix == ".zarr" else root.name))

    records: list[tuple] = []
    omero_labels: list[str] | None = None
    n_channels = 0
    has_plane = has_time = False
    problems: list[str] = []
    for well in wells:
        well_path = str(well["path"]).strip("/")
        parts = well_path.split("/")
        r_i = well.get("rowIndex", row_names.index(parts[0]) if parts[0] in row_names else 0)
        c_i = well.get("columnIndex", col_names.index(parts[-1]) if parts[-1] in col_names else 0)
        row, col = _row_name(row_names[r_i], r_i), _col_number(col_names[c_i], c_i)
        try:
            well_group = group[well_path]
            images = _ngff(well_group)["well"]["images"]
        except Exception as exc:
            problems.append(f"well {well_path}: {type(exc).__name__}: {exc}")
            continue
        for site, image in enumerate(images, 1):
            image_path = f"{well_path}/{str(image['path']).strip('/')}"
            try:
                image_group = group[image_path]
                dataset, axes = _multiscale(image_group, root / image_path)
                shape = image_group[dataset].shape
            except Exception as exc:
                problems.append(f"field {image_path}: {exc}")
                continue
            sizes = dict(zip(axes, shape))
            n_c, n_z, n_t = sizes.get("c", 1), sizes.get("z", 1), sizes.get("t", 1)
            n_channels = max(n_channels, n_c)
            has_plane |= n_z > 1
            has_time |= n_t > 1
            if omero_labels is None:
                channels_meta = (_ngff(image_group).get("omero") or {}).get("channels") or []
                omero_labels = [str(ch.get("label") or "") for ch in channels_meta]
            path = os.path.join(str(root), *image_path.split("/"))
            for t in range(n_t):
                for z in range(n_z):
                    for c in range(n_c):
                        records.append((plate_name, row, col, site, str(c + 1), z + 1, t + 1, path))
    if problems:
        logger.warning("%s: %d unreadable wells/fields, e.g. %s", root, len(problems), problems[0])
    if not records:
        detail = f" ({problems[0]})" if problems else ""
        raise LayoutError(f"the OME-Zarr plate {root} lists no readable fields{detail}")

    from .layouts import well_name

    df = pd.DataFrame(
        records,
        columns=[
            "Metadata_Plate",
            "Metadata_Row",
            "Metadata_Col",
            "Metadata_Site",
            "Metadata_Channel",
            "Metadata_Plane",
            "Metadata_Timepoint",
            "path",
        ],
    )
    df.insert(
        1, "Metadata_Well", [well_name(r, c) for r, c in zip(df.Metadata_Row, df.Metadata_Col)]
    )
    for column in ("Metadata_Col", "Metadata_Site", "Metadata_Plane", "Metadata_Timepoint"):
        df[column] = df[column].astype("int64")
    if not has_plane:
        df = df.drop(columns="Metadata_Plane")
    if not has_time:
        df = df.drop(columns="Metadata_Timepoint")
    df = df[[*(c for c in df.columns if c != "path"), "path"]]
    channels = [str(c + 1) for c in range(n_channels)]
    df = sort_index(df, channels)

    labels = {cid: name for cid, name in zip(channels, omero_labels or []) if name}
    if isinstance(channel_names, dict):
        names_map = normalize_channel_names(channels, {**labels, **channel_names})
    else:
        names_map = normalize_channel_names(channels, channel_names or labels)

    keys = [c for c in df.columns if c.startswith("Metadata_") and c not in _NOT_KEYS]
    n_fields = int(df.groupby(keys, sort=False).ngroups)
    n_wells = len(df.drop_duplicates(["Metadata_Plate", "Metadata_Well"]))
    summary = (
        f"{LAYOUT_NAME} (NGFF {version or '?'}): {n_fields} field{'s' * (n_fields != 1)} in "
        f"{n_wells} well{'s' * (n_wells != 1)} of 1 plate, {len(channels)} "
        f"channel{'s' * (len(channels) != 1)} ({', '.join(names_map[c] for c in channels)})"
    )
    if problems:
        summary += f"; {len(problems)} unreadable wells/fields left out ({problems[0]})"
    logger.info("scanned %s: %s", root, summary)
    df.attrs.update(
        layout=LAYOUT_NAME,
        root=str(root),
        channels=channels,
        channel_names=names_map,
        n_fields=n_fields,
        n_files=len(df),
        n_plates=1,
        n_unmatched=0,
        n_thumbnails=0,
        n_duplicates=0,
        layout_counts={},
        summary=summary,
        ngff_version=version,
        problems=problems,
    )
    return df


_NOT_KEYS = ("Metadata_Channel", "Metadata_Row", "Metadata_Col")


def _describe(meta: dict[str, Any]) -> str:
    return ", ".join(
        f"{k[9:].lower()} {meta[k]}"
        for k in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Plane")
        if k in meta
    )


def read_zarr_field(
    path: str | os.PathLike,
    channels: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> np.ndarray:
    """One field of an OME-Zarr plate as ``(C, H, W)`` in its stored dtype, from the first
    (full-resolution) dataset; only that field's chunks are read.

    ``channels``: 1-based channel ids in the order wanted (default all); ``meta``: the field's
    ``Metadata_Plane`` / ``Metadata_Timepoint`` (default the first).
    """
    path = Path(path)
    meta = meta or {}
    group = _open(path)
    dataset, axes = _multiscale(group, path)
    try:
        array = group[dataset]
    except Exception as exc:
        raise CorruptFileError(f"{path}/{dataset} cannot be opened ({exc}): re-export it") from exc
    sizes = dict(zip(axes, array.shape))
    n_c = sizes.get("c", 1)
    wanted = [int(c) - 1 for c in channels] if channels is not None else list(range(n_c))
    bad = [c + 1 for c in wanted if not 0 <= c < n_c]
    if bad:
        raise MissingChannelError(
            f"{_describe(meta) or path}: the image {path} has {n_c} channel(s), not channel(s) "
            f"{bad}: pass channels=[...] within 1-{n_c}"
        )
    position = {
        "z": int(meta.get("Metadata_Plane", 1)) - 1,
        "t": int(meta.get("Metadata_Timepoint", 1)) - 1,
    }
    planes = []
    try:
        for c in wanted:
            index = tuple(
                slice(None) if a in ("y", "x") else c if a == "c" else position.get(a, 0)
                for a in axes
            )
            planes.append(np.asarray(array[index]))
    except Exception as exc:  # a missing or truncated chunk: name the field and the fix
        raise CorruptFileError(
            f"{path} ({_describe(meta)}) cannot be read ({type(exc).__name__}: {exc}): a chunk is "
            "missing or corrupt (interrupted copy?); re-copy the plate or leave the field out"
        ) from exc
    if not planes or planes[0].ndim != 2:
        raise CorruptFileError(f"{path} holds no 2-D image (axes {axes}, shape {array.shape})")
    return np.stack(planes)
