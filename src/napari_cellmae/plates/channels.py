"""Channel names: raw ids from file names (``w1``, ``d0``, ``390 - Blue``) mapped to stains.

The mapping is the user's to edit; every output folder gets a copy (``channels.json``) so a result
says which stain each channel was. Harmony exports carry names in ``Index.xml``; RxRx layouts have
known stains; otherwise a name defaults to its id.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..store import write_json_atomic

CHANNEL_MAP_FILE = "channels.json"

# Stain orders of the public reference sets, for the "preset" menus.
PRESETS: dict[str, tuple[str, ...]] = {
    "JUMP Cell Painting": ("DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"),
    "RxRx (Recursion)": ("Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"),
}


def index_channels(index: Any) -> list[str]:
    """The channel ids of a :func:`~napari_cellmae.plates.scan_plate` index, in index order."""
    return list(index.attrs.get("channels") or sorted(index["Metadata_Channel"].unique()))


def index_channel_names(index: Any, ids: Sequence[str] | None = None) -> dict[str, str]:
    """{channel id: the name the user or the instrument gave it} for ``ids`` (default: every
    channel of the index, in order); a channel without a name is named by its id."""
    names = index.attrs.get("channel_names") or {}
    return {c: str(names.get(c, c)) for c in (index_channels(index) if ids is None else ids)}


def normalize_channel_names(
    channels: Sequence[str], names: Mapping[str, str] | Sequence[str] | None = None
) -> dict[str, str]:
    """A complete ``{id: name}`` for ``channels``.

    ``names`` may be a mapping (missing ids keep their id as name) or a list of names in channel
    order. Empty names fall back to the id.
    """
    out = {c: c for c in channels}
    if names is None:
        return out
    if isinstance(names, Mapping):
        for key, value in names.items():
            if key in out and str(value).strip():
                out[key] = str(value).strip()
        return out
    names = list(names)
    if len(names) != len(channels):
        raise ValueError(
            f"got {len(names)} channel names for {len(channels)} channels {list(channels)}: give "
            "one name per channel, or a dict {channel id: name}"
        )
    for key, value in zip(channels, names):
        if str(value).strip():
            out[key] = str(value).strip()
    return out


def apply_preset(channels: Sequence[str], preset: str) -> dict[str, str]:
    """Name ``channels`` in order with a :data:`PRESETS` stain list (extra channels keep ids)."""
    try:
        stains = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}: choose one of {list(PRESETS)}") from None
    return {c: (stains[i] if i < len(stains) else c) for i, c in enumerate(channels)}


def save_channel_map(
    path: str | os.PathLike,
    channel_names: Mapping[str, str],
    channels: Sequence[str] | None = None,
    **extra: Any,
) -> Path:
    """Write the mapping as JSON (atomically). ``path`` may be a folder: ``<folder>/channels.json``.

    The file holds ``channels`` (ordered ids), ``channel_names`` ({id: name}) and any ``extra``
    fields (layout, plate root…).
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        path = path / CHANNEL_MAP_FILE
    channels = list(channels) if channels is not None else list(channel_names)
    record = {
        "channels": channels,
        "channel_names": {c: channel_names.get(c, c) for c in channels},
        **extra,
    }
    return write_json_atomic(path, record)


def load_channel_map(path: str | os.PathLike) -> dict[str, str]:
    """Read a mapping written by :func:`save_channel_map` (or a plain ``{id: name}`` JSON)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHANNEL_MAP_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no channel map at {path}: save one first") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): fix or delete it") from None
    names = data.get("channel_names", data) if isinstance(data, dict) else None
    if not isinstance(names, dict):
        raise ValueError(f"{path} holds no channel mapping: expected {{'channel_names': {{...}}}}")
    return {str(k): str(v) for k, v in names.items()}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


HARMONY_INDEX_FILES = ("Index.idx.xml", "Index.xml", "Index.ref.xml")


def find_harmony_index(folders: Iterable[Path]) -> Path | None:
    """The first Harmony ``Index*.xml`` in ``folders`` (the plate root and the image folders)."""
    for folder in folders:
        for name in HARMONY_INDEX_FILES:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def harmony_channel_names(index_xml: str | os.PathLike, wanted: Iterable[str] = ()) -> dict:
    """``{channel id: name}`` from a Harmony ``Index.xml`` (``Maps/Map/Entry`` or ``Images/Image``).

    Stops reading once every id in ``wanted`` has a name (index files of big plates are large).
    Unreadable files give ``{}``: names are a convenience, never a reason to fail a scan.
    """
    wanted = set(wanted)
    names: dict[str, str] = {}
    try:
        for _, elem in ET.iterparse(index_xml, events=("end",)):
            tag = _local(elem.tag)
            if tag not in ("Entry", "Image"):
                continue
            channel_id = elem.get("ChannelID")
            name = None
            for child in elem:
                ctag = _local(child.tag)
                if ctag == "ChannelID" and child.text:
                    channel_id = child.text.strip()
                elif ctag == "ChannelName" and child.text:
                    name = child.text.strip()
            if channel_id and name and channel_id not in names:
                names[str(int(channel_id)) if channel_id.isdigit() else channel_id] = name
            elem.clear()
            if wanted and wanted <= set(names):
                break
    except (ET.ParseError, OSError):
        return {}
    return names


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe version of a channel name or plate id."""
    return _SAFE.sub("_", text).strip("_") or "x"
