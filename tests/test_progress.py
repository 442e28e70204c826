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


def test_eta_uses_rate_after_first_event():
    t = iter([0.0, 10.0, 20.0])
    eta = EtaEstimator(clock=lambda: next(t))
    assert eta.update(1, 11) is None  # first event starts the clock (warm-up excluded)
    assert eta.update(2, 11) == pytest.approx(90.0)  # 1 unit per 10 s, 9 left
    assert eta.update(3, None) is None  # unknown total


def test_format_seconds():
    assert format_seconds(None) == "--:--"
    assert format_seconds(75) == "1:15"
    assert format_seconds(3725) == "1:02:05"
    assert Progress(5, 0).fraction is None
