"""Reading and strictly loading Panoptic-DeepLab checkpoints in detectron2's layout (Cheng et al.,
CVPR 2020; detectron2 ``projects/Panoptic-DeepLab``, Apache-2.0).

A detectron2 ``.pkl`` checkpoint is a pickle of numpy arrays; it is read with an unpickler that
only resolves numpy globals (:class:`_NumpyOnlyUnpickler`), so a weight file can never run code.
``torch.save`` files are read with ``torch.load(weights_only=True)``. Loading is strict: every
tensor name and shape must match :class:`~vpr_localizer.segmentation.panoptic.model.PanopticDeepLab`
(only BatchNorm step counters and the normalisation buffers may be absent).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from vpr_localizer.device import resolve_device
from vpr_localizer.errors import WeightsError
from vpr_localizer.files import check_strict_state_dict, torch_load_weights_only
from vpr_localizer.segmentation.panoptic.model import PIXEL_MEAN, PIXEL_STD, PanopticDeepLab


class _DisallowedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy allow-list."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 ``.pkl`` checkpoints: dicts of numpy arrays; refuses any other
    global (no arbitrary code runs)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise _DisallowedGlobal(f"global {module}.{name} is not allowed in a weight file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _read_raw(path: str):
    if zipfile.is_zipfile(path):  # torch.save format
        return torch_load_weights_only(path)
    obj = None
    with open(path, "rb") as fh:
        try:
            obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
        except _DisallowedGlobal:
            raise
        except Exception:  # not a plain pickle: let torch try
            obj = None
    if isinstance(obj, dict):  # detectron2 .pkl
        return obj
    # torch's legacy (non-zip) format starts with a pickled magic number, not a dict
    return torch_load_weights_only(path)


def read_checkpoint(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read a Panoptic-DeepLab checkpoint as a flat ``{name: tensor}`` dict.

    Accepted: a ``torch.save`` file or a detectron2 ``.pkl`` (pickled numpy arrays; only numpy
    globals are unpickled), holding ``{"model": state_dict, ...}``, ``{"state_dict": ...}`` or a
    plain state dict; a ``module.`` prefix on every key is removed.

    Raises:
        WeightsError: missing/unreadable file or not a dict of arrays (message names the file).
    """
    path = os.fspath(path)
    if not path or not os.path.isfile(path):
        raise WeightsError(f"Panoptic-DeepLab weight file not found: {path!r}")
    try:
        obj = _read_raw(path)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load Panoptic-DeepLab weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: not a Panoptic-DeepLab state dict (expected a dict of tensors, "
                           f"optionally under 'model')")
    sd: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        sd[k] = v
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_optional(key: str) -> bool:
    # BatchNorm step counters and the normalisation buffers are not always saved.
    return key in ("pixel_mean", "pixel_std") or key.endswith(".num_batches_tracked")


def infer_config(sd: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Architecture variant of a state dict: ``stem`` (``deeplab`` when ``backbone.stem.conv2``
    exists, else ``basic``), ``dsconv`` (``sem_seg_head.head.pointwise`` exists) and ``depth``
    (101 when ``res4`` has 23 blocks, else 50)."""
    res4 = {k.split(".")[2] for k in sd if k.startswith("backbone.res4.")}
    return {
        "stem": "deeplab" if "backbone.stem.conv2.weight" in sd else "basic",
        "dsconv": "sem_seg_head.head.pointwise.weight" in sd,
        "depth": 101 if len(res4) == 23 else 50,
    }


def check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], path: str) -> None:
    """Raise :class:`WeightsError` naming ``path`` unless ``sd`` has exactly ``model``'s keys
    and shapes (``*.num_batches_tracked``, ``pixel_mean`` and ``pixel_std`` may be absent)."""
    cfg = getattr(model, "config", {})
    check_strict_state_dict(model.state_dict(), sd, path, f"not a Panoptic-DeepLab state dict for {cfg}",
                            optional=_is_optional)


def load_panoptic_deeplab(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                          stem: Optional[str] = None, dsconv: Optional[bool] = None,
                          depth: Optional[int] = None) -> PanopticDeepLab:
    """Build :class:`PanopticDeepLab` and load a checkpoint in detectron2's layout strictly.

    The variant (stem, dsconv, depth) is inferred from the key names (:func:`infer_config`)
    unless given; after that every key must match by name and shape (only
    ``*.num_batches_tracked``, ``pixel_mean`` and ``pixel_std`` may be absent).

    Args:
        path: ``.pth`` / ``.pkl`` file (see :func:`read_checkpoint`).
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        stem, dsconv, depth: force a variant instead of inferring it.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        WeightsError: missing/unreadable file, missing or unexpected keys, wrong shapes (the
            message names the file and lists a few offending keys).
    """
    if path is None or str(path) == "":
        raise WeightsError("panoptic_deeplab needs a weight file (a detectron2 Panoptic-DeepLab Cityscapes "
                           "checkpoint); none ships with this project")
    path = os.fspath(path)
    sd = read_checkpoint(path)
    cfg = infer_config(sd)
    if stem is not None:
        cfg["stem"] = stem
    if dsconv is not None:
        cfg["dsconv"] = bool(dsconv)
    if depth is not None:
        cfg["depth"] = int(depth)
    dev = resolve_device(device)
    try:
        with torch.device("meta"):  # no memory, no random init: every value comes from the file
            model = PanopticDeepLab(**cfg)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    check_state_dict(model, sd, path)
    model = model.to_empty(device=dev)
    with torch.no_grad():  # the optional entries, in case the file lacks them
        model.pixel_mean.copy_(torch.tensor(PIXEL_MEAN).view(3, 1, 1))
        model.pixel_std.copy_(torch.tensor(PIXEL_STD).view(3, 1, 1))
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d) and mod.num_batches_tracked is not None:
                mod.num_batches_tracked.zero_()
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # e.g. dtype trouble not caught above
        raise WeightsError(f"{path}: does not fit Panoptic-DeepLab: {exc}") from exc
    if result.unexpected_keys or any(not _is_optional(k) for k in result.missing_keys):
        raise WeightsError(f"{path}: does not fit Panoptic-DeepLab: {result}")
    return model.eval()
