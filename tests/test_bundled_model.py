"""The bundled default model ``cellmae-tiny``: shipped in the package, loads offline, works on
real images (held-out fields for the reconstruction check; see scripts/train_default_model.py)."""

from __future__ import annotations

import fnmatch
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from napari_cellmae import registry
from napari_cellmae.store import file_sha256

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FOLDER = registry.BUNDLED_DIR / registry.DEFAULT_MODEL
MAX_MB = 25


@pytest.fixture(scope="module")
def model():
    """The bundled model, loaded with no argument while any network access raises."""
    from napari_cellmae import load_model

    def refuse(*args, **kwargs):
        raise AssertionError("the bundled model must load without the network")

    saved = socket.socket.connect
    socket.socket.connect = refuse
    try:
        loaded = load_model(device="cpu")
    finally:
        socket.socket.connect = saved
    return loaded


def _hidden_mse(rec, crops) -> tuple[float, float]:
    """(model, mean fill) MSE over the hidden patches, standardised units; mean fill = each
    hidden patch ← the mean of the visible pixels of its crop and channel."""
    import torch

    from napari_cellmae.model import standardize

    x = standardize(torch.from_numpy(np.ascontiguousarray(crops)))[0].numpy()
    p = x.shape[-1] // rec.mask.shape[-1]
    hidden = rec.mask.repeat(p, -2).repeat(p, -1)
    fill = []
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            h, img = hidden[i, c], x[i, c]
            fill.append(((img[h] - img[~h].mean()) ** 2).sum())
    return float(rec.error[rec.mask].mean()), float(np.sum(fill) / hidden.sum())


def test_bundled_model_is_shipped_complete_and_small():
    assert FOLDER.is_dir(), f"{FOLDER} is missing: run scripts/train_default_model.py"
    weights = FOLDER / "model.safetensors"
    assert weights.stat().st_size <= MAX_MB * 1e6
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["format"] == "napari-cellmae"
    assert config["weights_sha256"] == file_sha256(weights)
    assert config["architecture"]["decoder_channels"] is None  # any channel count
    card = (FOLDER / "README.md").read_text()
    for needed in ("CC0", "BBBC016", "BSD-3", "Intended use", "Limits", "held out", "Compute"):
        assert needed.lower() in card.lower(), needed
    evaluation = card.split("<!-- evaluation:start -->")[1].split("<!-- evaluation:end -->")[0]
    assert "mean fill" in evaluation and "Not measured" not in evaluation
    # offered first everywhere, and shipped by the wheel's package-data globs
    assert next(iter(registry.bundled_models())) == registry.DEFAULT_MODEL
    assert registry.list_models()[0].source == registry.DEFAULT_MODEL
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["*"]
    for name in ("config.json", "model.safetensors", "README.md"):
        assert any(fnmatch.fnmatch(name, g) for g in globs), name


def test_bundled_model_loads_offline_with_its_checksum(model):
    config = json.loads((FOLDER / "config.json").read_text())
    assert model.name == registry.DEFAULT_MODEL
    assert model.source == registry.DEFAULT_MODEL
    assert model.checksum == config["weights_sha256"]
    assert model.decoder_channels is None and model.patch_size == 16


def test_bundled_model_embeds_a_real_crop(model, real_data):
    from napari_cellmae.plates import read_field, scan_plate

    index = scan_plate(real_data / "ExampleHuman")
    field = read_field(index, well="D03", site=int(index["Metadata_Site"].iloc[0]))  # (3, 512, 512)
    crops = np.stack([field[:, :256, :256], field[:, 256:, 256:]])
    per_channel = model.default_pooling == "channelwise"  # its config.json chooses
    emb = model.embed(crops)
    assert emb.shape == (2, model.embed_dim * (3 if per_channel else 1))
    assert np.isfinite(emb).all()
    assert not np.allclose(emb[0], emb[1])  # content, not a constant
    one = model.embed(crops[:, :1])  # the DNA channel alone: any channel count works
    assert one.shape == (2, model.embed_dim) and np.isfinite(one).all()


def test_bundled_model_reconstructs_a_held_out_field_better_than_mean_fill(model, real_data):
    """Transfluor well O21 was held out of training and validation."""
    from napari_cellmae.plates import read_field, scan_plate

    index = scan_plate(real_data / "transfluor-plate")
    field = read_field(index, well="O21", site=1)  # (1, 512, 512) uint8
    crops, _ = model.field_crops(field)
    rec = model.reconstruct(crops, mask_ratio=0.75, seed=0)
    assert rec.mask.mean() == pytest.approx(0.75, abs=0.01)
    model_mse, fill_mse = _hidden_mse(rec, crops)
    assert model_mse < 0.7 * fill_mse, (model_mse, fill_mse)  # the quality target of the model


def test_the_shipped_qc_head_was_trained_on_the_bundled_model(model):
    """The default QC head reads the bundled encoder's embeddings: retrain it when the model
    changes (scripts/train_qc_head.py)."""
    from napari_cellmae.qc import QCHead

    head = QCHead.load()
    assert head.encoder["checksum"] == model.checksum, "run scripts/train_qc_head.py"
    assert head.matches(model)
    # the block it reads is written down: changing the model's default block cannot change it
    assert head.spec.block is not None and 1 <= head.spec.block <= model.depth
