"""Our TVN against the steps of EFAAR's reference TVN, on an embedded screen (docs/embeddings.md).

EFAAR's reference code (Celik et al. 2024) runs, before the per-batch whitening that both share:
(1) a global standardisation on all controls, (2) PCA fit on the controls keeping every component,
(3) a global centre-scale on the controls. Ours skips (1), keeps only components in which the
controls vary, and centre-scales each batch on its own controls. This script aligns the model
and the baseline profiles of an embedding folder with ours, with the reference steps as written
(re-implemented here from that description with scikit-learn), and with each difference undone
on its own, then prints copairs' metrics for each (replicate mAP with positives on other plates,
phenotypic activity, phenotypic consistency, known-relationship recall) and the control variance
of the smallest component kept.

    python benchmarks/bench_tvn.py EMB_DIR PLATEMAP [--relationship-column Metadata_Mechanism]

(EMB_DIR / PLATEMAP: e.g. ``OUT/emb`` and ``OUT/screen/platemap.csv`` of
``benchmarks/bench_profile.py --out OUT``.)
"""

from __future__ import annotations

import argparse

import numpy as np

VARIANTS = {
    # name: (standardise on all controls first, keep zero-variance components, per-batch CS)
    "ours (cellmae tvn)": None,
    "reference as written": (True, True, False),
    "reference, only components with control variance": (True, False, False),
    "reference, per-batch centre-scale": (True, True, True),
    "reference without the global standardisation": (False, True, False),
}


def reference_tvn(
    x: np.ndarray,
    controls: np.ndarray,
    batches: np.ndarray,
    standardize: bool = True,
    keep_all: bool = True,
    per_batch: bool = False,
    regularization: float = 0.5,
) -> tuple[np.ndarray, float]:
    """TVN with EFAAR's reference steps (each switchable); returns the aligned profiles and the
    smallest control variance among the kept components (before centre-scale)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from napari_cellmae.profiling import center_scale

    x = np.asarray(x, dtype=np.float64)
    if standardize:
        x = StandardScaler().fit(x[controls]).transform(x)
    pca = PCA().fit(x[controls])
    z = pca.transform(x)
    variance = pca.explained_variance_
    if not keep_all:
        keep = variance > variance[0] * 1e-12
        z, variance = z[:, keep], variance[keep]
    if per_batch:
        z = center_scale(z, controls, batches)
    else:
        z = StandardScaler().fit(z[controls]).transform(z)
    out = np.empty_like(z)
    for b in np.unique(batches):
        rows = batches == b
        cov = np.cov(z[rows & controls], rowvar=False) + regularization * np.eye(z.shape[1])
        w, v = np.linalg.eigh(cov)
        out[rows] = z[rows] @ (v * w**-0.5) @ v.T
    return out, float(variance.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("emb_dir")
    parser.add_argument("platemap")
    parser.add_argument("--relationship-column", default="Metadata_Mechanism")
    args = parser.parse_args()

    from napari_cellmae.embed import embedding_columns
    from napari_cellmae.profiling import (
        align,
        baseline_pca,
        evaluate,
        join_platemap,
        load_tables,
        pairs_from_column,
        pca_on_controls,
        read_platemap,
    )
    from napari_cellmae.progress import run

    model, base, _ = run(load_tables(args.emb_dir))
    pm = read_platemap(args.platemap)
    model = join_platemap(model, pm)
    keys = ["Metadata_Plate", "Metadata_Well"]
    base = model[keys].merge(base, on=keys, how="left")
    x_model = model[embedding_columns(model)].to_numpy(np.float64)
    x_base = baseline_pca(base.filter(like="feat_").to_numpy(np.float64), x_model.shape[1])
    meta = model[[c for c in model.columns if c.startswith("Metadata_")]]
    controls = meta["Metadata_IsControl"].to_numpy(bool)
    batches = meta["Metadata_Plate"].astype(str).to_numpy()
    column = args.relationship_column
    pairs = pairs_from_column(pm, column)
    keys = ("replicate_map", "activity_map", "activity_fraction", "consistency_map")
    print(f"{len(meta)} wells, {controls.sum()} controls, {len(np.unique(batches))} plates")
    print(
        "| representation | TVN | components | smallest control variance | replicate mAP "
        "| activity mAP | activity retrieved | consistency mAP | recall |"
    )
    for tag, x in (("model", x_model), ("baseline", x_base)):
        for name, steps in VARIANTS.items():
            if steps is None:
                aligned = align(x, controls, batches, "tvn")
                pcs = pca_on_controls(x, controls)
                smallest = float(pcs[controls].var(axis=0, ddof=1).min())
            else:
                aligned, smallest = reference_tvn(x, controls, batches, *steps)
            ev = evaluate(aligned, meta, "none", pairs=pairs, relationship_column=column, n_null=10)
            m = ev.metrics
            cells = " | ".join(f"{m[k]:.3f}" for k in keys)
            print(
                f"| {tag} | {name} | {aligned.shape[1]} | {smallest:.2e} | {cells} "
                f"| {m['relationship_recall']:.3f} |"
            )


if __name__ == "__main__":
    main()
