"""Global-descriptor encoder: backbone -> aggregation (NetVLAD / GeM / GAP) -> PCA whitening.

The encoder is the only place where images become descriptors; map building, offline
localisation, evaluation and the ROS attention node all go through it, so they agree bit
for bit. Its identity is its *fingerprint* (backbone, weight hash, preprocessing, input size,
aggregator parameters, PCA): a map stores the fingerprint of the encoder that built it and
refuses descriptors from any other.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from vpr_localizer.device import resolve_device
from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.files import sha256_file
from vpr_localizer.io.image_files import iter_image_batches, resize_image
from vpr_localizer.models.aggregation import GeM, GlobalAvgPool
from vpr_localizer.models.backbones import Backbone
from vpr_localizer.trained import resolve_checkpoint
from vpr_localizer.models.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint,
                                             state_hash)
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.fitting import fit_pca_whitening, init_netvlad_by_kmeans, sample_stream_features
from vpr_localizer.models.guided import StreamFeatures, resize_labels, static_feature_weights
from vpr_localizer.models.pca import PCAWhitening
from vpr_localizer.models.registry import aggregator_spec, build_backbone

LOG = logging.getLogger(__name__)


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
        seconds_per_image: mean wall time per encoded image (decode + resize + network), s;
            without the time spent in an ``on_batch`` callback.
        callback_seconds: total wall time spent in the ``on_batch`` callback, s (0 without one).
    """

    descriptors: np.ndarray
    raw: np.ndarray
    extras: Dict[str, np.ndarray]
    ok: List[int]
    skipped: List[Tuple[str, str]]
    seconds_per_image: float
    callback_seconds: float = 0.0


@dataclass
class EncodedBatch:
    """One batch through :meth:`Encoder.encode_batch`.

    Attributes:
        descriptors: ``(B, dim)`` float32 final descriptors (after PCA when the encoder has one).
        raw: ``(B, raw_dim)`` float32 aggregator output before PCA.
        features: the backbone features of every stream (``features.image`` is ``(B, C, h, w)``).
    """

    descriptors: np.ndarray
    raw: np.ndarray
    features: StreamFeatures


