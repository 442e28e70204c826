"""Options shared by several subcommands, so each reads and means the same everywhere."""

from __future__ import annotations

import argparse

# kept in step with plates.layouts.LAYOUTS by tests/test_cli.py (not imported: --help stays light)
LAYOUT_NAMES = (
    "imagexpress",
    "harmony",
    "cellomics",
    "incell",
    "incucyte",
    "rxrx",
    "rxrx3",
    "scanr",
)

ArgumentTarget = argparse.ArgumentParser | argparse._ArgumentGroup


def add_layout(group: ArgumentTarget) -> None:
    """``--layout``: the plate's file naming."""
    group.add_argument(
        "--layout",
        default="auto",
        help=f"file naming: auto (detect), {', '.join(LAYOUT_NAMES)}, scanr:384 (scan^R well "
        "numbers on a 384-well plate; also 6, 12, 24, 48, 96, 1536), or a regex with named "
        "groups (default: auto, which also reads OME-Zarr HCS plates)",
    )


def add_force(group: ArgumentTarget) -> None:
    """``--force``: write into an existing folder that cellmae did not make."""
    group.add_argument(
        "--force",
        action="store_true",
        help="write into an existing, non-empty --out folder that cellmae did not make (files "
        "of the same names there are replaced); without it such a folder is refused. A folder "
        "an earlier run of the same command made is always resumed or refreshed",
    )


def add_model(group: ArgumentTarget, role: str = "model") -> None:
    """``--model``: a bundled name, a model folder or a Hugging Face repo id."""
    group.add_argument(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        help=f"{role}: bundled model name, model folder (ours or an OpenPhenom snapshot) or "
        "Hugging Face repo id (default: the bundled cellmae-tiny)",
    )


def add_device(
    group: ArgumentTarget, precision: bool = True, precision_help: str | None = None
) -> None:
    """``--device`` (and ``--precision`` unless ``precision=False``)."""
    group.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"
    )
    if not precision:
        return
    group.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help=precision_help
        or "inference precision (default: auto = bf16/fp16 where the device is fast at it)",
    )


def add_batch_size(group: ArgumentTarget) -> None:
    """``--batch-size`` for inference."""
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="crops per forward pass (default: 4 on CPU, 16 on MPS, 64 on CUDA; halved "
        "automatically on out-of-memory)",
    )


def add_inference(parser: argparse.ArgumentParser, role: str = "model") -> argparse._ArgumentGroup:
    """A "model" group with --model, --device, --precision and --batch-size; returned so a
    command can add its own model options to it."""
    group = parser.add_argument_group("model")
    add_model(group, role)
    add_device(group)
    add_batch_size(group)
    return group
