"""Linear probes and block search: which encoder block's frozen features best predict a label?

Masked autoencoders often keep their most linearly useful features in an intermediate block, not
the last one (Kraus et al. 2025, Phenom-2). Given labels per well (a platemap column such as the
perturbation or mechanism) or per field (QC labels), :func:`probe_plates` embeds crops of the
labelled fields with EVERY block in one pass (:func:`block_embeddings`), trains a linear probe per
block (standardised features + multinomial logistic regression, scikit-learn) with
cross-validation that holds out whole wells (``StratifiedGroupKFold``), and reports accuracy per
block. :func:`set_best_block` stores the winner in the model folder's ``config.json``
(``best_block``), which :meth:`CellMAEModel.embed` then uses by default (``block=`` overrides).

>>> from napari_cellmae.probes import probe_plates, set_best_block  # doctest: +SKIP
>>> result = run(probe_plates("my-model", ["plate1"], "platemap.csv", "Metadata_Mechanism"))
>>> result.table        # block, accuracy, accuracy_std
>>> set_best_block("my-model", result)
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .progress import Progress, ProgressGenerator

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .inference import CellMAEModel

logger = logging.getLogger(__name__)

_JOIN = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


@dataclass
class ProbeResult:
    """Probe accuracy per encoder block (1-based)."""

    table: pd.DataFrame  # block, accuracy, accuracy_std (over folds)
    best_block: int
    chance: float  # accuracy of always answering the most frequent class
    label: str
    classes: list[str]
    n_samples: int  # crops
    n_groups: int  # wells
    folds: int
    pooling: str = "mean"  # of the features probed
    normalization: str = "crop"  # of their input ("plate": per-plate references)

    @property
    def best_accuracy(self) -> float:
        return float(self.table.set_index("block").loc[self.best_block, "accuracy"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "best_block": self.best_block,
            "best_accuracy": round(self.best_accuracy, 4),
            "chance": round(self.chance, 4),
            "accuracy_per_block": {
                int(r.block): round(float(r.accuracy), 4) for r in self.table.itertuples()
            },
            "classes": self.classes,
            "samples": self.n_samples,
            "wells": self.n_groups,
            "folds": self.folds,
            "cross_validation": "StratifiedGroupKFold by well",
            "pooling": self.pooling,
            "normalization": self.normalization,
        }


# --------------------------------------------------------------------------------------------
# Features of every block
# --------------------------------------------------------------------------------------------
def block_embeddings(
    model: CellMAEModel,
    images: Any,
    pooling: str = "mean",
    batch_size: int | None = None,
    reference: Any = None,
) -> np.ndarray:
    """Pooled tokens after each encoder block, in one pass through the encoder.

    images: (N, C, 256, 256), any real dtype -> (depth, N, D) float32, where ``[k - 1]`` equals
    ``model.embed(images, pooling=pooling, block=k, reference=reference)`` (``reference``: a
    plate normalisation reference, see :meth:`~napari_cellmae.inference.CellMAEModel.embed`).
    """
    import torch

    from .inference import pool_tokens, reference_rows
    from .model import standardize

    arr = model.check_images(images)
    module, channels = model.module, arr.shape[1]
    ref = model._check_reference(reference, arr.shape[:2])

    @torch.inference_mode()
    def run(sl: slice) -> np.ndarray:
        x = model._to_tensor(arr[sl])
        part = reference_rows(ref, sl)
        pooled = []
        with model._autocast():
            x, _, _ = standardize(x, module.config.input_eps, part)
            tokens = module._prepend_cls(module.embed_patches(x))  # (n, 1+C·L, D)
            for blk in module.blocks:
                tokens = blk(tokens)
                pooled.append(pool_tokens(tokens.float(), channels, pooling))
        return torch.stack(pooled).cpu().numpy()  # (depth, n, D)

    parts = list(model._run_batched(len(arr), batch_size, run))
    if not parts:
        return np.zeros((model.depth, 0, model.embed_dim), np.float32)
    return np.concatenate(parts, axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------
def _usable(labels: np.ndarray, groups: np.ndarray, folds: int) -> tuple[np.ndarray, int]:
    """Mask of samples whose class has >= 2 groups, and the number of folds to use."""
    wells_per_class = {c: len(set(groups[labels == c])) for c in np.unique(labels)}
    dropped = sorted(str(c) for c, n in wells_per_class.items() if n < 2)
    if dropped:
        logger.warning("classes in one well only cannot be validated by well: %s", dropped)
    keep = np.isin(labels, [c for c, n in wells_per_class.items() if n >= 2])
    kept = [n for n in wells_per_class.values() if n >= 2]
    if len(kept) < 2:
        raise ValueError(
            "A linear probe needs at least 2 classes with at least 2 wells each (wells are held "
            f"out together); the labels give {wells_per_class}. Use a label column with "
            "replicate wells, or more plates."
        )
    return keep, max(2, min(folds, min(kept)))


def probe_accuracy(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0
) -> tuple[float, float]:
    """Cross-validated accuracy (mean, std over folds) of a linear probe; whole groups (wells)
    are held out together and classes kept balanced across folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small folds: sklearn warns about class counts
        for train, test in splitter.split(features, labels, groups):
            if len(np.unique(labels[train])) < 2:
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
            probe.fit(features[train], labels[train])
            scores.append(float((probe.predict(features[test]) == labels[test]).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def block_search(
    features: np.ndarray,
    labels: Sequence[Any],
    groups: Sequence[Any],
    folds: int = 5,
    seed: int = 0,
    label: str = "label",
) -> ProbeResult:
    """A linear probe per block. features: (depth, N, D); labels, groups (wells): (N,).
    The best block is the most accurate (the later one on ties within 0.1%)."""
    import pandas as pd

    labels = np.asarray([str(v) for v in labels])
    groups = np.asarray([str(g) for g in groups])
    keep, n_folds = _usable(labels, groups, folds)
    labels, groups, features = labels[keep], groups[keep], features[:, keep]
    rows = []
    for k, feats in enumerate(features, start=1):
        acc, std = probe_accuracy(feats, labels, groups, n_folds, seed)
        rows.append({"block": k, "accuracy": acc, "accuracy_std": std})
    table = pd.DataFrame(rows)
    best = int(max(rows, key=lambda r: (round(r["accuracy"], 3), r["block"]))["block"])
    _, counts = np.unique(labels, return_counts=True)
    return ProbeResult(
        table=table,
        best_block=best,
        chance=float(counts.max() / counts.sum()),
        label=label,
        classes=sorted(set(labels.tolist())),
        n_samples=int(len(labels)),
        n_groups=int(len(set(groups.tolist()))),
        folds=n_folds,
    )


# --------------------------------------------------------------------------------------------
# From plate folders
# --------------------------------------------------------------------------------------------
def read_labels(labels: str | os.PathLike | pd.DataFrame, column: str) -> pd.DataFrame:
    """A platemap / QC table with ``Metadata_Well`` (+ optional ``Metadata_Plate``,
    ``Metadata_Site``) and ``column``; wells normalised to ``A01`` form."""
    import pandas as pd

    from .plates.layouts import split_well, well_name

    if not isinstance(labels, pd.DataFrame):
        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"Label table {path} does not exist: check --platemap.")
        labels = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "Metadata_Well" not in labels.columns or column not in labels.columns:
        raise ValueError(
            f"The label table needs columns Metadata_Well and {column!r}; it has "
            f"{list(labels.columns)}. Pass --label-column with one of them."
        )
    out = labels[[c for c in (*_JOIN, column) if c in labels.columns]].dropna(subset=[column])
    out = out.assign(Metadata_Well=[well_name(*split_well(str(w))) for w in out["Metadata_Well"]])
    if "Metadata_Plate" in out.columns:
        out = out.assign(Metadata_Plate=out["Metadata_Plate"].astype(str))
    return out


def probe_plates(
    model: str | os.PathLike | CellMAEModel | None,
    folders: Sequence[str | os.PathLike],
    labels: str | os.PathLike | pd.DataFrame,
    label_column: str,
    crops_per_field: int = 4,
    max_fields: int = 400,
    pooling: str | None = None,
    folds: int = 5,
    seed: int = 0,
    device: str | None = None,
    batch_size: int | None = None,
    channels: Sequence[str] | None = None,
    normalization: str | None = None,
) -> ProgressGenerator[ProbeResult]:
    """Block search on labelled plate folders (a progress generator returning a ProbeResult).

    Every labelled field (at most ``max_fields``, evenly chosen) is tiled into 256×256 crops (at
    most ``crops_per_field``, evenly chosen); each crop is a sample, its well the CV group.
    The features are those :meth:`~napari_cellmae.inference.CellMAEModel.embed_field` gives:
    ``pooling`` and ``normalization`` default to the model's own (with "plate", every plate's
    reference comes from :func:`napari_cellmae.embed.plate_references`), so the block found is
    the best block of the embeddings the model will produce.
    """
    import dataclasses

    from .embed import EmbedConfig, plate_references
    from .hub import load_model
    from .plates import iter_fields, list_fields, scan_plate

    if not hasattr(model, "embed"):
        model = load_model(model, device=device)
    pooling = pooling or model.default_pooling
    normalization = model._normalization(normalization)
    table = read_labels(labels, label_column)
    on = [c for c in _JOIN if c in table.columns]
    jobs = []
    for folder in folders:
        index = scan_plate(folder)
        fields = list_fields(index)
        keys = fields[on].astype({"Metadata_Plate": str} if "Metadata_Plate" in on else {})
        merged = keys.merge(table, on=on, how="left")
        fields = fields.assign(_label=merged[label_column].to_numpy())
        jobs.append((index, fields.dropna(subset=["_label"])))
    references: dict[str, np.ndarray] = {}
    if normalization == "plate":
        config = EmbedConfig(channels=tuple(channels) if channels else None)
        references = plate_references(model, [index for index, _ in jobs], config)
    n = sum(len(f) for _, f in jobs)
    if n == 0:
        raise ValueError(
            f"No field of {', '.join(map(str, folders))} has a {label_column!r} label: check "
            f"that the table's {', '.join(on)} match the plates."
        )
    stride = max(1.0, n / max_fields)
    feats, labs, groups = [], [], []
    done = 0
    for index, fields in jobs:
        picks = np.unique(np.floor(np.arange(0, len(fields), stride)).astype(int))
        fields = fields.iloc[picks]
        for res, label in zip(
            iter_fields(index, fields=fields, channels=channels), fields["_label"]
        ):
            done += 1
            if res.ok:
                crops, _ = model.field_crops(res.image)
                sel = np.round(np.linspace(0, len(crops) - 1, min(crops_per_field, len(crops))))
                # a plate without a reference (no usable field to compute it) -> per crop
                ref = references.get(str(res.metadata["Metadata_Plate"]))
                emb = block_embeddings(model, crops[sel.astype(int)], pooling, batch_size, ref)
                feats.append(emb)
                labs += [label] * emb.shape[1]
                well = (res.metadata["Metadata_Plate"], res.metadata["Metadata_Well"])
                groups += [f"{well[0]}/{well[1]}"] * emb.shape[1]
            yield Progress(
                done, min(n, max_fields), f"probe features: {done} fields", {"kind": "probe"}
            )
    features = np.concatenate(feats, axis=1)
    yield Progress(done, done, f"fitting probes on {features.shape[0]} blocks", {"kind": "probe"})
    result = block_search(features, labs, groups, folds, seed, label_column)
    return dataclasses.replace(result, pooling=pooling, normalization=normalization)


def set_best_block(folder: str | os.PathLike, result: ProbeResult) -> Path:
    """Store the best block (and the probe summary) in a model folder: ``config.json`` gets
    ``best_block`` and ``probes``; the model card a "Linear probes" section."""
    from .store import write_json_atomic, write_text_atomic

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("format") != "napari-cellmae":
        raise ValueError(f"{folder} is not a napari-cellmae model folder: save it first.")
    config["best_block"] = int(result.best_block)
    config["probes"] = result.to_dict()
    write_json_atomic(config_path, config)
    card_path = folder / "README.md"
    card = card_path.read_text() if card_path.is_file() else ""
    card = card.split("\n## Linear probes\n")[0].rstrip("\n") + "\n"
    lines = [
        "",
        "## Linear probes",
        "",
        f"Label `{result.label}` ({len(result.classes)} classes, {result.n_samples} crops from "
        f"{result.n_groups} wells, {result.folds}-fold cross-validation holding out whole wells; "
        f"chance {result.chance:.1%}). `embed()` uses block {result.best_block} by default.",
        "",
        "| block | accuracy |",
        "|---|---|",
        *(
            f"| {int(r.block)} | {r.accuracy:.1%} ± {r.accuracy_std:.1%} |"
            for r in result.table.itertuples()
        ),
    ]
    write_text_atomic(card_path, card + "\n".join(lines) + "\n")
    return folder
