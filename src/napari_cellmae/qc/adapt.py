"""Retraining a QC head from a few labels without overturning what it learnt.

:func:`adapt_head` is what ``retrain`` (and the QC tab's **Retrain**, and ``train_qc_head`` with a
base head) does; see its docstring for the objective and why a refit from the head's memory was
not enough.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .head import CLASSES, DEFAULT_C, QCHead

HONOUR_P = 0.6  # a retrained head gives each labelled image at least this probability of its label
MAX_LABEL_ROUNDS = 8  # each round quadruples the weight of the labels not yet honoured
USER_MEMORY = 400  # labelled images a head keeps in its memory, newest first


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def _full_params(head: QCHead, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The head's logits as one row per class of ``classes`` (a binary head's implicit zero
    row made explicit; a class the head never saw gets a zero row and a logit far below the
    others, i.e. probability ~0, as :meth:`QCHead.predict_proba` gives it)."""
    coef = np.asarray(head.coef, np.float64)
    intercept = np.asarray(head.intercept, np.float64)
    if len(head.classes) == 2 and coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    w = np.zeros((len(classes), coef.shape[1]))
    b = np.full(len(classes), intercept.min() - 10.0)
    for k, cls in enumerate(head.classes):
        w[classes.index(cls)] = coef[k]
        b[classes.index(cls)] = intercept[k]
    return w, b


