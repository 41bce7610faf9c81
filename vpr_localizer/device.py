"""Torch device selection shared by the encoder and the segmentation backends."""
from __future__ import annotations

import torch

from vpr_localizer.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: an invalid device string, or ``cuda`` asked for without CUDA.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid torch device {device!r} (use auto, cpu, cuda or cuda:N): {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev
