"""Masked-autoencoder training: continue training a model on your own images, or train one from
scratch (the bundled model is trained with this).

>>> from napari_cellmae.training import TrainConfig, train  # doctest: +SKIP
>>> from napari_cellmae.progress import run
>>> result = run(train(TrainConfig(out="my-model", plates=("plate1",), epochs=5)))
>>> result.folder, result.metrics["val_loss_best"]

:func:`train` is a progress generator (``yield Progress``; ``return TrainResult``). Per step it
draws a batch of augmented crops (:mod:`napari_cellmae.training_data`), hides ``mask_ratio`` of the
patch tokens and minimises the model's masked-reconstruction loss (:meth:`CellMAE.forward_loss`);
the learning rate warms up linearly, then follows a cosine to ``min_lr_fraction``. After each
epoch it measures the validation loss (fixed crops of held-out wells, fixed masks), keeps the best
weights, writes a checkpoint and stops early after ``patience`` epochs without improvement.
The result is a model folder (:func:`napari_cellmae.hub.save_model`) holding the best weights, with
a model card recording data, recipe and metrics, registered so every model picker offers it.

Checkpoints (``<out>-checkpoints/last.pt``: weights, optimizer, schedule, RNG, step, history)
are written atomically every epoch and when a run is cancelled (the generator closed, or
``should_stop`` true); ``resume=True`` continues from the exact step, mid-epoch included.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1 in the environment) it trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs): every process takes its own batches of the
same epoch plan, gradients are averaged, stop decisions are taken together, rank 0 writes.
Without torchrun it runs in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .model import PRESETS, CellMAE, create_model
from .progress import Cancelled, Progress, ProgressGenerator
from .training_data import (
    FieldSource,
    PlateSource,
    epoch_plan,
    iter_batches,
    validation_crops,
)

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lion")
TRAIN_ONLY = ("all", "norms+last")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT = "last.pt"

# the clock of the --minutes budget (a seam: tests drive it)
_clock = time.monotonic
# what a resumed run may change; everything else comes from the checkpoint
# (``out`` included: the result goes where this session says, e.g. after the run folder was moved)
RESUMABLE_CHANGES = (
    "epochs",
    "minutes",
    "patience",
    "device",
    "precision",
    "resume",
    "register",
    "out",
    "force",
)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint and the model card)."""

    out: str = ""  # the new model folder
    source: str | None = None  # starting model, as load_model takes it (None = bundled default)
    from_scratch: str | None = None  # a preset name: start from random weights instead
    # data (ignored when train() is given a FieldSource)
    plates: tuple[str, ...] = ()  # plate folders
    layout: str = "auto"  # plate naming convention (scan_plate's layout)
    channels: tuple[str, ...] | None = None  # channel ids/names to train on (default: all)
    val_fraction: float = 0.2  # share of wells held out for validation (0 = none)
    # crops and augmentation
    crop_size: int = 256  # must equal the model's img_size
    crops_per_field: int = 4  # random crops per training field per epoch
    intensity_jitter: float = 0.2  # std of the per-channel log-gamma
    channel_subset_prob: float = 0.5  # share of batches that see a random subset of channels
    min_channels: int = 1  # smallest channel subset
    # objective
    mask_ratio: float = 0.75  # share of patch tokens hidden from the encoder
    fourier_weight: float | None = None  # Fourier-magnitude loss mix (None = the model's own)
    # optimisation
    optimizer: str = "adamw"  # "adamw" or "lion" (OpenPhenom's recipe: lion, lr 1e-4)
    lr: float = 1e-4  # peak learning rate (per step, whatever the number of processes)
    weight_decay: float = 0.05  # decoupled; not on biases, norms and tokens
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.1  # linear warm-up over this share of the run, then cosine
    min_lr_fraction: float = 0.01  # the cosine ends at lr · min_lr_fraction
    grad_clip: float | None = 1.0  # max gradient norm (None = no clipping)
    batch_size: int = 8  # crops per step and process
    # what trains
    freeze_blocks: int = 0  # freeze the patch embedding and the first k encoder blocks
    train_only: str = "all"  # "norms+last": only LayerNorms + the last `last_blocks` blocks
    last_blocks: int = 1  # encoder blocks trained with train_only="norms+last"
    # budget and stopping
    epochs: int = 10
    minutes: float | None = None  # wall-clock budget for training (None = epochs only)
    steps_per_epoch: int | None = None  # cap on steps per epoch (default: the whole plan)
    patience: int | None = 3  # stop after this many epochs without a better val loss
    val_crops: int = 64  # fixed validation crops (at most)
    # machinery
    precision: str = "auto"  # auto = bf16 on GPUs / CPUs fast at it, fp16 on older GPUs
    device: str = "auto"
    seed: int = 0
    checkpoint_dir: str | None = None  # default: "<out>-checkpoints" beside the model
    resume: bool = False  # continue from the checkpoint
    name: str | None = None  # model name (default: the folder name)
    register: bool = True  # add the new model to every model picker
    force: bool = False  # write into an existing folder cellmae did not make (outputs.py)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"Invalid training option: {msg}")

        if not str(self.out):
            bad("out (--out) must name the new model folder.")
        if self.from_scratch is not None and self.from_scratch not in PRESETS:
            bad(f"from_scratch {self.from_scratch!r} is not a preset; use one of {list(PRESETS)}.")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer {self.optimizer!r}: use one of {OPTIMIZERS}.")
        if self.train_only not in TRAIN_ONLY:
            bad(f"train_only {self.train_only!r}: use one of {TRAIN_ONLY}.")
        if self.precision not in PRECISIONS:
            bad(f"precision {self.precision!r}: use one of {PRECISIONS}.")
        if not 0.0 < self.mask_ratio < 1.0:
            bad(f"mask_ratio {self.mask_ratio} must be in (0, 1).")
        if self.fourier_weight is not None and not 0.0 <= self.fourier_weight < 1.0:
            bad(f"fourier_weight {self.fourier_weight} must be in [0, 1).")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.min_lr_fraction <= 1.0:
            bad("warmup_fraction must be in [0, 1) and min_lr_fraction in [0, 1].")
        for name in ("batch_size", "epochs", "crops_per_field", "val_crops", "last_blocks"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.freeze_blocks < 0 or self.lr <= 0 or self.weight_decay < 0:
            bad("freeze_blocks and weight_decay must be >= 0 and lr > 0.")
        if self.minutes is not None and self.minutes <= 0:
            bad(f"minutes must be > 0, got {self.minutes}.")
        if self.patience is not None and self.patience < 1:
            bad(f"patience must be >= 1 (or None), got {self.patience}.")

    @property
    def checkpoint_path(self) -> Path:
        folder = self.checkpoint_dir or f"{Path(self.out).expanduser()}-checkpoints"
        return Path(folder).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("plates", "channels", "betas"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    folder: Path  # the new model folder
    checkpoint_dir: Path
    metrics: dict[str, Any]  # val_loss_before/best/last, val_mean_fill, best_epoch, steps, ...
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    steps: list[list[float]] = field(default_factory=list)  # [step, train loss, lr] per step
    module: CellMAE | None = field(default=None, repr=False)  # the network, with those weights
    config: TrainConfig | None = None  # the run's config (a resumed run's: the checkpoint's)


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------
class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): step along the
    sign of an interpolation of momentum and gradient; decoupled weight decay. Usually wants a
    3-10× smaller learning rate than AdamW."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def lr_factor(progress: float, warmup: float, min_fraction: float) -> float:
    """Learning-rate multiplier at ``progress`` (0..1 of the run): linear warm-up, then cosine."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    t = (progress - warmup) / max(1e-12, 1.0 - warmup)
    return min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))


def _no_decay(name: str, p: Tensor) -> bool:
    return p.ndim <= 1 or "token" in name or "pos_emb" in name


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Lion over the trainable parameters; no weight decay on biases, norms, tokens."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def set_trainable(module: CellMAE, cfg: TrainConfig) -> dict[str, int]:
    """Freeze what ``freeze_blocks`` / ``train_only`` say; returns parameter counts.

    The decoder (which only serves training) always trains. ``fc_norm`` (OpenPhenom's, unused by
    the forward pass) never does.
    """
    depth = len(module.blocks)
    if cfg.freeze_blocks > depth:
        raise ValueError(f"freeze_blocks {cfg.freeze_blocks} > the model's {depth} blocks.")
    for p in module.parameters():
        p.requires_grad_(True)
    frozen: list[nn.Module | nn.Parameter] = []
    if getattr(module, "fc_norm", None) is not None:
        frozen.append(module.fc_norm)
    if cfg.train_only == "norms+last":
        keep = set(range(max(0, depth - cfg.last_blocks), depth))
        frozen += [module.patch_embed, module.cls_token]
        for i, blk in enumerate(module.blocks):
            if i in keep:
                continue
            for m in blk.modules():
                if not isinstance(m, nn.LayerNorm):
                    frozen += list(m.parameters(recurse=False))
    if cfg.freeze_blocks:
        frozen += [module.patch_embed, module.cls_token, *module.blocks[: cfg.freeze_blocks]]
    for item in frozen:
        params = [item] if isinstance(item, nn.Parameter) else item.parameters()
        for p in params:
            p.requires_grad_(False)
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


# --------------------------------------------------------------------------------------------
# Devices, precision, processes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (world 1 = single process)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this run created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one, and pick this process's device."""
    import torch.distributed as dist

    from .devices import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    already = dist.is_available() and dist.is_initialized()
    if already:
        world = dist.get_world_size()
    dev = resolve_device(None if device == "auto" else device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(), dev
    if not already:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), owned=not already), dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training (None = fp32)."""
    from .devices import cpu_has_fast_bf16

    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("fp16 training is for GPUs; on the CPU use --precision bf16 or fp32.")
        return torch.bfloat16 if precision == "bf16" or cpu_has_fast_bf16() else None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return (
        None if precision == "auto" else {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    )


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _mask_noise(shape: tuple[int, int], *seed: int) -> Tensor:
    """Uniform noise (N, C·L) for random_masking, keyed by seed (the same on any device)."""
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    )
    return torch.rand(shape, generator=gen)


def _backward_and_step(
    loss: Tensor,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """Backward, clip the gradient norm, optimizer step (through the fp16 loss scaler if any)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _agree(
    loss: float, elapsed: float, stop: bool, dist_info: DistInfo, device: torch.device
) -> tuple[float, float, bool]:
    """One collective per step: (mean loss, mean elapsed seconds, any process asked to stop),
    so that every process takes the same learning rate and stops at the same step."""
    flags = torch.tensor([loss, elapsed, float(stop)], dtype=torch.float64)
    if dist_info.world > 1:
        import torch.distributed as dist

        flags = flags.to(device)
        dist.all_reduce(flags)
        flags = flags.cpu() / torch.tensor([dist_info.world, dist_info.world, 1.0])
    return flags[0].item(), flags[1].item(), flags[2].item() > 0


