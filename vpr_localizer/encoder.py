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

from .aggregation import GeM, GlobalAvgPool, NetVLAD, kmeans_centroids
from .backbones import Backbone, build_backbone
from .errors import ConfigError, ImageLoadError, WeightsError
from .images import load_image, resize_image
from .pca import PCAWhitening

LOG = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vpr_localizer.encoder"
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

    @classmethod
    def from_dict(cls, d: Dict) -> "EncoderConfig":
        """Build from a mapping, rejecting unknown keys (typos in YAML are errors)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown encoder parameter(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "image_size" in d and d["image_size"] is not None:
            d["image_size"] = tuple(int(v) for v in d["image_size"])
        return cls(**d)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: an invalid device string, or ``cuda`` asked for without CUDA.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid torch device {device!r} (use auto, cpu, cuda or cuda:N): {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


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
        self.config = config
        self.device = resolve_device(config.device)
        self.backbone = backbone or build_backbone(config.backbone, config.weights, config.preprocessing)
        self.backbone.to(self.device).eval()
        d = self.backbone.out_channels
        if config.aggregator == "netvlad":
            self.aggregator: nn.Module = NetVLAD(config.num_clusters, d)
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
        """Aggregator output dimension (K*D for NetVLAD, D for GeM/GAP)."""
        if isinstance(self.aggregator, NetVLAD):
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
        }

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
                "state_dict": self.aggregator_state(),
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
        diffs = [f"{k}: checkpoint {bb.get(k)!r} vs running {v!r}" for k, v in mine.items()
                 if (list(bb.get(k)) if k == "image_size" else bb.get(k)) != v]
        if diffs:
            raise WeightsError("encoder checkpoint does not match the configured backbone (" +
                               "; ".join(diffs) + ")")
        agg = ckpt["aggregator"]
        if agg["type"] != self.config.aggregator or int(agg["num_clusters"]) != int(self.config.num_clusters) \
                and agg["type"] == "netvlad":
            raise WeightsError(f"checkpoint aggregator {agg['type']} K={agg['num_clusters']} does not match "
                               f"configured {self.config.aggregator} K={self.config.num_clusters}")
        try:
            self.aggregator.load_state_dict(agg["state_dict"], strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"checkpoint aggregator tensors do not fit: {exc}") from exc
        if isinstance(self.aggregator, NetVLAD):
            self.aggregator.alpha = float(agg.get("alpha", self.aggregator.alpha))
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

    @torch.no_grad()
    def aggregate(self, features: torch.Tensor, weights: Optional[torch.Tensor] = None) -> np.ndarray:
        """``(B, C, h, w)`` features -> ``(B, raw_dim)`` float32 (before PCA), on CPU."""
        return self.aggregator(features, weights).float().cpu().numpy()

    def apply_pca(self, raw: np.ndarray) -> np.ndarray:
        """``(N, raw_dim)`` -> ``(N, dim)``; identity when the encoder has no PCA."""
        return raw.astype(np.float32) if self.pca is None else self.pca.transform(raw)

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Encode in-memory images (any size; resized here).

        Args:
            images: ``uint8`` ``(H, W, 3)`` RGB arrays.

        Returns:
            ``(N, dim)`` float32 L2-normalised descriptors.

        Raises:
            ImageLoadError: an array is not a valid RGB image.
            RuntimeError: the encoder is NetVLAD and has not been fitted (see :meth:`fit`).
        """
        self._require_trained()
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        batch = np.stack([resize_image(im, self.config.image_size) for im in images])
        out = []
        for s in range(0, len(batch), self.config.batch_size):
            out.append(self.aggregate(self.feature_maps(batch[s:s + self.config.batch_size])))
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
            feats = self.feature_maps(batch)
            raw.append(self.aggregate(feats))
            with torch.no_grad():
                for k, head in heads.items():
                    extras[k].append(head(feats).float().cpu().numpy())
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
        """L2-normalised local features sampled from up to ``kmeans_max_images`` images.

        Images are taken evenly spaced over ``paths``; from each, a random subset of its
        feature-map locations (``kmeans_max_features / n_images`` of them).

        Returns:
            ``(N, C)`` float32.
        """
        from tqdm import tqdm

        cfg = self.config
        n = min(len(paths), cfg.kmeans_max_images)
        chosen = np.unique(np.linspace(0, len(paths) - 1, n).round().astype(int)) if n else []
        sub = [paths[i] for i in chosen]
        per_image = max(1, math.ceil(cfg.kmeans_max_features / max(len(sub), 1)))
        rng = np.random.default_rng(cfg.seed)
        out = []
        bar = tqdm(total=len(sub), desc=progress, unit="img", disable=progress is None, leave=False)
        for idx, batch in iter_image_batches(sub, cfg.image_size, cfg.batch_size,
                                             on_skip=lambda p, r: bar.update(1)):
            out.append(sample_feature_locations(self.feature_maps(batch), per_image, rng))
            bar.update(len(idx))
        bar.close()
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.backbone.out_channels), np.float32)

    def fit_aggregator(self, paths: Sequence[str], progress: Optional[str] = None) -> None:
        """Initialise NetVLAD centroids and assignment from k-means on the images' local features.

        No-op for GeM/GAP or an encoder loaded from a checkpoint.

        Raises:
            ValueError: too few readable images / local features for K clusters.
        """
        if self.trained:
            return
        self.init_aggregator_from_sample(self.sample_local_features(paths, progress),
                                         f"the {len(paths)} map images")

    def init_aggregator_from_sample(self, sample: np.ndarray, source: str) -> None:
        """NetVLAD initialisation by FAISS k-means on a sample of local features (NetVLAD Sec. 4).

        Args:
            sample: ``(N, C)`` float32 L2-normalised local features
                (:meth:`sample_local_features` or :func:`sample_feature_locations`).
            source: where the sample came from, for the error message and the log.

        Raises:
            ValueError: fewer local features than clusters K.
        """
        k = self.config.num_clusters
        if len(sample) < k:
            raise ValueError(f"NetVLAD k-means needs >= {k} local features; {source} "
                             f"gave {len(sample)} (use larger image_size or smaller num_clusters)")
        centroids = kmeans_centroids(sample, k, niter=self.config.kmeans_iterations, seed=self.config.seed)
        self.aggregator.init_from_clusters(centroids, sample)
        self.aggregator.to(self.device)
        self.trained = True
        LOG.info("NetVLAD initialised by k-means: K=%d on %d local features of %s (alpha=%.1f)",
                 k, len(sample), source, self.aggregator.alpha)

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
