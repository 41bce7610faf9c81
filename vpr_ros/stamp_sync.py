"""Exact header-stamp matching between two topics (e.g. segmentation labels to camera frames).

One topic's callback :meth:`StampBuffer.put`\\ s its messages keyed by stamp; the worker that
processes the other topic :meth:`StampBuffer.wait`\\ s for the message with its frame's stamp.
Bounded: the oldest entries are evicted, nothing grows without limit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, Optional, Tuple, TypeVar

M = TypeVar("M")


def stamp_key(stamp) -> Tuple[int, int]:
    """``builtin_interfaces/Time`` -> ``(sec, nanosec)``, an exact, hashable key."""
    return int(stamp.sec), int(stamp.nanosec)


class StampBuffer(Generic[M]):
    """The newest ``capacity`` messages by stamp key; a waiter gets the one with its key.

    Thread-safe: :meth:`put` from a subscription callback, :meth:`wait` from a worker thread,
    :meth:`close` from teardown.

    Args:
        capacity: messages kept (>= 1); putting one more evicts the oldest put.

    Raises:
        ValueError: ``capacity`` < 1.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._msgs: "OrderedDict[Hashable, M]" = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._msgs)

    def __contains__(self, key: Hashable) -> bool:
        """True while a message waits under ``key`` (put, not yet taken or evicted)."""
        with self._cond:
            return key in self._msgs

    def put(self, key: Hashable, msg: M) -> None:
        """Keep ``msg`` under ``key`` (replacing one with the same key) and wake the waiters."""
        with self._cond:
            self._msgs[key] = msg
            self._msgs.move_to_end(key)
            while len(self._msgs) > self.capacity:
                self._msgs.popitem(last=False)
            self._cond.notify_all()

    def wait(self, key: Hashable, timeout_s: float) -> Optional[M]:
        """Take (remove and return) the message under ``key``, waiting up to ``timeout_s`` seconds.

        Returns:
            The message, or None when none arrived in time or the buffer was closed meanwhile.
        """
        with self._cond:
            self._cond.wait_for(lambda: key in self._msgs or self._closed, max(0.0, timeout_s))
            return self._msgs.pop(key, None)

    def close(self) -> None:
        """Wake every waiter now (at shutdown); later waits return without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
