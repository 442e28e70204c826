"""Quality and speed of the bundled default model (``cellmae-tiny``), on data it never saw.

1. Masked reconstruction at 75% masking on the HELD-OUT real fields (transfluor wells O19–O24,
   18 fields, and the speckles pair; see ``scripts/train_default_model.py``), several mask seeds:
   MSE over the hidden patches in standardised units (each crop and channel standardised to zero
   mean and unit variance, the model's own space) for
   - the model,
   - mean fill: every hidden patch ← the mean of the channel's visible pixels in that crop,
   - harmonic interpolation: the hidden pixels solve Laplace's equation with the visible pixels as
     boundary values (the smoothest fill from the visible neighbours; reflecting crop borders).
   The same on held-out synthetic 5-stain fields (seeds no training field used).
2. Embeddings on a synthetic screen (:func:`napari_cellmae.synthetic.make_screen`, written to a
   temporary folder and read back): replicate retrieval mAP, mechanism recall and leave-one-plate-
   out mechanism accuracy (1-nearest neighbour, cosine) after TVN alignment on controls, against
   the pixel-statistics baseline of :mod:`napari_cellmae.features` (PCA of per-channel intensity /
   texture statistics, as ``cellmae profile`` reports it); the model with its default input
   normalisation and with the other one ("crop" / "plate", the pipeline's plate references);
   with ``--random-init`` also the same architecture at random weights (what training added).
3. Speed: ``embed_field`` of a 1080×1080 5-channel field in bf16 and fp32 (median of runs).

    python benchmarks/eval_default_model.py                                  # everything
    python benchmarks/eval_default_model.py --figure docs/images/bundled-model-reconstructions.png
    python benchmarks/eval_default_model.py --write-card   # + the model card's evaluation section
    python benchmarks/eval_default_model.py --skip recon speed --random-init   # + random weights

Prints the figures and ratios; ``--json`` saves them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: idle threads sleep

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "scripts"))

from train_default_model import (  # noqa: E402
    DEFAULT_REAL,
    HELD_OUT_WELLS,
    TRANSFLUOR,
    machine,
)

MASK_RATIO = 0.75
RANDOM_INIT = "random_init"  # the results key of the random-weights control (--random-init)


# --------------------------------------------------------------------------------------------
# Held-out data
# --------------------------------------------------------------------------------------------
def held_out_real(real: Path) -> dict[str, list[np.ndarray]]:
    """{"transfluor (O19–O24)": 18 fields (1, 512, 512), "speckles": [(2, 1000, 1200)]}."""
    import tifffile

    from napari_cellmae.plates import list_fields, read_field, scan_plate

    index = scan_plate(real / TRANSFLUOR)
    table = list_fields(index)
    transfluor = [
        read_field(index, well=r["Metadata_Well"], site=int(r["Metadata_Site"]))
        for r in table.to_dict("records")
        if r["Metadata_Well"] in HELD_OUT_WELLS
    ]
    speckles = np.stack(
        [tifffile.imread(real / "speckles" / f"1-162hr{c}2.tif") for c in ("hoe", "h2ax")]
    )
    return {
        f"transfluor {HELD_OUT_WELLS[0]}–{HELD_OUT_WELLS[-1]} (GFP)": transfluor,
        "speckles (Hoechst + γH2AX)": [speckles],
    }


def held_out_synthetic(n: int = 4, size: int = 512) -> list[np.ndarray]:
    """5-stain synthetic fields from integer seeds 900_000+ (training used SeedSequences of
    (seed, part, epoch, k)), half with a phenotype."""
    from napari_cellmae.synthetic import PHENOTYPES, make_field

    names = list(PHENOTYPES)
    return [
        make_field(5, size, seed=900_000 + i, phenotype=names[i] if i % 2 else None, batch=i)
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# Reconstruction quality
# --------------------------------------------------------------------------------------------
def _grid_laplacian(n: int):
    """Graph Laplacian (D − A) of the n×n 4-neighbour pixel grid (reflecting borders)."""
    import scipy.sparse as sp

    idx = np.arange(n * n).reshape(n, n)
    a = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    b = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    adj = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n * n, n * n))
    adj = (adj + adj.T).tocsr()
    return (sp.diags(np.asarray(adj.sum(1)).ravel()) - adj).tocsr()


_LAPLACIANS: dict[int, object] = {}


def harmonic_fill(image: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Fill the ``hidden`` pixels of ``image`` (H, W), H = W, with the harmonic interpolant of the
    visible ones (discrete Laplace equation, visible pixels as Dirichlet values)."""
    import scipy.sparse.linalg as spl

    n = image.shape[0]
    lap = _LAPLACIANS.setdefault(n, _grid_laplacian(n))
    h = np.flatnonzero(hidden.ravel())
    v = np.flatnonzero(~hidden.ravel())
    out = image.astype(np.float64).ravel().copy()
    if len(h) == 0 or len(v) == 0:
        out[h] = out[v].mean() if len(v) else 0.0
        return out.reshape(image.shape)
    rows = lap[h]
    out[h] = spl.spsolve(rows[:, h].tocsc(), -(rows[:, v] @ out[v]), permc_spec="COLAMD")
    return out.reshape(image.shape)


