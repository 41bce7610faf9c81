"""ESPNet semantic segmentation (Cityscapes, 20 outputs), our own implementation.

Architecture from Mehta, Rastegari, Caspi, Shapiro and Hajishirzi, "ESPNet: Efficient Spatial
Pyramid of Dilated Convolutions for Semantic Segmentation", ECCV 2018
(https://arxiv.org/abs/1803.06815). The module and tensor names follow the authors' reference
code (``sacmehta/ESPNet``, ``test/Model.py``, MIT licence) so that their pretrained state dicts
load with strict key matching; the code itself is written here.

Two networks, both with ``p = 2`` ESP modules at level 2 and ``q = 8`` at level 3 by default:

* :class:`ESPNetEncoder` -- ESPNet-C, the encoder alone. ``(B, 3, H, W) -> (B, 20, H/8, W/8)``
  logits (1/8 resolution; the authors upsample them bilinearly by 8 before the argmax, and so
  does :class:`ESPNetBackend`). Weights: ``../shared/weights/espnet_p2_q8_city_encoder.pth``.
* :class:`ESPNetSegmentation` -- ESPNet, the encoder plus the light reduce-upsample-merge
  decoder. ``(B, 3, H, W) -> (B, 20, H, W)`` logits at full input resolution (``H`` and ``W``
  must be multiples of 8). Weights: ``../shared/weights/espnet_p2_q8_city_decoder.pth``
  (tensor names prefixed ``encoder.`` for the encoder part).

Output channel ``c`` is Cityscapes trainId ``c`` (0..18), channel 19 is background/ignore, as in
:mod:`vpr_localizer.segmentation.classes`.

Input convention of the pretrained weights (``test/VisualizeResults.py`` of the reference):
BGR channel order, 0-255, minus the per-channel mean, divided by the per-channel std, then
divided by 255 (:data:`MEAN_BGR`, :data:`STD_BGR`), at 1024x512. In exact arithmetic the order
(normalise, resize, then /255) does not matter: all three are affine per channel and bilinear
weights sum to one; what matters is the resize filter and whether the image is rounded to uint8.

Resizing matters more than it looks. The label maps in ``../shared/weights/reference/`` were
produced from the 2048x1024 frames resized with PIL's bilinear filter on the ``uint8`` image
(which is anti-aliased: for a 2x reduction a 4-tap triangle filter) -- our network reproduces
them 100.000 % on all three frames that way. OpenCV's ``cv2.resize`` default (bilinear,
half-pixel centres, no anti-aliasing: a 2x2 box average at exactly 2x), which the authors'
script uses, gives only 98.6 / 99.5 / 99.2 %. :class:`ESPNetBackend` uses PIL by default
(``resize="pil"``); ``resize="cv2"`` is the OpenCV-style alternative.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.files import check_strict_state_dict, load_state_dict_file
from vpr_localizer.segmentation.base import SegmentationBackend

#: Number of network outputs: 19 Cityscapes trainIds + 19 = background/ignore.
NUM_OUTPUTS = 20
#: Per-channel mean of the training images, BGR order, 0-255 units (reference ``VisualizeResults.py``).
MEAN_BGR: Tuple[float, float, float] = (72.3923111, 82.90893555, 73.15840149)
#: Per-channel std of the training images, BGR order, 0-255 units.
STD_BGR: Tuple[float, float, float] = (45.3192215, 46.15289307, 44.91483307)
#: Network input size ``(width, height)`` the Cityscapes weights were trained and evaluated at.
DEFAULT_INPUT_SIZE: Tuple[int, int] = (1024, 512)
#: Input resize methods of :class:`ESPNetBackend` (see there).
RESIZE_MODES: Tuple[str, ...] = ("pil", "cv2")
#: Batch-norm epsilon of every BN layer of the reference.
_BN_EPS = 1e-3


# --- building blocks ---------------------------------------------------------------------------
# Submodule attribute names (conv, bn, act, c1, d1 ...) are the tensor names of the checkpoints.

def _conv(n_in: int, n_out: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """Bias-free ``k x k`` convolution with "same" padding (``dilation * (k - 1) / 2``)."""
    pad = dilation * ((k - 1) // 2)
    return nn.Conv2d(n_in, n_out, k, stride=stride, padding=pad, dilation=dilation, bias=False)


class ConvBNPReLU(nn.Module):
    """Convolution -> batch norm -> PReLU (the reference's ``CBR``)."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = _conv(n_in, n_out, k, stride)
        self.bn = nn.BatchNorm2d(n_out, eps=_BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BNPReLU(nn.Module):
    """Batch norm -> PReLU (the reference's ``BR``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class Conv(nn.Module):
    """A plain bias-free (optionally dilated) convolution held as ``.conv`` (the reference's
    ``C`` and ``CDilated``)."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = _conv(n_in, n_out, k, stride, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _SpatialPyramid(nn.Module):
    """Reduce -> split -> transform -> hierarchical merge, the core of an ESP module (paper Sec. 3.1).

    ``c1`` reduces ``n_in`` channels to ``n = n_out // 5`` (1x1, or 3x3 stride 2 when
    downsampling); five 3x3 convolutions with dilation 1, 2, 4, 8, 16 (``d1`` .. ``d16``) run in
    parallel on it, ``d1`` giving the remaining ``n_out - 4 n`` channels. The dilated outputs are
    summed cumulatively (d2, d2+d4, d2+d4+d8, d2+d4+d8+d16: hierarchical feature fusion, which
    removes gridding artefacts) and concatenated with ``d1`` to ``n_out`` channels.
    """

    def __init__(self, n_in: int, n_out: int, downsample: bool):
        super().__init__()
        n = n_out // 5
        n1 = n_out - 4 * n
        self.c1 = Conv(n_in, n, 3, 2) if downsample else Conv(n_in, n, 1, 1)
        self.d1 = Conv(n, n1, 3, 1, 1)
        self.d2 = Conv(n, n, 3, 1, 2)
        self.d4 = Conv(n, n, 3, 1, 4)
        self.d8 = Conv(n, n, 3, 1, 8)
        self.d16 = Conv(n, n, 3, 1, 16)

    def _pyramid(self, x: torch.Tensor) -> torch.Tensor:
        r = self.c1(x)
        s2 = self.d2(r)
        s4 = s2 + self.d4(r)
        s8 = s4 + self.d8(r)
        s16 = s8 + self.d16(r)
        return torch.cat([self.d1(r), s2, s4, s8, s16], 1)


class ESPDownsampler(_SpatialPyramid):
    """Strided ESP module (the reference's ``DownSamplerB``): ``(B, n_in, H, W) ->
    (B, n_out, ceil(H/2), ceil(W/2))``, pyramid then BN (``bn``) and PReLU (``act``)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, downsample=True)
        self.bn = nn.BatchNorm2d(n_out, eps=_BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self._pyramid(x)))


class ESPBlock(_SpatialPyramid):
    """ESP module (the reference's ``DilatedParllelResidualBlockB``): ``(B, n_in, H, W) ->
    (B, n_out, H, W)``; pyramid, plus the input when ``residual`` (needs ``n_in == n_out``), then
    BN + PReLU (``bn``, a :class:`BNPReLU`)."""

    def __init__(self, n_in: int, n_out: int, residual: bool = True):
        super().__init__(n_in, n_out, downsample=False)
        if residual and n_in != n_out:
            raise ValueError(f"a residual ESP block needs n_in == n_out, got {n_in} -> {n_out}")
        self.bn = BNPReLU(n_out)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._pyramid(x)
        if self.residual:
            y = y + x
        return self.bn(y)


class ImagePyramid(nn.Module):
    """Input image downsampled ``times`` times by 3x3 average pooling, stride 2, padding 1 (the
    reference's ``InputProjectionA``; no parameters). ``(B, 3, H, W) -> (B, 3, H/2^t, W/2^t)``."""

    def __init__(self, times: int):
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(times))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for p in self.pool:
            x = p(x)
        return x


# --- networks ----------------------------------------------------------------------------------

class ESPNetEncoder(nn.Module):
    """ESPNet-C (paper Fig. 4c): the ESPNet encoder with a 1x1 classifier at 1/8 resolution.

    Levels: ``level1`` (3x3 conv stride 2, 16 ch, 1/2) concatenated with the image at 1/2 ->
    ``b1`` (19 ch); ``level2_0`` (strided ESP, 64 ch, 1/4) then ``p`` ESP blocks ``level2``,
    concatenated with ``level2_0``'s output and the image at 1/4 -> ``b2`` (131 ch);
    ``level3_0`` (strided ESP, 128 ch, 1/8) then ``q`` ESP blocks ``level3``, concatenated with
    ``level3_0``'s output -> ``b3`` (256 ch); ``classifier`` (1x1 conv, ``classes`` ch).

    Args:
        classes: number of outputs (20 for the Cityscapes weights).
        p, q: number of ESP blocks at levels 2 and 3 (2 and 8 for the shared weights).

    ``forward``: ``float32 (B, 3, H, W)`` preprocessed image -> ``float32 (B, classes,
    ceil(H/8), ceil(W/8))`` logits at **1/8 resolution** (no upsampling; upsample bilinearly by 8
    before the argmax, as the authors do).
    """

    def __init__(self, classes: int = NUM_OUTPUTS, p: int = 2, q: int = 8):
        super().__init__()
        self.level1 = ConvBNPReLU(3, 16, 3, 2)
        self.sample1 = ImagePyramid(1)
        self.sample2 = ImagePyramid(2)
        self.b1 = BNPReLU(16 + 3)
        self.level2_0 = ESPDownsampler(16 + 3, 64)
        self.level2 = nn.ModuleList(ESPBlock(64, 64) for _ in range(p))
        self.b2 = BNPReLU(128 + 3)
        self.level3_0 = ESPDownsampler(128 + 3, 128)
        self.level3 = nn.ModuleList(ESPBlock(128, 128) for _ in range(q))
        self.b3 = BNPReLU(256)
        self.classifier = Conv(256, classes, 1, 1)

    def stages(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The encoder's intermediate maps (used by the decoder).

        Returns:
            ``l1`` ``(B, 16, H/2, W/2)`` level-1 output; ``l1_cat`` ``(B, 19, H/2, W/2)`` after
            ``b1``; ``l2_cat`` ``(B, 131, H/4, W/4)`` after ``b2``; ``l3_cat`` ``(B, 256, H/8,
            W/8)`` after ``b3`` (sizes rounded up).
        """
        l1 = self.level1(x)
        l1_cat = self.b1(torch.cat([l1, self.sample1(x)], 1))
        l2_0 = self.level2_0(l1_cat)
        l2 = l2_0
        for block in self.level2:
            l2 = block(l2)
        l2_cat = self.b2(torch.cat([l2, l2_0, self.sample2(x)], 1))
        l3_0 = self.level3_0(l2_cat)
        l3 = l3_0
        for block in self.level3:
            l3 = block(l3)
        l3_cat = self.b3(torch.cat([l3_0, l3], 1))
        return {"l1": l1, "l1_cat": l1_cat, "l2_cat": l2_cat, "l3_cat": l3_cat}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(x)["l3_cat"])


class ESPNetSegmentation(nn.Module):
    """ESPNet (paper Fig. 4d): :class:`ESPNetEncoder` plus the reduce-upsample-merge decoder.

    Decoder (names as in the checkpoint): the encoder's 1/8 logits go through ``br`` (BN) and
    ``up_l3`` (2x2 transposed conv) to 1/4; ``level3_C`` projects ``b2``'s 131 channels to
    ``classes``; both are concatenated and merged by ``combine_l2_l3`` (BN+PReLU, non-residual
    ESP block), upsampled to 1/2 by ``up_l2`` (transposed conv, BN+PReLU), concatenated with
    ``level1``'s 16-channel output (as in the authors' ``test/Model.py``; ``train/Model.py``'s
    19-channel variant does not fit these weights), fused by ``conv`` (3x3 CBR) and upsampled to
    full resolution by ``classifier`` (transposed conv).

    Args:
        classes, p, q: as in :class:`ESPNetEncoder`.

    ``forward``: ``float32 (B, 3, H, W)`` preprocessed image, ``H`` and ``W`` multiples of 8 ->
    ``float32 (B, classes, H, W)`` logits. Raises ``ValueError`` for other sizes.
    """

    def __init__(self, classes: int = NUM_OUTPUTS, p: int = 2, q: int = 8):
        super().__init__()
        self.encoder = ESPNetEncoder(classes, p, q)
        self.level3_C = Conv(128 + 3, classes, 1, 1)
        self.br = nn.BatchNorm2d(classes, eps=_BN_EPS)
        self.conv = ConvBNPReLU(16 + classes, classes, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False))
        self.combine_l2_l3 = nn.Sequential(BNPReLU(2 * classes), ESPBlock(2 * classes, classes, residual=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False), BNPReLU(classes))
        self.classifier = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"ESPNet expects (B, 3, H, W) with H, W multiples of 8, got {tuple(x.shape)}")
        s = self.encoder.stages(x)
        l3 = self.up_l3(self.br(self.encoder.classifier(s["l3_cat"])))                       # 1/4
        l2 = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(s["l2_cat"]), l3], 1)))  # 1/2
        return self.classifier(self.conv(torch.cat([l2, s["l1"]], 1)))                       # 1/1


# --- loading -----------------------------------------------------------------------------------

def _check_keys(model: nn.Module, sd: Dict[str, torch.Tensor], path: str, what: str) -> None:
    """Strict name and shape check with a readable :class:`WeightsError` (every parameter and
    running statistic must be present with its shape, nothing extra), with a hint when the file
    is the other ESPNet variant (with / without decoder)."""
    expected = model.state_dict()
    model_has_decoder = any(k.startswith("encoder.") for k in expected)

    def hint(unexpected):
        if not model_has_decoder and any(k.startswith("encoder.") for k in unexpected):
            return "; this looks like an ESPNet (with decoder) checkpoint: use decoder=True"
        if model_has_decoder and unexpected and all("encoder." + k in expected for k in unexpected):
            return "; this looks like an encoder-only ESPNet-C checkpoint: use decoder=False"
        return ""

    # BatchNorm's num_batches_tracked is a training counter that old checkpoints (PyTorch < 0.4,
    # like the authors') do not have; BatchNorm fills it in itself when it is absent.
    check_strict_state_dict(expected, sd, path, f"does not match {what}",
                            optional=lambda k: k.endswith(".num_batches_tracked"), hint=hint)


def load_espnet(path: str | os.PathLike, decoder: bool = True, device: str | torch.device = "cpu",
                p: int = 2, q: int = 8, classes: int = NUM_OUTPUTS) -> nn.Module:
    """Build ESPNet (``decoder=True``) or ESPNet-C (``decoder=False``) and load a state dict strictly.

    Args:
        path: ``.pth`` state dict, e.g. ``../shared/weights/espnet_p2_q8_city_decoder.pth``
            (decoder) or ``..._encoder.pth`` (ESPNet-C). A ``{"state_dict": ...}`` wrapper and a
            ``module.`` prefix on every key are accepted.
        decoder: which network.
        device: torch device of the returned model.
        p, q, classes: architecture (2, 8, 20 for the shared weights).

    Returns:
        :class:`ESPNetSegmentation` or :class:`ESPNetEncoder` in eval mode on ``device``.

    Raises:
        WeightsError: file missing, not loadable, not a tensor state dict, or any tensor name
            missing / unexpected / of the wrong shape; the message names the file.
    """
    path = os.fspath(path)
    model = ESPNetSegmentation(classes, p, q) if decoder else ESPNetEncoder(classes, p, q)
    what = f"{'ESPNet' if decoder else 'ESPNet-C'} (p={p}, q={q}, {classes} classes)"
    sd = load_state_dict_file(path, "ESPNet", strip_module_prefix=True)
    _check_keys(model, sd, path, what)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # pragma: no cover - _check_keys catches names and shapes first
        raise WeightsError(f"{path}: does not match {what}: {exc}") from exc
    return model.to(device).eval()


# --- segmentation backend ----------------------------------------------------------------------

class ESPNetBackend(SegmentationBackend):
    """Segmentation backend ``espnet``: ESPNet p = 2, q = 8 Cityscapes (Mehta et al., ECCV 2018),
    a :class:`~vpr_localizer.segmentation.base.SegmentationBackend`.

    ``backend(rgb)`` takes a ``uint8 (H, W, 3)`` RGB image and returns ``uint8 (H, W)`` Cityscapes
    trainIds (0..18, 19 = background/ignore):

    1. Resize to ``input_size`` (:meth:`preprocess`): ``resize="pil"`` (default) is PIL's
       bilinear resize of the ``uint8`` RGB image (anti-aliased when reducing, result rounded
       to ``uint8``), exactly how the authors' reference label maps were made (100 % pixel
       agreement); ``resize="cv2"`` is ``cv2.resize``'s default ``INTER_LINEAR`` (bilinear,
       half-pixel centres, no anti-aliasing, in float), as in the authors'
       ``VisualizeResults.py`` (98.6-99.5 % agreement with the reference). The aspect ratio is
       not preserved (Cityscapes frames are 2:1 like 1024x512).
    2. RGB -> BGR, ``((x - MEAN_BGR) / STD_BGR) / 255`` (:meth:`preprocess`).
    3. The network (:meth:`logits`); for ESPNet-C (``decoder=False``) the 1/8 logits are
       upsampled bilinearly by 8 to ``input_size`` (as the authors do).
    4. The base class's argmax over the 20 classes and nearest-neighbour resize of the labels
       back to ``(H, W)``, under ``torch.inference_mode``.

    Args:
        weights: state-dict path (``espnet_p2_q8_city_decoder.pth``, or ``..._encoder.pth``
            with ``decoder=False``).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        input_size: network input ``(width, height)``, multiples of 8 (at least 8x8); the
            weights were trained at the default 1024x512.
        decoder: ESPNet (True) or the encoder-only ESPNet-C (False; faster, coarser).
        resize: ``"pil"`` or ``"cv2"`` (step 1).

    Attributes:
        name: ``"espnet"``.
        model: :class:`ESPNetSegmentation` or :class:`ESPNetEncoder`, eval mode, on ``device``.
        weights_path, device, input_size: see the base class.

    Raises:
        WeightsError: no weight file, or a missing or mismatching one (from :func:`load_espnet`).
        ConfigError: bad ``input_size``, ``device`` or ``resize``.
        ImageLoadError: at call time, an image that is not a non-empty ``uint8 (H, W, 3)`` array.
    """

    name = "espnet"
    default_input_size = DEFAULT_INPUT_SIZE
    input_multiple = 8
    min_input_side = 8
    weights_hint = "espnet_p2_q8_city_decoder.pth (or ..._encoder.pth with decoder=False)"

    def __init__(self, weights: str | os.PathLike, device: str = "auto",
                 input_size: Optional[Sequence[int]] = None, decoder: bool = True, resize: str = "pil"):
        super().__init__(weights, device=device, input_size=input_size)
        if resize not in RESIZE_MODES:
            raise ConfigError(f"espnet resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        self.resize = resize
        self.decoder = bool(decoder)
        self.model = load_espnet(self.weights_path, decoder=self.decoder, device=self.device)
        self._mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_BGR, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """``uint8 (H, W, 3)`` RGB -> ``float32 (1, 3, h, w)`` BGR network input at ``input_size``
        (steps 1-2)."""
        w, h = self.input_size
        if self.resize == "pil":
            rgb = self.resize_input(rgb)
        x = self.image_tensor(np.ascontiguousarray(rgb[:, :, ::-1]))  # BGR, a copy
        if x.shape[-2:] != (h, w):  # resize == "cv2"
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean) / self._std / 255.0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 (1, 3, h, w)`` from :meth:`preprocess` -> ``float32 (1, 20, h, w)`` logits at
        ``input_size`` (ESPNet-C's 1/8 output upsampled bilinearly by 8)."""
        out = self.model(x)
        if not self.decoder:
            out = F.interpolate(out, scale_factor=8, mode="bilinear", align_corners=False)
        return out

    def _repr_options(self) -> Dict[str, object]:
        return {"decoder": self.decoder, "resize": self.resize}
