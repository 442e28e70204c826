"""CellMAE: a channel-agnostic masked autoencoder (MAE) for cell microscopy, in plain PyTorch.

Read top to bottom: the config and its presets, the input standardisation, the sin-cos position
tables, the building blocks (small to large), the two decoders, then :class:`CellMAE` with its
methods named after the algorithm (``patchify``, ``random_masking``, ``forward_encoder``,
``forward_decoder``, ``forward_loss``, ``forward``, ``forward_features``).

Channel-agnostic means: ONE patch embedding shared by every channel, tokens laid out channel-major
(CLS, then channel 0's patches row-major, channel 1's, ...), the same 2-D sin-cos position table
repeated for each channel, and no channel embedding in the encoder. A crop of C channels is
``1 + C·L`` tokens (L = (img_size / patch_size)², 256 for 256×256 crops with 16×16 patches), any C
from 1 to ``max_channels``; the mean embedding does not depend on the channel order.

The ``cellmae_vit_small_patch16_256`` preset is OpenPhenom-S/16 (Kraus et al. 2023), tensor for
tensor: its state dict equals the released checkpoint's minus the ``encoder.vit_backbone.`` prefix
(``napari_cellmae.hub`` maps it). Facts implemented here are in the project's OPENPHENOM.md; this
is an independent implementation (no code from timm or the reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DECODERS = ("cross_attention", "channel_agnostic")
# the sizes a config may hold (far beyond any real model; a damaged config.json is refused)
_INT_RANGES = {
    "img_size": (1, 4096),
    "patch_size": (1, 4096),
    "max_channels": (1, 256),
    "embed_dim": (4, 16384),
    "depth": (1, 256),
    "num_heads": (1, 1024),
    "decoder_embed_dim": (4, 16384),
    "decoder_depth": (0, 256),
    "decoder_num_heads": (1, 1024),
    "decoder_cross_heads": (1, 1024),
    "decoder_channels": (1, 256),
}
_FLOAT_RANGES = {
    "mlp_ratio": (0.0, 64.0),
    "norm_eps": (0.0, 1.0),
    "decoder_norm_eps": (0.0, 1.0),
    "input_eps": (0.0, 1.0),
    "layer_scale_init": (0.0, 1e3),
}
MAX_TOKENS_PER_CHANNEL = 65536  # a 256×256 patch grid


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellMAEConfig:
    """Architecture and training-objective settings. Defaults = OpenPhenom-S/16."""

    img_size: int = 256  # side of the square crops the model sees (positions are fixed to it)
    patch_size: int = 16  # side of a patch; one token per patch per channel
    max_channels: int = 11  # channel slots in the position table (1..max_channels per crop)
    embed_dim: int = 384  # encoder width
    depth: int = 12  # encoder blocks
    num_heads: int = 6  # encoder attention heads (head dim = embed_dim / num_heads)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim
    block: str = "parallel_scaling"  # encoder block: attention and MLP in parallel off one in_proj
    legacy_bias: bool = True  # OpenPhenom/timm<=1.0.24 bias placement: [zeros(3D), mlp_bias]
    qk_norm: bool = True  # LayerNorm on q and k per head before the dot product
    layer_scale_init: float | None = 1e-4  # LayerScale gamma init (None = no LayerScale)
    fc_norm: bool = True  # keep OpenPhenom's (unused) fc_norm so its checkpoint loads strictly
    norm_eps: float = 1e-6  # encoder LayerNorm eps (incl. q/k norms)
    decoder: str = "cross_attention"  # "cross_attention" (OpenPhenom) | "channel_agnostic"
    decoder_embed_dim: int = 512  # decoder width
    decoder_depth: int = 8  # decoder blocks (per channel for cross_attention, shared otherwise)
    decoder_num_heads: int = 16  # heads of the decoder's self-attention blocks
    decoder_cross_heads: int = 8  # heads of the cross-attention (cross_attention decoder only)
    decoder_channels: int | None = 6  # channels the decoder reconstructs; None = any 1..max
    decoder_norm_eps: float = 1e-5  # decoder LayerNorm eps
    input_eps: float = 1e-5  # eps of the per-image, per-channel instance norm of the input
    mask_ratio: float = 0.75  # default fraction of hidden tokens in forward()
    fourier_loss_weight: float = 0.0  # mix of the Fourier-magnitude L1 term (0 = plain MSE)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"Invalid CellMAEConfig: {msg}")

        self._check_ranges()
        if self.img_size % self.patch_size:
            bad(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}.")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            bad(f"embed_dim {self.embed_dim} must divide by num_heads {self.num_heads} and 4.")
        if self.block != "parallel_scaling":
            bad(f"block {self.block!r} is not supported; use 'parallel_scaling'.")
        if self.decoder not in DECODERS:
            bad(f"decoder {self.decoder!r} is unknown; use one of {DECODERS}.")
        if self.decoder_embed_dim % 4 or self.decoder_embed_dim % self.decoder_num_heads:
            bad(f"decoder_embed_dim {self.decoder_embed_dim} must divide by 4 and its heads.")
        if self.decoder == "cross_attention":
            if self.decoder_embed_dim % self.decoder_cross_heads:
                bad("decoder_embed_dim must divide by decoder_cross_heads.")
            if not self.decoder_channels or not 1 <= self.decoder_channels <= self.max_channels:
                bad("the cross_attention decoder needs decoder_channels in 1..max_channels.")
        elif self.decoder_channels is not None:
            bad("the channel_agnostic decoder takes any channel count: set decoder_channels=None.")
        if not 0.0 <= self.mask_ratio < 1.0:
            bad(f"mask_ratio {self.mask_ratio} must be in [0, 1).")
        if not 0.0 <= self.fourier_loss_weight < 1.0:
            bad(f"fourier_loss_weight {self.fourier_loss_weight} must be in [0, 1) (a mix factor).")

    def _check_ranges(self) -> None:
        """Every size a whole number in a sane range, before anything divides by it or builds
        that many blocks (a config.json with depth 10**6 or a zero patch size is refused here,
        not minutes later or with a ZeroDivisionError)."""
        bad = []
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if name == "decoder_channels" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                bad.append(f"{name} {value!r} (a whole number in {low}..{high})")
        for name, (low, high) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if name == "layer_scale_init" and value is None:
                continue
            closed = name == "layer_scale_init"  # 0 is a valid (if odd) LayerScale start
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad.append(f"{name} {value!r} (a number in ({low}, {high}])")
            elif not (low <= value if closed else low < value) or not value <= high:
                bad.append(f"{name} {value!r} (in {'[' if closed else '('}{low}, {high}])")
        for name in ("legacy_bias", "qk_norm", "fc_norm"):
            if not isinstance(getattr(self, name), bool):
                bad.append(f"{name} {getattr(self, name)!r} (true or false)")
        if not bad and self.patch_size > self.img_size:
            bad.append(f"patch_size {self.patch_size} (at most img_size {self.img_size})")
        if not bad and (self.img_size // self.patch_size) ** 2 > MAX_TOKENS_PER_CHANNEL:
            bad.append(
                f"img_size/patch_size {self.img_size}/{self.patch_size} (at most "
                f"{MAX_TOKENS_PER_CHANNEL} patches per channel)"
            )
        if bad:
            raise ValueError("Invalid CellMAEConfig: " + "; ".join(bad) + ".")

    @property
    def grid_size(self) -> int:
        """Patches along one side of a crop (16 for 256/16)."""
        return self.img_size // self.patch_size

    @property
    def tokens_per_channel(self) -> int:
        """L: patch tokens per channel (256 for 256/16)."""
        return self.grid_size**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CellMAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown CellMAEConfig fields {unknown}: the model folder was written by a newer "
                "napari-cellmae; upgrade it (pip install -U napari-cellmae)."
            )
        return cls(**d)


PRESETS: dict[str, CellMAEConfig] = {
    # OpenPhenom-S/16 exactly: ViT-S/16 encoder with ParallelScaling blocks (legacy bias, qk-norm,
    # LayerScale) and the 6-channel cross-attention decoder (8 blocks of width 512 per channel).
    "cellmae_vit_small_patch16_256": CellMAEConfig(),
    # The bundled default: small enough for CPUs (see docs/model.md for the speed it was sized
    # for); its decoder reconstructs any channel count 1..11.
    "cellmae_vit_tiny_patch16_256": CellMAEConfig(
        embed_dim=256,
        depth=6,
        num_heads=4,
        legacy_bias=False,
        layer_scale_init=0.1,
        fc_norm=False,
        decoder="channel_agnostic",
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        decoder_channels=None,
    ),
    # Tiny, for tests.
    "cellmae_vit_test_patch16_256": CellMAEConfig(
        embed_dim=32,
        depth=2,
        num_heads=2,
        legacy_bias=False,
        layer_scale_init=0.1,
        fc_norm=False,
        decoder="channel_agnostic",
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        decoder_channels=None,
    ),
}


# --------------------------------------------------------------------------------------------
# Input standardisation and position tables
# --------------------------------------------------------------------------------------------
def standardize(
    imgs: Tensor, eps: float = 1e-5, reference: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per image, per channel instance norm (mean and biased variance over H×W, no affine), or
    the norm of a ``reference``.

    uint8 input is first divided by 255 (OpenPhenom's preprocessing); any other dtype is used as
    is (the norm makes any linear rescale irrelevant except for near-constant channels, which eps
    keeps from being amplified; a constant channel becomes zeros).

    Parameters
    ----------
    imgs : Tensor
        (N, C, H, W), any real dtype.
    eps : float
        Added to the variance.
    reference : Tensor, optional
        (N or 1, C, 2): a mean and a standard deviation per channel, in the input's own units,
        used instead of each image's own (plate normalisation: every crop of a plate divided by
        the same typical statistics, so that brighter or dimmer wells stay brighter or dimmer).
        Standard deviations are kept at least ``sqrt(eps)``.

    Returns
    -------
    x, mean, std : Tensor
        ``x`` (N, C, H, W) float32 standardised; ``mean`` and ``std`` (N or 1, C, 1, 1) in the
        input's own units, so that ``x * std + mean`` gives back the input intensity scale.
    """
    scale = 255.0 if imgs.dtype == torch.uint8 else 1.0
    x = imgs.float() / scale
    if reference is None:
        var, mean = torch.var_mean(x, dim=(-2, -1), correction=0, keepdim=True)  # (N, C, 1, 1)
        std = torch.sqrt(var + eps)
    else:
        ref = reference.to(device=x.device, dtype=torch.float32)
        if ref.ndim != 3 or ref.shape[-1] != 2 or ref.shape[1] != x.shape[1]:
            raise ValueError(
                f"reference must be (N or 1, C={x.shape[1]}, 2) (mean, std per channel), got "
                f"shape {tuple(ref.shape)}"
            )
        mean = ref[..., 0, None, None] / scale
        std = torch.clamp(ref[..., 1, None, None] / scale, min=eps**0.5)
    return (x - mean) / std, mean * scale, std * scale