def reconstruction_errors(model, fields: list[np.ndarray], seeds: int) -> dict[str, float]:
    """Masked-patch MSE (standardised units) of the model, mean fill and harmonic fill, pooled
    over every hidden patch of every crop of ``fields`` and ``seeds`` masks."""
    import torch

    from napari_cellmae.model import standardize

    p = model.patch_size
    sums = {"model": 0.0, "mean_fill": 0.0, "harmonic": 0.0}
    count = 0
    for f, field in enumerate(fields):
        crops, _ = model.field_crops(field)
        x, _, _ = standardize(torch.from_numpy(np.ascontiguousarray(crops)), model.config.input_eps)
        x = x.numpy().astype(np.float64)  # (n, C, 256, 256)
        for s in range(seeds):
            rec = model.reconstruct(crops, mask_ratio=MASK_RATIO, seed=10_000 * s + f)
            hidden_px = rec.mask.repeat(p, axis=-2).repeat(p, axis=-1)  # (n, C, 256, 256)
            sums["model"] += float(rec.error[rec.mask].sum()) * p * p
            for i in range(len(crops)):
                for c in range(crops.shape[1]):
                    hid = hidden_px[i, c]
                    if not hid.any():
                        continue
                    img = x[i, c]
                    mean = img[~hid].mean() if (~hid).any() else 0.0
                    sums["mean_fill"] += float(((img[hid] - mean) ** 2).sum())
                    filled = harmonic_fill(img, hid)
                    sums["harmonic"] += float(((img[hid] - filled[hid]) ** 2).sum())
            count += int(hidden_px.sum())
    out = {k: v / count for k, v in sums.items()}
    out["hidden_pixels"] = count
    out["model/mean_fill"] = out["model"] / out["mean_fill"]
    out["model/harmonic"] = out["model"] / out["harmonic"]
    out["harmonic/mean_fill"] = out["harmonic"] / out["mean_fill"]
    return out


# --------------------------------------------------------------------------------------------
# Embeddings on a synthetic screen
# --------------------------------------------------------------------------------------------
def screen_profiles(model, folder: Path, seed: int, size: int, others: dict | None = None) -> tuple:
    """Write a synthetic screen; return (meta, {normalisation: model embeddings}, baseline
    statistics) per well. Both input normalisations are embedded; "plate" uses the references
    the pipeline computes (:func:`napari_cellmae.embed.plate_references`). Each model of
    ``others`` ({name: model}) is embedded too, with its own default normalisation, under its
    name."""
    import pandas as pd

    from napari_cellmae.embed import plate_references
    from napari_cellmae.features import field_features
    from napari_cellmae.plates import list_fields, read_field, scan_plate
    from napari_cellmae.synthetic import make_screen

    platemap = make_screen(
        folder,
        # the screen of benchmarks/bench_profile.py's defaults: 3 plates × 84 wells
        n_plates=3,
        perturbations=24,
        replicates=3,
        controls=12,
        sites=1,
        n_channels=5,
        size=size,
        seed=seed,
    )
    rows, feats = [], []
    others = others or {}
    emb: dict[str, list] = {"plate": [], "crop": [], **{name: [] for name in others}}
    for plate in sorted(platemap["Metadata_Plate"].unique()):
        index = scan_plate(folder / plate)
        ref = plate_references(model, [index])[plate]
        for r in list_fields(index).to_dict("records"):
            field = read_field(index, well=r["Metadata_Well"], site=int(r["Metadata_Site"]))
            rows.append(
                {"Metadata_Plate": r["Metadata_Plate"], "Metadata_Well": r["Metadata_Well"]}
            )
            emb["plate"].append(model.embed_field(field, reference=ref))
            emb["crop"].append(model.embed_field(field, normalization="crop"))
            for name, other in others.items():
                # "crop" ignores the plate reference
                emb[name].append(
                    other.embed_field(
                        field, normalization=other.default_normalization, reference=ref
                    )
                )
            feats.append(field_features(field))
    meta = pd.DataFrame(rows).merge(platemap, on=["Metadata_Plate", "Metadata_Well"], how="left")
    return meta, {k: np.stack(v) for k, v in emb.items()}, np.stack(feats)


