"""Profiles from embeddings: join a platemap, align on controls, aggregate, relate, evaluate.

The EFAAR steps (Celik et al. 2024, *Building, benchmarking, and exploring perturbative maps of
transcriptional and morphological data*) on the tables of :mod:`napari_cellmae.embed`, one module
per concern (none imports the report):

- :mod:`.platemap`: read a platemap and known pairs, join them onto tables;
- :mod:`.alignment`: center-scale, PCA-CS and TVN on negative controls per batch; the baseline PCA;
- :mod:`.metrics`: cosine similarities, aggregation, and the metrics (copairs' replicate
  retrieval, phenotypic activity and consistency; replicate consistency with held-out controls;
  known-relationship recall), gathered by :func:`evaluate`;
- :mod:`.report`: :func:`profile_report`, model vs baseline on an embedding folder.

Every report computes the same metrics for a baseline made from the same fields: PCA of the classic
intensity/texture statistics of :mod:`napari_cellmae.features`, aligned the same way. Nothing
assumes the model wins. Importing this package imports numpy only (pandas and copairs on use).
"""

from __future__ import annotations

from .alignment import ALIGNMENTS, align, baseline_pca, center_scale, pca_on_controls, tvn
from .metrics import (
    Evaluation,
    aggregate,
    cosine_similarity,
    evaluate,
    held_out_consistency,
    phenotypic_activity,
    phenotypic_consistency,
    relationship_recall,
    replicate_consistency,
    replicate_retrieval,
    replicates_across_plates,
    split_controls,
)
from .platemap import (
    annotate,
    join_platemap,
    pairs_from_column,
    read_pairs,
    read_platemap,
)
from .report import ProfileReport, load_tables, profile_report, table_annotations

__all__ = [
    "ALIGNMENTS",
    "Evaluation",
    "ProfileReport",
    "aggregate",
    "align",
    "annotate",
    "baseline_pca",
    "center_scale",
    "cosine_similarity",
    "evaluate",
    "held_out_consistency",
    "join_platemap",
    "load_tables",
    "pairs_from_column",
    "pca_on_controls",
    "phenotypic_activity",
    "phenotypic_consistency",
    "profile_report",
    "read_pairs",
    "read_platemap",
    "relationship_recall",
    "replicate_consistency",
    "replicate_retrieval",
    "replicates_across_plates",
    "split_controls",
    "table_annotations",
    "tvn",
]
