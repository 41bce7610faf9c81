"""Comparing encoder fingerprints (a map's ``encoder`` section against the running encoder)."""
from __future__ import annotations

from typing import Dict, List


def fingerprint_diffs(stored: Dict, expected: Dict) -> List[str]:
    """``key: map A vs encoder B`` for every field that differs between a stored fingerprint and
    the expected one (SHA-256 values shortened to 12 characters); empty when they are equal."""
    diffs = []
    for key in sorted(set(stored) | set(expected)):
        a, b = stored.get(key), expected.get(key)
        if a != b:
            sa, sb = str(a), str(b)
            if key.endswith("sha256"):
                sa, sb = sa[:12], sb[:12]
            diffs.append(f"{key}: map {sa} vs encoder {sb}")
    return diffs
