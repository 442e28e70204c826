"""QC of a whole plate folder: measure, judge, report, and mirror the passing images.

:func:`run_qc` is the ``cellmae qc`` pipeline as a progress generator; the QC tab calls its steps
separately so that the threshold, relabelling and retraining work on the measured plate without
reading it again:

1. :func:`measure_plate` reads every field (read-ahead threads), measures the classic metrics of
   every channel and, when the head uses them, embeds every channel with the frozen encoder. A
   field that cannot be read is recorded (which file, why) and the run goes on.
2. :func:`judge` adds the z-score baseline and the head's probabilities, flags and reasons per
   image and per field (field verdict = its worst channel).
3. :func:`write_report` writes the tables (parquet + CSV), the passing lists and the run record.
4. :func:`mirror_passing` links or copies the passing fields' files into a folder with the same
   relative paths, for downstream tools.

The plate folder is only read: nothing in it is written, moved or deleted, and output or mirror
folders inside it are refused.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import Progress
from .baseline import DEFAULT_Z, baseline_flags, evidence_weighted_proba
from .head import (
    ARTEFACT_CLASSES,
    CLASSES,
    FeatureSpec,
    QCHead,
    embed_images,
    metric_features,
    with_relative,
)
from .metrics import file_max_value, measure, metric_names

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

LINK_MODES = ("copy", "symlink", "hard")  # the first is the default: the safe one
DEFAULT_THRESHOLD = 0.5
MIRROR_MARKER = ".cellmae-mirror.json"
UNREADABLE = "unreadable"
FIELD_UNREADABLE = "field unreadable: "  # QC_Error of a sound file in an unreadable field


@dataclass
class QCResult:
    """A measured plate. ``images``: one row per image file (Metadata_*, ``channel_name``,
    ``path``, ``QC_Error``, ``QC_<metric>``); ``fields``: one row per field (from
    ``list_fields``, plus ``QC_Error``); ``features``: (n_images, F) head features aligned with
    ``images`` (NaN rows where unreadable), or None when no head is in use."""

    index: pd.DataFrame
    images: pd.DataFrame
    fields: pd.DataFrame
    features: np.ndarray | None
    head: QCHead | None
    notice: str
    model: dict[str, str] | None
    seconds: float
    scale: int = 20

    @property
    def method(self) -> str:
        """ "head" when the head judges, "classic" when only the z-score rules do."""
        return "head" if self.head is not None else "classic"


def head_status(head: QCHead | None, model: Any) -> tuple[QCHead | None, str]:
    """The head to use with ``model`` (None = classic metrics only) and a notice saying why."""
    if head is None:
        return None, "No QC head: only the classic metrics (z-score rules) are in use."
    if head.matches(model):
        return head, ""
    enc = head.encoder or {}
    if model is None:
        return None, (
            f"The QC head needs the encoder {enc.get('name')} and no model is loaded: only the "
            "classic metrics (z-score rules) are in use."
        )
    return None, (
        f"The QC head was trained on encoder {enc.get('name')} ({enc.get('checksum', '')[:12]}), "
        f"not on {model.name} ({str(model.checksum)[:12]}): only the classic metrics (z-score "
        "rules) are in use. Train a head for this model from your plate ('Train head from "
        "plate', or cellmae qc --train-from-plate)."
    )


def _check_outside(folder: str | os.PathLike, root: str, what: str) -> None:
    from ..outputs import is_inside

    if is_inside(folder, root):
        raise ValueError(
            f"The {what} {folder} is inside the plate folder {root}: the plate folder is never "
            f"written to. Choose a {what} outside it."
        )


def measure_plate(
    plate: str | os.PathLike | pd.DataFrame,
    model: Any = None,
    head: QCHead | None = None,
    *,
    layout: str = "auto",
    batch_size: int | None = None,
    prefetch: int = 2,
    scale: int = 20,
) -> Generator[Progress, None, QCResult]:
    """Measure every field of a plate (progress generator; returns a :class:`QCResult`)."""
    import pandas as pd

    from ..plates import scan_plate

    t0 = time.monotonic()
    if isinstance(plate, (str, os.PathLike)):
        yield Progress(0, None, f"scanning {plate}")
        index = scan_plate(plate, layout)
    else:
        index = plate
    used, notice = head_status(head, model)
    spec: FeatureSpec | None = used.spec if used is not None else None
    if spec is not None:
        scale = spec.scale
    rows, feats = yield from measure_rows(index, model, spec, scale, batch_size, prefetch)
    return finish_measurement(
        index, pd.DataFrame(rows), feats, used, notice, model, time.monotonic() - t0, scale
    )


def measure_rows(
    index: pd.DataFrame,
    model: Any,
    spec: FeatureSpec | None,
    scale: int,
    batch_size: int | None = None,
    prefetch: int = 2,
) -> Generator[Progress, None, tuple[list[dict[str, Any]], list[np.ndarray]]]:
    """The per-image rows (metadata, metrics, ``QC_Error``) and the head's absolute features of
    every field of ``index`` (a plate, or one well of it: the unit of a distributed run)."""
    import pandas as pd

    from ..plates import iter_fields, list_fields
    from ..plates.channels import index_channel_names, index_channels
    from ..plates.read import one_file_per_field, read_index_image
    from ..plates.scan import field_keys

    keys = field_keys(index)
    channels = index_channels(index)
    multichannel = one_file_per_field(index)  # the reader's own plane rule
    names = index_channel_names(index, channels)
    files = {
        (k if isinstance(k, tuple) else (k,)): dict(zip(g["Metadata_Channel"], g["path"]))
        for k, g in index.groupby(keys, sort=False)
    }
    fields = list_fields(index)
    rows: list[dict[str, Any]] = []
    feats: list[np.ndarray] = []
    errors: list[str] = []
    total = len(fields)
    nan_row = np.full(spec.n_absolute, np.nan) if spec is not None else None
    for i, (meta, image, error) in enumerate(iter_fields(index, prefetch=prefetch)):
        key = tuple(meta[k] for k in keys)
        paths = files.get(key, {})
        if error is not None:
            errors.append(str(error))
            for ch in channels:  # find which file is bad; the others are still measured
                bad = "" if ch in paths else f"no file for channel {ch}"
                planes = None
                if not bad:
                    try:
                        planes = read_index_image(paths[ch], ch, meta, multichannel)
                    except ValueError as exc:
                        bad = str(exc)
                row = {**meta, "Metadata_Channel": ch, "channel_name": names[ch]}
                row["path"] = paths.get(ch, "")
                row["QC_Error"] = bad or f"{FIELD_UNREADABLE}{error}"
                if planes is not None:
                    top = file_max_value(paths[ch])  # CellProfiler's scaling (MaxSampleValue)
                    values = measure(planes[:1], (scale,), max_value=top)
                    row.update({f"QC_{k}": v[0] for k, v in values.items()})
                rows.append(row)
                if nan_row is not None:
                    feats.append(nan_row)
        else:
            tops = [file_max_value(paths.get(ch)) for ch in channels]  # MaxSampleValue or None
            values = measure(image, (scale,), max_value=tops)
            for c, ch in enumerate(channels):
                row = {**meta, "Metadata_Channel": ch, "channel_name": names[ch]}
                row["path"] = paths.get(ch, "")
                row["QC_Error"] = ""
                row.update({f"QC_{k}": float(v[c]) for k, v in values.items()})
                rows.append(row)
            if spec is not None:
                part = pd.DataFrame(rows[-len(channels) :])
                x = metric_features(part, spec)
                if spec.uses_encoder:
                    emb = embed_images(model, list(image), spec.block, batch_size)
                    x = np.concatenate([x, emb], axis=1)
                feats.extend(x)
        where = f"{meta.get('Metadata_Well')} site {meta.get('Metadata_Site')}"
        yield Progress(i + 1, total, f"QC {where}" + (" (unreadable)" if error else ""))
    return rows, feats


def finish_measurement(
    index: pd.DataFrame,
    images: pd.DataFrame,
    feats: Any,
    used: QCHead | None,
    notice: str,
    model: Any,
    seconds: float,
    scale: int,
) -> QCResult:
    """A :class:`QCResult` from the per-image rows of a whole plate (in field order) and their
    absolute features: adds the plate-relative half of the features and the field table."""
    from ..plates import list_fields
    from ..plates.scan import field_keys

    keys = field_keys(index)
    spec = used.spec if used is not None else None
    features = None
    if spec is not None:  # plate-relative half: against each plate/channel's readable images
        groups = list(zip(images["Metadata_Plate"], images["Metadata_Channel"]))
        readable = (images["QC_Error"] == "").to_numpy()
        features = with_relative(np.asarray(feats, np.float64), spec, groups, readable)
    for name in metric_names((scale,)):
        if f"QC_{name}" not in images:
            images[f"QC_{name}"] = np.nan
    err_by_field: dict[tuple, str] = {}
    bad = images[images["QC_Error"] != ""] if len(images) else images
    for row in bad.to_dict("records"):
        err_by_field.setdefault(tuple(row[k] for k in keys), row["QC_Error"])
    fields = list_fields(index).copy()
    fields["QC_Error"] = [
        err_by_field.get(tuple(r[k] for k in keys), "") for r in fields.to_dict("records")
    ]
    return QCResult(
        index=index,
        images=images,
        fields=fields,
        features=features,
        head=used,
        notice=notice,
        model={"name": str(model.name), "checksum": str(model.checksum)} if model else None,
        seconds=seconds,
        scale=scale,
    )


def judge(
    result: QCResult,
    threshold: float = DEFAULT_THRESHOLD,
    z_threshold: float = DEFAULT_Z,
    head: QCHead | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Verdicts: (images, fields) tables with baseline, probabilities, flags and reasons.

    Per image: ``QC_Baseline_*`` (z-score rules), ``QC_P_<class>`` (head, each artefact class
    weighed by its classic evidence: :func:`~.baseline.evidence_weighted_proba`), ``QC_Score``
    (head: 1 − P(ok); classic: the largest rule z), ``QC_Flag``, ``QC_Class``, ``QC_Reason``. Per
    field the worst channel decides: ``QC_Score``, ``QC_Flag``, ``QC_Class``, ``QC_Channel``,
    ``QC_Reason``, ``QC_Pass``, and ``QC_<metric>_<channel>`` columns. ``head`` overrides the
    result's head (a retrained one with the same feature spec).
    """
    head = head if head is not None else result.head
    images = result.images.copy()
    ok = (images["QC_Error"] == "").to_numpy()
    base = baseline_flags(images[ok], z_threshold, scale=result.scale)
    for col in base.columns:
        images[col] = base[col].reindex(images.index)
    images["QC_Baseline_Flag"] = images["QC_Baseline_Flag"].fillna(False).astype(bool)
    for col in ("QC_Baseline_Class", "QC_Baseline_Reason"):
        images[col] = images[col].fillna("")
    if head is not None and result.features is not None:
        p = np.full((len(images), len(CLASSES)), np.nan)
        if ok.any():  # the head's classes weighed by their classic evidence (see baseline.py)
            raw = head.predict_proba(result.features[ok])
            # evidence at the default threshold: the head's verdicts do not follow the slider
            at_default = base if z_threshold == DEFAULT_Z else None
            p[ok] = evidence_weighted_proba(raw, images[ok], scale=result.scale, base=at_default)
        for k, cls in enumerate(CLASSES):
            images[f"QC_P_{cls}"] = p[:, k]
        score = 1.0 - p[:, 0]
        flag = score > threshold
        art = np.nan_to_num(p[:, 1:], nan=-1.0).argmax(axis=1)
        cls_col = np.where(flag, np.asarray(ARTEFACT_CLASSES)[art], "ok")
        best_p = np.nan_to_num(p[np.arange(len(p)), art + 1])
        detail = [f"p={q:.2f}" if f else "" for q, f in zip(best_p, flag)]
        method = "head"
    else:
        score = images["QC_Baseline_Score"].to_numpy(dtype=np.float64)
        flag = images["QC_Baseline_Flag"].to_numpy(bool)
        cls_col = images["QC_Baseline_Class"].to_numpy(dtype=object)
        detail = [r.split(": ", 1)[-1] for r in images["QC_Baseline_Reason"]]
        method = "classic"
    reason = [f"{c}: {d}" if d else "" for c, d in zip(cls_col, detail)]
    images["QC_Score"] = np.where(ok, np.nan_to_num(score), np.inf)
    images["QC_Flag"] = np.where(ok, flag, True)
    images["QC_Class"] = np.where(ok, cls_col, UNREADABLE)
    images["QC_Reason"] = np.where(ok, reason, images["QC_Error"])
    images["QC_Method"] = method
    return images, field_verdicts(result, images, method, threshold, z_threshold)


