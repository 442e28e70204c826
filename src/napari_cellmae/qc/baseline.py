"""The classic QC baseline: CellProfiler metrics judged by plate-independent gates and by robust
per-plate, per-channel z-scores anchored on the plate's plausible images.

This is how image-based profiling pipelines flag images today (CellProfiler MeasureImageQuality
+ thresholds), and the baseline the learned QC head must beat. Two kinds of rules:

**Gates** (plate-independent, :class:`Gate`): a metric beyond an absolute limit is an artefact
whatever the rest of the plate looks like, so a failed-autofocus plate where most fields are
blurred is still caught:

==========  ================  ======  ==================================================
class       metric            limit   why
==========  ================  ======  ==================================================
blur        PowerLogLogSlope  < −2.87 blur removes high frequencies (clean min − 0.3)
noise       PowerLogLogSlope  > 0.2   white noise flattens the spectrum towards +1 (clean
                                      max + 0.3, at least 0: power rising with frequency)
saturation  PercentMaximal    > 1 %   many pixels at the image's maximum (Broad's pooled
                                      Cell Painting recipe: > 1 %)
==========  ================  ======  ==================================================

The limits come from the clean real sources: :func:`fit_calibration` (run by
``benchmarks/calibrate_classic_qc.py``, which judges it leave-one-source-out) gives the
constants of :data:`DEFAULT_CALIBRATION`. A gate's score is ``threshold + (distance beyond the
limit) / unit``: exactly the threshold at the limit.

**Plate z-scores** (:data:`RULES`) sharpen the verdict: within each plate and channel, each
metric (its log for ratios and intensity-scaled metrics, so z measures relative change)
becomes z = (x − median) / max(1.4826 · MAD, floor), median and MAD taken over the **anchor**:
the group's images that pass every gate. When most of a plate is blurred beyond the gate, its
sharp fields are the anchor and the blurred ones stand out, not the other way round. A plate
that is mostly blurred but within the gate is recognised by its median PowerLogLogSlope below
``plate_blur_limit`` (the lowest median of a clean plate − 0.3) together with a sharper cluster
(at least :data:`MIN_SHARP` images :data:`SHARP_GAP` above that median): that cluster becomes the
anchor. A clean plate with a naturally low slope has no such cluster. With fewer than
:data:`MIN_ANCHOR` plausible images the group has no plate z-scores (the gates alone judge it:
statistics of a handful of images are noise). The floor is the smallest difference that counts
as evidence: a very uniform plate would otherwise turn tiny differences into large z.

==========  =========================  ====  =====  =========================================
class       metric                     bad   floor  why
==========  =========================  ====  =====  =========================================
blur        PowerLogLogSlope           low   0.15   blur removes high frequencies
blur        Correlation_N              high  0.08   neighbouring pixels become alike
blur        log FocusScore             low   0.20   less variance for the same mean
noise       log MADRatio               high  0.10   MAD / median: shot and read noise spread
                                                    the typical pixel
saturation  PercentMaximal             high  0.25   many pixels at the image's maximum
empty       log StdIntensity           low   0.15   no cells: nothing varies (a low mean alone
                                                    is a sparse field, not an empty one)
debris      log MaxIntensity           high  0.10   objects much brighter than cells
background  log LowerQuartileRatio     low   0.15   lower quartile / median: a bias field or
                                                    vignetting spreads the dim half
background  Correlation_N              high  0.08   a smooth bias correlates distant pixels
==========  =========================  ====  =====  =========================================

The class score of an image is the largest score of its class's gates and rules; the image is
flagged when any score exceeds the threshold (:data:`DEFAULT_Z`, fitted so that at most 1 % of
the clean real fields are flagged), with the class and rule of the largest as the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

MAD_TO_SD = 1.4826
# plate and channel (the run tables use Metadata_Channel, measure_field "channel")
GROUP_BY = ("Metadata_Plate", "Metadata_Channel", "channel")
MIN_ANCHOR = 6  # fewer plausible images than this in a group: no plate z-scores
MIN_SHARP = 3  # a mostly-blurred group's sharp cluster needs this many images to anchor it
SHARP_GAP = 0.45  # ... each this much above the group's median PowerLogLogSlope (3 floors)


class Rule(NamedTuple):
    """A plate z-score rule."""

    qc_class: str
    metric: str  # without the QC_ prefix; "{n}" is replaced by the spatial scale
    sign: int  # +1: high values are bad, -1: low values are bad
    robust: bool = True  # median/MAD z (False: mean/SD)
    log: bool = False  # z of log(x): intensity-scaled metrics, z measures relative change
    floor: float = 0.0  # the smallest spread (in the metric's, or its log's, units)


class Gate(NamedTuple):
    """A plate-independent limit: ``sign · (x − limit) > 0`` is an artefact of ``qc_class``."""

    qc_class: str
    metric: str  # a QC_ metric without the prefix, or a name of DERIVED
    sign: int  # +1: above the limit is bad, -1: below
    limit: float
    unit: float  # how far beyond the limit one z unit is


RULES: tuple[Rule, ...] = (
    Rule("blur", "PowerLogLogSlope", -1, floor=0.15),
    Rule("blur", "Correlation_{n}", +1, floor=0.08),
    Rule("blur", "FocusScore", -1, log=True, floor=0.20),
    Rule("noise", "MADRatio", +1, log=True, floor=0.10),
    Rule("saturation", "PercentMaximal", +1, floor=0.25),
    Rule("empty", "StdIntensity", -1, log=True, floor=0.15),
    Rule("debris", "MaxIntensity", +1, log=True, floor=0.10),
    Rule("background", "LowerQuartileRatio", -1, log=True, floor=0.15),
    Rule("background", "Correlation_{n}", +1, floor=0.08),
)
BASELINE_CLASSES = ("blur", "saturation", "debris", "noise", "empty", "background")


def _mad_ratio(images: pd.DataFrame) -> np.ndarray:
    """MAD / median intensity: the relative spread of the typical pixel, which shot and read
    noise raise (scale-free; NaN when the median is not positive)."""
    med = images["QC_MedianIntensity"].to_numpy(np.float64)
    mad = images["QC_MADIntensity"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(med > 0, mad / np.where(med > 0, med, 1.0), np.nan)


def _lower_quartile_ratio(images: pd.DataFrame) -> np.ndarray:
    """Lower quartile / median intensity: an uneven background (bias field, vignetting) spreads
    the dim half of the pixels away from the typical one (scale-free)."""
    med = images["QC_MedianIntensity"].to_numpy(np.float64)
    lq = images["QC_LowerQuartileIntensity"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(med > 0, lq / np.where(med > 0, med, 1.0), np.nan)


DERIVED = {
    "MADRatio": _mad_ratio,
    "LowerQuartileRatio": _lower_quartile_ratio,
}


@dataclass(frozen=True)
class Calibration:
    """The default threshold for the plate z-scores and the gates (see the module doc)."""

    z: float
    gates: tuple[Gate, ...]
    # a group whose typical (median) PowerLogLogSlope is below this and that has a sharper cluster
    # is taken to be mostly blurred: its sharp cluster becomes the anchor (None: never)
    plate_blur_limit: float | None = None

    def anchor(self, images: pd.DataFrame, rows: np.ndarray, plausible: np.ndarray) -> np.ndarray:
        """The anchor of one plate/channel group (positions ``rows``): its plausible images, or,
        when the group is mostly blurred, the plausible images of its sharp cluster — at least
        MIN_SHARP images with PowerLogLogSlope ≥ the group's median + SHARP_GAP."""
        keep = plausible[rows].copy()
        if keep.sum() < MIN_ANCHOR:  # a handful of images: their statistics are noise
            return np.zeros(len(rows), bool)
        if self.plate_blur_limit is None or "QC_PowerLogLogSlope" not in images.columns:
            return keep
        p = images["QC_PowerLogLogSlope"].to_numpy(np.float64)[rows]
        ok = keep & np.isfinite(p)
        if not ok.any():
            return keep
        median = float(np.median(p[ok]))
        sharp = ok & (p >= median + SHARP_GAP)
        if median < self.plate_blur_limit and sharp.sum() >= MIN_SHARP:
            return sharp
        return keep

    def gate_scores(self, images: pd.DataFrame, threshold: float) -> pd.DataFrame:
        """One column ``g_<class>_<metric>`` per gate: its score in z units (threshold at the
        limit; NaN where the metric is missing or not finite)."""
        import pandas as pd

        out = pd.DataFrame(index=images.index)
        for gate in self.gates:
            x = _metric_values(images, gate.metric)
            with np.errstate(invalid="ignore"):
                score = threshold + gate.sign * (x - gate.limit) / gate.unit
            out[f"g_{gate.qc_class}_{gate.metric}"] = np.where(
                np.isnan(x), np.nan, np.clip(score, -1e6, 1e6)
            )
        return out


