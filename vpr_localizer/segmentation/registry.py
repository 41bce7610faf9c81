"""Segmentation backends by name: ``none``, ``espnetv2``, ``espnet``, ``panoptic_deeplab``.

:func:`make_backend` builds a backend -- a callable ``uint8 (H, W, 3)`` RGB -> ``uint8 (H, W)``
Cityscapes trainIds (Cordts et al., CVPR 2016; see :mod:`vpr_localizer.segmentation.classes`)
with a ``name`` attribute -- from its registry name and keyword options:

* ``none`` (:class:`NoSegmentation`): **no segmentation**; every pixel is 19 (ignore), which
  through :func:`~vpr_localizer.segmentation.classes.static_weight` (ignore weight 1.0) means
  "weight every pixel equally", i.e. the plain, segmentation-free pipeline.
* ``espnetv2`` (:class:`~vpr_localizer.segmentation.espnetv2.ESPNetv2Backend`; Mehta et al.,
  CVPR 2019) and ``espnet`` (:class:`~vpr_localizer.segmentation.espnet.ESPNetBackend`; Mehta
  et al., ECCV 2018): our own implementations loading the authors' Cityscapes weights; they
  reproduce the authors' reference label maps pixel for pixel.
* ``panoptic_deeplab``
  (:class:`~vpr_localizer.segmentation.panoptic.backend.PanopticDeepLabBackend`; Cheng et al.,
  CVPR 2020): loads the official detectron2 Cityscapes checkpoint layout, but no such weights
  were ever available here: its accuracy is unverified.

The network backends are :class:`~vpr_localizer.segmentation.base.SegmentationBackend`
subclasses. Their modules (and torch) are imported only inside the factories, so importing
this module -- and using ``none`` -- needs neither torch nor the networks.

Options are checked: a keyword the backend's factory does not take raises
:class:`~vpr_localizer.errors.ConfigError` naming it and the accepted ones, instead of being
silently dropped.
"""
from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.io.image_files import validate_rgb
from vpr_localizer.segmentation.classes import IGNORE_ID

if TYPE_CHECKING:  # the network backends import torch: only for annotations here
    from vpr_localizer.segmentation.base import SegmentationBackend

#: What :func:`make_backend` returns: a :class:`NoSegmentation` or a network backend (or
#: whatever a :func:`register_backend` factory returns: a callable ``rgb -> labels`` with ``name``).
Backend = Union["NoSegmentation", "SegmentationBackend"]


