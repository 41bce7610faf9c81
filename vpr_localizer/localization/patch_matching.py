"""Patch-NetVLAD re-ranking: mutual-nearest-neighbour patch matches, spatial scoring, fusion.

Hausler, Garg, Xu, Milford, Fischer, "Patch-NetVLAD: Multi-Scale Fusion of Locally-Global
Descriptors for Place Recognition", CVPR 2021, Sec. 3.5-3.6, and the authors' reference code
(QVPR/Patch-NetVLAD, ``patchnetvlad/tools/patch_matcher.py``, ``models/local_matcher.py``).

For one query and one candidate (keyframe), at each patch size separately:

1. **Mutual nearest neighbours** (Sec. 3.5): query patch i and candidate patch j match when j is
   i's nearest neighbour among the candidate's patches and i is j's among the query's, by inner
   product of the L2-normalised descriptors (= Euclidean nearest neighbour).
2. **Spatial score**, one of two modes:

   * ``ransac`` (the paper's *performance* mode): fit a homography between the matched patch
     centres with RANSAC (OpenCV ``findHomography``; ``cv2.RANSAC`` as the reference code, or
     ``cv2.USAC_MAGSAC``); the score is the inlier count divided by the query's patch count P_q.
     Fewer than 4 matches (a homography needs 4) -> 0. Reprojection threshold: ``1.5 * stride``
     feature-grid cells (the reference code's ``16 px * stride * 1.5`` for VGG16's 16 px cells).
   * ``spatial`` (the paper's *speed* mode, "rapid spatial scoring", Sec. 3.6): with the
     matches' displacements ``x_d,i = x_cand,i - x_query,i`` and ``y_d,i`` (cells), their means
     ``mean(x_d)``, ``mean(y_d)``, and ``max_x``, ``max_y`` the extent of the query's patch grid
     (largest patch-centre offset, cells: ``cols - 1`` and ``rows - 1`` at stride 1)::

         s_spatial = 1/N * sum_i [ (max_x - |x_d,i - mean(x_d)|)^2 + (max_y - |y_d,i - mean(y_d)|)^2 ]

     N is the query's patch count P_q by default (as the reference code does; it makes the
     score grow with the number of consistent matches) or the match count
     (``spatial_normaliser="matches"``, the average per match; then one perfect match scores
     as much as a full set). 0 matches -> 0. One deliberate deviation from the reference code:
     each bracket term is clamped at 0 (``max(max_x - |.|, 0)``) before squaring; unclamped, a
     match deviating from the mean by more than the grid extent would earn a positive, growing
     score (e.g. a deviation of 2 max_x earns the full max_x^2).

3. **Multi-scale fusion** over the candidate shortlist (reference code ``normalise_func``): each
   scale's scores are standardised across the k candidates (``(s - mean) / std``; a scale whose
   scores are all equal contributes 0), then summed with per-scale weights. Defaults: 0.45, 0.15,
   0.40 for patch sizes 2, 5, 8 -- the weights of the authors' ``performance.ini`` that produced
   the paper's performance-mode results (chosen there on validation data); a single scale gets
   weight 1 (``speed.ini``: patch size 5 only). Other patch-size sets default to equal weights.
   ``fusion="none"`` skips the standardisation (raw weighted sum of per-scale scores).

Re-ranking sorts the candidates by the fused score (higher = better), ties broken by the global
score (higher = better, e.g. cosine similarity), then by the original order.

Coordinates are patch centres in feature-grid cells (x, y) (see
:mod:`vpr_localizer.models.patch_netvlad`); descriptors are ``(P, D)`` float32 (float16 is
accepted and computed in float32).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vpr_localizer.models.patch_netvlad import PatchDescriptors, bytes_per_keyframe  # noqa: F401 (re-exported)

#: Scoring modes and their aliases (the paper's names).
MODES = {"ransac": "ransac", "performance": "ransac", "spatial": "spatial", "speed": "spatial",
         "rapid": "spatial"}
RANSAC_METHODS = ("ransac", "magsac")
#: Fusion weights of the authors' performance config (patch size -> weight).
PAPER_SCALE_WEIGHTS: Dict[int, float] = {2: 0.45, 5: 0.15, 8: 0.40}
MIN_HOMOGRAPHY_MATCHES = 4


def default_scale_weights(patch_sizes: Sequence[int]) -> Tuple[float, ...]:
    """Fusion weights for ``patch_sizes``: the paper's (0.45, 0.15, 0.40) when the sizes are
    exactly {2, 5, 8} (in any order), 1 for a single scale, else equal weights ``1/S``."""
    sizes = [int(p) for p in patch_sizes]
    if len(sizes) == 1:
        return (1.0,)
    if sorted(sizes) == sorted(PAPER_SCALE_WEIGHTS):
        return tuple(PAPER_SCALE_WEIGHTS[p] for p in sizes)
    return tuple(1.0 / len(sizes) for _ in sizes)


def resolve_mode(mode: str) -> str:
    """``ransac|performance`` -> ``ransac``; ``spatial|speed|rapid`` -> ``spatial``; ValueError otherwise."""
    m = MODES.get(str(mode).lower())
    if m is None:
        raise ValueError(f"unknown patch scoring mode {mode!r}; expected one of {sorted(MODES)}")
    return m


@dataclass
class PatchMatchConfig:
    """Parameters of patch matching and re-ranking (plain values, loadable from YAML).

    Attributes:
        mode: ``ransac`` (performance) | ``spatial`` (speed); aliases ``performance``, ``speed``.
        weights: per-scale fusion weights, one per patch size of the query, or None for
            :func:`default_scale_weights`.
        fusion: ``zscore`` (standardise each scale over the shortlist, the reference code) |
            ``none``.
        ransac_method: ``ransac`` (``cv2.RANSAC``, the reference code) | ``magsac``
            (``cv2.USAC_MAGSAC``).
        ransac_threshold: reprojection threshold in feature-grid cells per unit of patch stride
            (the threshold is ``ransac_threshold * stride`` cells); 1.5 as the reference code.
        ransac_max_iters: RANSAC iterations (OpenCV default 2000).
        ransac_confidence: RANSAC confidence (OpenCV default 0.995).
        spatial_normaliser: ``query_patches`` (reference code) | ``matches``.
        device: torch device for the descriptor inner products (``cpu``, ``cuda``...).
    """

    mode: str = "ransac"
    weights: Optional[Tuple[float, ...]] = None
    fusion: str = "zscore"
    ransac_method: str = "ransac"
    ransac_threshold: float = 1.5
    ransac_max_iters: int = 2000
    ransac_confidence: float = 0.995
    spatial_normaliser: str = "query_patches"
    device: str = "cpu"

    def __post_init__(self):
        self.mode = resolve_mode(self.mode)
        if self.fusion not in ("zscore", "none"):
            raise ValueError(f"fusion must be 'zscore' or 'none', got {self.fusion!r}")
        if self.ransac_method not in RANSAC_METHODS:
            raise ValueError(f"ransac_method must be one of {RANSAC_METHODS}, got {self.ransac_method!r}")
        if not self.ransac_threshold > 0:
            raise ValueError(f"ransac_threshold must be > 0 cells, got {self.ransac_threshold}")
        if self.spatial_normaliser not in ("query_patches", "matches"):
            raise ValueError(f"spatial_normaliser must be 'query_patches' or 'matches', got {self.spatial_normaliser!r}")
        if self.weights is not None:
            self.weights = tuple(float(w) for w in self.weights)
            if not all(np.isfinite(self.weights)):
                raise ValueError(f"fusion weights must be finite, got {self.weights}")

    @classmethod
    def from_dict(cls, d: Dict) -> "PatchMatchConfig":
        """From a plain dict; unknown keys raise ValueError."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown patch matching options {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Matching and per-scale scores
