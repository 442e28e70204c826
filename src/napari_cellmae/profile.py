"""Profiles from embeddings: join a platemap, align on controls, aggregate, relate, evaluate.

The EFAAR steps (Celik et al. 2024, *Building, benchmarking, and exploring perturbative maps of
transcriptional and morphological data*) on the tables of :mod:`napari_cellmae.embed`:

- **Align** on negative controls, per batch (a plate by default):
  ``center-scale`` (subtract the batch's control mean, divide by its control std);
  ``pca-cs`` (PCA fit on all controls, then center-scale); ``tvn`` (typical variation
  normalisation: PCA fit on controls, center-scale, then per batch whitening with the inverse
  square root of the batch's control covariance + 0.5·I).
- **Aggregate**: the mean aligned profile of each perturbation over its replicate wells.
- **Relate and evaluate**: cosine similarities between perturbations; replicate consistency against
  a null from controls (fraction of perturbations whose replicates agree more than the 95th
  percentile of random control sets of the same size); replicate retrieval mAP (each replicate
  well ranks all other wells by cosine; positives are the other replicates); known-relationship
  recall (fraction of annotated pairs whose cosine is in the top or bottom 5% of all pairwise
  cosines; 0.10 by chance).

Every report computes the same metrics for a baseline made from the same fields: PCA of the classic
intensity/texture statistics of :mod:`napari_cellmae.features`, aligned the same way. Nothing
assumes the model wins. numpy only; the report (Markdown + tables) is
:mod:`napari_cellmae.profiling`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

ALIGNMENTS = ("none", "center-scale", "pca-cs", "tvn")
TVN_REGULARIZATION = 0.5
CONTROL_QUANTILE = 0.95
RECALL_FRACTION = 0.05
_EPS = 1e-8

# platemap column aliases (lower case, without "metadata_")
_ALIASES = {
    "Metadata_Plate": ("plate", "plate_id", "plate_name", "barcode", "plate_barcode"),
    "Metadata_Well": ("well", "well_id", "well_position", "position"),
    "Metadata_Perturbation": (
        "perturbation",
        "pert",
        "treatment",
        "compound",
        "gene",
        "sirna",
        "pert_iname",
        "broad_sample",
        "condition",
    ),
    "Metadata_IsControl": ("iscontrol", "is_control", "control", "negcon", "is_negcon"),
    "Metadata_Batch": ("batch", "batch_id", "experiment"),
}
_TRUE = {"true", "1", "yes", "y", "t", "control", "negcon", "ctrl"}


# -- platemaps and pairs --------------------------------------------------------------------------
def read_platemap(
    platemap: str | os.PathLike | pd.DataFrame, controls: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read a platemap (CSV or DataFrame) into ``Metadata_Plate`` (optional), ``Metadata_Well``,
    ``Metadata_Perturbation``, ``Metadata_IsControl`` (bool), ``Metadata_Batch`` (optional) and
    any other column (prefixed ``Metadata_``).

    Column names are matched loosely (``plate``, ``Well``, ``treatment``, ``is_control`` …).
    Controls come from the control column, or are the perturbations named in ``controls``.
    """
    import pandas as pd

    from .plates.layouts import split_well, well_name

    df = platemap.copy() if isinstance(platemap, pd.DataFrame) else _read_csv(platemap)
    where = "" if isinstance(platemap, pd.DataFrame) else str(platemap)
    renamed: dict[str, str] = {}
    for column in df.columns:
        key = re.sub(r"^metadata_", "", str(column).strip().lower())
        target = next((t for t, names in _ALIASES.items() if key in names), None)
        if target is not None and target not in renamed.values():
            renamed[column] = target
        elif not str(column).startswith("Metadata_"):
            renamed[column] = f"Metadata_{column}"
    original = [str(c) for c in df.columns]
    df = df.rename(columns=renamed)
    for needed in ("Metadata_Well", "Metadata_Perturbation"):
        if needed not in df:
            raise ValueError(
                f"platemap {where} has no {needed[9:].lower()} column (columns: {original}): "
                f"name one 'Metadata_{needed[9:]}' (or '{_ALIASES[needed][0]}')"
            )
    try:
        df["Metadata_Well"] = [well_name(*split_well(str(w))) for w in df["Metadata_Well"]]
    except ValueError as exc:
        raise ValueError(f"platemap {where}: {exc}") from None
    df["Metadata_Perturbation"] = df["Metadata_Perturbation"].astype(str)
    if "Metadata_Plate" in df:
        df["Metadata_Plate"] = df["Metadata_Plate"].astype(str)
    if controls:
        df["Metadata_IsControl"] = df["Metadata_Perturbation"].isin([str(c) for c in controls])
    elif "Metadata_IsControl" in df:
        flags = df["Metadata_IsControl"]
        df["Metadata_IsControl"] = flags.astype(str).str.strip().str.lower().isin(_TRUE)
    else:
        raise ValueError(
            f"platemap {where} does not say which wells are controls: add a column "
            "'Metadata_IsControl' (true/false), or name the control perturbation (CLI: "
            "--control DMSO)"
        )
    if not df["Metadata_IsControl"].any():
        raise ValueError(
            f"platemap {where} marks no well as a control: alignment needs negative "
            "controls on every plate (check the control column or --control)"
        )
    return df.reset_index(drop=True)