class NoSegmentation:
    """Backend ``none``: no segmentation at all; every pixel is labelled 19 (ignore).

    It exists so the node graph (and its topic interface) runs without a segmentation network.
    Its labels carry no information; with
    :func:`~vpr_localizer.segmentation.classes.static_weight` they give uniform weights, i.e.
    the plain pipeline.

    Attributes:
        name: ``"none"``.
    """

    name = "none"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 (H, W, 3)`` RGB -> ``uint8 (H, W)`` filled with 19 (ignore).

        Raises:
            ImageLoadError: ``rgb`` is not a non-empty ``uint8 (H, W, 3)`` array (the same
                check as every network backend:
                :func:`~vpr_localizer.io.image_files.validate_rgb`).
        """
        validate_rgb(rgb)
        return np.full(rgb.shape[:2], IGNORE_ID, dtype=np.uint8)

    def __repr__(self) -> str:
        return "NoSegmentation()"


# --- factories: keyword options = the backend's options (checked by make_backend) -------------

def _make_none(weights: Optional[str] = None, device: str = "auto",
               input_size: Optional[Sequence[int]] = None) -> NoSegmentation:
    """Backend ``none``. It takes the options every backend takes (``weights``, ``device``,
    ``input_size``) so that a configuration can switch backends by name alone, and ignores them."""
    return NoSegmentation()


def _make_espnetv2(weights: Optional[str | os.PathLike] = None, device: str = "auto",
                   input_size: Optional[Sequence[int]] = None) -> "SegmentationBackend":
    """Backend ``espnetv2``: ESPNetv2 s = 2.0 Cityscapes (Mehta et al., CVPR 2019); ``weights`` e.g.
    ``espnetv2_s_2.0_city_1024x512.pth``; ``input_size`` default 1024x512."""
    from vpr_localizer.segmentation.espnetv2 import ESPNetv2Backend  # lazy: torch

    return ESPNetv2Backend(weights, device=device, input_size=input_size)


def _make_espnet(weights: Optional[str | os.PathLike] = None, device: str = "auto",
                 input_size: Optional[Sequence[int]] = None, decoder: bool = True,
                 resize: str = "pil") -> "SegmentationBackend":
    """Backend ``espnet``: ESPNet p = 2, q = 8 Cityscapes (Mehta et al., ECCV 2018); ``weights`` e.g.
    ``espnet_p2_q8_city_decoder.pth`` (or ``..._encoder.pth`` with ``decoder=False``);
    ``input_size`` default 1024x512, multiples of 8; ``resize`` ``pil`` or ``cv2``."""
    from vpr_localizer.segmentation.espnet import ESPNetBackend  # lazy: torch

    return ESPNetBackend(weights, device=device, input_size=input_size, decoder=decoder, resize=resize)


def _make_panoptic_deeplab(weights: Optional[str | os.PathLike] = None, device: str = "auto",
                           input_size: Optional[Sequence[int]] = None) -> "SegmentationBackend":
    """Backend ``panoptic_deeplab``: Panoptic-DeepLab R-52 Cityscapes (Cheng et al., CVPR 2020);
    ``weights`` a detectron2 checkpoint (none ships with the project; accuracy unverified);
    ``input_size`` default 1024x512."""
    from vpr_localizer.segmentation.panoptic.backend import PanopticDeepLabBackend  # lazy: torch

    return PanopticDeepLabBackend(weights, device=device, input_size=input_size)


_REGISTRY: Dict[str, Callable[..., Backend]] = {
    "none": _make_none,
    "espnetv2": _make_espnetv2,
    "espnet": _make_espnet,
    "panoptic_deeplab": _make_panoptic_deeplab,
}


def _key(name: str) -> str:
    return str(name).strip().lower()


def backend_names() -> Tuple[str, ...]:
    """Every registered backend name, in registration order."""
    return tuple(_REGISTRY)


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    """Register (or replace) a backend factory.

    Args:
        name: registry name (stripped, case-insensitive).
        factory: ``factory(**options) -> backend``, a callable ``uint8 (H, W, 3)`` RGB ->
            ``uint8 (H, W)`` trainIds with a ``name`` attribute (normally a
            :class:`~vpr_localizer.segmentation.base.SegmentationBackend`). Its keyword
            parameters are the accepted options (:func:`make_backend` rejects any other); a
            factory with ``**kwargs`` checks its options itself.
    """
    _REGISTRY[_key(name)] = factory


def backend_options(name: str) -> Optional[Tuple[str, ...]]:
    """The keyword options backend ``name`` accepts (``None``: the factory takes ``**kwargs``).

    Raises:
        WeightsError: unknown name (the message lists the known ones).
    """
    factory = _factory(name)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature (some builtins)
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def _factory(name: str) -> Callable[..., Backend]:
    key = _key(name)
    if key not in _REGISTRY:
        raise WeightsError(f"unknown segmentation backend {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def make_backend(name: str, **kwargs) -> Backend:
    """Build a segmentation backend by name.

    Args:
        name: ``none`` (no segmentation: every pixel ignore), ``espnetv2``, ``espnet`` or
            ``panoptic_deeplab`` (stripped, case-insensitive), or a name added with
            :func:`register_backend`.
        **kwargs: backend options. Every built-in backend takes ``weights`` (path; required
            by the network backends), ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)
            and ``input_size`` (network ``(width, height)`` in pixels; ``None``: the
            backend's default); ``espnet`` also ``decoder`` and ``resize``. ``none`` accepts
            and ignores the common three.

    Returns:
        The backend: ``backend(rgb)`` maps ``uint8 (H, W, 3)`` RGB to ``uint8 (H, W)`` trainIds
        and raises :class:`~vpr_localizer.errors.ImageLoadError` for an invalid image.

    Raises:
        WeightsError: unknown name (the message lists the known ones), a network backend
            without ``weights``, or weights that are missing or do not fit (the message names
            the backend or the file).
        ConfigError: an option the backend does not take (the message names it and the
            accepted ones), or an invalid option value (``input_size``, ``device``,
            ``resize``).
    """
    factory = _factory(name)
    accepted = backend_options(name)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(f"segmentation backend {_key(name)!r}: unknown option(s) "
                              f"{', '.join(repr(k) for k in unknown)}; accepted: {', '.join(accepted)}")
    return factory(**kwargs)
