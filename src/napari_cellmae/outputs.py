"""The output-folder rule, checked by every command and GUI path before it writes anything.

One rule (docs/guarantees.md):

- Inputs are never written: an output folder that is an input folder (a plate, a model), lies
  inside one, is a symlink to one, or would put the command's own subfolders inside one (the
  plate's parent when the plate folder is named like the plate) is refused.
- An output folder is used when it does not exist yet (it is created), when it is empty, or when
  an earlier run of the same command made it (it carries :data:`MARKER`, written first when the
  folder is claimed; folders made before the marker existed are recognised by their run record).
  That is what lets a rerun resume.
- Anything else (a folder the tool did not make and that is not empty, or one made by another
  command) is refused with a message naming the folder and the fix: a new or empty folder, or
  ``--force`` (``force=True``) to write into it anyway, replacing files of the same names (the
  GUI, which has no such override, gets the error's ``gui_message``: a new or empty folder, or
  one cellmae made for that output).
- A folder path that names an existing file is refused.

:func:`prepare_output_dir` also removes the tool's own temporary ``.*.part`` files that a killed
run left in a folder it made (files still being written by a live process are locked and kept;
see :func:`napari_cellmae.store.atomic_path`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = ".cellmae-output.json"
TOOL = "napari-cellmae"
# run records of folders made before the marker existed
_LEGACY_RECORDS = ("config.json", "run.json")


class OutputFolderError(ValueError):
    """An output folder that may not be written (the message says why and what to do).

    ``str(error)`` gives the fix in CLI and Python words (``--force``, ``force=True``);
    :attr:`gui_message` in the GUI's, which has no such override (the napari widget's status line
    shows it: :func:`napari_cellmae._qt.worker.gui_text`).
    """

    def __init__(self, message: str, gui_message: str | None = None):
        super().__init__(message)
        self.gui_message = gui_message or message


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def is_inside(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when ``child`` is ``parent`` or lies inside it, after resolving symlinks."""
    c, p = _resolve(child), _resolve(parent)
    return c == p or p in c.parents


def _marker_command(out: Path) -> str | None:
    """The command that made ``out`` ("" when it is ours but the command is unknown), or None
    when nothing says the tool made it."""
    marker = out / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and data.get("made_by") == TOOL:
            return str(data.get("command") or "")
        return None
    records = [out / n for n in _LEGACY_RECORDS] + sorted(out.glob("*_run.json"))[:1]
    for path in records:  # a folder written before the marker existed: its run record
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "napari_cellmae_version" in data:
            if data.get("command"):
                return str(data["command"])
            if "alignment" in data:
                return "profile"
            return "embed" if "model_checksum" in data else ""
    return None


_OS_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # what file browsers leave in any folder


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in _OS_FILES)


def check_output_dir(
    out: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    subfolders: Iterable[str] = (),
    force: bool = False,
    what: str = "input",
) -> Path:
    """Raise :class:`OutputFolderError` when ``command`` may not write into ``out`` (see the
    module docstring); writes nothing. ``inputs``: folders or files the command reads (never
    written); ``subfolders``: folders the command creates inside ``out`` (checked against the
    inputs too); ``what``: the inputs' name in messages ("plate folder"). Returns ``out``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputFolderError(
            f"The output folder {path} is an existing file: name a folder (new or empty) instead."
        )
    for src in inputs:
        src = Path(src).expanduser()
        if is_inside(path, src):
            how = "is" if _resolve(path) == _resolve(src) else "is inside"
            if _resolve(path) != Path(os.path.abspath(path)):
                how += f" (through a symlink: it resolves to {_resolve(path)})"
            raise OutputFolderError(
                f"The output folder {path} {how} the {what} {src}: the {what} is never written "
                f"to. Choose an output folder outside {src}."
            )
        for sub in subfolders:
            if is_inside(path / sub, src):
                raise OutputFolderError(
                    f"The output folder {path} would put its folder {sub!r} at {path / sub}, "
                    f"inside the {what} {src}: the {what} is never written to. Choose another "
                    "output folder (e.g. a new folder beside the plate)."
                )
    if not path.is_dir() or force:
        return path
    made_by = _marker_command(path)
    if made_by is None:
        entries = _entries(path)
        if entries:
            shown = ", ".join(entries[:5]) + (" …" if len(entries) > 5 else "")
            why = (
                f"The output folder {path} is not empty ({shown}) and was not made by cellmae: "
                "its files could be overwritten. Choose a new or empty folder"
            )
            raise OutputFolderError(
                f"{why}, or pass --force (force=True) to write into it anyway (files of the same "
                "names are replaced).",
                f"{why}, or one cellmae made for {command} output.",
            )
    elif made_by and made_by != command:
        why = (
            f"The output folder {path} was made by `cellmae {made_by}`, not `cellmae {command}`: "
            f"choose another folder for this {command} output"
        )
        raise OutputFolderError(
            f"{why} (or pass --force to write into it anyway).",
            f"{why}: a new or empty one, or one cellmae made for {command} output.",
        )
    return path


def prepare_output_dir(
    out: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    subfolders: Iterable[str] = (),
    force: bool = False,
    what: str = "input",
) -> Path:
    """:func:`check_output_dir`, then create ``out``, mark it as made by ``command`` and remove
    the stale temporary files of an earlier, killed run. Returns ``out`` as a Path."""
    from ._version import __version__
    from .store import write_json_atomic

    path = check_output_dir(
        out, command, inputs=inputs, subfolders=subfolders, force=force, what=what
    )
    path.mkdir(parents=True, exist_ok=True)
    if _marker_command(path) is None or not (path / MARKER).is_file():
        marker: dict[str, Any] = {"made_by": TOOL, "command": command, "version": __version__}
        write_json_atomic(path / MARKER, marker)
    clean_stale_parts(path)
    return path


def clean_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary ``.<name>.<random>.part`` files (not folders) under ``folder`` that
    no live writer holds (see :func:`napari_cellmae.store.atomic_path`); returns them.

    A writer holds an exclusive lock on its temporary file until it renames it into place, so a
    file that can be locked here was left by a process that died. Without ``fcntl`` (Windows)
    only files untouched for a day are removed.
    """
    import time

    from .store import part_is_stale

    removed = []
    now = time.time()
    for root, dirs, files in os.walk(folder):
        # a well folder being built is a ".<well>.<random>.part" folder: not ours to judge here
        dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(".part"))]
        for name in files:
            if not (name.startswith(".") and name.endswith(".part")):
                continue
            path = Path(root) / name
            try:
                if part_is_stale(path, now):
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
    return removed