def field_verdicts(
    result: QCResult, images: pd.DataFrame, method: str, threshold: float, z_threshold: float
) -> pd.DataFrame:
    """One row per field: the worst channel's verdict plus wide per-channel metrics."""
    from ..plates.scan import field_keys

    keys = field_keys(result.index)
    fields = result.fields.copy()
    # in an unreadable field the channel whose own file failed goes first (it names QC_Channel);
    # its sound channels only carry the field's error ("field unreadable: …") and add no reason
    errors = images["QC_Error"].astype(str)
    culprit = (errors != "") & ~errors.str.startswith(FIELD_UNREADABLE)
    ranked = images.assign(is_culprit=culprit).sort_values(
        ["QC_Score", "is_culprit"], ascending=False, kind="stable"
    )
    worst = ranked.drop_duplicates(keys).set_index(keys)
    has_culprit = {tuple(r) for r in images.loc[culprit, keys].itertuples(index=False)}
    reasons: dict[tuple, list[str]] = {}
    for row in ranked[ranked["QC_Flag"]].itertuples():
        k = tuple(getattr(row, c) for c in keys)
        if row.QC_Class == UNREADABLE:
            if k in has_culprit and not row.is_culprit:
                continue
            text = f"{UNREADABLE}: {row.QC_Reason}"
            if text in reasons.get(k, []):
                continue
        else:  # "blur: p=0.93" -> "blur in DNA: p=0.93"
            cls, _, detail = str(row.QC_Reason).partition(": ")
            text = f"{cls or row.QC_Class} in {row.channel_name}" + (
                f": {detail}" if detail else ""
            )
        reasons.setdefault(k, []).append(text)
    idx = [tuple(r) for r in fields[keys].itertuples(index=False)]
    w = worst.reindex(idx)
    fields["QC_Score"] = w["QC_Score"].to_numpy()
    fields["QC_Flag"] = [k in reasons for k in idx]
    fields["QC_Class"] = np.where(fields["QC_Flag"], w["QC_Class"].to_numpy(), "ok")
    fields["QC_Channel"] = np.where(fields["QC_Flag"], w["channel_name"].to_numpy(), "")
    fields["QC_Reason"] = ["; ".join(reasons.get(k, [])) for k in idx]
    fields["QC_Method"] = method
    fields["QC_Threshold"] = threshold if method == "head" else z_threshold
    fields["QC_Pass"] = ~fields["QC_Flag"].astype(bool)
    metrics = [c for c in result.images.columns if c.startswith("QC_") and c != "QC_Error"]
    wide = images.pivot_table(index=keys, columns="channel_name", values=metrics, aggfunc="first")
    wide.columns = [f"{m}_{ch}" for m, ch in wide.columns]
    return fields.join(wide, on=keys)


