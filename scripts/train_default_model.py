"""Train the bundled default model ``cellmae-tiny`` from scratch, with one command.

    python scripts/train_default_model.py --minutes 150            # -> src/napari_cellmae/models/
    python scripts/train_default_model.py --minutes 3 --out /tmp/smoke   # a smoke run

Data (see :func:`make_source`): realistic synthetic Cell-Painting-like fields made on the fly
(:func:`napari_cellmae.synthetic.make_field`: 1–6 stains, random phenotypes, strengths, densities,
plate/batch effects, 8- or 12-bit) plus the real images of ``--real-data`` (``../shared/data/real``)
except the fields held out for evaluation (:data:`HELD_OUT_WELLS` of the transfluor plate and the
whole speckles pair; ``benchmarks/eval_default_model.py`` measures on those). Transfluor well
:data:`VAL_WELLS` is the real part of the validation set (model selection), never trained on.

Recipe: ``cellmae_vit_tiny_patch16_256`` from random weights (seed ``--seed``), the project's own
training core (:func:`napari_cellmae.training.train`: 75% masking, AdamW, linear warm-up then
cosine over the time budget, bf16 autocast on CPUs that are fast at it, gradient clipping), the best
validation weights stored in float16 with a model card.

The run works in ``--work`` (default ``build/cellmae-tiny-train``: checkpoints, the full-precision
model); ``--resume`` continues it (pass a larger ``--minutes``: the total budget).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning made
# training steps 2-3x slower here (measured with 2 threads at load ~10).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PROJECT_ROOT / "src" / "napari_cellmae" / "models" / "cellmae-tiny"
DEFAULT_REAL = PROJECT_ROOT.parent / "shared" / "data" / "real"
DEFAULT_WORK = PROJECT_ROOT / "build" / "cellmae-tiny-train"

TRANSFLUOR = "transfluor-plate"
HELD_OUT_WELLS = tuple(f"O{c:02d}" for c in range(19, 25))  # evaluation only (18 fields)
VAL_WELLS = ("O18",)  # validation (model selection) only
HELD_OUT_FOLDERS = ("speckles",)  # evaluation only
CELL_PAINTING = 6  # the first 6 stains of synthetic.STAINS: DNA, ER, RNA, AGP, Mito, Golgi

# what the model card says about the real images (from ../shared/data/README.md)
REAL_SOURCES = {
    "ExampleHuman": "HT29 cells, 3 channels (Hoechst DNA, PH3, cell body), 1 field 512×512, "
    "8-bit. CC0; Moffat J et al. (2006) Cell 124(6):1283-98; from the CellProfiler examples "
    "collection (BSD-3).",
    "transfluor-plate": "SBS Roche Transfluor image set (Broad Bioimage Benchmark Collection "
    "BBBC016), 1 GFP channel, 512×512, 8-bit; via the CellProfiler examples collection (BSD-3).",
    "speckles": "Hoechst nuclei + γH2AX foci, 1000×1200, 12-bit in 16-bit TIFF; CellProfiler "
    "examples collection (BSD-3).",
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def synthetic_field(seed: np.random.SeedSequence, n_channels: int) -> np.ndarray:
    """One random synthetic field (C, H, W) with ``n_channels`` stains (GeneratorSource's make).

    5–6 channels: the Cell Painting stains in order; fewer: a random subset of all 11 stains.
    Random phenotype (40% controls, else one or two phenotypes at strength 0.3–1.5), density,
    plate/batch effect, size 512–768 px, 12-bit (80%) or 8-bit camera.
    """
    from napari_cellmae.synthetic import MAX_CHANNELS, PHENOTYPES, make_field

    rng = np.random.default_rng(seed.spawn(1)[0])
    if n_channels >= 5:
        stains = np.arange(n_channels)
    else:
        stains = np.sort(rng.choice(MAX_CHANNELS, n_channels, replace=False))
    names = list(PHENOTYPES)
    phenotype = None
    if rng.random() > 0.4:
        picks = rng.choice(len(names), 1 + int(rng.random() < 0.25), replace=False)
        phenotype = {names[i]: float(rng.uniform(0.3, 1.5)) for i in picks}
    size = int(rng.integers(512, 769))
    field = make_field(
        n_channels=int(stains.max()) + 1,
        size=(size, int(rng.integers(512, 769))),
        seed=seed,
        phenotype=phenotype,
        density=float(rng.lognormal(0.0, 0.35)),
        dtype=np.uint8 if rng.random() < 0.2 else np.uint16,
        batch=int(rng.integers(0, 1000)),
    )
    return field[stains]


def read_real(real: Path) -> dict[str, list[np.ndarray]]:
    """The real training and validation fields: {"example_human", "transfluor", "val"}."""
    from napari_cellmae.plates import list_fields, read_field, scan_plate

    if not real.is_dir():
        raise FileNotFoundError(
            f"Real images not found at {real}: pass --real-data (the shared/data/real folder)."
        )
    out: dict[str, list[np.ndarray]] = {"example_human": [], "transfluor": [], "val": []}
    index = scan_plate(real / "ExampleHuman")
    for row in list_fields(index).to_dict("records"):
        out["example_human"].append(
            read_field(index, well=row["Metadata_Well"], site=int(row["Metadata_Site"]))
        )
    index = scan_plate(real / TRANSFLUOR)
    for row in list_fields(index).to_dict("records"):
        well = row["Metadata_Well"]
        if well in HELD_OUT_WELLS:
            continue
        field = read_field(index, well=well, site=int(row["Metadata_Site"]))
        out["val" if well in VAL_WELLS else "transfluor"].append(field)
    return out


def make_source(
    real: Path, seed: int, synthetic_per_epoch: int, human_repeats: int, single: bool = False
):
    """Synthetic fields made on the fly + the real training fields (validation: synthetic fields
    with fixed seeds + the real :data:`VAL_WELLS`). ``single``: one channel per field (the
    warm-up stage: ExampleHuman's 3 channels become 3 fields)."""
    from napari_cellmae.training_data import ArraySource, ConcatSource, GeneratorSource

    fields = read_real(real)
    human = fields["example_human"]
    if single:
        human = [f[c : c + 1] for f in human for c in range(f.shape[0])]
    synthetic = GeneratorSource(
        synthetic_field,
        fields_per_epoch=synthetic_per_epoch,
        val_fields=8,
        # emphasise full Cell Painting fields (5–6 stains); batches also take random subsets
        n_channels=1 if single else (1, 2, 3, 3, 4, 5, 5, 6, 6, 6),
        seed=seed,
        name="synthetic Cell-Painting-like fields (napari_cellmae.synthetic.make_field)",
    )
    human_source = ArraySource(
        human, val_fields=[], repeats=human_repeats, name="real: ExampleHuman (HT29, 3 channels)"
    )
    transfluor = ArraySource(
        fields["transfluor"],
        val_fields=fields["val"],
        name=f"real: transfluor plate wells O01-O17 (validation {', '.join(VAL_WELLS)})",
    )
    return ConcatSource(synthetic, human_source, transfluor)


# --------------------------------------------------------------------------------------------
# The default embedding block
# --------------------------------------------------------------------------------------------
SELECTION_SCREEN_SEED = 1  # the evaluation screen of benchmarks/eval_default_model.py uses 0


POOLING_CHOICES = ("mean", "channelwise")
NORMALIZATIONS = ("crop", "plate")  # napari_cellmae.inference.NORMALIZATIONS


def block_scores(
    model, folder: Path, seed: int, size: int = 512
) -> dict[tuple[str, str, int], float]:
    """Replicate retrieval mAP (TVN on controls) of every encoder block's embedding, pooled each
    way of :data:`POOLING_CHOICES`, with each input normalisation of :data:`NORMALIZATIONS`
    ("plate": the pipeline's plate references), on a synthetic screen (written to ``folder``):
    {(normalisation, pooling, block (1-based)): mAP}."""
    import torch

    from napari_cellmae.embed import plate_references
    from napari_cellmae.inference import pool_tokens
    from napari_cellmae.model import standardize
    from napari_cellmae.plates import list_fields, read_field, scan_plate
    from napari_cellmae.profiling import evaluate
    from napari_cellmae.synthetic import make_screen

    platemap = make_screen(
        folder, n_plates=2, perturbations=24, replicates=2, controls=12, size=size, seed=seed
    )
    captured: list[torch.Tensor] = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, out: captured.append(out))
        for blk in model.module.blocks
    ]
    rows: list[dict] = []
    vectors: dict[tuple[str, str], list] = {
        (n, p): [] for n in NORMALIZATIONS for p in POOLING_CHOICES
    }
    try:
        for plate in sorted(platemap["Metadata_Plate"].unique()):
            index = scan_plate(folder / plate)
            refs = plate_references(model, [index])
            for r in list_fields(index).to_dict("records"):
                field = read_field(index, well=r["Metadata_Well"], site=int(r["Metadata_Site"]))
                crops = torch.from_numpy(model.field_crops(field)[0].astype(np.float32))
                c = crops.shape[1]
                for norm in NORMALIZATIONS:
                    ref = torch.from_numpy(refs[plate][None]) if norm == "plate" else None
                    captured.clear()
                    with torch.inference_mode(), model._autocast():
                        model.module.forward_features(standardize(crops, reference=ref)[0])
                    for pooling in POOLING_CHOICES:
                        vectors[(norm, pooling)].append(
                            [pool_tokens(t.float(), c, pooling).mean(0) for t in captured]
                        )
                rows.append({k: r[k] for k in ("Metadata_Plate", "Metadata_Well")})
    finally:
        for h in hooks:
            h.remove()
    import pandas as pd

    meta = pd.DataFrame(rows).merge(platemap, on=["Metadata_Plate", "Metadata_Well"])
    scores = {}
    for (norm, pooling), out in vectors.items():
        per_block = np.stack([[t.numpy() for t in w] for w in out], axis=1)  # (blocks, wells, D)
        for b in range(len(per_block)):
            x = per_block[b].astype(np.float64)
            scores[(norm, pooling, b + 1)] = evaluate(x, meta, "tvn").metrics["replicate_map"]
    return scores