# Fitted on every clean real source by benchmarks/calibrate_classic_qc.py (see docs/qc.md for
# the command and the leave-one-source-out table).
DEFAULT_CALIBRATION = Calibration(
    z=3.2,
    gates=(
        Gate("blur", "PowerLogLogSlope", -1, -2.87, 0.15),
        Gate("noise", "PowerLogLogSlope", +1, 0.2, 0.15),
        Gate("saturation", "PercentMaximal", +1, 1.0, 0.25),
    ),
    plate_blur_limit=-2.28,
)
DEFAULT_Z = DEFAULT_CALIBRATION.z


def _metric_values(images: pd.DataFrame, metric: str) -> np.ndarray:
    if metric in DERIVED:
        return DERIVED[metric](images)
    col = f"QC_{metric}"
    if col not in images.columns:
        raise ValueError(
            f"The baseline needs the metric column {col!r}: measure with "
            "napari_cellmae.qc.metrics.measure_field(..., scales=(20,))."
        )
    return images[col].to_numpy(dtype=np.float64)


def _rule_values(images: pd.DataFrame, rule: Rule, scale: int) -> np.ndarray:
    metric = "QC_" + rule.metric.format(n=scale)
    if rule.metric in DERIVED:
        values = DERIVED[rule.metric](images)
    elif metric not in images.columns:
        raise ValueError(
            f"The baseline needs the metric column {metric!r}: measure with scale {scale} "
            "(napari_cellmae.qc.metrics.measure_field(..., scales=(20,)))."
        )
    else:
        values = images[metric].to_numpy(dtype=np.float64)
    if rule.log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log(np.where(values > 0, values, np.nan))
    return values