def adapt_head(
    base: QCHead,
    features: np.ndarray,
    labels: Sequence[str],
    *,
    context: np.ndarray | None = None,
    label_weight: float = 1.0,
    C: float | None = None,
    honour: float = HONOUR_P,
    threshold: float | None = None,
    note: str = "",
) -> QCHead:
    """``base`` adjusted to new labels without letting a handful of them overturn what it knew.

    Retraining used to refit a fresh logistic regression on the head's small memory (40 images
    per class) plus the labels weighted ×10: the memory is not the training set, so the refit
    moved every verdict, and one field marked *ok* on a 72-field plate took the flags from 7 to
    26. Here the head is *adjusted*, not refitted (the same logistic model, the base head's
    standardisation kept), by minimising

        Σ_memory KL(p_base ‖ p) + Σ_context KL(p_base ‖ p) + Σ_labels w·CE(label, p)
        + (1 / 2C)·‖W − W_base‖²

    - the first two terms keep the base head's **own verdicts** (soft, calibrated probabilities,
      not hard labels) on its training memory and on ``context``, the plate's other (unlabelled)
      images: nothing moves unless the labels need it, and with no labels the head is unchanged;
    - the last term is the base head's own regularisation, centred on its weights instead of 0;
    - each label starts at weight ``label_weight`` (1 = one image of the memory) and, as long as
      the adjusted head gives it less than ``honour`` probability, its weight is quadrupled
      (up to :data:`MAX_LABEL_ROUNDS` times): the smallest change that makes each label hold.
      With ``threshold`` (the flag threshold on 1 − P(ok) in use), a label must also hold there
      with a margin of 0.05: an *ok* field passes, an artefact is flagged (targets capped at
      0.99).

    ``features`` (N, F) raw features of the labelled images; ``labels`` their classes (one of
    :data:`~napari_cellmae.qc.head.CLASSES`; a class the base head lacks is added). The new
    head's memory is the base's plus the labelled images (the newest :data:`USER_MEMORY`), so a
    later retraining keeps them. Convex; well under a second on a CPU.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    labels = [str(v) for v in labels]
    x_new = np.asarray(features, np.float64)
    x_new = x_new.reshape(len(labels), -1) if x_new.size else np.zeros((0, base.spec.n_features))
    if x_new.shape[1] != base.spec.n_features:
        raise ValueError(
            f"New features have {x_new.shape[1]} columns; the base head expects "
            f"{base.spec.n_features}: compute them with the same encoder and feature spec."
        )
    unknown = sorted(set(labels) - set(CLASSES))
    if unknown:
        raise ValueError(f"Unknown QC classes {unknown}: use {', '.join(CLASSES)}.")
    if not np.isfinite(x_new).all():
        raise ValueError("Labelled images without features (unreadable?) cannot be learnt from.")
    classes = [c for c in CLASSES if c in base.classes or c in labels]
    w0, b0 = _full_params(base, classes)
    k_cls, n_feat = w0.shape

    def standardise(x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - base.mean) / base.scale

    keep = [standardise(base.memory_x)] if base.memory_x is not None else []
    n_context = 0
    if context is not None and len(context):
        ctx = np.asarray(context, np.float64)
        ctx = ctx[np.isfinite(ctx).all(axis=1)]
        n_context = len(ctx)
        keep.append(standardise(ctx))
    z_keep = np.concatenate(keep) if keep else np.zeros((0, n_feat))
    p_keep = _softmax(z_keep @ w0.T + b0)  # the base head's own verdicts
    log_p_keep = np.log(np.maximum(p_keep, 1e-300))
    z_lab = standardise(x_new)
    y_lab = np.array([classes.index(c) for c in labels], dtype=int)
    onehot = np.eye(k_cls)[y_lab]
    target = np.full(len(labels), float(honour))
    if threshold is not None:  # hold at the threshold in use too
        need = np.where(y_lab == classes.index("ok") if "ok" in classes else False,
                        1.0 - threshold, threshold) + 0.05  # fmt: skip
        target = np.minimum(np.maximum(target, need), 0.99)
    c_prior = float(C if C is not None else base.training.get("C") or DEFAULT_C)
    lam = 1.0 / c_prior

    def objective(theta: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: k_cls * n_feat].reshape(k_cls, n_feat)
        b = theta[k_cls * n_feat :]
        d = w - w0
        loss = 0.5 * lam * float((d**2).sum())
        grad_w, grad_b = lam * d, np.zeros(k_cls)
        for z, target, log_target, wt in (
            (z_keep, p_keep, log_p_keep, None),
            (z_lab, onehot, None, weights),
        ):
            if not len(z):
                continue
            logits = z @ w.T + b
            logits -= logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            ce = -(target * log_p).sum(axis=1)
            if log_target is not None:  # KL = CE − entropy of the target
                ce += (target * log_target).sum(axis=1)
            g = np.exp(log_p) - target
            if wt is not None:
                ce, g = ce * wt, g * wt[:, None]
            loss += float(ce.sum())
            grad_w += g.T @ z
            grad_b += g.sum(axis=0)
        return loss, np.concatenate([grad_w.ravel(), grad_b])

    weights = np.full(len(labels), float(label_weight))
    theta = np.concatenate([w0.ravel(), b0])
    rounds, short = 0, np.zeros(len(labels), bool)
    w, b = w0, b0
    with threadpool_limits(1):  # small matrices: threads only contend
        while len(labels):
            rounds += 1
            theta = minimize(
                objective, theta, args=(weights,), jac=True, method="L-BFGS-B",
                options={"maxiter": 1000},
            ).x  # fmt: skip
            w, b = theta[: k_cls * n_feat].reshape(k_cls, n_feat), theta[k_cls * n_feat :]
            p_label = _softmax(z_lab @ w.T + b)[np.arange(len(labels)), y_lab]
            short = p_label < target
            if not short.any() or rounds == MAX_LABEL_ROUNDS:
                break
            weights = np.where(short, weights * 4.0, weights)
    memory_x, memory_y = base.memory_x, base.memory_y
    if len(labels):
        old_x = np.zeros((0, n_feat)) if memory_x is None else memory_x
        old_y = np.zeros(0, int) if memory_y is None else memory_y
        new_y = np.array([CLASSES.index(c) for c in labels])
        n_user = int(base.training.get("n_user_memory", 0))
        n_train = len(old_y) - n_user  # the training memory, then the labels, oldest first
        user_x = np.concatenate([old_x[n_train:], x_new])[-USER_MEMORY:]
        user_y = np.concatenate([old_y[n_train:], new_y])[-USER_MEMORY:]
        memory_x = np.concatenate([old_x[:n_train], user_x]).astype(np.float32)
        memory_y = np.concatenate([old_y[:n_train], user_y]).astype(np.int64)
        n_user = len(user_y)
    else:
        n_user = int(base.training.get("n_user_memory", 0))
    counts = {c: labels.count(c) for c in CLASSES if c in labels}
    training = {
        **{k: v for k, v in base.training.items() if k not in ("note", "retrained_from")},
        "retrained_from": base.path or base.training.get("retrained_from") or "a head",
        "how": "adjusted to labels (adapt_head): base verdicts kept on memory and context",
        "new_labels": counts,
        "label_weights": [round(float(v), 3) for v in weights],
        "label_targets": [round(float(v), 3) for v in target],
        "labels_not_honoured": int(short.sum()),
        "n_context": n_context,
        "rounds": rounds,
        "C": c_prior,
        "n_user_memory": n_user,
        "note": note,
    }
    return dataclasses.replace(
        base,
        classes=tuple(classes),
        coef=w,
        intercept=b,
        training=training,
        memory_x=memory_x,
        memory_y=memory_y,
        path=None,
    )
