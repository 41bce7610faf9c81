"""Localisation against a map: top-k retrieval (FAISS) and a pose estimate with covariance.

Pose estimate (our method; the retrieval itself is NetVLAD's):

1. retrieve the top-k keyframes by descriptor inner product (cosine similarity) s_1 >= ... >= s_k;
2. the *geometrically consistent* set C is the candidates within ``consistency_radius_m`` of
   the best match's position;
3. position = similarity-weighted mean over C with weights ``w_i = exp((s_i - s_1) / T)``
   (the best match dominates; near-equal neighbours refine it along the route);
4. x-y covariance = weighted spread of C + an isotropic term that grows as the *score margin*
   m = s_1 - (best score outside C) shrinks: ``sigma^2 = sigma_floor^2 +
   (1 - min(m / margin_scale, 1)) * sigma_ambiguous^2``. A query whose best alternatives lie far
   away with almost the same score gets a large covariance.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np

from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import FingerprintMismatchError, WeightsError
from vpr_localizer.mapping.index import search
from vpr_localizer.localization.rerank import PatchReranker, RerankConfig, RerankResult, merge_ranking
from vpr_localizer.localization.sequence import SequenceConfig, match_sequences
from vpr_localizer.mapping.store import MAP_YAML, VprMap, check_build_section, check_encoder_section


#: Largest deviation of a query descriptor's L2 norm from 1 that :func:`check_unit_norm` accepts.
UNIT_NORM_TOLERANCE = 1e-2


def check_unit_norm(descriptors: np.ndarray, tolerance: float = UNIT_NORM_TOLERANCE) -> np.ndarray:
    """Check that query descriptors are what every encoder of this suite emits: finite and
    L2-normalised (NetVLAD, GeM, PCA whitening all end with an L2 normalisation). A descriptor
    from outside (a ROS message) that is all zeros or scaled by 1e30 would otherwise give a
    confident pose (cosine scores far outside [-1, 1]).

    Args:
        descriptors: ``(Q, D)`` (or ``(D,)``) float32.
        tolerance: largest accepted ``|norm - 1|``.

    Returns:
        The descriptors as float32 ``(Q, D)``.

    Raises:
        ValueError: a NaN / Inf value, or a norm outside ``1 +- tolerance`` (names it).
    """
    d = np.asarray(descriptors, dtype=np.float32)
    d = d[None] if d.ndim == 1 else d
    if not np.isfinite(d).all():
        raise ValueError("query descriptor contains NaN or Inf")
    norms = np.linalg.norm(d.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > tolerance)
    if bad.size:
        raise ValueError(f"query descriptor has L2 norm {norms[bad[0]]:.6g}, not 1 (+-{tolerance:g}): "
                         f"descriptors must be L2-normalised as the map's encoder emits them")
    return d


@dataclass
class LocalizerConfig:
    """Parameters of :class:`Localizer`.

    Attributes:
        top_k: candidates retrieved per query.
        consistency_radius_m: candidates within this distance of the best match (metres) are
            geometrically consistent with it.
        temperature: T of the similarity weights (cosine-similarity units).
        margin_scale: score margin (cosine units) at which the match counts as unambiguous.
        sigma_floor_m: standard deviation (metres) of a confident estimate.
        sigma_ambiguous_m: extra standard deviation (metres) of a fully ambiguous estimate.
    """

    top_k: int = 10
    consistency_radius_m: float = 25.0
    temperature: float = 0.02
    margin_scale: float = 0.1
    sigma_floor_m: float = 2.0
    sigma_ambiguous_m: float = 50.0

    @classmethod
    def from_dict(cls, d: Dict) -> "LocalizerConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown localizer parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class PoseEstimate:
    """Result for one query descriptor.

    Attributes:
        ids: ``(k,)`` int64 keyframe ids, best first.
        scores: ``(k,)`` float32 cosine similarities.
        best_id: ids[0].
        x, y, z: estimated position in the map frame, metres (NaN for maps without positions).
        covariance_xy: ``(2, 2)`` float64, m^2 (NaN for maps without positions).
        lat, lon: WGS84 degrees of (x, y) when the map has a datum, else NaN.
        margin: score margin m (see module doc).
        consistent: number of candidates in the consistent set C.
    """

    ids: np.ndarray
    scores: np.ndarray
    best_id: int
    x: float = math.nan
    y: float = math.nan
    z: float = math.nan
    covariance_xy: np.ndarray = field(default_factory=lambda: np.full((2, 2), np.nan))
    lat: float = math.nan
    lon: float = math.nan
    margin: float = math.nan
    consistent: int = 0

    def as_dict(self, query: str = "", keyframes=None) -> Dict:
        """Flat dict for CSV/JSON output (lists for ids and scores)."""
        d = {
            "query": query,
            "best_id": int(self.best_id),
            "top_ids": [int(i) for i in self.ids],
            "top_scores": [round(float(s), 6) for s in self.scores],
            "x": self.x, "y": self.y, "z": self.z, "lat": self.lat, "lon": self.lon,
            "cov_xx": float(self.covariance_xy[0, 0]), "cov_xy": float(self.covariance_xy[0, 1]),
            "cov_yy": float(self.covariance_xy[1, 1]),
            "margin": self.margin, "consistent": self.consistent,
        }
        if keyframes is not None:
            d["best_image"] = keyframes[self.best_id].image_path
        return d


class Localizer:
    """Queries a :class:`VprMap` with descriptors and estimates poses.

    Args:
        vpr_map: the loaded map.
        config: :class:`LocalizerConfig`.
    """

    def __init__(self, vpr_map: VprMap, config: Optional[LocalizerConfig] = None):
        self.map = vpr_map
        self.config = config or LocalizerConfig()
        self._pos = vpr_map.positions
        self._has_pos = vpr_map.has_positions
        self._rerankers: Dict[Tuple, PatchReranker] = {}

    def retrieve(self, descriptors: np.ndarray, k: Optional[int] = None):
        """Top-k search: ``(Q, D)`` float32 -> (scores ``(Q, k)`` float32, ids ``(Q, k)`` int64).

        Raises:
            ValueError: wrong descriptor dimension or non-finite values.
        """
        d = np.asarray(descriptors, dtype=np.float32)
        if d.ndim == 1:
            d = d[None]
        if not np.isfinite(d).all():
            raise ValueError("query descriptor contains NaN or Inf")
        return search(self.map.index, d, k or self.config.top_k)

    def estimate(self, ids: np.ndarray, scores: np.ndarray) -> PoseEstimate:
        """Pose estimate from one query's ranked candidates ``ids (k,)``, ``scores (k,)``.

        Ids of -1 (no hit from an approximate index) are ignored.

        Raises:
            ValueError: no valid candidate at all.
        """
        cfg = self.config
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        valid = ids >= 0
        ids, scores = ids[valid], scores[valid]
        if ids.size == 0:
            raise ValueError("no map candidate returned for this query (approximate index found no hit)")
        est = PoseEstimate(ids=ids, scores=scores, best_id=int(ids[0]))
        if not self._has_pos:
            return est
        pos = self._pos[ids]
        dist = np.linalg.norm(pos[:, :2] - pos[0, :2], axis=1)
        cons = dist <= cfg.consistency_radius_m
        w = np.exp((scores[cons].astype(np.float64) - float(scores[0])) / cfg.temperature)
        w /= w.sum()
        p = (w[:, None] * pos[cons]).sum(axis=0)
        diff = pos[cons, :2] - p[:2]
        spread = (w[:, None, None] * np.einsum("ni,nj->nij", diff, diff)).sum(axis=0)
        alt = scores[~cons]
        margin = float(scores[0] - (alt.max() if alt.size else scores[-1]))
        confidence = min(max(margin / cfg.margin_scale, 0.0), 1.0)
        var = cfg.sigma_floor_m ** 2 + (1.0 - confidence) * cfg.sigma_ambiguous_m ** 2
        est.x, est.y, est.z = float(p[0]), float(p[1]), float(p[2]) if np.isfinite(p[2]) else 0.0
        est.covariance_xy = spread + var * np.eye(2)
        est.margin, est.consistent = margin, int(cons.sum())
        if self.map.datum is not None:
            lat, lon, _ = self.map.datum.to_geodetic(est.x, est.y, est.z)
            est.lat, est.lon = float(lat), float(lon)
        return est

    def localize(self, descriptors: np.ndarray) -> List[PoseEstimate]:
        """``(Q, D)`` float32 descriptors -> Q pose estimates."""
        scores, ids = self.retrieve(descriptors)
        return [self.estimate(i, s) for i, s in zip(ids, scores)]

    def reranker(self, config: RerankConfig, expected: Optional[Dict] = None) -> PatchReranker:
        """The (cached) :class:`~vpr_localizer.localization.rerank.PatchReranker` of this map for
        ``config``; ``expected`` is the running patch configuration checked against the map's.

        Raises:
            MapError: the map has no patch descriptors ("rebuild it with --patches").
            FingerprintMismatchError: ``expected`` differs from the map's patch configuration.
        """
        key = (config.mode, config.k, tuple(config.patch_sizes), config.device,
               tuple(sorted((k, str(v)) for k, v in (expected or {}).items())))
        if key not in self._rerankers:
            self._rerankers[key] = PatchReranker(self.map, config, expected)
        return self._rerankers[key]

    def rerank(self, query_patches, ids: np.ndarray, scores: np.ndarray, config: RerankConfig) -> RerankResult:
        """Patch-NetVLAD re-ranking (Hausler et al., CVPR 2021) of one query's global candidates.

        Args:
            query_patches: the query's patch sets, one
                :class:`~vpr_localizer.models.patch_netvlad.PatchDescriptors` per patch size.
            ids, scores: ``(n,)`` its global retrieval (ids best first, cosines); the first
                ``config.k`` are re-ranked.
            config: :class:`~vpr_localizer.localization.rerank.RerankConfig`.

        Returns:
            :class:`~vpr_localizer.localization.rerank.RerankResult` (re-ranked ids, their
            global cosines, fused patch scores).

        Raises:
            MapError: the map has no patch descriptors; FingerprintMismatchError: query patches
                of another grid / dimension.
        """
        return self.reranker(config).rerank(query_patches, ids, scores)

    def localize_reranked(self, descriptors: np.ndarray, query_patches: List, config: RerankConfig) -> List[PoseEstimate]:
        """:meth:`localize` with the top ``config.k`` re-ranked by patches before the pose estimate.

        The estimate gets the re-ranked order (best first) with each candidate's global cosine as
        its score (module doc of :mod:`vpr_localizer.localization.rerank`); the top ``top_k``
        of that order are used.

        Args:
            descriptors: ``(Q, D)`` float32 global descriptors.
            query_patches: Q lists of patch sets (one :class:`PatchDescriptors` per patch size).
            config: :class:`RerankConfig`; ``mode`` ``none`` = plain :meth:`localize`.

        Raises:
            ValueError: Q descriptors but another number of patch lists.
            MapError, FingerprintMismatchError: see :meth:`rerank`.
        """
        if not config.enabled:
            return self.localize(descriptors)
        d = np.asarray(descriptors, dtype=np.float32).reshape(-1, self.map.index.d)
        if len(query_patches) != len(d):
            raise ValueError(f"{len(d)} query descriptors but {len(query_patches)} query patch sets")
        rr = self.reranker(config)
        scores, ids = self.retrieve(d, k=max(config.k, self.config.top_k))
        out = []
        for qp, i, s in zip(query_patches, ids, scores):
            full_ids, full_scores = merge_ranking(rr.rerank(qp, i, s), i, s)
            out.append(self.estimate(full_ids[:self.config.top_k], full_scores[:self.config.top_k]))
        return out

    def similarity_matrix(self, descriptors: np.ndarray) -> np.ndarray:
        """Query-vs-map similarities ``(Q, M)`` float32 (inner products of the descriptors; with an
        approximate index, map entries it does not return get -1, the lowest cosine).

        Raises:
            ValueError: wrong descriptor dimension or non-finite values.
        """
        m = len(self.map)
        scores, ids = self.retrieve(descriptors, k=m)
        sim = np.full((len(ids), m), -1.0, np.float32)
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        ok = ids.reshape(-1) >= 0
        sim[rows[ok], ids.reshape(-1)[ok]] = scores.reshape(-1)[ok]
        return sim

    def sequence_candidates(self, descriptors: np.ndarray, config: SequenceConfig) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k map keyframes of each query by SeqSLAM sequence matching (Milford & Wyeth,
        ICRA 2012) over :meth:`similarity_matrix`, for queries in temporal order and a map in
        route order (:func:`~vpr_localizer.localization.sequence.match_sequences`).

        Args:
            descriptors: ``(Q, D)`` float32, consecutive frames of one traversal.
            config: sequence length, velocity range, contrast window, ``top_k``.

        Returns:
            ``(scores (Q, k) float32, ids (Q, k) int64)``, best first: scores are the negated
            sequence scores (minus the mean contrast-normalised distance along the best
            trajectory; higher = better, ``-inf`` with id -1 where no trajectory fits), so
            :meth:`estimate` weights candidates by the sequence evidence, not by the single frame
            (whose own similarity is exactly what perceptual aliasing corrupts).
        """
        sim = self.similarity_matrix(descriptors)
        matches = match_sequences(sim, replace(config, similarity=True, top_k=min(config.top_k, sim.shape[1])))
        return -matches.topk_scores.astype(np.float32), matches.topk_indices.astype(np.int64)

    def localize_sequence(self, descriptors: np.ndarray, config: SequenceConfig) -> List[PoseEstimate]:
        """:meth:`localize` with the candidates of :meth:`sequence_candidates` (top ``config.top_k``)."""
        scores, ids = self.sequence_candidates(descriptors, config)
        k = self.config.top_k
        return [self.estimate(i[:k], s[:k]) for i, s in zip(ids, scores)]


