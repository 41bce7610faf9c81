"""Newest-frame processing: subscription callbacks hand over messages, one worker thread
processes only the newest ``depth`` of them, stale frames are dropped and counted. No unbounded
queue anywhere."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque

from vpr_localizer.errors import VprError


@dataclass
class WorkerStats:
    """Counters of a :class:`LatestFrameWorker` (frames, seconds)."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    errors: int = 0
    last_seconds: float = float("nan")
    last_error: str = ""


class LatestFrameWorker:
    """Runs ``process(msg)`` on the newest offered messages in a background thread, oldest first.

    ``offer`` never blocks and keeps at most ``depth`` waiting messages: when they are full the
    oldest waiting one is dropped (counted in ``stats.dropped``). ``depth=1`` (live localisation)
    always works on the newest frame; a larger depth absorbs bursts (a keyframe lost while mapping
    is a hole in the map; a lossless bag replay) at the price of latency. Exceptions from ``process`` are logged through ``logger``
    (one line, no traceback for user-facing :class:`VprError`/``ValueError``) and counted; the
    worker keeps running.

    Args:
        process: callable taking one message.
        logger: an rclpy logger (``node.get_logger()``).
        name: thread name, for logs.
        depth: messages kept waiting (>= 1).

    Raises:
        ValueError: ``depth`` < 1.
    """

    def __init__(self, process: Callable[[Any], None], logger, name: str = "worker", depth: int = 1):
        if int(depth) < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self._process = process
        self._logger = logger
        self._cond = threading.Condition()
        self.depth = int(depth)
        self._pending: Deque[Any] = collections.deque()
        self._stop = False
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, msg: Any) -> None:
        """Hand over a message; drops the oldest waiting one when ``depth`` are waiting."""
        with self._cond:
            self.stats.received += 1
            if len(self._pending) >= self.depth:
                self._pending.popleft()
                self.stats.dropped += 1
            self._pending.append(msg)
            self._cond.notify()

    def idle(self) -> bool:
        """True when no message is waiting or being processed."""
        with self._cond:
            return not self._pending and not self._busy

    _busy = False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                msg = self._pending.popleft()
                self._busy = True
            t0 = time.perf_counter()
            try:
                self._process(msg)
                self.stats.processed += 1
            except (VprError, ValueError) as exc:
                self.stats.errors += 1
                self.stats.last_error = str(exc)
                self._logger.warning(f"dropped frame: {exc}")
            except Exception as exc:  # noqa: BLE001 - a node must survive any bad frame
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._logger.error(f"error while processing a frame: {type(exc).__name__}: {exc}")
            finally:
                self.stats.last_seconds = time.perf_counter() - t0
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (the frame being processed is finished first)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
