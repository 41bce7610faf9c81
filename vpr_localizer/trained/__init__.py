"""Encoder checkpoints trained by this project and shipped with the package.

``--checkpoint NAME`` (and ``encoder.checkpoint: NAME`` in a parameter file) accepts one of
:data:`SHIPPED` besides a file path; ``none`` means no checkpoint (the untrained ImageNet +
k-means baseline). :func:`default_checkpoint` says which shipped checkpoint the command line,
the default parameter file and ``vpr-localizer demo`` use when none is named. A checkpoint without an aggregator (``aggregator: None``, like
``vgg16_conv5_nordland``) only replaces the backbone's fine-tuned tail: NetVLAD is still fitted
on each map. Each ``NAME.pt`` sits beside ``NAME.json`` (the training log: command, seed,
per-epoch loss and validation recall) and ``NAME.png`` (the learning curves).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from vpr_localizer.errors import WeightsError

HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> what it is (the file is ``<name>.pt`` in this folder).
SHIPPED: Dict[str, str] = {
    "vgg16_conv5_nordland": "VGG16 conv5_1..conv5_3 fine-tuned with NetVLAD K=64 on Nordland positions 0-2499 "
                            "(summer, winter, simulated night) at 128x64; no aggregator: each map fits its own "
                            "NetVLAD vocabulary by k-means (and PCA), as for the untrained encoder",
}


#: backbone -> (the shipped checkpoint used by default, the backbone weight file and preprocessing
#: it was trained on top of: its tail only fits those).
DEFAULT_CHECKPOINTS: Dict[str, Tuple[str, str, str]] = {
    "vgg16": ("vgg16_conv5_nordland", "vgg16_features_imagenet_caffe_bgr.pth", "caffe_bgr"),
}


def default_checkpoint(backbone: str, weights: Optional[str] = None,
                       preprocessing: Optional[str] = None) -> Optional[str]:
    """The shipped checkpoint used when none is given, or None.

    Only where it fits: the same backbone, with the weight file (by name) and preprocessing it
    was trained on (a fine-tuned conv5 on top of another conv1-conv4 would be meaningless; the
    checkpoint's own weight hash is still checked when it loads).

    Args:
        backbone: backbone name (e.g. ``vgg16``).
        weights: the backbone weight file in use (None = the conventional one).
        preprocessing: the preprocessing in use (None = the backbone's default).

    Returns:
        A :data:`SHIPPED` name, or None (no default for this configuration).
    """
    entry = DEFAULT_CHECKPOINTS.get(backbone)
    if entry is None:
        return None
    name, weight_file, prep = entry
    if weights is not None and os.path.basename(str(weights)) != weight_file:
        return None
    if preprocessing is not None and preprocessing != prep:
        return None
    return name


def shipped_checkpoint_path(name: str) -> str:
    """The file of shipped checkpoint ``name``.

    Raises:
        WeightsError: unknown name, or the file is missing from the installation.
    """
    if name not in SHIPPED:
        raise WeightsError(f"unknown shipped checkpoint {name!r}; shipped: {', '.join(SHIPPED)}")
    path = os.path.join(HERE, f"{name}.pt")
    if not os.path.isfile(path):
        raise WeightsError(f"shipped checkpoint {name} is missing: {path} (a broken installation?)")
    return path


def resolve_checkpoint(value: Optional[str]) -> Optional[str]:
    """``None`` / ``""`` / ``"none"`` -> None (no checkpoint); a :data:`SHIPPED` name -> its file;
    anything else is returned as the path it is.

    Raises:
        WeightsError: a shipped name whose file is missing.
    """
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    if str(value) in SHIPPED:
        return shipped_checkpoint_path(str(value))
    return str(value)
