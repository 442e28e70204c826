"""Metrics of aligned profiles: replicate retrieval, phenotypic activity and consistency (copairs),
replicate consistency against held-out controls, known-relationship recall.

The mAP metrics are those the JUMP consortium reports, computed by copairs (the Broad's library;
Kalinin et al. 2025, *A versatile information retrieval framework for evaluating profile
strength and similarity*), with cosine similarity:

- **Replicate retrieval**: each non-control well ranks the wells of other perturbations
  (controls included) and its replicates; positives are its replicates **on other plates** by
  default (``same_plate=True`` also counts replicates on its own plate, which share its plate
  effects). Per perturbation: mAP and the AP of a random ranking.
- **Phenotypic activity**: each perturbation's replicates retrieved against the negative
  controls only (copairs' reference-index recipe); mAP, permutation p-value (copairs' null of
  random rankings with the same numbers of positives and candidates), Benjamini–Hochberg
  correction; the fraction retrieved is the share with corrected p < 0.05.
- **Phenotypic consistency**: aggregated perturbation profiles retrieved against each other,
  positives = perturbations sharing a value of an annotation column (a mechanism, a target);
  mAP, p-value, BH per annotation value; fraction retrieved.

Two metrics of our own: **replicate consistency** (mean pairwise cosine of a perturbation's
replicates above the 95th percentile of random sets of control wells) uses an honest null: the
alignment is fit on half of each batch's controls and the null is drawn from the other half (on
the controls the alignment was fit on, random sets sit below zero by construction);
**known-relationship recall** (share of annotated pairs among the top/bottom 5% of cosines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .alignment import _EPS, align

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

CONTROL_QUANTILE = 0.95
RECALL_FRACTION = 0.05
FDR = 0.05  # Benjamini-Hochberg threshold of "retrieved"
NULL_SIZE = 10000  # copairs' permutation null per (positives, candidates) configuration
_REFERENCE = "Metadata_Reference_Index"


_CONSISTENCY_COLUMNS = [
    "Metadata_Perturbation",
    "n_replicates",
    "replicate_cosine",
    "null_threshold",
    "p_value",
    "consistent",
]


# -- relating -------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _EPS)


def cosine_similarity(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity matrix of the rows of ``a`` (with those of ``b``). (N, D) -> (N, M)."""
    ua = _unit(a)
    return ua @ (ua if b is None else _unit(b)).T