class Encoder:
    """Image -> global descriptor, on CPU or CUDA.

    Args:
        config: :class:`EncoderConfig`.
        backbone: an already built backbone to share (e.g. between nodes); None builds one. It
            is never changed: a checkpoint with a fine-tuned tail gets a copy.

    Raises:
        WeightsError: bad backbone weights or checkpoint.
        ValueError: bad configuration values.
    """

    def __init__(self, config: EncoderConfig, backbone: Optional[Backbone] = None):
        spec = aggregator_spec(config.aggregator)
        if len(config.image_size) != 2 or min(config.image_size) < 16:
            raise ValueError(f"image_size must be (width, height) >= 16 px, got {config.image_size}")
        if config.needs_labels and str(config.segmentation).lower() == "none":
            raise ConfigError("static_mask / seg_stream need a segmentation backend: set encoder "
                              "segmentation (e.g. espnetv2) and segmentation_weights")
        self.config = config
        self.device = resolve_device(config.device)
        # a backbone passed in may be shared: it is copied before a checkpoint changes its tail
        self._owns_backbone = backbone is None
        self.backbone = backbone or build_backbone(config.backbone, config.weights, config.preprocessing)
        self.backbone.to(self.device).eval()
        self._segmenter = None
        self.segmentation_sha256 = (sha256_file(config.segmentation_weights)
                                    if config.needs_labels and config.segmentation_weights
                                    and os.path.isfile(config.segmentation_weights) else None)
        self.aggregator_spec = spec
        self.aggregator: nn.Module = spec.build(config, self.backbone.out_channels)
        self.aggregator.to(self.device).eval()
        self.pca: Optional[PCAWhitening] = None
        self.trained = not spec.needs_fitting  # e.g. GeM/GAP need no fitting
        checkpoint = resolve_checkpoint(config.checkpoint)
        if checkpoint:
            self.load_checkpoint_state(load_checkpoint(checkpoint))

    # --- dimensions and identity ---------------------------------------------------

    @property
    def raw_dim(self) -> int:
        """Aggregator output dimension (K*D for NetVLAD, 2*K*D with the segmentation stream, D for GeM/GAP)."""
        return int(self.aggregator_spec.out_dim(self.config, self.backbone.out_channels))

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
            (0 = none) and params_sha256 (hash of the aggregator and PCA parameters); with a
            fine-tuned backbone tail (a trained checkpoint) also backbone_tail (its layers) and
            backbone_tail_sha256 (hash of its parameters).
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
            **self.aggregator_spec.fingerprint_fields(self.config),
            "local_dim": int(self.backbone.out_channels),
            "raw_dim": int(self.raw_dim),
            "descriptor_dim": int(self.dim),
            "pca_dim": int(self.pca.dim) if self.pca is not None else 0,
            "params_sha256": state_hash(params),
            **({"guidance": self.guidance()} if self.config.guided else {}),
            **({"backbone_tail": self.backbone.tail_name,
                "backbone_tail_sha256": state_hash(self.backbone.tail_state())} if self.backbone.tail_tuned else {}),
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
                # a fine-tuned last block (NetVLAD's conv5 training), float16 on disk
                **({"tail": {"start": int(self.backbone.tail_start), "name": self.backbone.tail_name,
                             "state_dict": {k: v.half() for k, v in self.backbone.tail_state().items()}}}
                   if self.backbone.tail_tuned else {}),
            },
            "aggregator": {
                "type": self.config.aggregator,
                "num_clusters": int(self.config.num_clusters),
                "alpha": 0.0,
                **self._extra_state(),
                "state_dict": self.aggregator_state(),
                "guidance": self.guidance() if self.config.guided else None,
            },
            "pca": None if self.pca is None else {
                k: _compact(torch.from_numpy(np.atleast_1d(np.asarray(v, np.float32))))
                for k, v in self.pca.state().items()
            },
            "fingerprint": self.fingerprint(),
        }

    def save_checkpoint(self, path: str) -> None:
        """Write the checkpoint atomically (temporary file, then rename)."""
        save_checkpoint(self.checkpoint_state(), path)

    def _extra_state(self) -> Dict:
        """The aggregator's plain-number state for a checkpoint (e.g. NetVLAD's alpha); {} if none."""
        extra = getattr(self.aggregator, "extra_state", None)
        return dict(extra()) if extra is not None else {}

    def load_checkpoint_state(self, ckpt: Dict) -> None:
        """Load aggregator, PCA and a fine-tuned backbone tail from a checkpoint dictionary.

        A checkpoint without PCA holds only resolution-independent parameters (NetVLAD,
        attention, conv layers): it may run at another input size (trained on 128x64 Nordland
        thumbnails, used at 640x360); the map fingerprint records the size actually used. PCA
        whitening is fitted on descriptors of one input size, so a checkpoint with PCA does not
        load at another.

        Raises:
            WeightsError: wrong format, another backbone/weights/preprocessing/input size, or
                tensors that do not fit (aggregator, backbone tail).
        """
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise WeightsError("not a vpr_localizer encoder checkpoint")
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise WeightsError(f"unsupported encoder checkpoint version {ckpt.get('version')}")
        bb = ckpt["backbone"]
        mine = {"name": self.backbone.name, "weights_sha256": self.backbone.weights_sha256,
                "preprocessing": self.backbone.preprocessing.name,
                "image_size": [int(v) for v in self.config.image_size]}
        # A checkpoint without PCA holds only resolution-independent parameters (NetVLAD, attention,
        # conv layers): it may run at another input size (e.g. trained on 128x64 thumbnails, used at 640x360).
        size_free = ckpt.get("pca") is None
        diffs = [f"{k}: checkpoint {bb.get(k)!r} vs running {v!r}" for k, v in mine.items()
                 if (list(bb.get(k)) if k == "image_size" else bb.get(k)) != v
                 and not (k == "image_size" and size_free)]
        if diffs:
            raise WeightsError("encoder checkpoint does not match the configured backbone (" +
                               "; ".join(diffs) + ")")
        agg = ckpt["aggregator"]
        if agg is None:  # backbone-only: a fine-tuned tail; the aggregator is fitted on each map (k-means)
            if ckpt.get("pca") is not None or bb.get("tail") is None:
                raise WeightsError("a checkpoint without an aggregator must hold a backbone tail and no PCA")
            self._load_tail(bb["tail"])
            return
        if agg["type"] != self.config.aggregator or (
                self.aggregator_spec.fingerprint_fields(self.config).get("num_clusters", 0)
                and int(agg["num_clusters"]) != int(self.config.num_clusters)):
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
        load_extra = getattr(self.aggregator, "load_extra_state", None)
        if load_extra is not None:
            load_extra({k: v for k, v in agg.items() if k not in ("type", "num_clusters", "state_dict", "guidance")})
        if bb.get("tail") is not None:
            self._load_tail(bb["tail"])
        pca = ckpt.get("pca")
        self.pca = None if pca is None else PCAWhitening.from_state(
            {k: (v.numpy() if k != "eps" else float(v.reshape(-1)[0])) for k, v in pca.items()})
        self.aggregator.to(self.device)
        self.trained = True

    def _load_tail(self, tail: Dict) -> None:
        """Load a checkpoint's fine-tuned backbone tail (``{"start", "name", "state_dict"}``):
        conv5 (the shipped one) or a longer one (``train --train-from conv4``).

        Raises:
            WeightsError: no block of this backbone starts there (or it has none), or the
                tensors do not fit.
        """
        if not self.backbone.has_tail:
            raise WeightsError(f"checkpoint fine-tunes {self.backbone.name} from layer {tail.get('start')}, "
                               "but this backbone has no trainable tail")
        if int(tail.get("start", -1)) != int(self.backbone.tail_start):
            self.own_backbone().set_tail_start(int(tail.get("start", -1)))
        self.own_backbone().load_tail_state(tail["state_dict"])

    def own_backbone(self) -> Backbone:
        """This encoder's backbone, copied first when it was passed in (possibly shared with
        other encoders), so that changing it (loading or training a tail) changes no one else's."""
        if not self._owns_backbone:
            import copy

            self.backbone = copy.deepcopy(self.backbone)
            self._owns_backbone = True
        return self.backbone

    # --- the network ------------------------------------------------------------------

    @torch.no_grad()
    def feature_maps(self, images: np.ndarray, pre_tail: bool = False) -> torch.Tensor:
        """Backbone features of a batch.

        Args:
            images: ``uint8`` ``(B, H, W, 3)`` RGB, already at ``config.image_size``.
            pre_tail: stop before the backbone's trainable tail (VGG16: the pool4 output, the
                input of conv5_1), as training caches them.

        Returns:
            ``float32`` ``(B, C, h, w)`` on the encoder's device.

        Raises:
            WeightsError: ``pre_tail`` on a backbone without a tail.
        """
        x = self.backbone.preprocessing(images, self.device)
        return self.backbone.front(x) if pre_tail else self.backbone(x)

    @property
    def segmenter(self):
        """The segmentation backend that labels images for a guided encoder (built on first use).

        Raises:
            WeightsError: backend unknown or its weights missing/unloadable.
        """
        if self._segmenter is None:
            from vpr_localizer.segmentation.registry import make_backend

            cfg = self.config
            self._segmenter = make_backend(cfg.segmentation, weights=cfg.segmentation_weights,
                                           device=str(self.device), input_size=tuple(cfg.segmentation_size))
        return self._segmenter

    def prepare_labels(self, labels: Sequence[np.ndarray]) -> np.ndarray:
        """Label maps of any size -> ``uint8 (B, H, W)`` at ``config.image_size``
        (:func:`~vpr_localizer.models.guided.resize_labels`)."""
        return resize_labels(labels, self.config.image_size)

    def label_images(self, images: np.ndarray) -> np.ndarray:
        """Segment a batch: ``uint8 (B, H, W, 3)`` RGB -> ``uint8 (B, H, W)`` trainIds (same size)."""
        return np.stack([np.asarray(self.segmenter(im), np.uint8) for im in images]) if len(images) else \
            np.zeros((0,) + images.shape[1:3], np.uint8)

    @torch.no_grad()
    def stream_features(self, images: np.ndarray, labels: Optional[Sequence[np.ndarray]] = None,
                        pre_tail: bool = False) -> StreamFeatures:
        """Backbone features of every stream the encoder uses.

        Args:
            images: ``uint8 (B, H, W, 3)`` RGB at ``config.image_size``.
            labels: ``(H_i, W_i)`` trainId maps for the images (any size); None = run the
                encoder's segmentation backend when the encoder needs labels.
            pre_tail: image and segmentation streams stop before the backbone's trainable tail
                (:meth:`feature_maps`); the tail keeps the grid, so ``static`` is unchanged.

        Returns:
            :class:`~vpr_localizer.models.guided.StreamFeatures` (``seg``/``static`` None when unused).
        """
        feats = StreamFeatures(self.feature_maps(images, pre_tail))
        if not self.config.needs_labels:
            return feats
        lab = self.label_images(images) if labels is None else self.prepare_labels(labels)
        if self.config.static_mask:
            feats.static = static_feature_weights(lab, tuple(feats.image.shape[-2:]), device=self.device)
        if self.config.seg_stream:
            from vpr_localizer.segmentation.classes import colorize

            feats.seg = self.feature_maps(np.stack([colorize(x) for x in lab]), pre_tail)
        return feats

    @torch.no_grad()
    def aggregate(self, features, weights: Optional[torch.Tensor] = None) -> np.ndarray:
        """Features -> ``(B, raw_dim)`` float32 (before PCA), on CPU.

        Args:
            features: ``(B, C, h, w)`` image-stream features, or :class:`StreamFeatures`
                (required by a guided encoder).
            weights: optional ``(B, 1, h, w)`` per-location weights (plain aggregators only).
        """
        streams = features if isinstance(features, StreamFeatures) else StreamFeatures(features)
        if self.aggregator_spec.takes_streams(self.config):
            return self.aggregator(streams).float().cpu().numpy()
        return self.aggregator(streams.image, weights).float().cpu().numpy()

    @torch.no_grad()
    def attention_maps(self, features: StreamFeatures) -> Dict[str, Optional[torch.Tensor]]:
        """The NetVLAD weight map of each stream, ``(B, 1, h, w)`` (None: uniform / no such stream)."""
        weight_maps = getattr(self.aggregator, "weight_maps", None)
        return weight_maps(features) if weight_maps is not None else {"image": None, "seg": None}

    def apply_pca(self, raw: np.ndarray) -> np.ndarray:
        """``(N, raw_dim)`` -> ``(N, dim)``; identity when the encoder has no PCA."""
        return raw.astype(np.float32) if self.pca is None else self.pca.transform(raw)

    def features(self, images: Sequence[np.ndarray], labels: Optional[Sequence[np.ndarray]] = None) -> StreamFeatures:
        """First half of the descriptor pass: resize to ``config.image_size`` and run the backbone
        (and, for a guided encoder, the segmentation stream and static mask).

        Args:
            images: ``uint8 (H_i, W_i, 3)`` RGB arrays of any size, or a ``(B, H, W, 3)`` batch.
            labels: their ``(H_i, W_i)`` trainId maps (any size) for a guided encoder; None = the
                encoder segments the images itself when it needs labels.

        Returns:
            :class:`~vpr_localizer.models.guided.StreamFeatures`; ``image`` is ``(B, C, h, w)``.

        Raises:
            ImageLoadError: an array is not a valid RGB image.
            ValueError: as many label maps as images are required.
        """
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} label maps for {len(images)} images")
        batch = [resize_image(im, self.config.image_size) for im in images]
        # a read-only view of a message buffer cannot be handed to torch without a copy
        batch = np.stack([im if im.flags.writeable else im.copy() for im in batch])
        return self.stream_features(batch, labels)

    def describe(self, features) -> Tuple[np.ndarray, np.ndarray]:
        """Second half of the descriptor pass: aggregation, then PCA whitening.

        Args:
            features: :class:`StreamFeatures` from :meth:`features`, or ``(B, C, h, w)``
                image-stream feature maps (plain encoders, e.g. buffered by a live bootstrap).

        Returns:
            ``(descriptors (B, dim), raw (B, raw_dim))``, float32.

        Raises:
            RuntimeError: the encoder is NetVLAD and has not been fitted (see :meth:`fit_aggregator`).
        """
        self._require_trained()
        raw = self.aggregate(features)
        return self.apply_pca(raw), raw

    def encode_batch(self, images: Sequence[np.ndarray], labels: Optional[Sequence[np.ndarray]] = None) -> EncodedBatch:
        """The descriptor pass, the one entry point used by the offline encoder, the attention node
        and the live map builder: :meth:`features` then :meth:`describe`.

        Args:
            images: ``uint8 (H_i, W_i, 3)`` RGB arrays (any size; resized here), one batch.
            labels: see :meth:`features`.

        Returns:
            :class:`EncodedBatch` (descriptors ``(B, dim)``, raw ``(B, raw_dim)``, the features).

        Raises:
            ImageLoadError, ValueError, RuntimeError: see :meth:`features` and :meth:`describe`.
        """
        self._require_trained()
        feats = self.features(images, labels)
        desc, raw = self.describe(feats)
        return EncodedBatch(desc, raw, feats)

    def encode_images(self, images: Sequence[np.ndarray], labels: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """Encode in-memory images (any size; resized here) in batches of ``config.batch_size``.

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
        bs = self.config.batch_size
        return np.concatenate([
            self.encode_batch(images[s:s + bs], None if labels is None else labels[s:s + bs]).descriptors
            for s in range(0, len(images), bs)])

    def _require_trained(self) -> None:
        if not self.trained:
            raise RuntimeError("NetVLAD encoder is not initialised: call fit() on map images "
                               "or load a checkpoint")

    def encode_paths(self, paths: Sequence[str], extra_heads: Optional[Dict[str, nn.Module]] = None,
                     progress: Optional[str] = None,
                     on_batch: Optional[Callable[[List[int], EncodedBatch], None]] = None) -> EncodeResult:
        """Encode image files in batches, skipping unreadable ones with a warning.

        Args:
            paths: image files.
            extra_heads: name -> aggregation module (e.g. ``GeM()``) applied to the same feature
                maps, for baselines computed in the same pass.
            progress: tqdm description; None disables the bar.
            on_batch: called after each batch with the batch's indices into ``paths`` and its
                :class:`EncodedBatch` (descriptors and feature maps), e.g. to compute
                Patch-NetVLAD descriptors from the same feature maps; its time is reported
                separately (``callback_seconds``).

        Returns:
            :class:`EncodeResult`.
        """
        from vpr_localizer.progress import progress_bar

        self._require_trained()
        heads = {k: m.to(self.device).eval() for k, m in (extra_heads or {}).items()}
        desc, raw, extras, ok, skipped = [], [], {k: [] for k in heads}, [], []
        t0 = time.perf_counter()
        t_callback = 0.0
        bar = progress_bar(total=len(paths), desc=progress, unit="img", disable=progress is None, leave=False)
        for idx, batch in iter_image_batches(paths, self.config.image_size, self.config.batch_size,
                                             on_skip=lambda p, r: (skipped.append((p, r)), bar.update(1))):
            enc = self.encode_batch(batch)
            desc.append(enc.descriptors)
            raw.append(enc.raw)
            with torch.no_grad():
                for k, head in heads.items():
                    extras[k].append(head(enc.features.image).float().cpu().numpy())
            if on_batch is not None:
                tc = time.perf_counter()
                on_batch(list(idx), enc)
                t_callback += time.perf_counter() - tc
            ok.extend(idx)
            bar.update(len(idx))
        bar.close()
        elapsed = time.perf_counter() - t0 - t_callback
        return EncodeResult(
            descriptors=np.concatenate(desc) if desc else np.zeros((0, self.dim), np.float32),
            raw=np.concatenate(raw) if raw else np.zeros((0, self.raw_dim), np.float32),
            extras={k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in extras.items()},
            ok=ok, skipped=skipped, seconds_per_image=elapsed / max(len(ok), 1), callback_seconds=t_callback)

    # --- fitting on a map ---------------------------------------------------------------

    def sample_local_features(self, paths: Sequence[str], progress: Optional[str] = None) -> np.ndarray:
        """L2-normalised image-stream local features sampled from up to ``kmeans_max_images`` images.

        Images are taken evenly spaced over ``paths``; from each, a random subset of its
        feature-map locations (``max(kmeans_max_features, 39 * num_clusters) / n_images`` of them,
        at most all; :func:`~vpr_localizer.models.fitting.kmeans_sample_target`).

        Returns:
            ``(N, C)`` float32.
        """
        return self.sample_stream_features(paths, progress)["image"]

    def sample_stream_features(self, paths: Sequence[str], progress: Optional[str] = None) -> Dict[str, np.ndarray]:
        """:meth:`sample_local_features` per stream (:func:`~vpr_localizer.models.fitting.sample_stream_features`)."""
        return sample_stream_features(self, paths, progress)

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
        init_netvlad_by_kmeans(self.aggregator, self.config, {"image": sample, "segmentation": seg_sample}, source)
        self.aggregator.to(self.device)
        self.trained = True

    def fit_pca(self, raw: np.ndarray) -> bool:
        """Fit PCA whitening on the map's raw descriptors ``(N, raw_dim)`` when allowed.

        Returns:
            True when PCA was fitted; False when disabled (``pca_dim`` 0), when the map has
            fewer than ``pca_min_images`` images, or when a checkpoint already provided PCA.
        """
        if self.pca is not None:
            return False
        self.pca = fit_pca_whitening(raw, self.config)
        return self.pca is not None


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float16 when that is lossless (a trained checkpoint rounds its PCA to float16 so
    that it fits in the repository), else unchanged."""
    if t.numel() > 1 and t.dtype == torch.float32:
        h = t.half()
        if torch.equal(h.float(), t):
            return h
    return t


def baseline_heads() -> Dict[str, nn.Module]:
    """The baselines every evaluation reports beside NetVLAD: GeM (p=3) and global average pooling."""
    return {"GeM": GeM(3.0), "GAP": GlobalAvgPool()}