def _read_csv(path: str | os.PathLike) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"platemap {path} does not exist: check the path")
    return pd.read_csv(path, sep=None, engine="python")  # CSV or TSV


def read_pairs(pairs: str | os.PathLike | pd.DataFrame) -> list[tuple[str, str]]:
    """Annotated perturbation pairs from a CSV with two perturbation columns (the first two, or
    columns named like ``perturbation_a``/``perturbation_b``)."""
    import pandas as pd

    df = pairs if isinstance(pairs, pd.DataFrame) else _read_csv(pairs)
    if df.shape[1] < 2:
        raise ValueError(
            f"pairs file {pairs} needs two columns (one perturbation each), got {list(df.columns)}"
        )
    a, b = df.columns[:2]
    return [(str(x), str(y)) for x, y in zip(df[a], df[b]) if str(x) != str(y)]


def pairs_from_column(platemap: pd.DataFrame, column: str) -> list[tuple[str, str]]:
    """Every pair of (non-control) perturbations sharing a value of ``column`` (e.g. a mechanism
    of action or a pathway), as known relationships."""
    col = column if column in platemap else f"Metadata_{column}"
    if col not in platemap:
        raise ValueError(f"platemap has no column {column!r}: choose one of {list(platemap)}")
    pm = platemap[~platemap["Metadata_IsControl"]].drop_duplicates("Metadata_Perturbation")
    pairs = []
    for _, group in pm.groupby(col):
        names = sorted(group["Metadata_Perturbation"].astype(str))
        pairs += [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return pairs


def join_platemap(profiles: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Annotate profiles (Metadata_Plate/Well + features) with the platemap; rows without an
    annotation are dropped (``attrs["n_unannotated"]`` counts them)."""
    keys = ["Metadata_Well"] + (["Metadata_Plate"] if "Metadata_Plate" in platemap else [])
    extra = [c for c in platemap.columns if c not in profiles.columns or c in keys]
    pm = platemap[extra].drop_duplicates(keys)
    left = profiles.assign(**{k: profiles[k].astype(str) for k in keys})
    joined = left.merge(pm, on=keys, how="inner", validate="many_to_one")
    if joined.empty:
        shown = left[keys].drop_duplicates().head(3).to_dict("records")
        theirs = pm[keys].head(3).to_dict("records")
        raise ValueError(
            f"no profile matches the platemap on {keys}: embeddings have e.g. {shown}, the "
            f"platemap {theirs}; check the plate names (they come from the plate folders)"
        )
    meta = [c for c in joined.columns if c.startswith("Metadata_")]
    joined = joined[meta + [c for c in joined.columns if c not in meta]]
    joined.attrs["n_unannotated"] = len(profiles) - len(joined)
    return joined.reset_index(drop=True)


# -- alignment ------------------------------------------------------------------------------------
def center_scale(x: np.ndarray, controls: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Per batch: subtract the controls' mean, divide by their standard deviation (features
    whose control std is ~0 are only centred). x: (N, D) -> (N, D) float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for b in np.unique(batches):
        rows = batches == b
        ctrl = x[rows & controls]
        if len(ctrl) == 0:
            raise ValueError(
                f"batch {str(b)!r} has no control wells: every batch (plate) needs negative "
                "controls to align on; check the platemap's control column or --batch-column"
            )
        mean, std = ctrl.mean(axis=0), ctrl.std(axis=0)
        std[std < _EPS * max(1.0, float(np.abs(x[rows]).max(initial=0.0)))] = 1.0
        out[rows] = (x[rows] - mean) / std
    return out


def pca_on_controls(
    x: np.ndarray, controls: np.ndarray, n_components: int | None = None
) -> np.ndarray:
    """Project ``x`` onto the principal axes of its control rows (centred on the controls'
    mean); components with ~zero control variance are dropped. (N, D) -> (N, K)."""
    x = np.asarray(x, dtype=np.float64)
    ctrl = x[controls]
    if len(ctrl) < 2:
        raise ValueError("PCA on controls needs at least 2 control wells; add controls")
    mean = ctrl.mean(axis=0)
    _, s, vt = np.linalg.svd(ctrl - mean, full_matrices=False)
    keep = s > s[0] * 1e-6 if s[0] > 0 else np.zeros_like(s, bool)
    k = int(keep.sum()) if n_components is None else min(int(n_components), int(keep.sum()))
    return (x - mean) @ vt[:k].T


def tvn(
    x: np.ndarray,
    controls: np.ndarray,
    batches: np.ndarray,
    regularization: float = TVN_REGULARIZATION,
    n_components: int | None = None,
) -> np.ndarray:
    """Typical variation normalisation: PCA fit on controls, center-scale on each batch's
    controls, then per batch ``x @ (cov(controls_b) + r·I)^(-1/2)``. (N, D) -> (N, K)."""
    z = center_scale(pca_on_controls(x, controls, n_components), controls, batches)
    out = np.empty_like(z)
    for b in np.unique(batches):
        rows = batches == b
        ctrl = z[rows & controls]
        cov = np.cov(ctrl, rowvar=False, ddof=1) if len(ctrl) > 1 else np.zeros((z.shape[1],) * 2)
        cov = np.atleast_2d(cov) + regularization * np.eye(z.shape[1])
        w, v = np.linalg.eigh(cov)  # symmetric positive definite: the inverse root is exact
        out[rows] = z[rows] @ (v * w**-0.5) @ v.T
    return out


def align(
    x: np.ndarray,
    controls: np.ndarray,
    batches: np.ndarray,
    method: str = "tvn",
    n_components: int | None = None,
) -> np.ndarray:
    """Align features on controls per batch: ``none``, ``center-scale``, ``pca-cs`` or ``tvn``."""
    controls = np.asarray(controls, dtype=bool)
    batches = np.asarray(batches)
    if method == "none":
        return np.asarray(x, dtype=np.float64)
    if method == "center-scale":
        return center_scale(x, controls, batches)
    if method == "pca-cs":
        return center_scale(pca_on_controls(x, controls, n_components), controls, batches)
    if method == "tvn":
        return tvn(x, controls, batches, n_components=n_components)
    raise ValueError(f"unknown alignment {method!r}: choose one of {', '.join(ALIGNMENTS)}")


def baseline_pca(features: np.ndarray, n_components: int | None = None) -> np.ndarray:
    """The baseline representation: z-scored statistics (constant ones dropped) -> PCA.
    (N, F) -> (N, K), K = min(n_components or 64, F, N - 1)."""
    x = np.asarray(features, dtype=np.float64)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    std = x.std(axis=0)
    x = (x[:, std > _EPS] - x.mean(axis=0)[std > _EPS]) / std[std > _EPS]
    k = max(1, min(n_components or 64, x.shape[1], max(1, x.shape[0] - 1)))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:k].T


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
) -> pd.DataFrame:
    """Per perturbation with ≥ 2 replicate wells: the mean pairwise cosine of its replicates,
    the same for ``n_null`` random sets of as many control wells (the null), its ``quantile``,
    the p-value and whether it is exceeded."""
    import pandas as pd

    controls = np.asarray(controls, dtype=bool)
    labels = np.asarray([str(p) for p in perturbations])
    sims = cosine_similarity(x)
    ctrl = np.flatnonzero(controls)
    rng = np.random.default_rng(seed)
    nulls: dict[int, np.ndarray] = {}
    rows = []
    for name in dict.fromkeys(labels[~controls].tolist()):
        idx = np.flatnonzero((labels == name) & ~controls)
        k = len(idx)
        if k < 2:
            continue
        if k not in nulls:
            if len(ctrl) < k:
                nulls[k] = np.array([])
            else:
                draws = [rng.choice(ctrl, size=k, replace=False) for _ in range(n_null)]
                nulls[k] = np.array([_mean_pairwise(sims[np.ix_(d, d)]) for d in draws])
        score = _mean_pairwise(sims[np.ix_(idx, idx)])
        null = nulls[k]
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
    return pd.DataFrame(rows)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of ranking ``scores`` (high first) for the boolean ``positive`` labels."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    if not hits.any():
        return np.nan
    ranks = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def replicate_map(
    x: np.ndarray, perturbations: Sequence[str], controls: np.ndarray
) -> pd.DataFrame:
    """Replicate retrieval: each non-control well ranks every other well (controls included)
    by cosine; positives are its replicates. Per perturbation: mean AP, and the AP expected from
    a random ranking (the positives' share of the candidates)."""
    import pandas as pd

    controls = np.asarray(controls, dtype=bool)
    labels = np.asarray([str(p) for p in perturbations])
    sims = cosine_similarity(x)
    rows = []
    for name in dict.fromkeys(labels[~controls].tolist()):
        idx = np.flatnonzero((labels == name) & ~controls)
        if len(idx) < 2:
            continue
        aps = []
        for q in idx:
            others = np.arange(len(labels)) != q
            aps.append(average_precision(sims[q, others], (labels == name)[others]))
        chance = (len(idx) - 1) / (len(labels) - 1)
        rows.append({"Metadata_Perturbation": name, "mAP": float(np.mean(aps)), "chance": chance})
    return pd.DataFrame(rows)


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


@dataclass
class Evaluation:
    """Metrics of one representation (model or baseline) after alignment."""

    aligned: np.ndarray  # (N, K) aligned well profiles
    names: list[str]  # perturbations (controls excluded), in order
    profiles: np.ndarray  # (P, K) aggregated profiles
    similarity: np.ndarray  # (P, P) cosine
    replicates: pd.DataFrame  # per perturbation: consistency + mAP
    pairs: pd.DataFrame | None
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate(
    x: np.ndarray,
    meta: pd.DataFrame,
    method: str = "tvn",
    batch_column: str = "Metadata_Plate",
    pairs: Sequence[tuple[str, str]] | None = None,
    n_null: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Align ``x`` (rows = ``meta`` rows) and compute every metric of the report."""
    controls = meta["Metadata_IsControl"].to_numpy(bool)
    if batch_column not in meta:
        raise ValueError(
            f"batch column {batch_column!r} is not in the table: use one of "
            f"{[c for c in meta.columns if c.startswith('Metadata_')]}"
        )
    batches = meta[batch_column].astype(str).to_numpy()
    labels = meta["Metadata_Perturbation"].astype(str).to_numpy()
    aligned = align(x, controls, batches, method)
    names, profiles = aggregate(aligned[~controls], labels[~controls])
    sim = cosine_similarity(profiles)
    consistency = replicate_consistency(aligned, labels, controls, n_null, seed)
    retrieval = replicate_map(aligned, labels, controls)
    replicates = consistency.merge(retrieval, on="Metadata_Perturbation", how="outer")
    metrics: dict[str, float] = {
        "replicate_consistency": float(consistency["consistent"].mean())
        if len(consistency)
        else np.nan,
        "replicate_cosine": float(consistency["replicate_cosine"].mean())
        if len(consistency)
        else np.nan,
        "replicate_map": float(retrieval["mAP"].mean()) if len(retrieval) else np.nan,
        "replicate_map_chance": float(retrieval["chance"].mean()) if len(retrieval) else np.nan,
    }
    table = None
    if pairs:
        summary, table = relationship_recall(sim, names, pairs)
        metrics |= {
            f"relationship_{k}" if k != "recall" else "relationship_recall": v
            for k, v in summary.items()
        }
    return Evaluation(aligned, names, profiles, sim, replicates, table, metrics)


def __getattr__(name: str) -> Any:
    # the report (napari_cellmae.profiling) builds on this module: resolved on first use
    if name in ("profile_report", "load_tables", "ProfileReport"):
        from . import profiling as report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
