"""File helpers shared by the core: content hashes and weight-file loading with clear errors."""
from __future__ import annotations

import hashlib
import os
from typing import Dict

from .errors import WeightsError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file (read in ``chunk``-byte blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str, label: str, strip_module_prefix: bool = False) -> Dict:
    """Load a PyTorch state dict of tensors with ``torch.load(weights_only=True)``.

    A ``{"state_dict": {...}}`` wrapper is unwrapped; with ``strip_module_prefix`` the
    ``module.`` prefix of checkpoints saved from ``nn.DataParallel`` is removed.

    Args:
        path: weight file.
        label: what the weights are for (``"VGG16"``, ``"ESPNet"`` ...), used in messages.

    Returns:
        dict name -> ``torch.Tensor``.

    Raises:
        WeightsError: missing or unreadable file, or not a non-empty dict of tensors (the message
            names the file).
    """
    import torch

    if not path or not os.path.isfile(path):
        raise WeightsError(f"{label} weight file not found: {path!r}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load {label} weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    if strip_module_prefix and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
