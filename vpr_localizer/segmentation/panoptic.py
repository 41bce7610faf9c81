"""Panoptic-DeepLab (Cityscapes, 19 classes): model, strict checkpoint loader, post-processing and
a segmentation backend, written for this project.

.. warning::
   **No Panoptic-DeepLab weights exist in this environment, so the accuracy of this backend is
   unverified.** What is tested (``test/test_panoptic.py``) is only: the output shapes of the
   network on random weights, that its ``state_dict`` round-trips through the strict loader,
   that bad checkpoints are refused, and the post-processing on hand-built tensors with known
   answers. Whether a released checkpoint loads (its key names and shapes are reconstructed
   from the reference *source code*, never checked against a real file) and whether our
   forward pass reproduces the reference label maps is not known until such a file is tried.

Paper: B. Cheng, M. D. Collins, Y. Zhu, T. Liu, T. S. Huang, H. Adam, L.-C. Chen,
"Panoptic-DeepLab: A Simple, Strong, and Fast Baseline for Bottom-Up Panoptic Segmentation",
CVPR 2020. The module and tensor names follow detectron2's re-implementation
(``projects/Panoptic-DeepLab/panoptic_deeplab/{panoptic_seg,post_processing}.py``,
``projects/DeepLab/deeplab/{semantic_seg,resnet}.py``, ``detectron2/layers/{aspp,blocks}.py``,
``detectron2/modeling/backbone/resnet.py``; Apache-2.0) so that a checkpoint in its layout
(``backbone.*``, ``sem_seg_head.*``, ``ins_embed_head.*``) can load with strict key matching.
The code below is our own.

Architecture (detectron2 Cityscapes configs ``panoptic_deeplab_R_52_os16_mg124_poly_90k_bs32_
crop_512_1024[_dsconv]``, the ones with released Cityscapes weights):

* **Backbone** ``backbone``: ResNet-50, output stride 16. Stem ``deeplab`` (default; "R-52":
  three 3x3 convs 3->64->64->128, the first with stride 2, then a 3x3/2 max pool) or ``basic``
  (the torchvision-style 7x7/2 conv to 64 channels + max pool). Bottleneck blocks with the
  stride in the 3x3 conv; stages ``res2``..``res5`` of 3, 4, 6, 3 blocks (256, 512, 1024, 2048
  channels). ``res5`` is dilated instead of strided (dilation 2, multi-grid ``(1, 2, 4)`` ->
  dilations 2, 4, 8). Every conv is followed by a BatchNorm ``<conv>.norm``; key names are
  detectron2's: ``backbone.stem.conv1.weight``, ``backbone.res2.0.conv1.norm.weight``,
  ``backbone.res2.0.shortcut.weight`` ...
* **Semantic head** ``sem_seg_head`` (DeepLabV3+ decoder + Panoptic-DeepLab head): ASPP on
  ``res5`` (1x1 conv, three 3x3 convs with dilation 6, 12, 18, image pooling + 1x1 conv with
  bias, concatenation, 1x1 projection; 256 channels), then twice: bilinear up-sampling to the
  next lower level (``res3`` 1/8, ``res2`` 1/4), concatenation with a 1x1 projection of that
  level (64 resp. 32 channels) and a fuse conv to 256 channels; then ``head`` and a 1x1
  ``predictor`` to 19 logits at 1/4 resolution, bilinearly up-sampled x4.
* **Instance head** ``ins_embed_head``: the same decoder with 128 fuse channels, then a
  ``center_head`` (two 3x3 convs 128->128->32) + ``center_predictor`` (1 channel, the centre
  heat-map) and an ``offset_head`` + ``offset_predictor`` (2 channels, ``(dy, dx)`` from each
  pixel to its instance centre). Both are up-sampled x4, the offsets also multiplied by 4.
* ``dsconv`` variant: the 3x3 ASPP convs become depth-wise separable (3x3 depth-wise + 1x1,
  each with norm + ReLU), and the decoder fuse convs, the semantic ``head`` and the
  ``offset_head`` become one 5x5 depth-wise separable conv (the paper's "light-weight"
  choice); the ``center_head`` stays two 3x3 convs.

Input convention: RGB in ``[0, 255]`` normalised with ``pixel_mean = (123.675, 116.28,
103.53)``, ``pixel_std = (58.395, 57.12, 57.375)`` (buffers of the model; taken from the
checkpoint when it has them). Trained on 512x1024 crops, evaluated at 1024x2048.

ASPP image pooling: detectron2 average-pools with a *fixed* window equal to the training crop
divided by 16 (``(32, 64)``), stride 1, then resizes the result bilinearly to the feature
size; at 512x1024 this is global pooling, at 1024x2048 a sliding window. detectron2 raises
unless the feature size is a multiple of the window; we apply the window whenever the map is
at least that large and fall back to global pooling on smaller maps (our own choice).

Cost: about 60 M parameters (two ASPPs on 2048 channels). On a 2-core CPU one forward takes a
few seconds even at 48x64 (weight-bound) and far longer at 1024x512; meant for a GPU.

Post-processing (paper Sec. 3.2; pure torch, any device): centres are the peaks of the centre
heat-map (threshold, max-pool NMS, top-k); every "thing" pixel joins the centre nearest to
``its position + its predicted offset``; each instance takes the majority semantic class of its
pixels; stuff segments smaller than ``stuff_area`` become void. Panoptic ids are
``class * label_divisor + instance`` (instances counted from 1 per class; stuff has instance
0; void is ``void_label``, default -1). Cityscapes thing classes are trainIds 11..18.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpr_localizer.errors import WeightsError
from vpr_localizer.files import check_strict_state_dict
from vpr_localizer.segmentation.classes import backend_input_size, check_rgb
from vpr_localizer.device import resolve_device

#: Number of semantic classes (Cityscapes trainIds 0..18; there is no background output).
NUM_CLASSES = 19
#: Cityscapes "thing" trainIds: person, rider, car, truck, bus, train, motorcycle, bicycle.
CITYSCAPES_THING_IDS: Tuple[int, ...] = tuple(range(11, 19))
#: Panoptic id = class * LABEL_DIVISOR + instance id.
LABEL_DIVISOR = 1000
#: Default normalisation (detectron2 Cityscapes config), on RGB in [0, 255].
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Default network input size ``(width, height)`` of the backend (the training crop size).
DEFAULT_INPUT_SIZE = (1024, 512)
#: Output stride of the backbone (``res5`` dilated).
OUTPUT_STRIDE = 16
#: Resolution of the decoder outputs relative to the input (1/4).
COMMON_STRIDE = 4
#: ASPP image-pooling window of the released configs: 512x1024 training crop / 16.
DEFAULT_ASPP_POOL = (32, 64)
_BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# ================================================================================================
# Post-processing
# ================================================================================================

def _check_map(name: str, t: torch.Tensor, channels: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != channels:
        raise ValueError(f"{name} must be a ({channels}, H, W) tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def _check_same_size(**maps: torch.Tensor) -> None:
    sizes = {name: tuple(t.shape[-2:]) for name, t in maps.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"maps differ in size: {sizes}")


def find_instance_center(center_heatmap: torch.Tensor, threshold: float = 0.1, nms_kernel: int = 7,
                         top_k: Optional[int] = 200) -> torch.Tensor:
    """Instance centres = peaks of the centre heat-map.

    A pixel is a centre when its score is ``> threshold`` (and ``> 0``) and it equals the
    maximum of its ``nms_kernel x nms_kernel`` neighbourhood, where scores at or below the
    threshold are first set to -1 (so they never suppress anything). Of these, the ``top_k``
    highest are kept (ties: the earlier in raster order wins).

    Note: detectron2 keeps the peaks strictly above the k-th highest score, i.e. ``top_k - 1``
    of them when there are more than ``top_k``; we keep exactly ``min(top_k, #peaks)``. Two
    equal neighbouring maxima (a plateau) both survive, as in the reference.

    Args:
        center_heatmap: ``(1, H, W)`` float centre scores.
        threshold: minimum score (exclusive).
        nms_kernel: odd max-pool window (pixels).
        top_k: keep at most this many centres; ``None`` keeps all.

    Returns:
        ``(K, 2)`` int64 ``(y, x)`` coordinates in raster order (row by row).

    Raises:
        ValueError: bad shape, even/non-positive ``nms_kernel`` or negative ``top_k``.
    """
    _check_map("center_heatmap", center_heatmap, 1)
    if int(nms_kernel) < 1 or int(nms_kernel) % 2 == 0:
        raise ValueError(f"nms_kernel must be a positive odd integer, got {nms_kernel}")
    if top_k is not None and int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
    k = int(nms_kernel)
    heat = center_heatmap.detach().float()
    heat = torch.where(heat > float(threshold), heat, torch.full_like(heat, -1.0))
    pooled = F.max_pool2d(heat.unsqueeze(0), kernel_size=k, stride=1, padding=k // 2).squeeze(0)
    is_peak = (heat == pooled) & (heat > 0)
    yx = torch.nonzero(is_peak[0])
    if top_k is not None and yx.shape[0] > int(top_k):
        scores = heat[0, yx[:, 0], yx[:, 1]]
        order = torch.sort(scores, descending=True, stable=True).indices[: int(top_k)]
        yx = yx[torch.sort(order).values]
    return yx


def group_pixels(centers: torch.Tensor, offsets: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Assign every pixel to the centre nearest to where its offset points.

    Pixel ``(y, x)`` votes for the location ``(y + offsets[0, y, x], x + offsets[1, y, x])``
    and gets the id ``1 + argmin_k |location - centers[k]|`` (Euclidean; ties go to the lower
    index). Computed in chunks so memory stays ``O(chunk_elems)`` however many centres.

    Args:
        centers: ``(K, 2)`` ``(y, x)`` centres (any numeric dtype).
        offsets: ``(2, H, W)`` float ``(dy, dx)`` offsets in pixels.
        chunk_elems: pixels x centres evaluated at once.

    Returns:
        ``(1, H, W)`` int64 instance ids in ``1..K`` (all 0 when ``K == 0``).

    Raises:
        ValueError: bad shapes.
    """
    _check_map("offsets", offsets, 2)
    if not isinstance(centers, torch.Tensor) or centers.dim() != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must be a (K, 2) tensor, got "
                         f"{tuple(centers.shape) if isinstance(centers, torch.Tensor) else type(centers).__name__}")
    _, h, w = offsets.shape
    n_centers = centers.shape[0]
    if n_centers == 0:
        return torch.zeros((1, h, w), dtype=torch.int64, device=offsets.device)
    off = offsets.detach().float()
    ys = torch.arange(h, dtype=torch.float32, device=off.device).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=off.device).view(1, w)
    target = torch.stack(((ys + off[0]).reshape(-1), (xs + off[1]).reshape(-1)), dim=1)  # (N, 2)
    c = centers.to(device=off.device, dtype=torch.float32)
    ids = torch.empty(target.shape[0], dtype=torch.int64, device=off.device)
    step = max(1, int(chunk_elems) // n_centers)
    for start in range(0, target.shape[0], step):
        part = target[start:start + step]
        d2 = (part[:, None, 0] - c[None, :, 0]) ** 2 + (part[:, None, 1] - c[None, :, 1]) ** 2
        ids[start:start + step] = torch.argmin(d2, dim=1)
    return (ids + 1).view(1, h, w)


def get_instance_segmentation(sem: torch.Tensor, center_heatmap: torch.Tensor, offsets: torch.Tensor,
                              thing_mask: torch.Tensor, threshold: float = 0.1, nms_kernel: int = 7,
                              top_k: Optional[int] = 200) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic instances: :func:`find_instance_center` + :func:`group_pixels`, restricted
    to ``thing_mask``.

    Args:
        sem: ``(1, H, W)`` semantic class ids (only its size is used; kept for symmetry with
            the reference).
        center_heatmap: ``(1, H, W)`` centre scores.
        offsets: ``(2, H, W)`` ``(dy, dx)`` offsets.
        thing_mask: ``(1, H, W)``; pixels ``> 0`` (or ``True``) may belong to an instance.
        threshold, nms_kernel, top_k: see :func:`find_instance_center`.

    Returns:
        ``(ins, centers)``: ``ins`` ``(1, H, W)`` int64, 0 outside ``thing_mask`` or when no
        centre was found, else the instance id ``1..K``; ``centers`` ``(1, K, 2)`` ``(y, x)``.
    """
    _check_map("sem", sem, 1)
    _check_map("center_heatmap", center_heatmap, 1)
    _check_map("offsets", offsets, 2)
    _check_map("thing_mask", thing_mask, 1)
    _check_same_size(sem=sem, center_heatmap=center_heatmap, offsets=offsets, thing_mask=thing_mask)
    centers = find_instance_center(center_heatmap, threshold=threshold, nms_kernel=nms_kernel, top_k=top_k)
    if centers.shape[0] == 0:
        return torch.zeros(sem.shape, dtype=torch.int64, device=sem.device), centers.unsqueeze(0)
    ins = group_pixels(centers, offsets).to(sem.device)
    ins = torch.where(thing_mask.to(sem.device) > 0, ins, torch.zeros_like(ins))
    return ins, centers.unsqueeze(0)


def merge_semantic_and_instance(sem: torch.Tensor, ins: torch.Tensor, semantic_thing_seg: torch.Tensor,
                                label_divisor: int = LABEL_DIVISOR,
                                thing_ids: Iterable[int] = CITYSCAPES_THING_IDS,
                                stuff_area: int = 2048, void_label: int = -1) -> torch.Tensor:
    """Fuse semantic classes and class-agnostic instances into a panoptic map.

    * Things: each instance id ``i > 0`` covers the pixels with ``ins == i`` that are also in
      ``semantic_thing_seg``; it takes the class most of those pixels have in ``sem`` (ties:
      the smaller class id) and becomes ``class * label_divisor + n``, ``n`` counting that
      class's instances from 1 in increasing instance-id order.
    * Stuff: for every class in ``sem`` that is not in ``thing_ids``, its pixels with
      ``ins == 0`` become ``class * label_divisor`` if there are at least ``stuff_area`` of
      them, else stay void.
    * Everything else is ``void_label``: in particular thing-class pixels that no instance
      claims (e.g. no centre was found), as in the reference.

    Args:
        sem: ``(1, H, W)`` non-negative integer class ids.
        ins: ``(1, H, W)`` integer instance ids (0 = none).
        semantic_thing_seg: ``(1, H, W)``; ``> 0`` where a thing may be.
        label_divisor: see above; must exceed the number of instances of any class.
        thing_ids: thing class ids.
        stuff_area: minimum stuff segment area in pixels.
        void_label: id of unassigned pixels.

    Returns:
        ``(1, H, W)`` int64 panoptic ids.

    Raises:
        ValueError: bad shapes or negative class ids.
    """
    _check_map("sem", sem, 1)
    _check_map("ins", ins, 1)
    _check_map("semantic_thing_seg", semantic_thing_seg, 1)
    _check_same_size(sem=sem, ins=ins, semantic_thing_seg=semantic_thing_seg)
    sem = sem.long()
    ins = ins.long().to(sem.device)
    if sem.numel() and int(sem.min()) < 0:
        raise ValueError("sem must hold non-negative class ids")
    div = int(label_divisor)
    pan = torch.full(sem.shape, int(void_label), dtype=torch.int64, device=sem.device)
    is_thing = (ins > 0) & (semantic_thing_seg.to(sem.device) > 0)
    per_class: Dict[int, int] = collections.Counter()
    for inst in torch.unique(ins).tolist():
        if inst == 0:
            continue
        mask = (ins == inst) & is_thing
        if not bool(mask.any()):
            continue
        cls = int(torch.bincount(sem[mask]).argmax())
        per_class[cls] += 1
        pan[mask] = cls * div + per_class[cls]
    things = {int(t) for t in thing_ids}
    for cls in torch.unique(sem).tolist():
        if cls in things:
            continue
        mask = (sem == cls) & (ins == 0)
        if int(mask.sum()) >= int(stuff_area):
            pan[mask] = cls * div
    return pan


def panoptic_segmentation(sem: torch.Tensor, center_heatmap: torch.Tensor, offsets: torch.Tensor,
                          thing_ids: Iterable[int] = CITYSCAPES_THING_IDS, label_divisor: int = LABEL_DIVISOR,
                          stuff_area: int = 2048, void_label: int = -1, threshold: float = 0.1,
                          nms_kernel: int = 7, top_k: Optional[int] = 200,
                          foreground_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Panoptic-DeepLab post-processing: instances + merge (defaults of the Cityscapes config).

    Args:
        sem: ``(1, H, W)`` semantic class ids (argmax of the logits).
        center_heatmap: ``(1, H, W)`` centre scores.
        offsets: ``(2, H, W)`` ``(dy, dx)`` offsets in pixels of this resolution.
        thing_ids: thing class ids (Cityscapes trainIds 11..18).
        label_divisor, stuff_area, void_label: see :func:`merge_semantic_and_instance`.
        threshold, nms_kernel, top_k: see :func:`find_instance_center`.
        foreground_mask: optional ``(1, H, W)`` thing mask; default: ``sem`` in ``thing_ids``.

    Returns:
        ``(panoptic, centers)``: ``(1, H, W)`` int64 ids ``class * label_divisor + instance``
        (``void_label`` where unassigned) and ``(1, K, 2)`` ``(y, x)`` instance centres.
    """
    _check_map("sem", sem, 1)
    thing_list = [int(t) for t in thing_ids]
    if foreground_mask is None:
        thing_seg = torch.isin(sem.long(), torch.tensor(thing_list, dtype=torch.int64, device=sem.device))
    else:
        _check_map("foreground_mask", foreground_mask, 1)
        thing_seg = foreground_mask > 0
    ins, centers = get_instance_segmentation(sem, center_heatmap, offsets, thing_seg, threshold=threshold,
                                             nms_kernel=nms_kernel, top_k=top_k)
    pan = merge_semantic_and_instance(sem, ins, thing_seg, label_divisor=label_divisor, thing_ids=thing_list,
                                      stuff_area=stuff_area, void_label=void_label)
    return pan, centers


#: detectron2's name for :func:`panoptic_segmentation`.
get_panoptic_segmentation = panoptic_segmentation


# ================================================================================================
# Model
# ================================================================================================

class _Conv(nn.Conv2d):
    """A conv with detectron2's layout: ``weight`` (+ ``bias``), an optional BatchNorm ``norm``
    applied after it, then an optional ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 groups: int = 1, bias: bool = False, norm: bool = True, relu: bool = True):
        super().__init__(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        if norm:
            self.norm = nn.BatchNorm2d(cout)
        else:
            self.norm = None
        self.use_relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.use_relu else x


class _SepConv(nn.Module):
    """Depth-wise separable conv: ``depthwise`` kxk (norm, ReLU) then ``pointwise`` 1x1 (norm, ReLU)."""

    def __init__(self, cin: int, cout: int, k: int, padding: int, dilation: int = 1):
        super().__init__()
        self.depthwise = _Conv(cin, cin, k, padding=padding, dilation=dilation, groups=cin)
        self.pointwise = _Conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class _Bottleneck(nn.Module):
    """ResNet bottleneck (stride in the 3x3 conv): 1x1 -> 3x3 (stride, dilation) -> 1x1, plus
    the identity or a projection ``shortcut`` (1x1 conv + norm) when the channels change."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.shortcut = _Conv(cin, cout, 1, stride=stride, relu=False) if cin != cout else None
        self.conv1 = _Conv(cin, mid, 1)
        self.conv2 = _Conv(mid, mid, 3, stride=stride, padding=dilation, dilation=dilation)
        self.conv3 = _Conv(mid, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class _Stem(nn.Module):
    """``deeplab`` stem: 3x3/2 conv 3->64, 3x3 64->64, 3x3 64->128; or ``basic``: 7x7/2 conv
    3->64. Each conv with norm + ReLU; then a 3x3/2 max pool (stride 4 in all)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == "deeplab":
            self.conv1 = _Conv(3, 64, 3, stride=2, padding=1)
            self.conv2 = _Conv(64, 64, 3, padding=1)
            self.conv3 = _Conv(64, 128, 3, padding=1)
            self.out_channels = 128
        elif kind == "basic":
            self.conv1 = _Conv(3, 64, 7, stride=2, padding=3)
            self.out_channels = 64
        else:
            raise ValueError(f"stem must be 'deeplab' or 'basic', got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.kind == "deeplab":
            x = self.conv3(self.conv2(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class _ResNet(nn.Module):
    """ResNet-50/101 with a dilated ``res5`` (output stride 16); returns ``res2``, ``res3``, ``res5``."""

    def __init__(self, stem: str = "deeplab", depth: int = 50, res5_multi_grid: Sequence[int] = (1, 2, 4),
                 res5_dilation: int = 2):
        super().__init__()
        if depth not in _BLOCKS_PER_DEPTH:
            raise ValueError(f"depth must be one of {sorted(_BLOCKS_PER_DEPTH)}, got {depth}")
        if len(res5_multi_grid) != _BLOCKS_PER_DEPTH[depth][3]:
            raise ValueError(f"res5_multi_grid needs {_BLOCKS_PER_DEPTH[depth][3]} entries, got {res5_multi_grid}")
        self.stem = _Stem(stem)
        cin, mid, cout = self.stem.out_channels, 64, 256
        for i, n_blocks in enumerate(_BLOCKS_PER_DEPTH[depth]):
            name = f"res{i + 2}"
            blocks = []
            for b in range(n_blocks):
                if name == "res5":
                    stride, dilation = 1, res5_dilation * int(res5_multi_grid[b])
                else:
                    stride, dilation = (2 if b == 0 and name != "res2" else 1), 1
                blocks.append(_Bottleneck(cin if b == 0 else cout, mid, cout, stride=stride, dilation=dilation))
            self.add_module(name, nn.Sequential(*blocks))
            cin, mid, cout = cout, mid * 2, cout * 2
        self.out_channels = {"res2": 256, "res3": 512, "res5": 2048}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.stem(x)
        r2 = self.res2(x)
        r3 = self.res3(r2)
        r5 = self.res5(self.res4(r3))
        return {"res2": r2, "res3": r3, "res5": r5}


class _ImagePool(nn.Module):
    """ASPP image pooling: ``pool`` window average (stride 1) when the map is at least that
    large, else global average pooling."""

    def __init__(self, pool: Optional[Tuple[int, int]]):
        super().__init__()
        self.pool = None if pool is None else (int(pool[0]), int(pool[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.pool is not None and h >= self.pool[0] and w >= self.pool[1]:
            return F.avg_pool2d(x, kernel_size=self.pool, stride=1)
        return F.adaptive_avg_pool2d(x, 1)


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``convs.0`` 1x1, ``convs.1-3`` 3x3 with the given
    dilations (or depth-wise separable), ``convs.4`` = (pooling, 1x1 conv with bias + ReLU);
    concatenated and projected by ``project`` (1x1). Dropout 0.1 in training only."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int] = (6, 12, 18), dsconv: bool = False,
                 pool: Optional[Tuple[int, int]] = DEFAULT_ASPP_POOL, dropout: float = 0.1):
        super().__init__()
        branches: List[nn.Module] = [_Conv(cin, cout, 1)]
        for d in dilations:
            branches.append(_SepConv(cin, cout, 3, padding=d, dilation=d) if dsconv
                            else _Conv(cin, cout, 3, padding=d, dilation=d))
        branches.append(nn.Sequential(_ImagePool(pool), _Conv(cin, cout, 1, bias=True, norm=False)))
        self.convs = nn.ModuleList(branches)
        self.project = _Conv(len(branches) * cout, cout, 1)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.convs]
        outs[-1] = F.interpolate(outs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = self.project(torch.cat(outs, dim=1))
        return F.dropout(y, self.dropout, training=self.training) if self.dropout > 0 else y


class _DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ decoder over ``res2``, ``res3``, ``res5`` (``decoder.<level>.project_conv`` /
    ``fuse_conv``): ASPP on ``res5``; then for ``res3`` and ``res2``: up-sample, concatenate
    with the 1x1 projection of that level, fuse. Output: ``decoder_channels[0]`` at 1/4."""

    LEVELS = ("res2", "res3", "res5")

    def __init__(self, in_channels: Dict[str, int], project_channels: Sequence[int],
                 decoder_channels: Sequence[int], dsconv: bool, aspp_pool: Optional[Tuple[int, int]]):
        super().__init__()
        self.decoder = nn.ModuleDict()
        for i, level in enumerate(self.LEVELS):
            stage = nn.ModuleDict()
            if level == "res5":
                stage["project_conv"] = _ASPP(in_channels[level], decoder_channels[i], dsconv=dsconv, pool=aspp_pool)
            else:
                cp, cd, cnext = project_channels[i], decoder_channels[i], decoder_channels[i + 1]
                stage["project_conv"] = _Conv(in_channels[level], cp, 1)
                if dsconv:
                    stage["fuse_conv"] = _SepConv(cp + cnext, cd, 5, padding=2)
                else:
                    stage["fuse_conv"] = nn.Sequential(_Conv(cp + cnext, cd, 3, padding=1),
                                                       _Conv(cd, cd, 3, padding=1))
            self.decoder[level] = stage

    def decode(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        y: Optional[torch.Tensor] = None
        for level in reversed(self.LEVELS):
            stage = self.decoder[level]
            proj = stage["project_conv"](features[level])
            if y is None:
                y = proj
            else:
                y = F.interpolate(y, size=proj.shape[-2:], mode="bilinear", align_corners=False)
                y = stage["fuse_conv"](torch.cat([proj, y], dim=1))
        return y


def _head(cin: int, cout: int, dsconv: bool) -> nn.Module:
    if dsconv:
        return _SepConv(cin, cout, 5, padding=2)
    return nn.Sequential(_Conv(cin, cin, 3, padding=1), _Conv(cin, cout, 3, padding=1))


class PanopticDeepLabSemSegHead(_DeepLabV3PlusDecoder):
    """Semantic branch: decoder (256 channels) -> ``head`` -> 1x1 ``predictor`` (19 logits at 1/4)."""

    def __init__(self, in_channels: Dict[str, int], num_classes: int = NUM_CLASSES, dsconv: bool = False,
                 aspp_pool: Optional[Tuple[int, int]] = DEFAULT_ASPP_POOL):
        super().__init__(in_channels, project_channels=(32, 64), decoder_channels=(256, 256, 256),
                         dsconv=dsconv, aspp_pool=aspp_pool)
        self.head = _head(256, 256, dsconv)
        self.predictor = nn.Conv2d(256, num_classes, 1)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.predictor(self.head(self.decode(features)))


class PanopticDeepLabInsEmbedHead(_DeepLabV3PlusDecoder):
    """Instance branch: decoder (128 channels) -> centre heat-map (1 channel) and offsets
    ``(dy, dx)`` (2 channels, in pixels of the 1/4 map), both at 1/4."""

    def __init__(self, in_channels: Dict[str, int], dsconv: bool = False,
                 aspp_pool: Optional[Tuple[int, int]] = DEFAULT_ASPP_POOL):
        super().__init__(in_channels, project_channels=(32, 64), decoder_channels=(128, 128, 256),
                         dsconv=dsconv, aspp_pool=aspp_pool)
        self.center_head = _head(128, 32, dsconv=False)  # two 3x3 convs in both variants
        self.center_predictor = nn.Conv2d(32, 1, 1)
        self.offset_head = _head(128, 32, dsconv)
        self.offset_predictor = nn.Conv2d(32, 2, 1)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.decode(features)
        return self.center_predictor(self.center_head(y)), self.offset_predictor(self.offset_head(y))


class PanopticDeepLab(nn.Module):
    """Panoptic-DeepLab network (Cheng et al., CVPR 2020) in detectron2's checkpoint layout.

    ``forward(x)``: ``x`` float ``(B, 3, H, W)`` **RGB in [0, 255]** (normalised inside with
    the ``pixel_mean`` / ``pixel_std`` buffers); any ``H, W`` (zero-padded to a multiple of 16
    after normalisation, like detectron2's ``ImageList``, and cropped back). Returns a dict of
    float tensors at the input size:

    * ``sem_logits`` ``(B, 19, H, W)``: Cityscapes trainId logits;
    * ``center`` ``(B, 1, H, W)``: instance-centre heat-map;
    * ``offset`` ``(B, 2, H, W)``: ``(dy, dx)`` from each pixel to its centre, in input pixels.

    Args:
        num_classes: semantic classes (19 for Cityscapes).
        stem: ``"deeplab"`` (R-52, the released Cityscapes checkpoints) or ``"basic"`` (R-50).
        depth: 50 or 101.
        dsconv: depth-wise separable variant (see module docstring).
        res5_multi_grid: per-block dilation multipliers of ``res5`` (times 2).
        aspp_pool: ASPP image-pooling window on the 1/16 map (``None``: always global).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, stem: str = "deeplab", depth: int = 50,
                 dsconv: bool = False, res5_multi_grid: Sequence[int] = (1, 2, 4),
                 aspp_pool: Optional[Tuple[int, int]] = DEFAULT_ASPP_POOL):
        super().__init__()
        self.backbone = _ResNet(stem=stem, depth=depth, res5_multi_grid=res5_multi_grid)
        chans = self.backbone.out_channels
        self.sem_seg_head = PanopticDeepLabSemSegHead(chans, num_classes=num_classes, dsconv=dsconv,
                                                      aspp_pool=aspp_pool)
        self.ins_embed_head = PanopticDeepLabInsEmbedHead(chans, dsconv=dsconv, aspp_pool=aspp_pool)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1))
        self.config = {"num_classes": num_classes, "stem": stem, "depth": depth, "dsconv": bool(dsconv),
                       "res5_multi_grid": tuple(int(m) for m in res5_multi_grid), "aspp_pool": aspp_pool}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a float (B, 3, H, W) RGB tensor in [0, 255], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        h, w = x.shape[-2:]
        x = (x.float() - self.pixel_mean) / self.pixel_std
        ph, pw = (-h) % OUTPUT_STRIDE, (-w) % OUTPUT_STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        features = self.backbone(x)
        sem = self.sem_seg_head(features)
        center, offset = self.ins_embed_head(features)

        def up(t: torch.Tensor) -> torch.Tensor:
            t = F.interpolate(t, scale_factor=COMMON_STRIDE, mode="bilinear", align_corners=False)
            return t[..., :h, :w]

        return {"sem_logits": up(sem), "center": up(center), "offset": up(offset) * COMMON_STRIDE}


# ================================================================================================
# Loading
# ================================================================================================

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
        return torch.load(path, map_location="cpu", weights_only=True)
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
    return torch.load(path, map_location="cpu", weights_only=True)


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


# ================================================================================================
# Segmentation backend
# ================================================================================================

def _resize_nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array of any dtype (pixel centres mapped)."""
    h, w = a.shape
    if (h, w) == (height, width):
        return a
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return a[rows[:, None], cols[None, :]]


class PanopticDeepLabBackend:
    """Segmentation backend ``panoptic_deeplab`` (see
    :class:`vpr_localizer.segmentation.classes.SegmentationBackend`). **Accuracy unverified** (no weights
    in this environment; see the module docstring).

    ``backend(rgb)``: ``uint8 (H, W, 3)`` RGB -> ``uint8 (H, W)`` Cityscapes trainIds 0..18 from
    the semantic head (argmax; this network has no background class, so 19 never occurs).
    Steps: resize to ``input_size`` with PIL bilinear (skipped when already that size), the
    network (which normalises), argmax, nearest-neighbour resize back to ``(H, W)``.

    ``backend.panoptic(rgb)``: the panoptic map (see :meth:`panoptic`);
    ``backend.segment_panoptic(rgb)``: both from one network pass.

    Args:
        weights: detectron2 Panoptic-DeepLab Cityscapes checkpoint (``.pkl`` or ``.pth``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        input_size: network input ``(width, height)``; default 1024x512 (the training crop).

    Raises:
        WeightsError: see :func:`load_panoptic_deeplab`; also for an invalid ``input_size``.
    """

    name = "panoptic_deeplab"

    def __init__(self, weights: str, device: str = "auto", input_size: Tuple[int, int] = DEFAULT_INPUT_SIZE):
        self.input_size = backend_input_size("panoptic_deeplab", input_size)
        self.device = resolve_device(device)
        self.model = load_panoptic_deeplab(weights, self.device)
        self.weights = os.fspath(weights)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """``uint8 (H, W, 3)`` RGB -> float32 ``(1, 3, h, w)`` in [0, 255] at ``input_size``."""
        from PIL import Image

        check_rgb(rgb)
        w, h = self.input_size
        if rgb.shape[:2] != (h, w):
            rgb = np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        elif not (rgb.flags.c_contiguous and rgb.flags.writeable):
            rgb = np.array(rgb)
        return torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).unsqueeze(0).float()

    @torch.no_grad()
    def outputs(self, rgb: np.ndarray) -> Dict[str, torch.Tensor]:
        """Raw network outputs (``sem_logits``, ``center``, ``offset``) at ``input_size``, batch 1."""
        return self.model(self.preprocess(rgb))

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 (H, W, 3)`` RGB -> ``uint8 (H, W)`` trainIds 0..18.

        Raises:
            ValueError: not a non-empty ``uint8 (H, W, 3)`` array.
        """
        labels = self.outputs(rgb)["sem_logits"][0].argmax(0).to(torch.uint8).cpu().numpy()
        return _resize_nearest(labels, rgb.shape[0], rgb.shape[1])

    @torch.no_grad()
    def panoptic(self, rgb: np.ndarray, *, threshold: float = 0.1, nms_kernel: int = 7, top_k: int = 200,
                 stuff_area: int = 2048, label_divisor: int = LABEL_DIVISOR, void_label: int = -1) -> np.ndarray:
        """``uint8 (H, W, 3)`` RGB -> ``int64 (H, W)`` panoptic ids ``trainId * label_divisor +
        instance`` (stuff: instance 0; things 11..18: instances from 1; ``void_label`` where
        unassigned). See :meth:`segment_panoptic` (this is its second result)."""
        return self.segment_panoptic(rgb, threshold=threshold, nms_kernel=nms_kernel, top_k=top_k,
                                     stuff_area=stuff_area, label_divisor=label_divisor, void_label=void_label)[1]

    @torch.no_grad()
    def segment_panoptic(self, rgb: np.ndarray, *, threshold: float = 0.1, nms_kernel: int = 7, top_k: int = 200,
                         stuff_area: int = 2048, label_divisor: int = LABEL_DIVISOR,
                         void_label: int = -1) -> Tuple[np.ndarray, np.ndarray]:
        """One network pass -> ``(labels, panoptic)``: the ``uint8 (H, W)`` trainIds of
        ``backend(rgb)`` and the ``int64 (H, W)`` panoptic map of :meth:`panoptic`.

        Post-processing (:func:`panoptic_segmentation`, defaults of the Cityscapes config) runs
        at ``input_size``, then both maps are nearest-neighbour resized back to ``(H, W)``.
        ``stuff_area`` is in pixels of the *input image* and scaled to ``input_size`` (the
        reference applies 2048 at 1024x2048); ``threshold``, ``nms_kernel`` and ``top_k`` act
        at ``input_size``.
        """
        out = self.outputs(rgb)
        w, h = self.input_size
        scale = (w * h) / float(rgb.shape[0] * rgb.shape[1])
        sem = out["sem_logits"][0].argmax(0, keepdim=True)
        pan, _ = panoptic_segmentation(
            sem, out["center"][0], out["offset"][0], thing_ids=CITYSCAPES_THING_IDS, label_divisor=label_divisor,
            stuff_area=int(round(stuff_area * scale)), void_label=void_label,
            threshold=threshold, nms_kernel=nms_kernel, top_k=top_k)
        H, W = rgb.shape[:2]
        labels = _resize_nearest(sem[0].to(torch.uint8).cpu().numpy(), H, W)
        return labels, _resize_nearest(pan[0].cpu().numpy(), H, W)

    def __repr__(self) -> str:
        return (f"PanopticDeepLabBackend(weights={self.weights!r}, device={str(self.device)!r}, "
                f"input_size={self.input_size})")
