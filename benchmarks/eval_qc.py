"""Leave-one-source-out evaluation of the QC head, next to the classic z-score baseline.

For each real source of ``scripts/train_qc_head.py`` (transfluor, ExampleHuman, BBBC022 Cell
Painting, raw BBBC022 ImageXpress, JUMP Phenix, speckles) a head is trained exactly as the
shipped one but without that source, and judged on it. Three scenarios per source, each image
one channel, each source/channel group one "plate" (the baseline's z-scores, and the
plate-relative features of a head that uses them, are taken within it):

1. **clean**: the source's real images as they are (and, separately, thinned to a handful of
   cells: ``sparse``, which is also ok). Reported: share flagged at the default threshold.
2. **synthetic artefacts**: ``--replicates`` plates per group (more for small sources: at least
   200 images per source); in each, every image stays as it is with probability 0.6, else is
   replaced by one of its artefact variants drawn at random: the training draw of each recipe
   and ``EVAL_DRAWS`` (2) more per recipe, severity 2–5 (the held-out source's variants were
   never trained on either way). Reported: one-vs-rest ROC-AUC per class, head and baseline.
3. **majority defocus** (a failed autofocus): in each group, ``--defocused`` (default 75%) of the
   images defocused through the PSF at the source's pixel size, z = 7–20 µm; the rest sharp.
   Reported: share of the defocused flagged, sharp images flagged, ROC-AUC of ``QC_Score``
   (defocused vs sharp).

Then the default threshold calibrated leave-one-source-out (:func:`threshold_table`: clean,
sparse, synthetic and majority-defocus images flagged at each candidate threshold).
``--without-cues`` refits the leave-one-source-out heads without the physical cues of
:mod:`napari_cellmae.qc.cues`, ``--without-8bit-copies`` without the 8-bit copies of the deeper
images (ablations).

The baseline is :func:`napari_cellmae.qc.baseline.baseline_flags` at its default z threshold
(score: the largest rule z). The head is judged as ``cellmae qc`` judges with it: each artefact
class weighed by the classic evidence of its plate
(:func:`napari_cellmae.qc.baseline.with_classic_evidence`); ``--head-alone`` judges the bare
head. Features are measured and embedded once per image and cached by the
training script (``$CELLMAE_QC_CACHE``, default ``/tmp/cellmae-qc-cache``; build it with two
``scripts/train_qc_head.py --cache-only --sources …`` processes: about 8 min on two cores), a
cached run takes about a minute. ``--head`` also judges every source
with a given head file (default: the shipped head, which has seen every source).

    python benchmarks/eval_qc.py --model cellmae-tiny --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from train_qc_head import (  # noqa: E402
    OK_PRIOR,
    SOURCES,
    feature_table,
    features,
    fit_default_head,
    head_spec,
    real_sources,
    training_rows,
)

P_OK = 0.6
MIN_SYNTHETIC = 200  # images per source in the synthetic scenario (more copies of small ones)
THRESHOLD = 0.5
LABEL_COUNTS = (1, 5, 10, 25, 50)


# True: the head's classes weighed by their classic evidence, as `cellmae qc` and the QC tab
# judge (napari_cellmae.qc.baseline.with_classic_evidence); False (--head-alone): the bare head
EVIDENCE = True


def _baseline_table(table):
    from napari_cellmae.qc.baseline import baseline_flags

    t = table.copy()
    t["Metadata_Plate"] = t["plate"]
    t["Metadata_Channel"] = t["group"]
    return baseline_flags(t.reset_index(drop=True))


def _baseline(table):
    """Baseline class scores (N, 7 in CLASSES order, column 0 = −score) and flags."""
    from napari_cellmae.qc.baseline import BASELINE_CLASSES
    from napari_cellmae.qc.head import CLASSES

    base = _baseline_table(table)
    scores = np.zeros((len(table), len(CLASSES)))
    scores[:, 0] = -base["QC_Baseline_Score"].to_numpy()
    for cls in BASELINE_CLASSES:
        scores[:, CLASSES.index(cls)] = base[f"QC_Baseline_{cls}"].to_numpy()
    return scores, base["QC_Baseline_Flag"].to_numpy(bool)


def _head(head, table, emb):
    """Head probabilities (N, 7) and flags of a scenario table (plates in ``plate``), with the
    classic evidence of each plate unless ``EVIDENCE`` is off."""
    from napari_cellmae.qc.baseline import with_classic_evidence

    t = table.copy()
    t["group"] = t["plate"]  # plate-relative features (if the head has them) within each plate,
    # against all of its images, as at QC time (not knowing which are clean)
    p = head.predict_proba(features(t, emb, head.spec, np.ones(len(t), bool)))
    if EVIDENCE:
        p = with_classic_evidence(p, _baseline_table(table))
    return p, 1 - p[:, 0] > THRESHOLD


def _auc(pos, score) -> float:
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(pos, bool)
    if pos.all() or not pos.any():
        return float("nan")
    return float(roc_auc_score(pos, score))


def scenarios(table, emb, source: str, replicates: int, defocused: float, seed: int):
    """(name -> (table, emb)) of the three scenarios for one source; ``plate`` column added."""
    rng = np.random.default_rng(seed)
    src = (table["source"] == source) & ~table["derived"].astype(bool)  # 8-bit copies: not judged
    out = {}
    for kind in ("ok", "sparse"):
        rows = np.flatnonzero(src & (table["kind"] == kind))
        t = table.iloc[rows].copy()
        t["plate"] = t["group"]
        out[kind] = (t, emb[rows])
    art = src & ~table["kind"].isin(["ok", "sparse", "autofocus"])
    picks, plates = [], []
    n_images = int((src & (table["kind"] == "ok")).sum())
    for r in range(max(replicates, int(np.ceil(MIN_SYNTHETIC / n_images)))):
        for name in table.loc[src & (table["kind"] == "ok"), "name"]:
            own = np.flatnonzero((table["name"] == name).to_numpy())
            ok = own[(table["kind"].to_numpy()[own] == "ok")][0]
            if rng.random() < P_OK:
                picks.append(ok)
            else:
                picks.append(int(rng.choice(own[art.to_numpy()[own]])))
            plates.append(f"{table['group'].iloc[ok]}#{r}")
    t = table.iloc[picks].copy()
    t["plate"] = plates
    out["synthetic"] = (t, emb[picks])
    picks, plates, is_blur = [], [], []
    for group in sorted(set(table.loc[src, "group"])):
        names = sorted(set(table.loc[src & (table["group"] == group), "name"]))
        n_blur = int(np.ceil(defocused * len(names)))
        blurred = set(rng.permutation(len(names))[:n_blur])
        for i, name in enumerate(names):
            kind = "autofocus" if i in blurred else "ok"
            row = np.flatnonzero(((table["name"] == name) & (table["kind"] == kind)).to_numpy())[0]
            picks.append(row)
            plates.append(group)
            is_blur.append(i in blurred)
    t = table.iloc[picks].copy()
    t["plate"] = plates
    t["defocused"] = is_blur
    out["defocus"] = (t, emb[picks])
    return out


def judge_source(head, scen) -> dict[str, Any]:
    """The figures of one head on one source's scenarios, with the baseline's; the field scores
    (1 − P(ok)) of each scenario under ``scores`` (for :func:`threshold_table`)."""
    from napari_cellmae.qc.head import CLASSES

    res: dict[str, Any] = {"scores": {}}
    for kind in ("ok", "sparse"):
        t, e = scen[kind]
        p, flag = _head(head, t, e)
        res[f"head_{kind}_fp"] = float(flag.mean())
        res["scores"][kind] = (1 - p[:, 0], np.zeros(len(t), bool))
        res[f"base_{kind}_fp"] = float(_baseline(t)[1].mean())
        res[f"n_{kind}"] = len(t)
    t, e = scen["synthetic"]
    p, flag = _head(head, t, e)
    b, bflag = _baseline(t)
    y = t["qc_class"].to_numpy()
    res["scores"]["synthetic"] = (1 - p[:, 0], y != "ok")
    for k, cls in enumerate(CLASSES):
        if cls == "ok":
            continue
        res[f"head_auc_{cls}"] = _auc(y == cls, p[:, k])
        res[f"base_auc_{cls}"] = _auc(y == cls, b[:, k])
        res[f"n_{cls}"] = int((y == cls).sum())  # flagged at the default thresholds
        res[f"head_caught_{cls}"] = int(flag[y == cls].sum())
        res[f"base_caught_{cls}"] = int(bflag[y == cls].sum())
    t, e = scen["defocus"]
    p, flag = _head(head, t, e)
    b, bflag = _baseline(t)
    blur = t["defocused"].to_numpy(bool)
    res["scores"]["defocus"] = (1 - p[:, 0], blur)
    res.update(
        n_defocused=int(blur.sum()),
        n_sharp=int((~blur).sum()),
        head_defocus_caught=float(flag[blur].mean()),
        head_sharp_flagged=int(flag[~blur].sum()),
        head_defocus_auc=_auc(blur, 1 - p[:, 0]),
        base_defocus_caught=float(bflag[blur].mean()),
        base_sharp_flagged=int(bflag[~blur].sum()),
        base_defocus_auc=_auc(blur, -b[:, 0]),
    )
    return res


def print_tables(results: dict[str, dict[str, float]], title: str) -> None:
    from napari_cellmae.qc.head import ARTEFACT_CLASSES

    print(f"\n### {title}\n")
    print(
        "| held-out source | clean flagged (head / baseline) | sparse flagged (head / baseline)"
        " | mean ROC-AUC (head / baseline) | majority defocus: defocused caught (head / baseline)"
        " | sharp flagged (head / baseline) | QC_Score ROC-AUC (head / baseline) |"
    )
    print("|---|---|---|---|---|---|---|")
    for src, r in results.items():
        mh = np.nanmean([r[f"head_auc_{c}"] for c in ARTEFACT_CLASSES])
        mb = np.nanmean([r[f"base_auc_{c}"] for c in ARTEFACT_CLASSES])
        print(
            f"| {src} | {r['head_ok_fp']:.0%} / {r['base_ok_fp']:.0%} of {r['n_ok']} | "
            f"{r['head_sparse_fp']:.0%} / {r['base_sparse_fp']:.0%} | {mh:.3f} / {mb:.3f} | "
            f"{r['head_defocus_caught']:.0%} / {r['base_defocus_caught']:.0%} of "
            f"{r['n_defocused']} | {r['head_sharp_flagged']} / {r['base_sharp_flagged']} of "
            f"{r['n_sharp']} | {r['head_defocus_auc']:.3f} / {r['base_defocus_auc']:.3f} |"
        )
    n_ok = sum(r["n_ok"] for r in results.values())
    ok_h = sum(r["head_ok_fp"] * r["n_ok"] for r in results.values()) / n_ok
    ok_b = sum(r["base_ok_fp"] * r["n_ok"] for r in results.values()) / n_ok
    caught = sum(r["head_defocus_caught"] * r["n_defocused"] for r in results.values())
    n_def = sum(r["n_defocused"] for r in results.values())
    print(
        f"all sources: clean flagged head {ok_h:.1%} / baseline {ok_b:.1%} of {n_ok}; "
        f"majority defocus caught {caught / n_def:.1%} of {n_def}, sharp flagged "
        f"{sum(r['head_sharp_flagged'] for r in results.values())} of "
        f"{sum(r['n_sharp'] for r in results.values())}"
    )
    print("\n| class | " + " | ".join(results) + " | mean |")
    print("|---|" + "---|" * (len(results) + 1))
    wins, total = 0, 0
    for cls in ARTEFACT_CLASSES:
        cells, hs, bs = [], [], []
        for r in results.values():
            h, b = r[f"head_auc_{cls}"], r[f"base_auc_{cls}"]
            cells.append(f"{h:.3f} / {b:.3f}")
            hs.append(h)
            bs.append(b)
        mh, mb = np.nanmean(hs), np.nanmean(bs)
        wins += int(mh > mb)
        total += 1
        print(f"| {cls} (head / baseline) | " + " | ".join(cells) + f" | {mh:.3f} / {mb:.3f} |")
    allh = np.nanmean([r[f"head_auc_{c}"] for r in results.values() for c in ARTEFACT_CLASSES])
    allb = np.nanmean([r[f"base_auc_{c}"] for r in results.values() for c in ARTEFACT_CLASSES])
    print(f"mean ROC-AUC head {allh:.3f} vs baseline {allb:.3f}; head ahead on {wins}/{total}")
    caught = []
    for cls in ARTEFACT_CLASSES:
        n = sum(r[f"n_{cls}"] for r in results.values())
        h = sum(r[f"head_caught_{cls}"] for r in results.values()) / max(n, 1)
        b = sum(r[f"base_caught_{cls}"] for r in results.values()) / max(n, 1)
        caught.append(f"{cls} {h:.0%} / {b:.0%} of {n}")
    print(
        "synthetic artefacts flagged at the default threshold (head / baseline): "
        + "; ".join(caught)
    )


THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_CLEAN_FLAGGED = 0.05  # issue 19: at most 5% of a new source's clean fields flagged


def threshold_table(results: dict[str, dict[str, Any]]) -> float:
    """The default threshold calibrated leave-one-source-out: for each candidate, the clean and
    sparse images flagged (pooled over held-out sources, and the worst source), the synthetic
    artefacts and majority-defocus images caught, and the sharp images flagged. Prints the table;
    returns the lowest threshold (most artefacts caught) whose pooled clean rate is at most
    :data:`MAX_CLEAN_FLAGGED` and whose worst source stays within twice that."""

    def pooled(kind, t, positives):
        score = np.concatenate([r["scores"][kind][0] for r in results.values()])
        pos = np.concatenate([r["scores"][kind][1] for r in results.values()])
        sel = pos if positives else ~pos
        return float((score[sel] > t).mean()) if sel.any() else float("nan")

    print(
        "\n| threshold | clean flagged (all / worst source) | sparse flagged | synthetic artefacts"
        " caught | majority defocus caught | sharp flagged |\n|---|---|---|---|---|---|"
    )
    chosen = None
    for t in THRESHOLDS:
        worst = max(float((r["scores"]["ok"][0] > t).mean()) for r in results.values())
        clean = pooled("ok", t, False)
        n_sharp = sum(int((~r["scores"]["defocus"][1]).sum()) for r in results.values())
        sharp = sum(
            int((r["scores"]["defocus"][0][~r["scores"]["defocus"][1]] > t).sum())
            for r in results.values()
        )
        print(
            f"| {t:.1f} | {clean:.1%} / {worst:.1%} | {pooled('sparse', t, False):.1%} | "
            f"{pooled('synthetic', t, True):.1%} | {pooled('defocus', t, True):.1%} | "
            f"{sharp} of {n_sharp} |"
        )
        if chosen is None and clean <= MAX_CLEAN_FLAGGED and worst <= 2 * MAX_CLEAN_FLAGGED:
            chosen = t
    chosen = THRESHOLDS[-1] if chosen is None else chosen
    print(
        f"calibrated threshold (lowest with clean flagged <= {MAX_CLEAN_FLAGGED:.0%} pooled and "
        f"<= {2 * MAX_CLEAN_FLAGGED:.0%} on every held-out source): {chosen:.1f}"
    )
    return chosen


def main(argv: list[str] | None = None) -> int:
    from napari_cellmae import load_model
    from napari_cellmae.qc.head import QCHead, encoder_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cellmae-tiny", help="encoder source")
    parser.add_argument("--head", default=None, help="head file also judged (default: shipped)")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--defocused", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--ok-prior", type=float, default=OK_PRIOR, help="of the LOSO heads")
    parser.add_argument("--label-curve", action="store_true", help="also the label curve")
    parser.add_argument(
        "--without-cues",
        action="store_true",
        help="ablation: leave-one-source-out heads without the physical cues (qc/cues.py)",
    )
    parser.add_argument(
        "--without-8bit-copies",
        action="store_true",
        help="ablation: leave-one-source-out heads without the 8-bit copies of deeper images",
    )
    parser.add_argument(
        "--head-alone",
        action="store_true",
        help="judge the bare head, without the classic evidence that QC runs weigh it with",
    )
    args = parser.parse_args(argv)
    global EVIDENCE
    EVIDENCE = not args.head_alone
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, encoder_only=True)
    table, emb = feature_table(model, args.block, real_sources())
    if args.without_8bit_copies:
        keep = ~table["derived"].to_numpy(bool)
        table, emb = table[keep].reset_index(drop=True), emb[keep]
    spec = head_spec(model, args.block)
    if args.without_cues:
        from dataclasses import replace

        from napari_cellmae.qc.head import CUE_FEATURES

        kept = tuple(m for m in spec.metric_features if m not in CUE_FEATURES)
        spec = replace(spec, metric_features=kept)
    print(
        f"encoder {model.name} ({model.checksum[:12]}), block {spec.block}; {len(table)} variants"
    )
    scen = {
        s: scenarios(table, emb, s, args.replicates, args.defocused, args.seed + i)
        for i, s in enumerate(SOURCES)
    }
    loso = {}
    for s in SOURCES:
        keep = (table["source"] != s).to_numpy()
        head, _, _ = fit_default_head(
            table[keep].reset_index(drop=True),
            emb[keep],
            spec,
            encoder_info(model),
            ok_prior=args.ok_prior,
        )
        loso[s] = judge_source(head, scen[s])
    how = "the bare head" if args.head_alone else "head × classic evidence, as QC runs judge"
    print_tables(
        loso, f"leave-one-source-out: each source judged by a head trained without it ({how})"
    )
    print("\n### default threshold, calibrated leave-one-source-out")
    threshold_table(loso)
    shipped = QCHead.load(args.head)
    if shipped.matches(model):
        print_tables(
            {s: judge_source(shipped, scen[s]) for s in SOURCES},
            f"head {args.head or 'shipped default'} (trained on every source)",
        )
    else:
        print(f"\n(head {shipped.path} is for another encoder: not judged)")
    if args.label_curve:
        label_curve(table, emb, spec, scen, encoder_info(model), args.seed)
    return 0


def label_curve(table, emb, spec, scen, encoder, seed: int) -> None:
    """Heads from k labelled variants per class of the other sources; mean ROC-AUC (LOSO)."""
    from napari_cellmae.qc.head import ARTEFACT_CLASSES, CLASSES, fit_head

    rng = np.random.default_rng(seed)
    print("\n| labels per class | mean ROC-AUC, leave-one-source-out (3 draws) |\n|---|---|")
    for k in LABEL_COUNTS:
        aucs = []
        for s in SOURCES:
            pool = np.flatnonzero(training_rows(table) & (table["source"] != s).to_numpy())
            y = table["qc_class"].to_numpy()
            x_all = features(table, emb, spec)
            for _ in range(3):
                pick = np.concatenate(
                    [rng.choice(pool[y[pool] == c], k, replace=False) for c in CLASSES]
                )
                head = fit_head(x_all[pick], y[pick], spec, encoder)
                r = judge_source(head, scen[s])
                aucs.append(np.nanmean([r[f"head_auc_{c}"] for c in ARTEFACT_CLASSES]))
        print(f"| {k} | {np.mean(aucs):.3f} ± {np.std(aucs):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
