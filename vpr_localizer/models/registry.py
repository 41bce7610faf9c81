"""Registries of the encoder's building blocks: backbones and aggregators.

A new backbone or aggregator is a new module plus one entry here (the pattern of hloc's
extractors, Sarlin et al., CVPR 2019): the :class:`~vpr_localizer.models.encoder.Encoder`, the
encoder fingerprint, checkpoint loading, k-means initialisation and the command line's
``choices`` all read these tables, so none of them dispatches on names or classes.

Every aggregator module follows one small protocol (duck typing, no ``isinstance``):

* ``forward(features, weights=None)`` with ``features`` a ``(B, C, h, w)`` tensor, or, for an
  aggregator whose spec says ``takes_streams``, a
  :class:`~vpr_localizer.models.guided.StreamFeatures`;
* ``extra_state() -> dict`` / ``load_extra_state(dict)``: plain numbers that belong in a
  checkpoint beside the state dict (NetVLAD's soft-assignment sharpness alpha);
* for aggregators that need fitting: ``kmeans_targets() -> [(stream name, NetVLAD), ...]``;
* optionally ``weight_maps(StreamFeatures)``: the per-stream location weights it applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.files import load_state_dict_file, sha256_file
from vpr_localizer.models import aggregation, backbones, dinov2, guided


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    Attributes:
        name: registry name (``--backbone``, ``encoder.backbone``, fingerprint ``backbone``).
        build_body: ``(state_dict, path) -> nn.Module`` mapping ``(B, 3, H, W)`` preprocessed
            float32 to ``(B, out_channels, H / stride, W / stride)`` features; raises
            :class:`~vpr_localizer.errors.WeightsError` when the tensors do not fit.
        out_channels: local-feature dimension C.
        stride: output stride, pixels.
        default_preprocessing: name in :data:`~vpr_localizer.models.backbones.PREPROCESSING`.
        default_weights: ``() -> path | None``: a weight file shipped by a Python package.
        reference: the paper.
        weight_file: conventional file name of the weights in a weights folder
            (``$VPR_WEIGHTS_DIR`` or ``../shared/weights``; :mod:`vpr_localizer.weights_path`),
            used when no path is given and no packaged default exists.
        input_multiple: both sides of the network input (``image_size``) must be multiples of
            this many pixels (14 for a ViT with 14-px patches; 1 = any size). Checked when an
            :class:`~vpr_localizer.models.config.EncoderConfig` is constructed.
        tail_start: index of the first layer of the trainable last block in the body (an
            ``nn.Sequential``), or None when the backbone cannot be fine-tuned: training caches
            the features before it and trains it with the aggregator
            (:mod:`vpr_localizer.training.train`).
        tail_name: the tail's layers, for messages (``conv5_1..conv5_3``).
        tail_blocks: every block training may start from, ``(block, first layer index,
            layers)``, the default (``tail_start``) included: VGG16 ``conv5`` (24) and ``conv4``
            (17, conv4_1..conv5_3: end-to-end fine-tuning of the last two blocks).
    """

    name: str
    build_body: Callable[[Dict[str, torch.Tensor], str], nn.Module]
    out_channels: int
    stride: int
    default_preprocessing: str
    default_weights: Callable[[], Optional[str]] = lambda: None
    reference: str = ""
    weight_file: Optional[str] = None
    input_multiple: int = 1
    tail_start: Optional[int] = None
    tail_name: str = ""
    tail_blocks: Tuple[Tuple[str, int, str], ...] = ()


@dataclass(frozen=True)
class AggregatorSpec:
    """A registered aggregator (local features -> one global descriptor).

    Attributes:
        name: registry name (``--aggregator``, ``encoder.aggregator``, fingerprint ``aggregator``).
        build: ``(config, local_dim) -> nn.Module`` (config: an
            :class:`~vpr_localizer.models.config.EncoderConfig`).
        out_dim: ``(config, local_dim) -> int``: the raw descriptor dimension (before PCA).
        needs_fitting: True when the module must be initialised on map images (k-means) or
            loaded from a checkpoint before it can describe anything.
        fingerprint_fields: ``config -> dict``: the configuration values that are part of the
            encoder's identity beside the parameter hash (e.g. ``num_clusters``).
        takes_streams: ``forward`` takes :class:`~vpr_localizer.models.guided.StreamFeatures`
            (image and segmentation streams, static mask) instead of one feature tensor.
        reference: the paper.
    """

    name: str
    build: Callable[[object, int], nn.Module]
    out_dim: Callable[[object, int], int]
    needs_fitting: bool
    fingerprint_fields: Callable[[object], Dict]
    takes_streams: Callable[[object], bool] = lambda config: False
    reference: str = ""


