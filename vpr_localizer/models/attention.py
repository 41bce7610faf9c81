"""Spatial attention on backbone features (the seed method: segmentation +
attention on Patch-NetVLAD; README, "The seed method").

Source: the seed paper's attention module, "kept tiny for real time: average pooling, then 2x2
max pooling, then a 3x3 convolution, then a sigmoid; the resulting spatial weight map multiplies
the VGG16 feature map before aggregation. One attention map is computed for the image stream
and one for the segmentation stream."

What this module computes (:class:`SpatialAttention`), for features ``x`` of shape
``(B, C, H, W)``:

1. **channel-wise average pooling**: ``a = mean_c x[:, c]`` -> ``(B, 1, H, W)``;
2. **2x2 max pooling**, stride 2, ``ceil_mode=True`` -> ``(B, 1, ceil(H/2), ceil(W/2))``;
3. **3x3 convolution**, 1 -> 1 channel, zero padding 1, with bias;
4. **sigmoid** -> values in (0, 1);
5. **bilinear upsampling** back to ``(H, W)`` (``align_corners=False``), so that the map can
   multiply the feature map it was computed from ("resized to the feature map").

Decisions and why:

* *Average pooling is over channels, not over space.* The description gives a window only for
  the max pooling (2x2); an average pooling over space without a window is a global pooling,
  which leaves no spatial map to "multiply the feature map" with. Averaging over the channel
  axis is the standard way to get a spatial attention map (CBAM's spatial branch, Woo et al.
  ECCV 2018, pools over channels the same way), keeps the module at 10 parameters, and works
  unchanged for both streams whatever their channel count (the image stream's 512 VGG16
  channels or a segmentation stream's features). The rejected alternative -- a small spatial
  average pooling keeping C channels followed by a 3x3 ``C -> 1`` convolution -- would need an
  average-pooling window the description does not give and 4,609 parameters for C = 512.
  Consequence, to keep in mind when reading results: the map is a learned, smoothed function of
  the *mean activation strength* only (a 3x3 filter plus bias on the pooled channel mean); it
  cannot select particular channels. This is consistent with the seed's finding that the
  attention module added one correct query out of 110.
* *ceil_mode max pooling* so that odd feature-map sizes keep their last row/column.
* *Near-neutral initialisation*: convolution weights are **zero** and the bias is
  ``init_bias`` (default 3.0), so the untrained map is the constant ``sigmoid(3) = 0.9526``
  everywhere. A constant map is exactly neutral for every aggregator of
  :mod:`vpr_localizer.models.aggregation` (NetVLAD, GeM and GAP weighted by a constant, or fed
  features scaled by a constant, give the same L2-normalised descriptor), and
  ``features * 0.95`` is within 5% of the features for any other consumer. Zero weights do not
  block learning: the gradient with respect to a weight is the sum over locations of the
  upstream gradient times ``sigmoid'`` (0.045 at the initial bias) times the pooled input,
  non-zero whenever the input is not zero.

How to apply the map with NetVLAD: :class:`~vpr_localizer.models.aggregation.NetVLAD` with
``normalize_input=True`` (the default, as in NetVLAD and Patch-NetVLAD) L2-normalises each local
feature first, which cancels any positive per-location scale. Multiplying the features by the
map (:meth:`SpatialAttention.apply`, the literal reading of the seed) therefore has **no
effect** on a NetVLAD descriptor. Pass the map as the aggregator's ``weights`` argument
instead (it multiplies the soft assignment): ``netvlad(features, weights=attention(features))``.
For GeM, multiplying the features and weighting are different (both valid) operations.

One module per stream: build one :class:`SpatialAttention` for the image stream and one for
the segmentation stream; they share nothing.

:func:`weights_to_feature_map` brings a per-pixel static-structure weight
(:func:`vpr_localizer.segmentation.classes.static_weight`) to the feature-map grid so that it can be used
as the same kind of ``(B, 1, H, W)`` weight.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Default initial convolution bias: untrained map = sigmoid(3.0) = 0.9526 everywhere.
DEFAULT_INIT_BIAS = 3.0


class SpatialAttention(nn.Module):
    """Tiny spatial attention: channel mean -> 2x2 max pool -> 3x3 conv -> sigmoid -> upsample.

    See the module docstring for the exact computation, the reasons behind each choice and how
    to combine the map with NetVLAD.

    Args:
        init_bias: initial convolution bias (weights start at zero), so the untrained map is the
            constant ``sigmoid(init_bias)``. Must be finite.

    Parameters: ``conv.weight`` ``(1, 1, 3, 3)`` and ``conv.bias`` ``(1,)``: 10 in total
    (:attr:`num_parameters`), independent of the channel count.

    Shapes: ``forward(features (B, C, H, W) float) -> (B, 1, H, W)`` same dtype and device,
    values in (0, 1) (in float32 the sigmoid rounds to exactly 1.0 for logits above ~17, and
    underflows towards 0 below ~-88; the map never leaves [0, 1]).
    """

    def __init__(self, init_bias: float = DEFAULT_INIT_BIAS):
        super().__init__()
        if not np.isfinite(init_bias):
            raise ValueError(f"init_bias must be finite, got {init_bias}")
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=True)
        self.reset_parameters(init_bias)

    @torch.no_grad()
    def reset_parameters(self, init_bias: float = DEFAULT_INIT_BIAS) -> None:
        """Zero convolution weights, bias ``init_bias`` (near-neutral constant map)."""
        self.conv.weight.zero_()
        self.conv.bias.fill_(float(init_bias))

    @property
    def num_parameters(self) -> int:
        """Number of learnable parameters (10)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Attention map of a feature batch.

        Args:
            features: ``(B, C, H, W)`` floating-point backbone features, H, W >= 1.

        Returns:
            ``(B, 1, H, W)`` weights in (0, 1) (see the class docstring on float32 saturation),
            same dtype/device as ``features``.

        Raises:
            ValueError: not a 4-D floating-point tensor, or an empty spatial/channel axis.
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 4 \
                or not features.is_floating_point():
            raise ValueError("features must be a floating-point tensor of shape (B, C, H, W), got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        b, c, h, w = features.shape
        if c < 1 or h < 1 or w < 1:
            raise ValueError(f"features must have C, H, W >= 1, got {tuple(features.shape)}")
        a = features.mean(dim=1, keepdim=True)                                   # (B, 1, H, W)
        a = F.max_pool2d(a, kernel_size=2, stride=2, ceil_mode=True)              # (B, 1, H', W')
        a = torch.sigmoid(self.conv(a))                                          # (B, 1, H', W')
        return F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)

    def apply(self, features_or_fn: Union[torch.Tensor, Callable[[nn.Module], None]]
              ) -> Union[Tuple[torch.Tensor, torch.Tensor], "SpatialAttention"]:
        """Weight the features by their attention map.

        Args:
            features_or_fn: ``(B, C, H, W)`` features. (A callable is passed on to
                :meth:`torch.nn.Module.apply`, so that ``parent.apply(init_fn)`` on a model
                containing this module keeps working; this method shadows that name.)

        Returns:
            ``(features * weight, weight)``: ``(B, C, H, W)`` weighted features and the
            ``(B, 1, H, W)`` map. (``self`` when given a callable.)

        Note: NetVLAD with input normalisation is invariant to this weighting; pass ``weight``
        as its ``weights`` argument instead (module docstring).
        """
        if callable(features_or_fn) and not isinstance(features_or_fn, torch.Tensor):
            return super().apply(features_or_fn)
        weight = self.forward(features_or_fn)
        return features_or_fn * weight, weight


