"""``diagnostic_msgs/DiagnosticArray`` from a dict of named values."""
from __future__ import annotations

from typing import Dict

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