# --------------------------------------------------------------------------------------------
# The starting model and validation
# --------------------------------------------------------------------------------------------
def start_model(cfg: TrainConfig) -> tuple[CellMAE, dict[str, Any]]:
    """The network to train (on the CPU, fp32) and what the new model inherits from it."""
    if cfg.from_scratch:
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        module = create_model(cfg.from_scratch)
        return module, {"start": {"from_scratch": cfg.from_scratch, "seed": cfg.seed}}
    from .hub import load_model

    model = load_model(cfg.source, device="cpu", precision="fp32")
    if model.encoder_only:
        raise ValueError(
            f"The model {model.name!r} has no decoder (saved encoder-only): MAE training needs "
            "one. Start from a full model folder or use --from-scratch PRESET."
        )
    inherited: dict[str, Any] = {
        "start": {"name": model.name, "source": model.source, "checksum": model.checksum},
        "channel_names": model.channel_names,
        "attribution": model.attribution,
        "best_block": model.default_block,
        # how the start embeds: the new model embeds the same way unless told otherwise
        "default_pooling": model.default_pooling,
        "default_normalization": model.default_normalization,
    }
    return model.module, inherited


def _val_batches(
    crops: list[tuple[np.ndarray, Any]], batch_size: int, module: CellMAE, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """Group validation crops by channel count into batches with fixed mask noise."""
    by_c: dict[int, list[int]] = {}
    for i, (crop, _) in enumerate(crops):
        by_c.setdefault(crop.shape[0], []).append(i)
    out = []
    L = module.tokens_per_channel
    for c, idx in sorted(by_c.items()):
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            imgs = torch.from_numpy(np.stack([crops[i][0] for i in part]).astype(np.float32))
            noise = torch.cat([_mask_noise((1, c * L), seed, 7, i) for i in part])
            out.append((imgs, noise))
    return out


@torch.no_grad()
def evaluate(
    module: CellMAE,
    batches: list[tuple[Tensor, Tensor]],
    mask_ratio: float,
    device: torch.device,
    amp: torch.dtype | None,
    dist_info: DistInfo,
) -> tuple[float, float]:
    """(validation loss, mean-fill loss) averaged over all crops: the masked-reconstruction loss
    with fixed masks, and the loss of predicting every hidden patch as its channel mean (= 0 in
    standardised units)."""
    from .model import standardize

    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for i, (imgs, noise) in enumerate(batches):
        if i % dist_info.world != dist_info.rank:
            continue
        imgs, noise = imgs.to(device), noise.to(device)
        with _autocast(device, amp):
            loss, pred, mask = module(imgs, mask_ratio, noise=noise)
        x, _, _ = standardize(imgs, module.config.input_eps)
        fill = module.forward_loss(x, torch.zeros_like(pred, dtype=torch.float32), mask)
        n = imgs.shape[0]
        sums += torch.tensor([loss.item() * n, fill.item() * n, n], dtype=torch.float64)
    if dist_info.world > 1:
        import torch.distributed as dist

        sums = sums.to(device) if device.type == "cuda" else sums
        dist.all_reduce(sums)
        sums = sums.cpu()
    module.train(was_training)
    count = max(sums[2].item(), 1.0)
    return sums[0].item() / count, sums[1].item() / count


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename (a checkpoint is whole or absent)."""
    from .store import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`train` (plain tensors and numbers only: weights_only)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint to resume from at {path}: start without --resume, or pass the "
            "--checkpoint-dir of the run to continue."
        )
    try:
        with open(path, "rb") as f:
            saved = torch.load(f, weights_only=True, map_location="cpu")
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # pickle.UnpicklingError (code or objects refused), a damaged file …
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(
            f"The checkpoint {path} cannot be read safely ({type(exc).__name__}: {reason}). "
            "Checkpoints are loaded as plain tensors and numbers only (torch.load with "
            "weights_only=True), so a pickle holding code or other objects is refused, and a "
            "truncated file cannot be read. If it is not the checkpoint of your run, pass that "
            "run's --checkpoint-dir; otherwise start the run again without --resume (move "
            f"{path.parent} aside first)."
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise ValueError(
            f"{path} is not a checkpoint written by cellmae finetune (no {', '.join(missing)}): "
            "pass the --checkpoint-dir of the run to continue, or start without --resume."
        )
    return saved


_CHECKPOINT_KEYS = ("config", "architecture", "model", "optimizer", "state", "rng")


def _merge_resumed(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config with the changes a resumed run may make (epochs, minutes …)."""
    old = TrainConfig.from_dict(saved)
    changes = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES}
    ignored = [
        k
        for k in asdict(cfg)
        if k not in RESUMABLE_CHANGES
        and k != "checkpoint_dir"
        and getattr(cfg, k) != getattr(old, k)
    ]
    if ignored:
        logger.warning("resuming with the checkpoint's %s (only %s can change)", ignored, changes)
    return dataclasses.replace(old, **changes, checkpoint_dir=str(cfg.checkpoint_path))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _fresh_state() -> dict[str, Any]:
    return {
        "epoch": 0,  # completed epochs
        "step_in_epoch": 0,  # steps done in the epoch under way
        "global_step": 0,
        "elapsed": 0.0,  # training seconds, over all sessions of the run
        "epoch_loss_sum": 0.0,
        "val_before": None,
        "val_mean_fill": None,
        "best_val": None,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],  # one dict per (possibly partial) epoch
        "steps": [],  # [step, train loss, lr] per step
    }