def _zscore(values: np.ndarray, anchor: np.ndarray, robust: bool, floor: float) -> np.ndarray:
    """z of ``values`` against the finite ``anchor`` images (median/MAD or mean/SD, spread ≥
    floor); zeros when fewer than MIN_SHARP anchor images are finite (a group with fewer than
    MIN_ANCHOR plausible images gets no anchor at all, see :meth:`Calibration.anchor`)."""
    ref = values[anchor & np.isfinite(values)]
    if len(ref) < MIN_SHARP:
        return np.where(np.isfinite(values), 0.0, np.nan)
    if robust:
        centre = np.median(ref)
        spread = MAD_TO_SD * np.median(np.abs(ref - centre))
        if spread <= 0:
            spread = ref.std()
    else:
        centre, spread = ref.mean(), ref.std()
    spread = max(spread, floor)
    if spread <= 0:  # every image alike and no floor: nothing stands out
        return np.where(np.isfinite(values), 0.0, np.nan)
    return (values - centre) / spread


def zscores(
    images: pd.DataFrame,
    group_by: Sequence[str] = GROUP_BY,
    scale: int = 20,
    calibration: Calibration | None = None,
) -> pd.DataFrame:
    """Signed rule z-scores per image: one column ``z_<class>_<metric>`` per rule (high = bad).

    ``images`` has one row per image with ``QC_<metric>`` columns; the statistics are taken
    within each group of ``group_by`` (plate and channel by default; absent columns ignored),
    over the group's images that pass the calibration's gates (the anchor).
    """
    import pandas as pd

    cal = calibration or DEFAULT_CALIBRATION
    keys = [k for k in group_by if k in images.columns]
    out = pd.DataFrame(index=images.index)
    groups = images.groupby(keys, sort=False).indices if keys else {(): np.arange(len(images))}
    gates = cal.gate_scores(images, cal.z).to_numpy()
    plausible = ~(np.nan_to_num(gates, nan=-np.inf) > cal.z).any(axis=1) if len(gates.T) else None
    if plausible is None:
        plausible = np.ones(len(images), bool)
    anchors = {key: cal.anchor(images, rows, plausible) for key, rows in groups.items()}
    for rule in RULES:
        values = _rule_values(images, rule, scale)
        z = np.full(len(images), np.nan)
        for key, rows in groups.items():
            z[rows] = rule.sign * _zscore(values[rows], anchors[key], rule.robust, rule.floor)
        out[f"z_{rule.qc_class}_{rule.metric.format(n=scale)}"] = z
    return out


