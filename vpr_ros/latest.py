"""Newest-frame processing: subscription callbacks hand over messages, one worker thread
processes only the newest, stale frames are dropped and counted. No unbounded queue anywhere."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

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
    """Runs ``process(msg)`` on the newest offered message in a background thread.

    ``offer`` never blocks and keeps one message: an older message still waiting is dropped
    (counted in ``stats.dropped``). Exceptions from ``process`` are logged through ``logger``
    (one line, no traceback for user-facing :class:`VprError`/``ValueError``) and counted; the
    worker keeps running.

    Args:
        process: callable taking one message.
        logger: an rclpy logger (``node.get_logger()``).
        name: thread name, for logs.
    """

    def __init__(self, process: Callable[[Any], None], logger, name: str = "worker"):
        self._process = process
        self._logger = logger
        self._cond = threading.Condition()
        self._pending: Optional[Any] = None
        self._stop = False
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, msg: Any) -> None:
        """Hand over a message; replaces (drops) one still waiting."""
        with self._cond:
            self.stats.received += 1
            if self._pending is not None:
                self.stats.dropped += 1
            self._pending = msg
            self._cond.notify()

    def idle(self) -> bool:
        """True when no message is waiting or being processed."""
        with self._cond:
            return self._pending is None and not self._busy

    _busy = False

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                msg, self._pending = self._pending, None
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
