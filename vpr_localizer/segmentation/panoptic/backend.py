"""Segmentation backend ``panoptic_deeplab``: Panoptic-DeepLab (Cheng et al., CVPR 2020) on top of
:class:`~vpr_localizer.segmentation.base.SegmentationBackend`, with the panoptic map as an extra.

**Accuracy unverified**: no Panoptic-DeepLab weights exist in this environment (see
:mod:`vpr_localizer.segmentation.panoptic`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from vpr_localizer.io.image_files import validate_rgb
from vpr_localizer.segmentation.base import SegmentationBackend, resize_labels
from vpr_localizer.segmentation.panoptic.checkpoint import load_panoptic_deeplab
from vpr_localizer.segmentation.panoptic.postprocess import (CITYSCAPES_THING_IDS, LABEL_DIVISOR,
                                                             panoptic_segmentation)

#: Default network input size ``(width, height)`` of the backend (the 1024x512 training crop).
DEFAULT_INPUT_SIZE: Tuple[int, int] = (1024, 512)


class PanopticDeepLabBackend(SegmentationBackend):
    """Segmentation backend ``panoptic_deeplab``, a
    :class:`~vpr_localizer.segmentation.base.SegmentationBackend`. **Accuracy unverified** (no
    weights in this environment).

    ``backend(rgb)``: ``uint8 (H, W, 3)`` RGB -> ``uint8 (H, W)`` Cityscapes trainIds 0..18 from
    the semantic head (this network has no background class, so 19 never occurs). Steps:
    resize to ``input_size`` with PIL bilinear (skipped when already that size;
    :meth:`preprocess`), the network, which normalises itself (:meth:`logits`), then the base
    class's argmax and nearest-neighbour resize back to ``(H, W)``, under
    ``torch.inference_mode``.

    ``backend.panoptic(rgb)``: the panoptic map (see :meth:`panoptic`);
    ``backend.segment_panoptic(rgb)``: both from one network pass.

    Args:
        weights: detectron2 Panoptic-DeepLab Cityscapes checkpoint (``.pkl`` or ``.pth``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        input_size: network input ``(width, height)``, at least 16x16 (any size: the network
            pads to a multiple of 16); default 1024x512 (the training crop).

    Attributes:
        model: the :class:`~vpr_localizer.segmentation.panoptic.model.PanopticDeepLab`, eval
            mode, on ``device``.
        weights_path, device, input_size: see the base class.

    Raises:
        WeightsError: no weight file, or see
            :func:`~vpr_localizer.segmentation.panoptic.checkpoint.load_panoptic_deeplab`.
        ConfigError: invalid ``input_size`` or ``device``.
        ImageLoadError: at call time, an image that is not a non-empty ``uint8 (H, W, 3)`` array.
    """

    name = "panoptic_deeplab"
    default_input_size = DEFAULT_INPUT_SIZE
    weights_hint = ("a detectron2 Panoptic-DeepLab Cityscapes checkpoint such as model_final_380d9c.pkl; "
                    "none ships with this project")

    def __init__(self, weights: str | os.PathLike, device: str = "auto",
                 input_size: Optional[Sequence[int]] = None):
        super().__init__(weights, device=device, input_size=input_size)
        self.model = load_panoptic_deeplab(self.weights_path, self.device)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """``uint8 (H, W, 3)`` RGB -> ``float32 (1, 3, h, w)`` RGB in [0, 255] at ``input_size``
        (the network normalises)."""
        return self.image_tensor(self.resize_input(rgb))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 (1, 3, h, w)`` from :meth:`preprocess` -> ``float32 (1, 19, h, w)`` semantic
        logits (the ``sem_logits`` output)."""
        return self.model(x)["sem_logits"]

    def outputs(self, rgb: np.ndarray) -> Dict[str, torch.Tensor]:
        """Raw network outputs at ``input_size``, batch 1, under ``torch.inference_mode``:
        ``sem_logits`` ``float32 (1, 19, h, w)``, ``center`` ``(1, 1, h, w)``, ``offset``
        ``(1, 2, h, w)`` (``(dy, dx)`` in pixels of ``input_size``).

        Raises:
            ImageLoadError: ``rgb`` is not a non-empty ``uint8 (H, W, 3)`` array.
        """
        validate_rgb(rgb)
        with torch.inference_mode():
            return self.model(self.preprocess(rgb))

    def panoptic(self, rgb: np.ndarray, *, threshold: float = 0.1, nms_kernel: int = 7, top_k: int = 200,
                 stuff_area: int = 2048, label_divisor: int = LABEL_DIVISOR, void_label: int = -1) -> np.ndarray:
        """``uint8 (H, W, 3)`` RGB -> ``int64 (H, W)`` panoptic ids ``trainId * label_divisor +
        instance`` (stuff: instance 0; things 11..18: instances from 1; ``void_label`` where
        unassigned). See :meth:`segment_panoptic` (this is its second result).

        Raises:
            ImageLoadError: ``rgb`` is not a non-empty ``uint8 (H, W, 3)`` array.
        """
        return self.segment_panoptic(rgb, threshold=threshold, nms_kernel=nms_kernel, top_k=top_k,
                                     stuff_area=stuff_area, label_divisor=label_divisor, void_label=void_label)[1]

    def segment_panoptic(self, rgb: np.ndarray, *, threshold: float = 0.1, nms_kernel: int = 7, top_k: int = 200,
                         stuff_area: int = 2048, label_divisor: int = LABEL_DIVISOR,
                         void_label: int = -1) -> Tuple[np.ndarray, np.ndarray]:
        """One network pass -> ``(labels, panoptic)``: the ``uint8 (H, W)`` trainIds of
        ``backend(rgb)`` and the ``int64 (H, W)`` panoptic map of :meth:`panoptic`.

        Post-processing (:func:`~vpr_localizer.segmentation.panoptic.postprocess.panoptic_segmentation`,
        defaults of the Cityscapes config) runs at ``input_size``, then both maps are resized
        back to ``(H, W)`` with the same nearest-neighbour rule as ``backend(rgb)``
        (:func:`~vpr_localizer.segmentation.base.resize_labels`). ``stuff_area`` is in pixels
        of the *input image* and scaled to ``input_size`` (the reference applies 2048 at
        1024x2048); ``threshold``, ``nms_kernel`` and ``top_k`` act at ``input_size``.

        Raises:
            ImageLoadError: ``rgb`` is not a non-empty ``uint8 (H, W, 3)`` array.
        """
        out = self.outputs(rgb)
        w, h = self.input_size
        scale = (w * h) / float(rgb.shape[0] * rgb.shape[1])
        with torch.inference_mode():
            sem = out["sem_logits"][0].argmax(0, keepdim=True)
            pan, _ = panoptic_segmentation(
                sem, out["center"][0], out["offset"][0], thing_ids=CITYSCAPES_THING_IDS,
                label_divisor=label_divisor, stuff_area=int(round(stuff_area * scale)), void_label=void_label,
                threshold=threshold, nms_kernel=nms_kernel, top_k=top_k)
        H, W = rgb.shape[:2]
        labels = resize_labels(sem[0].to(torch.uint8).cpu().numpy(), H, W)
        return labels, resize_labels(pan[0].cpu().numpy(), H, W)
