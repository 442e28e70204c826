"""The nn.Module: OpenPhenom layout, block formulas, masking, decoders, loss (small models)."""

from __future__ import annotations

import math

import pytest
import torch

import _openphenom_ref as ref
from _openphenom_ref import SMALL_OPENPHENOM
from napari_cellmae.hub import map_openphenom_keys
from napari_cellmae.model import (
    PRESETS,
    CellMAE,
    CellMAEConfig,
    ParallelScalingBlock,
    create_model,
    sincos_pos_embed,
    standardize,
)


def small_openphenom_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = ref.checkpoint_shapes(
        dim=32, depth=2, head_dim=16, mlp=128, dec_dim=32, dec_depth=2, dec_mlp=128
    )
    return ref.random_checkpoint(shapes, seed)


def test_openphenom_preset_has_every_checkpoint_tensor_with_its_shape():
    with torch.device("meta"):
        module = create_model("cellmae_vit_small_patch16_256")
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    expected = ref.checkpoint_shapes()  # written from OPENPHENOM.md
    assert len(expected) == 765
    mapped = {k: tuple(v) for k, v in map_openphenom_keys(expected).items()}
    assert ours == mapped
    encoder_keys = [k for k in expected if k.startswith(ref.ENC)]
    assert len(encoder_keys) == 162
    assert sum(math.prod(s) for s in expected.values()) == 178_045_568


def test_presets_build_and_tiny_fits_the_bundle_budget():
    assert set(PRESETS) >= {
        "cellmae_vit_small_patch16_256",
        "cellmae_vit_tiny_patch16_256",
        "cellmae_vit_test_patch16_256",
    }
    tiny = create_model("cellmae_vit_tiny_patch16_256")
    n = sum(v.numel() for v in tiny.state_dict().values())
    assert n * 2 < 25e6  # fp16 storage stays under ~25 MB
    assert tiny.config.decoder_channels is None
    with pytest.raises(ValueError, match="Unknown preset"):
        create_model("vit_huge")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="decoder_channels=None"):
        CellMAEConfig(decoder="channel_agnostic", decoder_channels=6)
    with pytest.raises(ValueError, match="mask_ratio"):
        CellMAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="Unknown CellMAEConfig fields"):
        CellMAEConfig.from_dict({"embed_dim": 32, "warp_drive": True})
    cfg = PRESETS["cellmae_vit_tiny_patch16_256"]
    assert CellMAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("legacy", [True, False])
def test_parallel_scaling_block_equals_hand_written_formula(legacy):
    torch.manual_seed(0)
    dim, heads, hidden = 32, 2, 128
    blk = ParallelScalingBlock(dim, heads, 4.0, True, 0.5, legacy, 1e-6)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 7, dim)
    w = blk.in_proj.weight
    y = ref.layer_norm(x, blk.in_norm.weight, blk.in_norm.bias, 1e-6) @ w.T
    if legacy:  # mlp_bias lands on MLP units hidden-(hidden-3D).. and on q, k, v
        bias = torch.cat([torch.zeros(3 * dim), blk.mlp_bias])
    else:
        bias = torch.cat([blk.mlp_bias, torch.zeros(3 * dim)])
    y = y + bias
    m, q, k, v = y[..., :hidden], y[..., hidden:-64], y[..., -64:-32], y[..., -32:]
    q = ref.layer_norm(ref.heads(q, heads), blk.q_norm.weight, blk.q_norm.bias, 1e-6)
    k = ref.layer_norm(ref.heads(k, heads), blk.k_norm.weight, blk.k_norm.bias, 1e-6)
    a = ref.merge(ref.attention(q, k, ref.heads(v, heads)))
    out = a @ blk.attn_out_proj.weight.T + blk.attn_out_proj.bias
    out = out + ref.gelu(m) @ blk.mlp_out_proj.weight.T + blk.mlp_out_proj.bias
    expected = x + blk.ls.gamma * out
    torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)


def test_legacy_bias_placement_changes_outputs():
    torch.manual_seed(0)
    a = ParallelScalingBlock(32, 2, 4.0, True, 1.0, True, 1e-6)
    b = ParallelScalingBlock(32, 2, 4.0, True, 1.0, False, 1e-6)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.mlp_bias.normal_()
        b.mlp_bias.copy_(a.mlp_bias)
    x = torch.randn(1, 5, 32)
    assert not torch.allclose(a(x), b(x), atol=1e-3)


def test_sincos_tables_follow_the_formula():
    torch.testing.assert_close(sincos_pos_embed(384, 16, 11), ref.sincos_table(384, 16, 11))
    torch.testing.assert_close(sincos_pos_embed(512, 16, 6), ref.sincos_table(512, 16, 6))
    module = create_model("cellmae_vit_test_patch16_256")
    assert module.pos_embed.shape == (1, 1 + 11 * 256, 32)
    assert torch.equal(module.pos_embed[0, 0], torch.zeros(32))
    assert torch.equal(module.pos_embed[0, 1:257], module.pos_embed[0, 257:513])