def one_nn_labels(x: np.ndarray, labels: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """The label of each well's nearest (cosine) well on another plate."""
    from napari_cellmae.profiling import cosine_similarity

    sim = cosine_similarity(x)
    nearest = []
    for i in range(len(x)):
        other = plates != plates[i]
        nearest.append(np.flatnonzero(other)[np.argmax(sim[i, other])])
    return labels[np.asarray(nearest)]


def by_mechanism(meta, mechanism: np.ndarray, predicted: dict[str, np.ndarray]) -> list[dict]:
    """Leave-one-plate-out 1-NN accuracy per mechanism group (controls excluded), for each set
    of nearest-well labels in ``predicted`` (:func:`one_nn_labels`), with the group's phenotype
    and the label it is most often mistaken for: where a model loses to the baseline, and to
    what."""
    phenotype = meta.groupby("Metadata_Mechanism")["Metadata_Phenotype"].first()
    rows = []
    for mech in sorted(set(mechanism) - {"control"}):
        wells = mechanism == mech
        row: dict = {
            "mechanism": mech,
            # the group's shared phenotype: names only (each member has its own weights)
            "phenotype": " + ".join(
                part.split("=")[0] for part in str(phenotype[mech]).split(";") if part
            ),
            "wells": int(wells.sum()),
        }
        for name, pred in predicted.items():
            row[name] = float(np.mean(pred[wells] == mech))
            wrong = pred[wells][pred[wells] != mech]
            labels, counts = np.unique(wrong, return_counts=True)
            row[f"{name}_confused_with"] = str(labels[np.argmax(counts)]) if len(wrong) else ""
        rows.append(row)
    return rows


def random_init(model, seed: int = 0):
    """The same architecture with random weights (what training from scratch starts from),
    embedding the way ``model`` does (default block, pooling, normalisation): the control that
    shows what training added to the embeddings."""
    import torch

    from napari_cellmae.inference import CellMAEModel
    from napari_cellmae.model import create_model

    torch.manual_seed(seed)
    return CellMAEModel(
        create_model(model.config),
        "cpu",
        model.precision,
        name=f"{model.name} architecture, random weights (seed {seed})",
        default_block=model.default_block,
        default_pooling=model.default_pooling,
        default_normalization=model.default_normalization,
    )


def embedding_quality(
    model, seed: int, size: int, with_random_init: bool = False
) -> dict[str, dict[str, float]]:
    from napari_cellmae.profiling import baseline_pca, evaluate, pairs_from_column

    others = {RANDOM_INIT: random_init(model)} if with_random_init else {}
    with tempfile.TemporaryDirectory() as tmp:
        meta, emb, feats = screen_profiles(model, Path(tmp), seed, size, others)
    pairs = pairs_from_column(meta, "Metadata_Mechanism")
    mechanism = np.where(
        meta["Metadata_IsControl"].to_numpy(bool),
        "control",
        meta["Metadata_Mechanism"].astype(str).to_numpy(),
    )
    plates = meta["Metadata_Plate"].to_numpy()
    out: dict = {}
    nearest = {}
    default = model.default_normalization
    other = "crop" if default == "plate" else "plate"
    base = baseline_pca(feats, emb[default].shape[1])
    for name, x in (
        ("model", emb[default].astype(np.float64)),
        (f"model_{other}", emb[other].astype(np.float64)),
        ("baseline", base),
        *((name, emb[name].astype(np.float64)) for name in others),
    ):
        ev = evaluate(x, meta, "tvn", "Metadata_Plate", pairs, n_null=1000, seed=0)
        nearest[name] = one_nn_labels(ev.aligned, mechanism, plates)
        out[name] = {
            "replicate_map": ev.metrics["replicate_map"],
            "replicate_map_chance": ev.metrics["replicate_map_chance"],
            "replicate_consistency": ev.metrics["replicate_consistency"],
            "mechanism_recall": ev.metrics["relationship_recall"],
            "mechanism_1nn_accuracy": float(np.mean(nearest[name] == mechanism)),
        }
    out["by_mechanism"] = by_mechanism(
        meta, mechanism, {k: nearest[k] for k in ("model", "baseline", *others)}
    )
    out["screen"] = {
        "wells": len(meta),
        "plates": int(meta["Metadata_Plate"].nunique()),
        "perturbations": int(
            meta.loc[~meta["Metadata_IsControl"], "Metadata_Perturbation"].nunique()
        ),
        "mechanisms": int(meta.loc[~meta["Metadata_IsControl"], "Metadata_Mechanism"].nunique()),
        "field_px": size,
        "baseline_features": int(feats.shape[1]),
        "block": model.default_block or model.depth,
        "pooling": model.default_pooling,
        "normalization": default,
        "other_normalization": other,
    }
    return out


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------
def embed_speed(source: str | None, runs: int) -> dict[str, float]:
    """Median seconds of ``embed_field`` on a 1080×1080 5-channel 12-bit field, bf16 and fp32."""
    from napari_cellmae.hub import load_model
    from napari_cellmae.synthetic import make_field

    field = make_field(5, 1080, seed=1)
    out: dict[str, float] = {"load_before": round(os.getloadavg()[0], 2)}
    for precision in ("bf16", "fp32"):
        model = load_model(source, device="cpu", precision=precision)
        model.embed_field(field)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model.embed_field(field)
            times.append(time.perf_counter() - t0)
        out[f"{precision}_median_s"] = statistics.median(times)
        out[f"{precision}_min_s"] = min(times)
    out["crops"] = len(model.field_crops(field)[0])
    out["load_after"] = round(os.getloadavg()[0], 2)
    import torch

    out["torch_threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------
def figure(model, real: Path, path: Path, seed: int = 0) -> Path:
    """input | masked (75%) | reconstruction (visible patches pasted back) | per-patch error, for
    held-out real crops and a held-out synthetic crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_cellmae.synthetic import STAINS

    fields = held_out_real(real)
    transfluor, speckles = (v for v in fields.values())
    synthetic = held_out_synthetic(2)[1]  # a perturbed field
    rows = [
        (f"transfluor {HELD_OUT_WELLS[2]} GFP (held out)", transfluor[6], 0, None),
        ("speckles Hoechst (held out)", speckles[0], 0, (192, 704)),
        ("speckles γH2AX (held out)", speckles[0], 1, (192, 704)),
        (f"synthetic {STAINS[0]} (held out)", synthetic, 0, (128, 128)),
        (f"synthetic {STAINS[3]} (held out)", synthetic, 3, (128, 128)),
        (f"synthetic {STAINS[4]} (held out)", synthetic, 4, (128, 128)),
    ]
    p = model.patch_size
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    titles = ("input", f"masked ({MASK_RATIO:.0%} hidden)", "reconstruction", "error (per patch)")
    for r, (label, field, channel, at) in enumerate(rows):
        y, x = at or (0, 0)
        crop = np.asarray(field)[None, :, y : y + 256, x : x + 256]
        rec = model.reconstruct(crop, mask_ratio=MASK_RATIO, seed=seed + r)
        img = crop[0, channel].astype(np.float32)
        lo, hi = np.percentile(img, [0.5, 99.8])
        hidden = rec.mask[0, channel].repeat(p, 0).repeat(p, 1)
        masked = np.where(hidden, np.nan, img)
        err = rec.error[0, channel]
        mse = float(err[rec.mask[0, channel]].mean())
        panels = (img, masked, rec.pasted()[0, channel], err)
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            if c == 3:
                ax.imshow(panel, cmap="magma", vmin=0, vmax=2, interpolation="nearest")
                ax.set_title(f"hidden-patch MSE {mse:.2f}", fontsize=8)
            else:
                cmap = plt.get_cmap("gray").copy()
                cmap.set_bad("#3050a0")
                ax.imshow(panel, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
                ax.set_title(titles[c] if r == 0 else "", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{model.name}: masked reconstruction of crops it never saw", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    """The evaluation section of the model card."""
    lines = [
        f"Measured by `python benchmarks/eval_default_model.py` ({results['machine']}; "
        f"{results['date']}).",
    ]
    if "reconstruction" in results:
        lines += _reconstruction_lines(results)
    if "embedding" in results:
        lines += _embedding_lines(results["embedding"])
    if "speed" in results:
        sp = results["speed"]
        lines += [
            "",
            f"**Speed**: `embed_field` of a 1080×1080 5-channel field ({sp['crops']} crops) on the "
            f"CPU, {sp['torch_threads']} threads: **{sp['bf16_median_s']:.2f} s in bf16**, "
            f"{sp['fp32_median_s']:.2f} s in fp32 (median of {results['speed_runs']}; load "
            f"average {sp['load_before']}–{sp['load_after']} from other jobs).",
        ]
    return "\n".join(lines)


def _reconstruction_lines(results: dict) -> list[str]:
    lines = [
        "",
        f"**Masked reconstruction**, {MASK_RATIO:.0%} of the patches hidden, "
        f"{results['seeds']} mask seeds, MSE over the hidden patches in standardised units "
        "(per crop and channel), on fields never used in training or validation:",
        "",
        "| data | crops × channels | model | mean fill | harmonic interpolation "
        "| model ÷ mean fill | model ÷ harmonic |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["reconstruction"].items():
        lines.append(
            f"| {name} | {r['crop_channels']} | {r['model']:.3f} | {r['mean_fill']:.3f} | "
            f"{r['harmonic']:.3f} | **{r['model/mean_fill']:.2f}** | {r['model/harmonic']:.2f} |"
        )
    lines += [
        "",
        "Mean fill: each hidden patch ← the mean of the channel's visible pixels in the crop. "
        "Harmonic interpolation: the hidden pixels solve Laplace's equation with the visible "
        "pixels as boundary values (the smoothest fill from the visible neighbours).",
    ]
    return lines


def _embedding_lines(e: dict) -> list[str]:
    s = e["screen"]
    norm, other = s.get("normalization", "crop"), s.get("other_normalization")
    r0 = e.get(RANDOM_INIT)
    # columns after "chance": the other normalisation, the random-weights control (when measured)
    extra_columns = [
        (title, metrics)
        for title, metrics in (
            (f"cellmae-tiny ({other})", e.get(f"model_{other}") if other else None),
            ("random weights", r0),
        )
        if metrics is not None
    ]
    # the per-group table's columns after the baseline's (by_mechanism keys), when measured
    group_columns = [("random weights", RANDOM_INIT)] if r0 else []
    pooled = f"block {s['block']}, {s['pooling']} pooling" if "block" in s else "default pooling"
    lines = [
        "",
        f"**Embeddings** ({pooled}, {norm} normalisation) on a synthetic screen ({s['plates']} "
        f"plates × {s['wells'] // s['plates']} wells, {s['perturbations']} perturbations in "
        f"{s['mechanisms']} mechanism groups, "
        f"5 stains, {s['field_px']}² fields), well profiles aligned with TVN on the controls "
        f"of each plate; baseline: PCA of {s['baseline_features']} per-channel intensity/"
        "texture statistics (`napari_cellmae.features`, as `cellmae profile` reports it); the "
        "better of the model (default normalisation) and the baseline in bold:",
        "",
        f"| metric | cellmae-tiny ({norm}) | pixel statistics | chance |"
        + "".join(f" {title} |" for title, _ in extra_columns),
        "|---|---|---|---|" + "---|" * len(extra_columns),
    ]
    m, b = e["model"], e["baseline"]
    for key, label, chance in (
        ("replicate_map", "replicate retrieval mAP", f"{m['replicate_map_chance']:.3f}"),
        ("replicate_consistency", "replicate consistency (share > 95% control null)", "0.05"),
        ("mechanism_recall", "mechanism recall (top/bottom 5% cosines)", "0.10"),
        ("mechanism_1nn_accuracy", "mechanism accuracy, 1-NN leave-one-plate-out", "—"),
    ):
        cells = [f"{m[key]:.3f}", f"{b[key]:.3f}"]
        if m[key] != b[key]:
            win = 0 if m[key] > b[key] else 1
            cells[win] = f"**{cells[win]}**"
        extra = "".join(f" {metrics[key]:.3f} |" for _, metrics in extra_columns)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {chance} |{extra}")
    if e.get("by_mechanism"):
        lines += [
            "",
            "Mechanism accuracy (1-NN, leave-one-plate-out) by mechanism group, with the label "
            "its wells' nearest neighbours most often carry when wrong:",
            "",
            "| group | shared phenotype | wells | cellmae-tiny | mistaken for "
            "| pixel statistics | mistaken for |"
            + "".join(f" {title} |" for title, _ in group_columns),
            "|---|---|---|---|---|---|---|" + "---|" * len(group_columns),
        ]
        for r in e["by_mechanism"]:
            lines.append(
                f"| {r['mechanism']} | {r['phenotype']} | {r['wells']} | {r['model']:.2f} | "
                f"{r['model_confused_with'] or '—'} | {r['baseline']:.2f} | "
                f"{r['baseline_confused_with'] or '—'} |"
                + "".join(f" {r[key]:.2f} |" for _, key in group_columns)
            )
    if other:
        lines += [
            "",
            f"{norm.capitalize()} normalisation (the model's default, chosen on a separate "
            f"selection screen): {_normalization_words(norm)}; the cellmae-tiny ({other}) "
            f"column is the same model with {other} normalisation "
            f"({_normalization_words(other)}).",
        ]
    if r0:
        lines += [
            "",
            "Random weights: the same architecture as initialised before training (seed 0), "
            f"embedding the same way ({norm} normalisation): what training added.",
        ]
    return lines


def _normalization_words(norm: str) -> str:
    if norm == "plate":
        return (
            "every crop standardised by its plate's median crop mean and standard deviation per "
            "channel, so brighter stains and denser cells stay visible"
        )
    return "each crop and channel standardised by itself, blind to brightness"


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model to evaluate (default: bundled)")
    parser.add_argument("--real-data", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--seeds", type=int, default=3, help="mask seeds per crop")
    parser.add_argument("--speed-runs", type=int, default=7)
    parser.add_argument("--screen-size", type=int, default=512, help="screen field side (px)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["recon", "embed", "speed"])
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="also embed the screen with the same architecture at random weights (what "
        "training adds)",
    )
    parser.add_argument("--figure", type=Path, help="write the reconstruction figure here")
    parser.add_argument("--json", type=Path, help="save the figures as JSON")
    parser.add_argument(
        "--write-card", action="store_true", help="write the results into the model's README.md"
    )
    args = parser.parse_args(argv)

    from napari_cellmae.hub import load_model, resolve_source

    model = load_model(args.model, device="cpu")  # precision auto: bf16 on this CPU
    print(f"{model!r} from {model.source} (sha256 {model.checksum[:12]}…)", flush=True)
    results: dict = {
        "model": model.name,
        "checksum": model.checksum,
        "precision": model.precision,
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "speed_runs": args.speed_runs,
    }
    if args.figure:
        print("figure:", figure(model, args.real_data, args.figure), flush=True)
    if "recon" not in args.skip:
        results["reconstruction"] = {}
        sets = held_out_real(args.real_data)
        sets["synthetic 5-stain (held-out seeds)"] = held_out_synthetic()
        for name, fields in sets.items():
            t0 = time.perf_counter()
            r = reconstruction_errors(model, fields, args.seeds)
            r["crop_channels"] = sum(len(model.field_crops(f)[0]) * f.shape[0] for f in fields)
            results["reconstruction"][name] = r
            print(
                f"{name}: model {r['model']:.4f}  mean fill {r['mean_fill']:.4f}  harmonic "
                f"{r['harmonic']:.4f}  model/mean-fill {r['model/mean_fill']:.3f}  "
                f"model/harmonic {r['model/harmonic']:.3f}  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    if "embed" not in args.skip:
        t0 = time.perf_counter()
        results["embedding"] = e = embedding_quality(
            model, 0, args.screen_size, with_random_init=args.random_init
        )
        other = e["screen"]["other_normalization"]
        for key in ("replicate_map", "mechanism_recall", "mechanism_1nn_accuracy"):
            random_part = f", random weights: {e[RANDOM_INIT][key]:.3f}" if RANDOM_INIT in e else ""
            print(
                f"{key}: model ({e['screen']['normalization']}) {e['model'][key]:.3f}  "
                f"baseline {e['baseline'][key]:.3f}  "
                f"ratio {e['model'][key] / max(e['baseline'][key], 1e-9):.2f}  "
                f"(model, {other} normalisation: {e[f'model_{other}'][key]:.3f}{random_part})",
                flush=True,
            )
        print(f"(screen {time.perf_counter() - t0:.0f} s)")
    if "speed" not in args.skip:
        results["speed"] = sp = embed_speed(args.model, args.speed_runs)
        print(
            f"1080×1080×5 embed_field: bf16 {sp['bf16_median_s']:.2f} s, fp32 "
            f"{sp['fp32_median_s']:.2f} s (median of {args.speed_runs}, load "
            f"{sp['load_before']}–{sp['load_after']})",
            flush=True,
        )
    text = markdown(results)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=float))
    if args.write_card:
        from train_default_model import write_card

        folder, _ = resolve_source(args.model)
        write_card(folder, text)
        print(f"wrote the evaluation into {folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
