"""The object :func:`napari_cellmae.load_model` returns: numpy in, numpy out.

:class:`CellMAEModel` wraps an eval-mode :class:`~napari_cellmae.model.CellMAE` on a device and
adds the OpenPhenom preprocessing, pooling, batching (halving the batch on out-of-memory), bf16
autocast where the hardware is fast at it, tiling of whole fields, and masked reconstruction.
Torch-level helpers (:meth:`CellMAEModel.encode`, :func:`pool_tokens`,
:func:`napari_cellmae.model.standardize`) are there for other modules that stay in torch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import tiling
from .devices import default_autocast_dtype, resolve_device
from .model import CellMAE, CellMAEConfig, standardize

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "channelwise", "cls")
# input normalisation of embeddings: "crop" = each crop and channel standardised by itself (the
# MAE's training input, OpenPhenom's); "plate" = by typical statistics of the plate's crops
NORMALIZATIONS = ("crop", "plate")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_batch_size(device: torch.device) -> int:
    """Crops per forward pass: what the pipeline uses on this kind of device."""
    return {"cuda": 64, "mps": 16}.get(device.type, 4)


def pool_tokens(tokens: torch.Tensor, channels: int, pooling: str = "mean") -> torch.Tensor:
    """Pool encoder tokens into one vector per image.

    tokens: (N, 1 + C·L, D) -> "mean": (N, D) mean over all C·L patch tokens (the official
    OpenPhenom embedding); "channelwise": (N, C·D), the mean of each channel's tokens,
    channel-major; "cls": (N, D) the CLS token.
    """
    if pooling == "cls":
        return tokens[:, 0]
    patches = tokens[:, 1:]  # (N, C·L, D)
    if pooling == "mean":
        return patches.mean(dim=1)
    if pooling == "channelwise":
        n, _, d = patches.shape
        return patches.reshape(n, channels, -1, d).mean(dim=2).reshape(n, channels * d)
    raise ValueError(f"Unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}.")


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass(frozen=True)
class Reconstruction:
    """Masked reconstruction of N crops (p = patch size, h = w = 256 / p).

    Attributes
    ----------
    masked : np.ndarray
        (N, C, 256, 256) float32, the input with hidden patches set to 0.
    reconstruction : np.ndarray
        (N, C, 256, 256) float32, the model's prediction of EVERY patch, in the input's intensity
        scale (un-standardised with each image/channel's own mean and std).
    standardized : np.ndarray
        (N, C, 256, 256) float32, the same prediction in the per-channel standardised space.
    mask : np.ndarray
        (N, C, h, w) bool, True = hidden from the encoder.
    error : np.ndarray
        (N, C, h, w) float32, per-patch MSE between prediction and standardised input.
    """

    masked: np.ndarray
    reconstruction: np.ndarray
    standardized: np.ndarray
    mask: np.ndarray
    error: np.ndarray

    def pasted(self) -> np.ndarray:
        """(N, C, 256, 256): visible patches from the input, hidden ones from the prediction."""
        p = self.masked.shape[-1] // self.mask.shape[-1]
        hidden = self.mask.repeat(p, axis=-2).repeat(p, axis=-1)
        return np.where(hidden, self.reconstruction, self.masked)


def reference_rows(reference: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The part of a checked plate reference (1 or N, C, 2) for the images ``rows`` of a
    batch: a shared (1, C, 2) reference serves every row; None stays None."""
    if reference is None or len(reference) == 1:
        return reference
    return reference[rows]


def embedding_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """How a model embeds by default, from its ``config.json`` (or what a trained model inherits
    from its start): :class:`CellMAEModel` keyword arguments ``default_block``,
    ``default_pooling`` ("mean" when unsaid) and ``default_normalization`` ("crop")."""
    return {
        "default_block": config.get("best_block"),
        "default_pooling": config.get("default_pooling") or "mean",
        "default_normalization": config.get("default_normalization") or "crop",
    }


class CellMAEModel:
    """A loaded CellMAE, ready for numpy images.

    Parameters
    ----------
    module : CellMAE
        The network (moved to ``device`` and put in eval mode here).
    device : str or torch.device, optional
        None/"auto" = best available (cuda > mps > cpu).
    precision : {"auto", "fp32", "bf16", "fp16"}, optional
        "auto" (default) = bf16/fp16 autocast where :func:`default_autocast_dtype` says the
        device is fast at it, else fp32.
    name, source, checksum, default_block, channel_names, attribution, metadata
        Provenance and defaults from the model folder (see the attributes below).

    Attributes
    ----------
    module, config, name, source, checksum, device, patch_size, embed_dim, depth, max_channels,
    decoder_channels (None = any count), default_block (block used when ``block=None``; None =
    last), default_pooling, default_normalization (how :meth:`embed_field` and the plate
    pipeline normalise inputs: "crop" or "plate", see :meth:`plate_reference`), channel_names,
    attribution, metadata, autocast_dtype.
    """

    def __init__(
        self,
        module: CellMAE,
        device: str | torch.device | None = None,
        precision: str | None = None,
        *,
        name: str = "",
        source: str = "",
        checksum: str | None = None,
        default_block: int | None = None,
        default_pooling: str = "mean",
        default_normalization: str = "crop",
        channel_names: list[str] | None = None,
        attribution: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.config: CellMAEConfig = module.config
        self.name = name or "cellmae"
        self.source = source
        self._checksum = checksum
        self.patch_size = self.config.patch_size
        self.embed_dim = self.config.embed_dim
        self.depth = self.config.depth
        self.max_channels = self.config.max_channels
        self.decoder_channels = self.config.decoder_channels
        self.encoder_only = module.encoder_only
        if default_block is not None and not 1 <= int(default_block) <= self.depth:
            raise ValueError(f"default_block {default_block} is not in 1..{self.depth}.")
        self.default_block = None if default_block is None else int(default_block)
        if default_pooling not in POOLINGS:
            raise ValueError(f"default_pooling must be one of {POOLINGS}, got {default_pooling!r}")
        self.default_pooling = default_pooling
        if default_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"default_normalization must be one of {NORMALIZATIONS}, got "
                f"{default_normalization!r}"
            )
        self.default_normalization = default_normalization
        self.channel_names = list(channel_names) if channel_names else None
        self.attribution = attribution
        self.metadata = dict(metadata or {})
        self.set_precision(precision)

    @property
    def checksum(self) -> str:
        """sha256 hex of the weights file it was loaded from, else of the state dict's bytes."""
        if self._checksum is None:
            self._checksum = state_dict_sha256(self.module.state_dict())
        return self._checksum

    def __repr__(self) -> str:
        dt = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        return (
            f"CellMAEModel(name={self.name!r}, dim={self.embed_dim}, depth={self.depth}, "
            f"device={self.device}, precision={dt})"
        )

    # -- precision and batching -----------------------------------------------------------------
    def set_precision(self, precision: str | None) -> None:
        """Set the inference precision: "auto", "fp32", "bf16" or "fp16" (see the class doc)."""
        p = (precision or "auto").lower()
        if p not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}: use one of {PRECISIONS}.")
        if p == "auto":
            self.autocast_dtype = default_autocast_dtype(self.device)
        elif p == "fp16" and self.device.type == "cpu":
            raise ValueError("fp16 is for GPUs; on the CPU use precision='bf16' or 'fp32'.")
        else:
            self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            self.autocast_dtype
        ]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _run_batched(
        self, n: int, batch_size: int | None, fn: Callable[[slice], Any]
    ) -> Iterator[Any]:
        """Yield ``fn(slice)`` over ``n`` items; on out-of-memory halve the batch and retry."""
        bs = int(batch_size or default_batch_size(self.device))
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        start = 0
        while start < n:
            stop = min(n, start + bs)
            try:
                out = fn(slice(start, stop))
            except Exception as exc:  # re-raised below unless out of memory
                if not _is_oom(exc) or bs == 1:
                    raise
                bs = max(1, bs // 2)
                logger.warning("out of memory: retrying with batch size %d", bs)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            yield out
            start = stop

    # -- input checks ---------------------------------------------------------------------------
    def check_images(self, images: Any) -> np.ndarray:
        """Validate (N, C, 256, 256) real, finite images; returns them as an ndarray."""
        arr = np.asarray(images)
        size = self.config.img_size
        if arr.ndim != 4:
            fix = (
                " Add a batch axis: images[None]."
                if arr.ndim == 3
                else " Use embed_field() for a (C, H, W) field."
            )
            raise ValueError(f"Expected images (N, C, {size}, {size}), got shape {arr.shape}.{fix}")
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"Expected numeric images, got dtype {arr.dtype}.")
        if np.iscomplexobj(arr):
            raise ValueError(f"Expected real images, got dtype {arr.dtype}: pass np.abs(x).")
        self.module.check_input(arr.shape)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(
                f"Images contain {bad} non-finite values (NaN/inf): replace them first, e.g. "
                "np.nan_to_num(images)."
            )
        return arr

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        # uint8 stays uint8 (standardize divides by 255, as OpenPhenom); the rest goes float32
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32, copy=False)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, non_blocking=True)

    # -- embedding ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self, images: torch.Tensor, block: int | None = None, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Torch-level: raw images (N, C, H, W) on the model's device -> tokens (N, 1+C·L, D)
        float32 after ``block`` (None = ``default_block`` or the last), no final norm.
        ``reference`` (N or 1, C, 2): normalise by these statistics instead of each crop's own
        (see :func:`~napari_cellmae.model.standardize`)."""
        with self._autocast():
            x, _, _ = standardize(images, self.config.input_eps, reference)
            tokens = self.module.forward_features(
                x, block=self.default_block if block is None else block
            )
        return tokens.float()

    def embed(
        self,
        images: Any,
        pooling: str | None = None,
        block: int | None = None,
        batch_size: int | None = None,
        reference: Any = None,
    ) -> np.ndarray:
        """Embed crops.

        Parameters
        ----------
        images : array-like
            (N, C, 256, 256), any real dtype (uint8 is divided by 255 first, as OpenPhenom).
        pooling : {"mean", "channelwise", "cls"}, optional
            "mean" (official: final block, drop CLS, mean over all C·256 tokens, no final norm),
            "channelwise" (per-channel means, channel-major), "cls". Default: the model's
            ``default_pooling`` ("mean" unless its folder says otherwise).
        block : int, optional
            1-based encoder block whose tokens are pooled; default ``default_block`` or the last.
        batch_size : int, optional
            Crops per pass (default by device; halved automatically on out-of-memory).
        reference : array-like, optional
            (C, 2) or (N, C, 2) mean and standard deviation per channel, in the images' units
            (from :meth:`plate_reference`): every crop is normalised by these instead of its own
            statistics (plate normalisation). None (default): each crop by its own.

        Returns
        -------
        np.ndarray
            float32 (N, D), or (N, C·D) for "channelwise".
        """
        arr = self.check_images(images)
        pooling = pooling or self.default_pooling
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}.")
        channels = arr.shape[1]
        ref = self._check_reference(reference, arr.shape[:2])

        def run(sl: slice) -> np.ndarray:
            part = reference_rows(ref, sl)
            tokens = self.encode(self._to_tensor(arr[sl]), block=block, reference=part)
            return pool_tokens(tokens, channels, pooling).cpu().numpy()

        width = self.embed_dim * (channels if pooling == "channelwise" else 1)
        parts = list(self._run_batched(len(arr), batch_size, run))
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, width), "f4")

    def embed_field(
        self,
        field: Any,
        return_crops: bool = False,
        pooling: str | None = None,
        block: int | None = None,
        batch_size: int | None = None,
        normalization: str | None = None,
        reference: Any = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embed a whole field of any size: tile it into 256×256 crops and average their vectors.

        Tiling (:func:`napari_cellmae.tiling.crop_grid`): along each axis n = ceil(size / 256)
        crops, evenly spaced from the first pixel to the last, so the whole field is covered with
        the least overlap that n crops allow (1080 px: 5 crops overlapping by ~50 px; 512 px: 2
        crops, no overlap). A side smaller than 256 px is padded by reflection up to 256 (the
        crop then sees a mirrored copy of the field); sides under one patch are rejected.

        Parameters
        ----------
        field : array-like
            (C, H, W), any real dtype.
        return_crops : bool
            Also return the per-crop vectors and their positions.
        pooling, block, batch_size
            As in :meth:`embed`.
        normalization : {"crop", "plate"}, optional
            Default: the model's ``default_normalization``. "crop": each crop and channel
            standardised by itself (blind to how bright the field is). "plate": every crop by
            ``reference`` (a :meth:`plate_reference` of the field's plate, so that a brighter
            stain stays brighter); without one, the field's own reference.
        reference : array-like, optional
            (C, 2) from :meth:`plate_reference`; given, it implies "plate".

        Returns
        -------
        vector or (vector, crops, positions)
            ``vector`` (D,) or (C·D,) float32 mean over crops; ``crops`` (n, D) per-crop vectors;
            ``positions`` (n, 2) int (y, x) of each crop's top-left corner.
        """
        crops, positions = self.field_crops(field)
        normalization = self._normalization(normalization, reference)
        if normalization == "plate" and reference is None:
            self.check_images(crops)
            reference = np.median(self.crop_statistics(crops), axis=0)  # the field's own
        elif normalization == "crop":
            reference = None
        emb = self.embed(
            crops, pooling=pooling, block=block, batch_size=batch_size, reference=reference
        )
        vector = emb.mean(axis=0).astype(np.float32)
        return (vector, emb, positions) if return_crops else vector

    # -- normalisation --------------------------------------------------------------------------
    def _normalization(self, normalization: str | None, reference: Any = None) -> str:
        if normalization is None:
            return "plate" if reference is not None else self.default_normalization
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalization {normalization!r}: use one of {', '.join(NORMALIZATIONS)}."
            )
        return normalization

    def _check_reference(self, reference: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
        """(C, 2) or (N, C, 2) -> float32 tensor (1 or N, C, 2) on the device, checked."""
        if reference is None:
            return None
        ref = np.asarray(reference, dtype=np.float32)
        n, c = shape
        if ref.ndim == 2:
            ref = ref[None]
        if ref.ndim != 3 or ref.shape[1:] != (c, 2) or len(ref) not in (1, n):
            raise ValueError(
                f"reference has shape {np.asarray(reference).shape}: expected ({c}, 2) or "
                f"({n}, {c}, 2), a mean and a standard deviation per channel "
                "(use model.plate_reference(fields))"
            )
        if not np.isfinite(ref).all() or (ref[..., 1] <= 0).any():
            raise ValueError(
                "reference must hold finite means and positive standard deviations; compute it "
                "with model.plate_reference(fields) from fields that are not empty"
            )
        return torch.from_numpy(ref).to(self.device)

    def crop_statistics(self, crops: np.ndarray) -> np.ndarray:
        """Per crop and channel mean and standard deviation, in the crops' own units:
        (n, C, 256, 256) -> (n, C, 2) float64 (what :func:`standardize` divides by)."""
        x = torch.from_numpy(np.ascontiguousarray(crops))
        _, mean, std = standardize(x, self.config.input_eps)
        return torch.stack([mean[..., 0, 0], std[..., 0, 0]], dim=-1).double().numpy()

    def plate_reference(self, fields: Iterable[Any]) -> np.ndarray:
        """The plate normalisation reference: per channel, the median over every 256×256 crop
        of ``fields`` (some fields of one plate, read by :func:`~napari_cellmae.read_field`) of
        the crop's mean and of its standard deviation.

        With it (``embed_field(field, reference=ref)``, or ``normalization="plate"`` in
        :class:`~napari_cellmae.embed.EmbedConfig`) every crop of the plate is standardised by the
        same typical statistics instead of its own, so that intensity phenotypes (a stain twice as
        bright, more or larger cells) reach the model; the controls' alignment (TVN) then removes
        what differs between plates. The median keeps a few odd wells (empty, saturated) from
        moving it.

        Returns
        -------
        np.ndarray
            float64 (C, 2): mean, standard deviation per channel.
        """
        stats = [self.crop_statistics(self.field_crops(f)[0]) for f in fields]
        channels = {s.shape[1] for s in stats}
        if len(channels) > 1:
            raise ValueError(
                f"the fields have different channel counts {sorted(channels)}: a reference is "
                "per channel of one plate; pass fields read with the same channels"
            )
        stats = np.concatenate(stats) if stats else np.zeros((0, 0, 2))
        stats = stats[np.isfinite(stats).all(axis=(1, 2))]  # crops with NaN/inf pixels
        if not len(stats):
            raise ValueError(
                "plate_reference needs at least one field of the plate with finite pixels"
            )
        return np.median(stats, axis=0)

    def field_crops(self, field: Any) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) field -> (crops (n, C, 256, 256), positions (n, 2) (y, x)), after padding
        sides smaller than a crop (see :meth:`embed_field`)."""
        arr = np.asarray(field)
        if arr.ndim != 3:
            fix = " Add a channel axis: field[None]." if arr.ndim == 2 else ""
            raise ValueError(f"Expected a field (C, H, W), got shape {arr.shape}.{fix}")
        size = self.config.img_size
        if min(arr.shape[1:]) < self.patch_size:
            raise ValueError(
                f"The field is {arr.shape[1]}×{arr.shape[2]} px, smaller than one "
                f"{self.patch_size}-px patch: it cannot be embedded; use larger images."
            )
        arr = tiling.pad_to_min(arr, size)
        positions = tiling.crop_grid(arr.shape[1], arr.shape[2], size)
        return tiling.extract_crops(arr, positions, size), positions

    # -- reconstruction -------------------------------------------------------------------------
    def reconstruct(
        self,
        images: Any,
        mask_ratio: float = 0.75,
        seed: int | None = None,
        mask: Any = None,
        batch_size: int | None = None,
    ) -> Reconstruction:
        """Hide patches and let the decoder predict them.

        Parameters
        ----------
        images : array-like
            (N, C, 256, 256), any real dtype. OpenPhenom's decoder needs exactly 6 channels in
            RxRx order; the bundled models take any count 1..11.
        mask_ratio : float
            Fraction of the N·C·256 tokens hidden at random (each channel independently).
        seed : int, optional
            Makes the random mask reproducible (independent of batch size and device).
        mask : array-like, optional
            (N, C, 256/p, 256/p) bool, True = hidden; overrides ``mask_ratio``. Hiding a whole
            channel asks the model to predict that stain from the others.
        batch_size : int, optional
            Crops per pass (halved automatically on out-of-memory).
        """
        arr = self.check_images(images)
        n, c = arr.shape[:2]
        g = self.config.grid_size
        if self.encoder_only:
            raise ValueError(
                "This model was loaded with encoder_only=True and has no decoder: load it again "
                "without encoder_only to reconstruct."
            )
        if self.decoder_channels is not None and c != self.decoder_channels:
            raise ValueError(
                f"This model's decoder reconstructs exactly {self.decoder_channels} channels "
                f"(OpenPhenom: RxRx order Hoechst, ConA, Phalloidin, Syto14, MitoTracker, WGA), "
                f"got {c}. Pass {self.decoder_channels} channels, or use the bundled cellmae-tiny "
                "whose decoder takes any count; embedding works with any count."
            )
        if mask is not None:
            hidden = np.asarray(mask)
            if hidden.shape != (n, c, g, g):
                raise ValueError(
                    f"mask must have shape (N, C, {g}, {g}) = {(n, c, g, g)} (one value per "
                    f"{self.patch_size}×{self.patch_size} patch, True = hidden), "
                    f"got {hidden.shape}."
                )
            hidden = hidden.astype(bool).reshape(n, c * g * g)
            noise = None
        else:
            if not 0.0 <= float(mask_ratio) < 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            noise = torch.rand(n, c * g * g, generator=gen)  # CPU: same mask on every device
            hidden = None

        # Images hiding different token counts cannot share a batch: group them.
        if hidden is not None:
            counts = hidden.sum(1)
            groups = [np.flatnonzero(counts == k) for k in np.unique(counts)]
        else:
            groups = [np.arange(n)]
        size = self.config.img_size
        out = {
            "masked": np.zeros((n, c, size, size), np.float32),
            "reconstruction": np.zeros((n, c, size, size), np.float32),
            "standardized": np.zeros((n, c, size, size), np.float32),
            "mask": np.zeros((n, c, g, g), bool),
            "error": np.zeros((n, c, g, g), np.float32),
        }
        for idx in groups:

            def run(sl: slice, idx: np.ndarray = idx) -> tuple[np.ndarray, dict]:
                sel = idx[sl]
                m = torch.from_numpy(hidden[sel]) if hidden is not None else None
                nz = noise[torch.from_numpy(sel)] if noise is not None else None
                return sel, self._reconstruct_batch(arr[sel], float(mask_ratio), nz, m)

            for sel, res in self._run_batched(len(idx), batch_size, run):
                for key, value in res.items():
                    out[key][sel] = value
        return Reconstruction(**out)

    @torch.inference_mode()
    def _reconstruct_batch(
        self,
        arr: np.ndarray,
        mask_ratio: float,
        noise: torch.Tensor | None,
        hidden: torch.Tensor | None,
    ) -> dict[str, np.ndarray]:
        module, c = self.module, arr.shape[1]
        g = self.config.grid_size
        imgs = self._to_tensor(arr)
        x, mean, std = standardize(imgs, self.config.input_eps)  # fp32 statistics
        with self._autocast():
            latent, mask, ids_restore = module.forward_encoder(
                x,
                mask_ratio,
                noise=None if noise is None else noise.to(self.device),
                mask=None if hidden is None else hidden.to(self.device),
            )
            pred = module.forward_decoder(latent, ids_restore)
        pred = pred.float()  # (n, C·L, p²)
        err = ((pred - module.patchify(x)) ** 2).mean(dim=-1)  # (n, C·L)
        pred_img = module.unpatchify(pred, c)  # (n, C, 256, 256)
        mask_b = mask.bool().reshape(-1, c, g, g)
        hidden_px = mask_b.repeat_interleave(self.patch_size, -2).repeat_interleave(
            self.patch_size, -1
        )
        masked = imgs.float().masked_fill(hidden_px, 0.0)
        return {
            "masked": masked.cpu().numpy(),
            "reconstruction": (pred_img * std + mean).cpu().numpy(),
            "standardized": pred_img.cpu().numpy(),
            "mask": mask_b.cpu().numpy(),
            "error": err.reshape(-1, c, g, g).cpu().numpy(),
        }


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted key names, dtypes, shapes and bytes of a state dict."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