def sincos_pos_embed(dim: int, grid_size: int, channels: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos positions, the same table repeated for every channel slot.

    Row for grid position (h, w): [sin(h·ω), cos(h·ω), sin(w·ω), cos(w·ω)] with
    ω_k = 10000^(−k/(dim/4)), k = 0..dim/4−1. Returns (1, [1 +] channels·grid², dim); the CLS row
    (when asked for) is zeros.
    """
    k = dim // 4
    omega = 10000.0 ** (-torch.arange(k, dtype=torch.float64) / k)  # (k,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    hh, ww = torch.meshgrid(coords, coords, indexing="ij")
    h = hh.flatten()[:, None] * omega  # (L, k)
    w = ww.flatten()[:, None] * omega  # (L, k)
    table = torch.cat([h.sin(), h.cos(), w.sin(), w.cos()], dim=1).float()  # (L, dim)
    table = table.repeat(channels, 1)  # (channels·L, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table[None]


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, C·L, p²): channel-major tokens, patches row-major, pixels row-major."""
    n, c, hgt, wid = imgs.shape
    p = patch_size
    h, w = hgt // p, wid // p
    x = imgs.reshape(n, c, h, p, w, p).permute(0, 1, 2, 4, 3, 5)  # (N, C, h, w, p, p)
    return x.reshape(n, c * h * w, p * p)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(N, C·L, p²) -> (N, C, H, W), the inverse of :func:`patchify` (square crops)."""
    n = x.shape[0]
    p = patch_size
    h = w = int(round((x.shape[1] // channels) ** 0.5))
    x = x.reshape(n, channels, h, w, p, p).permute(0, 1, 2, 4, 3, 5)  # (N, C, h, p, w, p)
    return x.reshape(n, channels, h * p, w * p)


# --------------------------------------------------------------------------------------------
# Building blocks (small to large)
# --------------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    """Per-feature learned scale of a residual branch."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Standard pre-norm transformer block (no LayerScale): the decoders' block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ParallelScalingBlock(nn.Module):
    """Encoder block: attention and MLP computed in parallel from ONE input projection.

    ``in_proj`` (no bias) yields [MLP fc1 (hidden) | q (D) | k (D) | v (D)]. The learned
    ``mlp_bias`` is added through a bias vector of the same length, placed as OpenPhenom was
    trained: ``legacy_bias`` puts it at [zeros(3D), mlp_bias] (so it lands on the last MLP units
    and on q, k, v); otherwise at [mlp_bias, zeros(3D)] (MLP units only). Then per-head q/k
    LayerNorm, attention, and ``x + ls(attn_out_proj(attn) + mlp_out_proj(gelu(mlp)))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        layer_scale_init: float | None,
        legacy_bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.legacy_bias = legacy_bias
        self.split_sizes = [hidden, dim, dim, dim]
        self.in_norm = nn.LayerNorm(dim, eps=eps)
        self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=False)
        self.mlp_bias = nn.Parameter(torch.zeros(hidden))
        self.register_buffer("qkv_bias", torch.zeros(3 * dim), persistent=False)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_out_proj = nn.Linear(dim, dim)
        self.mlp_out_proj = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else None

    def in_proj_bias(self) -> Tensor:
        """The bias added after ``in_proj``: (hidden + 3D,)."""
        if self.legacy_bias:
            return torch.cat((self.qkv_bias, self.mlp_bias))
        return torch.cat((self.mlp_bias, self.qkv_bias))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        y = F.linear(self.in_norm(x), self.in_proj.weight, self.in_proj_bias())  # (B, N, hid+3D)
        mlp, q, k, v = y.split(self.split_sizes, dim=-1)
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_norm(q.reshape(shape)).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_norm(k.reshape(shape)).transpose(1, 2)  # (B, H, N, hd)
        v = v.reshape(shape).transpose(1, 2)  # (B, H, N, hd)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        out = self.attn_out_proj(attn) + self.mlp_out_proj(F.gelu(mlp))  # (B, N, D)
        return x + (self.ls(out) if self.ls is not None else out)


class PatchEmbed(nn.Module):
    """ONE Conv2d(1, D, p, stride p) applied to every channel separately: (N, C, H, W) ->
    (N, C·L, D), channel-major. Computed as a matrix product on patchified pixels (same result)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        patches = patchify(x, self.patch_size)  # (N, C·L, p²)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (N, C·L, D)


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from another; q and kv without bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, d = x.shape
        m = context.shape[1]
        hd = d // self.num_heads
        q = self.q(x).view(b, n, self.num_heads, hd).transpose(1, 2)  # (B, H, N, hd)
        kv = self.kv(context).view(b, m, 2, self.num_heads, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, M, hd)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# Decoders: both take the un-shuffled decoder tokens (N, 1 + C·L, Dd) and which are visible
# --------------------------------------------------------------------------------------------
class CrossAttentionDecoder(nn.Module):
    """OpenPhenom's decoder: a fixed number of channels (6, in RxRx order), one stack per channel.

    Adds positions and a learned token per channel (``modality_tokens``); for each channel m its
    tokens query ALL patch tokens by cross-attention (the output replaces them, no residual), then
    a shared MLP with residual, then that channel's own stack of blocks. No final norm.
    """

    def __init__(self, config: CellMAEConfig) -> None:
        super().__init__()
        dim, channels = config.decoder_embed_dim, config.decoder_channels
        assert channels is not None
        self.channels = channels
        self.tokens_per_channel = config.tokens_per_channel
        eps = config.decoder_norm_eps
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("placeholder", torch.zeros(1, 1, dim))  # CLS gets no channel token
        self.modality_tokens = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 1, dim)) for _ in range(channels)]
        )
        self.register_buffer(
            "pos_embeddings", sincos_pos_embed(dim, config.grid_size, channels, cls_token=True)
        )
        self.cross_attention = CrossAttention(dim, config.decoder_cross_heads)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.decoders = nn.ModuleList(
            nn.Sequential(
                *[
                    Block(dim, config.decoder_num_heads, config.mlp_ratio, eps)
                    for _ in range(config.decoder_depth)
                ]
            )
            for _ in range(channels)
        )
        self.context_norm = nn.LayerNorm(dim, eps=eps)
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.out_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, visible: Tensor) -> Tensor:
        _, t, dim = x.shape
        L = self.tokens_per_channel
        if t - 1 != self.channels * L:
            raise ValueError(
                f"This model's decoder (OpenPhenom's) reconstructs exactly {self.channels} "
                f"channels in RxRx order, got {(t - 1) // L}. Embedding works with any channel "
                f"count; for reconstruction pass {self.channels} channels or use a model whose "
                "decoder takes any count (the bundled cellmae-tiny)."
            )
        channel_tokens = [self.placeholder] + [
            t_m.expand(1, L, dim) for t_m in self.modality_tokens
        ]
        x = x + self.pos_embeddings + torch.cat(channel_tokens, dim=1)  # (N, 1+C·L, Dd)
        tokens = x[:, 1:]  # (N, C·L, Dd)
        context = self.context_norm(tokens)  # every channel reads all patch tokens
        outs = []
        for m, blocks in enumerate(self.decoders):
            x_m = tokens[:, m * L : (m + 1) * L]  # (N, L, Dd)
            x_m = self.cross_attention(self.query_norm(x_m), context)  # replaces x_m
            x_m = x_m + self.mlp(self.out_norm(x_m))
            outs.append(blocks(x_m))
        return torch.cat([x[:, :1], *outs], dim=1)  # (N, 1+C·L, Dd)


