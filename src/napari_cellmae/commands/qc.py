"""Artefact QC of a plate folder: classic CellProfiler metrics, a z-score baseline and the QC head
(frozen encoder embeddings + metrics), with flags and reasons per image and per field.

Writes to --out: qc_images / qc_fields / qc_summary / passing_fields / passing_images (parquet +
CSV), channels.json and run.json. --link-passing mirrors the passing fields' files (same relative
paths; copies by default, or symlinks or hard links, which share the originals: see
docs/guarantees.md) for downstream tools. The plate folder is never written; an --out folder
that cellmae did not make and that is not empty is refused unless --force.

The head is used only with the encoder it was trained on (checksum); otherwise only the classic
metrics are used, and --train-from-plate trains a head for the model from synthetic artefacts
applied to this plate (minutes on a CPU).

Whole screens: --executor threads|processes|dask measures one well per task (--local-workers N,
--scheduler ADDRESS, --slurm-jobs N), --shard K/N one shard of the wells (a job array); the wells
are kept in OUT/wells/ so a rerun resumes, and the plate is judged once every well is measured
(by the shard that finishes last, or --assemble). Same report as a serial run. See
docs/scale-out.md.

examples:
  cellmae qc /data/plate1 --out qc/plate1
  cellmae qc /data/plate1 --out qc/plate1 --link-passing /data/plate1_passing --link-mode symlink
  cellmae qc /data/plate1 --model /models/OpenPhenom --train-from-plate --save-head op_head.npz \\
      --out qc/plate1
  cellmae qc --train-labels labels.csv --base-head my_head.npz --save-head my_head2.npz
  cellmae qc /data/plate1 --out qc/plate1 --executor dask --local-workers 2
  cellmae qc /data/plate1 --out qc/plate1 --shard ${SLURM_ARRAY_TASK_ID}/4
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._options import add_batch_size, add_device, add_force, add_layout, add_model
from ._progress import progress_bar

HELP = "artefact QC of a plate folder: flags, reasons, passing list, mirror"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plate", nargs="?", help="plate folder to check (read only)")
    parser.add_argument(
        "--out",
        help="output folder for the report: new, empty, or one an earlier `cellmae qc` made; "
        "outside the plate folder",
    )
    add_force(parser)
    parser.add_argument(
        "--head",
        help="QC head file (.npz) from train_qc_head or --save-head (default: the shipped head)",
    )
    add_model(parser, role="encoder")
    add_device(parser, precision=False)
    add_batch_size(parser)
    add_layout(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="flag an image when the head's artefact probability 1 - P(ok) exceeds this (0.5)",
    )
    parser.add_argument(
        "--z-threshold",
        type=float,
        default=None,
        help="classic rules: flag when a gate or plate/channel z-score exceeds this (default: "
        "the value calibrated on clean real plates, qc.baseline.DEFAULT_Z = 3.2)",
    )
    parser.add_argument(
        "--classic-only",
        action="store_true",
        help="use only the classic metrics and z-score rules (no model, no head)",
    )
    parser.add_argument(
        "--link-passing", metavar="DIR", help="mirror the passing fields' files into DIR"
    )
    parser.add_argument(
        "--link-mode",
        choices=("copy", "symlink", "hard"),
        default="copy",
        help="how to mirror: copy (default; independent files, the only mode where a tool that "
        "edits a mirrored file cannot change the original), symlink (no extra space; a write "
        "through the link changes the original) or hard (no extra space, same disk; the mirror "
        "and the original are the same file)",
    )
    train = parser.add_argument_group("training a head")
    train.add_argument(
        "--train-from-plate",
        action="store_true",
        help="train a head for --model from synthetic artefacts applied to PLATE, then use it",
    )
    train.add_argument(
        "--n-fields", type=int, default=12, help="fields sampled by --train-from-plate (12)"
    )
    train.add_argument(
        "--replace-head",
        action="store_true",
        help="with --train-from-plate: use the new head even when the head in use (--head, or "
        "the shipped one) scores better on artefacts of other fields of the plate",
    )
    train.add_argument(
        "--train-labels",
        metavar="CSV",
        help="train from labels: a CSV with columns path,class[,channel] "
        "(class: ok, blur, saturation, debris, noise, empty, background)",
    )
    train.add_argument(
        "--base-head",
        metavar="FILE",
        help="with --train-labels: start from this head (keeps what it knew); default: none",
    )
    train.add_argument("--save-head", metavar="FILE", help="write the trained head here (.npz)")
    from ._scale_out import add_arguments as add_scale_out_arguments

    add_scale_out_arguments(parser, "well")


def _load_model(args: argparse.Namespace, required: bool, executor=None):
    """(model or None, notice): the bundled default may be missing until it is trained. With an
    executor whose workers are elsewhere, this process may load it on the CPU (they use
    --device)."""
    from .. import load_model
    from ..executors import client_device
    from ..registry import DEFAULT_MODEL, bundled_models

    device = None if args.device == "auto" else args.device
    if args.model is None and DEFAULT_MODEL not in bundled_models() and not required:
        return None, f"The bundled model {DEFAULT_MODEL} is not installed: pass --model."
    return load_model(args.model, device=client_device(device, executor), encoder_only=True), ""


def run(args: argparse.Namespace) -> int:
    from ..qc.head import QCHead

    if args.train_labels:
        if not args.save_head:
            raise ValueError("--train-labels needs --save-head FILE to write the new head to.")
        from ..qc.training import train_qc_head

        base = QCHead.load(args.base_head) if args.base_head else None
        needs_model = base is None or base.spec.uses_encoder
        model = _load_model(args, required=True)[0] if needs_model else None
        head = train_qc_head(args.train_labels, model, base=base, batch_size=args.batch_size)
        head.save(args.save_head)
        print(f"{head.describe()}\nwrote {args.save_head}")
        if not args.plate:
            return 0
    if not args.plate:
        raise ValueError("Give a plate folder (cellmae qc PLATE --out DIR), or --train-labels.")
    if not Path(args.plate).is_dir():
        raise FileNotFoundError(f"Plate folder {args.plate} not found: pass an existing folder.")
    if not args.out and not args.train_from_plate:
        raise ValueError("--out DIR is required: the folder for the QC report.")
    from ..executors import ExecutorConfig, open_executor
    from ._scale_out import executor_config, say, shard

    scale, part = executor_config(args), shard(args)
    device = None if args.device == "auto" else args.device
    where = scale if args.out else ExecutorConfig()  # only training a head: nothing to spread
    with open_executor(where, device, log=say) as executor:
        return _run_plate(args, scale, part, executor)


def _run_plate(args: argparse.Namespace, scale, part, executor) -> int:
    """Measure, judge and report one plate (one task per well on ``executor`` when given)."""
    from ..progress import run as drive
    from ..qc.head import QCHead
    from ._scale_out import pending_message

    model, head, notice = None, None, ""
    if args.train_from_plate:
        from ..qc.training import train_head_from_plate

        if args.classic_only:
            raise ValueError("--train-from-plate trains a head: leave out --classic-only.")
        model, _ = _load_model(args, required=True)
        bar, update = progress_bar("training QC head", "field", postfix=40)
        with bar:
            head = drive(
                train_head_from_plate(
                    args.plate,
                    model,
                    n_fields=args.n_fields,
                    layout=args.layout,
                    batch_size=args.batch_size,
                ),
                progress=update,
            )
        if args.save_head:
            head.save(args.save_head)
            print(f"{head.describe()}\nwrote {args.save_head}")
        if not args.out:
            return 0
        head = _keep_better_head(args, model, head)
    elif not args.classic_only:
        head = QCHead.load(args.head)
        if head.spec.uses_encoder:
            model, notice = _load_model(args, required=args.model is not None, executor=executor)

    from ..qc.baseline import DEFAULT_Z
    from ..qc.run import run_qc

    bar, update = progress_bar("QC", "field", postfix=40)
    with bar:
        result = drive(
            run_qc(
                args.plate,
                args.out,
                model,
                head,
                threshold=args.threshold,
                z_threshold=DEFAULT_Z if args.z_threshold is None else args.z_threshold,
                link_passing=args.link_passing,
                link_mode=args.link_mode,
                layout=args.layout,
                batch_size=args.batch_size,
                executor=executor,
                shard=part,
                assemble_only=args.assemble,
                max_in_flight=scale.max_in_flight,
                device=None if args.device == "auto" else args.device,
                force=args.force,
            ),
            progress=update,
        )
    if result["pending_wells"]:
        print(f"shard {part}: measured; " + pending_message(result["pending_wells"], "well"))
        return 0
    for line in (notice, result["notice"]):
        if line:
            print(line)
    method = "QC head" if result["method"] == "head" else "classic metrics (z-score rules)"
    print(f"judged by: {method}")
    for row in result["summary"].to_dict("records"):
        classes = ", ".join(
            f"{k[2:]} {v}"
            for k, v in row.items()
            if k.startswith("n_") and k[2:] not in ("fields", "passing", "flagged") and v
        )
        print(
            f"{row['Metadata_Plate']}: {row['n_passing']}/{row['n_fields']} fields pass, "
            f"{row['n_flagged']} flagged" + (f" ({classes})" if classes else "")
        )
        if row.get("warning"):
            print(f"WARNING {row['Metadata_Plate']}: {row['warning']}")
    print(f"report: {Path(args.out) / 'qc_fields.csv'}")
    if result["mirror"]:
        m = result["mirror"]
        print(f"mirror: {m['files']} files of passing fields in {m['folder']} ({m['mode']})")
    return 0


def _keep_better_head(args: argparse.Namespace, model: Any, new: Any) -> Any:
    """The head QC runs with after --train-from-plate: the new one, unless the head in use
    (--head, or the shipped one) reads this model and scores better on artefacts of other
    fields of the plate (--replace-head insists on the new one)."""
    from ..progress import run as drive
    from ..qc.head import QCHead
    from ..qc.training import better_head, compare_heads_on_plate, describe_comparison

    try:
        current = QCHead.load(args.head)
    except (FileNotFoundError, ValueError):
        return new
    if not current.matches(model):
        return new
    report = drive(
        compare_heads_on_plate(
            args.plate,
            model,
            {"current": current, "new": new},
            exclude=new.training.get("fields", ()),
            layout=args.layout,
            threshold=args.threshold,
            batch_size=args.batch_size,
        )
    )
    print(describe_comparison(report))
    winner = better_head(report)
    if winner == "new" or args.replace_head:
        print("QC uses the new head" + ("" if winner == "new" else " (--replace-head)"))
        return new
    print("QC uses the current head (it scores at least as well; --replace-head to insist)")
    return current
