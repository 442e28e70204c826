"""Active labelling: the fields the QC head is least sure about, to label first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .head import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def suggest_fields(
    images: pd.DataFrame,
    fields: pd.DataFrame,
    keys: Sequence[str],
    n: int = 10,
    threshold: float = 0.5,
    exclude: Sequence[Sequence] = (),
) -> pd.DataFrame:
    """The fields the QC head is least sure about: label these first (active labelling).

    ``images`` / ``fields`` are the judged tables of :func:`napari_cellmae.qc.run.judge` at
    ``threshold``; ``keys`` the field key columns (``field_keys``); ``exclude`` field keys
    already labelled. Per image the *margin* is the distance of its score from the threshold
    (|1 − P(ok) − threshold| for a head, |z − threshold| for the classic rules): the smaller, the
    closer its verdict is to flipping. A field's margin is its channels' smallest; the
    *entropy* of the head's class probabilities (normalised to 0–1; the largest over channels)
    breaks ties. Unreadable fields are left out (nothing to learn from them).

    Returns up to ``n`` field rows, least sure first: the keys, ``QC_Score``, ``QC_Flag``,
    ``QC_Class``, ``QC_Margin``, ``QC_Entropy`` and ``QC_Suggestion`` (why, in words).
    """
    import pandas as pd

    keys = list(keys)
    ok = (
        (images["QC_Error"] == "").to_numpy()
        if "QC_Error" in images
        else np.ones(len(images), bool)
    )
    judged = images[ok & np.isfinite(images["QC_Score"].to_numpy(np.float64))].copy()
    p_cols = [f"QC_P_{c}" for c in CLASSES if f"QC_P_{c}" in judged]
    judged["QC_Margin"] = (judged["QC_Score"].astype(np.float64) - threshold).abs()
    if p_cols:
        p = np.clip(judged[p_cols].to_numpy(np.float64), 1e-12, 1.0)
        judged["QC_Entropy"] = -(p * np.log(p)).sum(axis=1) / np.log(len(p_cols))
    else:
        judged["QC_Entropy"] = np.nan
    skip = {tuple(k) for k in exclude}
    rows = []
    for key, g in judged.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        if tuple(key) in skip:
            continue
        worst = g.sort_values("QC_Margin", kind="stable").iloc[0]
        why = f"score {float(worst['QC_Score']):.2f}, threshold {threshold:.2f}"
        if p_cols:
            probs = sorted(
                ((float(worst[c]), c[5:]) for c in p_cols), reverse=True
            )[:2]  # fmt: skip
            why += f" ({probs[0][1]} {probs[0][0]:.2f} vs {probs[1][1]} {probs[1][0]:.2f})"
        if "channel_name" in g and g["channel_name"].nunique() > 1:
            why += f" in {worst['channel_name']}"
        rows.append(
            {
                **dict(zip(keys, key)),
                "QC_Margin": float(worst["QC_Margin"]),
                "QC_Entropy": float(g["QC_Entropy"].max()),
                "QC_Suggestion": why,
            }
        )
    cols = [*keys, "QC_Margin", "QC_Entropy", "QC_Suggestion"]
    out = pd.DataFrame(rows, columns=cols)
    verdict = fields[[*keys, "QC_Score", "QC_Flag", "QC_Class"]]
    out = out.merge(verdict, on=keys, how="left")
    out = out.sort_values(
        ["QC_Margin", "QC_Entropy"], ascending=[True, False], kind="stable", na_position="last"
    )
    return out.head(int(n)).reset_index(drop=True)[
        [*keys, "QC_Score", "QC_Flag", "QC_Class", "QC_Margin", "QC_Entropy", "QC_Suggestion"]
    ]
