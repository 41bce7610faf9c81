"""Encoder checkpoint format: what a trained or fitted encoder writes and reads back.

A checkpoint is a ``torch.save`` dictionary of tensors, strings and numbers only (loaded with
``weights_only=True``, so nothing in it is executed): ``format``, ``version``, ``backbone``
(name, weights SHA-256, preprocessing, input size), ``aggregator`` (type, K, extra state such as
NetVLAD's alpha, state dict, guidance), ``pca`` and the encoder ``fingerprint``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict

import numpy as np
import torch

from vpr_localizer.errors import WeightsError
from vpr_localizer.files import torch_load_weights_only

CHECKPOINT_FORMAT = "vpr_localizer.encoder"
CHECKPOINT_VERSION = 1


def state_hash(tensors: Dict[str, object]) -> str:
    """SHA-256 over named tensors/arrays (sorted by name, as float32): the ``params_sha256`` of a
    fingerprint."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        h.update(key.encode())
        h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def load_checkpoint(path: str) -> Dict:
    """Load an encoder checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        WeightsError: missing or unreadable file, or one holding pickled objects beyond tensors
            (refused; :func:`~vpr_localizer.files.refused_pickle_message`).
    """
    if not os.path.isfile(path):
        raise WeightsError(f"encoder checkpoint not found: {path!r}")
    try:
        return torch_load_weights_only(path)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load encoder checkpoint ({type(exc).__name__}: {exc})") from exc


def save_checkpoint(state: Dict, path: str) -> None:
    """Write a checkpoint dictionary atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
