"""Panoptic-DeepLab post-processing (Cheng et al., "Panoptic-DeepLab: A Simple, Strong, and Fast
Baseline for Bottom-Up Panoptic Segmentation", CVPR 2020, Sec. 3.2): instance centres, pixel
grouping and the fusion of semantic classes and instances into a panoptic map.

Pure torch on ``(C, H, W)`` maps, any device; the names and defaults follow detectron2's
re-implementation (``projects/Panoptic-DeepLab/panoptic_deeplab/post_processing.py``,
Apache-2.0), the code is our own.

Centres are the peaks of the centre heat-map (threshold, max-pool NMS, top-k,
:func:`find_instance_center`); every "thing" pixel joins the centre nearest to ``its position
+ its predicted offset`` (:func:`group_pixels`); each instance takes the majority semantic
class of its pixels; stuff segments smaller than ``stuff_area`` become void
(:func:`merge_semantic_and_instance`). Panoptic ids are ``class * label_divisor + instance``
(instances counted from 1 per class; stuff has instance 0; void is ``void_label``, default -1).
Cityscapes thing classes are trainIds 11..18.
"""
from __future__ import annotations

import collections
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

#: Cityscapes "thing" trainIds: person, rider, car, truck, bus, train, motorcycle, bicycle.
CITYSCAPES_THING_IDS: Tuple[int, ...] = tuple(range(11, 19))
#: Panoptic id = class * LABEL_DIVISOR + instance id.
LABEL_DIVISOR = 1000


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
