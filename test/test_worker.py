"""LatestFrameWorker: the newest ``depth`` frames are processed in order, older ones dropped and
counted; a failing frame is counted and the worker goes on."""
import threading

import pytest

from conftest import wait_for
from vpr_ros.latest import LatestFrameWorker


class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, msg):
        self.lines.append(msg)

    error = warning


def _blocked_worker(depth):
    """A worker whose first frame blocks until ``gate`` is set, so later offers queue up."""
    gate, started, done = threading.Event(), threading.Event(), []

    def process(msg):
        started.set()
        gate.wait(10.0)
        if msg == "bad":
            raise ValueError("bad frame")
        done.append(msg)

    return LatestFrameWorker(process, _Log(), "test", depth=depth), gate, started, done


@pytest.mark.parametrize("depth, kept", [(1, [5]), (3, [3, 4, 5]), (8, [1, 2, 3, 4, 5])])
def test_depth_keeps_newest_in_order(depth, kept):
    w, gate, started, done = _blocked_worker(depth)
    try:
        w.offer(0)
        assert started.wait(10.0)
        for i in range(1, 6):  # five frames arrive while frame 0 is processed
            w.offer(i)
        gate.set()
        assert wait_for(lambda: w.idle() and w.stats.processed == 1 + len(kept), 10.0), w.stats
        assert done == [0] + kept
        assert (w.stats.received, w.stats.dropped, w.stats.errors) == (6, 5 - len(kept), 0)
    finally:
        gate.set()
        w.stop()


def test_error_counted_and_worker_goes_on():
    w, gate, started, done = _blocked_worker(4)
    gate.set()
    try:
        for m in ("a", "bad", "b"):
            w.offer(m)
        assert wait_for(lambda: w.idle() and w.stats.processed + w.stats.errors == 3, 10.0), w.stats
        assert done == ["a", "b"] and w.stats.errors == 1 and w.stats.last_error == "bad frame"
    finally:
        w.stop()


def test_depth_below_one_refused():
    with pytest.raises(ValueError, match="queue depth"):
        LatestFrameWorker(lambda m: None, _Log(), depth=0)


def test_stamp_monitor_classifies_and_counts():
    from builtin_interfaces.msg import Time

    from vpr_ros.stamp_check import StampMonitor

    m = StampMonitor()
    seq = [(10, 0), (10, 5), (10, 5), (9, 999), (0, 0), (-1, 0), (11, 0), (10, 999)]
    kinds = [m.check(Time(sec=s, nanosec=n)) for s, n in seq]
    assert kinds == [None, None, "duplicate", "out_of_order", "zero", "negative", None, "out_of_order"]
    assert m.last == (11, 0)
    assert m.diagnostics() == {"stamps_zero": 1, "stamps_negative": 1, "stamps_duplicate": 1,
                               "stamps_out_of_order": 2}
