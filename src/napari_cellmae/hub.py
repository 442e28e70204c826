"""Load and save CellMAE model folders: ours, OpenPhenom snapshots, and Hugging Face repos.

Sources :func:`load_model` accepts:

- None or a bundled name (``registry.DEFAULT_MODEL`` = "cellmae-tiny"): a folder inside the package.
- A local folder in our format: ``config.json`` ({"format": "napari-cellmae", "architecture":
  CellMAEConfig fields, plus metadata such as "name", "best_block", "channel_names"}) and a real
  ``model.safetensors``.
- An OpenPhenom snapshot folder as downloaded from ``recursionpharma/OpenPhenom`` (recognised by
  the ``_target_`` sub-configs of its ``config.json``). Its ``model.safetensors`` is in fact a
  PyTorch zip pickle ``{"state_dict": ...}``; it is read with ``weights_only=True`` from an open
  file object (never executing pickled code). A real safetensors file or a bare state dict is
  accepted too.
- A Hugging Face repo id ("owner/name"): the newest snapshot already in the HF cache, else a
  download with ``huggingface_hub`` when it is installed and the machine is online.

Weights files are read in one pass (hashing as they are read for ``model.checksum``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import registry
from .inference import CellMAEModel, embedding_defaults
from .model import PRESETS, CellMAE, CellMAEConfig
from .store import file_sha256, write_bytes_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

FORMAT = "napari-cellmae"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
OPENPHENOM_PRESET = "cellmae_vit_small_patch16_256"
OPENPHENOM_PREFIX = "encoder.vit_backbone."
DECODER_PREFIXES = ("decoder.", "encoder_decoder_proj.", "decoder_pred.")
RXRX_CHANNELS = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
_RESERVED = {"format", "format_version", "architecture", "encoder_only", "weights_sha256"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# --------------------------------------------------------------------------------------------
# Reading weights
# --------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file whatever its real format; returns (state dict, sha256 of the file).

    Real safetensors, a PyTorch zip/legacy pickle holding ``{"state_dict": sd}`` or a bare state
    dict (loaded with ``weights_only=True``: no code is ever executed).
    """
    path = Path(path)
    checksum = file_sha256(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        try:
            # an open file object: torch >= 2.13 would send a *.safetensors path to safetensors
            with open(path, "rb") as f:
                obj = torch.load(f, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise ValueError(
                f"{path} is a PyTorch pickle that cannot be read safely ({exc}). Only plain "
                "tensors are accepted: re-save it as safetensors."
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            obj = load_safetensors(path.read_bytes())
        except SafetensorError as exc:
            raise ValueError(
                f"{path} is neither a safetensors file nor a PyTorch state dict ({exc}). "
                "Download the model folder again."
            ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return obj, checksum


def map_openphenom_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenPhenom checkpoint keys -> CellMAE keys: strip ``encoder.vit_backbone.``."""
    return {
        (k[len(OPENPHENOM_PREFIX) :] if k.startswith(OPENPHENOM_PREFIX) else k): v
        for k, v in state_dict.items()
    }


def _short(keys: list[str], limit: int = 12) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def build_module(
    config: CellMAEConfig, state_dict: dict[str, torch.Tensor], encoder_only: bool, where: str
) -> CellMAE:
    """A :class:`CellMAE` holding exactly ``state_dict``; ValueError lists any missing,
    unexpected or mis-shaped tensors."""
    if encoder_only:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
    with torch.device("meta"):  # no time spent initialising weights that are overwritten
        module = CellMAE(config, encoder_only=encoder_only)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(keys)}): {_short(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
            )
            if keys
        ]
        raise ValueError(
            f"The weights in {where} do not fit the model architecture; "
            + "; ".join(parts)
            + ". Check that config.json belongs to these weights (or download the folder again)."
        )
    # adopt the loaded tensors (float32 for computation; fp16/bf16 storage is allowed)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    module.reset_fixed_buffers()  # the non-stored ones are still on the meta device
    return module


# --------------------------------------------------------------------------------------------
# Finding the folder
# --------------------------------------------------------------------------------------------
def is_openphenom_config(cfg: dict[str, Any]) -> bool:
    """OpenPhenom's config.json is transformers-style with hydra ``_target_`` sub-configs."""
    return any(isinstance(v, dict) and "_target_" in v for v in cfg.values())


def _hub_hint(repo_id: str) -> str:
    target = registry.hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    return (
        f"Download it where there is internet (`huggingface-cli download {repo_id}`) and copy "
        f"the Hugging Face cache folder to {target}, or put the model folder anywhere and pass "
        "its path"
    )


def _download(repo_id: str) -> Path:
    """The local snapshot folder of a hub repo: from the cache, else downloaded."""
    cached = registry.hub_snapshot(repo_id)
    if cached is not None and (cached / WEIGHTS).is_file():
        return cached
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if offline:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and, as a Hugging Face repo, it is not "
            f"downloaded yet while HF_HUB_OFFLINE is set (offline). {_hub_hint(repo_id)}."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder; downloading it from Hugging Face needs the "
            "huggingface_hub package (pip install 'napari-cellmae[hub]'). Or: "
            f"{_hub_hint(repo_id)}."
        ) from None
    logger.info("downloading %s from Hugging Face into %s", repo_id, registry.hf_hub_cache())
    try:
        folder = snapshot_download(
            repo_id,
            cache_dir=str(registry.hf_hub_cache()),
            allow_patterns=["config.json", WEIGHTS, "*.md", "LICENSE*"],
        )
    except Exception as exc:  # network down, unknown or gated repo, ...
        raise FileNotFoundError(
            f"Could not download {repo_id!r} from Hugging Face ({type(exc).__name__}: {exc}). "
            f"Check the name and your connection (gated repos need `huggingface-cli login`). "
            f"Or: {_hub_hint(repo_id)}."
        ) from None
    return Path(folder)


def resolve_source(source: str | os.PathLike | None) -> tuple[Path, str]:
    """A model source -> (local folder, kind) with kind in bundled | folder | hub."""
    name = registry.DEFAULT_MODEL if source is None or str(source) == "" else str(source)
    bundled = registry.bundled_models()
    if name in bundled:
        return bundled[name], "bundled"
    path = Path(name).expanduser()
    if path.is_file() and path.parent.joinpath("config.json").is_file():
        path = path.parent  # a weights file inside a model folder
    if path.is_dir():
        return path, "folder"
    if name == registry.DEFAULT_MODEL or name.startswith("cellmae-"):
        raise FileNotFoundError(
            f"The bundled model {name!r} is missing from this installation (expected "
            f"{registry.BUNDLED_DIR / name} with config.json and {WEIGHTS}). Reinstall "
            "napari-cellmae, or pass a model folder: load_model('/path/to/model-folder') "
            "(ours or an OpenPhenom snapshot)."
        )
    if not path.exists() and path.parent != Path(".") and path.parent.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist (its folder {path.parent} does): check the file name, or "
            "pass the model folder"
        )
    if _HUB_ID.fullmatch(name) and not path.exists():
        return _download(name), "hub"
    raise FileNotFoundError(
        f"No model {name!r}: it is not a bundled model ({', '.join(bundled) or 'none installed'}), "
        "not an existing folder and not a Hugging Face repo id (owner/name). Pass a folder that "
        "holds config.json and model.safetensors."
    )


def _weights_file(source: str | os.PathLike | None, folder: Path) -> Path:
    """The weights to load from ``folder``: a weights file named as the source
    (``folder/other.bin``) is that file, never the folder's own ``model.safetensors``."""
    if source is not None:
        named = Path(source).expanduser()
        if named.is_file() and named.name != "config.json" and named.parent == folder:
            return named
    return folder / WEIGHTS


def _architecture(cfg: dict[str, Any], config_path: Path) -> CellMAEConfig:
    """The validated architecture of a napari-cellmae config.json (sizes in range, checked
    before anything is read or built: a depth of 10**6 or a zero size is refused at once)."""
    try:
        return CellMAEConfig.from_dict(cfg["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"no {exc} entry" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(
            f"{config_path} does not describe a usable model architecture ({detail}): the file "
            "is damaged or was edited; download or copy the model folder again."
        ) from None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def load_model(
    source: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    encoder_only: bool = False,
    precision: str | None = None,
) -> CellMAEModel:
    """Load a model for embedding and reconstruction.

    Parameters
    ----------
    source : str or path, optional
        None (the bundled default), a bundled name, a model folder (ours or an OpenPhenom
        snapshot) or a Hugging Face repo id such as "recursionpharma/OpenPhenom".
    device : str or torch.device, optional
        None/"auto" = cuda > mps > cpu.
    encoder_only : bool
        Skip the decoder tensors (embedding only; OpenPhenom's decoder is 87% of its weights).
    precision : {"auto", "fp32", "bf16", "fp16"}, optional
        Inference precision (see :class:`~napari_cellmae.inference.CellMAEModel`).

    Returns
    -------
    CellMAEModel
    """
    folder, kind = resolve_source(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: it is not a model folder. Pass the folder that holds "
            f"config.json and {WEIGHTS}."
        )
    try:
        cfg = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc}): download it again.") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path} holds no settings object: download the folder again.")
    architecture = None
    if cfg.get("format") == FORMAT and not is_openphenom_config(cfg):
        architecture = _architecture(cfg, config_path)  # before any weights are read
    weights = _weights_file(source, folder)
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has no {WEIGHTS}: the model folder is incomplete; download or copy it again."
        )
    source_str = str(source) if source is not None else registry.DEFAULT_MODEL
    state_dict, checksum = read_state_dict(weights)

    if is_openphenom_config(cfg):
        config = PRESETS[OPENPHENOM_PRESET]
        overrides = {
            "mask_ratio": float(cfg.get("mask_ratio", config.mask_ratio)),
            "fourier_loss_weight": float(cfg.get("fourier_loss_weight", 0.0)),
        }
        config = CellMAEConfig(**{**config.to_dict(), **overrides})
        module = build_module(config, map_openphenom_keys(state_dict), encoder_only, str(weights))
        attribution = registry.OPENPHENOM_ATTRIBUTION
        name = "OpenPhenom-S/16" if kind != "folder" else f"OpenPhenom-S/16 ({folder.name})"
        meta: dict[str, Any] = {"format": "openphenom"}
        pooling = "channelwise" if cfg.get("return_channelwise_embeddings") else "mean"
        model = CellMAEModel(
            module,
            device,
            precision,
            name=name,
            source=source_str,
            checksum=checksum,
            default_pooling=pooling,
            channel_names=list(RXRX_CHANNELS),
            attribution=attribution,
            metadata=meta,
        )
    elif cfg.get("format") == FORMAT:
        if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(
                f"{config_path} was written by a newer napari-cellmae (format version "
                f"{cfg['format_version']}): upgrade napari-cellmae."
            )
        expected_sha = cfg.get("weights_sha256")  # the checksum of the folder's own WEIGHTS
        if expected_sha and expected_sha != checksum and weights.name == WEIGHTS:
            raise ValueError(
                f"{weights} does not match the checksum in {config_path}: the file is corrupt or "
                "was replaced; copy the model folder again."
            )
        config = architecture
        saved_encoder_only = bool(cfg.get("encoder_only", False))
        module = build_module(config, state_dict, encoder_only or saved_encoder_only, str(weights))
        attribution = cfg.get("attribution") or registry.attribution_for(source_str)
        meta = {k: v for k, v in cfg.items() if k not in _RESERVED}
        model = CellMAEModel(
            module,
            device,
            precision,
            name=cfg.get("name") or folder.name,
            source=source_str,
            checksum=checksum,
            **embedding_defaults(cfg),
            channel_names=cfg.get("channel_names"),
            attribution=attribution,
            metadata=meta,
        )
    else:
        raise ValueError(
            f'{config_path} is neither a napari-cellmae config ("format": "{FORMAT}") nor an '
            'OpenPhenom one (with "_target_" sub-configs). Pass a folder written by '
            "save_model() or an OpenPhenom snapshot."
        )
    if model.attribution:
        logger.warning("%s", model.attribution)
    return model