def weights_to_feature_map(weight_map: Union[np.ndarray, torch.Tensor], size: Sequence[int],
                           device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Resize a per-pixel weight map to the feature-map grid by area averaging.

    Each feature location gets the mean weight of the image pixels it covers
    (:func:`torch.nn.functional.adaptive_avg_pool2d`). When the input size is a multiple of the
    output size this is exactly the block mean (e.g. 480x640 -> 30x40: mean of each 16x16
    block); otherwise adjacent windows overlap by one pixel (window of output cell i spans
    input rows ``floor(i*h/H) .. ceil((i+1)*h/H) - 1``), the usual adaptive-pooling rule.
    Averaging (rather than nearest-neighbour sampling) keeps the fraction of static structure
    under each location, so a cell half covered by a car gets weight 0.5.

    Args:
        weight_map: per-pixel weights, non-negative and finite: a numpy ``(h, w)`` array (e.g.
            :func:`vpr_localizer.segmentation.classes.static_weight` output, float32), or a numpy/torch
            ``(B, 1, h, w)`` array/tensor.
        size: output ``(H, W)`` -- rows, columns (torch order, as the feature map's
            ``shape[-2:]``), each >= 1.
        device: device of the result; None keeps a tensor's device (CPU for numpy input).

    Returns:
        ``float32`` ``(B, 1, H, W)`` tensor (B = 1 for a 2-D input).

    Raises:
        ValueError: bad shape or size, negative or non-finite weights.
    """
    if isinstance(weight_map, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(weight_map, dtype=np.float32))
    elif isinstance(weight_map, torch.Tensor):
        t = weight_map.float()
    else:
        raise ValueError(f"weight_map must be a numpy array or torch tensor, got {type(weight_map).__name__}")
    if t.dim() == 2:
        t = t[None, None]
    if t.dim() != 4 or t.shape[1] != 1 or min(t.shape[-2:]) < 1:
        raise ValueError(f"weight_map must have shape (h, w) or (B, 1, h, w), got {tuple(weight_map.shape)}")
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (H, W) with H, W >= 1, got {size}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError("weight_map must be finite and non-negative")
    if device is not None:
        t = t.to(device)
    return F.adaptive_avg_pool2d(t, (int(size[0]), int(size[1])))
