"""ESPNetv2 semantic segmentation (Cityscapes, 20 classes), written for this project.

Paper: S. Mehta, M. Rastegari, L. Shapiro, H. Hajishirzi, "ESPNetv2: A Light-weight, Power
Efficient, and General Purpose Convolutional Neural Network", CVPR 2019. The tensor names and
the arithmetic follow the authors' reference implementation (EdgeNets, MIT licence:
``model/segmentation/espnetv2.py``, ``model/classification/espnetv2.py``,
``nn_layers/eesp.py``, ``nn_layers/espnet_utils.py``, ``nn_layers/cnn_utils.py``,
``nn_layers/efficient_pyramid_pool.py``, ``nn_layers/efficient_pt.py``), so that its released
checkpoint ``espnetv2_s_2.0_city_1024x512.pth`` loads with strict key matching. The code
below is our own.

Architecture (width scale ``s = 2.0``; channels per level ``32, 128, 256, 512``):

* **Encoder** (``base_net``, the ImageNet EESPNet without level 5 and classifier):
  ``level1`` 3x3 stride-2 conv (1/2); ``level2_0`` down-sampler (1/4); ``level3_0``
  down-sampler + 3 EESP blocks ``level3`` (1/8); ``level4_0`` down-sampler + 7 EESP blocks
  ``level4`` (1/16). An EESP block (paper Sec. 3.2, Fig. 1b/3) reduces with a group 1x1 conv
  (K = 4 groups), splits into K depth-wise dilated 3x3 convs whose outputs are fused
  hierarchically (HFF: branch k adds branch k-1), concatenates, BN+PReLU, expands with a
  group 1x1 conv + BN, adds the input when shapes agree, PReLU. A down-sampler
  (paper Fig. 3b/c) concatenates a 3x3 stride-2 average pool of its input with a stride-2
  EESP, adds the "input reinforcement" (the RGB image average-pooled to the same size, then
  3x3 CBR + 1x1 CB), PReLU.
* **Decoder** (EdgeNets' segmentation head): an efficient pyramid pooling module (EPP:
  1x1 projection to 10 channels; one depth-wise 3x3 per scale 2.0, 1.5, 1.0, 0.5, 0.1, each
  applied at the rescaled map and resampled back; BN+PReLU, channel shuffle, group 3x3 CBR,
  1x1 conv) at 1/16, then three times: x2 bilinear upsampling (``align_corners=True``) +
  an "efficient point-wise conv" projection of the encoder skip (group 3x3 CBR gated by a
  sigmoid of a globally pooled 1x1 conv), BN+PReLU, EPP. The last EPP outputs the 20 class
  logits at 1/2, bilinearly upsampled to the input size.

Classes are Cityscapes trainIds 0..18 plus 19 = background/ignore (see
:mod:`vpr_localizer.segmentation.classes`). Input convention of the weights: RGB, ``/ 255``, ImageNet
mean ``(0.485, 0.456, 0.406)`` / std ``(0.229, 0.224, 0.225)``, trained at 1024x512 (W x H).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpr_localizer.device import resolve_device
from vpr_localizer.errors import WeightsError
from vpr_localizer.files import check_strict_state_dict, load_state_dict_file
from vpr_localizer.segmentation.base import SegmentationBackend

#: Number of network outputs (19 Cityscapes train classes + background/ignore).
NUM_OUTPUTS = 20
#: Channels of encoder levels 1..4 at width scale s = 2.0 (EdgeNets ``sc_ch_dict[2.0][:4]``).
CHANNELS_S2 = (32, 128, 256, 512)
#: ImageNet normalisation the weights expect (on RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Default network input size ``(width, height)`` in pixels (the training resolution).
DEFAULT_INPUT_SIZE = (1024, 512)


# --- small building blocks (state-dict names as in EdgeNets) ---------------------------------------

class _ConvBNPReLU(nn.Module):
    """conv -> BN -> PReLU with attributes ``conv``, ``bn``, ``act`` (encoder style)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _ConvBN(nn.Module):
    """conv -> BN with attributes ``conv``, ``bn``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _BNPReLU(nn.Module):
    """BN -> PReLU with attributes ``bn``, ``act``."""

    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class _DilatedDW(nn.Module):
    """Depth-wise dilated 3x3 conv (attribute ``conv``), "same" padding ``d``."""

    def __init__(self, c: int, stride: int, d: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=d, dilation=d, bias=False, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _SeqCBR(nn.Module):
    """conv -> BN -> PReLU as ``cbr`` = Sequential(0 conv, 1 bn, 2 prelu) (decoder style)."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1):
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=1, padding=(k - 1) // 2, bias=False, groups=groups),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


