"""The report written after training: did it help?

:func:`write_report` writes ``<model folder>/report/`` with ``report.md`` (and ``report.html`` on
request) and PNG plots made with matplotlib's Agg backend (no display needed):

- ``loss.png``: training loss per step (and its running mean), validation loss per epoch, and the
  mean-fill baseline (predicting every hidden patch as its channel mean).
- ``reconstruction.png``: validation masked-reconstruction loss of the start and the new model.
- ``probes.png``: linear-probe accuracy per encoder block, before and after (when labels given).
- ``examples.png``: held-out crops, masked at 75%, reconstructed by the start and the new model.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .inference import CellMAEModel
    from .probes import ProbeResult
    from .training import TrainResult

REPORT_DIR = "report"


def _figure(width: float = 6.0, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_losses(steps: Sequence[Sequence[float]], history: Sequence[dict], fill: float | None):
    """Training loss per step, validation loss per epoch, mean-fill baseline."""
    fig = _figure()
    ax = fig.add_subplot()
    if steps:
        arr = np.asarray(steps, dtype=float)
        ax.plot(arr[:, 0], arr[:, 1], color="0.75", lw=0.8, label="train (per step)")
        k = max(1, len(arr) // 20)
        if k > 1:
            smooth = np.convolve(arr[:, 1], np.ones(k) / k, mode="valid")
            ax.plot(arr[k - 1 :, 0], smooth, color="C0", label=f"train (mean of {k})")
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", color="C1", label="validation")
    if fill is not None:
        ax.axhline(fill, ls="--", color="0.4", lw=1, label="mean-fill baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE (standardised)")
    ax.legend(fontsize=8)
    ax.set_title("Loss")
    return fig


def plot_reconstruction_losses(values: dict[str, float | None]):
    """Bars: validation loss of each model (and the baseline)."""
    fig = _figure(4.5, 3.2)
    ax = fig.add_subplot()
    items = [(k, v) for k, v in values.items() if v is not None]
    bars = ax.bar(
        [k for k, _ in items], [v for _, v in items], color=["C7", "C2", "0.6"][: len(items)]
    )
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("validation masked-patch MSE")
    ax.set_title("Validation reconstruction")
    return fig


def plot_probes(before: ProbeResult | None, after: ProbeResult | None):
    """Probe accuracy per block, before and after, with the chance level."""
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    for result, name, color in ((before, "start", "C7"), (after, "fine-tuned", "C2")):
        if result is None:
            continue
        t = result.table
        ax.errorbar(
            t["block"],
            t["accuracy"],
            yerr=t["accuracy_std"],
            fmt="o-",
            color=color,
            capsize=3,
            label=f"{name} (best: block {result.best_block})",
        )
    ref = after or before
    if ref is not None:
        ax.axhline(ref.chance, ls="--", color="0.4", lw=1, label="chance")
        ax.set_title(f"Linear probe: {ref.label}")
    ax.set_xlabel("encoder block")
    ax.set_ylabel("accuracy (held-out wells)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return fig


def _rgb(img: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3): the first three channels as red, green, blue (one = grey)."""
    c = min(3, img.shape[0])
    x = np.clip((img[:c] - lo[:c, None, None]) / (hi[:c] - lo[:c])[:, None, None], 0, 1)
    if c == 1:
        return np.repeat(x[0][..., None], 3, axis=-1)
    out = np.zeros((*img.shape[1:], 3), np.float32)
    out[..., :c] = np.moveaxis(x, 0, -1)
    return out


def plot_examples(
    crops: np.ndarray, models: dict[str, CellMAEModel], mask_ratio: float = 0.75, seed: int = 0
):
    """Rows: crops; columns: input, masked input, each model's reconstruction (hidden patches
    predicted, visible ones kept)."""
    recs = {
        name: m.reconstruct(crops, mask_ratio=mask_ratio, seed=seed) for name, m in models.items()
    }
    first = next(iter(recs.values()))
    n = len(crops)
    fig = _figure(2.0 * (2 + len(recs)), 2.0 * n + 0.3)
    axes = fig.subplots(n, 2 + len(recs), squeeze=False)
    for i in range(n):
        img = crops[i].astype(np.float32)
        lo = np.percentile(img, 1, axis=(1, 2))
        hi = np.maximum(np.percentile(img, 99.8, axis=(1, 2)), lo + 1e-6)
        panels = [("input", img), (f"masked {mask_ratio:.0%}", first.masked[i])]
        panels += [
            (f"{name} (MSE {rec.error[i][rec.mask[i]].mean():.2f})", rec.pasted()[i])
            for name, rec in recs.items()
        ]
        for ax, (title, panel) in zip(axes[i], panels):
            ax.imshow(_rgb(panel, lo, hi))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or "MSE" in title:
                ax.set_title(title, fontsize=8)
    return fig


