"""Patch-NetVLAD re-ranking of a global retrieval's shortlist with a map's stored patches.

Hausler, Garg, Xu, Milford, Fischer, "Patch-NetVLAD: Multi-Scale Fusion of Locally-Global
Descriptors for Place Recognition", CVPR 2021: the top-k keyframes of the global (NetVLAD)
retrieval are re-ordered by mutual-nearest-neighbour matches between the query's and each
candidate's patch descriptors, scored by RANSAC inliers (``ransac``, the paper's *performance*
mode, every stored patch size, multi-scale fusion) or by rapid spatial scoring (``spatial``, the
*speed* mode, patch size 5 only when the map stores it) -- the scoring itself is
:mod:`vpr_localizer.localization.patch_matching`.

Only the k candidates' patches are read from the map's memory-mapped ``patches.npy`` (k x
``bytes_per_keyframe``, e.g. 100 x 1.05 MB at 32x16 cells, sizes 2/5/8, 512 dims).

The re-ranked order feeds the pose estimate (:meth:`Localizer.localize_reranked`): the candidates
keep their global cosine similarities as scores (the scale the pose estimator's temperature and
margin are defined on) but are passed best-re-ranked first, so the consistent set is built around
the re-ranked best match.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.errors import ConfigError, FingerprintMismatchError
from vpr_localizer.localization.patch_matching import PatchMatchConfig, rerank as rerank_shortlist, resolve_mode
from vpr_localizer.models.patch_netvlad import PatchDescriptors

#: Re-ranking modes of the command line and the node: none, and the paper's two modes.
RERANK_MODES = ("none", "ransac", "spatial")
#: Row names of the evaluation (the paper's names).
PAPER_MODE_NAMES = {"ransac": "performance", "spatial": "speed"}
#: Patch size of the paper's speed mode.
SPEED_MODE_PATCH_SIZE = 5


@dataclass
class RerankConfig:
    """Parameters of Patch-NetVLAD re-ranking (plain values, loadable from YAML / ROS parameters).

    Attributes:
        mode: ``none`` | ``ransac`` (performance; alias ``performance``) | ``spatial`` (speed;
            aliases ``speed``, ``rapid``).
        k: candidates of the global retrieval that are re-ranked (paper: 100).
        patch_sizes: patch sizes scored, cells; empty = the mode's default: every size the map
            stores for ``ransac``, size 5 for ``spatial`` when the map stores it (else every size).
        device: torch device of the patch similarity matrices (``cpu``, ``cuda``...).
    """

    mode: str = "none"
    k: int = 100
    patch_sizes: Tuple[int, ...] = ()
    device: str = "cpu"

    def __post_init__(self):
        m = str(self.mode).lower()
        try:
            self.mode = "none" if m in ("none", "", "off") else resolve_mode(m)
        except ValueError:
            raise ConfigError(f"re-ranking mode must be one of {RERANK_MODES} (or performance / speed), "
                              f"got {self.mode!r}") from None
        self.k = int(self.k)
        if self.k < 1:
            raise ConfigError(f"re-ranking k must be >= 1, got {self.k}")
        self.patch_sizes = tuple(int(p) for p in (self.patch_sizes or ()))

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def paper_name(self) -> str:
        """``performance`` / ``speed`` (the paper's names), ``none``."""
        return PAPER_MODE_NAMES.get(self.mode, "none")

    @classmethod
    def from_dict(cls, d: Dict) -> "RerankConfig":
        """From a plain dict; unknown keys raise :class:`ConfigError`."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown re-ranking parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def scoring_sizes(map_sizes: Sequence[int], mode: str, requested: Sequence[int] = ()) -> Tuple[int, ...]:
    """Patch sizes scored by ``mode`` (:class:`RerankConfig` ``patch_sizes``).

    Raises:
        FingerprintMismatchError: a requested size the map does not store.
    """
    map_sizes = tuple(int(p) for p in map_sizes)
    if requested:
        missing = [int(p) for p in requested if int(p) not in map_sizes]
        if missing:
            raise FingerprintMismatchError(f"patch size(s) {missing} requested for re-ranking but the map stores "
                                           f"patch sizes {list(map_sizes)}")
        return tuple(int(p) for p in requested)
    if resolve_mode(mode) == "spatial" and SPEED_MODE_PATCH_SIZE in map_sizes:
        return (SPEED_MODE_PATCH_SIZE,)
    return map_sizes


@dataclass
class RerankResult:
    """One query's re-ranked shortlist.

    Attributes:
        ids: ``(k,)`` int64 keyframe ids, best re-ranked first.
        scores: ``(k,)`` float32 their global cosine similarities (same order).
        patch_scores: ``(k,)`` float64 their fused patch scores (same order; higher = better).
        seconds: wall time of the re-ranking (reading the candidates' patches + matching), s.
    """

    ids: np.ndarray
    scores: np.ndarray
    patch_scores: np.ndarray
    seconds: float


class PatchReranker:
    """Re-ranks shortlists of one map with its stored patch descriptors.

    Args:
        vmap: a :class:`~vpr_localizer.mapping.store.VprMap` (or in-memory map) with patches.
        config: :class:`RerankConfig` (``mode`` not ``none``).
        expected: the running side's patch configuration (any of ``patch_sizes``, ``strides``,
            ``dim``, ``grid_hw``), checked against the map's; None = take the map's.
        match: further patch-matching options (:class:`PatchMatchConfig`; its ``mode`` and
            ``device`` are replaced by ``config``'s).

    Raises:
        MapError: the map has no patch descriptors ("this map has no patch descriptors; rebuild
            it with --patches").
        FingerprintMismatchError: ``expected`` differs from the map's patch configuration, or
            ``config.patch_sizes`` asks for a size the map lacks.
        ConfigError: mode ``none``.
    """

    def __init__(self, vmap, config: RerankConfig, expected: Optional[Dict] = None,
                 match: Optional[PatchMatchConfig] = None):
        if not config.enabled:
            raise ConfigError("re-ranking mode is 'none'")
        self.map_path = vmap.path
        self.patches = vmap.require_patches()
        if expected:
            vmap.check_patch_config(expected)
        self.config = config
        self.sizes = scoring_sizes(self.patches.layout.patch_sizes, config.mode, config.patch_sizes)
        base = match or PatchMatchConfig()
        self.match_config = PatchMatchConfig(**{**vars(base), "mode": config.mode, "device": config.device})

    def select_query(self, query_patches: Sequence[PatchDescriptors]) -> List[PatchDescriptors]:
        """The query's patch sets at the scored sizes, after checking them against the map's layout.

        Raises:
            FingerprintMismatchError: a scored size missing from the query, or a query grid,
                stride or dimension that differs from the map's.
        """
        lay = self.patches.layout
        by_size = {p.patch_size: p for p in query_patches}
        out = []
        for size in self.sizes:
            q = by_size.get(size)
            if q is None:
                raise FingerprintMismatchError(f"query has no patches of size {size} (it has {sorted(by_size)})")
            want = {"grid_hw": list(lay.grid_hw), "dim": lay.dim,
                    "stride": lay.strides[lay.patch_sizes.index(size)]}
            have = {"grid_hw": list(q.grid_hw) if q.grid_hw is not None else None, "dim": q.dim, "stride": q.stride}
            diffs = [f"{k}: map {want[k]} vs query {have[k]}" for k in want if want[k] != have[k]]
            if diffs:
                raise FingerprintMismatchError(f"map {self.map_path}: query patches do not match the map's "
                                               f"(patch size {size}: " + "; ".join(diffs) + ")")
            out.append(q)
        return out

    def rerank(self, query_patches: Sequence[PatchDescriptors], ids: np.ndarray, scores: np.ndarray) -> RerankResult:
        """Re-rank the first ``config.k`` of one query's global candidates.

        Args:
            query_patches: the query's patch sets (:class:`~vpr_localizer.models.patch_encoder.PatchEncoder`
                output for one image), at least the scored sizes.
            ids: ``(n,)`` int64 global-retrieval ids, best first (-1 = no hit, dropped).
            scores: ``(n,)`` their cosine similarities.

        Returns:
            :class:`RerankResult` over ``min(n_valid, k)`` candidates.
        """
        t0 = time.perf_counter()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        valid = ids >= 0
        ids, scores = ids[valid][:self.config.k], scores[valid][:self.config.k]
        if ids.size == 0:
            return RerankResult(ids, scores, np.zeros(0), time.perf_counter() - t0)
        q = self.select_query(query_patches)
        cands = self.patches.keyframes(ids, self.sizes)
        new_ids, fused = rerank_shortlist(q, cands, ids, scores, config=self.match_config)
        cos = dict(zip(ids.tolist(), scores.tolist()))
        new_scores = np.array([cos[int(i)] for i in new_ids], dtype=np.float32)
        return RerankResult(new_ids, new_scores, np.asarray(fused, np.float64), time.perf_counter() - t0)


def merge_ranking(result: RerankResult, ids: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The full ranking: the re-ranked shortlist, then the rest of the global list in its order.

    Args:
        result: :meth:`PatchReranker.rerank` of the first k of ``ids``.
        ids, scores: ``(n,)`` the global ranking and cosines, best first.

    Returns:
        ``(ids (n',), scores (n',))`` int64 / float32 (``-1`` ids of the global list dropped).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    keep = ids >= 0
    ids, scores = ids[keep], scores[keep]
    taken = set(result.ids.tolist())
    rest = np.array([i not in taken for i in ids.tolist()], dtype=bool)
    return (np.concatenate([result.ids, ids[rest]]).astype(np.int64),
            np.concatenate([result.scores, scores[rest]]).astype(np.float32))


def query_patch_encoder(encoder, vmap):
    """The :class:`~vpr_localizer.models.patch_encoder.PatchEncoder` that makes query patches
    comparable with ``vmap``'s: its patch sizes, strides and patch PCA, on ``encoder``'s NetVLAD
    (an encoder already checked against the map's fingerprint, e.g. by ``encoder_for_map``).

    Raises:
        MapError: the map has no patch descriptors.
        FingerprintMismatchError: the encoder's feature grid differs from the map's.
        ConfigError: a non-NetVLAD encoder.
    """
    from vpr_localizer.models.patch_encoder import PatchEncoder, feature_grid, patch_netvlad_layer

    patches = vmap.require_patches()
    patch_netvlad_layer(encoder)
    vmap.check_patch_config({"grid_hw": list(feature_grid(encoder))})
    lay = patches.layout
    return PatchEncoder(encoder, lay.patch_sizes, lay.strides, patches.pca)
