"""Header-stamp sanity of one input stream: zero, negative, duplicate and out-of-order stamps are
classified and counted (a node logs them, throttled, and reports the counts in diagnostics)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .stamp_sync import stamp_key

#: The anomalies :class:`StampMonitor` counts, in the order of its checks.
STAMP_ANOMALIES = ("zero", "negative", "duplicate", "out_of_order")


class StampMonitor:
    """Classifies each stamp of a stream against the newest good one seen before it.

    * ``zero``: 0 s 0 ns (an unset header: sources that do not stamp their frames);
    * ``negative``: ``sec < 0``;
    * ``duplicate``: equal to the newest good stamp;
    * ``out_of_order``: older than the newest good stamp (a late frame).

    Only a good stamp (strictly newer) becomes the reference; zero and negative stamps never do.
    Not thread-safe: call :meth:`check` from the one worker thread of a node.
    """

    def __init__(self):
        self.last: Optional[Tuple[int, int]] = None
        self.counts: Dict[str, int] = dict.fromkeys(STAMP_ANOMALIES, 0)

    def check(self, stamp) -> Optional[str]:
        """Classify ``stamp`` (``builtin_interfaces/Time``); returns None for a good (strictly
        newer) stamp, else the anomaly (one of :data:`STAMP_ANOMALIES`, counted)."""
        key = stamp_key(stamp)
        if key == (0, 0):
            kind = "zero"
        elif key[0] < 0:
            kind = "negative"
        elif self.last is not None and key == self.last:
            kind = "duplicate"
        elif self.last is not None and key < self.last:
            kind = "out_of_order"
        else:
            self.last = key
            return None
        self.counts[kind] += 1
        return kind

    def diagnostics(self) -> Dict[str, int]:
        """``{"stamps_zero": n, "stamps_negative": n, "stamps_duplicate": n, "stamps_out_of_order": n}``."""
        return {f"stamps_{k}": int(v) for k, v in self.counts.items()}
