"""Fitting an encoder on map images: NetVLAD k-means initialisation and its feature sample.

NetVLAD (Arandjelovic et al., CVPR 2016, Sec. 4) initialises its centroids by k-means on local
features sampled from the training images; without training, the map's own images play that
role. PCA whitening (Jegou & Chum, ECCV 2012) is fitted in
:class:`~vpr_localizer.models.pca.PCAWhitening`.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vpr_localizer.io.image_files import iter_image_batches
from vpr_localizer.models.aggregation import kmeans_centroids
from vpr_localizer.models.guided import StreamFeatures
from vpr_localizer.models.pca import PCAWhitening, regulariser_for

LOG = logging.getLogger(__name__)

#: FAISS k-means warns when it gets fewer than this many training points per centroid
#: (``faiss.ClusteringParameters.min_points_per_centroid``).
KMEANS_MIN_POINTS_PER_CENTROID = 39


def kmeans_sample_target(config) -> int:
    """Local features to sample for NetVLAD k-means: ``kmeans_max_features``, raised to
    ``39 * num_clusters`` (:data:`KMEANS_MIN_POINTS_PER_CENTROID`) so that FAISS gets enough
    points per centroid whenever the images have that many feature-map locations."""
    return max(int(config.kmeans_max_features), KMEANS_MIN_POINTS_PER_CENTROID * int(config.num_clusters))


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


def sample_stream_features(encoder, paths: Sequence[str], progress: Optional[str] = None) -> Dict[str, np.ndarray]:
    """L2-normalised local features of an encoder's streams, sampled for NetVLAD k-means.

    Up to ``kmeans_max_images`` images are taken evenly spaced over ``paths``; from each, a random
    subset of its feature-map locations (``kmeans_sample_target / n_images`` of them, i.e.
    ``max(kmeans_max_features, 39 * num_clusters) / n_images``, at most all of them; seeded by
    ``config.seed``); the segmentation stream is sampled at the same images and locations.

    Args:
        encoder: an :class:`~vpr_localizer.models.encoder.Encoder`.
        paths: image files (unreadable ones are skipped with a warning).
        progress: tqdm description; None disables the bar.

    Returns:
        ``{"image": (N, C)[, "seg": (N, C)]}`` float32.
    """
    from vpr_localizer.progress import progress_bar

    cfg = encoder.config
    n = min(len(paths), cfg.kmeans_max_images)
    chosen = np.unique(np.linspace(0, len(paths) - 1, n).round().astype(int)) if n else []
    sub = [paths[i] for i in chosen]
    per_image = max(1, math.ceil(kmeans_sample_target(cfg) / max(len(sub), 1)))
    rng = np.random.default_rng(cfg.seed)
    streams = ("image", "seg") if cfg.guided and cfg.seg_stream else ("image",)
    out = {k: [] for k in streams}
    bar = progress_bar(total=len(sub), desc=progress, unit="img", disable=progress is None, leave=False)
    for idx, batch in iter_image_batches(sub, cfg.image_size, cfg.batch_size,
                                         on_skip=lambda p, r: bar.update(1)):
        feats = encoder.stream_features(batch) if len(streams) > 1 else StreamFeatures(encoder.feature_maps(batch))
        state = rng.bit_generator.state
        out["image"].append(sample_feature_locations(feats.image, per_image, rng))
        if "seg" in out:  # same locations: replay the generator
            rng.bit_generator.state = state
            out["seg"].append(sample_feature_locations(feats.seg, per_image, rng))
        bar.update(len(idx))
    bar.close()
    c = encoder.backbone.out_channels
    return {k: np.concatenate(v).astype(np.float32) if v else np.zeros((0, c), np.float32) for k, v in out.items()}


def init_netvlad_by_kmeans(aggregator, config, samples: Dict[str, Optional[np.ndarray]], source: str) -> None:
    """Initialise every NetVLAD layer of an aggregator by FAISS k-means on local features
    (NetVLAD, Arandjelovic et al., CVPR 2016, Sec. 4): centroids = k-means centres, soft
    assignment from them (:meth:`~vpr_localizer.models.aggregation.NetVLAD.init_from_clusters`).

    Args:
        aggregator: a module with ``kmeans_targets() -> [(stream, NetVLAD), ...]``.
        config: the :class:`~vpr_localizer.models.config.EncoderConfig` (K, iterations, seed).
        samples: stream name (``image``, ``segmentation``) -> ``(N, C)`` float32 L2-normalised
            local features (:func:`sample_stream_features` or :func:`sample_feature_locations`).
        source: where the sample came from, for the error message and the log.

    Raises:
        ValueError: fewer local features than clusters K, or a stream without its sample.
    """
    k = config.num_clusters
    targets = []
    for name, vlad in aggregator.kmeans_targets():
        if samples.get(name) is None:
            raise ValueError(f"the {name} stream's NetVLAD needs its own k-means sample")
        targets.append((name, vlad, samples[name]))
    for name, vlad, smp in targets:
        if len(smp) < k:
            raise ValueError(f"NetVLAD k-means needs >= {k} local features; {source} "
                             f"gave {len(smp)} (use larger image_size or smaller num_clusters)")
        if len(smp) < KMEANS_MIN_POINTS_PER_CENTROID * k:
            # every feature-map location is already in the sample (kmeans_sample_target); K is kept
            # because it fixes the descriptor dimension and the map fingerprint
            LOG.info("NetVLAD (%s stream): only %d local features for K=%d (FAISS wants >= %d, %d per "
                     "centroid); k-means runs with K=%d anyway: use more or larger images, or fewer clusters",
                     name, len(smp), k, KMEANS_MIN_POINTS_PER_CENTROID * k, KMEANS_MIN_POINTS_PER_CENTROID, k)
        centroids = kmeans_centroids(smp, k, niter=config.kmeans_iterations, seed=config.seed)
        vlad.init_from_clusters(centroids, smp)
        LOG.info("NetVLAD (%s stream) initialised by k-means: K=%d on %d local features of %s (alpha=%.1f)",
                 name, k, len(smp), source, vlad.alpha)


def fit_pca_whitening(raw: np.ndarray, config) -> Optional[PCAWhitening]:
    """PCA whitening (Jegou & Chum, ECCV 2012) fitted on a map's raw descriptors when allowed.

    Args:
        raw: ``(N, raw_dim)`` float32 aggregator outputs of the map images.
        config: :class:`~vpr_localizer.models.config.EncoderConfig` (``pca_dim``, ``pca_min_images``).

    Returns:
        The fitted :class:`PCAWhitening` (``min(pca_dim, N - 1)`` dims, regulariser
        :func:`~vpr_localizer.models.pca.regulariser_for` ``(N)``), or None when disabled
        (``pca_dim`` 0) or when the map has fewer than ``pca_min_images`` images (whitening
        estimated from a handful of descriptors is noise).
    """
    if config.pca_dim <= 0:
        return None
    if len(raw) < config.pca_min_images:
        LOG.info("PCA whitening skipped: %d map images < pca_min_images=%d; descriptors stay %d-D",
                 len(raw), config.pca_min_images, raw.shape[1] if raw.ndim == 2 else 0)
        return None
    dim = min(config.pca_dim, PCAWhitening.max_dim(len(raw), raw.shape[1]))
    eps = regulariser_for(len(raw))
    pca = PCAWhitening.fit(raw, dim, eps=eps)
    LOG.info("PCA whitening fitted on %d descriptors: %d -> %d dims (regulariser %.2g of the largest "
             "eigenvalue)", len(raw), raw.shape[1], dim, eps)
    return pca