class _SeqBR(nn.Module):
    """BN -> PReLU as ``br`` = Sequential(0 bn, 1 prelu) (decoder style)."""

    def __init__(self, c: int):
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(c), nn.PReLU(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


class _ChannelShuffle(nn.Module):
    """Channel shuffle (ShuffleNet): ``(B, g*c, H, W)`` viewed as ``(B, g, c)`` -> ``(B, c, g)``."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# --- encoder ------------------------------------------------------------------------------------

_RF_TO_DILATION = {3: 1, 5: 2, 7: 3, 9: 4, 11: 5, 13: 6, 15: 7, 17: 8}


class EESP(nn.Module):
    """Extremely Efficient Spatial Pyramid block (paper Sec. 3.2).

    ``(B, cin, H, W) -> (B, cout, H / stride, W / stride)``. Branch ``i`` of ``k`` has the
    receptive field ``3 + 2 i`` (dilation ``1 + i``), falling back to 3 above ``r_lim``;
    branches are sorted by receptive field before hierarchical fusion.
    With ``stride == 2`` (inside a down-sampler) it returns the expanded map before the
    residual and activation.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 4, r_lim: int = 7,
                 downsample: bool = False):
        super().__init__()
        n = cout // k
        if n * k != cout:
            raise ValueError(f"EESP: cout={cout} must be divisible by k={k}")
        self.stride = stride
        self.downsample = downsample
        self.proj_1x1 = _ConvBNPReLU(cin, n, 1, groups=k)
        rfs = sorted((3 + 2 * i) if (3 + 2 * i) <= r_lim else 3 for i in range(k))
        self.spp_dw = nn.ModuleList(_DilatedDW(n, stride, _RF_TO_DILATION[rf]) for rf in rfs)
        self.conv_1x1_exp = _ConvBN(cout, cout, 1, groups=k)
        self.br_after_cat = _BNPReLU(cout)
        self.module_act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.proj_1x1(x)
        branches: List[torch.Tensor] = []
        for i, dw in enumerate(self.spp_dw):
            y = dw(reduced)
            branches.append(y if i == 0 else y + branches[-1])  # hierarchical feature fusion
        out = self.conv_1x1_exp(self.br_after_cat(torch.cat(branches, 1)))
        if self.stride == 2 and self.downsample:
            return out
        if out.shape == x.shape:
            out = out + x
        return self.module_act(out)


class DownSampler(nn.Module):
    """Strided EESP unit with input reinforcement (paper Fig. 3c).

    ``forward(x (B, cin, H, W), image_pooled (B, 3, H', W') or None) -> (B, cout, H', W')``
    where ``H' = ceil(H / 2)`` and ``image_pooled`` is the RGB input average-pooled (3x3,
    stride 2, pad 1, repeatedly) to ``H' x W'``.
    """

    def __init__(self, cin: int, cout: int, k: int = 4, r_lim: int = 9, image_channels: int = 3):
        super().__init__()
        self.eesp = EESP(cin, cout - cin, stride=2, k=k, r_lim=r_lim, downsample=True)
        self.inp_reinf = nn.Sequential(_ConvBNPReLU(image_channels, 3, 3), _ConvBN(3, cout, 1))
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, image_pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)
        out = torch.cat([pooled, self.eesp(x)], 1)
        if image_pooled is not None:
            out = out + self.inp_reinf(image_pooled)
        return self.act(out)


