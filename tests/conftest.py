"""Shared fixtures: isolated user folders, the real images beside the project, tiny helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(autouse=True, scope="session")
def _isolated_user_state(tmp_path_factory: pytest.TempPathFactory):
    """Keep tests away from the user's model registry and Hugging Face cache, and offline."""
    home = tmp_path_factory.mktemp("cellmae_home")
    saved = {k: os.environ.get(k) for k in ("CELLMAE_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    os.environ["CELLMAE_HOME"] = str(home / "cellmae")
    os.environ["HF_HUB_CACHE"] = str(home / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` (real plate images, used in place, never copied)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real images not found at {REAL_DATA} (the shared/ folder beside the project)")
    return REAL_DATA