def test_patchify_order_and_roundtrip():
    module = create_model("cellmae_vit_test_patch16_256")
    imgs = torch.randn(2, 3, 256, 256)
    tokens = module.patchify(imgs)
    assert tokens.shape == (2, 3 * 256, 256)
    # token of channel 2, patch row 1, col 3 = that 16×16 block, pixels row-major
    torch.testing.assert_close(tokens[1, 2 * 256 + 1 * 16 + 3], imgs[1, 2, 16:32, 48:64].flatten())
    torch.testing.assert_close(module.unpatchify(tokens, 3), imgs)
    torch.testing.assert_close(ref.unpatchify(tokens, 3), imgs)


def test_standardize_instance_norm():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    img[1, 2] = 7  # constant channel -> zeros
    x, mean, std = standardize(img)
    torch.testing.assert_close(x, ref.standardize_uint8(img), atol=1e-5, rtol=1e-5)
    assert torch.equal(x[1, 2], torch.zeros(32, 32))
    torch.testing.assert_close(x * std + mean, img.float(), atol=1e-3, rtol=1e-5)
    # any linear rescale gives the same tokens up to eps
    x16, _, _ = standardize(img.float() * 257.0 + 100.0)
    torch.testing.assert_close(x16[0], x[0], atol=2e-3, rtol=1e-3)


def test_standardize_with_a_plate_reference():
    img = torch.rand(2, 3, 16, 16) * 1000
    reference = torch.tensor([[[100.0, 50.0], [0.0, 2.0], [10.0, 0.0]]])  # (1, C, 2)
    x, mean, std = standardize(img, 1e-4, reference)
    torch.testing.assert_close(x[:, 0], (img[:, 0] - 100) / 50)
    torch.testing.assert_close(x[:, 1], img[:, 1] / 2)
    torch.testing.assert_close(x[:, 2], (img[:, 2] - 10) / 1e-2)  # std kept >= sqrt(eps)
    torch.testing.assert_close(x * std + mean, img, rtol=1e-5, atol=1e-3)
    # a brighter image stays brighter (the instance norm would make them equal)
    bright, _, _ = standardize(img * 2, 1e-4, reference)
    assert (bright[:, 0].mean() - x[:, 0].mean()) > 1
    # uint8 input: the reference is in the input's units
    u8 = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    x8, _, _ = standardize(u8, reference=torch.tensor([[[100.0, 50.0]]]))
    torch.testing.assert_close(x8, torch.full((1, 1, 4, 4), 2.0))
    with pytest.raises(ValueError, match=r"reference must be \(N or 1, C=3, 2\)"):
        standardize(img, reference=torch.zeros(1, 2, 2))


def test_random_masking_semantics():
    module = create_model("cellmae_vit_test_patch16_256")
    x = torch.randn(3, 2 * 256, 8)
    kept, mask, ids_restore = module.random_masking(x, 0.75)
    assert kept.shape == (3, int(512 * 0.25), 8)
    assert mask.shape == (3, 512) and torch.all(mask.sum(1) == 512 - 128)
    # visible tokens are exactly the kept ones, unshuffle restores the order
    for i in range(3):
        vis = torch.nonzero(mask[i] == 0).flatten()
        assert torch.equal(torch.sort(kept[i], dim=0).values, torch.sort(x[i, vis], dim=0).values)
    full = torch.cat([kept, torch.zeros(3, 384, 8)], 1)
    unshuffled = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, 8))
    torch.testing.assert_close(unshuffled * (1 - mask[..., None]), x * (1 - mask[..., None]))
    # caller noise -> deterministic; caller mask -> exactly that mask
    noise = torch.rand(3, 512)
    a = module.random_masking(x, 0.5, noise=noise)[1]
    assert torch.equal(a, module.random_masking(x, 0.5, noise=noise)[1])
    hide = torch.zeros(3, 512, dtype=torch.bool)
    hide[:, 256:] = True  # hide the whole second channel
    _, m, _ = module.random_masking(x, 0.0, mask=hide)
    assert torch.equal(m.bool(), hide)
    hide[0, 0] = True
    with pytest.raises(ValueError, match="same number of tokens"):
        module.random_masking(x, 0.0, mask=hide)


