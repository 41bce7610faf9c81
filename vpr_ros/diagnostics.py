"""``diagnostic_msgs/DiagnosticArray`` from a dict of named values (+ a newest-frame worker's counters)."""
from __future__ import annotations

from typing import Dict, Sequence

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def diagnostics_msg(stamp, name: str, level, message: str, values: Dict[str, object],
                    hardware_id: str = "") -> DiagnosticArray:
    """One-status DiagnosticArray: ``values`` become key/value strings (floats with 3 decimals)."""
    st = DiagnosticStatus(level=level if isinstance(level, bytes) else bytes([level]), name=name,
                          message=message, hardware_id=hardware_id)
    st.values = [KeyValue(key=str(k), value=(f"{v:.3f}" if isinstance(v, float) else str(v)))
                 for k, v in values.items()]
    arr = DiagnosticArray()
    arr.header.stamp = stamp
    arr.status = [st]
    return arr


def worker_diagnostics(stamp, name: str, stats, values: Dict[str, object], ok_message: str, bad_input: str,
                       problems: Sequence[str] = (), hardware_id: str = "") -> DiagnosticArray:
    """Diagnostics of a node built around a :class:`~vpr_ros.latest.LatestFrameWorker`.

    Call it from the worker's process callback once the frame's work is done: the frame being
    processed counts as processed (the worker counts it only when the callback returns).

    Args:
        stamp: ``builtin_interfaces/Time`` of the array (the node clock's now).
        name: status name (the node name).
        stats: the worker's :class:`~vpr_ros.latest.WorkerStats`.
        values: the node's own values (latencies in ms, sizes ...); ``received``, ``processed``,
            ``dropped`` and ``errors`` (frame counts) are added after them.
        ok_message: the message while nothing is wrong (e.g. ``"segmenting"``).
        bad_input: what a failed frame is, singular (``"image message"``): the problem reads
            ``"<errors> bad <bad_input>(s); last: <last error>"``.
        problems: more problems of the node (e.g. failed map writes), after that one.
        hardware_id: optional ``DiagnosticStatus.hardware_id``.

    Returns:
        A one-status array: level OK with ``ok_message`` when there is no problem, else WARN
        with the problems joined by ``"; "``.
    """
    found = ([f"{stats.errors} bad {bad_input}(s); last: {stats.last_error}"] if stats.errors else []) + list(problems)
    counters = {"received": stats.received, "processed": stats.processed + 1, "dropped": stats.dropped,
                "errors": stats.errors}
    return diagnostics_msg(stamp, name, WARN if found else OK, "; ".join(found) if found else ok_message,
                           {**values, **counters}, hardware_id)
