"""Profile embeddings against a platemap: align on controls, aggregate, relate, model vs baseline.

EMB_DIR is the output folder of `cellmae embed`. The platemap (CSV or TSV) gives each well its
perturbation and whether it is a negative control: columns Metadata_Plate (optional; plate names
are those of `cellmae embed`), Metadata_Well, Metadata_Perturbation, Metadata_IsControl, and
optionally Metadata_Batch (loose names work too: plate, well, treatment, is_control, batch).
Without --platemap, the annotations `cellmae embed --platemap` wrote into the tables are used.

Alignment on the controls of each batch (default: each plate): center-scale, pca-cs (PCA fit on
controls + center-scale) or tvn (PCA on controls, center-scale, then whitening with each batch's
control covariance + 0.5·I, as in EFAAR). Profiles are averaged per perturbation and related by
cosine similarity. Metrics, by copairs (what JUMP reports): replicate retrieval mAP (positives:
replicates on other plates; --same-plate-replicates counts those on the same plate too),
phenotypic activity (replicates retrieved against controls: mAP, permutation p-values,
Benjamini-Hochberg, fraction retrieved) and, with --relationship-column, phenotypic consistency
(perturbations sharing that column's value retrieved against each other). Also: replicate
consistency against held-out controls (the alignment is fit on half of each plate's controls,
the null drawn from the other half), and, given known pairs (--pairs CSV with two perturbation
columns, or --relationship-column), the share of pairs in the top/bottom 5% of all cosines.
Every metric is computed for the model and for a baseline on the same fields (PCA of classic
per-channel intensity/texture statistics).

Writes into --out: report.md, metrics.csv, replicates_*.csv, consistency_*.csv, similarity_*.csv,
pairs_*.csv, profiles_*.parquet, aligned_*.parquet and config.json.

examples:
  cellmae profile emb/ --platemap platemap.csv --out report/
  cellmae profile emb/ --relationship-column Metadata_Mechanism --out report/   # annotated by embed
  cellmae profile emb/ --platemap platemap.csv --pairs known_pairs.csv --align pca-cs --out report/
  cellmae profile emb/ --platemap layout.tsv --control DMSO --batch-column batch --out report/
"""

from __future__ import annotations

import argparse

HELP = "align embeddings on controls, relate perturbations, report model vs baseline metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("emb_dir", metavar="EMB_DIR", help="output folder of `cellmae embed`")
    parser.add_argument(
        "--platemap",
        default=None,
        metavar="CSV",
        help="platemap CSV/TSV (default: the annotations `cellmae embed --platemap` wrote)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="report folder: new, empty, or one an earlier `cellmae profile` made",
    )
    from ._options import add_force

    add_force(parser)
    parser.add_argument(
        "--pairs",
        metavar="CSV",
        default=None,
        help="known perturbation relationships: a CSV whose first two columns name two "
        "perturbations per row",
    )
    parser.add_argument(
        "--relationship-column",
        metavar="COLUMN",
        default=None,
        help="perturbations sharing a value of this platemap column (e.g. Metadata_Mechanism) "
        "are related: phenotypic consistency, and the known pairs (unless --pairs)",
    )
    parser.add_argument(
        "--align",
        default="tvn",
        choices=("tvn", "pca-cs", "center-scale", "none"),
        help="alignment on the controls of each batch (default: tvn)",
    )
    parser.add_argument(
        "--level",
        default="well",
        choices=("well", "field"),
        help="profile wells (default) or single fields",
    )
    parser.add_argument(
        "--batch-column",
        default=None,
        metavar="COLUMN",
        help="platemap column of the batches (default: Metadata_Batch if present, else the plate)",
    )
    parser.add_argument(
        "--control",
        nargs="+",
        default=None,
        metavar="NAME",
        help="perturbation name(s) of the negative controls, when the platemap has no control "
        "column",
    )
    parser.add_argument(
        "--null-size",
        type=int,
        default=1000,
        metavar="N",
        help="random control sets in the replicate-consistency null (default: 1000)",
    )
    parser.add_argument(
        "--same-plate-replicates",
        action="store_true",
        help="count replicates on the query well's own plate as positives of replicate "
        "retrieval and activity (default: only replicates on other plates; one plate: same)",
    )
    parser.add_argument(
        "--permutations",
        type=int,
        default=10000,
        metavar="N",
        help="size of copairs' permutation null for the p-values (default: 10000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the null (default: 0)")


def run(args: argparse.Namespace) -> int:
    from ..profiling import profile_report
    from ..progress import run as drive
    from ._progress import progress_bar

    bar, show = progress_bar("profile")
    with bar:
        report = drive(
            profile_report(
                args.emb_dir,
                args.platemap,
                args.out,
                pairs=args.pairs,
                method=args.align,
                level=args.level,
                batch_column=args.batch_column,
                controls=args.control,
                relationship_column=args.relationship_column,
                n_null=args.null_size,
                seed=args.seed,
                force=args.force,
                same_plate=args.same_plate_replicates,
                null_size=args.permutations,
            ),
            progress=show,
        )
    table = report.metrics[["metric", "model", "baseline", "chance"]]
    # a metric without a value (no baseline, no chance level) reads "–" as in report.md
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–"))
    print(f"report: {report.out_dir / 'report.md'}")
    return 0
