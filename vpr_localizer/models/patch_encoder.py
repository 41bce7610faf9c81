"""Patch-NetVLAD descriptors of an :class:`~vpr_localizer.models.encoder.Encoder`'s images.

Hausler, Garg, Xu, Milford, Fischer, "Patch-NetVLAD: Multi-Scale Fusion of Locally-Global
Descriptors for Place Recognition", CVPR 2021.

The patch descriptors of an image come from the SAME conv feature map (``StreamFeatures.image``,
``(B, C, h, w)``) and the SAME NetVLAD layer as its global descriptor: the encoder's
:class:`~vpr_localizer.models.aggregation.NetVLAD`, or for a guided encoder its image-stream
NetVLAD (``GuidedNetVLAD.image_vlad``) weighted per location by the image stream's weight map
(static mask x attention, ``GuidedNetVLAD.weight_maps``), exactly as in the global pass. The
segmentation stream of a guided encoder has no patches (it is a colour-coded label image).

Patch PCA, and why it is fitted on the map's own patches:

* A raw patch descriptor has K*C dims (32,768 for K = 64, C = 512): 64 KB per patch in float16,
  about 1,000 - 2,800 patches per keyframe (32x16 - 40x30 grids), i.e. 64-180 MB per keyframe.
  A projection is required.
* The encoder's global PCA cannot serve: it exists only on maps of >= ``pca_min_images`` (100)
  images, has at most N - 1 dims, is fitted on whole-image descriptors, and for an encoder with
  the segmentation stream it projects the 2*K*C concatenation, not single-stream patches.
* So a separate PCA whitening is fitted on a sample of the map's own (raw) patch descriptors
  (``pca_samples`` patches, default 2,048 = 4x the default dimension, drawn from ``pca_images`` evenly spaced map images,
  default 50, every patch size) and stored in the map. Its output dimension defaults to 512,
  the paper's speed-mode dimension (its performance mode uses 4,096, 8x the storage and the
  matching cost; on a 2-core CPU the 512-D mode is the one that runs at all on thousands of
  keyframes: about 1 MB per keyframe at 32x16 cells instead of 8.4 MB).

Cost of fitting the PCA before the map's patches exist: :func:`fit_patch_pca_on_images` makes a
second pass over ``min(N, pca_images)`` map images (backbone + patch residuals, no more), then the
main pass computes the global and the projected patch descriptors of every image from the same
feature map. The alternative, caching every image's conv features for a single pass, would hold
``N * C * h * w`` floats (1 MB per image at 32x16 cells, 2.4 MB at 40x30 in float32), i.e.
gigabytes for a few thousand keyframes; the sample pass costs a bounded ``pca_images`` extra
images (about 50 x 2-3 s on 2 CPU cores) whatever the map size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vpr_localizer.errors import ConfigError
from vpr_localizer.models.aggregation import NetVLAD
from vpr_localizer.models.guided import StreamFeatures
from vpr_localizer.models.patch_netvlad import (DEFAULT_PATCH_SIZES, PatchDescriptors, PatchNetVLAD, _strides_for,
                                                bytes_per_keyframe, num_patches, patch_grid_problem)
from vpr_localizer.models.pca import PCAWhitening

LOG = logging.getLogger(__name__)

#: Default patch-descriptor dimension after the patch PCA (the paper's speed mode).
DEFAULT_PATCH_DIM = 512


@dataclass
class PatchSettings:
    """How a map's patch descriptors are made (plain values, loadable from YAML).

    Attributes:
        patch_sizes: square patch sizes, feature-grid cells (paper: 2, 5, 8).
        strides: one stride per patch size (or a single one for all), cells (paper: 1).
        dim: patch-descriptor dimension after the patch PCA whitening (paper: 512 speed mode,
            4096 performance mode; default 512, module doc).
        pca_images: map images (evenly spaced) sampled for the patch PCA.
        pca_samples: patch descriptors sampled for the patch PCA (spread over the images and the
            patch sizes); must exceed ``dim``. Memory: ``pca_samples * K * C * 4`` bytes
            (256 MB for 2,048 x 32,768); time: the ``N x N`` Gram matrix, ``N^2 K C``
            multiply-adds (1.4e11 for 2,048, tens of seconds on 2 CPU cores; cost grows as N^2).
        seed: random seed of the sample.
    """

    patch_sizes: Tuple[int, ...] = DEFAULT_PATCH_SIZES
    strides: Tuple[int, ...] = (1,)
    dim: int = DEFAULT_PATCH_DIM
    pca_images: int = 50
    pca_samples: int = 2048
    seed: int = 0

    def __post_init__(self):
        self.patch_sizes = tuple(int(p) for p in self.patch_sizes)
        if not self.patch_sizes or any(p < 1 for p in self.patch_sizes):
            raise ConfigError(f"patch sizes must be a non-empty list of ints >= 1, got {self.patch_sizes}")
        if len(set(self.patch_sizes)) != len(self.patch_sizes):
            raise ConfigError(f"patch sizes must be distinct, got {self.patch_sizes}")
        st = self.strides
        if not isinstance(st, (int, np.integer)):
            st = tuple(int(v) for v in st)
            st = st[0] if len(st) == 1 else st
        try:
            self.strides = _strides_for(self.patch_sizes, st)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.dim = int(self.dim)
        if self.dim < 1:
            raise ConfigError(f"patch dim must be >= 1, got {self.dim}")
        if int(self.pca_images) < 1:
            raise ConfigError(f"patch pca_images must be >= 1, got {self.pca_images}")
        if int(self.pca_samples) <= self.dim:
            raise ConfigError(f"patch pca_samples ({self.pca_samples}) must exceed the patch dim ({self.dim})")

    @classmethod
    def from_dict(cls, d: Dict) -> "PatchSettings":
        """From a plain dict; unknown keys raise :class:`ConfigError`."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown patch setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def patch_netvlad_layer(encoder) -> NetVLAD:
    """The NetVLAD layer whose residuals make the encoder's patch descriptors: the aggregator
    itself, or a guided encoder's image-stream NetVLAD.

    Raises:
        ConfigError: the encoder's aggregator is not NetVLAD (GeM / GAP have no patches).
    """
    agg = encoder.aggregator
    if isinstance(agg, NetVLAD):
        return agg
    inner = getattr(agg, "image_vlad", None)
    if isinstance(inner, NetVLAD):
        return inner
    raise ConfigError(f"Patch-NetVLAD needs a NetVLAD encoder, this one aggregates with "
                      f"{encoder.config.aggregator!r}")