def test_mean_embedding_invariant_to_channel_order():
    torch.manual_seed(0)
    module = create_model("cellmae_vit_test_patch16_256").eval()
    x = torch.randn(2, 4, 256, 256)
    perm = [2, 0, 3, 1]
    with torch.no_grad():
        a = module.forward_features(x)[:, 1:].mean(1)
        b = module.forward_features(x[:, perm])[:, 1:].mean(1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_channel_agnostic_decoder_is_channel_equivariant_and_predicts_hidden_channel():
    torch.manual_seed(0)
    module = create_model("cellmae_vit_test_patch16_256").eval()
    with torch.no_grad():
        module.decoder.missing_channel_token.normal_()
    x = torch.randn(1, 3, 256, 256)
    hide = torch.rand(1, 3 * 256) < 0.5
    hide[:, 256:512] = True  # channel 1 fully hidden
    perm = [2, 1, 0]

    def predict(imgs, mask):
        with torch.no_grad():
            latent, _, ids = module.forward_encoder(imgs, 0.0, mask=mask)
            return module.forward_decoder(latent, ids)

    pred = predict(x, hide)
    hide_p = hide.reshape(1, 3, 256)[:, perm].reshape(1, -1)
    pred_p = predict(x[:, perm], hide_p)
    torch.testing.assert_close(
        pred_p.reshape(1, 3, 256, -1), pred.reshape(1, 3, 256, -1)[:, perm], atol=1e-5, rtol=1e-5
    )
    # the hidden channel's pixels do not matter; the other channels do
    x2 = x.clone()
    x2[:, 1] = torch.randn(256, 256)
    torch.testing.assert_close(predict(x2, hide), pred)
    x3 = x.clone()
    x3[:, 0] = torch.randn(256, 256)
    assert not torch.allclose(predict(x3, hide)[:, 256:512], pred[:, 256:512], atol=1e-4)
    # any channel count 1..11
    for c in (1, 11):
        _, p, m = module(torch.randn(1, c, 256, 256), 0.75)
        assert p.shape == (1, c * 256, 256) and m.shape == (1, c * 256)


def test_small_openphenom_layout_matches_reference_formulas():
    """Encoder and cross-attention decoder of the OpenPhenom layout vs OPENPHENOM.md."""
    sd = small_openphenom_checkpoint()
    module = CellMAE(SMALL_OPENPHENOM).eval()
    module.load_state_dict(map_openphenom_keys(sd), strict=True)
    img = torch.randint(0, 256, (1, 6, 256, 256), dtype=torch.uint8)
    x = ref.standardize_uint8(img)
    g = torch.Generator().manual_seed(1)
    keep = torch.randperm(6 * 256, generator=g)[: 6 * 64]
    hide = torch.ones(1, 6 * 256, dtype=torch.bool)
    hide[0, keep] = False
    with torch.no_grad():
        latent, _, ids = module.forward_encoder(standardize(img)[0], 0.0, mask=hide)
        pred = module.forward_decoder(latent, ids)
        feats = module.forward_features(standardize(img)[0], block=1)
    keep_sorted = torch.sort(keep).values  # our caller-mask path keeps tokens in order
    ref_latent = ref.encoder(sd, x, num_heads=2, keep=keep_sorted)
    torch.testing.assert_close(latent, ref_latent, atol=1e-4, rtol=1e-4)
    ref_pred = ref.decoder(sd, ref_latent, keep_sorted, 6, cross_heads=2, block_heads=4)
    torch.testing.assert_close(pred, ref_pred, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats, ref.encoder(sd, x, 2, n_blocks=1), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exactly 6"):
        module(torch.randn(1, 5, 256, 256), 0.75)


def test_forward_loss_on_hidden_patches_and_fourier_term():
    torch.manual_seed(0)
    module = create_model("cellmae_vit_test_patch16_256")
    imgs = torch.randint(0, 256, (2, 2, 256, 256), dtype=torch.uint8)
    loss, pred, mask = module(imgs, 0.75)
    target = module.patchify(standardize(imgs)[0])
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # trainable end to end
    assert module.blocks[0].in_proj.weight.grad is not None
    w = 0.01
    fourier = CellMAE(CellMAEConfig(**{**module.config.to_dict(), "fourier_loss_weight": w}))
    fourier.load_state_dict(module.state_dict())
    x = standardize(imgs)[0]
    f_loss = fourier.forward_loss(x, pred.detach(), mask)
    mag = torch.fft.fft2(pred.detach().reshape(2, 512, 16, 16)).abs()
    mag_t = torch.fft.fft2(target.reshape(2, 512, 16, 16)).abs()
    f_term = ((mag - mag_t).abs().mean((-2, -1)) * mask).sum() / mask.sum()
    torch.testing.assert_close(f_loss, (1 - w) * expected.detach() + w * f_term)


def test_forward_features_block_and_input_checks():
    module = create_model("cellmae_vit_test_patch16_256").eval()
    x = torch.randn(1, 2, 256, 256)
    with torch.no_grad():
        assert module.forward_features(x, block=1).shape == (1, 513, 32)
        assert not torch.allclose(module.forward_features(x, 1), module.forward_features(x))
    with pytest.raises(ValueError, match="block must be 1..2"):
        module.forward_features(x, block=3)
    with pytest.raises(ValueError, match="256×256 crops"):
        module.forward_features(torch.randn(1, 2, 128, 128))
    with pytest.raises(ValueError, match="1 to 11 channels"):
        module.forward_features(torch.randn(1, 12, 256, 256))