def aggregate(x: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean profile per label, labels in order of first appearance. -> (names, (P, D))."""
    labels = np.asarray([str(v) for v in labels])
    names = list(dict.fromkeys(labels.tolist()))
    return names, np.stack([x[labels == n].mean(axis=0) for n in names])


def _mean_pairwise(sim: np.ndarray) -> float:
    n = len(sim)
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def replicate_consistency(
    x: np.ndarray,
    perturbations: Sequence[str],
    controls: np.ndarray,
    n_null: int = 1000,
    seed: int = 0,
    quantile: float = CONTROL_QUANTILE,
    batches: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per perturbation with ≥ 2 replicate wells: the mean pairwise cosine of its replicates,
    the same for ``n_null`` random sets of as many control wells (the null; given ``batches``,
    each set takes as many controls from each batch as the perturbation has replicates there),
    its ``quantile``, the p-value and whether it is exceeded. A null with fewer than
    ``1 / (1 - quantile)`` distinct control sets is no null: NaN threshold, not consistent."""
    import pandas as pd
    from scipy.special import comb

    controls = np.asarray(controls, dtype=bool)
    labels = np.asarray([str(p) for p in perturbations])
    batches = np.zeros(len(labels), int) if batches is None else np.asarray(batches)
    sims = cosine_similarity(x)
    pools = {b: np.flatnonzero(controls & (batches == b)) for b in np.unique(batches)}
    rng = np.random.default_rng(seed)
    nulls: dict[tuple, np.ndarray] = {}
    rows = []
    for name in dict.fromkeys(labels[~controls].tolist()):
        idx = np.flatnonzero((labels == name) & ~controls)
        k = len(idx)
        if k < 2:
            continue
        plan = tuple(sorted(zip(*np.unique(batches[idx], return_counts=True))))
        if plan not in nulls:
            n_sets = np.prod([comb(len(pools[b]), n, exact=True) for b, n in plan])
            if n_sets < 1 / (1 - quantile):
                nulls[plan] = np.array([])
            else:
                draws = [
                    np.concatenate([rng.choice(pools[b], size=n, replace=False) for b, n in plan])
                    for _ in range(n_null)
                ]
                nulls[plan] = np.array([_mean_pairwise(sims[np.ix_(d, d)]) for d in draws])
        score = _mean_pairwise(sims[np.ix_(idx, idx)])
        null = nulls[plan]
        threshold = float(np.quantile(null, quantile)) if len(null) else np.nan
        rows.append(
            {
                "Metadata_Perturbation": name,
                "n_replicates": k,
                "replicate_cosine": score,
                "null_threshold": threshold,
                "p_value": float((1 + (null >= score).sum()) / (1 + len(null)))
                if len(null)
                else np.nan,
                "consistent": bool(score > threshold) if len(null) else False,
            }
        )
    return pd.DataFrame(rows, columns=_CONSISTENCY_COLUMNS)


def relationship_recall(
    sim: np.ndarray,
    names: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    fraction: float = RECALL_FRACTION,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Known-relationship recall: the share of annotated pairs whose cosine is among the top or
    bottom ``fraction`` of all pairwise cosines between perturbations (chance: 2·fraction).

    Returns the summary (recall, pairs found, thresholds, mean cosine of related and unrelated
    pairs) and one row per annotated pair found.
    """
    import pandas as pd

    pos = {n: i for i, n in enumerate(names)}
    iu = np.triu_indices(len(names), k=1)
    all_cos = sim[iu]
    lo, hi = np.quantile(all_cos, [fraction, 1 - fraction]) if len(all_cos) else (np.nan, np.nan)
    found = {
        tuple(sorted((a, b))) for a, b in pairs if a in pos and b in pos and a != b
    }  # each pair once
    rows = []
    for a, b in sorted(found):
        c = float(sim[pos[a], pos[b]])
        rows.append(
            {
                "perturbation_a": a,
                "perturbation_b": b,
                "cosine": c,
                "percentile": float((all_cos < c).mean() * 100),
                "recalled": bool(c <= lo or c >= hi),
            }
        )
    table = pd.DataFrame(
        rows, columns=["perturbation_a", "perturbation_b", "cosine", "percentile", "recalled"]
    )
    related = np.zeros(len(all_cos), bool)
    for a, b in found:
        i, j = sorted((pos[a], pos[b]))
        related |= (iu[0] == i) & (iu[1] == j)
    summary = {
        "recall": float(table["recalled"].mean()) if len(table) else np.nan,
        "n_pairs": len(table),
        "n_pairs_given": len(pairs),
        "threshold_low": float(lo),
        "threshold_high": float(hi),
        "mean_cosine_related": float(all_cos[related].mean()) if related.any() else np.nan,
        "mean_cosine_unrelated": float(all_cos[~related].mean()) if (~related).any() else np.nan,
    }
    return summary, table


# -- copairs --------------------------------------------------------------------------------------
def _copairs_ap(
    x: np.ndarray,
    meta: pd.DataFrame,
    pos_sameby: list[str],
    pos_diffby: list[str],
    neg_sameby: list[str],
    neg_diffby: list[str],
) -> pd.DataFrame:
    """copairs' per-row average precision (cosine), quietly."""
    import logging

    from copairs.map import average_precision
    from copairs.matching import UnpairedException

    logging.getLogger("copairs").setLevel(logging.WARNING)
    try:
        return average_precision(
            meta.reset_index(drop=True),
            np.asarray(x, dtype=np.float64),
            pos_sameby=pos_sameby,
            pos_diffby=pos_diffby,
            neg_sameby=neg_sameby,
            neg_diffby=neg_diffby,
            distance="cosine",
            progress_bar=False,
        )
    except UnpairedException:  # no positive (or no negative) pair: nothing to rank
        return meta.reset_index(drop=True).assign(
            average_precision=np.nan, n_pos_pairs=0, n_total_pairs=0
        )


def _copairs_map(ap: pd.DataFrame, sameby: list[str], null_size: int, seed: int) -> pd.DataFrame:
    """copairs' mAP per group with permutation p-values and BH-corrected p-values."""
    from copairs.map import mean_average_precision

    from ..registry import cellmae_home

    return mean_average_precision(
        ap,
        sameby,
        null_size=null_size,
        threshold=FDR,
        seed=seed,
        progress_bar=False,
        max_workers=1,
        cache_dir=cellmae_home() / "copairs",
    )


def _chance(ap: pd.DataFrame, by: str) -> pd.Series:
    """The AP of a random ranking, per group: the mean share of positives among candidates."""
    share = ap["n_pos_pairs"] / ap["n_total_pairs"].where(ap["n_total_pairs"] > 0)
    return share.groupby(ap[by], sort=False).mean()


def replicates_across_plates(meta: pd.DataFrame, plate_column: str = "Metadata_Plate") -> bool:
    """Whether any non-control perturbation has wells on two plates (else replicate retrieval
    with positives from other plates has nothing to find)."""
    if plate_column not in meta:
        return False
    rows = meta[~meta["Metadata_IsControl"].astype(bool)]
    return bool((rows.groupby("Metadata_Perturbation")[plate_column].nunique() > 1).any())


def _plates_differ(meta: pd.DataFrame, same_plate: bool, plate_column: str) -> list[str]:
    if same_plate:
        return []
    if plate_column not in meta:
        raise ValueError(
            f"positives from other plates need a {plate_column!r} column: pass same_plate=True "
            "(CLI: --same-plate-replicates) to count replicates on any plate"
        )
    return [plate_column]


def replicate_retrieval(
    x: np.ndarray,
    meta: pd.DataFrame,
    same_plate: bool = False,
    plate_column: str = "Metadata_Plate",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replicate retrieval mAP with copairs (cosine).

    Each non-control well (``meta``: ``Metadata_Perturbation``, ``Metadata_IsControl``, the
    plate column) ranks every well of another perturbation, controls included, and its
    replicates; the positives are its replicates on other plates (``same_plate=True``: on any
    plate). Replicates on its own plate are left out of its ranking by default.

    Returns ``(wells, per_perturbation)``: copairs' per-well table (``average_precision``,
    ``n_pos_pairs``, ``n_total_pairs``), and per perturbation ``mAP`` and ``chance``.
    """
    import pandas as pd

    pert = "Metadata_Perturbation"
    ap = _copairs_ap(
        x,
        meta,
        pos_sameby=[pert],
        pos_diffby=_plates_differ(meta, same_plate, plate_column),
        neg_sameby=[],
        neg_diffby=[pert],
    )
    ap = ap[~ap["Metadata_IsControl"].astype(bool)]
    ap = ap[ap["n_pos_pairs"] > 0]
    if ap.empty:
        return ap, pd.DataFrame(columns=[pert, "mAP", "chance"])
    groups = ap.groupby(pert, sort=False)["average_precision"]
    table = pd.DataFrame({"mAP": groups.mean(), "chance": _chance(ap, pert)})
    return ap, table.rename_axis(pert).reset_index()


def phenotypic_activity(
    x: np.ndarray,
    meta: pd.DataFrame,
    same_plate: bool = False,
    plate_column: str = "Metadata_Plate",
    null_size: int = NULL_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """Phenotypic activity with copairs: each perturbation's replicates retrieved against the
    negative controls (the only negatives; copairs' reference-index recipe), positives from
    other plates unless ``same_plate``.

    Per perturbation: ``mAP``, ``chance``, ``p_value`` (copairs' permutation null),
    ``corrected_p_value`` (Benjamini–Hochberg over the perturbations) and ``active``
    (corrected p < :data:`FDR`).
    """
    import pandas as pd
    from copairs.matching import assign_reference_index

    pert = "Metadata_Perturbation"
    columns = [pert, "mAP", "chance", "p_value", "corrected_p_value", "active"]
    controls = meta["Metadata_IsControl"].to_numpy(bool)
    df = assign_reference_index(
        meta.reset_index(drop=True), np.flatnonzero(controls), reference_col=_REFERENCE
    )
    ap = _copairs_ap(
        x,
        df,
        pos_sameby=[pert, _REFERENCE],
        pos_diffby=_plates_differ(meta, same_plate, plate_column),
        neg_sameby=[],
        neg_diffby=[pert, _REFERENCE],
    )
    ap = ap[~controls]
    ap = ap[ap["n_pos_pairs"] > 0]
    if ap.empty:
        return pd.DataFrame(columns=columns)
    result = _copairs_map(ap, [pert], null_size, seed)
    result = result.rename(columns={"mean_average_precision": "mAP"})
    result["chance"] = result[pert].map(_chance(ap, pert))
    result["active"] = result["below_corrected_p"].astype(bool)
    return result[columns]


def phenotypic_consistency(
    profiles: np.ndarray,
    names: Sequence[str],
    groups: Sequence[object],
    column: str = "Metadata_Relationship",
    null_size: int = NULL_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """Phenotypic consistency with copairs: aggregated perturbation profiles (``names``) retrieved
    against each other; positives share the annotation ``groups`` (e.g. a mechanism), negatives
    do not. Perturbations without an annotation are left out.

    Per annotation value: ``mAP``, ``chance``, ``p_value``, ``corrected_p_value`` (BH),
    ``retrieved`` (corrected p < :data:`FDR`) and ``n_perturbations``.
    """
    import pandas as pd

    columns = [column, "n_perturbations", "mAP", "chance", "p_value", "corrected_p_value"]
    meta = pd.DataFrame({"Metadata_Perturbation": list(names), column: list(groups)})
    keep = meta[column].notna().to_numpy()
    meta = meta[keep].astype({column: str})
    sizes = meta[column].value_counts()
    if (sizes > 1).sum() == 0 or len(sizes) < 2:
        return pd.DataFrame(columns=[*columns, "retrieved"])
    ap = _copairs_ap(
        np.asarray(profiles)[keep],
        meta,
        pos_sameby=[column],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=[column],
    )
    ap = ap[ap["n_pos_pairs"] > 0]
    if ap.empty:
        return pd.DataFrame(columns=[*columns, "retrieved"])
    result = _copairs_map(ap, [column], null_size, seed)
    result = result.rename(columns={"mean_average_precision": "mAP"})
    result["chance"] = result[column].map(_chance(ap, column))
    result["n_perturbations"] = result[column].map(sizes)
    result["retrieved"] = result["below_corrected_p"].astype(bool)
    return result[[*columns, "retrieved"]]


# -- replicate consistency with held-out controls ------------------------------------------------
def split_controls(
    controls: np.ndarray, batches: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split each batch's control wells at random into two halves: ``(fit, held_out)`` masks
    (the fit half gets the odd one)."""
    controls = np.asarray(controls, dtype=bool)
    batches = np.asarray(batches)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(controls), bool)
    for b in np.unique(batches):
        idx = rng.permutation(np.flatnonzero(controls & (batches == b)))
        held[idx[(len(idx) + 1) // 2 :]] = True
    return controls & ~held, held


def held_out_consistency(
    x: np.ndarray,
    perturbations: Sequence[str],
    controls: np.ndarray,
    batches: np.ndarray,
    method: str,
    n_null: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`replicate_consistency` with an honest null: the alignment is fit on one half of
    each batch's controls, the null is drawn from the other half (unseen by the alignment), as
    many controls from each batch as the perturbation has replicates there.
    Empty when a batch has fewer than 2 controls (nothing to hold out)."""
    import pandas as pd

    controls = np.asarray(controls, dtype=bool)
    batches = np.asarray(batches)
    fit, held = split_controls(controls, batches, seed)
    if any(held[batches == b].sum() == 0 for b in np.unique(batches)):
        return pd.DataFrame(columns=_CONSISTENCY_COLUMNS)
    aligned = align(x, fit, batches, method)
    rows = ~fit  # perturbations and the held-out controls
    labels = np.asarray([str(p) for p in perturbations])
    return replicate_consistency(
        aligned[rows], labels[rows], held[rows], n_null, seed, batches=batches[rows]
    )


def mean_replicate_cosine(x: np.ndarray, perturbations: Sequence[str], controls: np.ndarray):
    """Mean pairwise cosine of each perturbation's replicate wells (≥ 2), averaged."""
    labels = np.asarray([str(p) for p in perturbations])
    sims = cosine_similarity(x)
    scores = [
        _mean_pairwise(sims[np.ix_(idx, idx)])
        for name in dict.fromkeys(labels[~controls].tolist())
        if len(idx := np.flatnonzero((labels == name) & ~controls)) >= 2
    ]
    return float(np.mean(scores)) if scores else np.nan


@dataclass
class Evaluation:
    """Metrics of one representation (model or baseline) after alignment."""

    aligned: np.ndarray  # (N, K) aligned well profiles
    names: list[str]  # perturbations (controls excluded), in order
    profiles: np.ndarray  # (P, K) aggregated profiles
    similarity: np.ndarray  # (P, P) cosine
    replicates: pd.DataFrame  # per perturbation: retrieval, activity, held-out consistency
    pairs: pd.DataFrame | None  # annotated pairs (known-relationship recall)
    consistency: pd.DataFrame | None = None  # per annotation value (phenotypic consistency)
    metrics: dict[str, float] = field(default_factory=dict)


def _mean(table: pd.DataFrame, column: str) -> float:
    return float(table[column].astype(float).mean()) if len(table) else np.nan


def evaluate(
    x: np.ndarray,
    meta: pd.DataFrame,
    method: str = "tvn",
    batch_column: str = "Metadata_Plate",
    pairs: Sequence[tuple[str, str]] | None = None,
    n_null: int = 1000,
    seed: int = 0,
    same_plate: bool = False,
    relationship_column: str | None = None,
    null_size: int = NULL_SIZE,
    plate_column: str = "Metadata_Plate",
) -> Evaluation:
    """Align ``x`` (rows = ``meta`` rows) and compute every metric of the report.

    ``n_null``: random control sets of the held-out replicate-consistency null; ``null_size``:
    copairs' permutation null; ``same_plate``: replicates on the query's own plate count as
    positives (default: only replicates on other plates; with a single plate, same-plate
    replicates are used and ``metrics["same_plate"]`` says so); ``relationship_column``: the
    ``meta`` column of phenotypic consistency.
    """
    import pandas as pd

    controls = meta["Metadata_IsControl"].to_numpy(bool)
    for column in (batch_column, relationship_column):
        if column is not None and column not in meta:
            raise ValueError(
                f"column {column!r} is not in the table: use one of "
                f"{[c for c in meta.columns if c.startswith('Metadata_')]}"
            )
    batches = meta[batch_column].astype(str).to_numpy()
    labels = meta["Metadata_Perturbation"].astype(str).to_numpy()
    if not same_plate and not replicates_across_plates(meta, plate_column):
        same_plate = True  # no replicate on another plate to find: same-plate ones, named so
    aligned = align(x, controls, batches, method)
    names, profiles = aggregate(aligned[~controls], labels[~controls])
    sim = cosine_similarity(profiles)
    consistency = held_out_consistency(x, labels, controls, batches, method, n_null, seed)
    _, retrieval = replicate_retrieval(aligned, meta, same_plate, plate_column)
    activity = phenotypic_activity(aligned, meta, same_plate, plate_column, null_size, seed)
    activity = activity.rename(
        columns={c: f"activity_{c}" for c in activity.columns if c != "Metadata_Perturbation"}
    )
    replicates = pd.DataFrame({"Metadata_Perturbation": names})
    for table in (retrieval, activity, consistency):
        if len(table):
            replicates = replicates.merge(table, on="Metadata_Perturbation", how="left")
    metrics: dict[str, float] = {
        "same_plate": float(same_plate),
        "replicate_map": _mean(retrieval, "mAP"),
        "replicate_map_chance": _mean(retrieval, "chance"),
        "activity_map": _mean(activity, "activity_mAP"),
        "activity_map_chance": _mean(activity, "activity_chance"),
        "activity_fraction": _mean(activity, "activity_active"),
        "replicate_consistency": _mean(consistency, "consistent"),
        "replicate_cosine": mean_replicate_cosine(aligned, labels, controls),
    }
    groups = None
    if relationship_column is not None:
        per_pert = meta[~controls].drop_duplicates("Metadata_Perturbation")
        lookup = dict(
            zip(per_pert["Metadata_Perturbation"].astype(str), per_pert[relationship_column])
        )
        groups = phenotypic_consistency(
            profiles, names, [lookup.get(n) for n in names], relationship_column, null_size, seed
        )
        metrics |= {
            "consistency_map": _mean(groups, "mAP"),
            "consistency_map_chance": _mean(groups, "chance"),
            "consistency_fraction": _mean(groups, "retrieved"),
        }
    table = None
    if pairs:
        summary, table = relationship_recall(sim, names, pairs)
        metrics |= {
            f"relationship_{k}" if k != "recall" else "relationship_recall": v
            for k, v in summary.items()
        }
    return Evaluation(aligned, names, profiles, sim, replicates, table, groups, metrics)
