import itertools

import pytest

from napari_cellmae.progress import Cancelled, EtaEstimator, Progress, format_seconds, run


def _count(n, log):
    try:
        for i in range(n):
            yield Progress(i + 1, n, f"item {i}")
        return "finished"
    finally:
        log.append("closed")


def test_run_returns_result_and_forwards_events():
    log, events = [], []
    assert run(_count(3, log), progress=events.append) == "finished"
    assert [e.done for e in events] == [1, 2, 3]
    assert events[-1].fraction == 1.0
    assert log == ["closed"]


def test_run_cancel_closes_generator():
    log, events = [], []
    with pytest.raises(Cancelled):
        run(_count(100, log), progress=events.append, should_stop=lambda: len(events) >= 2)
    assert len(events) == 2
    assert log == ["closed"]  # the generator's cleanup ran


def test_eta_waits_for_enough_samples_and_excludes_warm_up():
    t = iter([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    eta = EtaEstimator(clock=lambda: next(t))
    assert eta.update(0, 11) is None  # a "starting" event: done 0 does not start the clock
    assert eta.update(1, 11) is None  # the first unit (warm-up included) starts the clock
    assert eta.update(2, 11) is None  # one or two units since: too few samples for a rate
    assert eta.update(3, 11) is None
    assert eta.update(4, 11) == pytest.approx(70.0)  # 1 unit per 10 s, 7 left
    assert eta.update(5, None) is None  # unknown total


def test_eta_does_not_swing_after_a_slow_start():
    """Fine-tune: a minute of start-up before the first step, then 300 steps of 0.7–1.3 s. The
    old estimate (clock from the first event, plain average) read 7:55 → 4:13 → 0:14 over the
    first steps; the estimate must start near the truth and stay steady."""
    import random

    rng = random.Random(0)
    times = [0.0, 60.0]  # "spawned" at 0, step 1 after a minute of warm-up
    for _ in range(299):
        times.append(times[-1] + rng.uniform(0.7, 1.3))
    clock = iter(times)
    eta = EtaEstimator(clock=lambda: next(clock))
    estimates = [eta.update(0, 300)] + [eta.update(step, 300) for step in range(1, 300)]
    shown = [(i, e) for i, e in enumerate(estimates) if e is not None]
    first_step, first = shown[0]
    assert first_step <= 4  # shown after three steps, not after a long wait
    truth = times[-1] - times[first_step]
    assert first == pytest.approx(truth, rel=0.3)  # not 7:55 for a 5-minute run
    for (_, a), (_, b) in itertools.pairwise(shown):
        # from one step (~1 s) to the next the estimate moves by about that second, never by
        # minutes as the old one did
        assert abs(a - b) < 10.0
    assert shown[-1][1] < 5.0


def test_format_seconds():
    assert format_seconds(None) == "--:--"
    assert format_seconds(75) == "1:15"
    assert format_seconds(3725) == "1:02:05"
    assert Progress(5, 0).fraction is None


def test_cli_bar_shows_no_rate_before_a_second_unit():
    """`cellmae qc` printed "4288 field/s" at its first field: the unit that announced the total
    was divided by the microseconds since the bar learnt the total."""
    from napari_cellmae.commands._progress import progress_bar

    bar, show = progress_bar("QC", "field")
    with bar:
        show(Progress(0, None, "scanning"))
        show(Progress(1, 500, "QC A01 site 1"))
        line = bar.format_meter(**bar.format_dict)
    assert "?field/s" in line, line
