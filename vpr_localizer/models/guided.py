"""Segmentation-guided, attention-weighted NetVLAD: the seed method (segmentation +
attention on Patch-NetVLAD, Hausler et al., CVPR 2021; README, "The seed method").

Three additions on top of plain NetVLAD, each switchable (the ablation rows of the README):

1. **Static mask** (seed 002's class simplification): a per-pixel static-structure weight from
   the segmentation labels (:func:`vpr_localizer.segmentation.classes.static_weight`: static 1, dynamic
   objects 0, sky 0, unlabelled 1), area-averaged onto the feature grid
   (:func:`vpr_localizer.models.attention.weights_to_feature_map`), down-weights the local features of
   cars, people and sky in NetVLAD aggregation.
2. **Segmentation stream** (the seed's second stream): the colour-coded segmentation image
   (:func:`vpr_localizer.segmentation.classes.colorize`, Cityscapes palette) goes through the *same*
   backbone; its local features are aggregated by a second NetVLAD layer with its own
   centroids.
3. **Attention** (the seed's attention module, :class:`~vpr_localizer.models.attention.SpatialAttention`):
   one module per stream, its spatial map weights that stream's local features.

How the weights enter NetVLAD: every weight map ``(B, 1, h, w)`` (static mask, attention map,
or their product) is passed as NetVLAD's per-location ``weights`` (it scales the soft
assignment ``a_k(x_i)`` of Arandjelovic et al., CVPR 2016, Eq. 4). Multiplying the features by
the map instead -- the literal reading of the seed -- would be cancelled by NetVLAD's
per-feature L2 normalisation (see :mod:`vpr_localizer.models.attention`).

Fusion of the two streams: **concatenation before PCA**, each stream's NetVLAD vector
L2-normalised and the concatenation scaled by ``1/sqrt(2)`` (unit norm). Why not a sum: the
two streams see very different inputs (photographs vs flat palette colours), so each gets its
own k-means vocabulary; block k of the image-stream vector is a residual to image centroid k,
block k of the segmentation-stream vector a residual to an unrelated segmentation centroid k,
and summing them would add residuals to unrelated anchors. With concatenation the cosine
similarity of two fused descriptors is exactly the mean of the two streams' similarities (a
score-level sum, equal weights), and the map's PCA whitening, fitted on the fused vectors,
learns the streams' correlations and relative scale. Cost: the raw dimension doubles
(2 * K * D), which PCA brings back to ``pca_dim``.

A frame whose static mask is (almost) empty -- all sky/cars -- falls back to uniform weights
rather than producing an all-zero descriptor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from vpr_localizer.models.aggregation import NetVLAD
from vpr_localizer.models.attention import SpatialAttention, weights_to_feature_map
from vpr_localizer.segmentation.classes import static_weight

#: A static mask covering less than this fraction of the feature grid is replaced by uniform weights.
MIN_STATIC_FRACTION = 0.02


@dataclass
class StreamFeatures:
    """Backbone features of one batch, per stream.

    Attributes:
        image: ``(B, C, h, w)`` float32 features of the camera images.
        seg: ``(B, C, h, w)`` float32 features of the colour-coded segmentation images, or None.
        static: ``(B, 1, h, w)`` float32 static-structure weights in [0, 1] on the feature grid,
            or None.
    """

    image: torch.Tensor
    seg: Optional[torch.Tensor] = None
    static: Optional[torch.Tensor] = None

    def to(self, device) -> "StreamFeatures":
        """Same features on ``device`` (float32)."""
        mv = lambda t: None if t is None else t.to(device=device, dtype=torch.float32)  # noqa: E731
        return StreamFeatures(mv(self.image), mv(self.seg), mv(self.static))

    def __getitem__(self, idx) -> "StreamFeatures":
        """Batch slice/indexing (``idx`` a slice or a LongTensor of batch indices)."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return StreamFeatures(pick(self.image), pick(self.seg), pick(self.static))


def static_feature_weights(labels: np.ndarray, size_hw: Tuple[int, int], device=None) -> torch.Tensor:
    """Static-structure weights of a label batch on the feature grid.

    Args:
        labels: ``uint8 (B, H, W)`` Cityscapes trainIds (19/255 = ignore).
        size_hw: feature-map ``(h, w)``.
        device: device of the result.

    Returns:
        ``float32 (B, 1, h, w)``: per location the mean :func:`~vpr_localizer.segmentation.classes.static_weight`
        of the pixels it covers; a frame whose mask sums to less than ``MIN_STATIC_FRACTION`` of
        its locations gets uniform weights 1 (so it still has a descriptor).

    Raises:
        ValueError: not a 3-D integer label batch.
    """
    if not isinstance(labels, np.ndarray) or labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer (B, H, W) array, got {getattr(labels, 'shape', labels)}")
    pixel = np.stack([static_weight(lab) for lab in labels])[:, None]               # (B, 1, H, W)
    grid = weights_to_feature_map(pixel, size_hw, device=device)                    # (B, 1, h, w)
    h, w = grid.shape[-2:]
    empty = grid.sum(dim=(1, 2, 3)) < MIN_STATIC_FRACTION * h * w
    if bool(empty.any()):
        grid[empty] = 1.0
    return grid