def patch_weights(encoder, features: StreamFeatures) -> Optional[torch.Tensor]:
    """The image stream's per-location NetVLAD weights ``(B, 1, h, w)`` (static mask x attention)
    of a guided encoder, the same that weight its global descriptor; None (uniform) otherwise."""
    if not getattr(encoder.config, "guided", False):
        return None
    return encoder.attention_maps(features).get("image")


def feature_grid(encoder) -> Tuple[int, int]:
    """The encoder's conv feature grid ``(h, w)`` in cells at its input size (one forward pass of a
    blank image: exact for every backbone's rounding, e.g. 640x360 px -> 22x40 cells with VGG16)."""
    w, h = (int(v) for v in encoder.config.image_size)
    with torch.no_grad():
        f = encoder.feature_maps(np.zeros((1, h, w, 3), np.uint8))
    return int(f.shape[-2]), int(f.shape[-1])


def check_encoder_grid(encoder, patch_sizes: Sequence[int]) -> Tuple[int, int]:
    """The encoder's feature grid, after checking that every patch size fits it.

    Raises:
        ConfigError: a patch size larger than the grid (the message of
            :func:`~vpr_localizer.models.patch_netvlad.patch_grid_problem`, naming the input size
            that would be needed), or a non-NetVLAD encoder.
    """
    patch_netvlad_layer(encoder)
    grid = feature_grid(encoder)
    problem = patch_grid_problem(grid, patch_sizes)
    if problem is not None:
        w, h = encoder.config.image_size
        raise ConfigError(f"Patch-NetVLAD at input {w}x{h} px: {problem}")
    return grid


def fit_patch_pca(samples: np.ndarray, dim: int, eps: float = 1e-3) -> PCAWhitening:
    """PCA whitening of raw patch descriptors, fitted in float32 through the N x N Gram matrix.

    Same transform as :meth:`PCAWhitening.fit` (which works in float64: 2 GB for 4,096 x 32,768);
    here only the Gram matrix and its eigen-decomposition are float64.

    Args:
        samples: ``(N, D_in)`` float32 raw (K*C-dim, L2-normalised) patch descriptors, N > dim.
        dim: output dimension, ``1 <= dim <= min(N - 1, D_in)``.
        eps: whitening regulariser relative to the largest eigenvalue.

    Raises:
        ConfigError: too few samples for ``dim``.
    """
    x = np.array(samples, dtype=np.float32, copy=True)
    n, d = x.shape
    if dim < 1 or dim > PCAWhitening.max_dim(n, d):
        raise ConfigError(f"patch PCA to {dim} dims needs more than {dim} sampled patches of at least "
                          f"{dim} dims; got {n} patches of {d} dims (sample more images or lower --patch-dim)")
    mean = x.mean(axis=0)
    x -= mean
    gram = (x @ x.T).astype(np.float64)  # (N, N)
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1][:dim]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    comps = (x.T @ evecs.astype(np.float32)) / np.sqrt(np.maximum(evals, 1e-12)).astype(np.float32)  # (D, dim)
    return PCAWhitening(mean.astype(np.float32), np.ascontiguousarray(comps.T, dtype=np.float32),
                        (evals / max(n - 1, 1)).astype(np.float32), eps)


