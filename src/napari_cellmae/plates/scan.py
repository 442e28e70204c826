"""Turn a plate folder into the field index: one row per image file, ``Metadata_*`` columns.

``scan_plate`` walks the folder once with ``os.scandir``, tries every layout on the file names
(auto-detection keeps the one that matches clearly more files than any other), and builds a pandas
DataFrame in field order (plate, row A..Z then AA..AF, column, site, channel). ``df.attrs`` carries
the layout, root, ordered channel ids and channel names, and a one-line summary.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .channels import find_harmony_index, harmony_channel_names, normalize_channel_names
from .errors import LayoutError
from .layouts import (
    LAYOUTS,
    REGEX_EXAMPLE,
    REGEX_GROUPS_HELP,
    STRUCTURAL_FOLDER,
    Layout,
    Parsed,
    get_layout,
    order_channels,
    row_to_index,
    well_name,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jp2", ".j2k")
# the field key columns, in sort order (plane/timepoint only when the layout has them)
FIELD_KEYS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
OPTIONAL_KEYS = ("Metadata_Plane", "Metadata_Timepoint")
# auto-detection: the runner-up must match fewer than this fraction of the winner's files
AMBIGUITY_RATIO = 0.5
_PLATE_FOLDER = re.compile(r"^plate[ _-]?\d+$", re.IGNORECASE)


def walk_images(root: Path) -> tuple[list[str], list[str]]:
    """Relative paths (``/``-separated) and names of image files under ``root``, hidden skipped.

    Folder symbolic links are followed only to folders outside ``root`` not seen yet, so a link
    back inside (``ln -s . loop``, a second name for a sub-folder) neither loops nor lists the same
    files twice; each one skipped is logged. Unreadable folders are skipped with a warning.
    """
    relpaths: list[str] = []
    names: list[str] = []
    root_real = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    stack = [("", str(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:  # permission denied, a link loop, gone meanwhile
            if not prefix and isinstance(exc, PermissionError):
                raise PermissionError(
                    f"{folder}: permission denied: this user may not list the plate folder; "
                    "give read access to it (e.g. chmod a+rx), or ask its owner"
                ) from None
            logger.warning("skipping unreadable folder %s (%s)", folder, exc.strerror or exc)
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:  # a link loop (ELOOP) or an entry removed meanwhile
                logger.warning("skipping %s: a symbolic link that cannot be resolved", entry.path)
                continue
            if is_dir:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if target == root_real or target.startswith(root_real + os.sep):
                        logger.warning(
                            "not following folder link %s: it points back inside the plate "
                            "folder (%s), whose files are scanned once",
                            entry.path,
                            target,
                        )
                        continue
                stack.append((f"{prefix}{name}/", entry.path))
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                relpaths.append(prefix + name)
                names.append(name)
    return relpaths, names


def _match_all(layout: Layout, relpaths: list[str], names: list[str]) -> list[tuple[int, Parsed]]:
    out = []
    match = layout.match
    for i, (rel, name) in enumerate(zip(relpaths, names)):
        parsed = match(rel, name)
        if parsed is not None:
            out.append((i, parsed))
    return out


def detect_layout(
    relpaths: list[str], names: list[str], folder: str | os.PathLike = ""
) -> tuple[Layout, list[tuple[int, Parsed]], dict[str, int]]:
    """Pick the layout matching the most files; ValueError when none or two fit."""
    results = {name: _match_all(layout, relpaths, names) for name, layout in LAYOUTS.items()}
    counts = {name: len(r) for name, r in results.items()}
    ranked = sorted(counts, key=counts.get, reverse=True)
    best, second = ranked[0], ranked[1]
    tried = ", ".join(f"{n} {counts[n]}" for n in ranked)
    hint = (
        f"Choose one with layout=<name> (Python) or --layout <name> (CLI), or give a regular "
        f"expression instead, e.g. layout=r'{REGEX_EXAMPLE}'; {REGEX_GROUPS_HELP}."
    )
    gui_hint = (
        "Choose the layout in the layout box next to Scan, or choose 'regex (named groups)' "
        f"there and type a pattern in the field beside it, e.g. {REGEX_EXAMPLE}; "
        f"{REGEX_GROUPS_HELP}."
    )
    if counts[best] == 0:
        examples = ", ".join(names[:3]) or "none"
        problem = (
            f"no known plate layout in {folder}: {len(names)} image files, matches per layout: "
            f"{tried}. Example names: {examples}."
        )
        raise LayoutError(f"{problem} {hint}", f"{problem} {gui_hint}")
    if counts[second] >= AMBIGUITY_RATIO * counts[best]:
        problem = (
            f"ambiguous plate folder {folder}: several layouts match (files matched: {tried} of "
            f"{len(names)}); it may mix exports of two instruments."
        )
        raise LayoutError(f"{problem} {hint}", f"{problem} {gui_hint}")
    return LAYOUTS[best], results[best], counts


def _root_plate_name(root: Path) -> str:
    # RxRx folders end in .../HUVEC-1/Plate1: "Plate1" alone would clash across experiments
    if _PLATE_FOLDER.match(root.name) and root.parent.name:
        return f"{root.parent.name}_{root.name}"
    return root.name


def scan_plate(
    folder: str | os.PathLike,
    layout: str | re.Pattern | Layout = "auto",
    channel_names: dict[str, str] | list[str] | None = None,
) -> pd.DataFrame:
    """Index a plate folder: one row per image file.

    Parameters
    ----------
    folder : path
        The plate folder (sub-folders are walked: experiment/plate, TimePoint_N, ZStep_N …).
    layout : str, re.Pattern or Layout
        ``"auto"`` (detect), a name from :data:`LAYOUTS`, or a regular expression with named groups
        ``well`` (or ``row`` + ``col``), ``site``, ``channel`` and optional ``plate``, ``plane``,
        ``timepoint``, searched in the path relative to ``folder``.
    channel_names : dict or list, optional
        ``{channel id: name}`` or names in channel order (default: Harmony ``Index.xml`` names,
        known RxRx stains, else the ids).

    Returns
    -------
    pandas.DataFrame
        Columns ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Row``, ``Metadata_Col``,
        ``Metadata_Site``, ``Metadata_Channel`` (+ ``Metadata_Plane``/``Metadata_Timepoint`` when
        present) and ``path``; ``attrs``: ``layout``, ``root``, ``channels``, ``channel_names``,
        ``n_fields``, ``n_files``, ``summary`` and what was skipped.
    """
    import pandas as pd

    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"plate folder {root} does not exist: check the path")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a plate folder: pass its folder")
    root = root.resolve()
    from .omezarr import is_ome_zarr_plate, scan_zarr_plate, zarr_node_hint

    if is_ome_zarr_plate(root):  # OME-Zarr HCS: wells and fields come from the plate metadata
        return scan_zarr_plate(root, layout, channel_names)

    relpaths, names = walk_images(root)
    thumbs = {i for i, n in enumerate(names) if "_thumb" in n.lower()}
    if thumbs:
        relpaths = [r for i, r in enumerate(relpaths) if i not in thumbs]
        names = [n for i, n in enumerate(names) if i not in thumbs]
    if not names and zarr_node_hint(root):
        raise LayoutError(zarr_node_hint(root))
    if not names:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}: choose the folder that "
            "holds the plate's images"
        )

    counts: dict[str, int] = {}
    if isinstance(layout, str) and layout.lower() == "auto":
        chosen, matched, counts = detect_layout(relpaths, names, root)
    else:
        chosen = get_layout(layout)
        matched = _match_all(chosen, relpaths, names)
        if not matched:
            problem = (
                f"layout {chosen.name!r} ({chosen.description}) matches none of the {len(names)} "
                f"image files in {root} (e.g. {', '.join(names[:3])})"
            )
            raise LayoutError(
                f"{problem}: use layout='auto' (--layout auto) or a regex, e.g. {REGEX_EXAMPLE}; "
                f"{REGEX_GROUPS_HELP}",
                f"{problem}: choose 'auto (detect)' in the layout box, or another layout, or a "
                f"pattern, e.g. {REGEX_EXAMPLE}; {REGEX_GROUPS_HELP}",
            )

    layout_note = ""
    if chosen.finish is not None:  # a decision that needs the whole folder (scan^R plate format)
        matched, layout_note = chosen.finish(matched, names)

    # scan^R's data/ folder (and its like) is not the plate's name: its parent is
    root_plate = _root_plate_name(
        root.parent if root.name.lower() in chosen.export_folders else root
    )
    cols: dict[str, list] = {k: [] for k in ("plate", "row", "col", "site", "channel", "path")}
    planes: list[int | None] = []
    times: list[int | None] = []
    root_str = str(root)
    for i, p in matched:
        rel = relpaths[i]
        plate = p.plate
        if plate is None:
            folders = [
                f
                for f in rel.split("/")[:-1]
                if not STRUCTURAL_FOLDER.match(f) and f.lower() not in chosen.export_folders
            ]
            plate = "_".join(folders) if folders else root_plate
        cols["plate"].append(plate)
        cols["row"].append(p.row)
        cols["col"].append(p.col)
        cols["site"].append(p.site)
        cols["channel"].append(p.channel)
        cols["path"].append(os.path.join(root_str, *rel.split("/")))
        planes.append(p.plane)
        times.append(p.timepoint)

    df = pd.DataFrame(
        {
            "Metadata_Plate": pd.Series(cols["plate"], dtype=object).astype(str),
            "Metadata_Well": [well_name(r, c) for r, c in zip(cols["row"], cols["col"])],
            "Metadata_Row": cols["row"],
            "Metadata_Col": pd.array(cols["col"], dtype="int64"),
            "Metadata_Site": pd.array(cols["site"], dtype="int64"),
            "Metadata_Channel": cols["channel"],
        }
    )
    for column, values in (("Metadata_Plane", planes), ("Metadata_Timepoint", times)):
        if any(v is not None for v in values):
            df[column] = [1 if v is None else v for v in values]
            df[column] = df[column].astype("int64")
    df["path"] = cols["path"]

    channels = order_channels(set(df["Metadata_Channel"]), chosen)
    df = sort_index(df, channels)

    keys = [c for c in (*FIELD_KEYS, *OPTIONAL_KEYS, "Metadata_Channel") if c in df.columns]
    duplicated = df.duplicated(keys, keep="first")
    n_duplicates = int(duplicated.sum())
    if n_duplicates:
        logger.warning(
            "%d files map to the same field and channel as another file (kept the first), e.g. %s",
            n_duplicates,
            df.loc[duplicated, "path"].iloc[0],
        )
        df = df.loc[~duplicated].reset_index(drop=True)

    names_default: dict[str, str] = dict(chosen.default_channel_names)
    if chosen.name == "harmony":
        folders = {root} | {Path(p).parent for p in df["path"].iloc[:1]}
        index_xml = find_harmony_index(sorted(folders))
        if index_xml is not None:
            names_default.update(harmony_channel_names(index_xml, channels))
    if isinstance(channel_names, dict):  # ids the user did not name keep the layout's names
        names_map = normalize_channel_names(channels, {**names_default, **channel_names})
    else:
        names_map = normalize_channel_names(channels, channel_names or names_default)

    n_fields = int(df.groupby([k for k in keys if k != "Metadata_Channel"], sort=False).ngroups)
    plates = df["Metadata_Plate"].unique().tolist()
    n_wells = len(df.drop_duplicates(["Metadata_Plate", "Metadata_Well"]))
    summary = (
        f"{chosen.name}: {n_fields} field{'s' * (n_fields != 1)} in "
        f"{n_wells} well{'s' * (n_wells != 1)} of {len(plates)} plate{'s' * (len(plates) != 1)}, "
        f"{len(channels)} channel{'s' * (len(channels) != 1)} ({', '.join(channels)}), "
        f"{len(df)} files"
    )
    if layout_note:
        summary += f"; {layout_note}"
    skipped = len(names) - len(matched)
    if skipped:
        summary += f"; {skipped} image files not matching the layout ignored"
    if thumbs:
        summary += f"; {len(thumbs)} thumbnails skipped"
    logger.info("scanned %s: %s", root, summary)

    df.attrs.update(
        layout=chosen.name,
        root=str(root),
        channels=channels,
        channel_names=names_map,
        n_fields=n_fields,
        n_files=len(df),
        n_plates=len(plates),
        n_unmatched=skipped,
        n_thumbnails=len(thumbs),
        n_duplicates=n_duplicates,
        layout_counts=counts,
        summary=summary,
    )
    if chosen.name == "regex":
        df.attrs["regex"] = chosen.pattern.pattern
    return df


def sort_index(df: pd.DataFrame, channels: list[str]) -> pd.DataFrame:
    """Rows in field order: plate, row (A..Z, AA..AF), column, site, plane, time, channel."""
    rank = {c: i for i, c in enumerate(channels)}
    order = df.assign(
        _row=df["Metadata_Row"].map(row_to_index),
        _channel=df["Metadata_Channel"].map(rank),
    )
    by = ["Metadata_Plate", "_row", "Metadata_Col", "Metadata_Site"]
    by += [c for c in OPTIONAL_KEYS if c in df.columns] + ["_channel"]
    order = order.sort_values(by, kind="stable")
    return df.loc[order.index].reset_index(drop=True)


def field_keys(index: pd.DataFrame) -> list[str]:
    """The columns that identify a field in ``index`` (plate, well, site [, plane, timepoint])."""
    return [c for c in (*FIELD_KEYS, *OPTIONAL_KEYS) if c in index.columns]


def list_fields(index: pd.DataFrame) -> pd.DataFrame:
    """One row per field: plate, well, row, col, site [, plane, timepoint], ``n_channels``,
    ``complete`` (every channel of the plate present), in field order."""
    import pandas as pd

    keys = field_keys(index)
    channels = index.attrs.get("channels") or sorted(index["Metadata_Channel"].unique())
    if index.empty:
        out = pd.DataFrame(columns=[*keys, "Metadata_Row", "Metadata_Col", "n_channels"])
    else:
        out = (
            index.groupby(keys, sort=False)
            .agg(
                Metadata_Row=("Metadata_Row", "first"),
                Metadata_Col=("Metadata_Col", "first"),
                n_channels=("Metadata_Channel", "nunique"),
            )
            .reset_index()
        )
    out["complete"] = out["n_channels"] == len(channels)
    ordered = ["Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Col", "Metadata_Site"]
    ordered += [c for c in OPTIONAL_KEYS if c in out.columns] + ["n_channels", "complete"]
    out = out[ordered]
    out.attrs = dict(index.attrs)
    return out
