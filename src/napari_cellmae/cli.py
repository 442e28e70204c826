"""The ``cellmae`` command.

Each subcommand lives in ``napari_cellmae.commands.<name>`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import torch and friends only
inside ``run`` so that ``cellmae --help`` stays fast. A subcommand is listed only once it works.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ._version import __version__

# order = order in `cellmae --help`
COMMANDS: tuple[str, ...] = ("info", "reconstruct", "embed", "qc", "profile", "finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellmae",
        description="Cell-microscopy masked autoencoders on plate folders "
        "(reconstruct, embed, QC, fine-tune). The napari plugin is napari-cellmae.",
    )
    parser.add_argument("--version", action="version", version=f"napari-cellmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"napari_cellmae.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cellmae``; returns the exit code (also used in-process by tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # errors a user can cause carry their fix in the message: no traceback
        print(f"cellmae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system refused (a file where a folder goes, disk full …)
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"cellmae {args.command}: error: {where}{exc.strerror or exc}"
            + (
                " (a file is in the way: name a new or empty folder instead)"
                if isinstance(exc, FileExistsError)
                else ""
            ),
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"cellmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m napari_cellmae.cli (also under torchrun)
    sys.exit(main())