def select_block(folder: Path) -> dict[str, object]:
    """Pick the default embedding normalisation, block and pooling of the model in ``folder`` on
    a selection screen (seed :data:`SELECTION_SCREEN_SEED`, not the evaluation screen) and store
    them in its config.json. Ties (to 3 decimals) go to "crop" normalisation, then "mean"
    pooling, then to the later block."""
    import tempfile

    from napari_cellmae.hub import load_model
    from napari_cellmae.store import write_json_atomic

    model = load_model(str(folder), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        scores = block_scores(model, Path(tmp), SELECTION_SCREEN_SEED)
    norm, pooling, best = max(
        scores, key=lambda k: (round(scores[k], 3), k[0] == "crop", k[1] == "mean", k[2])
    )
    config = json.loads((folder / "config.json").read_text())
    config["best_block"] = int(best)
    config["default_pooling"] = pooling
    config["default_normalization"] = norm
    config["block_selection"] = {
        "criterion": "replicate retrieval mAP, TVN on controls",
        "screen": f"synthetic, seed {SELECTION_SCREEN_SEED}, 2 plates × 60 wells, 5 stains, 512²",
        "map_by_block": {f"{n} {p} {b}": round(v, 4) for (n, p, b), v in scores.items()},
    }
    write_json_atomic(folder / "config.json", config)
    return config["block_selection"] | {
        "best_block": best,
        "default_pooling": pooling,
        "default_normalization": norm,
    }


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------
EVAL_START, EVAL_END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def model_card(config: dict, evaluation: str | None = None) -> str:
    """The bundled model's README.md (``evaluation``: the Markdown the eval script writes)."""
    tr = config["training"]
    m, rec, comp = tr["metrics"], tr["recipe"], tr["compute"]
    arch = config["architecture"]
    evaluation = evaluation or (
        "Not measured yet: run `python benchmarks/eval_default_model.py --write-card`."
    )
    sources = "\n".join(f"  - **{k}**: {v}" for k, v in REAL_SOURCES.items())
    return f"""# cellmae-tiny

The default model of napari-cellmae: a small channel-agnostic masked autoencoder (MAE) for
cell microscopy, trained from scratch by napari-cellmae's own training routine, shipped inside the
package (no download, works offline). It takes 256×256 crops with any number of channels (1–11),
in any order, and gives embeddings and masked reconstructions.

| | |
|---|---|
| architecture | `cellmae_vit_tiny_patch16_256`: ViT encoder width {arch["embed_dim"]}, depth \
{arch["depth"]}, {arch["num_heads"]} heads, 16×16 patches, one token per patch per channel; \
channel-agnostic decoder width {arch["decoder_embed_dim"]}, depth {arch["decoder_depth"]} |
| parameters | {m["parameters"]:,} (stored in float16: {config.get("_size_mb", "?")} MB) |
| weights sha256 | `{config["weights_sha256"]}` |
| licence | BSD-3-Clause (as napari-cellmae) |

## Intended use

Offline first look at microscopy screens in napari / the `cellmae` CLI: masked-reconstruction
previews, per-patch anomaly (error) maps, embeddings for profiling, QC and as the starting point
for fine-tuning on your own plates (`cellmae finetune`). It is a small model trained for \
{_total(tr, "seconds") / 60:.0f} minutes on {comp["cpu_cores"]} CPU cores; for the best phenotypic \
profiles of Cell Painting screens use a large model (OpenPhenom, downloaded by you) or fine-tune \
this one on your data.

## Limits

- Trained mostly on *synthetic* fields; the only real images are 1 HT29 field and 51 fields of one
  GFP channel (below). Expect it to reconstruct textures and cell outlines roughly (blurry at 75%
  masking) and to be weaker on stains, magnifications and modalities it never saw (brightfield,
  phase contrast, tissue, 3-D).
- 256×256 crops at 16-px patches; larger fields are tiled. Channel identity is inferred from
  content (no channel names): two fully hidden channels get the same prediction.
- Its embeddings do not separate the synthetic perturbation phenotypes better than simple
  per-channel intensity/texture statistics (Evaluation below): with plate normalisation (its
  default) it relates perturbations of the same mechanism more often than the statistics do,
  but retrieves replicates and nearest mechanisms less well; each crop standardised by itself
  it is weaker still (intensity changes are invisible then). The per-group table under
  Evaluation shows which phenotypes it mistakes for the controls or for each other. An hour of
  CPU training is little: profile with both (`cellmae profile` reports the baseline next to the
  model) or use a larger model.
- Not a diagnostic tool; embeddings are not validated for any clinical use.

## Data

- Synthetic: {_synthetic_line(tr["data"])}
- Real images (`../shared/data/real`), in place, never redistributed:
{sources}
- Trained on: ExampleHuman (the whole field, ×{_human_repeats(tr["data"])} per epoch) and the \
transfluor wells O01–O17 (51 fields). Validation (model selection): 8 fixed synthetic fields + \
transfluor well {", ".join(VAL_WELLS)} (3 fields). **Held out for evaluation, never seen:** \
transfluor wells {HELD_OUT_WELLS[0]}–{HELD_OUT_WELLS[-1]} (18 fields) and the speckles pair.

## Recipe

`python scripts/train_default_model.py --minutes {tr["budget_minutes"]:g} --seed {rec["seed"]}` \
(napari_cellmae.training.train), from random weights, in two stages. {_stage1_line(tr)}\
Stage 2, the full mix: {rec["optimizer"]} lr {rec["lr"]:g} (betas {tuple(rec["betas"])}, weight \
decay {rec["weight_decay"]}), linear warm-up over {rec["warmup_fraction"]:.0%} of the stage then \
cosine to {rec["min_lr_fraction"]:g}×. Both stages: mask ratio {rec["mask_ratio"]}, gradient clip \
{rec["grad_clip"]}, batch {rec["batch_size"]} crops of one channel count, \
{rec["crops_per_field"]} random 256×256 crops per field per epoch, augmentation: 8 \
flips/rotations, per-channel gamma jitter (σ={rec["intensity_jitter"]}), random channel subsets in \
{rec["channel_subset_prob"]:.0%} of batches; loss: MSE of the hidden patches in per-image, \
per-channel standardised units. Stored weights: the best validation epoch of stage 2 \
({m["best_epoch"]:.1f}), float16. Default embedding block: {_block_line(config)}.

## Compute

{comp["cpu"]} ({comp["cpu_cores"]} cores, {comp["torch_threads"]} torch threads, shared with other \
work: load average {comp["load_start"]} at the start, {comp["load_end"]} at the end), \
{m["precision"]} autocast, torch {comp["torch"]}. Training time \
{_total(tr, "seconds") / 60:.1f} min (wall clock of the script {comp["wall_minutes"]:.1f} min), \
{_total(tr, "steps"):,} steps, {_total(tr, "crops_seen"):,} crops seen.

## Training curve

Validation masked-patch MSE of stage 2 (standardised units, fixed masks; 8 synthetic fields + \
transfluor well {", ".join(VAL_WELLS)}): {m["val_loss_before"]:.4f} at its start -> \
{m["val_loss_best"]:.4f} (mean-fill baseline {m["val_mean_fill"]:.4f}). Last training loss \
{m["train_loss_last"]:.4f}.

## Evaluation

{EVAL_START}
{evaluation}
{EVAL_END}

## Use

```python
from napari_cellmae import load_model
model = load_model()              # this model (bundled, offline)
emb = model.embed(images)         # (N, C, 256, 256) -> {_embed_shape(config)}
vec = model.embed_field(field)    # (C, H, W), any size: mean over its 256×256 crops
rec = model.reconstruct(images, mask_ratio=0.75, seed=0)
```
{_normalization_use(config)}"""


def _normalization_use(config: dict) -> str:
    if config.get("default_normalization") != "plate":
        return ""
    return """
Its default input normalisation is **plate**: `embed_field` and `cellmae embed` standardise every \
crop of a plate by the plate's typical crop mean and standard deviation per channel \
(`model.plate_reference(fields)`; the pipeline takes it from up to 24 fields of each plate and \
saves it in the run's `config.json`), so that a brighter stain or more cells stay visible to the \
model. `model.embed(crops)` and reconstruction standardise each crop by itself (the training \
input) unless given `reference=`; `normalization="crop"` / `--normalization crop` does that for \
whole plates.
"""


def _embed_shape(config: dict) -> str:
    d = config["architecture"]["embed_dim"]
    if config.get("default_pooling") == "channelwise":
        return f"(N, C·{d}), per-channel means; pooling='mean' gives (N, {d})"
    return f"(N, {d})"


def _stage1_line(tr: dict) -> str:
    st = tr.get("stage1")
    if not st:
        return ""
    m = st["metrics"]
    return (
        f"Stage 1, the warm-up ({st['minutes']:g} min, {m['steps']:,} steps): {st['data']}, lr "
        f"{st['lr']}; a from-scratch MAE first sits on the predict-the-mean plateau (loss 1.0) "
        "until the decoder learns to look at neighbouring patches, and single-channel steps "
        "are cheap (validation loss "
        f"{m['val_loss_before']:.3f} -> {m['val_loss_best']:.3f}). "
    )


def _total(tr: dict, key: str) -> float:
    st = tr.get("stage1")
    return tr["metrics"][key] + (st["metrics"][key] if st else 0)


def _block_line(config: dict) -> str:
    sel = config.get("block_selection")
    if not sel:
        return "the last"
    scores = ", ".join(f"{b}: {v:.3f}" for b, v in sel["map_by_block"].items())
    pooling = config.get("default_pooling", "mean")
    norm = config.get("default_normalization", "crop")
    return (
        f"{config['best_block']} of {config['architecture']['depth']} ({pooling} pooling, {norm} "
        f"normalisation), chosen by {sel['criterion']} on a separate {sel['screen']} screen (mAP "
        f"by normalisation, pooling and block: {scores})"
    )


def _synthetic_line(data: dict) -> str:
    part = next(p for p in data["parts"] if "synthetic" in str(p.get("kind")))
    return (
        f"{part['fields_per_epoch']} new fields per epoch, 512–768 px, 1–6 stains (5–6: the Cell "
        "Painting stains DNA, ER, RNA, AGP, Mito, Golgi; fewer: random stains of 11), 40% "
        "controls, else 1–2 of the 9 phenotypes at strength 0.3–1.5, random density, a random "
        "plate/batch effect (gains, offsets, illumination), 12- or 8-bit camera noise."
    )


def _human_repeats(data: dict) -> int:
    part = next(p for p in data["parts"] if "ExampleHuman" in str(p.get("kind")))
    return int(part.get("repeats", 1))


def write_card(folder: Path, evaluation: str | None = None) -> None:
    """(Re)write ``folder``/README.md from its config.json (keeping the evaluation section)."""
    from napari_cellmae.store import write_text_atomic

    config = json.loads((folder / "config.json").read_text())
    config["_size_mb"] = f"{(folder / 'model.safetensors').stat().st_size / 1e6:.1f}"
    if evaluation is None and (folder / "README.md").is_file():
        old = (folder / "README.md").read_text()
        if EVAL_START in old and EVAL_END in old:
            kept = old.split(EVAL_START, 1)[1].split(EVAL_END, 1)[0].strip()
            evaluation = kept if not kept.startswith("Not measured") else None
    write_text_atomic(folder / "README.md", model_card(config, evaluation))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="training time budget (total)")
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=15,
        help="of which the single-channel warm-up stage (0: none)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the model folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and masks")
    p.add_argument("--real-data", type=Path, default=DEFAULT_REAL, help="shared/data/real folder")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and the fp32 model")
    p.add_argument("--resume", action="store_true", help="continue the run in --work")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--epoch-fields", type=int, default=64, help="synthetic fields per epoch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--select-only",
        action="store_true",
        help="only choose the default embedding block of the model in --out (and rewrite its card)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from napari_cellmae.hub import load_model, save_model
    from napari_cellmae.progress import run
    from napari_cellmae.training import TrainConfig, train

    if args.select_only:
        print(f"default block: {select_block(args.out)}")
        write_card(args.out)
        return 0
    t_start = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    human_repeats = 8
    args.work.mkdir(parents=True, exist_ok=True)
    common = {
        "mask_ratio": 0.75,
        "fourier_weight": 0.0,
        "optimizer": "adamw",
        "lr": args.lr,
        "weight_decay": 0.05,
        "betas": (0.9, 0.95),
        "grad_clip": 1.0,
        "batch_size": args.batch_size,
        "crops_per_field": 16,
        "intensity_jitter": 0.2,
        "channel_subset_prob": 0.5,
        "epochs": 10_000,  # the time budget ends each stage
        "patience": None,
        "val_crops": 48,
        "precision": "auto",
        "device": args.device,
        "seed": args.seed,
        "register": False,
    }

    def show(p) -> None:
        payload = p.payload or {}
        kind = payload.get("kind")
        if kind == "step" and p.done % 10:
            return
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        if kind == "step":
            print(
                f"[{stamp}] step {p.done}/~{p.total} loss {payload['train_loss']:.4f} "
                f"lr {payload['lr']:.2e} load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        else:
            print(f"[{stamp}] {p.message} {json.dumps(payload, default=str)}", flush=True)

    # Stage 1, the warm-up: one channel per crop at a constant learning rate. A from-scratch MAE
    # first sits on the "predict the mean" plateau (loss 1.0) until the decoder's attention learns
    # to look at neighbouring patches; single-channel steps are ~4x cheaper, so it gets there in
    # minutes (on the full mix at batch 8 it was still stuck after 1,150 steps / 12 min).
    stage1 = args.work / "stage1"
    stage1_metrics = None
    if args.warmup_minutes > 0:
        if not (stage1 / "config.json").is_file():
            cfg1 = TrainConfig(
                out=str(stage1),
                checkpoint_dir=str(args.work / "stage1-checkpoints"),
                from_scratch="cellmae_vit_tiny_patch16_256",
                warmup_fraction=0.05,
                min_lr_fraction=1.0,  # constant after the warm-up
                minutes=args.warmup_minutes,
                resume=args.resume and (args.work / "stage1-checkpoints" / "last.pt").is_file(),
                name="cellmae-tiny stage 1",
                **common,
            )
            print(f"stage 1: {args.warmup_minutes:g} min, single-channel crops", flush=True)
            single = make_source(args.real_data, args.seed, args.epoch_fields, 2, single=True)
            stage1_metrics = run(train(cfg1, single), progress=show).metrics
        else:
            stage1_metrics = json.loads((stage1 / "config.json").read_text())["training"]["metrics"]

    # Stage 2: the full mix (1–6 channels, real + synthetic), warm-up then cosine to the end.
    source = make_source(args.real_data, args.seed, args.epoch_fields, human_repeats)
    start = (
        {"source": str(stage1)}
        if args.warmup_minutes > 0
        else {"from_scratch": "cellmae_vit_tiny_patch16_256"}
    )
    cfg = TrainConfig(
        out=str(args.work / "model"),
        checkpoint_dir=str(args.work / "checkpoints"),
        warmup_fraction=0.02,
        min_lr_fraction=0.02,
        minutes=args.minutes - args.warmup_minutes,
        resume=args.resume and (args.work / "checkpoints" / "last.pt").is_file(),
        name="cellmae-tiny",
        **start,
        **common,
    )
    print(f"stage 2: {cfg.minutes:g} min, the full mix", flush=True)
    result = run(train(cfg, source), progress=show)

    # the bundled folder: the best weights in float16 and the model card
    module = result.module.cpu().float()
    comp = {
        **machine(),
        "load_start": load_start,
        "load_end": round(os.getloadavg()[0], 2),
        "wall_minutes": round((time.monotonic() - t_start) / 60, 1),
    }
    trained = json.loads((result.folder / "config.json").read_text())["training"]
    trained["compute"].update(comp)
    trained["budget_minutes"] = args.minutes
    trained["start"] = {"from_scratch": "cellmae_vit_tiny_patch16_256", "seed": args.seed}
    if stage1_metrics is not None:
        trained["stage1"] = {
            "minutes": args.warmup_minutes,
            "data": "single-channel crops: synthetic fields of one random stain, the transfluor "
            "training wells, ExampleHuman's 3 channels as 3 fields",
            "lr": f"{args.lr:g} constant after a linear warm-up over 5%",
            "metrics": stage1_metrics,
        }
    trained["held_out"] = {
        "transfluor_wells": list(HELD_OUT_WELLS),
        "folders": list(HELD_OUT_FOLDERS),
        "validation_wells": list(VAL_WELLS),
    }
    trained["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    meta = {
        "name": "cellmae-tiny",
        "description": "The bundled default model of napari-cellmae (see README.md).",
        "training": trained,
        "license": "BSD-3-Clause",
        "real_data_sources": REAL_SOURCES,
    }
    staging = args.out.parent / f".{args.out.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    save_model(module, staging, metadata=meta, dtype="float16")
    print(f"default block: {select_block(staging)}", flush=True)
    write_card(staging)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    args.out.chmod(0o755)  # mkdtemp made it private; a package folder is world-readable
    for f in args.out.iterdir():
        f.chmod(0o644)
    model = load_model(str(args.out), device="cpu")  # it loads
    size = (args.out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, sha256 {model.checksum[:12]}…)")
    print(json.dumps(result.metrics, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
