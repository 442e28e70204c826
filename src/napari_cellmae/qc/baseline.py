"""The classic QC baseline: robust per-plate, per-channel z-scores of CellProfiler metrics.

This is how image-based profiling pipelines flag images today (CellProfiler MeasureImageQuality
+ thresholds on plate statistics), and the baseline the learned QC head must beat. Within each
plate and channel, each metric becomes z = (x − median) / (1.4826 · MAD) (the standard deviation
when the MAD is 0); ``PercentMaximal`` uses the plain z = (x − mean) / SD, as the usual rule
"PercentMaximal > mean + 2 SD" does. A rule fires when its signed z exceeds the threshold (2 by
default, i.e. |z| > 2 for the two-sided PowerLogLogSlope):

================  ====================  =========  ==========================================
class             metric                direction  why
================  ====================  =========  ==========================================
blur              PowerLogLogSlope      low        blur removes high frequencies
blur              Correlation_N         high       neighbouring pixels become alike
blur              FocusScore            low        less variance for the same mean
noise             PowerLogLogSlope      high       white noise flattens the spectrum (→ 0/+1)
saturation        PercentMaximal        high       many pixels at the image's maximum
empty             MeanIntensity         low        no cells: only background
empty             StdIntensity          low        no cells: nothing varies
debris            MaxIntensity          high       objects much brighter than cells
background        LowerQuartileIntensity high      the background itself got brighter
background        LocalFocusScore_N     high       uneven, not uniform, intensity
================  ====================  =========  ==========================================

The class score of an image is the largest z of its class's rules; the image is flagged when any
score exceeds the threshold, with the class and rule of the largest exceedance as the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

MAD_TO_SD = 1.4826
DEFAULT_Z = 2.0
# plate and channel (the run tables use Metadata_Channel, measure_field "channel")
GROUP_BY = ("Metadata_Plate", "Metadata_Channel", "channel")


class Rule(NamedTuple):
    qc_class: str
    metric: str  # without the QC_ prefix; "{n}" is replaced by the spatial scale
    sign: int  # +1: high values are bad, -1: low values are bad
    robust: bool = True  # median/MAD z (False: mean/SD, as the PercentMaximal rule)


RULES: tuple[Rule, ...] = (
    Rule("blur", "PowerLogLogSlope", -1),
    Rule("blur", "Correlation_{n}", +1),
    Rule("blur", "FocusScore", -1),
    Rule("noise", "PowerLogLogSlope", +1),
    Rule("saturation", "PercentMaximal", +1, robust=False),
    Rule("empty", "MeanIntensity", -1),
    Rule("empty", "StdIntensity", -1),
    Rule("debris", "MaxIntensity", +1),
    Rule("background", "LowerQuartileIntensity", +1),
    Rule("background", "LocalFocusScore_{n}", +1),
)
BASELINE_CLASSES = ("blur", "saturation", "debris", "noise", "empty", "background")


def _zscore(values: np.ndarray, robust: bool) -> np.ndarray:
    finite = np.isfinite(values)
    if finite.sum() < 2:
        return np.zeros_like(values)
    v = values[finite]
    if robust:
        centre = np.median(v)
        spread = MAD_TO_SD * np.median(np.abs(v - centre))
        if spread <= 0:
            spread = v.std()
    else:
        centre, spread = v.mean(), v.std()
    if spread <= 0:  # every image alike: nothing stands out
        return np.where(finite, 0.0, np.nan)
    return (values - centre) / spread


def zscores(
    images: pd.DataFrame,
    group_by: Sequence[str] = GROUP_BY,
    scale: int = 20,
) -> pd.DataFrame:
    """Signed rule z-scores per image: one column ``z_<class>_<metric>`` per rule (high = bad).

    ``images`` has one row per image with ``QC_<metric>`` columns; the statistics are taken
    within each group of ``group_by`` (plate and channel by default; absent columns ignored).
    """
    import pandas as pd

    keys = [k for k in group_by if k in images.columns]
    out = pd.DataFrame(index=images.index)
    groups = images.groupby(keys, sort=False).indices if keys else {(): np.arange(len(images))}
    for rule in RULES:
        metric = "QC_" + rule.metric.format(n=scale)
        if metric not in images.columns:
            raise ValueError(
                f"The baseline needs the metric column {metric!r}: measure with scale {scale} "
                "(napari_cellmae.qc.metrics.measure_field(..., scales=(20,)))."
            )
        values = images[metric].to_numpy(dtype=np.float64)
        z = np.full(len(images), np.nan)
        for rows in groups.values():
            z[rows] = rule.sign * _zscore(values[rows], rule.robust)
        out[f"z_{rule.qc_class}_{rule.metric.format(n=scale)}"] = z
    return out


def class_scores(z: pd.DataFrame) -> pd.DataFrame:
    """Per image and class, the largest rule z of that class (columns = BASELINE_CLASSES)."""
    import pandas as pd

    out = pd.DataFrame(index=z.index)
    for cls in BASELINE_CLASSES:
        cols = [c for c in z.columns if c.startswith(f"z_{cls}_")]
        out[cls] = z[cols].max(axis=1, skipna=True).fillna(0.0)
    return out


def baseline_flags(
    images: pd.DataFrame,
    threshold: float = DEFAULT_Z,
    group_by: Sequence[str] = GROUP_BY,
    scale: int = 20,
) -> pd.DataFrame:
    """Flags and reasons of the z-score rule set, one row per image (same index as ``images``).

    Columns: ``QC_Baseline_<class>`` (class scores, in z units), ``QC_Baseline_Score`` (the
    largest), ``QC_Baseline_Class`` ("ok" or the class of the largest exceedance),
    ``QC_Baseline_Flag`` (score > threshold) and ``QC_Baseline_Reason`` (e.g.
    ``"blur: PowerLogLogSlope z=-3.4"``).
    """
    z = zscores(images, group_by, scale)
    scores = class_scores(z)
    out = scores.add_prefix("QC_Baseline_")
    best = z.to_numpy()
    best = np.where(np.isfinite(best), best, -np.inf)
    top = best.argmax(axis=1) if best.shape[1] else np.zeros(len(z), int)
    top_z = best[np.arange(len(z)), top] if len(z) else np.zeros(0)
    flag = top_z > threshold
    reasons, classes = [], []
    for col, value, f in zip(np.asarray(z.columns)[top], top_z, flag):
        _, cls, metric = col.split("_", 2)
        if not f:
            reasons.append("")
            classes.append("ok")
            continue
        rule = next(r for r in RULES if r.qc_class == cls and r.metric.format(n=scale) == metric)
        shown = rule.sign * value  # the metric's own z, with its sign
        reasons.append(f"{cls}: {metric} z={shown:+.1f}")
        classes.append(cls)
    out["QC_Baseline_Score"] = np.where(np.isfinite(top_z), top_z, 0.0)
    out["QC_Baseline_Class"] = classes
    out["QC_Baseline_Flag"] = flag
    out["QC_Baseline_Reason"] = reasons
    return out
