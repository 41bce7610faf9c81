"""The base class of the network segmentation backends: one pipeline, two hooks.

A segmentation backend is a callable ``rgb -> labels``: a ``uint8 (H, W, 3)`` RGB image in, a
``uint8 (H, W)`` map of Cityscapes trainIds (Cordts et al., CVPR 2016; 0..18, 19 =
background/ignore, see :mod:`vpr_localizer.segmentation.classes`) out, at the image's own size.

:class:`SegmentationBackend` is the base of the network backends -- ESPNet
(:mod:`vpr_localizer.segmentation.espnet`; Mehta et al., ECCV 2018), ESPNetv2
(:mod:`vpr_localizer.segmentation.espnetv2`; Mehta et al., CVPR 2019) and Panoptic-DeepLab
(:mod:`vpr_localizer.segmentation.panoptic`; Cheng et al., CVPR 2020) -- and holds what they
share:

* the constructor part: the weight-file path (required), the torch device
  (:func:`vpr_localizer.device.resolve_device`) and the network input size
  (:func:`backend_input_size`);
* ``backend(rgb)``: validate the image (:func:`vpr_localizer.io.image_files.validate_rgb`, the
  one RGB validator of the package: :class:`~vpr_localizer.errors.ImageLoadError`), then under
  ``torch.inference_mode()`` the two hooks ``preprocess`` and ``logits``, the argmax over the
  classes, and the nearest-neighbour resize of the labels back to ``(H, W)``
  (:func:`resize_labels`).

A subclass sets :attr:`~SegmentationBackend.name` and implements the two hooks; helpers for the
usual input steps are :meth:`~SegmentationBackend.resize_input` (PIL bilinear to the network
size) and :meth:`~SegmentationBackend.image_tensor`. The backend ``none`` (no network) is
:class:`vpr_localizer.segmentation.registry.NoSegmentation`.
"""
from __future__ import annotations

import abc
import functools
import os
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from vpr_localizer.device import resolve_device
from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.io.image_files import validate_rgb

#: Network input size ``(width, height)`` in pixels used when none is given: the 1024x512
#: training resolution of the Cityscapes weights of all three networks.
DEFAULT_INPUT_SIZE: Tuple[int, int] = (1024, 512)


