"""Nested node parameters (``encoder.backbone``, ``localizer.top_k`` ...) from dataclass defaults.

ROS 2 parameter YAML nests sections; rclpy flattens them to dotted names. ROS parameters cannot
be None, so optional strings use ``""`` for "unset".
"""
from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Dict


def _ros_default(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return list(value)
    return value


def declare_section(node, prefix: str, defaults: Dict[str, Any]) -> None:
    """Declare ``prefix.key`` parameters with the given defaults (values from a params file win)."""
    for key, value in defaults.items():
        node.declare_parameter(f"{prefix}.{key}" if prefix else key, _ros_default(value))


def get_section(node, prefix: str, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Read back a declared section as a plain dict (``""`` -> None where the default was None;
    arrays -> lists)."""
    out = {}
    for key, default in defaults.items():
        v = node.get_parameter(f"{prefix}.{key}" if prefix else key).value
        if default is None and v == "":
            v = None
        elif isinstance(v, (list, tuple)) or type(v).__name__ == "array":
            v = list(v)
        out[key] = v
    return out


def dataclass_defaults(cls) -> Dict[str, Any]:
    """Field name -> default of a dataclass (fields without a default are skipped)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