_BACKBONES: Dict[str, BackboneSpec] = {}
_AGGREGATORS: Dict[str, AggregatorSpec] = {}


def register_backbone(spec: BackboneSpec) -> None:
    """Add (or replace) a backbone."""
    _BACKBONES[spec.name] = spec


def register_aggregator(spec: AggregatorSpec) -> None:
    """Add (or replace) an aggregator."""
    _AGGREGATORS[spec.name] = spec


def backbone_names() -> Tuple[str, ...]:
    """Every registered backbone name, in registration order."""
    return tuple(_BACKBONES)


def aggregator_names() -> Tuple[str, ...]:
    """Every registered aggregator name, in registration order."""
    return tuple(_AGGREGATORS)


def preprocessing_names() -> Tuple[str, ...]:
    """Every input convention a backbone's weights may expect."""
    return tuple(backbones.PREPROCESSING)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``.

    Raises:
        WeightsError: unknown name (the message lists the registered ones).
    """
    if name not in _BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(_BACKBONES)}")
    return _BACKBONES[name]


def aggregator_spec(name: str) -> AggregatorSpec:
    """The spec of aggregator ``name``.

    Raises:
        ConfigError: unknown name (the message lists the registered ones).
    """
    if name not in _AGGREGATORS:
        raise ConfigError(f"unknown aggregator {name!r}; choose one of {', '.join(_AGGREGATORS)}")
    return _AGGREGATORS[name]


def default_backbone_weights(name: str) -> Optional[str]:
    """The weight file backbone ``name`` uses when none is given.

    The spec's packaged default first (e.g. EfficientNet-Lite0's), else its conventional
    :attr:`BackboneSpec.weight_file` in ``$VPR_WEIGHTS_DIR``, then in ``../shared/weights`` beside
    the repository (:func:`vpr_localizer.weights_path.find_weight_file`).

    Returns:
        The path, or None when the backbone has neither a packaged default nor a conventional
        file name.

    Raises:
        WeightsError: unknown backbone, or the conventional file is in none of the folders (the
            message lists where it looked).
    """
    from vpr_localizer.weights_path import find_weight_file

    spec = backbone_spec(name)
    packaged = spec.default_weights()
    if packaged is not None:
        return packaged
    if spec.weight_file is None:
        return None
    return find_weight_file(spec.weight_file, f"{name} backbone")


def build_backbone(name: str, weights: Optional[str] = None,
                   preprocessing: Optional[str] = None) -> backbones.Backbone:
    """Build a backbone and load its weights from a file.

    Args:
        name: a registered backbone (:func:`backbone_names`).
        weights: weight file; ``None`` uses the spec's packaged default (vgg16 has none; the
            command line fills in :func:`default_backbone_weights` beforehand).
        preprocessing: ``caffe_bgr`` | ``torchvision`` | ``efficientnet_lite``; ``None`` uses the
            backbone's default (``caffe_bgr`` for vgg16, matching
            ``vgg16_features_imagenet_caffe_bgr.pth``; use ``torchvision`` for a torchvision
            ``vgg16`` state dict).

    Returns:
        A :class:`Backbone` in eval mode on CPU.

    Raises:
        WeightsError: unknown backbone, missing/corrupt weight file, or tensor names/shapes
            that do not fit the architecture.
    """
    spec = backbone_spec(name)
    path = weights or spec.default_weights()
    if path is None:
        raise WeightsError(f"backbone {name} needs a weight file (e.g. "
                           "../shared/weights/vgg16_features_imagenet_caffe_bgr.pth)")
    pre_name = preprocessing or spec.default_preprocessing
    if pre_name not in backbones.PREPROCESSING:
        raise WeightsError(f"unknown preprocessing {pre_name!r}; choose one of {', '.join(backbones.PREPROCESSING)}")
    body = spec.build_body(load_state_dict_file(path, name), path)
    return backbones.Backbone(name, body, spec.out_channels, spec.stride, backbones.PREPROCESSING[pre_name],
                              sha256_file(path), path, tail_start=spec.tail_start, tail_name=spec.tail_name,
                              tail_blocks=spec.tail_blocks).eval()


# --- the entries -------------------------------------------------------------------------------

register_backbone(BackboneSpec(
    "vgg16", backbones.build_vgg16_body, 512, 16, "caffe_bgr",
    reference="Simonyan & Zisserman, ICLR 2015, cut at conv5_3 as in NetVLAD (Arandjelovic et al., CVPR 2016)",
    weight_file="vgg16_features_imagenet_caffe_bgr.pth",
    tail_start=24, tail_name="conv5_1..conv5_3",  # torchvision features[24:29]: conv5_1, relu, conv5_2, relu, conv5_3
    tail_blocks=(("conv5", 24, "conv5_1..conv5_3"), ("conv4", 17, "conv4_1..conv5_3"))))  # 17: after pool3
register_backbone(BackboneSpec(
    "efficientnet_lite0", backbones.build_efficientnet_lite0_body, 1280, 32, "efficientnet_lite",
    default_weights=backbones.efficientnet_lite0_packaged_weights,
    reference="Tan & Le, ICML 2019 (EfficientNet), Lite variant"))
# DINOv2 ViT-S/14 patch tokens, AnyLoc-style (vpr_localizer.models.dinov2): one name per block
# (0-based), so the block is part of the encoder fingerprint; "dinov2_vits14" is pinned to
# dinov2.DEFAULT_BLOCK, the block chosen by benchmarks/sweep_dinov2_blocks.py.
for _block in range(dinov2.DEPTH):
    register_backbone(BackboneSpec(
        f"dinov2_vits14_b{_block}", partial(dinov2.build_dinov2_vits14_body, block=_block), dinov2.EMBED_DIM,
        dinov2.PATCH_SIZE, "torchvision", reference=f"{dinov2.REFERENCE}; block {_block}",
        weight_file=dinov2.WEIGHT_FILE, input_multiple=dinov2.PATCH_SIZE))
register_backbone(BackboneSpec(
    "dinov2_vits14", partial(dinov2.build_dinov2_vits14_body, block=dinov2.DEFAULT_BLOCK), dinov2.EMBED_DIM,
    dinov2.PATCH_SIZE, "torchvision", reference=f"{dinov2.REFERENCE}; block {dinov2.DEFAULT_BLOCK}",
    weight_file=dinov2.WEIGHT_FILE, input_multiple=dinov2.PATCH_SIZE))


def _build_netvlad(config, local_dim: int) -> nn.Module:
    if config.guided:
        return guided.GuidedNetVLAD(config.num_clusters, local_dim, seg_stream=config.seg_stream,
                                    attention=config.attention, static_mask=config.static_mask)
    return aggregation.NetVLAD(config.num_clusters, local_dim)


register_aggregator(AggregatorSpec(
    "netvlad", _build_netvlad,
    out_dim=lambda config, d: config.num_clusters * d * (2 if config.guided and config.seg_stream else 1),
    needs_fitting=True,
    fingerprint_fields=lambda config: {"num_clusters": int(config.num_clusters)},
    takes_streams=lambda config: bool(config.guided),
    reference="Arandjelovic et al., CVPR 2016; guided variant: vpr_localizer.models.guided"))
register_aggregator(AggregatorSpec(
    "gem", lambda config, d: aggregation.GeM(), out_dim=lambda config, d: d, needs_fitting=False,
    fingerprint_fields=lambda config: {"num_clusters": 0},
    reference="Radenovic et al., TPAMI 2019"))
register_aggregator(AggregatorSpec(
    "gap", lambda config, d: aggregation.GlobalAvgPool(), out_dim=lambda config, d: d, needs_fitting=False,
    fingerprint_fields=lambda config: {"num_clusters": 0},
    reference="global average pooling (baseline)"))