def backend_input_size(backend: str, input_size, minimum: int = 16, multiple: int = 1) -> Tuple[int, int]:
    """Validate a segmentation backend's network input ``(width, height)`` in pixels.

    Args:
        backend: backend name, for the message.
        input_size: two integers ``(width, height)``.
        minimum: smallest accepted width and height, pixels.
        multiple: width and height must be multiples of this (1: any size).

    Returns:
        ``(width, height)`` as ints.

    Raises:
        ConfigError: not two integers, smaller than ``minimum`` x ``minimum``, or not multiples
            of ``multiple``.
    """
    try:
        w, h = (int(v) for v in input_size)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{backend} input_size must be (width, height), got {input_size!r}") from exc
    if w < minimum or h < minimum:
        raise ConfigError(f"{backend} input_size must be at least {minimum}x{minimum}, got {w}x{h}")
    if w % multiple or h % multiple:
        raise ConfigError(f"{backend} input_size must be (width, height), multiples of {multiple}, got {w}x{h}")
    return w, h


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` destination pixels, exactly as PIL's NEAREST picks it
    (PIL resizes an index ramp; its coordinate arithmetic is separable per axis)."""
    ramp = np.arange(n_in, dtype=np.int32).reshape(1, n_in)
    idx = np.asarray(Image.fromarray(ramp).resize((n_out, 1), Image.NEAREST), dtype=np.intp)[0].copy()
    idx.setflags(write=False)
    return idx


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D map of any dtype (label maps, panoptic ids).

    The pixel picked for each output pixel is exactly PIL's ``Image.NEAREST`` choice (pixel
    centres mapped, ``floor((i + 0.5) * n_in / n_out)`` up to PIL's floating-point rounding
    where a centre falls on a pixel border), so ``uint8`` labels come out bit-identical to
    ``Image.fromarray(labels).resize((width, height), Image.NEAREST)``. At integer factors
    (e.g. 1024x512 -> 2048x1024) every label is repeated ``factor x factor`` times.

    Args:
        labels: ``(h, w)`` array, ``h, w > 0``.
        height, width: output size in pixels, ``> 0``.

    Returns:
        ``(height, width)`` array of the same dtype (``labels`` itself when the size is already
        right).

    Raises:
        ValueError: not a non-empty 2-D array, or a non-positive output size.
    """
    a = np.asarray(labels)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"labels must be a non-empty 2-D array, got shape {a.shape}")
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {width}x{height}")
    if a.shape == (height, width):
        return a
    rows = _nearest_index(a.shape[0], height)
    cols = _nearest_index(a.shape[1], width)
    return a[rows[:, None], cols[None, :]]


class SegmentationBackend(abc.ABC):
    """Base class of the network segmentation backends (see the module docstring).

    ``backend(rgb)`` takes a ``uint8 (H, W, 3)`` RGB image and returns a ``uint8 (H, W)`` map of
    Cityscapes trainIds (0..18; 19 = background/ignore for the 20-output networks) of the same
    ``H, W``:

    1. :func:`~vpr_localizer.io.image_files.validate_rgb` (``ImageLoadError`` for anything but
       a non-empty ``uint8 (H, W, 3)`` array);
    2. under ``torch.inference_mode()``: ``x = self.preprocess(rgb)`` then
       ``scores = self.logits(x)``, ``float (1, C, h, w)``;
    3. the argmax over the ``C`` classes, as ``uint8``, on the CPU;
    4. :func:`resize_labels` back to ``(H, W)`` (nearest neighbour; skipped when ``(h, w)``
       already is ``(H, W)``).

    A subclass sets :attr:`name` (and optionally :attr:`default_input_size`,
    :attr:`input_multiple`, :attr:`min_input_side`, :attr:`weights_hint`), calls this
    constructor and then loads its network, and implements :meth:`preprocess` and
    :meth:`logits`.

    Args:
        weights: weight-file path (required; the subclass loads it).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        input_size: network input ``(width, height)`` in pixels; ``None``:
            :attr:`default_input_size`.

    Attributes:
        weights_path: ``weights`` as a string.
        device: the ``torch.device`` used.
        input_size: the validated ``(width, height)``.

    Raises:
        WeightsError: ``weights`` is ``None`` or empty (the message names the backend and an
            example file).
        ConfigError: invalid ``input_size`` (:func:`backend_input_size`) or ``device``
            (:func:`~vpr_localizer.device.resolve_device`).
    """

    #: Registry name (``espnet``, ``espnetv2``, ``panoptic_deeplab``).
    name: ClassVar[str] = ""
    #: Network input ``(width, height)`` used when ``input_size`` is ``None``.
    default_input_size: ClassVar[Tuple[int, int]] = DEFAULT_INPUT_SIZE
    #: Network input width and height must be multiples of this (1: any size).
    input_multiple: ClassVar[int] = 1
    #: Smallest network input width and height, pixels.
    min_input_side: ClassVar[int] = 16
    #: What to pass as ``weights``, for the "needs weights=..." message.
    weights_hint: ClassVar[str] = ""

    def __init__(self, weights: str | os.PathLike, device: str = "auto",
                 input_size: Optional[Sequence[int]] = None):
        if weights is None or os.fspath(weights) == "":
            hint = f", e.g. {self.weights_hint}" if self.weights_hint else ""
            raise WeightsError(f"segmentation backend {self.name} needs weights=... (a weight file){hint}")
        self.weights_path: str = os.fspath(weights)
        self.input_size: Tuple[int, int] = backend_input_size(
            self.name, self.default_input_size if input_size is None else input_size,
            minimum=self.min_input_side, multiple=self.input_multiple)
        self.device: torch.device = resolve_device(device)

    # --- the two hooks -------------------------------------------------------------------------

    @abc.abstractmethod
    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Network input of one image.

        Args:
            rgb: ``uint8 (H, W, 3)`` RGB, already validated.

        Returns:
            ``float32 (1, 3, h, w)`` on :attr:`device`, normally at :attr:`input_size`.
        """

    @abc.abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of the preprocessed image.

        Args:
            x: the output of :meth:`preprocess`.

        Returns:
            ``float (1, C, h, w)`` scores (channel ``c`` = trainId ``c``), at any resolution
            (the labels are resized to the image afterwards).
        """

    # --- the shared pipeline -------------------------------------------------------------------

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Segment one image.

        Args:
            rgb: ``uint8 (H, W, 3)`` RGB, ``H, W > 0``.

        Returns:
            ``uint8 (H, W)`` Cityscapes trainIds (argmax of :meth:`logits`).

        Raises:
            ImageLoadError: ``rgb`` is not a non-empty ``uint8 (H, W, 3)`` array.
            ValueError: :meth:`logits` returned something other than ``(1, C, h, w)``,
                ``1 <= C <= 256`` (a bug in the subclass).
        """
        validate_rgb(rgb)
        with torch.inference_mode():
            scores = self.logits(self.preprocess(rgb))
            if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or scores.shape[0] != 1 \
                    or not 1 <= scores.shape[1] <= 256:
                raise ValueError(f"{type(self).__name__}.logits must return a (1, C, h, w) tensor with "
                                 f"1 <= C <= 256, got {tuple(getattr(scores, 'shape', ())) or type(scores).__name__}")
            labels = scores[0].argmax(0).to(torch.uint8).cpu().numpy()
        return resize_labels(labels, rgb.shape[0], rgb.shape[1])

    # --- helpers for subclasses ----------------------------------------------------------------

    def resize_input(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 (H, W, 3)`` -> ``uint8 (h, w, 3)`` at :attr:`input_size`, C-contiguous and
        writable: PIL's bilinear resize of the ``uint8`` image (anti-aliased when reducing,
        rounded to ``uint8``), or the image itself (copied only if needed) when it already has
        that size. The aspect ratio is not preserved."""
        w, h = self.input_size
        if rgb.shape[:2] != (h, w):
            return np.array(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.BILINEAR))
        if rgb.flags.c_contiguous and rgb.flags.writeable:
            return rgb
        return np.array(rgb)  # torch wants a writable, contiguous buffer

    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """``uint8 (h, w, 3)`` C-contiguous -> ``float32 (1, 3, h, w)`` on :attr:`device`,
        values 0..255, channels in the array's order (no normalisation)."""
        return torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).unsqueeze(0).float()

    def _repr_options(self) -> Dict[str, object]:
        """Extra constructor options shown by ``repr`` (subclasses add theirs)."""
        return {}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self._repr_options().items())
        return (f"{type(self).__name__}(weights={self.weights_path!r}, device={str(self.device)!r}, "
                f"input_size={self.input_size}{opts})")