# A plate where at least this share of the readable fields has one artefact is a plate problem
# (the instrument, not a few wells): say so, with what to check.
MOSTLY_ARTEFACT = 0.5
PLATE_ADVICE: dict[str, tuple[str, str]] = {
    "blur": ("out of focus", "check the autofocus (offset, laser/image-based focus, plate type)"),
    "saturation": ("saturated", "lower the exposure time or gain"),
    "noise": ("noisy", "check exposure time, gain and the light source"),
    "empty": ("empty (no cells)", "check cell seeding, dispensing and fixation/washing"),
    "debris": ("with debris", "check the plate, medium and washing steps"),
    "background": (
        "with uneven background",
        "check the illumination, flat-field correction and medium autofluorescence",
    ),
}


def plate_warning(counts: dict[str, int], n_readable: int, n_flagged: int) -> str:
    """The warning for a plate whose fields are mostly artefacts ("" when they are not).

    ``counts``: flagged readable fields per artefact class. One class on at least
    :data:`MOSTLY_ARTEFACT` of the readable fields names it and what to check ("71% of fields
    out of focus: check the autofocus …"); several classes that together flag that share give a
    general warning. The verdicts themselves do not depend on the plate's majority being good
    (the shipped head judges each image alone), so the few good fields of such a plate still
    pass; this warning is what tells the user that the plate as a whole went wrong.
    """
    if n_readable <= 0:
        return ""
    parts = []
    for cls, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        share = n / n_readable
        if share >= MOSTLY_ARTEFACT and cls in PLATE_ADVICE:
            what, advice = PLATE_ADVICE[cls]
            parts.append(f"{100 * share:.0f}% of fields {what}: {advice}")
    if parts:
        return "; ".join(parts) + "."
    if n_flagged / n_readable >= MOSTLY_ARTEFACT:
        mix = ", ".join(f"{cls} {n}" for cls, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (
            f"{100 * n_flagged / n_readable:.0f}% of fields flagged ({mix}): most of the plate "
            "failed; check the acquisition before using it."
        )
    return ""


def summarize(fields: pd.DataFrame) -> pd.DataFrame:
    """Per plate: fields, passing, flagged, unreadable, counts per class, and ``warning`` (see
    :func:`plate_warning`; "" unless most of the plate is artefacts)."""
    import pandas as pd

    rows = []
    for plate, g in fields.groupby("Metadata_Plate", sort=False):
        row = {
            "Metadata_Plate": plate,
            "n_fields": len(g),
            "n_passing": int(g["QC_Pass"].sum()),
            "n_flagged": int(g["QC_Flag"].sum()),
            "n_unreadable": int((g["QC_Class"] == UNREADABLE).sum()),
        }
        for cls in ARTEFACT_CLASSES:
            row[f"n_{cls}"] = int((g["QC_Flag"] & (g["QC_Class"] == cls)).sum())
        row["method"] = g["QC_Method"].iloc[0]
        row["threshold"] = float(g["QC_Threshold"].iloc[0])
        counts = {cls: row[f"n_{cls}"] for cls in ARTEFACT_CLASSES if row[f"n_{cls}"]}
        readable = row["n_fields"] - row["n_unreadable"]
        row["warning"] = plate_warning(counts, readable, row["n_flagged"] - row["n_unreadable"])
        rows.append(row)
    return pd.DataFrame(rows)


def plate_warnings(fields: pd.DataFrame) -> list[str]:
    """ "<plate>: <warning>" for every plate of ``fields`` that is mostly artefacts."""
    s = summarize(fields)
    return [f"{r['Metadata_Plate']}: {r['warning']}" for r in s.to_dict("records") if r["warning"]]


def write_report(
    result: QCResult,
    out: str | os.PathLike,
    images: pd.DataFrame,
    fields: pd.DataFrame,
    *,
    force: bool = False,
    **record: Any,
) -> dict[str, Path]:
    """Write the QC tables (parquet + CSV twins), passing lists, channels.json and run.json
    into ``out`` (the output-folder rule of :mod:`napari_cellmae.outputs`: ``force`` writes
    into a folder cellmae did not make)."""
    from ..outputs import prepare_output_dir
    from ..plates.channels import index_channel_names, save_channel_map
    from ..store import run_record, write_json_atomic, write_table_atomic

    root = result.index.attrs.get("root", "")
    out = prepare_output_dir(
        out, "qc", inputs=[root] if root else [], force=force, what="plate folder"
    )
    summary = summarize(fields)
    paths = {
        "images": write_table_atomic(images, out / "qc_images.parquet", csv_twin=True),
        "fields": write_table_atomic(fields, out / "qc_fields.parquet", csv_twin=True),
        "summary": write_table_atomic(summary, out / "qc_summary.parquet", csv_twin=True),
    }
    meta = [c for c in fields.columns if c.startswith("Metadata_")]
    passing = fields[fields["QC_Pass"]]
    paths["passing_fields"] = out / "passing_fields.csv"
    write_table_atomic(passing[meta], out / "passing_fields.parquet", csv_twin=True)
    keys = [c for c in meta if c in images.columns and c != "Metadata_Channel"]
    ok_keys = {tuple(r) for r in passing[keys].itertuples(index=False)}
    mask = [tuple(r) in ok_keys for r in images[keys].itertuples(index=False)]
    pass_images = images.loc[mask, [*meta, "Metadata_Channel", "channel_name", "path"]]
    paths["passing_images"] = write_table_atomic(
        pass_images, out / "passing_images.parquet", csv_twin=True
    )
    channels = result.index.attrs.get("channels") or []
    save_channel_map(out, index_channel_names(result.index, channels), channels)
    head = result.head
    rec = run_record(
        command="qc",
        plate=root,
        layout=result.index.attrs.get("layout"),
        method=result.method,
        notice=result.notice,
        model=result.model,
        head=None
        if head is None
        else {"path": head.path, "encoder": head.encoder, "classes": list(head.classes)},
        n_fields=len(fields),
        n_passing=int(fields["QC_Pass"].sum()),
        warnings=[f"{p}: {w}" for p, w in zip(summary["Metadata_Plate"], summary["warning"]) if w],
        seconds=round(result.seconds, 2),
        **record,
    )
    paths["record"] = write_json_atomic(out / "run.json", rec)
    return paths


def _made_by_mirror(target: Path, source: Path, mode: str | None) -> bool:
    """Whether ``target`` is still what the mirror made from ``source``: a symlink to it, a hard
    link of it, or an unchanged copy (same size and the same bytes: a modification time kept by
    the copy cannot tell an edit made within the same second)."""
    if target.is_symlink():
        return mode in (None, "symlink") and Path(os.readlink(target)) == source.resolve()
    if not target.is_file() or not source.is_file():
        return False
    if mode in (None, "hard") and os.path.samefile(target, source):
        return True
    if mode in (None, "copy"):
        import filecmp

        if target.stat().st_size != source.stat().st_size:
            return False
        return filecmp.cmp(target, source, shallow=False)
    return False


def _clear_old_mirror(mirror: Path) -> None:
    """Empty a mirror folder made by an earlier QC mirror before it is refreshed.

    Only what the marker lists is removed, and only where it is still what the mirror made
    (:func:`_made_by_mirror`); an entry that points outside the mirror (``..``, an absolute path,
    a folder symlinked elsewhere) means the marker was not written by cellmae: nothing is removed
    and the refresh is refused. Files the mirror did not make are never removed either.
    """
    import json

    marker = mirror / MIRROR_MARKER
    if not mirror.exists() or not any(mirror.iterdir()):
        return
    if not marker.is_file():
        raise ValueError(
            f"The mirror folder {mirror} exists and is not empty: choose a new or empty folder "
            "(a folder made by an earlier QC mirror is refreshed)."
        )
    fix = f"choose a new mirror folder, or empty {mirror} yourself"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        listed, plate, mode = data["files"], Path(data["plate"]), data.get("mode")
        if not isinstance(listed, list) or not all(isinstance(r, str) for r in listed):
            raise TypeError("'files' is not a list of paths")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"The mirror marker {marker} is unreadable ({exc}): {fix}.") from None
    base = mirror.resolve()
    targets = []
    for rel in listed:  # check every entry before removing anything
        target = mirror / rel
        parent = target.parent.resolve()  # a folder symlinked out of the mirror resolves outside
        if (
            not rel.strip()
            or Path(rel).is_absolute()
            or ".." in Path(rel).parts
            or not (parent == base or base in parent.parents)
        ):
            raise ValueError(
                f"The mirror marker {marker} lists {rel!r}, which is not inside the mirror "
                f"folder: it was not written by cellmae, and nothing was removed. Choose a new "
                f"mirror folder, or empty {mirror} yourself."
            )
        targets.append((target, plate / rel))
    kept = []
    for target, source in targets:  # only links or copies the mirror made, never originals
        if _made_by_mirror(target, source, mode):
            target.unlink()
        elif target.exists() or target.is_symlink():
            kept.append(target)
    for folder, _, _ in sorted(os.walk(mirror), key=lambda t: len(t[0]), reverse=True):
        path = Path(folder)
        if path != mirror and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    if kept:
        shown = ", ".join(str(p.relative_to(mirror)) for p in kept[:5])
        raise ValueError(
            f"The mirror folder {mirror} holds files changed since the mirror made them ({shown}"
            f"{' …' if len(kept) > 5 else ''}): they were left as they are. Move them away, or "
            "choose a new mirror folder."
        )


