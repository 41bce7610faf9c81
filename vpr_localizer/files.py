"""File helpers shared by the core: content hashes and weight-file loading with clear errors."""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, List, Optional

from vpr_localizer.errors import WeightsError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file (read in ``chunk``-byte blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def refused_pickle_message(path: str) -> str:
    """The one-line message for a file that ``torch.load(weights_only=True)`` refused."""
    return (f"refused to load {path}: it contains pickled Python objects beyond tensors (possibly "
            "malicious); only plain state dicts are accepted")


def torch_load_weights_only(path: str):
    """``torch.load(path, map_location="cpu", weights_only=True)``.

    Raises:
        WeightsError: the file holds pickled objects beyond tensors and plain containers
            (:func:`refused_pickle_message`; torch's own advice to pass ``weights_only=False``
            is deliberately not repeated). Other load errors propagate unchanged.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(refused_pickle_message(path)) from exc


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
        sd = torch_load_weights_only(path)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load {label} weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    if strip_module_prefix and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_strict_state_dict(expected: Dict, sd: Dict, path: str, what: str,
                            optional: Optional[Callable[[str], bool]] = None,
                            hint: Optional[Callable[[List[str]], str]] = None) -> None:
    """Strict tensor-name and shape check of a loaded state dict, with one readable error.

    Args:
        expected: the model's ``state_dict()``.
        sd: the loaded state dict.
        path: the weight file (named in the message).
        what: message text after the path, e.g. ``"not an ESPNetv2 ... state dict"``.
        optional: keys of ``expected`` that may be absent (e.g. BatchNorm's
            ``num_batches_tracked``); None = none.
        hint: ``hint(unexpected_keys) -> str`` appended to the message (e.g. "use decoder=True").

    Raises:
        WeightsError: ``"{path}: {what}: N missing (e.g. [...]); N unexpected (...); N with the
            wrong shape (...)"`` unless every non-optional key is present with its shape and
            nothing is extra.
    """
    missing = [k for k in expected if k not in sd and not (optional and optional(k))]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} != model {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
    raise WeightsError(f"{path}: {what}: " + "; ".join(parts) + (hint(unexpected) if hint else ""))