def class_scores(z: pd.DataFrame) -> pd.DataFrame:
    """Per image and class, the largest rule z (or gate score) of that class (columns =
    BASELINE_CLASSES); ``z`` holds ``z_<class>_<metric>`` and/or ``g_<class>_<metric>``."""
    import pandas as pd

    out = pd.DataFrame(index=z.index)
    for cls in BASELINE_CLASSES:
        cols = [c for c in z.columns if c.startswith((f"z_{cls}_", f"g_{cls}_"))]
        out[cls] = z[cols].max(axis=1, skipna=True).fillna(0.0) if cols else 0.0
    return out


def baseline_flags(
    images: pd.DataFrame,
    threshold: float = DEFAULT_Z,
    group_by: Sequence[str] = GROUP_BY,
    scale: int = 20,
    calibration: Calibration | None = None,
) -> pd.DataFrame:
    """Flags and reasons of the gates and z-score rules, one row per image (same index as
    ``images``).

    Columns: ``QC_Baseline_<class>`` (class scores, in z units), ``QC_Baseline_Score`` (the
    largest), ``QC_Baseline_Class`` ("ok" or the class of the largest exceedance),
    ``QC_Baseline_Flag`` (score > threshold) and ``QC_Baseline_Reason`` (e.g.
    ``"blur: PowerLogLogSlope z=-3.4"`` or ``"blur: PowerLogLogSlope -3.12 < -2.87"``).
    """
    import pandas as pd

    cal = calibration or DEFAULT_CALIBRATION
    z = zscores(images, group_by, scale, cal)
    gates = cal.gate_scores(images, threshold)
    both = pd.concat([z, gates], axis=1)
    scores = class_scores(both)
    out = scores.add_prefix("QC_Baseline_")
    best = both.to_numpy(dtype=np.float64)
    best = np.where(np.isfinite(best), best, -np.inf)
    top = best.argmax(axis=1) if best.shape[1] else np.zeros(len(both), int)
    top_z = best[np.arange(len(both)), top] if len(both) else np.zeros(0)
    flag = top_z > threshold
    rules = {f"z_{r.qc_class}_{r.metric.format(n=scale)}": r for r in RULES}
    gate_of = {f"g_{g.qc_class}_{g.metric}": g for g in cal.gates}
    reasons, classes = [], []
    for i, (col, value, f) in enumerate(zip(np.asarray(both.columns)[top], top_z, flag)):
        if not f:
            reasons.append("")
            classes.append("ok")
            continue
        if col in gate_of:
            gate = gate_of[col]
            x = _metric_values(images.iloc[[i]], gate.metric)[0]
            op = ">" if gate.sign > 0 else "<"
            reasons.append(f"{gate.qc_class}: {gate.metric} {x:.3g} {op} {gate.limit:g}")
            classes.append(gate.qc_class)
        else:
            rule = rules[col]
            metric = rule.metric.format(n=scale)
            shown = rule.sign * value  # the metric's own z, with its sign
            reasons.append(f"{rule.qc_class}: {metric} z={shown:+.1f}")
            classes.append(rule.qc_class)
    out["QC_Baseline_Score"] = np.where(np.isfinite(top_z), top_z, 0.0)
    out["QC_Baseline_Class"] = classes
    out["QC_Baseline_Flag"] = flag
    out["QC_Baseline_Reason"] = reasons
    return out


