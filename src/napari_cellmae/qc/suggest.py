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
    already labelled. A field's verdict is its worst channel's score (head: 1 − P(ok); classic:
    the largest rule z) against the threshold, so its *margin* |score − threshold| is how far
    the verdict is from flipping; the *entropy* of the worst channel's class probabilities
    (normalised to 0–1) breaks ties. Unreadable fields are left out (nothing to learn from).

    Flagged fields are few on most plates, and their least sure ones are the likeliest false
    alarms; passing fields near the threshold are the likeliest misses. Least-sure-first over
    the whole plate would spend every click on one side, so the list takes the least sure
    flagged and the least sure passing field in turn (flagged first), each side by margin.

    Returns up to ``n`` field rows in that order: the keys, ``QC_Score``, ``QC_Flag``,
    ``QC_Class``, ``QC_Margin``, ``QC_Entropy`` and ``QC_Suggestion`` (why, in words).
    """
    import pandas as pd

    keys = list(keys)
    cols = [*keys, "QC_Score", "QC_Flag", "QC_Class", "QC_Margin", "QC_Entropy", "QC_Suggestion"]
    ok = (images["QC_Error"] == "") if "QC_Error" in images else pd.Series(True, images.index)
    judged = images[ok & np.isfinite(images["QC_Score"].astype(np.float64))]
    worst = judged.sort_values("QC_Score", ascending=False, kind="stable").drop_duplicates(keys)
    p_cols = [f"QC_P_{c}" for c in CLASSES if f"QC_P_{c}" in worst]
    skip = {tuple(k) for k in exclude}
    rows = []
    for rec in worst.to_dict("records"):
        key = tuple(rec[k] for k in keys)
        if key in skip:
            continue
        score = float(rec["QC_Score"])
        why = f"score {score:.2f}, threshold {threshold:.2f}"
        entropy = float("nan")
        if p_cols:
            p = np.clip(np.array([float(rec[c]) for c in p_cols]), 1e-12, 1.0)
            entropy = float(-(p * np.log(p)).sum() / np.log(len(p)))
            (p1, c1), (p2, c2) = sorted(zip(p, (c[5:] for c in p_cols)), reverse=True)[:2]
            why += f" ({c1} {p1:.2f} vs {c2} {p2:.2f}"
            why += f" in {rec['channel_name']})" if "channel_name" in rec else ")"
        margin = abs(score - threshold)
        rows.append({**dict(zip(keys, key)), "QC_Margin": margin, "QC_Entropy": entropy,
                     "QC_Suggestion": why})  # fmt: skip
    table = pd.DataFrame(rows, columns=[*keys, "QC_Margin", "QC_Entropy", "QC_Suggestion"])
    table = table.merge(fields[[*keys, "QC_Score", "QC_Flag", "QC_Class"]], on=keys, how="left")
    table["QC_Flag"] = table["QC_Flag"].fillna(False).astype(bool)
    order = ["QC_Margin", "QC_Entropy"]
    sides = [
        table[table["QC_Flag"] == flagged].sort_values(
            order, ascending=[True, False], kind="stable", na_position="last"
        )
        for flagged in (True, False)
    ]
    picked = []
    for i in range(max(len(sides[0]), len(sides[1]))):  # flagged, passing, flagged, …
        picked += [side.iloc[i] for side in sides if i < len(side)]
    out = pd.DataFrame(picked[: int(n)], columns=table.columns)
    return out.reset_index(drop=True)[cols]