def _save(fig: Any, path: Path) -> str:
    from .store import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path.name


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(
    folder: str | os.PathLike,
    result: TrainResult,
    start: CellMAEModel | None = None,
    tuned: CellMAEModel | None = None,
    crops: np.ndarray | None = None,
    probes_before: ProbeResult | None = None,
    probes_after: ProbeResult | None = None,
    html_too: bool = False,
) -> Path:
    """Write ``<folder>/report/report.md`` (+ PNGs, + ``report.html``); returns report.md's path.

    ``crops`` (N, C, 256, 256) are held-out examples reconstructed by ``start`` and ``tuned``.
    """
    from .store import write_text_atomic

    out = Path(folder) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    images: list[tuple[str, str]] = []
    images.append(
        (
            "Loss curves",
            _save(
                plot_losses(result.steps, result.history, m.get("val_mean_fill")), out / "loss.png"
            ),
        )
    )
    if m.get("val_loss_before") is not None:
        fig = plot_reconstruction_losses(
            {
                "start": m["val_loss_before"],
                "fine-tuned": m["val_loss_best"],
                "mean-fill": m["val_mean_fill"],
            }
        )
        images.append(
            ("Validation reconstruction before/after", _save(fig, out / "reconstruction.png"))
        )
    if probes_before is not None or probes_after is not None:
        images.append(
            (
                "Probe accuracy per block before/after",
                _save(plot_probes(probes_before, probes_after), out / "probes.png"),
            )
        )
    if crops is not None and len(crops) and tuned is not None and not tuned.encoder_only:
        models = (
            {"start": start, "fine-tuned": tuned} if start is not None else {"fine-tuned": tuned}
        )
        images.append(
            (
                "Example reconstructions (held-out crops)",
                _save(plot_examples(crops, models), out / "examples.png"),
            )
        )

    rows = [
        ("validation loss, start", m.get("val_loss_before")),
        ("validation loss, best (kept)", m.get("val_loss_best")),
        ("mean-fill baseline", m.get("val_mean_fill")),
        ("best epoch", f"{m['best_epoch']:.3g}" if m.get("best_epoch") is not None else None),
        ("epochs / steps", f"{m.get('epochs', 0):.3g} / {m.get('steps')}"),
        ("stopped by", m.get("stopped")),
        ("time", f"{m.get('seconds', 0) / 60:.1f} min on {m.get('device')} × {m.get('processes')}"),
        ("trained parameters", f"{m.get('trainable', 0):,} of {m.get('parameters', 0):,}"),
    ]
    for name, probe in (("start", probes_before), ("fine-tuned", probes_after)):
        if probe is not None:
            rows.append(
                (
                    f"probe accuracy, {name}",
                    f"{probe.best_accuracy:.1%} (block {probe.best_block}; "
                    f"chance {probe.chance:.1%})",
                )
            )
    helped = None
    if m.get("val_loss_before") is not None:
        helped = m["val_loss_best"] < m["val_loss_before"]
    verdict = {
        True: "Training lowered the validation masked-reconstruction loss: the new model "
        "reconstructs held-out wells better than the start.",
        False: "Training did not lower the validation loss: the model folder holds the start's "
        "weights (the best seen). Try more data, a higher learning rate or more epochs.",
        None: "No validation wells were held out, so whether it helped is not measured.",
    }[helped]
    md = [f"# Training report: {Path(folder).name}", "", verdict, "", "| | |", "|---|---|"]
    md += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    for title, name in images:
        md += ["", f"## {title}", "", f"![{title}]({name})"]
    text = "\n".join(md) + "\n"
    write_text_atomic(out / "report.md", text)
    if html_too:
        body = [
            f"<h1>Training report: {html.escape(Path(folder).name)}</h1>",
            f"<p>{html.escape(verdict)}</p>",
            "<table>",
        ]
        body += [
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
        ]
        body.append("</table>")
        for title, name in images:
            body += [
                f"<h2>{html.escape(title)}</h2>",
                f'<img src="{name}" alt="{html.escape(title)}">',
            ]
        page = "<!doctype html><meta charset='utf-8'><title>Training report</title>" + "\n".join(
            body
        )
        write_text_atomic(out / "report.html", page + "\n")
    return out / "report.md"
