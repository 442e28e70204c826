"""Where models come from: the bundled folder, the user's own model folders, and the Hugging Face
cache. Every model picker and ``cellmae info`` list models through :func:`list_models`.

Pure Python (no torch): listing models reads folder names and small JSON files only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .store import write_json_atomic

BUNDLED_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "cellmae-tiny"

OPENPHENOM_REPO = "recursionpharma/OpenPhenom"
OPENPHENOM_ATTRIBUTION = (
    "OpenPhenom-S/16 by Recursion Pharmaceuticals (Kraus et al., 2023, 'Masked Autoencoders for "
    "Microscopy are Scalable Learners of Cellular Biology'). Weights under Recursion's "
    "non-commercial licence; they are downloaded by you from Hugging Face and never bundled."
)

# Hugging Face repositories offered in the pickers even before they are downloaded.
KNOWN_HUB_MODELS: dict[str, str] = {OPENPHENOM_REPO: OPENPHENOM_ATTRIBUTION}


@dataclass(frozen=True)
class ModelEntry:
    """One model a user can pick."""

    name: str  # shown to the user
    source: str  # what to pass to load_model(): a bundled name, a folder or a hub repo id
    kind: str  # "bundled" | "local" | "hub-cached" | "hub"
    note: str = ""  # attribution / licence line to show next to it


def cellmae_home() -> Path:
    """Per-user state folder: ``$CELLMAE_HOME`` or ``~/.cache/napari-cellmae``."""
    env = os.environ.get("CELLMAE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-cellmae"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def bundled_models() -> dict[str, Path]:
    """Bundled model folders by name (each holds ``config.json`` + ``model.safetensors``)."""
    if not BUNDLED_DIR.is_dir():
        return {}
    found = {
        p.name: p
        for p in sorted(BUNDLED_DIR.iterdir())
        if (p / "config.json").is_file() and (p / "model.safetensors").is_file()
    }
    # the default first
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != DEFAULT_MODEL, kv[0])))


def _registry_file() -> Path:
    return cellmae_home() / "models.json"


def registered_models() -> list[Path]:
    """User model folders remembered by :func:`register_model` that still exist."""
    try:
        paths = json.loads(_registry_file().read_text())
    except (OSError, ValueError):
        return []
    return [Path(p) for p in paths if (Path(p) / "config.json").is_file()]


def register_model(folder: str | os.PathLike) -> None:
    """Remember a model folder (e.g. a fine-tuned model) so every picker offers it."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a model folder.")
    paths = [str(p) for p in registered_models() if p.resolve() != folder]
    write_json_atomic(_registry_file(), [str(folder), *paths][:50])


def hub_snapshot(repo_id: str) -> Path | None:
    """The newest downloaded snapshot folder of ``repo_id`` in the HF cache, if any."""
    snapshots = hf_hub_cache() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def cached_hub_models() -> dict[str, Path]:
    """Hub repositories with a downloaded snapshot that looks like a model folder."""
    root = hf_hub_cache()
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for d in sorted(root.glob("models--*")):
        repo_id = d.name[len("models--") :].replace("--", "/", 1)
        snap = hub_snapshot(repo_id)
        if snap is not None:
            out[repo_id] = snap
    return out


def list_models() -> list[ModelEntry]:
    """All models to offer, bundled first (the default at the top)."""
    entries = [ModelEntry(name, name, "bundled") for name in bundled_models()]
    entries += [ModelEntry(p.name, str(p), "local") for p in registered_models()]
    cached = cached_hub_models()
    entries += [
        ModelEntry(repo, repo, "hub-cached", KNOWN_HUB_MODELS.get(repo, "")) for repo in cached
    ]
    entries += [
        ModelEntry(repo, repo, "hub", note)
        for repo, note in KNOWN_HUB_MODELS.items()
        if repo not in cached
    ]
    return entries


def attribution_for(source: str) -> str:
    """The attribution/licence line to show for a model source ('' when none is needed)."""
    if OPENPHENOM_REPO.lower() in source.lower() or "openphenom" in source.lower():
        return OPENPHENOM_ATTRIBUTION
    return KNOWN_HUB_MODELS.get(source, "")
