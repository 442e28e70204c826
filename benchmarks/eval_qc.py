"""Evaluate the QC head against the CellProfiler z-score baseline on held-out real images.

Held-out images (never used to train the default head, see scripts/train_qc_head.py): the
transfluor plate (BBBC016, GFP) wells O13–O24 (36 fields, 512×512) and the ExampleHuman field
(Hoechst, PH3, cell body; each channel cut into four 256×256 tiles). Each image appears in
``--replicates`` copies; each copy stays as it is with probability 0.6, else gets an artefact
class drawn uniformly, a recipe of that class and a severity 1–5 (seeded). The copies of one
source and channel form one "plate" for the baseline's robust z-scores (about 40% artefacts).

Reported per class (one-vs-rest) for the head and for the baseline, side by side: ROC-AUC,
average precision and balanced accuracy at the default operating point (head: flag when
1 − P(ok) > 0.5, class = most probable artefact; baseline: a rule z > 2, class of the largest
z), on artefacts of severity 2–5 (severity 1 is often invisible; reported separately). Then a
label-efficiency curve: heads fitted on k = 1, 5, 10, 25, 50 labelled images per class drawn from
the training pool, mean ROC-AUC on the same held-out set (5 draws each).

    python benchmarks/eval_qc.py --model cellmae-tiny                 # head = the shipped default
    python benchmarks/eval_qc.py --model /path/to/model --head my_head.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from train_qc_head import (  # noqa: E402
    EVAL_WELLS,
    REAL,
    plate_group,
    training_images,
    transfluor,
)

LABEL_COUNTS = (1, 5, 10, 25, 50)
P_OK = 0.6


def held_out_plates(real: Path = REAL) -> list[tuple[str, list[np.ndarray]]]:
    """(plate name, images) of the held-out sources: one plate per source and channel."""
    from napari_cellmae.plates import read_image

    plates = [("transfluor O13-O24", [im for _, im in transfluor(EVAL_WELLS, real)])]
    for path in sorted((real / "ExampleHuman").glob("*.tif")):
        image = read_image(path)[0]
        tiles = [image[y : y + 256, x : x + 256] for y in (0, 256) for x in (0, 256)]
        plates.append((f"ExampleHuman {path.stem[-2:]}", tiles))
    return plates


def make_eval_set(plates, replicates: int, seed: int):
    """Artefact copies: list of dicts (plate, image, class, kind, severity)."""
    from napari_cellmae.qc.artefacts import ARTEFACTS, QC_CLASSES, apply_artefact, kinds_for_class

    rng = np.random.default_rng(seed)
    out = []
    for name, images in plates:
        for _ in range(replicates):
            for image in images:
                if rng.random() < P_OK:
                    out.append({"plate": name, "image": image, "cls": "ok", "kind": "", "sev": 0})
                    continue
                cls = str(rng.choice(QC_CLASSES))
                kind = str(rng.choice(kinds_for_class(cls)))
                sev = int(rng.integers(1, 6))
                spoilt = apply_artefact(image, kind, sev, seed=int(rng.integers(2**31)))
                assert ARTEFACTS[kind].qc_class == cls
                out.append({"plate": name, "image": spoilt, "cls": cls, "kind": kind, "sev": sev})
    return out


def measure_and_embed(images, spec, model):
    """Metrics table, metric features, embeddings (absolute) and seconds per image for each."""
    import pandas as pd

    from napari_cellmae.qc.head import embed_images, metric_features
    from napari_cellmae.qc.metrics import measure

    t0 = time.perf_counter()
    rows = [
        {f"QC_{k}": float(v[0]) for k, v in measure(im, (spec.scale,)).items()} for im in images
    ]
    table = pd.DataFrame(rows)
    t1 = time.perf_counter()
    emb = (
        embed_images(model, images, spec.block) if spec.uses_encoder else np.zeros((len(images), 0))
    )
    t2 = time.perf_counter()
    n = max(len(images), 1)
    return table, metric_features(table, spec), emb, (t1 - t0) / n, (t2 - t1) / n


def class_metrics(y_true, scores, y_pred, classes):
    """Per class: ROC-AUC, AP, balanced accuracy (one-vs-rest)."""
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

    rows = {}
    for k, cls in enumerate(classes):
        pos = y_true == cls
        if pos.all() or not pos.any():
            continue
        rows[cls] = (
            roc_auc_score(pos, scores[:, k]),
            average_precision_score(pos, scores[:, k]),
            balanced_accuracy_score(pos, y_pred == cls),
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from napari_cellmae import load_model
    from napari_cellmae.qc.baseline import BASELINE_CLASSES, baseline_flags
    from napari_cellmae.qc.head import CLASSES, QCHead, fit_head, spec_for, with_relative
    from napari_cellmae.qc.training import artefact_variants

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="encoder source (default: bundled)")
    parser.add_argument("--head", default=None, help="head file (default: the shipped head)")
    parser.add_argument("--replicates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    model = load_model(args.model, device=args.device, encoder_only=True)
    head = QCHead.load(args.head)
    if not head.matches(model):
        raise SystemExit(
            f"the head was trained on {head.encoder}, not on {model.name} "
            f"({model.checksum[:12]}): pass --head trained for this model"
        )
    spec = head.spec
    data = make_eval_set(held_out_plates(), args.replicates, args.seed)
    images = [d["image"] for d in data]
    y = np.array([d["cls"] for d in data])
    sev = np.array([d["sev"] for d in data])
    print(f"encoder {model.name} ({model.checksum[:12]}); head {args.head or 'default'}")
    print(
        f"{len(data)} held-out images: " + ", ".join(f"{c} {int((y == c).sum())}" for c in CLASSES)
    )

    table, x_metrics, emb, t_metrics, t_embed = measure_and_embed(images, spec, model)
    plates = [d["plate"] for d in data]  # plate-relative half: against each plate's median
    x = with_relative(np.concatenate([x_metrics, emb], axis=1), spec, plates)
    print(f"per image: metrics {1000 * t_metrics:.0f} ms, embedding {1000 * t_embed:.0f} ms")

    # baseline: z-scores within each plate (source and channel), from the same metrics
    table["Metadata_Plate"] = [d["plate"] for d in data]
    base = baseline_flags(table)
    b_scores = np.zeros((len(data), len(CLASSES)))
    b_scores[:, 0] = -base["QC_Baseline_Score"].to_numpy()
    for cls in BASELINE_CLASSES:
        b_scores[:, CLASSES.index(cls)] = base[f"QC_Baseline_{cls}"].to_numpy()
    b_pred = base["QC_Baseline_Class"].to_numpy()

    p = head.predict_proba(x)
    flag = 1 - p[:, 0] > 0.5
    h_pred = np.where(flag, np.asarray(CLASSES[1:])[p[:, 1:].argmax(axis=1)], "ok")

    def report(sel, title):
        h = class_metrics(y[sel], p[sel], h_pred[sel], CLASSES)
        b = class_metrics(y[sel], b_scores[sel], b_pred[sel], CLASSES)
        print(f"\n{title} ({int(sel.sum())} images)")
        print(
            "| class | n | head ROC-AUC | baseline ROC-AUC | head AP | baseline AP | "
            "head bal. acc. | baseline bal. acc. |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for cls in CLASSES:
            if cls in h:
                n = int((y[sel] == cls).sum())
                hv, bv = h[cls], b[cls]
                print(
                    f"| {cls} | {n} | {hv[0]:.3f} | {bv[0]:.3f} | {hv[1]:.3f} | {bv[1]:.3f} | "
                    f"{hv[2]:.3f} | {bv[2]:.3f} |"
                )
        mh = np.mean([v[0] for v in h.values()])
        mb = np.mean([v[0] for v in b.values()])
        wins = sum(h[c][0] > b[c][0] for c in h)
        ap_h, ap_b = np.mean([v[1] for v in h.values()]), np.mean([v[1] for v in b.values()])
        ba_h, ba_b = np.mean([v[2] for v in h.values()]), np.mean([v[2] for v in b.values()])
        print(
            f"| mean | | {mh:.3f} | {mb:.3f} | {ap_h:.3f} | {ap_b:.3f} | {ba_h:.3f} | {ba_b:.3f} |"
        )
        print(
            f"head ahead on {wins}/{len(h)} classes; multi-class balanced accuracy head "
            f"{balanced_accuracy_score(y[sel], h_pred[sel]):.3f} vs baseline "
            f"{balanced_accuracy_score(y[sel], b_pred[sel]):.3f}; macro-F1 head "
            f"{f1_score(y[sel], h_pred[sel], average='macro'):.3f} vs baseline "
            f"{f1_score(y[sel], b_pred[sel], average='macro'):.3f}"
        )
        return mh

    main_sel = (sev == 0) | (sev >= 2)
    report(main_sel, "severity 2-5 (main)")
    report((sev == 0) | (sev == 1), "severity 1 only (mild)")

    # ablation and label efficiency, trained on the training pool (not the held-out images)
    print("\ntraining pool: artefact variants of the default head's training images …", flush=True)
    named = training_images()
    pool = list(artefact_variants([im for _, im in named], seed=0))
    pool_y = np.array([v.qc_class for v in pool])
    pool_groups = [plate_group(named[v.source][0]) for v in pool]
    clean = np.array([v.kind == "none" for v in pool])
    _, pool_m, pool_e, _, _ = measure_and_embed([v.image for v in pool], spec, model)
    pool_x = with_relative(np.concatenate([pool_m, pool_e], axis=1), spec, pool_groups, clean)
    only_spec = spec_for(None, scale=spec.scale)
    pool_only = with_relative(pool_m, only_spec, pool_groups, clean)
    x_only = with_relative(x_metrics, only_spec, plates)

    def mean_auc(h, feats):
        q = h.predict_proba(feats)
        return np.mean(
            [v[0] for v in class_metrics(y[main_sel], q[main_sel], y[main_sel], CLASSES).values()]
        )

    only = fit_head(pool_only, pool_y, only_spec, None)
    print(
        f"ablation (severity 2-5, mean ROC-AUC): metrics-only head "
        f"{mean_auc(only, x_only):.3f}; embedding + metrics head (shipped) "
        f"{mean_auc(head, x):.3f}"
    )
    rng = np.random.default_rng(args.seed)
    print("\n| labels per class | mean ROC-AUC (5 draws) | sd |\n|---|---|---|")
    for k in LABEL_COUNTS:
        aucs = []
        for _ in range(5):
            pick = np.concatenate(
                [
                    rng.choice(
                        np.flatnonzero(pool_y == c),
                        size=min(k, int((pool_y == c).sum())),
                        replace=False,
                    )
                    for c in CLASSES
                ]
            )
            h = fit_head(pool_x[pick], pool_y[pick], spec, head.encoder)
            aucs.append(mean_auc(h, x))
        print(f"| {k} | {np.mean(aucs):.3f} | {np.std(aucs):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