GATE_MARGIN = 0.3  # PowerLogLogSlope limits lie this far beyond the clean sources' extremes
NOISE_LIMIT = 0.0  # PowerLogLogSlope > 0: more power at high than at low frequencies
SATURATION_LIMIT = 1.0  # % of pixels at the maximum (Broad's pooled Cell Painting recipe)
Z_GRID = tuple(np.round(np.arange(2.0, 8.01, 0.1), 1))  # the QC tab slider steps by 0.1


def fit_calibration(
    clean: pd.DataFrame,
    target_rate: float = 0.01,
    group_by: Sequence[str] = GROUP_BY,
    scale: int = 20,
    field_by: Sequence[str] | None = None,
) -> Calibration:
    """Fit the gates and the default threshold on images of clean sources (nothing spoilt).

    Gates: PowerLogLogSlope below the clean minimum − GATE_MARGIN is blur, above the clean
    maximum + GATE_MARGIN noise; PercentMaximal above max(SATURATION_LIMIT, 2 × the clean
    maximum) saturation. Mostly-blurred limit: the lowest median PowerLogLogSlope of a clean
    plate/channel group (of at least MIN_ANCHOR images) − GATE_MARGIN. Threshold: the smallest
    of Z_GRID at which at most ``target_rate`` of the clean images are flagged — or of the
    fields, when ``field_by`` names the columns that identify a field (a field is flagged when
    any of its channels is).
    """
    plls = clean["QC_PowerLogLogSlope"].to_numpy(np.float64)
    pmax = clean["QC_PercentMaximal"].to_numpy(np.float64)
    if not np.isfinite(plls).any():
        raise ValueError("fit_calibration needs clean images with finite QC_ metrics.")
    unit = next(r.floor for r in RULES if r.metric == "PowerLogLogSlope")
    gates = (
        Gate("blur", "PowerLogLogSlope", -1, round(float(np.nanmin(plls)) - GATE_MARGIN, 2), unit),
        Gate(
            "noise",
            "PowerLogLogSlope",
            +1,
            round(max(NOISE_LIMIT, float(np.nanmax(plls)) + GATE_MARGIN), 2),
            unit,
        ),
        Gate(
            "saturation",
            "PercentMaximal",
            +1,
            round(max(SATURATION_LIMIT, 2 * float(np.nanmax(pmax))), 2),
            next(r.floor for r in RULES if r.metric == "PercentMaximal"),
        ),
    )
    keys = [k for k in group_by if k in clean.columns]
    groups = clean.groupby(keys, sort=False).indices if keys else {(): np.arange(len(clean))}
    medians = [np.nanmedian(plls[r]) for r in groups.values() if len(r) >= MIN_ANCHOR]
    plate_limit = round(float(min(medians)) - GATE_MARGIN, 2) if medians else None
    for z in Z_GRID:
        cal = Calibration(float(z), gates, plate_limit)
        flags = baseline_flags(clean, float(z), group_by, scale, cal)["QC_Baseline_Flag"]
        if field_by:
            flags = flags.groupby([clean[k] for k in field_by]).any()
        rate = float(flags.mean())
        if rate <= target_rate:
            return cal
    return Calibration(float(Z_GRID[-1]), gates, plate_limit)


