"""Parameter files: ROS 2 ``ros__parameters`` YAML shared by launch files and the CLI.

A profile file looks like::

    /**:
      ros__parameters:
        encoder:   {backbone: vgg16, weights: ..., image_size: [640, 480], ...}
        localizer: {top_k: 10, consistency_radius_m: 25.0, ...}
        map:       {index: flat}

Nodes read the same nested keys (rclpy flattens them to ``encoder.backbone`` etc.).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import yaml

from vpr_localizer.errors import DatasetError


def read_params_file(path: str) -> Dict:
    """Parse a parameter YAML file into a dict (``{}`` for an empty file).

    Raises:
        DatasetError: missing file, invalid YAML, or a top level that is not a mapping.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"parameter file not found: {path}")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected '<node>: ros__parameters: ...' mappings")
    return doc


def load_params(path: str, node: Optional[str] = None) -> Dict:
    """Return the ``ros__parameters`` mapping of ``node`` (or of ``/**``, or of the only node).

    Raises:
        DatasetError: missing/unparsable file or no ``ros__parameters`` section.
    """
    doc = read_params_file(path)
    sections = {k: v.get("ros__parameters") for k, v in doc.items()
                if isinstance(v, dict) and isinstance(v.get("ros__parameters"), dict)}
    if not sections:
        raise DatasetError(f"{path}: no '<node>: ros__parameters:' section")
    merged: Dict = {}
    for key in ("/**", node):
        if key and key in sections:
            merged = deep_merge(merged, sections[key])
    if not merged:
        merged = next(iter(sections.values()))
    return merged


def deep_merge(a: Dict, b: Dict) -> Dict:
    """Recursive dict merge, ``b`` wins."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
