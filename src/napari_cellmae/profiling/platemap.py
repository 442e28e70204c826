"""Platemaps and known relationships: read a platemap, join it onto embedding tables.

:func:`read_platemap` reads a CSV/TSV (or DataFrame) into pycytominer/JUMP column names
(``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Perturbation``, ``Metadata_IsControl``,
``Metadata_Batch`` and every other column prefixed ``Metadata_``). :func:`join_platemap` keeps
only annotated rows (what profiling evaluates); :func:`annotate` keeps every row (what ``cellmae
embed --platemap`` writes into the crop, field and well tables).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

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
# what embedding tables already carry: a platemap column of that name is not joined over them
_TABLE_COLUMNS = (
    "Metadata_Row",
    "Metadata_Col",
    "Metadata_Site",
    "Metadata_Plane",
    "Metadata_Timepoint",
    "Metadata_NCrops",
    "Metadata_NFields",
    "Metadata_Crop",
    "Metadata_CropY",
    "Metadata_CropX",
)


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

    from ..plates.layouts import split_well, well_name

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


def platemap_annotations(platemap: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """The join keys (``Metadata_Well``, and ``Metadata_Plate`` when the platemap names plates)
    and the platemap's columns to join, one row per key (ValueError when a key has two different
    annotations). Columns the embedding tables carry themselves (Row/Col/Site …) are left out:
    a table keeps its own."""
    keys = ["Metadata_Well"] + (["Metadata_Plate"] if "Metadata_Plate" in platemap else [])
    columns = keys + [c for c in platemap.columns if c not in keys and c not in _TABLE_COLUMNS]
    pm = platemap[columns].drop_duplicates(keys)
    duplicated = platemap[columns].drop_duplicates().duplicated(keys)
    if duplicated.any():
        first = platemap[columns].drop_duplicates()[duplicated].iloc[0][keys].to_dict()
        raise ValueError(
            f"the platemap annotates {first} twice with different values: keep one row per "
            "plate and well"
        )
    return keys, pm


def _merge(table: pd.DataFrame, platemap: pd.DataFrame, how: str) -> pd.DataFrame:
    keys, pm = platemap_annotations(platemap)
    replaced = [c for c in pm.columns if c in table.columns and c not in keys]
    left = table.drop(columns=replaced).assign(**{k: table[k].astype(str) for k in keys})
    joined = left.merge(pm, on=keys, how=how, validate="many_to_one")
    matched = joined["Metadata_Perturbation"].notna()
    if not matched.any():
        shown = left[keys].drop_duplicates().head(3).to_dict("records")
        theirs = pm[keys].head(3).to_dict("records")
        raise ValueError(
            f"no profile matches the platemap on {keys}: embeddings have e.g. {shown}, the "
            f"platemap {theirs}; check the plate names (they come from the plate folders)"
        )
    meta = [c for c in joined.columns if c.startswith("Metadata_")]
    joined = joined[meta + [c for c in joined.columns if c not in meta]]
    joined.attrs["n_unannotated"] = (
        int((~matched).sum()) if how == "left" else len(table) - len(joined)
    )
    return joined.reset_index(drop=True)


def join_platemap(profiles: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Annotate profiles (Metadata_Plate/Well + features) with the platemap; rows without an
    annotation are dropped (``attrs["n_unannotated"]`` counts them). The platemap's columns
    replace annotations the table already carries."""
    return _merge(profiles, platemap, "inner")


def annotate(table: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Join the platemap's ``Metadata_*`` columns onto an embedding table, keeping every row
    (wells the platemap does not name get empty annotations, counted in
    ``attrs["n_unannotated"]``); ``Metadata_IsControl`` stays boolean (nullable when some rows
    have no annotation). ValueError when no row matches."""
    joined = _merge(table, platemap, "left")
    if "Metadata_IsControl" in joined:
        flags = joined["Metadata_IsControl"]
        joined["Metadata_IsControl"] = flags.astype(bool if flags.notna().all() else "boolean")
    return joined
