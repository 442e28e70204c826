"""An independent, functional re-implementation of OpenPhenom-S/16 written from OPENPHENOM.md.

It reads a checkpoint-style state dict (keys with the ``encoder.vit_backbone.`` prefix) and uses
only explicit tensor formulas (conv2d per channel, hand-written LayerNorm, softmax attention, erf
GELU), so it shares no code path with ``napari_cellmae.model``. Tests compare the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from napari_cellmae.model import CellMAEConfig  # only for the toy config below

ENC = "encoder.vit_backbone."

# OpenPhenom's layout at toy width: every formula of the real one, fast enough for unit tests.
SMALL_OPENPHENOM = CellMAEConfig(
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=4,
    decoder_cross_heads=2,
)


def checkpoint_shapes(
    dim: int = 384,
    depth: int = 12,
    head_dim: int = 64,
    mlp: int = 1536,
    max_channels: int = 11,
    dec_dim: int = 512,
    dec_depth: int = 8,
    dec_mlp: int = 2048,
    channels: int = 6,
    tokens: int = 256,
    patch: int = 16,
) -> dict[str, tuple[int, ...]]:
    """Every tensor of an OpenPhenom checkpoint and its shape, as listed in OPENPHENOM.md."""
    s: dict[str, tuple[int, ...]] = {
        ENC + "cls_token": (1, 1, dim),
        ENC + "pos_embed": (1, 1 + max_channels * tokens, dim),
        ENC + "patch_embed.proj.weight": (dim, 1, patch, patch),
        ENC + "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"{ENC}blocks.{i}."
        s[b + "mlp_bias"] = (mlp,)
        s[b + "in_norm.weight"] = s[b + "in_norm.bias"] = (dim,)
        s[b + "in_proj.weight"] = (mlp + 3 * dim, dim)
        for n in ("q_norm", "k_norm"):
            s[f"{b}{n}.weight"] = s[f"{b}{n}.bias"] = (head_dim,)
        s[b + "attn_out_proj.weight"] = (dim, dim)
        s[b + "attn_out_proj.bias"] = (dim,)
        s[b + "mlp_out_proj.weight"] = (dim, mlp)
        s[b + "mlp_out_proj.bias"] = (dim,)
        s[b + "ls.gamma"] = (dim,)
    s[ENC + "fc_norm.weight"] = s[ENC + "fc_norm.bias"] = (dim,)
    s["encoder_decoder_proj.weight"] = (dec_dim, dim)
    s["encoder_decoder_proj.bias"] = (dec_dim,)
    s["decoder_pred.weight"] = (patch * patch, dec_dim)
    s["decoder_pred.bias"] = (patch * patch,)
    d = "decoder."
    s[d + "mask_token"] = s[d + "placeholder"] = (1, 1, dec_dim)
    s[d + "pos_embeddings"] = (1, 1 + channels * tokens, dec_dim)
    for m in range(channels):
        s[f"{d}modality_tokens.{m}"] = (1, 1, dec_dim)
    s[d + "cross_attention.q.weight"] = (dec_dim, dec_dim)
    s[d + "cross_attention.kv.weight"] = (2 * dec_dim, dec_dim)
    s[d + "cross_attention.proj.weight"] = (dec_dim, dec_dim)
    s[d + "cross_attention.proj.bias"] = (dec_dim,)
    s[d + "mlp.fc1.weight"], s[d + "mlp.fc1.bias"] = (dec_mlp, dec_dim), (dec_mlp,)
    s[d + "mlp.fc2.weight"], s[d + "mlp.fc2.bias"] = (dec_dim, dec_mlp), (dec_dim,)
    for n in ("context_norm", "query_norm", "out_norm"):
        s[f"{d}{n}.weight"] = s[f"{d}{n}.bias"] = (dec_dim,)
    for m in range(channels):
        for j in range(dec_depth):
            b = f"{d}decoders.{m}.{j}."
            for n in ("norm1", "norm2"):
                s[f"{b}{n}.weight"] = s[f"{b}{n}.bias"] = (dec_dim,)
            s[b + "attn.qkv.weight"] = (3 * dec_dim, dec_dim)
            s[b + "attn.qkv.bias"] = (3 * dec_dim,)
            s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = (dec_dim, dec_dim), (dec_dim,)
            s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = (dec_mlp, dec_dim), (dec_mlp,)
            s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = (dec_dim, dec_mlp), (dec_dim,)
    return s


def sincos_table(dim: int, grid: int, repeats: int) -> torch.Tensor:
    """(1, 1 + repeats·grid², dim): zero CLS row, then [sin hω, cos hω, sin wω, cos wω] per
    position, ω_k = 10000^(−k/(dim/4))."""
    rows = []
    k = torch.arange(dim // 4, dtype=torch.float64)
    omega = 10000.0 ** (-k / (dim // 4))
    for h in range(grid):
        for w in range(grid):
            hw, ww = h * omega, w * omega
            rows.append(torch.cat([hw.sin(), hw.cos(), ww.sin(), ww.cos()]))
    table = torch.stack(rows).repeat(repeats, 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])[None].float()


def random_checkpoint(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with realistic scales; biases, norms, LayerScale and the legacy mlp_bias are
    all non-trivial so that a misplaced term changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        r = torch.randn(shape, generator=g)
        if key.endswith(("pos_embed", "pos_embeddings")):
            dim = shape[-1]
            grid = 16
            table = sincos_table(dim, grid, (shape[1] - 1) // (grid * grid))
            sd[key] = table + 0.01 * r  # stored values win over any recomputation
        elif key.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            sd[key] = 1.0 + 0.2 * r
        elif key.endswith("ls.gamma"):
            sd[key] = 0.3 + 0.1 * r
        elif key.endswith("mlp_bias"):
            sd[key] = 0.5 * r
        elif key.endswith("placeholder"):
            sd[key] = torch.zeros(shape)
        elif key.endswith("weight") and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            sd[key] = r / math.sqrt(fan_in)
        else:  # biases, tokens
            sd[key] = 0.1 * r
    return sd


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) softmax(q kᵀ / sqrt(d)) v."""
    a = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(a, dim=-1) @ v


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.reshape(b, t, n, d // n).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def standardize_uint8(img: torch.Tensor) -> torch.Tensor:
    """uint8 -> /255 -> per image, per channel instance norm (biased var, eps 1e-5)."""
    x = img.double() / 255.0
    mu = x.mean((-2, -1), keepdim=True)
    var = ((x - mu) ** 2).mean((-2, -1), keepdim=True)
    return ((x - mu) / torch.sqrt(var + 1e-5)).float()


def encoder(
    sd: dict[str, torch.Tensor],
    x: torch.Tensor,
    num_heads: int,
    keep: torch.Tensor | None = None,
    n_blocks: int | None = None,
) -> torch.Tensor:
    """Standardised (B, C, 256, 256) -> tokens (B, 1 + kept, D) after ``n_blocks`` blocks.
    ``keep``: indices (into C·256) of the visible tokens, in the order they enter the encoder."""
    c = x.shape[1]
    dim = sd[ENC + "cls_token"].shape[-1]
    w, b = sd[ENC + "patch_embed.proj.weight"], sd[ENC + "patch_embed.proj.bias"]
    per_channel = [F.conv2d(x[:, i : i + 1], w, b, stride=w.shape[-1]) for i in range(c)]
    t = torch.stack(per_channel, dim=2).flatten(2).transpose(1, 2)  # (B, C·256, D)
    pos = sd[ENC + "pos_embed"]
    t = t + pos[:, 1 : 1 + t.shape[1]]
    if keep is not None:
        t = t[:, keep]
    cls = (sd[ENC + "cls_token"] + pos[:, :1]).expand(t.shape[0], -1, -1)
    x = torch.cat([cls, t], dim=1)
    depth = len({k.split(".")[3] for k in sd if k.startswith(ENC + "blocks.")})
    for i in range(depth if n_blocks is None else n_blocks):
        p = f"{ENC}blocks.{i}."
        y = layer_norm(x, sd[p + "in_norm.weight"], sd[p + "in_norm.bias"], 1e-6)
        mlp_bias = sd[p + "mlp_bias"]
        # legacy placement: zeros for the first 3·D outputs, mlp_bias for the last len(mlp_bias)
        bias = torch.cat([torch.zeros(3 * dim), mlp_bias])
        y = y @ sd[p + "in_proj.weight"].T + bias
        hidden = mlp_bias.shape[0]
        m, q, k, v = y.split([hidden, dim, dim, dim], dim=-1)
        q = layer_norm(heads(q, num_heads), sd[p + "q_norm.weight"], sd[p + "q_norm.bias"], 1e-6)
        k = layer_norm(heads(k, num_heads), sd[p + "k_norm.weight"], sd[p + "k_norm.bias"], 1e-6)
        a = merge(attention(q, k, heads(v, num_heads)))
        a = a @ sd[p + "attn_out_proj.weight"].T + sd[p + "attn_out_proj.bias"]
        m = gelu(m) @ sd[p + "mlp_out_proj.weight"].T + sd[p + "mlp_out_proj.bias"]
        x = x + sd[p + "ls.gamma"] * (a + m)
    return x


def decoder(
    sd: dict[str, torch.Tensor],
    latent: torch.Tensor,
    keep: torch.Tensor,
    channels: int,
    cross_heads: int,
    block_heads: int,
) -> torch.Tensor:
    """Encoder output (B, 1 + kept, D) with visible token indices ``keep`` -> predicted standardised
    patches (B, C·256, 256)."""
    eps = 1e-5
    x = latent @ sd["encoder_decoder_proj.weight"].T + sd["encoder_decoder_proj.bias"]
    b, _, dd = x.shape
    n_tok = sd["decoder.pos_embeddings"].shape[1] - 1
    per = n_tok // channels
    full = sd["decoder.mask_token"].expand(b, n_tok, dd).clone()
    full[:, keep] = x[:, 1:]
    x = torch.cat([x[:, :1], full], dim=1)
    mod = [sd["decoder.placeholder"]] + [
        sd[f"decoder.modality_tokens.{m}"].expand(1, per, dd) for m in range(channels)
    ]
    x = x + sd["decoder.pos_embeddings"] + torch.cat(mod, dim=1)
    tokens = x[:, 1:]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return layer_norm(t, sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        out = t @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    context = ln(tokens, "decoder.context_norm")
    kv = lin(context, "decoder.cross_attention.kv")
    k, v = heads(kv[..., :dd], cross_heads), heads(kv[..., dd:], cross_heads)
    outs = []
    for m in range(channels):
        xm = tokens[:, m * per : (m + 1) * per]
        q = heads(lin(ln(xm, "decoder.query_norm"), "decoder.cross_attention.q"), cross_heads)
        xm = lin(merge(attention(q, k, v)), "decoder.cross_attention.proj")  # replaces x_m
        h = gelu(lin(ln(xm, "decoder.out_norm"), "decoder.mlp.fc1"))
        xm = xm + lin(h, "decoder.mlp.fc2")
        j = 0
        while f"decoder.decoders.{m}.{j}.norm1.weight" in sd:
            p = f"decoder.decoders.{m}.{j}."
            qkv = lin(ln(xm, p + "norm1"), p + "attn.qkv")
            qq, kk, vv = (heads(t, block_heads) for t in qkv.split(dd, dim=-1))
            xm = xm + lin(merge(attention(qq, kk, vv)), p + "attn.proj")
            xm = xm + lin(gelu(lin(ln(xm, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
            j += 1
        outs.append(xm)
    y = torch.cat([x[:, :1], *outs], dim=1)
    return lin(y, "decoder_pred")[:, 1:]


def unpatchify(pred: torch.Tensor, channels: int, patch: int = 16) -> torch.Tensor:
    """(B, C·L, p²) -> (B, C, H, W), pixels row-major in each patch, patches row-major."""
    b = pred.shape[0]
    g = int(round((pred.shape[1] // channels) ** 0.5))
    out = torch.zeros(b, channels, g * patch, g * patch)
    for c in range(channels):
        for i in range(g):
            for j in range(g):
                row = pred[:, c * g * g + i * g + j].reshape(b, patch, patch)
                out[:, c, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] = row
    return out