def encoder_for_map(vpr_map: VprMap, weights: Optional[str] = None, device: str = "auto",
                    batch_size: int = 8, checkpoint: Optional[str] = None,
                    segmentation_weights: Optional[str] = None) -> Encoder:
    """Rebuild the encoder that built ``vpr_map`` and verify its fingerprint.

    The backbone weights come from ``weights`` or the path recorded in ``map.yaml``; the
    aggregator and PCA come from the map's ``encoder.pt``, or from ``checkpoint`` when given
    (which must then be the same encoder). A guided encoder (static mask, segmentation stream,
    attention) gets its flags from the fingerprint and its segmentation weights from
    ``segmentation_weights`` or the path recorded in ``map.yaml``.

    Raises:
        MapError: the map's ``encoder`` or ``build`` section is malformed (a missing or mistyped
            field, named in the message; :func:`~vpr_localizer.mapping.store.check_encoder_section`).
        WeightsError: weight file missing or unloadable.
        FingerprintMismatchError: the resulting encoder is not the one that built the map
            (other weights, backbone, input size, clusters or PCA).
    """
    where = os.path.join(str(vpr_map.path), MAP_YAML)
    fp = check_encoder_section(where, vpr_map.fingerprint)
    build = check_build_section(where, vpr_map.meta.get("build"))
    cfg = EncoderConfig(backbone=fp["backbone"], weights=weights or build.get("weights"),
                        preprocessing=fp["preprocessing"], image_size=tuple(fp["image_size"]),
                        aggregator=fp["aggregator"], num_clusters=fp["num_clusters"] or 64,
                        device=device, batch_size=batch_size)
    guidance = fp.get("guidance")
    if guidance:
        cfg.static_mask, cfg.seg_stream = bool(guidance["static_mask"]), bool(guidance["seg_stream"])
        cfg.attention = bool(guidance["attention"])
        if cfg.needs_labels:
            cfg.segmentation = guidance["segmentation"]
            cfg.segmentation_size = tuple(int(v) for v in guidance["segmentation_size"])
            cfg.segmentation_weights = segmentation_weights or build.get("segmentation_weights")
    from vpr_localizer.trained import resolve_checkpoint

    enc = Encoder(cfg)
    try:
        if resolve_checkpoint(checkpoint):
            from vpr_localizer.models.checkpoint import load_checkpoint
            enc.load_checkpoint_state(load_checkpoint(resolve_checkpoint(checkpoint)))
        else:
            enc.load_checkpoint_state(vpr_map.encoder_checkpoint)
    except WeightsError as exc:
        raise FingerprintMismatchError(f"map {vpr_map.path} was built with a different encoder: {exc}") from exc
    vpr_map.check_fingerprint(enc.fingerprint())
    return enc