def _check_channels(module: CellMAE, source: FieldSource, cfg: TrainConfig) -> float:
    """The channel-subset probability to use; ValueError when the data cannot fit the model."""
    fixed = module.config.decoder_channels
    if fixed is None:
        return cfg.channel_subset_prob
    counts = {source.channels(k) for k in [*source.train_keys(0), *source.val_keys()]}
    if counts != {fixed}:
        raise ValueError(
            f"This model's decoder reconstructs exactly {fixed} channels (OpenPhenom: Hoechst, "
            f"ConA, Phalloidin, Syto14, MitoTracker, WGA) but the data has {sorted(counts)}: pass "
            f"--channels with {fixed} channels in that order, or start from a model whose decoder "
            "takes any channel count (the bundled cellmae-tiny)."
        )
    return 0.0  # subsets would change the channel count


def _describe_run(cfg: TrainConfig, inherited: dict[str, Any], data: dict, m: dict) -> str:
    start = inherited["start"]
    origin = (
        f"Trained from scratch ({start['from_scratch']})"
        if "from_scratch" in start
        else f"Fine-tuned from {start['name']}"
    )
    fields = data.get("train_fields", data.get("fields_per_epoch", "?"))
    val = "n/a"
    if m.get("val_loss_before") is not None:
        val = (
            f"{m['val_loss_before']:.4f} -> {m['val_loss_best']:.4f} "
            f"(mean-fill baseline {m['val_mean_fill']:.4f})"
        )
    return (
        f"{origin} with napari-cellmae's masked-autoencoder training on {data.get('kind')} "
        f"({fields} training fields) for {m['epochs']:.3g} epochs ({m['steps']} steps, "
        f"{m['seconds'] / 60:.1f} min on {m['device']}); validation masked-reconstruction loss "
        f"{val}."
    )