def save_model(
    model: CellMAEModel | CellMAE,
    folder: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a model folder: ``config.json`` + ``model.safetensors`` + ``README.md`` (model card).

    Each file is written to a temporary name and renamed (a new folder appears only once
    complete; config.json, which pickers look for, is written last).

    Parameters
    ----------
    model : CellMAEModel or CellMAE
    folder : path
    metadata : dict, optional
        Stored at the top level of config.json: e.g. "name", "description", "best_block" (the
        default block for embedding), "channel_names", "default_pooling", "default_normalization"
        ("crop" or "plate", see :meth:`CellMAEModel.plate_reference`), "training" (anything
        JSON-serialisable), "attribution".
    dtype : torch.dtype or {"float16", "bfloat16", "float32"}, optional
        Storage dtype of the learned tensors (fixed position tables stay float32; computation is
        always float32 or autocast).
    """
    folder = Path(folder)
    module = model.module if isinstance(model, CellMAEModel) else model
    meta: dict[str, Any] = {}
    if isinstance(model, CellMAEModel):
        meta["name"] = model.name
        if model.attribution:
            meta["attribution"] = model.attribution
        if model.channel_names:
            meta["channel_names"] = model.channel_names
        if model.default_block is not None:
            meta["best_block"] = model.default_block
        if model.default_pooling != "mean":
            meta["default_pooling"] = model.default_pooling
        if model.default_normalization != "crop":
            meta["default_normalization"] = model.default_normalization
        meta["derived_from"] = {"source": model.source, "checksum": model.checksum}
    meta.update(metadata or {})
    clash = sorted(_RESERVED & set(meta))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved; rename them.")
    meta.setdefault("name", folder.name)

    if isinstance(dtype, str):
        dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}.")
        dtype = dtypes[dtype]
    tensors = {}
    learned = {name for name, _ in module.named_parameters()}  # fixed tables stay float32
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and k in learned:
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    from safetensors.torch import save as save_safetensors

    blob = save_safetensors(tensors, metadata={"format": "pt"})
    import hashlib

    checksum = hashlib.sha256(blob).hexdigest()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": module.config.to_dict(),
        "encoder_only": module.encoder_only,
        "weights_sha256": checksum,
        **meta,
    }

    fresh = not folder.exists()
    target = folder
    if fresh:  # build beside it, then one rename
        folder.parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_bytes_atomic(target / WEIGHTS, blob)
        write_text_atomic(target / "README.md", model_card(module, config))
        write_json_atomic(target / "config.json", config)
        if fresh:
            os.replace(target, folder)
    finally:
        if fresh and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    return folder


def model_card(module: CellMAE, config: dict[str, Any]) -> str:
    """The README.md written beside the weights."""
    cfg = module.config
    n_params = sum(p.numel() for p in module.parameters())
    decoder = (
        "none (encoder only)"
        if module.encoder_only
        else f"{cfg.decoder}, width {cfg.decoder_embed_dim}, depth {cfg.decoder_depth}, "
        + (
            f"exactly {cfg.decoder_channels} channels"
            if cfg.decoder_channels
            else f"any channel count 1..{cfg.max_channels}"
        )
    )
    lines = [
        f"# {config.get('name', 'CellMAE model')}",
        "",
        config.get(
            "description",
            "A channel-agnostic masked autoencoder for cell microscopy (napari-cellmae).",
        ),
        "",
        "| | |",
        "|---|---|",
        f"| encoder | ViT, width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
        f"patch {cfg.patch_size}, {cfg.img_size}×{cfg.img_size} crops, 1..{cfg.max_channels} "
        "channels |",
        f"| decoder | {decoder} |",
        f"| parameters | {n_params:,} |",
        f"| weights sha256 | `{config['weights_sha256']}` |",
    ]
    if config.get("best_block"):
        lines.append(f"| default embedding block | {config['best_block']} |")
    if config.get("default_pooling") or config.get("default_normalization"):
        lines.append(
            f"| default embedding | {config.get('default_pooling', 'mean')} pooling, "
            f"{config.get('default_normalization', 'crop')} normalisation |"
        )
    if config.get("channel_names"):
        lines.append(f"| channels | {', '.join(map(str, config['channel_names']))} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from napari_cellmae import load_model",
        "model = load_model('path/to/this/folder')",
        "emb = model.embed(images)  # (N, C, 256, 256) -> (N, D)",
        "```",
    ]
    if config.get("training"):
        lines += ["", "## Training", "", "```json", json.dumps(config["training"], indent=2), "```"]
    if config.get("attribution"):
        lines += ["", "## Attribution and licence", "", config["attribution"]]
    return "\n".join(lines) + "\n"