def _place(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
    elif mode == "hard":
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise ValueError(
                    f"Cannot hard-link {src} into {dst.parent} ({exc.strerror}): hard links need "
                    "the same file system. Use link mode 'symlink' or 'copy', or a mirror folder "
                    "on the plate's disk."
                ) from None
            raise
    else:
        from ..store import atomic_path

        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)


def check_mirrorable(plate: str | os.PathLike | pd.DataFrame) -> None:
    """ValueError when the plate (folder or index) keeps its fields in an OME-Zarr store: the
    mirror links image files, and a zarr plate's fields are chunks of shared arrays."""
    from ..plates.omezarr import LAYOUT_NAME, is_ome_zarr_plate

    if isinstance(plate, (str, os.PathLike)):
        root, zarr_plate = plate, is_ome_zarr_plate(plate)
    else:
        root, zarr_plate = plate.attrs.get("root"), plate.attrs.get("layout") == LAYOUT_NAME
    if zarr_plate:
        raise ValueError(
            f"{root} is an OME-Zarr plate: its fields are chunks of shared zarr arrays, not files, "
            "so there is nothing to mirror (--link-passing / 'mirror passing images'). Leave the "
            "mirror out: passing_fields.csv lists the passing fields (and passing_images.csv "
            "their zarr image paths) to select them downstream."
        )