def _combine(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a * b


class GuidedNetVLAD(nn.Module):
    """NetVLAD over an image stream and an optional segmentation stream, with optional static
    mask and per-stream attention (module docstring for the method and its sources).

    Args:
        num_clusters: K of each stream's NetVLAD.
        dim: local feature dimension D (the backbone's channels).
        seg_stream: add the segmentation stream (second NetVLAD, concatenated).
        attention: one :class:`SpatialAttention` per stream.
        static_mask: weight both streams by the static-structure mask.

    Shapes: ``forward(StreamFeatures) -> (B, out_dim)`` float32, L2-normalised;
    ``out_dim = K * D`` (image stream only) or ``2 * K * D`` (with the segmentation stream).

    Raises (forward):
        ValueError: a stream or mask that the configuration needs is missing, or shapes differ.
    """

    def __init__(self, num_clusters: int, dim: int, seg_stream: bool = False, attention: bool = False,
                 static_mask: bool = False):
        super().__init__()
        self.seg_stream, self.use_attention, self.static_mask = bool(seg_stream), bool(attention), bool(static_mask)
        self.image_vlad = NetVLAD(num_clusters, dim)
        self.seg_vlad = NetVLAD(num_clusters, dim) if seg_stream else None
        self.image_attention = SpatialAttention() if attention else None
        self.seg_attention = SpatialAttention() if attention and seg_stream else None

    @property
    def out_dim(self) -> int:
        """Raw descriptor dimension (before PCA)."""
        return self.image_vlad.out_dim * (2 if self.seg_stream else 1)

    @property
    def alpha(self) -> float:
        """The image stream's NetVLAD alpha (for checkpoints)."""
        return self.image_vlad.alpha

    def kmeans_targets(self) -> List[Tuple[str, NetVLAD]]:
        """The NetVLAD layers to initialise by k-means: ``image`` and, with the segmentation
        stream, ``segmentation`` (its own vocabulary)."""
        return [("image", self.image_vlad)] + ([("segmentation", self.seg_vlad)] if self.seg_vlad is not None else [])

    def extra_state(self) -> Dict[str, float]:
        """Checkpoint numbers beside the state dict: ``alpha`` (image stream), ``seg_alpha``."""
        out = {"alpha": float(self.image_vlad.alpha)}
        if self.seg_vlad is not None:
            out["seg_alpha"] = float(self.seg_vlad.alpha)
        return out

    def load_extra_state(self, extra: Dict[str, float]) -> None:
        """Inverse of :meth:`extra_state`; a checkpoint without ``seg_alpha`` gives the segmentation
        stream the image stream's ``alpha``."""
        self.image_vlad.alpha = float(extra.get("alpha", self.image_vlad.alpha))
        if self.seg_vlad is not None:
            self.seg_vlad.alpha = float(extra.get("seg_alpha", extra.get("alpha", self.seg_vlad.alpha)))

    def weight_maps(self, feats: StreamFeatures) -> Dict[str, Optional[torch.Tensor]]:
        """Per-stream NetVLAD weights ``(B, 1, h, w)`` (static mask x attention), None = uniform.

        Returns:
            ``{"image": ..., "seg": ...}`` (``seg`` None without the segmentation stream).
        """
        if self.static_mask and feats.static is None:
            raise ValueError("GuidedNetVLAD with static_mask needs StreamFeatures.static (labels)")
        if self.seg_stream and feats.seg is None:
            raise ValueError("GuidedNetVLAD with seg_stream needs StreamFeatures.seg (labels)")
        static = feats.static if self.static_mask else None
        out = {"image": _combine(static, self.image_attention(feats.image) if self.image_attention else None),
               "seg": None}
        if self.seg_stream:
            out["seg"] = _combine(static, self.seg_attention(feats.seg) if self.seg_attention else None)
        return out

    def forward(self, feats: StreamFeatures) -> torch.Tensor:
        """Fused, L2-normalised descriptors ``(B, out_dim)``."""
        maps = self.weight_maps(feats)
        v = self.image_vlad(feats.image, maps["image"])
        if not self.seg_stream:
            return v
        return torch.cat([v, self.seg_vlad(feats.seg, maps["seg"])], dim=1) / math.sqrt(2.0)


def resize_labels(labels: Sequence[np.ndarray], size_wh: Tuple[int, int]) -> np.ndarray:
    """Label maps of any size -> ``uint8 (B, H, W)`` at ``size_wh`` = (width, height) pixels,
    nearest neighbour (e.g. ``segmentation/labels`` at camera resolution to the network input).

    Args:
        labels: ``(H_i, W_i)`` integer Cityscapes trainIds, one per image.

    Raises:
        ValueError: a label map that is not a non-empty 2-D integer array.
    """
    from PIL import Image as PILImage

    w, h = int(size_wh[0]), int(size_wh[1])
    out = np.empty((len(labels), h, w), np.uint8)
    for i, lab in enumerate(labels):
        lab = np.asarray(lab)
        if lab.ndim != 2 or lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be non-empty 2-D integer trainId maps, got {lab.dtype} {lab.shape}")
        lab = np.clip(lab, 0, 255).astype(np.uint8)
        out[i] = lab if lab.shape == (h, w) else np.asarray(
            PILImage.fromarray(lab).resize((w, h), PILImage.NEAREST))
    return out
