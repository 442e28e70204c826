"""Replicate consistency without any phenotype: the old null (controls the alignment was fit on)
against the held-out null (docs/embeddings.md, Metrics).

Two plates with their own offsets (removed by center-scale on controls); 20 perturbations × 3
replicates per plate drawn exactly like the controls, in 16 dimensions; 5 seeds. Prints the share
of perturbations called consistent (0.05 expected) and the mean null threshold, per number of
controls per plate.

    python benchmarks/bench_null.py
"""

from __future__ import annotations

import numpy as np


def screen(seed: int, n_ctrl: int, n_pert: int = 20, reps: int = 3, dim: int = 16):
    rng = np.random.default_rng(seed)
    rows, labels, plates = [], [], []
    for plate in ("p1", "p2"):
        offset = rng.normal(size=dim) * 3
        for i in range(n_ctrl + n_pert * reps):
            rows.append(offset + rng.normal(size=dim))
            labels.append("DMSO" if i < n_ctrl else f"P{(i - n_ctrl) // reps}")
            plates.append(plate)
    labels = np.array(labels)
    return np.array(rows), labels, labels == "DMSO", np.array(plates)


def main() -> None:
    from napari_cellmae.profiling import align, held_out_consistency, replicate_consistency

    print("| controls per plate | null | consistent (0.05 expected) | mean null threshold |")
    print("|---|---|---|---|")
    for n_ctrl in (6, 12, 24):
        old, new = [], []
        for seed in range(5):
            x, labels, controls, plates = screen(seed, n_ctrl)
            aligned = align(x, controls, plates, "center-scale")
            old.append(replicate_consistency(aligned, labels, controls))
            new.append(held_out_consistency(x, labels, controls, plates, "center-scale"))
        for name, tables in (("fitted controls (old)", old), ("held-out controls", new)):
            consistent = np.mean([t["consistent"].mean() for t in tables])
            thresholds = [t["null_threshold"].mean() for t in tables]
            threshold = "–" if np.isnan(thresholds).all() else f"{np.nanmean(thresholds):.3f}"
            print(f"| {n_ctrl} | {name} | {consistent:.2f} | {threshold} |")


if __name__ == "__main__":
    main()