class EESPNetEncoder(nn.Module):
    """The ESPNetv2 (EESPNet) encoder up to level 4 (stride 16), as ``base_net`` of the segmenter.

    Levels: ``level1`` CBR 3x3/2; ``level2_0``; ``level3_0`` + ``level3`` (3 EESP);
    ``level4_0`` + ``level4`` (7 EESP). Receptive-field limits per level 13, 11, 9, 7; K = 4.
    """

    def __init__(self, channels: Sequence[int] = CHANNELS_S2, reps: Tuple[int, int] = (3, 7), k: int = 4):
        super().__init__()
        c1, c2, c3, c4 = channels
        r_lim = (13, 11, 9, 7)
        self.level1 = _ConvBNPReLU(3, c1, 3, stride=2)
        self.level2_0 = DownSampler(c1, c2, k=k, r_lim=r_lim[0])
        self.level3_0 = DownSampler(c2, c3, k=k, r_lim=r_lim[1])
        self.level3 = nn.ModuleList(EESP(c3, c3, stride=1, k=k, r_lim=r_lim[2]) for _ in range(reps[0]))
        self.level4_0 = DownSampler(c3, c4, k=k, r_lim=r_lim[2])
        self.level4 = nn.ModuleList(EESP(c4, c4, stride=1, k=k, r_lim=r_lim[3]) for _ in range(reps[1]))
        self.channels = tuple(channels)


# --- decoder ------------------------------------------------------------------------------------