def mirror_passing(
    index: pd.DataFrame,
    fields: pd.DataFrame,
    mirror: str | os.PathLike,
    mode: str = "copy",
) -> Generator[Progress, None, dict[str, Any]]:
    """Link (``hard`` / ``symlink``) or ``copy`` the passing fields' files into ``mirror`` with
    their relative paths (plus a Harmony index file, for channel names). Progress generator;
    returns ``{"folder", "mode", "files"}``."""
    from ..plates.channels import HARMONY_INDEX_FILES
    from ..plates.scan import field_keys
    from ..store import write_json_atomic

    if mode not in LINK_MODES:
        raise ValueError(f"Unknown link mode {mode!r}: use one of {', '.join(LINK_MODES)}.")
    check_mirrorable(index)
    root = Path(index.attrs["root"])
    mirror = Path(mirror)
    _check_outside(mirror, root, "mirror folder")
    keys = field_keys(index)
    passing = {tuple(r) for r in fields.loc[fields["QC_Pass"], keys].itertuples(index=False)}
    chosen = [
        Path(p) for p, *k in index[["path", *keys]].itertuples(index=False) if tuple(k) in passing
    ]
    extras = [root / n for n in HARMONY_INDEX_FILES if (root / n).is_file()]
    todo = [*chosen, *extras]
    _clear_old_mirror(mirror)
    mirror.mkdir(parents=True, exist_ok=True)
    rels = [p.relative_to(root).as_posix() for p in todo]
    marker = {"plate": str(root), "mode": mode, "files": rels, "complete": False}
    write_json_atomic(mirror / MIRROR_MARKER, marker)
    for i, (src, rel) in enumerate(zip(todo, rels)):
        _place(src, mirror / rel, mode)
        if i % 16 == 0 or i == len(todo) - 1:
            yield Progress(i + 1, len(todo), f"mirroring passing images ({mode})")
    write_json_atomic(mirror / MIRROR_MARKER, {**marker, "complete": True})
    return {"folder": str(mirror), "mode": mode, "files": len(chosen)}


