"""Model vs baseline on a synthetic screen with known structure: the profiling report's figures.

Writes a screen with ``synthetic.make_screen`` (plates with their own batch effects; perturbations
in mechanism groups sharing a phenotype; replicates and negative controls on every plate), embeds
it with ``embed_plates`` and profiles it with each alignment, relationships = same mechanism.
Prints one table per alignment, for the model and the intensity/texture baseline: copairs'
replicate retrieval mAP (positives on other plates), phenotypic activity (mAP vs controls, fraction
retrieved at BH p < 0.05) and phenotypic consistency (same mechanism), replicate consistency
against held-out controls, known-relationship recall and the mean cosine of related/unrelated
pairs; then the two figures as defined before copairs (replicate consistency with its null drawn
from the controls the alignment was fit on; replicate mAP with same-plate replicates as positives).
With ``--out`` an existing screen and finished embedding are reused.

Without ``--model`` the bundled architecture with random weights is used (no trained model is
bundled yet): the figures then say what an untrained encoder's features give, nothing more.

    python benchmarks/bench_profile.py [--model FOLDER] [--plates 3] [--perturbations 24]
        [--replicates 3] [--controls 12] [--size 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder/name (default: random tiny)")
    parser.add_argument("--preset", default="cellmae_vit_tiny_patch16_256")
    parser.add_argument("--plates", type=int, default=3)
    parser.add_argument("--perturbations", type=int, default=24)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--controls", type=int, default=12)
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="keep the screen, embeddings and reports here")
    args = parser.parse_args()

    import torch

    from napari_cellmae.embed import EmbedConfig, embed_plates
    from napari_cellmae.hub import save_model
    from napari_cellmae.model import create_model
    from napari_cellmae.profiling import (
        profile_report,
        replicate_consistency,
        replicate_retrieval,
    )
    from napari_cellmae.progress import run
    from napari_cellmae.synthetic import make_screen

    root = Path(args.out or tempfile.mkdtemp(prefix="bench_profile_"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    model = args.model
    if model is None:
        torch.manual_seed(0)
        model = str(save_model(create_model(args.preset), root / "random-model"))
        print(f"model: {args.preset} with random weights (seed 0)")
    t0 = time.perf_counter()
    if not (root / "screen" / "platemap.csv").is_file():
        make_screen(
            root / "screen",
            n_plates=args.plates,
            perturbations=args.perturbations,
            replicates=args.replicates,
            controls=args.controls,
            sites=args.sites,
            n_channels=args.channels,
            size=args.size,
            seed=args.seed,
        )
    plates = sorted(p for p in (root / "screen").iterdir() if p.is_dir())
    print(
        f"screen: {args.plates} plates × ({args.perturbations} perturbations × "
        f"{args.replicates} replicates + {args.controls} controls) × {args.sites} site(s), "
        f"{args.channels}×{args.size}² ({time.perf_counter() - t0:.0f} s to write)"
    )
    t0 = time.perf_counter()
    result = run(embed_plates(plates, root / "emb", EmbedConfig(model=model, device=args.device)))
    print(
        f"embedded {result.n_fields} fields ({result.n_crops} crops) in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    for method in ("center-scale", "pca-cs", "tvn"):
        t0 = time.perf_counter()
        report = run(
            profile_report(
                root / "emb",
                root / "screen" / "platemap.csv",
                root / f"report-{method}",
                method=method,
                relationship_column="Metadata_Mechanism",
            )
        )
        table = report.metrics[["metric", "model", "baseline", "chance"]]
        print(f"\nalignment {method} ({time.perf_counter() - t0:.0f} s):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        meta = report.wells
        labels = meta["Metadata_Perturbation"].to_numpy()
        controls = meta["Metadata_IsControl"].to_numpy(bool)
        old = {}
        for tag, ev in (("model", report.model), ("baseline", report.baseline)):
            fit_null = replicate_consistency(ev.aligned, labels, controls)
            _, same = replicate_retrieval(ev.aligned, meta, same_plate=True)
            old[tag] = (fit_null["consistent"].mean(), same["mAP"].mean(), same["chance"].mean())
        print(
            "  before copairs: replicate consistency, null from the fitted controls: model "
            f"{old['model'][0]:.3f}, baseline {old['baseline'][0]:.3f}; replicate mAP with "
            f"same-plate positives: model {old['model'][1]:.3f}, baseline "
            f"{old['baseline'][1]:.3f} (chance {old['model'][2]:.3f})"
        )
    print(f"\nreports in {root}")


if __name__ == "__main__":
    main()
