"""Artefact QC: classic CellProfiler metrics, a z-score baseline, synthetic artefacts, and a
transfer-learned QC head on the frozen encoder's embeddings.

>>> from napari_cellmae.qc import apply_artefact, load_head, run_qc, train_qc_head  # doctest: +SKIP
"""

from .adapt import adapt_head
from .artefacts import ARTEFACTS, QC_CLASSES, SEVERITIES, apply_artefact
from .baseline import RULES, baseline_flags
from .head import CLASSES, DEFAULT_HEAD, FeatureSpec, QCHead, load_head
from .metrics import measure, measure_field, metric_names
from .run import LINK_MODES, QCResult, judge, measure_plate, mirror_passing, run_qc, write_report
from .suggest import suggest_fields
from .training import (
    artefact_variants,
    compare_heads_on_plate,
    train_head_from_images,
    train_head_from_plate,
    train_qc_head,
)

__all__ = [
    "ARTEFACTS",
    "CLASSES",
    "DEFAULT_HEAD",
    "LINK_MODES",
    "QC_CLASSES",
    "RULES",
    "SEVERITIES",
    "FeatureSpec",
    "QCHead",
    "QCResult",
    "adapt_head",
    "apply_artefact",
    "artefact_variants",
    "baseline_flags",
    "compare_heads_on_plate",
    "judge",
    "load_head",
    "measure",
    "measure_field",
    "measure_plate",
    "metric_names",
    "mirror_passing",
    "run_qc",
    "suggest_fields",
    "train_head_from_images",
    "train_head_from_plate",
    "train_qc_head",
    "write_report",
]
