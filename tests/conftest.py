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
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random-weight ``cellmae_vit_test_patch16_256`` model folder (seed 0), shared by the
    tests that go through ``load_model`` / ``--model`` (embed, profile, the Embed tab)."""
    import torch

    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model

    folder = tmp_path_factory.mktemp("models") / "cellmae-test"
    torch.manual_seed(0)
    save_model(create_model("cellmae_vit_test_patch16_256"), folder)
    return folder


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` (real plate images, used in place, never copied)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real images not found at {REAL_DATA} (the shared/ folder beside the project)")
    return REAL_DATA


@pytest.fixture(scope="session")
def small_screen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic screen on disk: one ImageXpress plate (``SCREEN-1``, 8 wells, 1 site,
    3 channels, 256×256) with controls and 3 perturbations; returns (plate folder, platemap.csv).
    Used by training, fine-tune and probe tests."""
    from napari_cellmae.synthetic import make_screen

    root = tmp_path_factory.mktemp("small_screen")
    make_screen(root, n_plates=1, perturbations=3, replicates=2, controls=2, n_channels=3)
    return root / "SCREEN-1", root / "platemap.csv"


@pytest.fixture(scope="session")
def qc_head_file(test_model_dir: Path, real_data: Path, tmp_path_factory) -> Path:
    """A QC head for the ``test_model_dir`` encoder, trained (seeded) on synthetic artefacts of
    24 real 256×256 transfluor crops (wells O01–O12); shared by the QC head/run/tab tests."""
    from napari_cellmae import load_model
    from napari_cellmae.plates import read_image
    from napari_cellmae.progress import run
    from napari_cellmae.qc.training import train_head_from_images

    files = sorted((real_data / "transfluor-plate").glob("*.TIF"))
    crops = [read_image(f)[0][:256, :256] for f in files[:36:3]]
    crops += [read_image(f)[0][256:, 256:] for f in files[1:36:3]]
    import torch

    model = load_model(test_model_dir, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is 2-5× faster on a busy 2-core machine
    try:
        head, _, _ = run(train_head_from_images(crops, model, seed=0, batch_size=64))
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("qc") / "test_head.npz"
    head.save(path)
    return path