class PatchEncoder:
    """Projected patch descriptors of an encoder's feature maps.

    Args:
        encoder: the :class:`~vpr_localizer.models.encoder.Encoder` (NetVLAD, possibly guided).
        patch_sizes, strides: cells, as :class:`PatchSettings`.
        pca: the patch PCA (input K*C dims), or None for raw K*C-dim descriptors (only for
            fitting the PCA).
        dim: output dimension (``pca.dim`` when None).

    Raises:
        ConfigError: non-NetVLAD encoder; ValueError: bad sizes or PCA (see :class:`PatchNetVLAD`).
    """

    def __init__(self, encoder, patch_sizes: Sequence[int], strides: Sequence[int] = (1,),
                 pca: Optional[PCAWhitening] = None, dim: Optional[int] = None):
        self.encoder = encoder
        st = strides[0] if len(strides) == 1 else strides
        self.extractor = PatchNetVLAD(patch_netvlad_layer(encoder), patch_sizes, st, pca,
                                      (dim if dim is not None else pca.dim) if pca is not None else None,
                                      box_sum="gemm")  # per-window GEMM: ~5-10x faster on CPU, same sums

    @property
    def patch_sizes(self) -> Tuple[int, ...]:
        return self.extractor.patch_sizes

    @property
    def strides(self) -> Tuple[int, ...]:
        return self.extractor.strides

    @property
    def dim(self) -> int:
        """Descriptor dimension (patch PCA output, or K*C)."""
        return self.extractor.out_dim

    @torch.no_grad()
    def extract(self, features: StreamFeatures) -> List[List[PatchDescriptors]]:
        """``out[b][s]``: image b's :class:`PatchDescriptors` at ``patch_sizes[s]``: ``(P_s, dim)``
        float32 L2-normalised descriptors and ``(P_s, 2)`` float32 centres (x, y) in feature-grid
        cells, from ``features.image`` (``(B, C, h, w)``) and the image stream's weight map.

        Raises:
            ValueError: a patch size larger than the grid.
        """
        return self.extractor.extract(features.image, patch_weights(self.encoder, features))


def fit_patch_pca_on_images(encoder, paths: Sequence[str], settings: PatchSettings,
                            progress: Optional[str] = None) -> Tuple[PCAWhitening, Dict]:
    """Fit the patch PCA on a sample of raw patch descriptors of map images (module doc).

    ``min(len(paths), settings.pca_images)`` images evenly spaced over ``paths`` go through the
    backbone; from each, ``ceil(pca_samples / (images * S))`` random patches per patch size
    (all of them when fewer) are kept, raw (K*C dims, L2-normalised).

    Args:
        encoder: a fitted NetVLAD encoder.
        paths: the map's image files (unreadable ones are skipped).
        settings: :class:`PatchSettings`.
        progress: tqdm description; None disables the bar.

    Returns:
        ``(pca, info)``: the fitted :class:`PCAWhitening` (``settings.dim`` dims) and
        ``{"images": n, "samples": N, "seconds": s}``.

    Raises:
        ConfigError: fewer than ``dim + 1`` patches could be sampled, or a patch size larger
            than the grid.
    """
    import time

    from vpr_localizer.progress import progress_bar

    from vpr_localizer.io.image_files import iter_image_batches

    t0 = time.perf_counter()
    cfg = encoder.config
    grid = check_encoder_grid(encoder, settings.patch_sizes)
    counts = num_patches(grid, settings.patch_sizes, settings.strides)
    n = min(len(paths), int(settings.pca_images))
    chosen = np.unique(np.linspace(0, len(paths) - 1, n).round().astype(int)) if n else []
    sub = [paths[i] for i in chosen]
    per_scale = max(1, math.ceil(int(settings.pca_samples) / max(len(sub) * len(counts), 1)))
    rng = np.random.default_rng(settings.seed)
    raw = PatchEncoder(encoder, settings.patch_sizes, settings.strides)  # no PCA: K*C dims
    rows: List[np.ndarray] = []
    used = 0
    bar = progress_bar(total=len(sub), desc=progress, unit="img", disable=progress is None, leave=False)
    for idx, batch in iter_image_batches(sub, cfg.image_size, min(cfg.batch_size, 4),
                                         on_skip=lambda p, r: bar.update(1)):
        feats = encoder.stream_features(batch)
        for scales in raw.extract(feats):
            for pd in scales:
                pick = rng.choice(pd.num_patches, size=min(per_scale, pd.num_patches), replace=False)
                rows.append(pd.descriptors[np.sort(pick)])
            used += 1
        bar.update(len(idx))
    bar.close()
    samples = np.concatenate(rows) if rows else np.zeros((0, raw.dim), np.float32)
    del rows
    if samples.shape[0] > settings.pca_samples:
        samples = samples[np.sort(rng.choice(samples.shape[0], size=settings.pca_samples, replace=False))]
    pca = fit_patch_pca(samples, settings.dim)
    info = {"images": int(used), "samples": int(samples.shape[0]), "seconds": round(time.perf_counter() - t0, 2)}
    LOG.info("patch PCA %d -> %d dims fitted on %d patches of %d map images in %.1f s",
             raw.dim, settings.dim, info["samples"], used, info["seconds"])
    return pca, info


def patch_bytes_per_keyframe(grid_hw: Tuple[int, int], settings: PatchSettings) -> int:
    """float16 storage of one keyframe's patches, bytes (:func:`bytes_per_keyframe`)."""
    return bytes_per_keyframe(grid_hw, settings.patch_sizes, settings.dim, settings.strides)