class ChannelAgnosticDecoder(nn.Module):
    """Decoder for any channel count that keeps the encoder's channel-order symmetry.

    A token learns which channel it belongs to from CONTENT, not from a channel index: every token
    of channel c gets ``channel_proj(mean of c's visible decoder tokens)`` added (a channel with no
    visible token gets the learned ``missing_channel_token``), plus the spatial sin-cos position.
    Then shared blocks attend across all channels, so a fully hidden channel is predicted from the
    other channels at the same positions. Permuting the input channels permutes the output the
    same way. Limitation: two fully hidden channels look alike to it and get the same prediction.
    """

    def __init__(self, config: CellMAEConfig) -> None:
        super().__init__()
        dim = config.decoder_embed_dim
        self.tokens_per_channel = config.tokens_per_channel
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.missing_channel_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.channel_proj = nn.Linear(dim, dim)
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed(dim, config.grid_size, 1, cls_token=False),
            persistent=False,  # fixed: recomputed, not stored
        )
        self.blocks = nn.ModuleList(
            Block(dim, config.decoder_num_heads, config.mlp_ratio, config.decoder_norm_eps)
            for _ in range(config.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.decoder_norm_eps)

    def forward(self, x: Tensor, visible: Tensor) -> Tensor:
        n, t, dim = x.shape
        L = self.tokens_per_channel
        c = (t - 1) // L
        tokens = x[:, 1:].reshape(n, c, L, dim)  # (N, C, L, Dd)
        vis = visible.reshape(n, c, L, 1).to(tokens.dtype)  # (N, C, L, 1)
        count = vis.sum(2)  # (N, C, 1)
        mean = (tokens * vis).sum(2) / count.clamp(min=1)  # (N, C, Dd)
        ident = self.channel_proj(mean)  # (N, C, Dd)
        ident = torch.where(count > 0, ident, self.missing_channel_token.to(ident.dtype))
        tokens = tokens + ident[:, :, None] + self.pos_embed[:, None]  # (N, C, L, Dd)
        x = torch.cat([x[:, :1], tokens.reshape(n, c * L, dim)], dim=1)  # (N, 1+C·L, Dd)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class CellMAE(nn.Module):
    """Channel-agnostic ViT masked autoencoder.

    Parameters
    ----------
    config : CellMAEConfig
        Architecture (see :data:`PRESETS`).
    encoder_only : bool
        Build without the decoder (embedding only; saves memory).
    """

    def __init__(self, config: CellMAEConfig | None = None, encoder_only: bool = False) -> None:
        super().__init__()
        cfg = config or CellMAEConfig()
        self.config = cfg
        self.encoder_only = encoder_only
        dim, p = cfg.embed_dim, cfg.patch_size
        # encoder
        self.patch_embed = PatchEmbed(p, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_embed", sincos_pos_embed(dim, cfg.grid_size, cfg.max_channels, cls_token=True)
        )  # (1, 1 + max_channels·L, D), stored in checkpoints as OpenPhenom does
        self.blocks = nn.ModuleList(
            ParallelScalingBlock(
                dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                cfg.qk_norm,
                cfg.layer_scale_init,
                cfg.legacy_bias,
                cfg.norm_eps,
            )
            for _ in range(cfg.depth)
        )
        if cfg.fc_norm:  # present in OpenPhenom's checkpoint; the official embedding never uses it
            self.fc_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        # decoder
        if not encoder_only:
            self.encoder_decoder_proj = nn.Linear(dim, cfg.decoder_embed_dim)
            if cfg.decoder == "cross_attention":
                self.decoder: nn.Module = CrossAttentionDecoder(cfg)
            else:
                self.decoder = ChannelAgnosticDecoder(cfg)
            self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, p * p)
        self.initialize_weights()

    # -- set-up ---------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """MAE-style init: xavier-uniform linears (patch embedding as a linear), zero biases,
        unit LayerNorms, tokens ~ N(0, 0.02). LayerScale keeps its init value."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for name, param in self.named_parameters():
            if (
                name.endswith(("mask_token", "missing_channel_token"))
                or ".modality_tokens." in name
            ):
                nn.init.normal_(param, std=0.02)

    def reset_fixed_buffers(self) -> None:
        """(Re)create the fixed tensors that checkpoints do not store (after loading a state dict
        into a module built on the meta device)."""
        device = self.cls_token.device
        for m in self.modules():
            if isinstance(m, ParallelScalingBlock):
                m.register_buffer("qkv_bias", torch.zeros_like(m.qkv_bias, device=device), False)
            elif isinstance(m, ChannelAgnosticDecoder):
                table = sincos_pos_embed(m.pos_embed.shape[-1], self.config.grid_size, 1, False)
                m.register_buffer("pos_embed", table.to(device), persistent=False)

    @property
    def tokens_per_channel(self) -> int:
        return self.config.tokens_per_channel

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError unless ``shape`` is (N, C, img_size, img_size) with 1 <= C <= max."""
        cfg = self.config
        if len(shape) != 4:
            raise ValueError(f"Expected images (N, C, H, W), got shape {tuple(shape)}.")
        _, c, h, w = shape
        if (h, w) != (cfg.img_size, cfg.img_size):
            raise ValueError(
                f"The model takes {cfg.img_size}×{cfg.img_size} crops, got {h}×{w}: tile larger "
                "fields into crops (napari_cellmae.tiling, or model.embed_field)."
            )
        if not 1 <= c <= cfg.max_channels:
            raise ValueError(
                f"The model takes 1 to {cfg.max_channels} channels, got {c}: select at most "
                f"{cfg.max_channels} channels."
            )

    # -- the algorithm --------------------------------------------------------------------------
    def patchify(self, imgs: Tensor) -> Tensor:
        """imgs: (N, C, H, W) -> (N, C·L, p²)."""
        return patchify(imgs, self.config.patch_size)

    def unpatchify(self, x: Tensor, channels: int) -> Tensor:
        """x: (N, C·L, p²) -> (N, C, H, W)."""
        return unpatchify(x, self.config.patch_size, channels)

    def random_masking(
        self,
        x: Tensor,
        mask_ratio: float,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Hide tokens: per-token uniform noise over all C·L tokens, keep the int(L·(1−ratio))
        lowest. A caller ``noise`` (N, C·L) or ``mask`` (N, C·L; True/1 = hidden, the same hidden
        count in every row) makes it deterministic.

        x: (N, C·L, D) -> x_kept (N, keep, D), mask (N, C·L) float 1 = hidden, ids_restore (N, C·L)
        """
        n, length, dim = x.shape
        if mask is not None:
            hidden = mask.reshape(n, length).to(torch.int8)
            counts = hidden.sum(1)
            if bool((counts != counts[0]).any()):
                raise ValueError(
                    "Every image of a batch must hide the same number of tokens; got "
                    f"{counts.tolist()}. Pass such images in separate calls."
                )
            len_keep = length - int(counts[0])
            ids_shuffle = torch.argsort(hidden, dim=1, stable=True)  # visible first, in order
        else:
            len_keep = int(length * (1 - mask_ratio))
            if noise is None:
                noise = torch.rand(n, length, device=x.device)
            ids_shuffle = torch.argsort(noise.reshape(n, length), dim=1)  # ascending: keep small
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, C·L)
        ids_keep = ids_shuffle[:, :len_keep]  # (N, keep)
        x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, dim))  # (N, keep, D)
        out_mask = (ids_restore >= len_keep).to(x.dtype)  # (N, C·L) 1 = hidden
        return x_kept, out_mask, ids_restore

    def embed_patches(self, x: Tensor) -> Tensor:
        """Standardised images (N, C, H, W) -> patch tokens with positions (N, C·L, D)."""
        self.check_input(tuple(x.shape))
        tokens = self.patch_embed(x)  # (N, C·L, D)
        return tokens + self.pos_embed[:, 1 : 1 + tokens.shape[1]]

    def _prepend_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        return torch.cat([cls.to(x.dtype), x], dim=1)

    def forward_encoder(
        self,
        x: Tensor,
        mask_ratio: float,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: standardised (N, C, H, W) -> (latent (N, 1+keep, D), mask (N, C·L), ids_restore)."""
        tokens = self.embed_patches(x)  # (N, C·L, D)
        tokens, mask, ids_restore = self.random_masking(tokens, mask_ratio, noise, mask)
        x = self._prepend_cls(tokens)  # (N, 1+keep, D)
        for blk in self.blocks:
            x = blk(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (N, 1+keep, D), ids_restore (N, C·L) -> pred (N, C·L, p²) standardised pixels."""
        if self.encoder_only:
            raise ValueError(
                "This model was loaded without its decoder (encoder_only=True): reload it with "
                "encoder_only=False to reconstruct."
            )
        x = self.encoder_decoder_proj(latent)  # (N, 1+keep, Dd)
        n, length = ids_restore.shape
        keep = latent.shape[1] - 1
        mask_tokens = self.decoder.mask_token.to(x.dtype).expand(n, length - keep, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, C·L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1)  # (N, 1+C·L, Dd)
        x = self.decoder(x, ids_restore < keep)
        return self.decoder_pred(x)[:, 1:]  # (N, C·L, p²), CLS dropped

    def forward_loss(self, x: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MSE on hidden patches of the standardised image, averaged per patch then over hidden
        patches; with ``fourier_loss_weight`` w > 0: (1−w)·MSE + w·(L1 between |FFT2| of the
        16×16 patches, same averaging).

        x: standardised (N, C, H, W); pred: (N, C·L, p²); mask: (N, C·L) 1 = hidden.
        """
        target = self.patchify(x)  # (N, C·L, p²)
        pred = pred.float()
        hidden = mask.sum().clamp(min=1)
        loss = ((pred - target) ** 2).mean(dim=-1)  # (N, C·L)
        loss = (loss * mask).sum() / hidden
        w = self.config.fourier_loss_weight
        if w > 0:
            p = self.config.patch_size
            mag_pred = torch.fft.fft2(pred.unflatten(-1, (p, p))).abs()  # (N, C·L, p, p)
            mag_target = torch.fft.fft2(target.unflatten(-1, (p, p))).abs()
            floss = (mag_pred - mag_target).abs().mean(dim=(-2, -1))  # (N, C·L)
            loss = (1 - w) * loss + w * (floss * mask).sum() / hidden
        return loss

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: raw (N, C, H, W), any dtype -> (loss, pred (N, C·L, p²), mask (N, C·L))."""
        x, _, _ = standardize(imgs, self.config.input_eps)
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(x, ratio, noise, mask)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(x, pred, mask), pred, mask

    def forward_features(self, x: Tensor, block: int | None = None) -> Tensor:
        """Tokens after encoder block ``block`` (1-based; None = last), no masking, no final norm.

        x: standardised (N, C, H, W) -> (N, 1 + C·L, D) (CLS first, then channel-major patches).
        """
        depth = len(self.blocks)
        k = depth if block is None else int(block)
        if not 1 <= k <= depth:
            raise ValueError(f"block must be 1..{depth} (1-based; None = last), got {block}.")
        x = self._prepend_cls(self.embed_patches(x))  # (N, 1+C·L, D)
        for blk in self.blocks[:k]:
            x = blk(x)
        return x


def create_model(
    preset_or_config: str | CellMAEConfig = "cellmae_vit_tiny_patch16_256",
    encoder_only: bool = False,
) -> CellMAE:
    """A randomly initialised :class:`CellMAE` from a preset name or a config."""
    if isinstance(preset_or_config, CellMAEConfig):
        return CellMAE(preset_or_config, encoder_only=encoder_only)
    try:
        config = PRESETS[preset_or_config]
    except KeyError:
        raise ValueError(
            f"Unknown preset {preset_or_config!r}: use one of {', '.join(PRESETS)}."
        ) from None
    return CellMAE(config, encoder_only=encoder_only)
