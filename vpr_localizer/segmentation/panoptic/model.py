"""Panoptic-DeepLab network (Cityscapes, 19 classes) in detectron2's checkpoint layout.

Paper: B. Cheng, M. D. Collins, Y. Zhu, T. Liu, T. S. Huang, H. Adam, L.-C. Chen,
"Panoptic-DeepLab: A Simple, Strong, and Fast Baseline for Bottom-Up Panoptic Segmentation",
CVPR 2020. The module and tensor names follow detectron2's re-implementation
(``projects/Panoptic-DeepLab/panoptic_deeplab/panoptic_seg.py``,
``projects/DeepLab/deeplab/{semantic_seg,resnet}.py``, ``detectron2/layers/{aspp,blocks}.py``,
``detectron2/modeling/backbone/resnet.py``; Apache-2.0) so that a checkpoint in its layout
(``backbone.*``, ``sem_seg_head.*``, ``ins_embed_head.*``) can load with strict key matching
(:mod:`vpr_localizer.segmentation.panoptic.checkpoint`). The code below is our own. **No
released weights were ever loaded here** (see :mod:`vpr_localizer.segmentation.panoptic`).

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
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: Number of semantic classes (Cityscapes trainIds 0..18; there is no background output).
NUM_CLASSES = 19
#: Default normalisation (detectron2 Cityscapes config), on RGB in [0, 255].
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Output stride of the backbone (``res5`` dilated).
OUTPUT_STRIDE = 16
#: Resolution of the decoder outputs relative to the input (1/4).
COMMON_STRIDE = 4
#: ASPP image-pooling window of the released configs: 512x1024 training crop / 16.
DEFAULT_ASPP_POOL = (32, 64)
_BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


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
