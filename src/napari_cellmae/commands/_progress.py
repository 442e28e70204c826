"""The progress bar every subcommand shows on stderr, fed by the core's Progress events."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def progress_bar(desc: str, unit: str = "it", postfix: int | None = None) -> tuple[Any, Callable]:
    """(tqdm bar on stderr, ``update(event)``): the bar follows each event's done/total and shows
    its message (cut to ``postfix`` characters; 0: no message)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(event: Any) -> None:
        if event.total is not None and bar.total != event.total:
            bar.reset(total=event.total)
            # the rate and ETA count from here: units already done (the one that announced the
            # total, resumed ones) are not divided by the microseconds since the reset
            bar.initial = event.done
        bar.n = event.done
        if postfix != 0:
            bar.set_postfix_str(event.message[:postfix], refresh=False)
        bar.refresh()

    return bar, update
