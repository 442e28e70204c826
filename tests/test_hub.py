"""Model folders: OpenPhenom snapshots as Recursion writes them, our format, Hugging Face ids."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _openphenom_ref as ref
from napari_cellmae import hub, registry
from napari_cellmae.hub import load_model, read_state_dict, save_model
from napari_cellmae.inference import CellMAEModel
from napari_cellmae.model import create_model

# config.json as the reference's transformers-style save_pretrained writes it (hydra _target_
# sub-configs; only mask_ratio, fourier_loss_weight, return_channelwise_embeddings are read)
OPENPHENOM_CONFIG = {
    "architectures": ["MAEModel"],
    "model_type": "MAE",
    "mask_ratio": 0.0,
    "fourier_loss_weight": 0.0,
    "return_channelwise_embeddings": False,
    "encoder": {
        "_target_": "mae_modules.MAEEncoder",
        "channel_agnostic": True,
        "max_in_chans": 11,
        "vit_backbone": {"_target_": "vit.sincos_positional_encoding_vit"},
    },
    "decoder": {"_target_": "mae_modules.CAMAEDecoder", "num_modalities": 6},
    "input_norm": {"_target_": "torch.nn.Sequential"},
    "loss": {"_target_": "torch.nn.MSELoss", "reduction": "none"},
}


@pytest.fixture(scope="module")
def openphenom(tmp_path_factory):
    """A full-size OpenPhenom-S/16 folder with random weights: (folder, checkpoint state dict)."""
    folder = tmp_path_factory.mktemp("OpenPhenom")
    sd = ref.random_checkpoint(ref.checkpoint_shapes(), seed=0)
    (folder / "config.json").write_text(json.dumps(OPENPHENOM_CONFIG, indent=2))
    torch.save({"state_dict": sd}, str(folder / "model.safetensors"))  # a zip pickle, as theirs
    assert (folder / "model.safetensors").read_bytes()[:4] == b"PK\x03\x04"
    return folder, sd


@pytest.fixture(scope="module")
def openphenom_model(openphenom) -> CellMAEModel:
    return load_model(openphenom[0], device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def images6() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (1, 6, 256, 256), dtype=np.uint8)


def test_openphenom_folder_embeds_as_the_reference(openphenom, openphenom_model, images6):
    folder, sd = openphenom
    model = openphenom_model
    assert model.attribution == registry.OPENPHENOM_ATTRIBUTION
    assert model.checksum == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert model.channel_names[0] == "Hoechst" and model.config.mask_ratio == 0.0
    assert (model.embed_dim, model.depth, model.patch_size) == (384, 12, 16)
    imgs = images6[:, [0, 4]]  # any channel count: two channels
    x = ref.standardize_uint8(torch.from_numpy(imgs))
    tokens = ref.encoder(sd, x, num_heads=6)  # final block, no final norm
    expected = tokens[:, 1:].mean(1).numpy()  # official: drop CLS, mean over all C·256
    np.testing.assert_allclose(model.embed(imgs), expected, rtol=1e-4, atol=1e-4)
    tokens5 = ref.encoder(sd, x, num_heads=6, n_blocks=5)[:, 1:]
    channelwise = tokens5.reshape(1, 2, 256, 384).mean(2).reshape(1, -1).numpy()
    np.testing.assert_allclose(
        model.embed(imgs, pooling="channelwise", block=5), channelwise, rtol=1e-4, atol=1e-4
    )


def test_openphenom_folder_reconstructs_as_the_reference(openphenom, openphenom_model, images6):
    _, sd = openphenom
    model = openphenom_model
    g = torch.Generator().manual_seed(0)
    keep = torch.sort(torch.randperm(6 * 256, generator=g)[:384]).values
    mask = np.ones(6 * 256, bool)
    mask[keep.numpy()] = False
    mask[256:512] = True  # and channel 1 entirely hidden
    keep = torch.from_numpy(np.flatnonzero(~mask))
    rec = model.reconstruct(images6, mask=mask.reshape(1, 6, 16, 16))

    x = ref.standardize_uint8(torch.from_numpy(images6))
    latent = ref.encoder(sd, x, num_heads=6, keep=keep)
    pred = ref.decoder(sd, latent, keep, channels=6, cross_heads=8, block_heads=16)
    pred_img = ref.unpatchify(pred, 6)
    np.testing.assert_allclose(rec.standardized, pred_img.numpy(), rtol=1e-3, atol=1e-3)
    xd = torch.from_numpy(images6).double()
    mean = xd.mean((-2, -1), keepdim=True)
    std = torch.sqrt(((xd / 255 - mean / 255) ** 2).mean((-2, -1), keepdim=True) + 1e-5) * 255
    expected = (pred_img.double() * std + mean).numpy()
    np.testing.assert_allclose(rec.reconstruction, expected, rtol=1e-3, atol=0.05)
    err = ((pred_img - x) ** 2).reshape(1, 6, 16, 16, 16, 16).mean((3, 5)).numpy()
    np.testing.assert_allclose(rec.error, err, rtol=1e-3, atol=1e-4)
    assert rec.mask[0, 1].all() and rec.mask.sum() == 6 * 256 - len(keep)
    with pytest.raises(ValueError, match="exactly 6 channels"):
        model.reconstruct(images6[:, :3])


def test_openphenom_encoder_only_and_conversion_to_our_format(
    openphenom, openphenom_model, images6, tmp_path, caplog
):
    folder, sd = openphenom
    one = images6[:, :1]  # one channel keeps the full-size encoder cheap here
    with caplog.at_level(logging.WARNING, logger="napari_cellmae.hub"):
        model = load_model(str(folder), device="cpu", encoder_only=True, precision="fp32")
    assert "non-commercial" in caplog.text  # the attribution is shown on load
    assert model.encoder_only and not hasattr(model.module, "decoder")
    np.testing.assert_array_equal(model.embed(one), openphenom_model.embed(one))
    with pytest.raises(ValueError, match="encoder_only"):
        model.reconstruct(images6)
    out = save_model(model, tmp_path / "openphenom-ours", metadata={"best_block": 11})
    card = (out / "README.md").read_text()
    assert "Recursion" in card and "non-commercial" in card
    again = load_model(out, device="cpu", precision="fp32")
    assert again.attribution == registry.OPENPHENOM_ATTRIBUTION and again.default_block == 11
    assert again.encoder_only
    np.testing.assert_array_equal(again.embed(one, block=12), model.embed(one))
    # the same encoder tensors as a REAL safetensors file in an OpenPhenom folder
    real = tmp_path / "openphenom-real-safetensors"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(OPENPHENOM_CONFIG))
    enc = {k: v for k, v in sd.items() if k.startswith(ref.ENC)}
    save_file(enc, str(real / "model.safetensors"))
    st = load_model(real, device="cpu", encoder_only=True, precision="fp32")
    np.testing.assert_array_equal(st.embed(one), model.embed(one))
    with pytest.raises(ValueError, match=r"missing \(603\).*decoder"):
        load_model(real, device="cpu")  # decoder tensors absent: listed


@pytest.fixture
def tiny_model() -> CellMAEModel:
    torch.manual_seed(0)
    return CellMAEModel(create_model("cellmae_vit_test_patch16_256"), "cpu", "fp32", name="t")


@pytest.fixture
def imgs() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (2, 3, 256, 256), dtype=np.uint8)


def test_save_load_round_trip_safetensors(tiny_model, imgs, tmp_path):
    folder = save_model(
        tiny_model, tmp_path / "m", metadata={"channel_names": ["dna", "er", "rna"]}
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", hub.WEIGHTS]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "napari-cellmae" and cfg["architecture"]["embed_dim"] == 32
    loaded = load_model(folder, device="cpu", precision="fp32")
    assert loaded.channel_names == ["dna", "er", "rna"] and loaded.name == "t"
    assert loaded.checksum == cfg["weights_sha256"]
    np.testing.assert_array_equal(loaded.embed(imgs), tiny_model.embed(imgs))
    rec_a, rec_b = loaded.reconstruct(imgs, seed=1), tiny_model.reconstruct(imgs, seed=1)
    np.testing.assert_array_equal(rec_a.standardized, rec_b.standardized)
    # fp16 storage: half the size, same outputs to fp16 precision; overwriting in place works
    save_model(tiny_model, folder, dtype="float16")
    stored, _ = read_state_dict(folder / hub.WEIGHTS)
    assert stored["blocks.0.in_proj.weight"].dtype == torch.float16
    assert stored["pos_embed"].dtype == torch.float32  # fixed tables are kept exact
    half = load_model(folder, device="cpu", precision="fp32")
    np.testing.assert_allclose(half.embed(imgs), tiny_model.embed(imgs), atol=2e-2, rtol=2e-2)
    # a weights file path works as a source too
    assert load_model(folder / hub.WEIGHTS, device="cpu").name == "t"


def test_embedding_defaults_are_saved_and_loaded(tiny_model, tmp_path):
    assert (tiny_model.default_pooling, tiny_model.default_normalization) == ("mean", "crop")
    tiny_model.default_pooling, tiny_model.default_normalization = "channelwise", "plate"
    folder = save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["default_pooling"], cfg["default_normalization"]) == ("channelwise", "plate")
    assert "channelwise pooling, plate normalisation" in (folder / "README.md").read_text()
    loaded = load_model(folder, device="cpu")
    assert (loaded.default_pooling, loaded.default_normalization) == ("channelwise", "plate")
    cfg["default_normalization"] = "per-image"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="default_normalization must be one of"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("kind", ["wrapped", "bare", "legacy"])
def test_round_trip_with_torch_pickle_weights(tiny_model, imgs, tmp_path, kind):
    folder = save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = tiny_model.module.state_dict()
    obj = {"state_dict": sd} if kind == "wrapped" else sd
    torch.save(obj, str(folder / hub.WEIGHTS), _use_new_zipfile_serialization=kind != "legacy")
    loaded = load_model(folder, device="cpu", precision="fp32")
    np.testing.assert_array_equal(loaded.embed(imgs), tiny_model.embed(imgs))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, str(path))
    with pytest.raises(ValueError, match="cannot be read safely"):
        read_state_dict(path)
    assert not marker.exists()
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ValueError, match="neither a safetensors file"):
        read_state_dict(path)


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_model, tmp_path):
    folder = save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = dict(tiny_model.module.state_dict())
    del sd["blocks.1.mlp_bias"]
    sd["blocks.9.extra"] = torch.zeros(3)
    sd["cls_token"] = torch.zeros(1, 1, 64)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / hub.WEIGHTS))
    with pytest.raises(ValueError) as err:
        load_model(folder, device="cpu")
    msg = str(err.value)
    assert "missing (1): blocks.1.mlp_bias" in msg
    assert "unexpected (1): blocks.9.extra" in msg
    assert "cls_token (1, 1, 64) (expected (1, 1, 32))" in msg


def test_corrupt_or_foreign_folders_give_clear_errors(tiny_model, tmp_path):
    folder = save_model(tiny_model, tmp_path / "m")
    weights = folder / hub.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(ValueError, match="neither a napari-cellmae config"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(folder)
    save_model(tiny_model, folder)
    (folder / hub.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="No model 'no such thing'"):
        load_model("no such thing")


def test_bundled_default(tiny_model, imgs, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="bundled model 'cellmae-tiny' is missing.*folder"):
        load_model()
    save_model(tiny_model, tmp_path / "models" / registry.DEFAULT_MODEL)
    model = load_model(device="cpu", precision="fp32")
    assert model.source == "cellmae-tiny" and model.attribution == ""
    np.testing.assert_array_equal(model.embed(imgs), tiny_model.embed(imgs))
    assert load_model("cellmae-tiny").checksum == model.checksum


def _fake_snapshot(cache, repo_id: str, model: CellMAEModel):
    snap = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "0123abcd"
    save_model(model, snap)
    return snap


def test_hub_id_offline_uses_the_cache_or_says_where_to_put_the_folder(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_model("recursionpharma/OpenPhenom")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "models--recursionpharma--OpenPhenom" in msg
    _fake_snapshot(tmp_path / "hf", "someone/cellmae-small", tiny_model)
    model = load_model("someone/cellmae-small", device="cpu")
    assert model.source == "someone/cellmae-small" and model.name == "t"


def test_hub_id_online_downloads_with_huggingface_hub(tiny_model, imgs, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_snapshot_download(repo_id, cache_dir=None, allow_patterns=None, **kw):
        calls.append((repo_id, cache_dir, allow_patterns))
        return str(_fake_snapshot(tmp_path / "hf", repo_id, tiny_model))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("lab/our-model", device="cpu", precision="fp32")
    assert calls == [("lab/our-model", str(tmp_path / "hf"), calls[0][2])]
    assert "model.safetensors" in calls[0][2]
    np.testing.assert_array_equal(model.embed(imgs), tiny_model.embed(imgs))
    load_model("lab/our-model")  # now cached: no second download
    assert len(calls) == 1

    def failing(repo_id, **kw):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(FileNotFoundError, match="Could not download 'lab/other'.*connection"):
        load_model("lab/other")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'napari-cellmae\[hub\]'"):
        load_model("lab/other")