class EfficientPyrPool(nn.Module):
    """Efficient pyramid pooling (EdgeNets): ``(B, cin, H, W) -> (B, cout, H, W)``.

    After a 1x1 projection to ``proj`` channels, one depth-wise 3x3 per scale: for scale > 1
    the map is bilinearly upsampled (``align_corners=True``) to ``ceil(scale * size)``,
    convolved, and adaptive-average-pooled back; for scale < 1 it is adaptive-average-pooled
    to ``max(5, ceil(scale * size))``, convolved, and bilinearly upsampled back.
    """

    SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)

    def __init__(self, cin: int, proj: int, cout: int, last_layer_br: bool = True):
        super().__init__()
        ns = len(self.SCALES)
        self.projection_layer = _SeqCBR(cin, proj, 1)
        self.stages = nn.ModuleList(
            nn.Conv2d(proj, proj, 3, stride=1, padding=1, bias=False, groups=proj) for _ in self.SCALES)
        self.merge_layer = nn.Sequential(
            _SeqBR(proj * ns),
            _ChannelShuffle(ns),
            _SeqCBR(proj * ns, proj, 3, groups=proj),
            nn.Conv2d(proj, cout, 1, stride=1, bias=not last_layer_br),
        )
        self.last_layer_br = last_layer_br
        if last_layer_br:
            self.br = _SeqBR(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection_layer(x)
        h, w = x.shape[-2:]
        outs = []
        for scale, stage in zip(self.SCALES, self.stages):
            hs = max(5, int(math.ceil(h * scale)))
            ws = max(5, int(math.ceil(w * scale)))
            if scale < 1.0:
                y = stage(F.adaptive_avg_pool2d(x, (hs, ws)))
                y = F.interpolate(y, (h, w), mode="bilinear", align_corners=True)
            elif scale > 1.0:
                y = stage(F.interpolate(x, (hs, ws), mode="bilinear", align_corners=True))
                y = F.adaptive_avg_pool2d(y, (h, w))
            else:
                y = stage(x)
            outs.append(y)
        out = self.merge_layer(torch.cat(outs, 1))
        return self.br(out) if self.last_layer_br else out


class EfficientPWConv(nn.Module):
    """Skip projection (EdgeNets): ``CBR3x3(groups=gcd(cin, cout))(x) * sigmoid(W gap(x))``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.wt_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.Sigmoid())
        self.expansion_layer = _SeqCBR(cin, cout, 3, groups=math.gcd(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


def _up_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=True) resize of ``x`` to the spatial size of ``like`` (x2 normally)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


class ESPNetv2Segmentation(nn.Module):
    """ESPNetv2 semantic segmentation network, width scale s = 2.0, Cityscapes decoder.

    ``forward(x)``: ``x`` float32 ``(B, 3, H, W)``, RGB normalised with ImageNet mean/std
    (see module docstring); ``H, W`` any size (trained at 512x1024; sizes that are not
    multiples of 16 work, the skip connections are resampled to match). Returns float32 logits
    ``(B, 20, H, W)`` (trainIds 0..18, 19 = background/ignore). 789,242 learnable parameters
    (814,351 tensor values with the BN running statistics).
    """

    def __init__(self, classes: int = NUM_OUTPUTS, channels: Sequence[int] = CHANNELS_S2,
                 base_dec_planes: int = 16):
        super().__init__()
        self.base_net = EESPNetEncoder(channels)
        c1, c2, c3, c4 = self.base_net.channels
        dec = (4 * base_dec_planes, 3 * base_dec_planes, 2 * base_dec_planes, classes)
        proj = min(classes // 2, base_dec_planes)
        self.bu_dec_l1 = EfficientPyrPool(c4, proj, dec[0])
        self.bu_dec_l2 = EfficientPyrPool(dec[0], proj, dec[1])
        self.bu_dec_l3 = EfficientPyrPool(dec[1], proj, dec[2])
        self.bu_dec_l4 = EfficientPyrPool(dec[2], proj, dec[3], last_layer_br=False)
        self.merge_enc_dec_l2 = EfficientPWConv(c3, dec[0])
        self.merge_enc_dec_l3 = EfficientPWConv(c2, dec[1])
        self.merge_enc_dec_l4 = EfficientPWConv(c1, dec[2])
        self.bu_br_l2 = nn.Sequential(nn.BatchNorm2d(dec[0]), nn.PReLU(dec[0]))
        self.bu_br_l3 = nn.Sequential(nn.BatchNorm2d(dec[1]), nn.PReLU(dec[1]))
        self.bu_br_l4 = nn.Sequential(nn.BatchNorm2d(dec[2]), nn.PReLU(dec[2]))
        self.num_classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a float (B, 3, H, W) tensor, got {tuple(x.shape)}")
        enc = self.base_net
        # input reinforcement: the image average-pooled (3x3, stride 2, pad 1) to 1/4, 1/8, 1/16
        img2 = F.avg_pool2d(x, 3, stride=2, padding=1)
        img4 = F.avg_pool2d(img2, 3, stride=2, padding=1)
        img8 = F.avg_pool2d(img4, 3, stride=2, padding=1)
        img16 = F.avg_pool2d(img8, 3, stride=2, padding=1)

        e1 = enc.level1(x)                      # 1/2,  32 ch
        e2 = enc.level2_0(e1, img4)             # 1/4, 128 ch
        e3 = enc.level3_0(e2, img8)             # 1/8, 256 ch
        for block in enc.level3:
            e3 = block(e3)
        e4 = enc.level4_0(e3, img16)            # 1/16, 512 ch
        for block in enc.level4:
            e4 = block(e4)

        d = self.bu_dec_l1(e4)                  # 1/16, 64 ch
        d = self.bu_dec_l2(self.bu_br_l2(_up_to(d, e3) + self.merge_enc_dec_l2(e3)))  # 1/8, 48
        d = self.bu_dec_l3(self.bu_br_l3(_up_to(d, e2) + self.merge_enc_dec_l3(e2)))  # 1/4, 32
        d = self.bu_dec_l4(self.bu_br_l4(_up_to(d, e1) + self.merge_enc_dec_l4(e1)))  # 1/2, 20
        return F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=True)


# --- loading ------------------------------------------------------------------------------------

def check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], path: str) -> None:
    """Raise :class:`WeightsError` naming ``path`` unless ``sd`` has exactly ``model``'s keys and shapes."""
    check_strict_state_dict(model.state_dict(), sd, path, "not an ESPNetv2 s=2.0 Cityscapes (20-class) state dict")


def load_espnetv2(path: str | os.PathLike, device: str | torch.device = "cpu") -> ESPNetv2Segmentation:
    """Build :class:`ESPNetv2Segmentation` and load a checkpoint with strict key matching.

    Args:
        path: state-dict file, e.g. ``../shared/weights/espnetv2_s_2.0_city_1024x512.pth``
            (a ``{"state_dict": ...}`` wrapper and a ``module.`` prefix are accepted).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        WeightsError: missing/unreadable file, keys missing or unexpected, or wrong shapes (the
            message names the file).
    """
    if path is None or str(path) == "":
        raise WeightsError("espnetv2 needs a weight file, e.g. ../shared/weights/espnetv2_s_2.0_city_1024x512.pth")
    path = os.fspath(path)
    sd = load_state_dict_file(path, "ESPNetv2", strip_module_prefix=True)
    model = ESPNetv2Segmentation()
    check_state_dict(model, sd, path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. dtype trouble not caught above
        raise WeightsError(f"{path}: does not fit ESPNetv2: {exc}") from exc
    return model.to(resolve_device(device)).eval()


# --- segmentation backend -----------------------------------------------------------------------

class ESPNetv2Backend(SegmentationBackend):
    """Segmentation backend ``espnetv2``: ESPNetv2 s = 2.0 Cityscapes (Mehta et al., CVPR 2019),
    a :class:`~vpr_localizer.segmentation.base.SegmentationBackend`.

    ``backend(rgb)``: ``uint8 (H, W, 3)`` RGB -> ``uint8 (H, W)`` Cityscapes trainIds (0..18,
    19 = background/ignore). Steps, as the authors' ``test_segmentation.py``: resize to
    ``input_size`` with PIL bilinear (skipped when already that size), ``/ 255``, ImageNet
    mean/std (:meth:`preprocess`), the network (:meth:`logits`), then the base class's argmax
    over the 20 classes and nearest-neighbour resize of the labels back to ``(H, W)``.
    One image per call, under ``torch.inference_mode``.

    Args:
        weights: path of ``espnetv2_s_2.0_city_1024x512.pth`` (required; ``None`` raises).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        input_size: network input ``(width, height)`` in pixels, at least 16x16; default
            1024x512, the training size. Smaller (e.g. 512x256) is faster but less accurate;
            multiples of 16 are best (other sizes work: the skips are resampled to match).

    Attributes:
        model: the :class:`ESPNetv2Segmentation` in eval mode on ``device``.
        weights_path, device, input_size: see the base class.

    Raises:
        WeightsError: no weight file, or see :func:`load_espnetv2`.
        ConfigError: invalid ``input_size`` or ``device``.
        ImageLoadError: at call time, an image that is not a non-empty ``uint8 (H, W, 3)`` array.
    """

    name = "espnetv2"
    default_input_size = DEFAULT_INPUT_SIZE
    weights_hint = "espnetv2_s_2.0_city_1024x512.pth (the authors' Cityscapes checkpoint)"

    def __init__(self, weights: str | os.PathLike, device: str = "auto",
                 input_size: Optional[Sequence[int]] = None):
        super().__init__(weights, device=device, input_size=input_size)
        self.model = load_espnetv2(self.weights_path, self.device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """``uint8 (H, W, 3)`` RGB -> ``float32 (1, 3, h, w)`` network input at ``input_size``
        (RGB, ``/ 255``, ImageNet mean/std)."""
        x = self.image_tensor(self.resize_input(rgb)).div_(255.0)
        return (x - self._mean) / self._std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 (1, 3, h, w)`` from :meth:`preprocess` -> ``float32 (1, 20, h, w)`` logits
        (on the device)."""
        return self.model(x)
