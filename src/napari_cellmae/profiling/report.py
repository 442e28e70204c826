"""The profiling report: model vs baseline on one embedding folder, as Markdown and tables.

:func:`profile_report` reads the well (or field) embeddings and the baseline statistics of an
embedding folder (computing the statistics from the plates when the folder has none), joins the
platemap (or uses the annotations ``cellmae embed --platemap`` wrote into the tables), aligns,
aggregates and evaluates both (:mod:`.alignment`, :mod:`.metrics`), and writes ``report.md``,
``metrics.csv`` and the per-perturbation tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import Progress
from .alignment import ALIGNMENTS, baseline_pca
from .metrics import CONTROL_QUANTILE, FDR, NULL_SIZE, RECALL_FRACTION, Evaluation, evaluate
from .platemap import join_platemap, pairs_from_column, read_pairs, read_platemap

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


@dataclass
class ProfileReport:
    """What :func:`profile_report` returns."""

    out_dir: Path
    metrics: pd.DataFrame  # one row per metric: model, baseline, chance
    markdown: str
    model: Evaluation
    baseline: Evaluation
    wells: pd.DataFrame  # the annotated rows both were evaluated on (Metadata_* only)


_METRIC_ROWS = (
    ("replicate_map", "Replicate retrieval mAP ({positives})", "replicate_map_chance"),
    (
        "activity_map",
        "Phenotypic activity: mAP of replicates vs controls ({positives})",
        "activity_map_chance",
    ),
    (
        "activity_fraction",
        f"Phenotypic activity: fraction retrieved (BH-corrected p < {FDR})",
        FDR,
    ),
    (
        "replicate_consistency",
        "Replicate consistency: share above the 95th percentile of held-out control sets",
        1 - CONTROL_QUANTILE,
    ),
    ("replicate_cosine", "Mean cosine between replicate wells", None),
    (
        "consistency_map",
        "Phenotypic consistency: mAP of perturbations sharing `{relationship}`",
        "consistency_map_chance",
    ),
    (
        "consistency_fraction",
        f"Phenotypic consistency: fraction of `{{relationship}}` values retrieved (BH p < {FDR})",
        FDR,
    ),
    (
        "relationship_recall",
        "Known-relationship recall (top/bottom 5% of cosines)",
        2 * RECALL_FRACTION,
    ),
    ("relationship_mean_cosine_related", "Mean cosine of related perturbation pairs", None),
    ("relationship_mean_cosine_unrelated", "Mean cosine of unrelated perturbation pairs", None),
)


_FIELD_ONLY = ("Metadata_Site", "Metadata_NCrops", "Metadata_Plane", "Metadata_Timepoint")


def _group_mean(df: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    return df.groupby(keys, sort=False)[columns].mean().reset_index()


def _features_pass(emb_dir: Path, record: dict[str, Any]):
    """Compute the baseline statistics from the embedded plates (when embedding skipped them)."""
    import pandas as pd

    from ..features import feature_names, field_features
    from ..plates import iter_fields, list_fields, scan_plate

    plates = record.get("plates") or []
    if not plates:
        raise FileNotFoundError(
            f"{emb_dir / 'features.parquet'} is missing and {emb_dir / 'config.json'} names no "
            "plate folder to compute it from: embed again without --no-features"
        )
    indexes = [scan_plate(p["root"], p.get("layout") or "auto") for p in plates]
    total = sum(len(list_fields(i)) for i in indexes)
    rows, done = [], 0
    for index, plate in zip(indexes, plates):
        for meta, image, error in iter_fields(index, channels=plate.get("channels")):
            done += 1
            if error is None:
                rows.append({**meta, **dict(zip(feature_names(len(image)), field_features(image)))})
            yield Progress(done, total, f"baseline statistics {meta['Metadata_Well']}")
    return pd.DataFrame(rows)


def load_tables(emb_dir: str | os.PathLike, level: str = "well"):
    """Model profiles and baseline statistics at ``level`` ("well" or "field") from an embedding
    folder (a progress generator: computing missing statistics reads the plates again).
    Returns ``(model_table, baseline_table, config)``."""
    import pandas as pd

    from ..embed import embedding_columns

    emb_dir = Path(emb_dir)
    config_path = emb_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{emb_dir} is not an embedding folder (no config.json): run `cellmae embed "
            f"PLATE_DIR --out {emb_dir}` first"
        )
    record = json.loads(config_path.read_text(encoding="utf-8"))
    if level not in ("well", "field"):
        raise ValueError(f"level must be 'well' or 'field', got {level!r}")
    keys = ["Metadata_Plate", "Metadata_Well"] + (["Metadata_Site"] if level == "field" else [])
    fields_path, wells_path = emb_dir / "fields.parquet", emb_dir / "wells.parquet"
    if level == "well" and wells_path.is_file():
        model = pd.read_parquet(wells_path)
    elif fields_path.is_file():
        fields = pd.read_parquet(fields_path)
        emb = embedding_columns(fields)
        model = fields if level == "field" else _group_mean(fields, keys, emb)
        if level == "well":  # the platemap annotations `embed --platemap` wrote into the fields
            per_well = [c for c in fields.columns if c.startswith("Metadata_") and c not in keys]
            per_well = [c for c in per_well if c not in _FIELD_ONLY]
            first = fields.drop_duplicates(keys)[keys + per_well]
            model = first.merge(model, on=keys, how="right")
    else:
        raise FileNotFoundError(
            f"{emb_dir} has no {'wells' if level == 'well' else 'fields'}.parquet: embed with "
            f"--levels field well"
        )
    feats_path = emb_dir / "features.parquet"
    if feats_path.is_file():
        feats = pd.read_parquet(feats_path)
    else:
        feats = yield from _features_pass(emb_dir, record)
    baseline = _group_mean(feats, keys, [c for c in feats.columns if c.startswith("feat_")])
    return model, baseline, record


def table_annotations(table: pd.DataFrame) -> pd.DataFrame:
    """The platemap that ``cellmae embed --platemap`` joined into an embedding table: its
    ``Metadata_*`` columns per plate and well, annotated rows only. ValueError (saying how to
    annotate) when the table carries no perturbation or control column."""
    missing = [c for c in ("Metadata_Perturbation", "Metadata_IsControl") if c not in table]
    if missing:
        raise ValueError(
            f"the embedding tables carry no {' / '.join(missing)} column: give a platemap "
            "(CLI: --platemap CSV), or embed with `cellmae embed … --platemap CSV`"
        )
    skip = set(_FIELD_ONLY) | {
        "Metadata_NFields",
        "Metadata_Crop",
        "Metadata_CropY",
        "Metadata_CropX",
    }
    columns = [c for c in table.columns if c.startswith("Metadata_") and c not in skip]
    pm = table[columns].drop_duplicates(["Metadata_Plate", "Metadata_Well"])
    pm = pm[pm["Metadata_Perturbation"].notna()]
    return read_platemap(pm.drop(columns=["Metadata_Row", "Metadata_Col"], errors="ignore"))


def profile_report(
    emb_dir: str | os.PathLike,
    platemap: str | os.PathLike | pd.DataFrame | None,
    out_dir: str | os.PathLike,
    pairs: str | os.PathLike | pd.DataFrame | Sequence[tuple[str, str]] | None = None,
    method: str = "tvn",
    level: str = "well",
    batch_column: str | None = None,
    controls: Sequence[str] | None = None,
    relationship_column: str | None = None,
    n_null: int = 1000,
    seed: int = 0,
    force: bool = False,
    same_plate: bool = False,
    null_size: int = NULL_SIZE,
):
    """Profile an embedding folder against a platemap: model vs baseline (a progress generator;
    returns :class:`ProfileReport`).

    Parameters
    ----------
    emb_dir : path
        Output folder of :func:`napari_cellmae.embed.embed_plates`.
    platemap : path, DataFrame or None
        Plate (optional), well, perturbation, control flag (or ``controls``), batch (optional).
        None: the annotations ``embed_plates(platemap=…)`` wrote into the tables.
    out_dir : path
        Where ``report.md`` and the tables go.
    pairs : path, DataFrame or list of pairs, optional
        Known perturbation relationships for the recall metric.
    method : {"tvn", "pca-cs", "center-scale", "none"}
        Alignment on controls.
    level : {"well", "field"}
        Align and evaluate wells (default) or fields.
    batch_column : str, optional
        Platemap column of the batches (default ``Metadata_Batch`` when present, else the plate).
    controls : list of str, optional
        Perturbation names of the negative controls (when the platemap has no control column).
    relationship_column : str, optional
        Platemap column whose shared values relate perturbations (e.g. a mechanism or target):
        phenotypic consistency, and the known pairs of the recall metric (unless ``pairs``).
    n_null, seed
        Size and seed of the held-out control null of replicate consistency (the seed also
        splits the controls and seeds copairs' null).
    same_plate : bool
        Count replicates on the query's own plate as positives (default: other plates only).
    null_size : int
        copairs' permutation null (p-values of phenotypic activity and consistency).
    force : bool
        Write into an existing folder cellmae did not make (:mod:`napari_cellmae.outputs`).
    """
    from ..embed import embedding_columns
    from ..store import run_record, write_json_atomic, write_table_atomic, write_text_atomic

    if method not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {method!r}: choose one of {', '.join(ALIGNMENTS)}")
    from ..outputs import check_output_dir, prepare_output_dir

    inputs = [platemap] if isinstance(platemap, (str, os.PathLike)) else []
    out = check_output_dir(out_dir, "profile", inputs=inputs, force=force)
    yield Progress(0, 4, "reading tables")
    model_table, baseline_table, record = yield from load_tables(emb_dir, level)
    if platemap is None:
        pm = table_annotations(model_table)
        if controls:
            pm["Metadata_IsControl"] = pm["Metadata_Perturbation"].isin([str(c) for c in controls])
    else:
        pm = read_platemap(platemap, controls)
    if relationship_column:
        relationship_column = (
            relationship_column if relationship_column in pm else f"Metadata_{relationship_column}"
        )
        known = pairs_from_column(pm, relationship_column)
    else:
        known = []
    if pairs is not None and not isinstance(pairs, (list, tuple)):
        known = read_pairs(pairs)
    elif pairs:
        known = list(pairs)
    batch_column = batch_column or (
        "Metadata_Batch" if "Metadata_Batch" in pm else "Metadata_Plate"
    )
    model = join_platemap(model_table, pm)
    keys = ["Metadata_Plate", "Metadata_Well"] + (["Metadata_Site"] if level == "field" else [])
    base = model[keys].merge(baseline_table, on=keys, how="left")  # the same wells, same order
    if base.filter(like="feat_").isna().all(axis=1).any():
        raise ValueError("some embedded wells have no baseline statistics: embed them again")
    x_model = model[embedding_columns(model)].to_numpy(np.float64)
    x_base = baseline_pca(base.filter(like="feat_").to_numpy(np.float64), x_model.shape[1])
    meta = model[[c for c in model.columns if c.startswith("Metadata_")]]
    options = {
        "pairs": known,
        "n_null": n_null,
        "seed": seed,
        "same_plate": same_plate,
        "relationship_column": relationship_column,
        "null_size": null_size,
    }

    yield Progress(1, 4, f"aligning ({method}) and evaluating the model")
    ev_model = evaluate(x_model, meta, method, batch_column, **options)
    yield Progress(2, 4, "aligning and evaluating the baseline")
    ev_base = evaluate(x_base, meta, method, batch_column, **options)

    yield Progress(3, 4, f"writing the report to {out}")
    positives = (
        "positives: replicates on any plate, its own included"
        if ev_model.metrics["same_plate"]
        else "positives: replicates on other plates"
    )
    metrics = _metrics_table(ev_model, ev_base, bool(known), positives, relationship_column)
    prepare_output_dir(out, "profile", inputs=inputs, force=force)
    write_table_atomic(metrics, out / "metrics.parquet", csv_twin=True)
    for tag, ev in (("model", ev_model), ("baseline", ev_base)):
        _write_evaluation(out, tag, ev, meta)
    n_plates = int(meta["Metadata_Plate"].nunique())
    info = {
        "embeddings": str(Path(emb_dir).resolve()),
        "model": record.get("model"),
        "model_checksum": record.get("model_checksum"),
        "pooling": record.get("pooling"),
        "block": record.get("block"),
        "alignment": method,
        "level": level,
        "batch_column": batch_column,
        "platemap": "the annotations in the embedding tables"
        if platemap is None
        else (str(platemap) if not hasattr(platemap, "columns") else "a DataFrame"),
        "replicate_positives": "same-plate" if ev_model.metrics["same_plate"] else "other-plates",
        "positives": positives
        + (
            " (no perturbation has wells on two plates)"
            if ev_model.metrics["same_plate"] and not same_plate
            else ""
        ),
        "relationship_column": relationship_column,
        "n_rows": len(meta),
        "n_unannotated": model.attrs.get("n_unannotated", 0),
        "n_controls": int(meta["Metadata_IsControl"].sum()),
        "n_perturbations": len(ev_model.names),
        "n_batches": int(meta[batch_column].nunique()),
        "n_plates": n_plates,
        "n_pairs": len(known),
        "baseline": f"PCA ({x_base.shape[1]} components) of {base.filter(like='feat_').shape[1]} "
        "per-channel intensity/texture statistics (napari_cellmae.features)",
    }
    markdown = _markdown(info, metrics, ev_model, ev_base)
    write_text_atomic(out / "report.md", markdown)
    write_json_atomic(
        out / "config.json",
        run_record(command="profile", **info, n_null=n_null, null_size=null_size, seed=seed),
    )
    yield Progress(4, 4, "report written")
    return ProfileReport(out, metrics, markdown, ev_model, ev_base, meta)


def _metrics_table(
    ev_model: Evaluation,
    ev_base: Evaluation,
    with_pairs: bool,
    positives: str = "",
    relationship: str | None = None,
) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for key, label, chance in _METRIC_ROWS:
        if key.startswith("relationship") and not with_pairs:
            continue
        if key.startswith("consistency_") and not relationship:
            continue
        if isinstance(chance, str):
            chance = ev_model.metrics.get(chance)
        rows.append(
            {
                "metric": key,
                "description": label.format(positives=positives, relationship=relationship),
                "model": ev_model.metrics.get(key, np.nan),
                "baseline": ev_base.metrics.get(key, np.nan),
                "chance": np.nan if chance is None else float(chance),
            }
        )
    return pd.DataFrame(rows)


def _write_evaluation(out: Path, tag: str, ev: Evaluation, meta: pd.DataFrame) -> None:
    import pandas as pd

    from ..store import write_table_atomic

    cols = [f"pc_{i:04d}" for i in range(ev.aligned.shape[1])]
    aligned = pd.concat(
        [meta.reset_index(drop=True), pd.DataFrame(ev.aligned, columns=cols)], axis=1
    )
    write_table_atomic(aligned, out / f"aligned_{tag}.parquet")
    profiles = pd.DataFrame(ev.profiles, columns=cols).assign(Metadata_Perturbation=ev.names)
    write_table_atomic(profiles[["Metadata_Perturbation", *cols]], out / f"profiles_{tag}.parquet")
    sim = pd.DataFrame(ev.similarity, columns=ev.names).assign(Metadata_Perturbation=ev.names)
    write_table_atomic(
        sim[["Metadata_Perturbation", *ev.names]], out / f"similarity_{tag}.parquet", csv_twin=True
    )
    write_table_atomic(ev.replicates, out / f"replicates_{tag}.parquet", csv_twin=True)
    if ev.consistency is not None:
        write_table_atomic(ev.consistency, out / f"consistency_{tag}.parquet", csv_twin=True)
    if ev.pairs is not None:
        write_table_atomic(ev.pairs, out / f"pairs_{tag}.parquet", csv_twin=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.3f}"


def _markdown(
    info: dict[str, Any], metrics: pd.DataFrame, ev_model: Evaluation, ev_base: Evaluation
) -> str:
    lines = [
        "# Profiling report",
        "",
        f"Model **{info['model']}** vs the baseline, aligned with **{info['alignment']}** on "
        f"controls per `{info['batch_column']}`; {info['n_perturbations']} perturbations.",
        "",
        "| metric | model | baseline | chance |",
        "|---|---|---|---|",
    ]
    for row in metrics.itertuples(index=False):
        lines.append(
            f"| {row.description} | {_fmt(row.model)} | {_fmt(row.baseline)} | {_fmt(row.chance)} |"
        )
    lines += [
        "",
        "Higher is better for every row but the last (unrelated pairs should stay near 0). The "
        "model is not assumed to win: read both columns.",
        "",
        f"- Embeddings: `{info['embeddings']}` — model {info['model']} (checksum "
        f"`{str(info['model_checksum'])[:12]}…`), pooling {info['pooling']}, block {info['block']}",
        f"- Baseline: {info['baseline']}",
        f"- Annotations: {info['platemap']}",
        f"- Alignment: {info['alignment']} on negative controls per `{info['batch_column']}` "
        f"({info['n_batches']} batch{'es' * (info['n_batches'] != 1)}); level: {info['level']}",
        f"- {info['n_rows']} {info['level']}s annotated ({info['n_controls']} controls, "
        f"{info['n_perturbations']} perturbations, {info['n_plates']} "
        f"plate{'s' * (info['n_plates'] != 1)}); {info['n_unannotated']} without an annotation "
        f"left out; {info['n_pairs']} known relationship pairs",
        f"- Replicate retrieval and phenotypic activity ({'copairs'}, cosine): "
        f"{info['positives']}. Activity ranks replicates against the controls only; p-values "
        "from copairs' permutation null, Benjamini–Hochberg over the perturbations.",
        "- Replicate consistency: the alignment is refit on half of each batch's controls and "
        "the null drawn from the other half (controls the alignment never saw).",
    ]
    if info["relationship_column"]:
        lines.append(
            f"- Phenotypic consistency (copairs): aggregated perturbation profiles retrieved "
            f"against each other, positives share `{info['relationship_column']}`; "
            "BH over its values."
        )
    lines += [
        "",
        "Tables: `metrics.csv`, `replicates_{model,baseline}.csv` (per perturbation: retrieval "
        "mAP, activity mAP / p-value / corrected p-value, held-out consistency), "
        "`consistency_{model,baseline}.csv` (per relationship value), "
        "`similarity_{model,baseline}.csv` (perturbation × perturbation cosine), "
        "`pairs_{model,baseline}.csv` (annotated pairs), `profiles_*.parquet` (aggregated "
        "aligned profiles), `aligned_*.parquet` (aligned rows).",
        "",
    ]
    return "\n".join(lines)
