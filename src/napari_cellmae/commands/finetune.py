"""Adapt a model to your own plates: continued masked-autoencoder training (no labels needed),
then optionally linear probes and block search on a platemap column, and a report.

Training draws random 256×256 crops of the fields of training wells (8 flips/rotations,
per-channel intensity jitter, random channel subsets), hides --mask-ratio of the patches and
learns to reconstruct them. A share of the wells (--val-fraction) is held out: their validation
loss decides which weights are kept and when to stop (--patience). The learning rate warms up,
then follows a cosine. A checkpoint is written every epoch and on Ctrl-C (or SIGTERM); --resume
continues from it. The result is a model folder (config.json, model.safetensors, README.md model
card, report/report.md) that --model, load_model() and every napari model picker accept.

With --platemap and --label-column, a linear probe is trained on the frozen features of every
encoder block of the start and the new model (cross-validated holding out whole wells); the best
block is stored in the new model, so embedding uses it by default.

Several GPUs or processes: the same command under torchrun trains with DistributedDataParallel
(NCCL on GPUs, gloo on CPUs), --batch-size per process:
  torchrun --nproc-per-node 4 -m napari_cellmae.cli finetune PLATE_DIR --out MODEL_DIR

examples:
  cellmae finetune /data/plate1 /data/plate2 --out models/my-cells --minutes 30
  cellmae finetune /data/plate1 --from recursionpharma/OpenPhenom --out models/op-mine \\
      --train-only norms+last --epochs 5 --device cuda
  cellmae finetune /data/plate1 --out models/my-cells --platemap platemap.csv \\
      --label-column Metadata_Mechanism
  cellmae finetune /data/plate1 --out models/my-cells --resume          # after Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ._options import add_device, add_layout

HELP = "continued MAE training on your plates, linear probes and block search (a new model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "plates", nargs="*", metavar="PLATE_DIR", help="plate folder(s) (optional with --resume)"
    )
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="the new model folder")
    start = parser.add_argument_group("starting point")
    start.add_argument(
        "--from",
        "--model",
        dest="source",
        default=None,
        metavar="MODEL",
        help="model to continue from: bundled name, model folder or Hugging Face repo id "
        "(default: the bundled cellmae-tiny)",
    )
    start.add_argument(
        "--from-scratch",
        default=None,
        metavar="PRESET",
        help="start from random weights of this architecture instead (e.g. "
        "cellmae_vit_tiny_patch16_256)",
    )
    budget = parser.add_argument_group("budget and stopping")
    budget.add_argument("--epochs", type=int, default=10, help="epochs at most (default: 10)")
    budget.add_argument(
        "--minutes", type=float, default=None, help="wall-clock budget for training (default: none)"
    )
    budget.add_argument(
        "--patience",
        type=int,
        default=3,
        help="stop after this many epochs without a better validation loss (0 = never; default: 3)",
    )
    budget.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of wells held out for validation (0 = none; default: 0.2)",
    )
    budget.add_argument(
        "--val-crops", type=int, default=64, help="fixed validation crops (default: 64)"
    )
    budget.add_argument(
        "--steps-per-epoch", type=int, default=None, help="cap on steps per epoch (default: all)"
    )
    opt = parser.add_argument_group("recipe")
    opt.add_argument(
        "--batch-size", type=int, default=8, help="crops per step and process (default: 8)"
    )
    opt.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    opt.add_argument(
        "--optimizer",
        choices=("adamw", "lion"),
        default="adamw",
        help="adamw (default) or lion (OpenPhenom's recipe; use a 3-10x smaller --lr)",
    )
    opt.add_argument("--weight-decay", type=float, default=0.05, help="default: 0.05")
    opt.add_argument(
        "--warmup", type=float, default=0.1, help="share of the run spent warming up (0.1)"
    )
    opt.add_argument(
        "--mask-ratio", type=float, default=0.75, help="share of patches hidden (0.75)"
    )
    opt.add_argument(
        "--crops-per-field", type=int, default=4, help="random crops per field per epoch (4)"
    )
    opt.add_argument(
        "--freeze-blocks",
        type=int,
        default=0,
        metavar="K",
        help="freeze the patch embedding and the first K encoder blocks (small data)",
    )
    opt.add_argument(
        "--train-only",
        choices=("all", "norms+last"),
        default="all",
        help="norms+last: train only the LayerNorms and the last --last-blocks encoder blocks "
        "(and the decoder) (default: all)",
    )
    opt.add_argument(
        "--last-blocks", type=int, default=1, help="blocks trained with norms+last (default: 1)"
    )
    opt.add_argument("--seed", type=int, default=0, help="seed of splits, crops, masks (0)")
    data = parser.add_argument_group("data")
    add_layout(data)
    data.add_argument(
        "--channels",
        nargs="+",
        default=None,
        metavar="CHANNEL",
        help="channel ids or names to train on, in this order (default: all)",
    )
    probes = parser.add_argument_group("linear probes and block search")
    probes.add_argument(
        "--platemap",
        default=None,
        metavar="CSV",
        help="table with Metadata_Well (+ Metadata_Plate, Metadata_Site) and a label column",
    )
    probes.add_argument(
        "--label-column",
        default=None,
        metavar="COL",
        help="label to probe (e.g. Metadata_Perturbation, Metadata_Mechanism, a QC label)",
    )
    probes.add_argument(
        "--probe-fields",
        type=int,
        default=400,
        help="labelled fields used by the probes at most (default: 400)",
    )
    machine = parser.add_argument_group("machine and output")
    add_device(
        machine,
        precision_help="auto = bf16 autocast on GPUs and on CPUs fast at it, fp16 with loss "
        "scaling on older GPUs, else fp32",
    )
    machine.add_argument(
        "--resume", action="store_true", help="continue the run from its checkpoint"
    )
    machine.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="where checkpoints go (default: MODEL_DIR-checkpoints)",
    )
    machine.add_argument(
        "--force",
        action="store_true",
        help="write the model into an existing, non-empty MODEL_DIR that holds no model (files "
        "of the same names there are replaced); without it such a folder is refused",
    )
    machine.add_argument("--name", default=None, help="model name (default: the folder name)")
    machine.add_argument(
        "--no-register",
        action="store_true",
        help="do not add the new model to the model pickers",
    )
    machine.add_argument("--no-report", action="store_true", help="skip the report")
    machine.add_argument("--html", action="store_true", help="also write report/report.html")
    machine.add_argument(
        "--progress-json",
        action="store_true",
        help="print one JSON object per line per event (for programs; a line 'stop' on stdin "
        "stops the run gracefully)",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    from ..training import TrainConfig

    if not args.plates and not args.resume:
        raise ValueError("Give at least one PLATE_DIR (or --resume to continue a run).")
    if bool(args.platemap) != bool(args.label_column):
        raise ValueError("--platemap and --label-column go together: pass both or neither.")
    return TrainConfig(
        out=args.out,
        source=args.source,
        from_scratch=args.from_scratch,
        plates=tuple(args.plates),
        layout=args.layout,
        channels=tuple(args.channels) if args.channels else None,
        val_fraction=args.val_fraction,
        crops_per_field=args.crops_per_field,
        mask_ratio=args.mask_ratio,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup,
        batch_size=args.batch_size,
        freeze_blocks=args.freeze_blocks,
        train_only=args.train_only,
        last_blocks=args.last_blocks,
        epochs=args.epochs,
        minutes=args.minutes,
        steps_per_epoch=args.steps_per_epoch,
        patience=args.patience or None,
        val_crops=args.val_crops,
        precision=args.precision,
        device=args.device,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        name=args.name,
        register=not args.no_register,
        force=args.force,
    )


class StopRequest:
    """Set by Ctrl-C / SIGTERM (first Ctrl-C: graceful; a second one interrupts) or a 'stop' line
    on stdin; polled by training after every step."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._saved: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.event.is_set()

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print("stopping after this step (a checkpoint is written)…", file=sys.stderr)

    def install(self, watch_stdin: bool) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handler)
        if watch_stdin and not sys.stdin.isatty():
            threading.Thread(target=self._watch, daemon=True, name="stdin-stop").start()

    def _watch(self) -> None:
        try:
            for line in sys.stdin:
                if line.strip().lower() == "stop":
                    self.event.set()
                    return
        except (OSError, ValueError):  # no usable stdin (e.g. under pytest)
            return

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _emitter(as_json: bool, main: bool) -> tuple[Any, Any]:
    """(on_progress(event), say(kind, **fields)) printing JSON lines or a tqdm bar."""
    if not main:
        return (lambda event: None), (lambda kind, **kw: None)
    if as_json:

        def say(kind: str, **fields: Any) -> None:
            print(json.dumps({"event": kind, **fields}, default=str), flush=True)

        def on_progress(event: Any) -> None:
            say(
                "progress",
                done=event.done,
                total=event.total,
                message=event.message,
                payload=event.payload,
            )

        return on_progress, say
    from ._progress import progress_bar

    bar, update = progress_bar("finetune", "step")

    def on_progress(event: Any) -> None:
        update(event)
        if isinstance(event.payload, dict) and event.payload.get("kind") in (
            "start",
            "epoch",
            "val",
        ):
            bar.write(event.message, file=sys.stderr)

    def say(kind: str, **fields: Any) -> None:
        if kind in ("done", "cancelled"):
            bar.close()
        if "text" in fields:
            print(fields["text"])

    return on_progress, say