# --------------------------------------------------------------------------------------------

def _as_tensor(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def mutual_nearest_neighbours(query_desc, candidate_desc, device="cpu") -> Tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours by inner product of L2-normalised descriptors.

    Args:
        query_desc: ``(P_q, D)`` float32/float16 numpy array or torch tensor.
        candidate_desc: ``(P_c, D)`` likewise.
        device: torch device for the ``(P_q, P_c)`` similarity matrix.

    Returns:
        ``(query_idx, candidate_idx)``, each ``(M,)`` int64, matched pairs sorted by query index.

    Raises:
        ValueError: not 2-D, or different descriptor dimensions.
    """
    q = query_desc if isinstance(query_desc, torch.Tensor) else _as_tensor(query_desc, device)
    c = candidate_desc if isinstance(candidate_desc, torch.Tensor) else _as_tensor(candidate_desc, device)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"descriptors must be (P_q, D) and (P_c, D) with equal D, got {tuple(q.shape)}, {tuple(c.shape)}")
    if q.shape[0] == 0 or c.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sim = q.float() @ c.float().T  # (P_q, P_c)
    if sim.device.type == "cpu":  # numpy's argmax is ~4-30x faster than torch's on CPU
        s = sim.numpy()
        q_best, c_best = s.argmax(axis=1), s.argmax(axis=0)
    else:
        q_best, c_best = sim.argmax(dim=1).cpu().numpy(), sim.argmax(dim=0).cpu().numpy()
    # q_best (P_q,): candidate index for each query patch; c_best (P_c,): query index per candidate patch
    qi = np.nonzero(c_best[q_best] == np.arange(q.shape[0]))[0].astype(np.int64)
    return qi, q_best[qi].astype(np.int64)


def ransac_inliers(query_xy: np.ndarray, candidate_xy: np.ndarray, threshold: float = 1.5,
                   method: str = "ransac", max_iters: int = 2000, confidence: float = 0.995) -> int:
    """Inlier count of a RANSAC homography between matched patch centres (candidate -> query).

    Args:
        query_xy, candidate_xy: ``(M, 2)`` float32 matched centres (x, y), feature-grid cells.
        threshold: reprojection threshold, cells.
        method: ``ransac`` (``cv2.RANSAC``) | ``magsac`` (``cv2.USAC_MAGSAC``).

    Returns:
        Number of inliers; 0 when M < 4 or when OpenCV finds no homography (degenerate points).
    """
    import cv2

    q = np.ascontiguousarray(query_xy, dtype=np.float32).reshape(-1, 2)
    c = np.ascontiguousarray(candidate_xy, dtype=np.float32).reshape(-1, 2)
    if q.shape != c.shape:
        raise ValueError(f"matched centres must have equal shapes, got {q.shape} and {c.shape}")
    if q.shape[0] < MIN_HOMOGRAPHY_MATCHES:
        return 0
    flag = {"ransac": cv2.RANSAC, "magsac": cv2.USAC_MAGSAC}.get(method)
    if flag is None:
        raise ValueError(f"ransac method must be one of {RANSAC_METHODS}, got {method!r}")
    try:
        h, mask = cv2.findHomography(c, q, flag, ransacReprojThreshold=float(threshold),
                                     maxIters=int(max_iters), confidence=float(confidence))
    except cv2.error:
        return 0
    if h is None or mask is None:
        return 0
    return int(np.count_nonzero(mask))


def rapid_spatial_score(query_xy: np.ndarray, candidate_xy: np.ndarray, max_x: float, max_y: float,
                        normaliser: float) -> float:
    """Rapid spatial scoring (Patch-NetVLAD Sec. 3.6; module doc for the equation).

    Args:
        query_xy, candidate_xy: ``(M, 2)`` matched centres (x, y), feature-grid cells.
        max_x, max_y: extent of the query's patch grid, cells.
        normaliser: N in the equation (query patch count or M).

    Returns:
        ``1/N * sum_i [max(max_x - |x_d,i - mean x_d|, 0)^2 + max(max_y - |y_d,i - mean y_d|, 0)^2]``;
        0 when M = 0. Its maximum, all M displacements equal, is ``M/N (max_x^2 + max_y^2)``.
    """
    q = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
    c = np.asarray(candidate_xy, dtype=np.float64).reshape(-1, 2)
    if q.shape[0] == 0:
        return 0.0
    d = c - q
    dev = np.abs(d - d.mean(axis=0))
    sx = np.clip(max_x - dev[:, 0], 0.0, None)
    sy = np.clip(max_y - dev[:, 1], 0.0, None)
    return float((sx ** 2 + sy ** 2).sum() / max(float(normaliser), 1e-12))


@dataclass
class ScaleMatch:
    """Result of matching one query/candidate pair at one patch size.

    Attributes:
        patch_size: p, cells.
        query_idx, candidate_idx: ``(M,)`` int64 mutual-nearest-neighbour pairs.
        num_inliers: RANSAC inliers (ransac mode), else None.
        score: the per-scale score that enters the fusion (module doc).
    """

    patch_size: int
    query_idx: np.ndarray
    candidate_idx: np.ndarray
    score: float
    num_inliers: Optional[int] = None

    @property
    def num_matches(self) -> int:
        return int(self.query_idx.shape[0])


def _check_scales(query: Sequence[PatchDescriptors], candidate: Sequence[PatchDescriptors]) -> None:
    qs = [p.patch_size for p in query]
    cs = [p.patch_size for p in candidate]
    if qs != cs:
        raise ValueError(f"query and candidate have different patch sizes: {qs} vs {cs}")
    for q, c in zip(query, candidate):
        if q.dim != c.dim:
            raise ValueError(f"patch size {q.patch_size}: query descriptors are {q.dim}-dim, candidate {c.dim}-dim")


def match_scale(query: PatchDescriptors, candidate: PatchDescriptors, config: PatchMatchConfig,
                query_tensor: Optional[torch.Tensor] = None) -> ScaleMatch:
    """Mutual matches and the per-scale score of one pair at one patch size (``config.mode``).

    ``query_tensor`` optionally passes the query descriptors already on ``config.device``.
    """
    qdesc = query_tensor if query_tensor is not None else query.descriptors
    qi, ci = mutual_nearest_neighbours(qdesc, candidate.descriptors, config.device)
    n_q = max(query.num_patches, 1)
    qxy, cxy = query.centres[qi], candidate.centres[ci]
    if config.mode == "ransac":
        n_in = ransac_inliers(qxy, cxy, config.ransac_threshold * query.stride, config.ransac_method,
                              config.ransac_max_iters, config.ransac_confidence)
        return ScaleMatch(query.patch_size, qi, ci, n_in / n_q, n_in)
    ext = query.centres.max(axis=0) - query.centres.min(axis=0) if query.num_patches else np.zeros(2)
    norm = n_q if config.spatial_normaliser == "query_patches" else max(len(qi), 1)
    return ScaleMatch(query.patch_size, qi, ci, rapid_spatial_score(qxy, cxy, float(ext[0]), float(ext[1]), norm))


def match_pair(query: Sequence[PatchDescriptors], candidate: Sequence[PatchDescriptors],
               config: Optional[PatchMatchConfig] = None) -> List[ScaleMatch]:
    """:func:`match_scale` at every patch size; ValueError if the two sets' patch sizes or
    descriptor dimensions differ."""
    config = config or PatchMatchConfig()
    _check_scales(query, candidate)
    return [match_scale(q, c, config) for q, c in zip(query, candidate)]


def fuse_scale_scores(scores: np.ndarray, weights: Sequence[float], fusion: str = "zscore") -> np.ndarray:
    """Multi-scale fusion of per-scale scores over a shortlist.

    Args:
        scores: ``(k, S)`` per-candidate, per-scale scores (higher = better).
        weights: ``(S,)`` per-scale weights.
        fusion: ``zscore``: ``sum_s w_s (scores[:, s] - mean_s) / std_s`` (population std over
            the k candidates; a scale with std 0 contributes 0), as the reference code's
            ``normalise_func``; ``none``: ``scores @ weights``.

    Returns:
        ``(k,)`` float64 fused scores.

    Raises:
        ValueError: weights length != S, unknown fusion.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (k, S), got shape {s.shape}")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != s.shape[1]:
        raise ValueError(f"need one fusion weight per patch size: {s.shape[1]} sizes, {w.shape[0]} weights")
    if fusion == "none":
        return s @ w
    if fusion != "zscore":
        raise ValueError(f"fusion must be 'zscore' or 'none', got {fusion!r}")
    if s.shape[0] == 0:
        return np.zeros(0)
    mean = s.mean(axis=0)
    std = s.std(axis=0)
    z = np.where(std > 0, (s - mean) / np.where(std > 0, std, 1.0), 0.0)
    return z @ w


def rerank(query_patches: Sequence[PatchDescriptors],
           candidate_patches_list: Sequence[Sequence[PatchDescriptors]],
           candidate_ids: Sequence[int], global_scores: Sequence[float],
           mode: Optional[str] = None, config: Optional[PatchMatchConfig] = None,
           weights: Optional[Sequence[float]] = None,
           return_details: bool = False):
    """Re-rank a global retrieval's shortlist by Patch-NetVLAD patch matching.

    Args:
        query_patches: the query's patch sets, one :class:`PatchDescriptors` per patch size.
        candidate_patches_list: k candidates' patch sets, same patch sizes and dimensions.
        candidate_ids: ``(k,)`` keyframe ids of the candidates (global-retrieval order).
        global_scores: ``(k,)`` their global similarities (higher = better), the tie-breaker.
        mode: ``ransac``/``performance`` | ``spatial``/``speed``; overrides ``config.mode``.
        config: :class:`PatchMatchConfig` (defaults when None).
        weights: per-scale fusion weights; overrides ``config.weights``.
        return_details: also return the ``(k, S)`` per-scale score matrix (rows in the input
            order) as a third value.

    Returns:
        ``(ids, scores)``: ``(k,)`` int64 ids re-ordered best first and their ``(k,)`` float64
        fused patch scores (same order); with ``return_details``, ``(ids, scores, per_scale)``.

    Raises:
        ValueError: mismatched lengths, patch sizes or descriptor dimensions; weights of the
            wrong length; unknown mode.
    """
    config = config or PatchMatchConfig()
    if mode is not None or weights is not None:
        config = PatchMatchConfig(**{**{f.name: getattr(config, f.name) for f in fields(config)},
                                     **({"mode": mode} if mode is not None else {}),
                                     **({"weights": tuple(weights)} if weights is not None else {})})
    ids = np.asarray(candidate_ids, dtype=np.int64).reshape(-1)
    gs = np.asarray(global_scores, dtype=np.float64).reshape(-1)
    k = len(candidate_patches_list)
    if ids.shape[0] != k or gs.shape[0] != k:
        raise ValueError(f"need one id and one global score per candidate: {k} candidates, "
                         f"{ids.shape[0]} ids, {gs.shape[0]} global scores")
    n_scales = len(query_patches)
    if n_scales == 0:
        raise ValueError("query has no patch sets")
    w = config.weights if config.weights is not None else default_scale_weights([p.patch_size for p in query_patches])
    if len(w) != n_scales:
        raise ValueError(f"need one fusion weight per patch size: sizes {[p.patch_size for p in query_patches]}, weights {tuple(w)}")
    per_scale = np.zeros((k, n_scales), dtype=np.float64)
    q_tensors = [_as_tensor(q.descriptors, config.device) for q in query_patches]  # moved once per query
    for j, cand in enumerate(candidate_patches_list):
        _check_scales(query_patches, cand)
        for s, (q, c) in enumerate(zip(query_patches, cand)):
            per_scale[j, s] = match_scale(q, c, config, q_tensors[s]).score
    fused = fuse_scale_scores(per_scale, w, config.fusion)
    order = np.lexsort((np.arange(k), -gs, -fused))  # last key is primary: fused desc, global desc, position
    out = (ids[order], fused[order])
    return out + (per_scale,) if return_details else out


def rerank_cost_bytes(grid_hw: Tuple[int, int], patch_sizes: Sequence[int], dim: int, num_candidates: int,
                      strides=1) -> int:
    """Bytes of candidate patch descriptors touched per query (float16 storage): k keyframes."""
    return int(num_candidates) * bytes_per_keyframe(grid_hw, patch_sizes, dim, strides)