def run_qc(
    plate: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike,
    model: Any = None,
    head: QCHead | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    z_threshold: float = DEFAULT_Z,
    link_passing: str | os.PathLike | None = None,
    link_mode: str = "copy",
    layout: str = "auto",
    batch_size: int | None = None,
    executor: Any = None,
    shard: Any = None,
    assemble_only: bool = False,
    max_in_flight: int | None = None,
    device: str | None = None,
    force: bool = False,
) -> Generator[Progress, None, dict[str, Any]]:
    """The whole plate QC (``cellmae qc``) as a progress generator; returns a summary dict with
    the output paths, the method used, the notice, the per-plate summary table and
    ``pending_wells``.

    Given an ``executor`` (any ``concurrent.futures``-style one), a ``shard`` ("K/N") or
    ``assemble_only``, the plate is measured one well per task into ``out/wells/`` (resumable;
    :mod:`napari_cellmae.qc.wells`; ``device``: where other processes load the model) and judged
    once every well is there; until then (other shards still running) nothing is reported and
    ``pending_wells`` counts the wells missing."""
    if link_mode not in LINK_MODES:
        raise ValueError(f"Unknown link mode {link_mode!r}: use one of {', '.join(LINK_MODES)}.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is a probability in [0, 1], got {threshold}.")
    from ..outputs import check_output_dir, prepare_output_dir

    guard = {"subfolders": ["wells"], "force": force, "what": "plate folder"}
    if isinstance(plate, (str, os.PathLike)):
        check_output_dir(out, "qc", inputs=[plate], **guard)  # before any measuring
        if link_passing is not None:
            _check_outside(link_passing, plate, "mirror folder")
            check_mirrorable(plate)  # before measuring, not after
    if executor is None and shard is None and not assemble_only:
        result = yield from measure_plate(plate, model, head, layout=layout, batch_size=batch_size)
    else:
        from ..plates import scan_plate
        from .wells import measure_wells

        index = scan_plate(plate, layout) if isinstance(plate, (str, os.PathLike)) else plate
        # the wells are written before the report: claim the folder first
        root = index.attrs.get("root")
        prepare_output_dir(out, "qc", inputs=[root] if root else [], **guard)
        result, pending = yield from measure_wells(
            index,
            out,
            model,
            head,
            executor=executor,
            shard=shard,
            assemble_only=assemble_only,
            max_in_flight=max_in_flight,
            device=device,
            batch_size=batch_size,
        )
        if result is None:  # the other shards' wells are not all there: they will report
            used, notice = head_status(head, model)
            return {
                "paths": {},
                "method": "head" if used is not None else "classic",
                "notice": notice,
                "summary": None,
                "mirror": None,
                "fields": None,
                "pending_wells": pending,
            }
    images, fields = judge(result, threshold, z_threshold)
    yield Progress(len(fields), len(fields), "writing the report")
    paths = write_report(
        result,
        out,
        images,
        fields,
        threshold=threshold,
        z_threshold=z_threshold,
        force=force,
        mirror=None if link_passing is None else {"folder": str(link_passing), "mode": link_mode},
    )
    mirrored = None
    if link_passing is not None:
        mirrored = yield from mirror_passing(result.index, fields, link_passing, link_mode)
    return {
        "paths": paths,
        "method": result.method,
        "notice": result.notice,
        "summary": summarize(fields),
        "mirror": mirrored,
        "fields": fields,
        "pending_wells": 0,
    }
