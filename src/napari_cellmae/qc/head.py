"""The transfer-learned QC head: frozen encoder embeddings + classic metrics -> artefact class.

Features of one image (one channel of a field):

- the frozen encoder's embedding of that channel **alone**, as a 1-channel image: tiled into
  256×256 crops (``model.field_crops``), each crop mean-pooled over its patch tokens
  (``pooling="mean"``, the model's default block), then averaged over crops -> (D,). Embedding
  each channel by itself (rather than channelwise pooling of a multi-channel pass) keeps the
  vector independent of the other channels, so an artefact in one channel does not leak into
  the others' features and the worst channel is the one that really is bad; a head learnt on
  1-channel images also serves plates with any number and order of channels, and C separate
  sequences of 1 + 256 tokens cost less attention than one of 1 + 256·C;
- transforms of the CellProfiler metrics that do not depend on the image's intensity scale
  (:data:`METRIC_FEATURES`; the head's ``FeatureSpec.metric_features`` picks them), so 8-bit,
  12-bit and 16-bit plates (and 8-bit data stored in 16 bits) look alike;
- optionally (``FeatureSpec.relative``) the same metric transforms and embedding again, minus
  their median over the image's plate and channel, and PercentMaximal as a robust z-score in the
  plate ("plate-relative", like the baseline's z-scores). The reference is the plate/channel
  median over all readable images at QC time, which assumes that most of the plate is fine: on a
  failed-autofocus plate the blurred fields are the norm and the few sharp ones become its
  outliers. The shipped head therefore does **not** use them (``relative=False``: every image is
  judged by what it shows alone, and ``cellmae qc`` warns when most of a plate is one artefact,
  see :func:`napari_cellmae.qc.run.plate_warning`); heads trained on one plate for another
  encoder (:func:`napari_cellmae.qc.training.train_head_from_plate`) may.

The head is a multinomial logistic regression on standardised features (scikit-learn, seconds
on a CPU, no sensitive hyper-parameter). It is saved as a small ``.npz`` (no pickle) with the
encoder it was trained on (name + checksum), the classes, the feature spec, a training summary
and a small memory of training features (up to 40 per class) so that retraining from a handful
of new labels keeps what it knew about the other classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLASSES: tuple[str, ...] = ("ok", "blur", "saturation", "debris", "noise", "empty", "background")
ARTEFACT_CLASSES = CLASSES[1:]
HEAD_FORMAT = "napari-cellmae-qc-head"
FORMAT_VERSION = 1
HEADS_DIR = Path(__file__).parent / "heads"
DEFAULT_HEAD = HEADS_DIR / "default.npz"
MEMORY_PER_CLASS = 40
DEFAULT_C = 0.1
MAD_TO_SD = 1.4826
Z_FLOOR = 0.2  # smallest spread of a metric feature (log10 units) in the plate z-scores
Z_CLIP = 10.0


def _log(x: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(np.asarray(x, np.float64), 1e-6))


def _log10p(x: np.ndarray, eps: float) -> np.ndarray:
    return np.log10(np.maximum(np.asarray(x, np.float64) + eps, 1e-12))


# name -> (formula, function of the QC_ columns (dict of arrays) and the spatial scale N)
METRIC_FEATURES: dict[str, tuple[str, Callable[[dict, int], np.ndarray]]] = {
    "plls": ("PowerLogLogSlope", lambda q, n: q["PowerLogLogSlope"]),
    "correlation": ("Correlation_N", lambda q, n: q[f"Correlation_{n}"]),
    "log_cv2": (
        "log10(FocusScore / MeanIntensity)",
        lambda q, n: _log(q["FocusScore"] / np.maximum(q["MeanIntensity"], 1e-9)),
    ),
    "log_local_focus": (
        "log10(LocalFocusScore_N / MeanIntensity)",
        lambda q, n: _log(q[f"LocalFocusScore_{n}"] / np.maximum(q["MeanIntensity"], 1e-9)),
    ),
    "log_pct_max": ("log10(PercentMaximal + 0.001)", lambda q, n: _log(q["PercentMaximal"] + 1e-3)),
    "log_pct_min": ("log10(PercentMinimal + 0.001)", lambda q, n: _log(q["PercentMinimal"] + 1e-3)),
    "log_max_over_mad": (
        "log10((MaxIntensity − MedianIntensity) / (MADIntensity + 1e-4·MeanIntensity))",
        lambda q, n: _log(
            (q["MaxIntensity"] - q["MedianIntensity"])
            / (q["MADIntensity"] + 1e-4 * q["MeanIntensity"] + 1e-12)
        ),
    ),
    "log_otsu_over_median": (
        "log10(ThresholdOtsu / MedianIntensity)",
        lambda q, n: _log(q["ThresholdOtsu"] / np.maximum(q["MedianIntensity"], 1e-9)),
    ),
    "log_iqr_over_median": (
        "log10((UpperQuartile − LowerQuartile) / MedianIntensity)",
        lambda q, n: _log(
            (q["UpperQuartileIntensity"] - q["LowerQuartileIntensity"])
            / np.maximum(q["MedianIntensity"], 1e-9)
        ),
    ),
    "log_mad_over_median": (
        "log10(MADIntensity / MedianIntensity)",
        lambda q, n: _log(q["MADIntensity"] / np.maximum(q["MedianIntensity"], 1e-9)),
    ),
    "log_min_over_median": (
        "log10(MinIntensity / MedianIntensity)",
        lambda q, n: _log(q["MinIntensity"] / np.maximum(q["MedianIntensity"], 1e-9)),
    ),
}
# the plate-independent physical cues (qc/cues.py): illumination, bright objects, clipping
_CUE_TRANSFORMS: dict[str, tuple[str, Callable[[dict, int], np.ndarray]]] = {
    "bg_range": ("log10(BackgroundRange + 1e-4)", lambda q, n: _log10p(q["BackgroundRange"], 1e-4)),
    "bg_smooth_amp": (
        "log10(BackgroundSmoothAmplitude + 1e-4)",
        lambda q, n: _log10p(q["BackgroundSmoothAmplitude"], 1e-4),
    ),
    "bg_smooth_frac": ("BackgroundSmoothFraction", lambda q, n: q["BackgroundSmoothFraction"]),
    "bg_ratio": ("log10(BackgroundRatio)", lambda q, n: _log10p(q["BackgroundRatio"], 0.0)),
    "fg_smooth_amp": (
        "log10(ForegroundSmoothAmplitude + 1e-4)",
        lambda q, n: _log10p(q["ForegroundSmoothAmplitude"], 1e-4),
    ),
    "fg_smooth_frac": ("ForegroundSmoothFraction", lambda q, n: q["ForegroundSmoothFraction"]),
    "bright_frac_3": (
        "log10(BrightFraction3 + 1e-5)",
        lambda q, n: _log10p(q["BrightFraction3"], 1e-5),
    ),
    "bright_frac_6": (
        "log10(BrightFraction6 + 1e-5)",
        lambda q, n: _log10p(q["BrightFraction6"], 1e-5),
    ),
    "fg_frac": (
        "log10(ForegroundFraction + 1e-4)",
        lambda q, n: _log10p(q["ForegroundFraction"], 1e-4),
    ),
    "range_over_fg": (
        "log10(RangeOverForeground)",
        lambda q, n: _log10p(q["RangeOverForeground"], 0.0),
    ),
    "pct_ceiling": (
        "log10(PercentCeiling / 100 + 1e-5)",
        lambda q, n: _log10p(q["PercentCeiling"] / 100.0, 1e-5),
    ),
    "max_plateau": (
        "log10(MaxPlateauFraction + 1e-6)",
        lambda q, n: _log10p(q["MaxPlateauFraction"], 1e-6),
    ),
    "max_in_plateaus": ("MaxInPlateaus", lambda q, n: q["MaxInPlateaus"]),
}
METRIC_FEATURES.update(_CUE_TRANSFORMS)
CUE_FEATURES = tuple(_CUE_TRANSFORMS)  # the cues' transforms, in qc/cues.py order


@dataclass(frozen=True)
class FeatureSpec:
    """What a head's feature vector is made of (saved in the head file)."""

    metric_features: tuple[str, ...] = tuple(METRIC_FEATURES)  # names in METRIC_FEATURES
    scale: int = 20  # spatial scale N of LocalFocusScore_N / Correlation_N
    embed_dim: int = 0  # width of the encoder embedding; 0 = a metrics-only head
    block: int | None = None  # encoder block (1-based); None = the model's default block
    relative: bool = True  # also every feature minus its plate/channel median
    z_features: tuple[str, ...] = ("log_pct_max",)  # also as robust plate z-scores (if relative)

    @property
    def uses_encoder(self) -> bool:
        return self.embed_dim > 0

    @property
    def n_absolute(self) -> int:
        return len(self.metric_features) + self.embed_dim

    @property
    def n_features(self) -> int:
        if not self.relative:
            return self.n_absolute
        return 2 * self.n_absolute + len(self.z_features)

    def names(self) -> list[str]:
        absolute = [*self.metric_features, *(f"emb_{i:04d}" for i in range(self.embed_dim))]
        if not self.relative:
            return absolute
        return [
            *absolute,
            *(f"rel_{n}" for n in absolute),
            *(f"z_{n}" for n in self.z_features),
        ]


