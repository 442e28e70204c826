"""Training QC heads: from synthetic artefacts on fields (a plate's, or any images), or from labels.

- :func:`artefact_variants`: every image once as it is ("ok") and once per artefact recipe at a
  random severity (seeded) — the training set of the default head and of a head trained on the
  fly for another encoder.
- :func:`train_head_from_images` / :func:`train_head_from_plate`: progress generators that
  measure and embed those variants and fit a head (minutes on a CPU for OpenPhenom).
- :func:`train_qc_head`: (re)train from a small labelled set — a CSV of image -> class, or
  labels clicked in napari with the features the QC run already computed.
- :func:`adapt_head`: what retraining from labels does (``retrain``, the QC tab's **Retrain**):
  the base head moved just far enough that each label holds, while it keeps its own verdicts on
  its training memory and on the plate's other images (see its docstring).
- :func:`suggest_fields`: the fields the head is least sure about, to label first.
- :func:`compare_heads`: held-out accuracy of two heads on a plate's own synthetic artefacts
  (what **Train head from plate** shows before replacing the head in use).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..progress import Progress
from .artefacts import ARTEFACTS, SEVERITIES, apply_artefact
from .baseline import evidence_weighted_proba
from .head import (
    CLASSES,
    DEFAULT_C,
    FeatureSpec,
    QCHead,
    embed_images,
    encoder_info,
    fit_head,
    metric_features,
    spec_for,
    with_relative,
)
from .metrics import measure

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

TRAIN_SEVERITIES = (2, 3, 4, 5)  # level 1 is often invisible: it would teach the head noise


class Variant(NamedTuple):
    image: np.ndarray  # (H, W), the source's dtype
    qc_class: str
    kind: str  # artefact name, or "none"
    severity: int  # 0 for "ok"
    source: int  # index of the source image


def artefact_variants(
    images: Sequence[np.ndarray],
    seed: int = 0,
    severities: Sequence[int] = TRAIN_SEVERITIES,
    kinds: Sequence[str] | None = None,
) -> Iterator[Variant]:
    """Each (H, W) image as it is, then with each artefact in ``kinds`` (default: all) at a
    severity drawn from ``severities``; deterministic for a seed."""
    kinds = list(kinds or ARTEFACTS)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ValueError(f"severities {bad} are not in {SEVERITIES}.")
    rng = np.random.default_rng(seed)
    for i, image in enumerate(images):
        image = np.asarray(image)
        yield Variant(image, "ok", "none", 0, i)
        for kind in kinds:
            severity = int(rng.choice(list(severities)))
            spoilt = apply_artefact(image, kind, severity, seed=int(rng.integers(2**31)))
            yield Variant(spoilt, ARTEFACTS[kind].qc_class, kind, severity, i)


def metric_table(images: Sequence[np.ndarray], scale: int = 20) -> pd.DataFrame:
    """One row of ``QC_<metric>`` columns (CellProfiler's, at spatial scale ``scale``) per
    (H, W) image: what the head's metric features and the classic baseline read."""
    import pandas as pd

    rows = [{f"QC_{k}": float(v[0]) for k, v in measure(im, (scale,)).items()} for im in images]
    return pd.DataFrame(rows, index=pd.RangeIndex(len(rows)))


def absolute_features(
    images: Sequence[np.ndarray],
    spec: FeatureSpec,
    model: Any = None,
    batch_size: int | None = None,
    metrics: pd.DataFrame | None = None,
) -> np.ndarray:
    """(N, spec.n_absolute) of (H, W) images: the metric transforms, then the embedding.
    ``metrics``: the images' :func:`metric_table` at ``spec.scale``, when already measured."""
    if metrics is None:
        metrics = metric_table(images, spec.scale)
    elif len(metrics) != len(images):
        raise ValueError(f"{len(metrics)} metric rows for {len(images)} images.")
    x = metric_features(metrics, spec)
    if spec.uses_encoder:
        if model is None:
            raise ValueError("This feature spec uses encoder embeddings: pass the model.")
        x = np.concatenate([x, embed_images(model, images, spec.block, batch_size)], axis=1)
    return x


def image_features(
    images: Sequence[np.ndarray],
    spec: FeatureSpec,
    model: Any = None,
    batch_size: int | None = None,
    groups: Sequence[Any] | None = None,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """Head features (N, spec.n_features) of (H, W) images.

    The plate-relative half is taken against the median of the ``reference`` rows (bool mask;
    default: all) of each group of ``groups`` (plate/channel labels; default: one group), so pass
    a few clean fields of the same plate with the images to judge.
    """
    x = absolute_features(images, spec, model, batch_size)
    return with_relative(x, spec, groups, reference)


def train_head_from_images(
    images: Sequence[np.ndarray],
    model: Any = None,
    *,
    groups: Sequence[Any] | None = None,
    seed: int = 0,
    severities: Sequence[int] = TRAIN_SEVERITIES,
    block: int | None = None,
    scale: int = 20,
    C: float = DEFAULT_C,
    batch_size: int | None = None,
    chunk: int = 9,
    training: dict[str, Any] | None = None,
):
    """Progress generator: artefact variants of ``images`` -> features -> a new head.

    ``groups`` gives each image's plate/channel (default: one group): the plate-relative
    features of a variant are taken against the median of its group's clean originals.
    ``model`` None trains a metrics-only head. Returns ``(head, features, labels)``.
    """
    spec = spec_for(model, block=block, scale=scale)
    variants = list(artefact_variants(images, seed=seed, severities=severities))
    total = len(variants)
    parts, labels = [], []
    for start in range(0, total, chunk):
        batch = variants[start : start + chunk]
        yield Progress(start, total, f"measuring and embedding artefact {start + 1}/{total}")
        parts.append(absolute_features([v.image for v in batch], spec, model, batch_size))
        labels += [v.qc_class for v in batch]
    yield Progress(total, total, "fitting the head")
    x = np.concatenate(parts) if parts else np.zeros((0, spec.n_absolute))
    source_group = list(groups) if groups is not None else [0] * len(images)
    if len(source_group) != len(images):
        raise ValueError(f"{len(source_group)} groups for {len(images)} images.")
    x = with_relative(
        x,
        spec,
        [source_group[v.source] for v in variants],
        np.array([v.kind == "none" for v in variants]),
    )
    kinds: dict[str, int] = {}
    for v in variants:
        kinds[v.kind] = kinds.get(v.kind, 0) + 1
    summary = {
        "severities": list(severities),
        "variants": kinds,
        "n_source_images": len(images),
        **(training or {}),
    }
    encoder = encoder_info(model) if model is not None else None
    head = fit_head(x, labels, spec, encoder, C=C, seed=seed, training=summary)
    return head, x, labels


def _field_key(meta: dict, keys: Sequence[str]) -> tuple:
    return tuple(meta[k].item() if hasattr(meta[k], "item") else meta[k] for k in keys)


def sample_plate_images(
    index: pd.DataFrame, n_fields: int = 12, seed: int = 0, exclude: Sequence[Sequence] = ()
) -> Iterator[tuple[dict, np.ndarray | None, str]]:
    """Read up to ``n_fields`` random readable fields, none of ``exclude`` (field keys, in
    ``field_keys`` order); yields (metadata, field, error)."""
    from ..plates import iter_fields, list_fields
    from ..plates.scan import field_keys

    fields = list_fields(index)
    fields = fields[fields["complete"]] if "complete" in fields else fields
    if len(exclude):
        keys = field_keys(index)
        skip = {tuple(k) for k in exclude}
        fields = fields[[_field_key(r, keys) not in skip for r in fields.to_dict("records")]]
    if fields.empty:
        raise ValueError(
            f"The plate {index.attrs.get('root')} has no complete field to learn from"
            + (" besides the ones already used." if len(exclude) else ".")
        )
    pick = np.sort(np.random.default_rng(seed).permutation(len(fields))[: int(n_fields)])
    for meta, image, error in iter_fields(index, fields=fields.iloc[pick], prefetch=2):
        yield meta, image, "" if error is None else str(error)


def train_head_from_plate(
    plate: str | os.PathLike | pd.DataFrame,
    model: Any,
    *,
    n_fields: int = 12,
    layout: str = "auto",
    seed: int = 0,
    severities: Sequence[int] = TRAIN_SEVERITIES,
    block: int | None = None,
    C: float = DEFAULT_C,
    batch_size: int | None = None,
):
    """Progress generator: a head for ``model``'s encoder from synthetic artefacts applied to
    the user's own plate (every channel of ``n_fields`` random fields). Returns the head.

    Use it when the head at hand was trained on another encoder (its checksum differs); before
    replacing a head that does match, compare both with :func:`compare_heads_on_plate` on
    other fields of the plate (the fields learnt from are in ``head.training["fields"]``).
    """
    from ..plates import scan_plate
    from ..plates.scan import field_keys

    index = plate if not isinstance(plate, (str, os.PathLike)) else scan_plate(plate, layout)
    images, groups, used, skipped = [], [], [], 0
    yield Progress(0, None, f"reading {n_fields} fields of the plate")
    for meta, field, error in sample_plate_images(index, n_fields, seed):
        if error:
            skipped += 1
            continue
        images += list(field)
        groups += [(meta.get("Metadata_Plate"), c) for c in range(len(field))]
        used.append(list(_field_key(meta, field_keys(index))))
    if not images:
        raise ValueError(f"No readable field in {index.attrs.get('root')}: nothing to learn from.")
    summary = {
        "sources": [f"plate {index.attrs.get('root')}"],
        "n_fields": int(n_fields) - skipped,
        "fields": used,  # their keys: compare_heads_on_plate judges on the others
        "how": "synthetic artefacts applied to the user's plate (train_head_from_plate)",
    }
    head, _, _ = yield from train_head_from_images(
        images,
        model,
        groups=groups,
        seed=seed,
        severities=severities,
        block=block,
        C=C,
        batch_size=batch_size,
        training=summary,
    )
    return head


def score_head(
    head: QCHead,
    features: np.ndarray,
    labels: Sequence[str],
    threshold: float = 0.5,
    metrics: pd.DataFrame | None = None,
    *,
    evidence: bool = True,
):
    """How well ``head`` judges labelled images, as QC runs judge them: a dict with
    ``balanced_accuracy`` of the flag (1 − P(ok) > ``threshold``; the mean of ``detected`` and
    1 − ``clean_flagged``), ``detected`` (artefact images flagged), ``clean_flagged`` (clean
    images flagged), ``class_accuracy`` (artefact images given their class),
    ``detected_by_class`` (per artefact class, its images flagged), ``n_images`` and ``evidence``
    (whether the verdict was weighed).

    With ``evidence`` (the default) the head's probabilities are weighed by the classic evidence
    that each image is off, as in a QC run (:func:`~.baseline.evidence_weighted_proba`):
    ``metrics`` is then the images' table of ``QC_<metric>`` columns with their plate/channel
    (``Metadata_Plate``, ``Metadata_Channel``), in the order of ``features``. ``evidence=False``
    scores the bare head.
    """
    y = np.asarray([str(v) for v in labels])
    p = head.predict_proba(features)
    if evidence:
        if metrics is None:
            raise ValueError(
                "score_head judges as QC runs do (the head weighed by the classic evidence): "
                "pass the images' metric table (metrics=...), or evidence=False for the bare head."
            )
        if len(metrics) != len(y):
            raise ValueError(f"{len(metrics)} metric rows for {len(y)} labelled images.")
        p = evidence_weighted_proba(p, metrics.reset_index(drop=True), scale=head.spec.scale)
    flag = 1.0 - p[:, 0] > threshold
    bad = y != "ok"
    detected = float(flag[bad].mean()) if bad.any() else float("nan")
    clean_flagged = float(flag[~bad].mean()) if (~bad).any() else float("nan")
    called = np.asarray(CLASSES[1:])[p[:, 1:].argmax(axis=1)]
    return {
        "balanced_accuracy": float(np.nanmean([detected, 1.0 - clean_flagged])),
        "detected": detected,
        "clean_flagged": clean_flagged,
        "class_accuracy": float((called[bad] == y[bad]).mean()) if bad.any() else float("nan"),
        "detected_by_class": {c: float(flag[y == c].mean()) for c in CLASSES[1:] if (y == c).any()},
        "n_images": len(y),
        "evidence": bool(evidence),
    }


def compare_heads_on_plate(
    plate: str | os.PathLike | pd.DataFrame,
    model: Any,
    heads: dict[str, QCHead | None],
    *,
    exclude: Sequence[Sequence] = (),
    n_fields: int = 8,
    layout: str = "auto",
    seed: int = 1,
    threshold: float = 0.5,
    batch_size: int | None = None,
    evidence: bool = True,
):
    """Progress generator: judge each head of ``heads`` on synthetic artefacts applied to
    ``n_fields`` fields of the plate that are not in ``exclude`` (the fields a new head learnt
    from: ``head.training["fields"]``), every channel once clean and once per artefact recipe
    (severity 2–5, seed ``seed``, so other draws than in training).

    Each head is judged as QC runs judge (``evidence``, see :func:`score_head`): the classic
    baseline sees the variants of each source plate/channel as one group, clean and spoilt
    together. Returns ``{name: score_head(...) dict, plus "held_out" (bool) and "fields" (n)}``,
    or ``{name: {"error": why}}`` for a head that cannot read this model's embeddings (or None).
    When every field was learnt from, the heads are judged on those with new artefact draws
    (``held_out`` False).
    """
    from ..plates import scan_plate

    index = plate if not isinstance(plate, (str, os.PathLike)) else scan_plate(plate, layout)
    yield Progress(0, None, "reading held-out fields of the plate")
    held_out = True
    try:
        sampled = list(sample_plate_images(index, n_fields, seed, exclude))
    except ValueError:
        if not len(exclude):
            raise
        held_out, sampled = False, list(sample_plate_images(index, n_fields, seed))
    images, groups = [], []
    for meta, field, error in sampled:
        if not error:
            images += list(field)
            groups += [(meta.get("Metadata_Plate"), c) for c in range(len(field))]
    if not images:
        raise ValueError(f"No readable field in {index.attrs.get('root')} to judge the heads on.")
    variants = list(artefact_variants(images, seed=seed))
    labels = [v.qc_class for v in variants]
    reference = np.array([v.kind == "none" for v in variants])
    variant_groups = [groups[v.source] for v in variants]
    out: dict[str, dict[str, Any]] = {}
    tables: dict[int, pd.DataFrame] = {}  # per spatial scale: QC_ metrics + plate/channel
    cache: dict[FeatureSpec, np.ndarray] = {}
    for name, head in heads.items():
        if head is None:
            out[name] = {"error": "no head (classic metrics only)"}
            continue
        if not head.matches(model):
            out[name] = {"error": "trained on another encoder than this model"}
            continue
        scale = head.spec.scale
        if scale not in tables:
            yield Progress(0, None, f"measuring {len(variants)} artefact images")
            table = metric_table([v.image for v in variants], scale)
            # one plate/channel group per source group, as a QC run groups the plate's images
            table["Metadata_Plate"] = [str(g[0]) for g in variant_groups]
            table["Metadata_Channel"] = [g[1] for g in variant_groups]
            tables[scale] = table
        if head.spec not in cache:
            if head.spec.uses_encoder:
                yield Progress(0, None, f"embedding {len(variants)} artefact images for {name}")
            x = absolute_features(
                [v.image for v in variants], head.spec, model, batch_size, tables[scale]
            )
            cache[head.spec] = with_relative(x, head.spec, variant_groups, reference)
        score = score_head(
            head, cache[head.spec], labels, threshold, tables[scale], evidence=evidence
        )
        out[name] = {
            **score,
            "held_out": held_out,
            "fields": len(sampled),
            "threshold": float(threshold),
        }
    return out


def better_head(report: dict[str, dict[str, Any]]) -> str:
    """Which head to keep, ``"new"`` or ``"current"``, from a :func:`compare_heads_on_plate`
    report: the higher held-out balanced accuracy (a tie keeps the current one; a current head
    that cannot judge this model's embeddings loses)."""
    cur, new = report.get("current", {}), report.get("new", {})
    if "balanced_accuracy" not in cur:
        return "new"
    if new.get("balanced_accuracy", -1.0) > cur["balanced_accuracy"]:
        return "new"
    return "current"


def describe_comparison(report: dict[str, dict[str, Any]]) -> str:
    """The comparison in words: per head, held-out balanced accuracy (as QC runs judge, unless
    the report was made with ``evidence=False``), artefacts detected and clean images flagged."""
    parts = []
    for name, r in report.items():
        if "error" in r:
            parts.append(f"{name} head: not comparable ({r['error']})")
            continue
        parts.append(
            f"{name} head {r['balanced_accuracy']:.2f} (artefacts detected "
            f"{100 * r['detected']:.0f}%, clean flagged {100 * r['clean_flagged']:.0f}%)"
        )
    some = next((r for r in report.values() if "n_images" in r), {})
    where = f"{some.get('n_images')} synthetic artefact images of {some.get('fields')} fields " + (
        "it did not learn from" if some.get("held_out") else "(no other field: the same ones)"
    )
    how = ", as QC runs judge" if some.get("evidence", False) else " (bare heads)"
    if "threshold" in some:
        how += f" at threshold {some['threshold']:.2f}"
    return f"held-out accuracy on {where}{how}: " + "; ".join(parts)


def read_labels(labels: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """A labels table: columns ``path`` and ``class`` (or ``label``), optional ``channel`` (plane
    index of a multi-page file) and ``plate`` (images of one plate and channel are compared with
    each other: label a few clean ones ``ok``). Relative paths are taken from the CSV's folder."""
    import pandas as pd

    if isinstance(labels, pd.DataFrame):
        df, base = labels.copy(), Path.cwd()
    else:
        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"labels CSV {path} not found: pass a CSV with path,class.")
        df, base = pd.read_csv(path), path.parent
    if "class" not in df.columns and "label" in df.columns:
        df = df.rename(columns={"label": "class"})
    missing = {"path", "class"} - set(df.columns)
    if missing:
        raise ValueError(
            f"The labels table needs columns path and class (image file -> one of "
            f"{', '.join(CLASSES)}); missing {sorted(missing)}."
        )
    df["class"] = df["class"].astype(str).str.strip().str.lower()
    unknown = sorted(set(df["class"]) - set(CLASSES))
    if unknown:
        raise ValueError(f"Unknown classes {unknown} in the labels: use {', '.join(CLASSES)}.")
    df["path"] = [str(p if Path(p).is_absolute() else base / p) for p in df["path"].astype(str)]
    return df


def _label_images(df: pd.DataFrame) -> tuple[list[np.ndarray], list[str], list[Any]]:
    from ..plates import read_image

    images, classes, groups = [], [], []
    for row in df.itertuples(index=False):
        planes = read_image(row.path)  # CorruptFileError (a ValueError) names the file
        channel = getattr(row, "channel", None)
        if channel is not None and not (isinstance(channel, float) and np.isnan(channel)):
            if not 0 <= int(channel) < len(planes):
                raise ValueError(
                    f"{row.path} has {len(planes)} planes: channel {channel} is absent."
                )
            planes = planes[int(channel) : int(channel) + 1]
        for c, plane in enumerate(planes):
            images.append(plane)
            classes.append(row[list(df.columns).index("class")])
            groups.append((getattr(row, "plate", ""), getattr(row, "channel", c)))
    return images, classes, groups


def train_qc_head(
    labels: str | os.PathLike | pd.DataFrame | Sequence[str],
    model: Any = None,
    *,
    base: QCHead | str | os.PathLike | None = None,
    features: np.ndarray | None = None,
    label_weight: float = 1.0,
    C: float = DEFAULT_C,
    seed: int = 0,
    batch_size: int | None = None,
) -> QCHead:
    """Train (or retrain) a QC head from a small labelled set; seconds on a CPU.

    Parameters
    ----------
    labels : path, DataFrame or list of str
        A CSV / table of image ``path`` -> ``class`` (optional ``channel``: plane of a multi-page
        file), or, with ``features``, one class name per feature row (labels clicked in napari).
    model : CellMAEModel or str, optional
        The frozen encoder (a loaded model or a source for :func:`napari_cellmae.load_model`).
        Needed when the head uses embeddings; None with no ``base`` trains a metrics-only head.
    base : QCHead or path, optional
        Start from this head and adjust it to the labels (:func:`adapt_head`: its verdicts on
        its training memory are kept, each label weighted from ``label_weight`` up until it
        holds), so what it knew about other images and classes stays.
    features : ndarray, optional
        (N, F) features of the labelled images, as computed by the QC run (skips reading).

    Returns
    -------
    QCHead
        Save it with ``head.save("my_head.npz")``.
    """
    if isinstance(model, (str, os.PathLike)):
        from .. import load_model

        model = load_model(model, encoder_only=True)
    if isinstance(base, (str, os.PathLike)):
        base = QCHead.load(base)
    if base is not None and base.spec.uses_encoder and features is None and not base.matches(model):
        raise ValueError(
            f"The base head was trained on encoder {(base.encoder or {}).get('name')} "
            f"({(base.encoder or {}).get('checksum', '')[:12]}); pass that model, or train a head "
            "for this model first (train_head_from_plate / 'cellmae qc --train-from-plate')."
        )
    spec = base.spec if base is not None else spec_for(model)
    if features is None:
        df = read_labels(labels)
        images, classes, groups = _label_images(df)
        # plate-relative features against the images labelled ok in the same plate/channel
        x = image_features(
            images, spec, model, batch_size, groups, np.array([c == "ok" for c in classes])
        )
    else:
        classes = [str(c) for c in labels]
        x = np.asarray(features, np.float64)
        if len(x) != len(classes):
            raise ValueError(f"{len(x)} feature rows for {len(classes)} labels.")
    if not classes:
        raise ValueError("No labels given: label at least one image.")
    if base is not None:
        from .adapt import adapt_head

        return adapt_head(base, x, classes, label_weight=label_weight)
    encoder = encoder_info(model) if spec.uses_encoder else None
    return fit_head(x, classes, spec, encoder, C=C, seed=seed, training={"how": "labels"})