# -- the head's verdict with classic evidence --------------------------------------------------
# The head's debris, background, saturation and empty count only as far as the classic rules see
# something wrong with the image: P(class) × sigmoid(EVIDENCE_SLOPE · (classic score −
# EVIDENCE_Z)), the weight taken off going to "ok". The classic score (QC_Baseline_Score: the
# largest plate z-score or gate score, in z units, at the default threshold) says whether the
# image is off; the head says what is wrong with it (the classic rules often name another class:
# synthetic debris on transfluor reads as saturation). Leave-one-source-out
# (benchmarks/eval_qc.py, docs/qc.md) the bare head flags 47% of the clean fields of a source it
# has not seen, mostly as "background" and "debris" (8-bit transfluor and ExampleHuman, whose
# embeddings differ from every other source's); weighed so, 1.2%, at the same ROC-AUC, but it
# then also flags fewer mild debris, background and empty artefacts (the table in docs/qc.md).
# EVIDENCE_Z = 2 was the best of 0–3.2 on that table (every source together, none judged alone).
# Blur and noise are left to the head: they did not fire on unseen clean sources, what the head
# learnt for them is plate-independent (the slope of the power spectrum, the spread of the
# typical pixel), and the classic z-scores of a mostly-defocused plate can take its blurred
# majority for the norm. Empty is not: left to the head, it called 43% of the thinned (sparse,
# ok) transfluor fields empty leave-one-source-out.
EVIDENCE_Z = 2.0
EVIDENCE_SLOPE = 1.0
HEAD_ONLY_CLASSES = ("blur", "noise")


def with_classic_evidence(
    proba: np.ndarray,
    base: pd.DataFrame,
    centre: float = EVIDENCE_Z,
    slope: float = EVIDENCE_SLOPE,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """The head's probabilities (N, K; columns ``classes``, default the head's CLASSES order)
    with each artefact class but :data:`HEAD_ONLY_CLASSES` weighed by the classic evidence that
    the image is off (see above); the weight taken off goes to "ok", so rows still sum to 1.
    ``base``: :func:`baseline_flags` of the same images (same row order) at the default threshold
    :data:`DEFAULT_Z` (gate scores depend on it). In a plate/channel group too small for plate
    z-scores (fewer than MIN_ANCHOR plausible images) only the gates give evidence.
    """
    from .head import CLASSES

    classes = tuple(classes or CLASSES)
    p = np.asarray(proba, np.float64)
    if p.shape != (len(base), len(classes)):
        raise ValueError(f"probabilities {p.shape} do not match {len(base)} baseline rows.")
    score = np.nan_to_num(base["QC_Baseline_Score"].to_numpy(np.float64))
    weight = 1.0 / (1.0 + np.exp(-slope * (score - centre)))
    q = p.copy()
    for k, cls in enumerate(classes):
        if cls != "ok" and cls not in HEAD_ONLY_CLASSES:
            q[:, k] = p[:, k] * weight
    if "ok" in classes:
        k = classes.index("ok")
        q[:, k] = 1.0 - (q.sum(axis=1) - q[:, k])
    return q


def evidence_weighted_proba(
    proba: np.ndarray,
    images: pd.DataFrame,
    *,
    scale: int = 20,
    base: pd.DataFrame | None = None,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """The head's probabilities for ``images`` as QC runs judge them: the one rule that
    :func:`napari_cellmae.qc.run.judge` and the head comparison of **Train head from plate**
    (:func:`napari_cellmae.qc.training.score_head`) share.

    ``images``: one row per image (same order as ``proba``) with its ``QC_<metric>`` columns and
    its plate/channel (:data:`GROUP_BY`: plate z-scores are taken within each group, and a group
    with fewer than :data:`MIN_ANCHOR` plausible images gets gate evidence only). The evidence is
    :func:`baseline_flags` at the default threshold :data:`DEFAULT_Z` whatever the classic
    slider says (gate scores are in its units); pass ``base`` when that table is at hand.
    """
    if base is None:
        base = baseline_flags(images, DEFAULT_Z, scale=scale)
    return with_classic_evidence(proba, base, classes=classes)