def spec_for(model: Any = None, block: int | None = None, scale: int = 20) -> FeatureSpec:
    """The default feature spec for ``model`` (None: metrics only). The encoder block is
    written down (``block``, else the model's default block, else its last): a head keeps using
    the block it was trained on when the model folder's default block changes later."""
    if model is None:
        return FeatureSpec(scale=scale, embed_dim=0, block=None)
    block = int(block or model.default_block or model.depth)
    return FeatureSpec(scale=scale, embed_dim=int(model.embed_dim), block=block)


def with_relative(
    absolute: np.ndarray,
    spec: FeatureSpec,
    groups: Sequence[Any] | None = None,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """(N, n_absolute) -> (N, n_features): append each feature minus its group median, then
    the robust z-scores in the group, (x − median) / max(1.4826·MAD, 0.2) clipped to ±10, of the
    ``spec.z_features`` (PercentMaximal: the baseline's saturation statistic, for the head to
    weigh; z-scores of every metric made small-plate heads brittle).

    ``groups`` labels each row's plate/channel (default: one group); ``reference`` (bool, N)
    marks the rows the medians come from (default: every finite row). A group with no reference
    row uses all its rows.
    """
    x = np.asarray(absolute, np.float64)
    if not spec.relative:
        return x
    codes: dict[Any, int] = {}  # group labels may be tuples (plate, channel)
    keys = [0] * len(x) if groups is None else list(groups)
    labels = np.array([codes.setdefault(g, len(codes)) for g in keys], dtype=int)
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} group labels for {len(x)} feature rows.")
    ref = np.isfinite(x).all(axis=1) if reference is None else np.asarray(reference, bool)
    missing = [n for n in spec.z_features if n not in spec.metric_features]
    if missing:
        raise ValueError(f"z_features {missing} are not among the head's metric features.")
    zi = [spec.metric_features.index(n) for n in spec.z_features]
    rel = np.full_like(x, np.nan)
    z = np.full((len(x), len(zi)), np.nan)
    for g in range(len(codes)):
        rows = labels == g
        base = rows & ref & np.isfinite(x).all(axis=1)
        if not base.any():
            base = rows & np.isfinite(x).all(axis=1)
        if base.any():
            centre = np.median(x[base], axis=0)
            rel[rows] = x[rows] - centre
            mad = np.median(np.abs(x[base][:, zi] - centre[zi]), axis=0)
            spread = np.maximum(MAD_TO_SD * mad, Z_FLOOR)
            z[rows] = np.clip(rel[rows][:, zi] / spread, -Z_CLIP, Z_CLIP)
    return np.concatenate([x, rel, z], axis=1)