def run(args: argparse.Namespace) -> int:
    from ..progress import Cancelled
    from ..progress import run as drive
    from ..training import train

    cfg = config_from_args(args)
    if args.platemap:  # a bad table fails now, not after the training
        from ..probes import read_labels

        read_labels(args.platemap, args.label_column)
    main = int(os.environ.get("RANK", "0")) == 0
    on_progress, say = _emitter(args.progress_json, main)
    stop = StopRequest()
    stop.install(watch_stdin=args.progress_json)
    try:
        result = drive(train(cfg, should_stop=stop), progress=on_progress)
    except ValueError as exc:  # the GUI runs this command: give it the fix in its own words
        if args.progress_json and getattr(exc, "gui_message", None):
            say("error", message=str(exc), gui_message=exc.gui_message)
        raise
    except Cancelled:
        ckdir = cfg.checkpoint_path
        say(
            "cancelled",
            checkpoint_dir=str(ckdir),
            text=f"stopped; checkpoint in {ckdir}: continue with the same command and --resume",
        )
        return 130
    finally:
        stop.restore()
    if not main:
        return 0
    return _after_training(args, result, on_progress, say)


def _after_training(args: argparse.Namespace, result: Any, on_progress: Any, say: Any) -> int:
    """Probes and block search, the report, and the closing summary (rank 0 only)."""
    from ..inference import CellMAEModel, embedding_defaults
    from ..progress import run as drive

    cfg = result.config
    m = result.metrics
    # both embed as their model folders say (pooling, normalisation): the probes then search the
    # blocks of the embeddings the user will get
    saved = json.loads((Path(result.folder) / "config.json").read_text())
    tuned = CellMAEModel(
        result.module,
        cfg.device if cfg.device != "auto" else None,
        name="fine-tuned",
        **embedding_defaults(saved),
    )
    start = None
    if args.platemap or not args.no_report:
        from ..training import start_model

        module, inherited = start_model(cfg)
        start = CellMAEModel(module, tuned.device, name="start", **embedding_defaults(inherited))
    before = after = None
    if args.platemap:
        from ..probes import probe_plates, set_best_block

        for which, model in (("start", start), ("fine-tuned", tuned)):
            res = drive(
                probe_plates(
                    model,
                    cfg.plates,
                    args.platemap,
                    args.label_column,
                    max_fields=args.probe_fields,
                    channels=cfg.channels,
                ),
                progress=on_progress,
            )
            say("probes", model=which, **res.to_dict())
            before, after = (res, after) if which == "start" else (before, res)
        set_best_block(result.folder, after)
    report = None
    if not args.no_report:
        from ..finetune_report import write_report
        from ..training_data import PlateSource, validation_crops

        source = PlateSource(cfg.plates, cfg.val_fraction, cfg.seed, cfg.channels, cfg.layout)
        crops = [c for c, _ in validation_crops(source, cfg.crop_size, 3)]
        examples = None
        if crops and len({c.shape[0] for c in crops}) == 1:
            import numpy as np

            examples = np.stack(crops)
        report = write_report(
            result.folder, result, start, tuned, examples, before, after, html_too=args.html
        )
    val = ""
    if m.get("val_loss_before") is not None:
        val = (
            f"; validation loss {m['val_loss_before']:.4f} -> {m['val_loss_best']:.4f} "
            f"(mean-fill {m['val_mean_fill']:.4f})"
        )
    probe = ""
    if after is not None:
        probe = (
            f"; probe accuracy {before.best_accuracy:.1%} -> {after.best_accuracy:.1%}, "
            f"best block {after.best_block} stored"
        )
    say(
        "done",
        folder=str(result.folder),
        metrics=m,
        report=str(report) if report else None,
        text=f"model saved to {result.folder} ({m['steps']} steps, stopped by {m['stopped']})"
        f"{val}{probe}" + (f"\nreport: {report}" if report else ""),
    )
    return 0
