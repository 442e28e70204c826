"""Progress events and cancellation shared by the core, the CLI and the GUI.

Long-running core functions are generators that ``yield Progress(...)`` and ``return`` their
result. The GUI runs them in a napari ``thread_worker`` (cancel = stop the generator at its next
``yield``); the CLI and plain Python use :func:`run` which drives the generator, forwards events to
an optional ``progress`` callback and stops when ``should_stop()`` turns true.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class Cancelled(RuntimeError):
    """Raised by :func:`run` when ``should_stop`` asked a task to stop."""


@dataclass(frozen=True)
class Progress:
    """One progress event.

    Parameters
    ----------
    done : int
        Units finished so far (fields, wells, crops, steps…).
    total : int or None
        Units in all, or None when unknown.
    message : str
        What is happening now, for a status line.
    payload : Any
        Optional partial result (a table row, a loss value) for live displays.
    """

    done: int
    total: int | None = None
    message: str = ""
    payload: Any = field(default=None, compare=False)

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, max(0.0, self.done / self.total))


ProgressGenerator = Generator[Progress, None, T]


def run(
    gen: Generator[Progress, None, T],
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Drive a progress generator to completion and return its result.

    Raises :class:`Cancelled` (after closing the generator, so its ``finally`` blocks run) when
    ``should_stop()`` returns True between two events.
    """
    try:
        while True:
            event = next(gen)
            if progress is not None:
                progress(event)
            if should_stop is not None and should_stop():
                gen.close()
                raise Cancelled("stopped on request")
    except StopIteration as stop:
        return stop.value


class EtaEstimator:
    """Remaining-time estimate that does not swing, shared by the GUI's task bar and the CLI.

    - The clock starts at the first event with ``done > 0``: the first unit often includes
      warm-up (model load, first batch, a subprocess starting), which says nothing about the
      rate of the others.
    - No estimate until ``min_units`` more units and ``min_seconds`` have passed since then (a
      rate from one or two samples is noise).
    - The rate is the average since the clock started; the estimate shown is an exponential
      moving average (weight ``smoothing`` for each new value) of the raw estimates, counted
      down by the time elapsed between updates, so a single slow or fast unit moves it a little.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        min_units: int = 3,
        min_seconds: float = 2.0,
        smoothing: float = 0.3,
    ) -> None:
        self._clock = clock
        self.min_units = min_units
        self.min_seconds = min_seconds
        self.smoothing = smoothing
        self._t0: float | None = None
        self._done0 = 0
        self._last: tuple[float, float] | None = None  # (time, estimate) of the last update

    def rate(self, done: int, now: float | None = None) -> float | None:
        """Units per second since the clock started, or None while there are too few samples."""
        if self._t0 is None:
            return None
        now = self._clock() if now is None else now
        units, seconds = done - self._done0, now - self._t0
        if units < self.min_units or seconds < self.min_seconds:
            return None
        return units / seconds

    def update(self, done: int, total: int | None) -> float | None:
        """Seconds left, or None when it cannot be estimated yet."""
        now = self._clock()
        if self._t0 is None:
            if done > 0:
                self._t0, self._done0 = now, done
            return None
        rate = self.rate(done, now)
        if not total or rate is None:
            return None
        raw = max(0.0, (total - done) / rate)
        if done >= total:
            estimate = 0.0
        elif self._last is None:
            estimate = raw
        else:
            then, before = self._last
            predicted = max(0.0, before - (now - then))
            estimate = predicted + self.smoothing * (raw - predicted)
        self._last = (now, estimate)
        return estimate


def format_seconds(seconds: float | None) -> str:
    """``75.0 -> '1:15'``, ``3725 -> '1:02:05'``, None -> '--:--'."""
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