def metric_features(metrics: Any, spec: FeatureSpec) -> np.ndarray:
    """(N, len(spec.metric_features)) from a table (or dict) with ``QC_<metric>`` columns."""
    q = {}
    for key in list(metrics.keys()):  # a DataFrame or a dict
        name = str(key)
        if name.startswith("QC_"):
            try:
                q[name[3:]] = np.asarray(metrics[key], dtype=np.float64)
            except (TypeError, ValueError):  # a text column such as QC_Error
                continue
    cols = []
    for name in spec.metric_features:
        if name not in METRIC_FEATURES:
            raise ValueError(
                f"Unknown metric feature {name!r} in the head's feature spec: this head was made "
                "by a newer napari-cellmae; upgrade, or train a new head."
            )
        try:
            cols.append(METRIC_FEATURES[name][1](q, spec.scale))
        except KeyError as exc:
            raise ValueError(
                f"Metric column QC_{exc.args[0]} is missing: measure with "
                f"napari_cellmae.qc.metrics.measure_field(..., scales=({spec.scale},))."
            ) from None
    out = np.stack(cols, axis=1) if cols else np.zeros((len(next(iter(q.values()))), 0))
    return np.nan_to_num(out, nan=0.0, posinf=6.0, neginf=-6.0)


def embed_images(
    model: Any,
    images: Sequence[np.ndarray],
    block: int | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Each (H, W) image embedded alone as a 1-channel image: mean over its 256² crops of the
    mean-pooled patch tokens -> (N, D) float32."""
    if not len(images):
        return np.zeros((0, int(model.embed_dim)), np.float32)
    crops, owner = [], []
    for i, image in enumerate(images):
        c, _ = model.field_crops(np.asarray(image)[None])  # (n, 1, 256, 256)
        crops.append(c)
        owner += [i] * len(c)
    emb = model.embed(np.concatenate(crops), pooling="mean", block=block, batch_size=batch_size)
    owner_arr = np.asarray(owner)
    sums = np.zeros((len(images), emb.shape[1]))
    np.add.at(sums, owner_arr, emb)
    return (sums / np.bincount(owner_arr, minlength=len(images))[:, None]).astype(np.float32)


def encoder_info(model: Any) -> dict[str, str]:
    return {"name": str(model.name), "checksum": str(model.checksum)}


@dataclass
class QCHead:
    """A trained QC head (see the module docstring). Use :meth:`load` / :meth:`save`."""

    classes: tuple[str, ...]
    spec: FeatureSpec
    mean: np.ndarray  # (F,) feature standardisation
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (K, F)
    intercept: np.ndarray  # (K,)
    encoder: dict[str, str] | None = None  # {"name", "checksum"}; None for a metrics-only head
    training: dict[str, Any] = field(default_factory=dict)
    memory_x: np.ndarray | None = None  # (M, F) raw training features kept for retraining
    memory_y: np.ndarray | None = None  # (M,) class indices into `classes`
    path: str | None = None  # where it was loaded from

    # -- inference ------------------------------------------------------------------------------
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, F) raw features -> (N, len(CLASSES)) probabilities in :data:`CLASSES` order
        (classes this head never saw get 0)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.spec.n_features:
            raise ValueError(
                f"Expected features (N, {self.spec.n_features}) for this head, got {x.shape}."
            )
        logits = ((x - self.mean) / self.scale) @ self.coef.T + self.intercept
        if len(self.classes) == 2 and self.coef.shape[0] == 1:  # binary logistic regression
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        out = np.zeros((len(x), len(CLASSES)))
        for k, cls in enumerate(self.classes):
            out[:, CLASSES.index(cls)] = p[:, k]
        return out

    def matches(self, model: Any) -> bool:
        """Whether this head can use ``model``'s embeddings (same encoder checksum); a
        metrics-only head matches anything."""
        if not self.spec.uses_encoder:
            return True
        return (
            model is not None
            and self.encoder is not None
            and (str(model.checksum) == self.encoder.get("checksum"))
        )

    def describe(self) -> str:
        enc = self.encoder or {}
        what = f"encoder {enc.get('name', '?')} ({enc.get('checksum', '?')[:12]})"
        if not self.spec.uses_encoder:
            what = "classic metrics only"
        n = self.training.get("n_samples", "?")
        return f"QC head on {what}, {len(self.classes)} classes, trained on {n} images"

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the head as a ``.npz`` (atomically; no pickled objects)."""
        from ..store import atomic_path

        meta = {
            "format": HEAD_FORMAT,
            "version": FORMAT_VERSION,
            "classes": list(self.classes),
            "spec": asdict(self.spec),
            "encoder": self.encoder,
            "training": self.training,
        }
        arrays = {
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": self.intercept,
            "meta": np.array(json.dumps(meta, default=str)),
        }
        if self.memory_x is not None and self.memory_y is not None:
            arrays["memory_x"] = self.memory_x.astype(np.float32)
            arrays["memory_y"] = self.memory_y.astype(np.int16)
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"A QC head file must end in .npz, got {path.name!r}.")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> QCHead:
        """Read a head file (default: the head shipped with the package)."""
        path = Path(path) if path is not None else DEFAULT_HEAD
        if not path.is_file():
            raise FileNotFoundError(
                f"QC head file {path} not found: pass an existing .npz made by "
                "train_qc_head / 'cellmae qc --save-head', or leave it out for the default head."
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
            meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(
                f"{path} is not a QC head file ({type(exc).__name__}: {exc}): pass a .npz written "
                "by train_qc_head or 'cellmae qc --save-head'."
            ) from None
        if meta.get("format") != HEAD_FORMAT:
            raise ValueError(
                f"{path} is not a napari-cellmae QC head (format {meta.get('format')})."
            )
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer napari-cellmae: upgrade to read it.")
        spec_d = dict(meta["spec"])
        spec_d["metric_features"] = tuple(spec_d["metric_features"])
        spec_d["z_features"] = tuple(spec_d.get("z_features", ()))
        spec_d["z_features"] = tuple(spec_d.get("z_features", ()))
        return cls(
            classes=tuple(meta["classes"]),
            spec=FeatureSpec(**spec_d),
            mean=data["mean"].astype(np.float64),
            scale=data["scale"].astype(np.float64),
            coef=data["coef"].astype(np.float64),
            intercept=data["intercept"].astype(np.float64),
            encoder=meta.get("encoder"),
            training=meta.get("training") or {},
            memory_x=data.get("memory_x"),
            memory_y=None if data.get("memory_y") is None else data["memory_y"].astype(np.int64),
            path=str(path),
        )


def load_head(path: str | os.PathLike | None = None) -> QCHead:
    """Read a QC head file (default: the one shipped with the package)."""
    return QCHead.load(path)


def fit_head(
    features: np.ndarray,
    labels: Sequence[str],
    spec: FeatureSpec,
    encoder: dict[str, str] | None,
    weights: np.ndarray | None = None,
    C: float = DEFAULT_C,
    seed: int = 0,
    training: dict[str, Any] | None = None,
    memory_per_class: int = MEMORY_PER_CLASS,
    ok_prior: float | None = None,
) -> QCHead:
    """Fit a head: class-balanced, standardised multinomial logistic regression.

    ``features`` (N, F) raw; ``labels`` class names from :data:`CLASSES`; ``weights`` per-sample
    weights (multiplied with the class balancing). ``ok_prior``: the share of the total weight
    given to the "ok" class (the artefact classes share the rest equally); None: every class the
    same. Real plates are mostly good, and a head trained on one synthetic artefact per clean
    image would otherwise take every unfamiliar clean field for an artefact.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, np.float64)
    y_names = [str(v) for v in labels]
    unknown = sorted(set(y_names) - set(CLASSES))
    if unknown:
        raise ValueError(f"Unknown QC classes {unknown}: use {', '.join(CLASSES)}.")
    present = [c for c in CLASSES if c in y_names]
    if len(present) < 2:
        raise ValueError(
            f"Training a QC head needs labels of at least 2 classes, got only {present}: label "
            "some fields 'ok' and some with their artefact, or start from an existing head."
        )
    if x.shape != (len(y_names), spec.n_features):
        raise ValueError(f"features {x.shape} do not match {len(y_names)} labels × spec.")
    y = np.array([present.index(v) for v in y_names])
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    share = np.full(len(present), 1.0 / len(present))
    if ok_prior is not None and "ok" in present:
        if not 0.0 < float(ok_prior) < 1.0:
            raise ValueError(f"ok_prior is a share of the weight in (0, 1), got {ok_prior}.")
        share[:] = (1.0 - float(ok_prior)) / (len(present) - 1)
        share[present.index("ok")] = float(ok_prior)
    class_w = w.sum() * share / np.bincount(y, weights=w, minlength=len(present))
    w = w * class_w[y]
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    clf = LogisticRegression(C=C, max_iter=3000)
    with threadpool_limits(1):  # a few hundred rows: threads only contend (25× slower on 2 cores)
        clf.fit((x - mean) / scale, y, sample_weight=w)
    # memory: up to `memory_per_class` per class, the most weighted (newest labels) first
    raw_w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    order = np.lexsort((np.random.default_rng(seed).random(len(y)), -raw_w))
    keep = np.concatenate([order[y[order] == k][:memory_per_class] for k in range(len(present))])
    counts = {c: int((y == k).sum()) for k, c in enumerate(present)}
    summary = {"n_samples": len(y), "per_class": counts, "C": C, "seed": seed, **(training or {})}
    if ok_prior is not None:
        summary["ok_prior"] = float(ok_prior)
    return QCHead(
        classes=tuple(present),
        spec=spec,
        mean=mean,
        scale=scale,
        coef=clf.coef_.copy(),
        intercept=clf.intercept_.copy(),
        encoder=encoder,
        training=summary,
        memory_x=x[np.sort(keep)].astype(np.float32),
        memory_y=np.array([CLASSES.index(present[k]) for k in y[np.sort(keep)]]),
    )


def retrain(
    base: QCHead,
    features: np.ndarray,
    labels: Sequence[str],
    label_weight: float = 1.0,
    C: float | None = None,
    seed: int = 0,
    note: str = "",
    context: np.ndarray | None = None,
) -> QCHead:
    """``base`` adjusted to new labelled features: see :func:`napari_cellmae.qc.adapt.adapt_head`
    (its own verdicts kept on its memory and on ``context``, the plate's other images; each
    label weighted from ``label_weight`` up until it holds). ``seed`` is unused (the fit is
    deterministic)."""
    from .adapt import adapt_head

    return adapt_head(
        base, features, labels, context=context, label_weight=label_weight, C=C, note=note
    )
