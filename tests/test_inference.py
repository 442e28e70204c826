"""CellMAEModel: numpy-in/numpy-out embedding, tiling, reconstruction, precision, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from _openphenom_ref import SMALL_OPENPHENOM
from napari_cellmae import tiling
from napari_cellmae.inference import CellMAEModel, Reconstruction
from napari_cellmae.model import CellMAE, create_model, standardize


@pytest.fixture(scope="module")
def model() -> CellMAEModel:
    torch.manual_seed(0)
    return CellMAEModel(create_model("cellmae_vit_test_patch16_256"), "cpu", "fp32", name="test")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 4, 256, 256), dtype=np.uint8)


def test_embed_shapes_poolings_and_blocks(model, images):
    emb = model.embed(images)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    assert model.embed(images, pooling="channelwise").shape == (3, 4 * 32)
    assert model.embed(images, pooling="cls").shape == (3, 32)
    cw = model.embed(images, pooling="channelwise").reshape(3, 4, 32)
    np.testing.assert_allclose(cw.mean(1), emb, atol=1e-5)  # channel-major means
    b1 = model.embed(images, block=1)
    assert not np.allclose(b1, emb)
    tokens = model.encode(torch.from_numpy(images), block=1)
    np.testing.assert_allclose(tokens[:, 1:].mean(1).numpy(), b1, atol=1e-5)
    model.default_block = 1
    try:
        np.testing.assert_array_equal(model.embed(images), b1)
    finally:
        model.default_block = None


def test_embed_is_deterministic_and_batch_independent(model, images):
    a = model.embed(images, batch_size=3)
    np.testing.assert_array_equal(a, model.embed(images, batch_size=3))
    np.testing.assert_allclose(a, model.embed(images, batch_size=1), atol=1e-5)


def test_mean_embedding_does_not_depend_on_channel_order(model, images):
    np.testing.assert_allclose(
        model.embed(images), model.embed(images[:, [3, 1, 0, 2]]), atol=1e-5, rtol=1e-5
    )


def test_any_dtype_gives_the_same_embedding(model, images):
    as_float = model.embed(images.astype(np.float64) * 16.0 + 3.0)
    np.testing.assert_allclose(as_float, model.embed(images), atol=1e-3, rtol=1e-3)
    assert np.isfinite(model.embed(np.zeros((1, 2, 256, 256), np.uint16))).all()


def test_bad_input_messages(model, images):
    with pytest.raises(ValueError, match=r"images\[None\]"):
        model.embed(images[0])
    with pytest.raises(ValueError, match="embed_field"):
        model.embed(np.zeros((1, 2, 300, 300)))
    with pytest.raises(ValueError, match="1 to 11 channels"):
        model.embed(np.zeros((1, 12, 256, 256)))
    bad = images.astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite.*nan_to_num"):
        model.embed(bad)
    with pytest.raises(ValueError, match="Unknown pooling"):
        model.embed(images, pooling="max")
    with pytest.raises(ValueError, match="block must be"):
        model.embed(images, block=7)
    with pytest.raises(ValueError, match="numeric"):
        model.embed(np.zeros((1, 1, 256, 256), bool))
    with pytest.raises(ValueError, match=r"field\[None\]"):
        model.embed_field(np.zeros((300, 300)))
    with pytest.raises(ValueError, match="smaller than one 16-px patch"):
        model.embed_field(np.zeros((1, 10, 300)))
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        model.set_precision("fp16")


def test_embed_field_tiles_a_1000_field(model):
    field = np.random.default_rng(1).random((3, 1000, 1000), dtype=np.float32)
    vec, crops, pos = model.embed_field(field, return_crops=True)
    assert vec.shape == (32,) and crops.shape == (16, 32) and pos.shape == (16, 2)
    expected = model.embed(tiling.extract_crops(field, tiling.crop_grid(1000, 1000)))
    np.testing.assert_allclose(crops, expected, atol=1e-6)
    np.testing.assert_allclose(vec, expected.mean(0), atol=1e-6)
    # a small field is padded (reflection) to one crop
    small_vec, small_crops, small_pos = model.embed_field(field[:, :200, :300], return_crops=True)
    assert small_crops.shape == (2, 32) and small_pos.tolist() == [[0, 0], [0, 44]]
    assert np.isfinite(small_vec).all()


def test_plate_normalisation_keeps_brightness_that_the_crop_norm_removes(model):
    from napari_cellmae.synthetic import make_field

    field = make_field(3, 512, seed=5).astype(np.float32)
    brighter = field.copy()
    brighter[1] *= 2  # a stain twice as bright
    # crop normalisation: blind to it
    crop = model.embed_field(field, normalization="crop")
    np.testing.assert_allclose(model.embed_field(brighter, normalization="crop"), crop, atol=1e-4)
    # plate normalisation with the plate's reference: sees it
    ref = model.plate_reference([field, make_field(3, 512, seed=6)])
    assert ref.shape == (3, 2) and (ref[:, 1] > 0).all()
    a, b = model.embed_field(field, reference=ref), model.embed_field(brighter, reference=ref)
    assert np.linalg.norm(a - b) > 0.1 * np.linalg.norm(a - crop)
    # the same reference is what embed() applies to every crop
    crops, _ = model.field_crops(field)
    np.testing.assert_allclose(model.embed(crops, reference=ref).mean(0), a, atol=1e-5)
    # the reference is the median crop mean and std per channel
    stats = model.crop_statistics(crops)
    np.testing.assert_allclose(model.plate_reference([field]), np.median(stats, 0))
    assert np.allclose(stats[0, :, 0], crops[0].reshape(3, -1).mean(1), rtol=1e-5)
    # "plate" without a reference: the field's own (a plate of one field)
    np.testing.assert_allclose(
        model.embed_field(field, normalization="plate"),
        model.embed_field(field, reference=model.plate_reference([field])),
        atol=1e-6,
    )


def test_plate_normalisation_errors_name_the_fix(model):
    field = np.random.default_rng(2).random((3, 256, 256), dtype=np.float32)
    with pytest.raises(ValueError, match="Unknown normalization 'instance'"):
        model.embed_field(field, normalization="instance")
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        model.embed_field(field, reference=np.ones((2, 2)))
    with pytest.raises(ValueError, match="positive standard deviations"):
        model.embed_field(field, reference=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="different channel counts"):
        model.plate_reference([field, field[:2]])
    with pytest.raises(ValueError, match="finite pixels"):
        model.plate_reference([np.full((3, 256, 256), np.nan, np.float32)])
    with pytest.raises(ValueError, match="default_normalization must be one of"):
        CellMAEModel(model.module, "cpu", default_normalization="instance")


def test_embed_field_on_a_real_image(model, real_data):
    import tifffile

    files = sorted((real_data / "ExampleHuman").glob("*.tif"))
    field = np.stack([tifffile.imread(f) for f in files])  # (3, 512, 512) uint8
    vec, crops, pos = model.embed_field(field, return_crops=True)
    assert pos.tolist() == [[0, 0], [0, 256], [256, 0], [256, 256]]
    assert vec.shape == (32,) and np.isfinite(crops).all()
    assert np.linalg.norm(crops[0] - crops[3]) > 0  # different content, different vectors


def test_reconstruct_shapes_mask_and_units(model, images):
    rec = model.reconstruct(images, mask_ratio=0.75, seed=0)
    assert isinstance(rec, Reconstruction)
    assert rec.masked.shape == rec.reconstruction.shape == rec.standardized.shape == images.shape
    assert rec.mask.shape == rec.error.shape == (3, 4, 16, 16) and rec.mask.dtype == bool
    assert rec.mask.reshape(3, -1).sum(1).tolist() == [4 * 256 - int(4 * 256 * 0.25)] * 3
    hidden_px = tiling.upsample_patches(rec.mask, 16)
    assert np.all(rec.masked[hidden_px] == 0)
    np.testing.assert_array_equal(rec.masked[~hidden_px], images[~hidden_px])
    x, mean, std = standardize(torch.from_numpy(images))
    np.testing.assert_allclose(
        rec.reconstruction, rec.standardized * std.numpy() + mean.numpy(), rtol=1e-4, atol=1e-3
    )
    err = ((rec.standardized - x.numpy()) ** 2).reshape(3, 4, 16, 16, 16, 16)
    np.testing.assert_allclose(rec.error, err.mean((3, 5)), rtol=1e-4, atol=1e-6)
    pasted = rec.pasted()
    np.testing.assert_array_equal(pasted[~hidden_px], images[~hidden_px])
    np.testing.assert_array_equal(pasted[hidden_px], rec.reconstruction[hidden_px])


def test_reconstruct_seed_is_reproducible_and_batch_independent(model, images):
    a = model.reconstruct(images, seed=3, batch_size=3)
    b = model.reconstruct(images, seed=3, batch_size=1)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.standardized, b.standardized, atol=1e-5)
    assert not np.array_equal(a.mask, model.reconstruct(images, seed=4).mask)


def test_reconstruct_with_a_caller_mask_hiding_a_whole_channel(model, images):
    mask = np.zeros((3, 4, 16, 16), bool)
    mask[:, 2] = True  # predict channel 2 (a "missing stain") from the others
    mask[0, 0, :8] = True  # image 0 hides more: handled in its own batch
    rec = model.reconstruct(images, mask=mask)
    np.testing.assert_array_equal(rec.mask, mask)
    assert np.all(rec.masked[:, 2] == 0)
    # the hidden channel's own pixels play no part in its prediction
    other = images.copy()
    other[:, 2] = 255 - other[:, 2]
    rec2 = model.reconstruct(other, mask=mask)
    np.testing.assert_allclose(rec2.standardized, rec.standardized, atol=1e-5)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, C, 16, 16\)"):
        model.reconstruct(images, mask=mask[:, :, :8])


def test_openphenom_decoder_needs_six_channels():
    wrapped = CellMAEModel(CellMAE(SMALL_OPENPHENOM), "cpu", "fp32")
    with pytest.raises(ValueError, match="exactly 6 channels"):
        wrapped.reconstruct(np.zeros((1, 5, 256, 256), np.uint8))
    assert wrapped.embed(np.zeros((1, 5, 256, 256), np.uint8)).shape == (1, 32)
    assert wrapped.reconstruct(np.zeros((1, 6, 256, 256), np.uint8), seed=0).mask.shape == (
        1,
        6,
        16,
        16,
    )


def test_encoder_only_model_cannot_reconstruct():
    wrapped = CellMAEModel(create_model("cellmae_vit_test_patch16_256", encoder_only=True), "cpu")
    with pytest.raises(ValueError, match="encoder_only"):
        wrapped.reconstruct(np.zeros((1, 2, 256, 256), np.uint8))


def test_bf16_agrees_with_fp32():
    """bf16 autocast vs fp32 on the bundled architecture (random weights): embeddings within 0.5%
    relative L2 error, standardised reconstructions within 2% (bf16 keeps 8 mantissa bits;
    measured here: 0.03% and 0.6%)."""
    torch.manual_seed(0)
    module = create_model("cellmae_vit_tiny_patch16_256")
    fp32 = CellMAEModel(module, "cpu", "fp32")
    bf16 = CellMAEModel(module, "cpu", "bf16")
    imgs = np.random.default_rng(2).integers(0, 256, (2, 3, 256, 256), dtype=np.uint8)
    a, b = fp32.embed(imgs), bf16.embed(imgs)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.005
    ra, rb = fp32.reconstruct(imgs, seed=0), bf16.reconstruct(imgs, seed=0)
    np.testing.assert_array_equal(ra.mask, rb.mask)
    rel = np.linalg.norm(ra.standardized - rb.standardized) / np.linalg.norm(ra.standardized)
    assert rel < 0.02
    assert bf16.precision == "bf16" and fp32.precision == "fp32"


def test_out_of_memory_halves_the_batch(model, images, monkeypatch, caplog):
    expected = model.embed(images, batch_size=4)
    real = model.module.forward_features
    sizes = []

    def flaky(x, block=None):
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, block)

    monkeypatch.setattr(model.module, "forward_features", flaky)
    with caplog.at_level(logging.WARNING, logger="napari_cellmae.inference"):
        got = model.embed(images, batch_size=4)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sizes == [3, 2, 1, 1, 1] and "batch size 1" in caplog.text
