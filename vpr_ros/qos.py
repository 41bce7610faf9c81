"""QoS profiles: sensor-data QoS on camera input, reliable QoS on outputs (ARCHITECTURE.md)."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy


def sensor_qos(depth: int = 1) -> QoSProfile:
    """Best effort, volatile, keep only the last ``depth`` (default 1) messages: camera input."""
    return QoSProfile(reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE,
                      history=HistoryPolicy.KEEP_LAST, depth=depth)


def reliable_qos(depth: int = 10) -> QoSProfile:
    """Reliable, volatile, keep last ``depth``: outputs (poses, descriptors, loop closures)."""
    return QoSProfile(reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE,
                      history=HistoryPolicy.KEEP_LAST, depth=depth)


def latched_qos() -> QoSProfile:
    """Reliable, transient-local, depth 1: state a late subscriber still needs (e.g. map markers)."""
    return QoSProfile(reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                      history=HistoryPolicy.KEEP_LAST, depth=1)