def _model_metadata(
    cfg: TrainConfig,
    inherited: dict[str, Any],
    source: FieldSource,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    device: torch.device,
    world: int,
) -> dict[str, Any]:
    """config.json entries of the new model: name, description, the training record (start,
    data, recipe, metrics, compute, history) and what it inherits from its start."""
    skip = ("out", "resume", "register", "checkpoint_dir", "name", "device", "force")
    data = source.describe()
    meta: dict[str, Any] = {
        "name": cfg.name or Path(cfg.out).expanduser().name,
        "description": _describe_run(cfg, inherited, data, metrics),
        "training": {
            "start": inherited["start"],
            "data": data,
            "recipe": {k: v for k, v in cfg.to_dict().items() if k not in skip},
            "metrics": metrics,
            "compute": {"torch": torch.__version__, "device": str(device), "processes": world},
            "history": history,
        },
    }
    channel_names = source.channel_names or inherited.get("channel_names")
    if channel_names:
        meta["channel_names"] = list(channel_names)
    for key in ("attribution", "best_block", "default_pooling", "default_normalization"):
        if inherited.get(key):
            meta[key] = inherited[key]
    if "name" in inherited["start"]:
        meta["derived_from"] = inherited["start"]
    return meta


def train(
    config: TrainConfig,
    source: FieldSource | None = None,
    should_stop: Callable[[], bool] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ProgressGenerator[TrainResult]:
    """Train a CellMAE with the masked-autoencoder objective (a progress generator).

    Parameters
    ----------
    config : TrainConfig
    source : FieldSource, optional
        The data (default: a :class:`~napari_cellmae.training_data.PlateSource` of
        ``config.plates``).
    should_stop : callable, optional
        Polled after every step (in every process of a distributed run); when true the run
        writes a checkpoint and raises :class:`~napari_cellmae.progress.Cancelled`. Closing the
        generator does the same at the next event.
    metadata : dict, optional
        Extra top-level entries for the new model's config.json (e.g. "intended_use").

    Yields
    ------
    Progress
        ``done``/``total`` in steps; ``payload`` a dict with ``kind`` ("start", "val", "step",
        "epoch"), ``epoch``, ``step``, ``train_loss``, ``val_loss``, ``lr``.

    Returns
    -------
    TrainResult
    """
    cfg = config
    out = Path(cfg.out).expanduser()
    saved: dict[str, Any] | None = None
    if cfg.resume:
        saved = load_checkpoint(cfg.checkpoint_path / CHECKPOINT)
        recorded = Path(saved["config"]["out"]).expanduser()
        if (out / "config.json").exists() and out.resolve() != recorded.resolve():
            raise ValueError(
                f"{out} already holds a model that this run did not make (it was writing to "
                f"{recorded}): choose another --out, or the run's own folder."
            )
        cfg = _merge_resumed(cfg, saved["config"])
    elif (out / "config.json").exists():
        raise ValueError(
            f"{out} already holds a model: choose another --out, or pass --resume to continue "
            "the run that made it."
        )
    elif (cfg.checkpoint_path / CHECKPOINT).exists():
        raise ValueError(
            f"{cfg.checkpoint_path} holds the checkpoint of an earlier run: pass --resume to "
            "continue it, or remove that folder to start over."
        )
    else:  # a new run: the output-folder rule (never an input, never a user's own folder)
        from .outputs import check_output_dir

        inputs = [*cfg.plates, *([cfg.source] if cfg.source else [])]
        inputs = [p for p in inputs if Path(p).expanduser().exists()]  # a hub id is no folder
        check_output_dir(out, "finetune", inputs=inputs, force=cfg.force)
    ckdir = cfg.checkpoint_path
    dist_info, device = setup_processes(cfg.device)
    try:
        result = yield from _train(cfg, saved, source, dist_info, device, should_stop, metadata)
    finally:
        if dist_info.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
    logger.info("training done: %s (checkpoints in %s)", result.folder, ckdir)
    return result


def _train(
    cfg: TrainConfig,
    saved: dict[str, Any] | None,
    source: FieldSource | None,
    dist_info: DistInfo,
    device: torch.device,
    should_stop: Callable[[], bool] | None,
    metadata: dict[str, Any] | None,
) -> ProgressGenerator[TrainResult]:
    from .hub import WEIGHTS, read_state_dict, save_model
    from .model import CellMAEConfig

    out, ckdir = Path(cfg.out).expanduser(), cfg.checkpoint_path
    amp = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if source is None:
        source = PlateSource(cfg.plates, cfg.val_fraction, cfg.seed, cfg.channels, cfg.layout)

    # -- the network, what trains, the optimizer ----------------------------------------------
    if saved is not None:
        module = CellMAE(CellMAEConfig.from_dict(saved["architecture"]))
        module.load_state_dict(saved["model"])
        inherited = saved["inherited"]
    else:
        module, inherited = start_model(cfg)
        fourier = cfg.fourier_weight
        module.config = dataclasses.replace(
            module.config,
            mask_ratio=cfg.mask_ratio,
            fourier_loss_weight=module.config.fourier_loss_weight if fourier is None else fourier,
        )
    if cfg.crop_size != module.config.img_size:
        raise ValueError(
            f"crop_size {cfg.crop_size} differs from the model's {module.config.img_size}-px "
            f"input: use crop_size={module.config.img_size}."
        )
    subset_prob = _check_channels(module, source, cfg)
    counts = set_trainable(module, cfg)
    module.to(device).train()
    model: nn.Module = module
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(module, cfg)
    state = _fresh_state()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"]["torch"])
    data_info = source.describe()

    # -- the plan ---------------------------------------------------------------------------
    def steps_in(plan: list) -> int:
        n = len(plan) // dist_info.world
        return min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n

    spe = steps_in(epoch_plan(source, 0, cfg.seed, cfg.batch_size, cfg.crops_per_field))
    if spe == 0:
        raise ValueError(
            f"The training data gives fewer crops per epoch than one batch of {cfg.batch_size} "
            f"crops × {dist_info.world} process(es): lower --batch-size, raise crops per field, "
            "or add fields."
        )
    total_steps = cfg.epochs * spe
    batch_opts = {
        "size": cfg.crop_size,
        "jitter": cfg.intensity_jitter,
        "subset_prob": subset_prob,
        "min_channels": cfg.min_channels,
    }
    val = _val_batches(
        validation_crops(source, cfg.crop_size, cfg.val_crops), cfg.batch_size, module, cfg.seed
    )

    def checkpoint() -> None:
        if dist_info.main:
            payload = {
                "format": "napari-cellmae-checkpoint",
                "config": cfg.to_dict(),
                "architecture": module.config.to_dict(),
                "inherited": inherited,
                "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "state": state,
                "rng": {"torch": torch.get_rng_state()},
                "data": data_info,
            }
            save_checkpoint(ckdir / CHECKPOINT, payload)

    best_weights: dict[str, Tensor] = {}

    def save_best(epoch: float, val_loss: float) -> None:
        best_weights.update(
            {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        )
        if dist_info.main:
            save_model(
                module,
                ckdir / "best",
                metadata={
                    "name": f"{out.name} (best so far)",
                    "training": {"epoch": epoch, "val_loss": val_loss},
                },
            )

    yield Progress(
        state["global_step"],
        total_steps,
        f"training {counts['trainable']:,} of {counts['parameters']:,} parameters on {device}",
        {
            "kind": "start",
            "epoch": state["epoch"],
            "step": state["global_step"],
            **counts,
            "steps_per_epoch": spe,
            "total_steps": total_steps,
            "processes": dist_info.world,
            "device": str(device),
            "precision": str(amp or "fp32").replace("torch.", ""),
            # a resumed run: what the earlier sessions recorded, so that a live plot shows
            # everything, also what happened after its viewer stopped listening (Cancel)
            "steps_so_far": [list(s) for s in state["steps"]],
            "history": list(state["history"]),
        },
    )
    if saved is None:
        if val:
            v0, fill = evaluate(module, val, cfg.mask_ratio, device, amp, dist_info)
            state.update(val_before=v0, val_mean_fill=fill, best_val=v0, best_epoch=0)
            state["history"].append(
                {
                    "epoch": 0,
                    "step": 0,
                    "train_loss": None,
                    "val_loss": v0,
                    "lr": 0.0,
                    "seconds": 0.0,
                }
            )
            save_best(0, v0)
            yield Progress(
                0,
                total_steps,
                f"validation loss of the start: {v0:.4f}",
                {
                    "kind": "val",
                    "epoch": 0,
                    "step": 0,
                    "train_loss": None,
                    "val_loss": v0,
                    "lr": 0.0,
                    "val_mean_fill": fill,
                },
            )
        checkpoint()

    # -- the loop ---------------------------------------------------------------------------
    budget = cfg.minutes * 60 if cfg.minutes else None
    t0, elapsed0, step0 = _clock(), float(state["elapsed"]), int(state["global_step"])
    synced_elapsed = elapsed0
    L = module.tokens_per_channel
    lr = cfg.lr
    stop_reason: str | None = "minutes" if budget and elapsed0 >= budget else None
    dirty = False
    try:
        while stop_reason is None and state["epoch"] < cfg.epochs:
            e = int(state["epoch"])
            plan = epoch_plan(source, e, cfg.seed, cfg.batch_size, cfg.crops_per_field)
            n = steps_in(plan)
            mine = plan[dist_info.rank : n * dist_info.world : dist_info.world]
            batches = iter_batches(source, mine[state["step_in_epoch"] : n], **batch_opts)
            cancel = False
            try:
                for batch in batches:
                    gs = int(state["global_step"])
                    progress = (gs + 1) / total_steps  # the first step is not wasted at lr 0
                    if budget:
                        progress = max(progress, synced_elapsed / budget)
                    lr = cfg.lr * lr_factor(progress, cfg.warmup_fraction, cfg.min_lr_fraction)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    imgs = torch.from_numpy(batch).to(device, non_blocking=True)
                    noise = _mask_noise(
                        (imgs.shape[0], imgs.shape[1] * L), cfg.seed, 3, gs, dist_info.rank
                    )
                    with _autocast(device, amp):
                        loss, _, _ = model(imgs, cfg.mask_ratio, noise=noise.to(device))
                    _backward_and_step(loss, module, optimizer, scaler, cfg.grad_clip)
                    step_loss, synced_elapsed, cancel = _agree(
                        loss.item(),
                        elapsed0 + _clock() - t0,
                        bool(should_stop is not None and should_stop()),
                        dist_info,
                        device,
                    )
                    if not math.isfinite(step_loss):
                        raise ValueError(
                            f"The training loss became {step_loss} at step {gs + 1}: lower the "
                            "learning rate (--lr), or use --precision fp32."
                        )
                    state["global_step"] = gs + 1
                    state["step_in_epoch"] += 1
                    state["elapsed"] = synced_elapsed
                    state["epoch_loss_sum"] += step_loss
                    state["steps"].append([gs + 1, step_loss, lr])
                    dirty = True
                    total = total_steps
                    if budget and gs + 1 > step0:
                        rate = (gs + 1 - step0) / max(synced_elapsed - elapsed0, 1e-9)
                        left = max(0.0, budget - synced_elapsed) * rate
                        total = max(gs + 1, min(total_steps, int(gs + 1 + left)))
                    yield Progress(
                        gs + 1,
                        total,
                        f"epoch {e + 1}/{cfg.epochs}: loss {step_loss:.4f}",
                        {
                            "kind": "step",
                            "epoch": e + 1,
                            "step": gs + 1,
                            "train_loss": step_loss,
                            "val_loss": None,
                            "lr": lr,
                        },
                    )
                    if cancel:
                        break
                    if budget and synced_elapsed >= budget:
                        stop_reason = "minutes"
                        break
            finally:
                batches.close()
            if cancel:
                checkpoint()
                dirty = False
                raise Cancelled(f"training stopped on request; resume from {ckdir}")

            # -- end of an epoch (or of the time budget) ------------------------------------
            steps_done = int(state["step_in_epoch"])
            mean_loss = state["epoch_loss_sum"] / max(1, steps_done)
            if steps_done >= n:
                state.update(epoch=e + 1, step_in_epoch=0, epoch_loss_sum=0.0)
            epoch_label = e + steps_done / n
            entry = {
                "epoch": round(epoch_label, 4),
                "step": state["global_step"],
                "train_loss": mean_loss,
                "val_loss": None,
                "lr": lr,
                "seconds": synced_elapsed,
            }
            improved = False
            if val:
                v, _ = evaluate(module, val, cfg.mask_ratio, device, amp, dist_info)
                entry["val_loss"] = v
                improved = state["best_val"] is None or v < state["best_val"]
                if improved:
                    state.update(best_val=v, best_epoch=entry["epoch"], bad_epochs=0)
                    save_best(entry["epoch"], v)
                elif steps_done >= n:
                    state["bad_epochs"] += 1
            state["history"].append(entry)
            checkpoint()
            dirty = False
            val_text = f", val {entry['val_loss']:.4f}" if entry["val_loss"] is not None else ""
            yield Progress(
                state["global_step"],
                total_steps,
                f"epoch {epoch_label:.3g}: train {mean_loss:.4f}{val_text}",
                {"kind": "epoch", **entry, "best": improved},
            )
            if cfg.patience and val and state["bad_epochs"] >= cfg.patience:
                stop_reason = "early stopping"
    except GeneratorExit:
        if dirty:
            checkpoint()
        raise
    stop_reason = stop_reason or "epochs"

    # -- the new model folder -----------------------------------------------------------------
    if val and best_weights:  # improved in this session: every process holds them
        module.load_state_dict(best_weights)
    elif val:  # improved in an earlier session: from the best folder rank 0 wrote
        if dist_info.world > 1:
            import torch.distributed as dist

            dist.barrier()
        best_sd, _ = read_state_dict(ckdir / "best" / WEIGHTS)
        module.load_state_dict(best_sd)
    history = state["history"]
    last = next((h for h in reversed(history) if h["train_loss"] is not None), None)
    metrics = {
        "val_loss_before": state["val_before"],
        "val_loss_best": state["best_val"],
        "val_loss_last": history[-1]["val_loss"] if history else None,
        "val_mean_fill": state["val_mean_fill"],
        "best_epoch": state["best_epoch"],
        "train_loss_last": last["train_loss"] if last else None,
        "epochs": state["epoch"] + state["step_in_epoch"] / spe,
        "steps": state["global_step"],
        "crops_seen": state["global_step"] * cfg.batch_size * dist_info.world,
        "seconds": round(float(state["elapsed"]), 1),
        "stopped": stop_reason,
        "device": str(device),
        "processes": dist_info.world,
        "precision": str(amp or "fp32").replace("torch.", ""),
        **counts,
    }
    meta = _model_metadata(cfg, inherited, source, metrics, history, device, dist_info.world)
    meta.update(metadata or {})
    if dist_info.main:
        from . import registry

        save_model(module, out, metadata=meta)
        if cfg.register:
            registry.register_model(out)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(out, ckdir, metrics, history, state["steps"], module, cfg)
