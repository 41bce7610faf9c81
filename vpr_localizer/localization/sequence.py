"""SeqSLAM-style sequence matching over a query-vs-map distance (or similarity) matrix.

Reference: M. J. Milford and G. F. Wyeth, "SeqSLAM: Visual route-based navigation for sunny
summer days and stormy winter nights", ICRA 2012 (and Sünderhauf et al.'s OpenSeqSLAM, whose
conventions are followed where the paper leaves a detail open).

Input: ``D`` of shape ``(Q, M)`` (any real dtype, processed as float32): ``D[t, j]`` is the
distance between query frame ``t`` and map keyframe ``j``; queries are in temporal order and map
keyframes in route order. With ``SequenceConfig.similarity=True`` the matrix holds similarities
(higher = better) and is negated first.

Pipeline:

1. **Local contrast normalisation** (paper, eq. 1): per query row ``t``, each entry is normalised
   by the mean and standard deviation of the distances in a window of ``r_window`` map entries
   centred on it: ``D~[t, j] = (D[t, j] - mean_w) / std_w`` with the window
   ``[j - r_window//2, j + r_window//2]`` clipped to the map (population std, ``ddof=0``; a
   window whose std is below ``1e-6`` x the row's spread counts as flat and yields 0). Every row
   is then shifted so its minimum is 0 (OpenSeqSLAM shifts by the global minimum instead; every
   full-length trajectory visits each of its query rows exactly once, so a per-row shift adds
   the same constant to all of them and leaves their ranking unchanged, and it can be computed
   online). Non-negative scores make the uniqueness ratio meaningful.
2. **Straight-line trajectory search** (paper, eq. 2-3), anchored at the *latest* query frame
   (the online form; the paper centres the sequence on the query): for each end map index ``j``
   and velocity ``v`` (map keyframes per query frame) the trajectory visits map index
   ``j - floor(v * s + 0.5)`` at query frame ``t - s``, ``s = 0 .. L-1``. Its score is the
   *mean* of the normalised differences along it (the sum divided by the number of terms; for
   full-length trajectories this ranks exactly like the paper's sum and keeps shorter sequences
   on the same scale). The score of ``(t, j)`` is the minimum over velocities.
3. **Outputs** per query: best map index (= map position at the *current* frame ``t``), its
   score, the best velocity, a top-k list and the uniqueness ratio ``best / second`` where
   ``second`` is the best score further than ``uniqueness_window`` map entries from the best
   (paper: a match is accepted when this ratio is below a threshold; lower = more distinctive).

Policies:

* **Start of the stream** (``t < L-1``): the sequence uses the ``t + 1`` frames available
  (``seq_len`` in the result records how many); ``t = 0`` is single-frame matching on the
  normalised matrix.
* **Map ends**: points of a trajectory that fall outside ``[0, M)`` are dropped; the trajectory
  is kept when at least ``ceil(min_overlap * n)`` of its ``n`` points lie inside the map
  (otherwise its score is ``+inf``).
* Velocities: ``numpy.linspace(v_min, v_max, v_steps)``; ``reverse=True`` adds their negatives
  (reverse traversal of the route). Velocities whose rounded offsets coincide over ``L`` frames
  are evaluated once (the first one in order is reported). Ties go to the first velocity and the
  lowest map index.

Cost: ``O(Q * M * L * n_velocities)`` time: one vectorised shifted-slice addition of a
``(rows, M)`` block per velocity and per sequence offset (no Python loop over ``M``), done in
cache-sized tiles of output rows; the normalisation is ``O(Q * M)`` (cumulative sums, any
``r_window``). Measured on 2 shared CPU cores: ~1.5-2.5 s for 3,576 x 3,576 at L = 40 with 5
velocities (``benchmarks/bench_sequence.py``). Memory: besides the input, about
``24 * chunk_rows * M`` bytes (float32 normalised block and running best, int16 best velocity,
int64 top-k partition) plus ~20 MB of fixed-size temporaries. ``chunk_rows=None`` picks the
largest chunk under ``max_chunk_mb`` (default 512 MiB): the 3,576 x 3,576 Nordland matrix
(51 MB as float32) needs ~310 MB unchunked, far below 24 GB; ``chunk_rows=256`` bounds the
working set to ~45 MB whatever ``Q``. Chunks re-normalise the ``L - 1`` history rows they share
with the previous chunk and give results identical to the unchunked run. ``D`` may be a
``numpy.memmap`` (read chunk by chunk).

The streaming class :class:`SequenceMatcher` keeps the last ``L`` normalised rows and calls the
same scoring and summary functions as :func:`match_sequences` (bit-identical results).

Pure NumPy: no torch, no ROS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from vpr_localizer.errors import ConfigError

__all__ = [
    "SequenceConfig",
    "SequenceMatches",
    "SequenceMatcher",
    "match_sequences",
    "normalize_rows",
    "sequence_length_frames",
    "velocity_range",
]


@dataclass(frozen=True)
class SequenceConfig:
    """Parameters of :func:`match_sequences` and :class:`SequenceMatcher`.

    Attributes:
        seq_len: sequence length ``L`` in query frames (paper: ``d_s``); see
            :func:`sequence_length_frames` to convert metres. >= 1.
        v_min, v_max: velocity range in map keyframes per query frame (paper: 0.8 .. 1.2);
            ``v_min <= v_max``; negative values are allowed (reverse traversal).
        v_steps: number of velocities in ``linspace(v_min, v_max, v_steps)``; 1 requires
            ``v_min == v_max``.
        reverse: also search the negated velocities (route driven in the opposite direction).
        r_window: contrast-normalisation window in map entries (paper: 10). >= 1.
        normalize: apply the local contrast normalisation (``False``: raw distances, still
            shifted to a per-row minimum of 0).
        similarity: the matrix holds similarities (higher = better) rather than distances.
        top_k: length of the top-k list per query (clipped to ``M``). >= 1.
        uniqueness_window: map entries on either side of the best match excluded when looking
            for the second best of the uniqueness ratio (OpenSeqSLAM: ``R_window``). >= 0.
        min_overlap: fraction (0, 1] of a trajectory's points that must lie inside the map.
        chunk_rows: query rows scored per chunk; ``None`` = as many as fit ``max_chunk_mb``.
        max_chunk_mb: working-memory budget (MiB) used when ``chunk_rows`` is ``None``.

    Raises:
        vpr_localizer.errors.ConfigError (a ``ValueError``): on an invalid value.
    """

    seq_len: int = 10
    v_min: float = 0.8
    v_max: float = 1.2
    v_steps: int = 5
    reverse: bool = False
    r_window: int = 10
    normalize: bool = True
    similarity: bool = False
    top_k: int = 5
    uniqueness_window: int = 10
    min_overlap: float = 0.5
    chunk_rows: Optional[int] = None
    max_chunk_mb: float = 512.0

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
                raise ConfigError(f"SequenceConfig.{name} must be an integer >= {lo}, got {val!r}")

        _int("seq_len", 1)
        _int("v_steps", 1)
        _int("r_window", 1)
        _int("top_k", 1)
        _int("uniqueness_window", 0)
        if self.chunk_rows is not None:
            _int("chunk_rows", 1)
        for name in ("v_min", "v_max", "min_overlap", "max_chunk_mb"):
            val = getattr(self, name)
            if not isinstance(val, (int, float, np.floating, np.integer)) or not math.isfinite(val):
                raise ConfigError(f"SequenceConfig.{name} must be a finite number, got {val!r}")
        if self.v_min > self.v_max:
            raise ConfigError(f"SequenceConfig: v_min ({self.v_min}) must be <= v_max ({self.v_max})")
        if self.v_steps == 1 and self.v_min != self.v_max:
            raise ConfigError("SequenceConfig: v_steps=1 needs v_min == v_max "
                              f"(got {self.v_min} .. {self.v_max})")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ConfigError(f"SequenceConfig.min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.max_chunk_mb <= 0:
            raise ConfigError(f"SequenceConfig.max_chunk_mb must be > 0, got {self.max_chunk_mb}")

    def velocities(self) -> np.ndarray:
        """All searched velocities, ``(n_velocities,)`` float64, map keyframes per query frame."""
        vel = np.linspace(float(self.v_min), float(self.v_max), int(self.v_steps))
        if self.reverse:
            vel = np.concatenate([vel, -vel])
        return vel


@dataclass
class SequenceMatches:
    """Sequence-matching result for ``n`` queries (all arrays have first dimension ``n``).

    Attributes:
        query_index: ``(n,)`` int64, index of the query frame (row of ``D`` / stream position).
        seq_len: ``(n,)`` int32, query frames the sequence used (``min(t + 1, L)``).
        best_index: ``(n,)`` int64, best map index at the current query frame; -1 when no
            trajectory was valid.
        best_score: ``(n,)`` float32, its score: mean normalised difference along the best
            trajectory (lower = better, >= 0); ``inf`` when none.
        best_velocity: ``(n,)`` float32, velocity of the best trajectory (map keyframes per query
            frame); ``nan`` when none.
        topk_indices: ``(n, k)`` int64, the ``k`` best end map indices, best first (-1 pads
            entries whose score is ``inf``).
        topk_scores: ``(n, k)`` float32, their scores (``inf`` pads).
        uniqueness: ``(n,)`` float32, ``best_score / second`` with ``second`` the best score
            further than ``uniqueness_window`` map entries from the best match (in [0, 1];
            lower = more distinctive; 1.0 when both are 0; ``nan`` when no second exists).
    """

    query_index: np.ndarray
    seq_len: np.ndarray
    best_index: np.ndarray
    best_score: np.ndarray
    best_velocity: np.ndarray
    topk_indices: np.ndarray
    topk_scores: np.ndarray
    uniqueness: np.ndarray

    def __len__(self) -> int:
        return int(self.best_index.shape[0])

    @property
    def confidence(self) -> np.ndarray:
        """``1 - uniqueness`` (``(n,)`` float32, higher = more confident; ``nan`` as uniqueness)."""
        return (1.0 - self.uniqueness).astype(np.float32)

    @staticmethod
    def empty(k: int) -> "SequenceMatches":
        """A result with no queries and top-k width ``k``."""
        return SequenceMatches(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64),
                               np.zeros(0, np.float32), np.zeros(0, np.float32),
                               np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                               np.zeros(0, np.float32))

    @staticmethod
    def concatenate(parts: "list[SequenceMatches]") -> "SequenceMatches":
        """Stack results row-wise (same top-k width)."""
        if not parts:
            raise ValueError("SequenceMatches.concatenate needs at least one part")
        return SequenceMatches(*[np.concatenate([getattr(p, f) for p in parts])
                                 for f in SequenceMatches.__dataclass_fields__])


# --------------------------------------------------------------------------------------------
# helpers


def sequence_length_frames(length_m: float, query_spacing_m: float) -> int:
    """Sequence length in query frames for a route length in metres.

    Args:
        length_m: wanted sequence length along the route, metres (> 0).
        query_spacing_m: distance travelled between consecutive query frames, metres per frame
            (> 0).

    Returns:
        ``max(1, round(length_m / query_spacing_m))`` frames.

    Raises:
        ValueError: when either argument is not a finite positive number.
    """
    for name, val in (("length_m", length_m), ("query_spacing_m", query_spacing_m)):
        if not isinstance(val, (int, float, np.integer, np.floating)) or isinstance(val, bool) \
                or not math.isfinite(val) or val <= 0:
            raise ValueError(f"sequence_length_frames: {name} must be a finite number > 0, got {val!r}")
    return max(1, int(math.floor(length_m / query_spacing_m + 0.5)))


def velocity_range(query_spacing_m: float, map_spacing_m: float, tolerance: float = 0.2) -> Tuple[float, float]:
    """Velocity range (map keyframes per query frame) for known frame spacings.

    The nominal velocity is ``query_spacing_m / map_spacing_m``; the range is
    ``nominal * (1 -+ tolerance)`` (``tolerance=0.2`` reproduces the paper's 0.8 .. 1.2 for equal
    spacings).

    Args:
        query_spacing_m: metres between consecutive query frames (> 0).
        map_spacing_m: metres between consecutive map keyframes (> 0).
        tolerance: relative half-width of the range, in [0, 1).

    Raises:
        ValueError: on a non-positive spacing or a tolerance outside [0, 1).
    """
    if not (math.isfinite(query_spacing_m) and query_spacing_m > 0 and math.isfinite(map_spacing_m)
            and map_spacing_m > 0):
        raise ValueError(f"velocity_range: spacings must be finite and > 0, got {query_spacing_m}, {map_spacing_m}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"velocity_range: tolerance must be in [0, 1), got {tolerance}")
    v = query_spacing_m / map_spacing_m
    return v * (1.0 - tolerance), v * (1.0 + tolerance)


def normalize_rows(D: np.ndarray, r_window: int = 10, similarity: bool = False,
                   normalize: bool = True) -> np.ndarray:
    """Local contrast normalisation of each query row (paper eq. 1), rows shifted to min 0.

    Args:
        D: ``(n, M)`` distances (or similarities with ``similarity=True``), any real dtype,
            finite.
        r_window: window in map entries; entry ``j`` uses ``[j - r_window//2, j + r_window//2]``
            clipped to ``[0, M)``.
        similarity: negate first (similarities -> distances).
        normalize: ``False`` skips the contrast normalisation (only negation and shift).

    Returns:
        ``(n, M)`` float32, every row's minimum is 0. Rows are processed independently (in
        blocks of about 2^18 entries, float64 internally), so the result for a row does not
        depend on the other rows passed with it.

    Raises:
        ValueError: ``D`` not 2-D, ``M == 0``, not real-valued, or containing NaN/inf.
    """
    D = np.asarray(D) if not hasattr(D, "dtype") else D
    if len(D.shape) != 2:
        raise ValueError(f"normalize_rows: expected a 2-D (n, M) matrix, got shape {tuple(D.shape)}")
    n, M = int(D.shape[0]), int(D.shape[1])
    if M == 0:
        raise ValueError("normalize_rows: the map has no entries (M = 0)")
    if not np.issubdtype(D.dtype, np.number) or np.issubdtype(D.dtype, np.complexfloating):
        raise ValueError(f"normalize_rows: expected a real-valued matrix, got dtype {D.dtype}")
    out = np.empty((n, M), dtype=np.float32)
    rows = max(1, (1 << 18) // M)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        X = np.array(D[a:b], dtype=np.float64)  # copy; float64 for the cumulative sums
        if not np.isfinite(X).all():
            raise ValueError("normalize_rows: the matrix contains NaN or inf")
        if similarity:
            np.negative(X, out=X)
        if normalize:
            _contrast_normalize(X, int(r_window) // 2)
        X -= X.min(axis=1, keepdims=True)
        out[a:b] = X
    return out


def _window_sums(cs: np.ndarray, half: int, out: np.ndarray) -> np.ndarray:
    """``out[:, j] = cs[:, hi_j] - cs[:, lo_j]``: sums over ``[j - half, j + half]`` clipped to the row.

    ``cs`` is ``(n, M + 1)`` with ``cs[:, 0] = 0`` (cumulative sums); ``out`` is ``(n, M)``.
    """
    M = out.shape[1]
    w = 2 * half + 1
    if M > 2 * half:  # interior by slicing, the 2 * half edge columns by (small) fancy indexing
        np.subtract(cs[:, w:M + 1], cs[:, :M + 1 - w], out=out[:, half:M - half])
        edge = np.concatenate([np.arange(half), np.arange(M - half, M)])
    else:
        edge = np.arange(M)
    if edge.size:
        lo = np.maximum(edge - half, 0)
        hi = np.minimum(edge + half, M - 1) + 1
        out[:, edge] = cs[:, hi] - cs[:, lo]
    return out


def _contrast_normalize(X: np.ndarray, half: int) -> None:
    """In place: ``X <- (X - local mean) / local std`` over windows of ``2 * half + 1`` entries."""
    n, M = X.shape
    X -= X.mean(axis=1, keepdims=True)  # centre rows: keeps the cumulative sums well-conditioned
    j = np.arange(M)
    cnt = (np.minimum(j + half, M - 1) + 1 - np.maximum(j - half, 0)).astype(np.float64)
    cs = np.zeros((n, M + 1))
    np.cumsum(X, axis=1, out=cs[:, 1:])
    mean = _window_sums(cs, half, np.empty_like(X))
    mean /= cnt
    np.cumsum(np.square(X), axis=1, out=cs[:, 1:])
    var = _window_sums(cs, half, np.empty_like(X))
    var /= cnt
    var -= np.square(mean)
    np.maximum(var, 0.0, out=var)
    std = np.sqrt(var, out=var)
    spread = np.abs(X).max(axis=1, keepdims=True)
    np.maximum(std, 1e-6 * spread, out=std)
    std[std == 0.0] = 1.0  # constant row: the numerator is 0 anyway
    X -= mean
    X /= std


# --------------------------------------------------------------------------------------------
# shared scoring core (batch and streaming)


def _offset_table(cfg: SequenceConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct rounded trajectory offsets.

    Returns:
        offsets ``(n_v, L)`` int64 with ``offsets[v, s] = floor(vel * s + 0.5)`` and the matching
        velocities ``(n_v,)`` float64 (first velocity in order for coinciding offset rows).
    """
    vel = cfg.velocities()
    s = np.arange(cfg.seq_len, dtype=np.float64)
    off = np.floor(vel[:, None] * s[None, :] + 0.5).astype(np.int64)
    _, first = np.unique(off, axis=0, return_index=True)
    keep = np.sort(first)
    return off[keep], vel[keep]


_TILE_CELLS = 1 << 17  # output rows per cache tile: ~512 KiB of float32 accumulator


def _score_block(block: np.ndarray, n_out: int, offsets: np.ndarray, seq_len: int,
                 min_overlap: float, tile_rows: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Best trajectory score per (query, end map index) for the last ``n_out`` rows of ``block``.

    Args:
        block: ``(R, M)`` float32 normalised rows of consecutive query frames; row 0 is the
            oldest row available for these outputs (the first frame of the stream, or the frame
            ``L - 1`` before the first output row), so the output row at block position ``p``
            uses ``min(p + 1, L)`` frames.
        n_out: number of output rows (the last ``n_out`` of ``block``).
        offsets: ``(n_v, L)`` int64 trajectory offsets (see :func:`_offset_table`).
        seq_len: ``L``.
        min_overlap: fraction of trajectory points that must be inside the map.
        tile_rows: output rows processed together (cache blocking; results do not depend on
            it); ``None`` = about 2^17 / M.

    Returns:
        ``best`` ``(n_out, M)`` float32 (mean score, ``inf`` = no valid trajectory) and
        ``best_v`` ``(n_out, M)`` int16 index into ``offsets``.

    Every output element is computed by the same sequence of float32 operations whatever the
    tiling, the chunking of :func:`match_sequences` or the streaming, so all agree bit for bit.
    """
    R, M = block.shape
    p0 = R - n_out
    L = int(seq_len)
    nrows = np.minimum(np.arange(p0, R) + 1, L)  # frames used per output row
    need = np.maximum(np.ceil(min_overlap * nrows - 1e-9).astype(np.int64), 1)
    f0 = int(max(0, min(n_out, L - 1 - p0)))  # output rows [f0:] use full-length sequences
    j = np.arange(M)
    # per velocity: cnt[n, j] = points among the first n offsets inside the map for end index j;
    # scale = 1 / cnt where the trajectory is valid, else 0 (plus an "invalid" column mask)
    scales = []
    for off in offsets:
        inside = (j[None, :] >= off[:, None]) & (j[None, :] < M + off[:, None])
        cnt = np.zeros((L + 1, M), dtype=np.int64)
        np.cumsum(inside, axis=0, out=cnt[1:])
        per_n = {}
        for n_used, nd in {(int(a), int(b)) for a, b in zip(nrows, need)}:
            c = cnt[n_used]
            ok = c >= nd
            sc = np.zeros(M, dtype=np.float32)
            sc[ok] = 1.0 / c[ok]
            per_n[n_used] = (sc, None if ok.all() else ~ok)
        scales.append(per_n)
    best = np.full((n_out, M), np.inf, dtype=np.float32)
    best_v = np.zeros((n_out, M), dtype=np.int16)
    tile = int(tile_rows) if tile_rows else max(1, _TILE_CELLS // M)
    acc_buf = np.empty((min(tile, n_out), M), dtype=np.float32)
    better_buf = np.empty((min(tile, n_out), M), dtype=bool)
    for a in range(0, n_out, tile):
        b = min(n_out, a + tile)
        acc, better = acc_buf[:b - a], better_buf[:b - a]
        for vi, off in enumerate(offsets):
            acc.fill(0.0)
            for s in range(L):
                r_start = max(a, s - p0)  # first output row (>= a) with p - s >= 0
                if r_start >= b:
                    break
                o = int(off[s])
                c0, c1 = max(0, o), min(M, M + o)
                if c0 >= c1:
                    continue
                acc[r_start - a:, c0:c1] += block[p0 + r_start - s:p0 + b - s, c0 - o:c1 - o]
            per_n = scales[vi]
            for i0, i1, n_used in ((max(a, f0), b, L),) + tuple((i, i + 1, int(nrows[i])) for i in range(a, min(b, f0))):
                if i0 >= i1:
                    continue
                sc, bad = per_n[n_used]
                acc[i0 - a:i1 - a] *= sc
                if bad is not None:
                    acc[i0 - a:i1 - a, bad] = np.inf
            np.less(acc, best[a:b], out=better)
            np.copyto(best[a:b], acc, where=better)
            best_v[a:b][better] = vi
    return best, best_v


def _summarise(best: np.ndarray, best_v: np.ndarray, velocities: np.ndarray, query_index: np.ndarray,
               seq_len: np.ndarray, top_k: int, uniqueness_window: int) -> SequenceMatches:
    """Best index, top-k and uniqueness ratio from a score block (``best`` is overwritten)."""
    n, M = best.shape
    rows = np.arange(n)
    bi = np.argmin(best, axis=1)
    bs = best[rows, bi]
    valid = np.isfinite(bs)
    bvel = np.where(valid, velocities[best_v[rows, bi]], np.nan).astype(np.float32)
    k = min(int(top_k), M)
    if k < M:
        part = np.argpartition(best, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(M), (n, M)).copy()
    psc = np.take_along_axis(best, part, axis=1)
    order = np.lexsort((part, psc), axis=-1) if n else np.zeros((0, k), np.int64)
    tk_idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    tk_sc = np.take_along_axis(psc, order, axis=1).astype(np.float32)
    tk_idx[~np.isfinite(tk_sc)] = -1
    # uniqueness: best outside [bi - w, bi + w]
    w = int(uniqueness_window)
    cols = np.clip(bi[:, None] + np.arange(-w, w + 1)[None, :], 0, M - 1)
    best[rows[:, None], cols] = np.inf
    second = best.min(axis=1) if M else np.full(n, np.inf, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        uniq = np.where(np.isfinite(second) & valid,
                        np.where(second > 0, bs / np.where(second > 0, second, 1.0), 1.0), np.nan)
    return SequenceMatches(
        query_index=np.asarray(query_index, np.int64), seq_len=np.asarray(seq_len, np.int32),
        best_index=np.where(valid, bi, -1).astype(np.int64), best_score=bs.astype(np.float32),
        best_velocity=bvel, topk_indices=tk_idx, topk_scores=tk_sc,
        uniqueness=uniq.astype(np.float32))


def _chunk_rows(cfg: SequenceConfig, M: int) -> int:
    if cfg.chunk_rows is not None:
        return int(cfg.chunk_rows)
    # ~24 bytes per (row, map entry): float64 normalisation temporaries dominate briefly, then
    # block + acc + best (float32), best_v (int16), better (bool)
    per_row = 24 * max(M, 1)
    return max(1, int(cfg.max_chunk_mb * 1024 * 1024 // per_row))


def match_sequences(D: np.ndarray, config: Optional[SequenceConfig] = None) -> SequenceMatches:
    """SeqSLAM sequence matching of every query row of ``D`` (Milford & Wyeth, ICRA 2012).

    Args:
        D: ``(Q, M)`` query-vs-map distances (similarities with ``config.similarity``), any real
            dtype, finite; rows in temporal order, columns in route order. A ``numpy.memmap``
            works (read chunk by chunk).
        config: parameters (default :class:`SequenceConfig()`: L=10, v 0.8..1.2, 5 steps,
            r_window 10).

    Returns:
        :class:`SequenceMatches` with ``Q`` rows (query ``t`` uses ``min(t + 1, L)`` frames).

    Raises:
        ValueError: ``D`` not 2-D, ``M == 0``, or NaN/inf entries (ConfigError, a ValueError,
            for a bad config).

    Cost: ``O(Q * M * L * n_velocities)`` time; ``~24 * chunk * M`` bytes working memory.
    """
    cfg = config if config is not None else SequenceConfig()
    if not isinstance(cfg, SequenceConfig):
        raise ValueError(f"match_sequences: config must be a SequenceConfig, got {type(cfg).__name__}")
    if not hasattr(D, "shape") or not hasattr(D, "dtype"):
        D = np.asarray(D)
    if len(D.shape) != 2:
        raise ValueError(f"match_sequences: expected a 2-D (Q, M) matrix, got shape {tuple(D.shape)}")
    Q, M = int(D.shape[0]), int(D.shape[1])
    if M == 0:
        raise ValueError("match_sequences: the map has no entries (M = 0)")
    k = min(cfg.top_k, M)
    if Q == 0:
        return SequenceMatches.empty(k)
    L = cfg.seq_len
    offsets, vel = _offset_table(cfg)
    chunk = _chunk_rows(cfg, M)
    parts = []
    for t0 in range(0, Q, chunk):
        t1 = min(Q, t0 + chunk)
        h0 = max(0, t0 - L + 1)
        block = normalize_rows(D[h0:t1], cfg.r_window, cfg.similarity, cfg.normalize)
        best, best_v = _score_block(block, t1 - t0, offsets, L, cfg.min_overlap)
        t = np.arange(t0, t1)
        parts.append(_summarise(best, best_v, vel, t, np.minimum(t + 1, L), k, cfg.uniqueness_window))
    return parts[0] if len(parts) == 1 else SequenceMatches.concatenate(parts)


class SequenceMatcher:
    """Online SeqSLAM: one query row of distances at a time (same scoring as :func:`match_sequences`).

    Keeps the last ``L`` normalised rows (``L * M * 4`` bytes). Each :meth:`update` costs
    ``O(M * L * n_velocities)``; the result for the ``t``-th row fed equals row ``t`` of
    :func:`match_sequences` on the stacked rows.

    Args:
        n_map: number of map keyframes ``M`` (>= 1).
        config: parameters (``chunk_rows`` / ``max_chunk_mb`` are ignored).

    Raises:
        ValueError: ``n_map < 1`` or a config that is not a :class:`SequenceConfig`.
    """

    def __init__(self, n_map: int, config: Optional[SequenceConfig] = None) -> None:
        cfg = config if config is not None else SequenceConfig()
        if not isinstance(cfg, SequenceConfig):
            raise ValueError(f"SequenceMatcher: config must be a SequenceConfig, got {type(cfg).__name__}")
        if isinstance(n_map, bool) or not isinstance(n_map, (int, np.integer)) or n_map < 1:
            raise ValueError(f"SequenceMatcher: n_map must be an integer >= 1, got {n_map!r}")
        self.config = cfg
        self.n_map = int(n_map)
        self._offsets, self._vel = _offset_table(cfg)
        self._buf = np.zeros((cfg.seq_len, self.n_map), dtype=np.float32)
        self._n_buf = 0
        self._t = 0

    @property
    def n_seen(self) -> int:
        """Rows fed since construction or the last :meth:`reset`."""
        return self._t

    def reset(self) -> None:
        """Forget the history (e.g. after a time gap); the next row starts a new sequence at t=0."""
        self._n_buf = 0
        self._t = 0

    def update(self, row: np.ndarray) -> SequenceMatches:
        """Add the distances of the newest query frame and match the sequence ending at it.

        Args:
            row: ``(M,)`` (or ``(1, M)``) distances / similarities to all map keyframes, finite.

        Returns:
            :class:`SequenceMatches` with one row (``query_index`` = position in the stream).

        Raises:
            ValueError: wrong length or NaN/inf entries.
        """
        row = np.asarray(row)
        if row.ndim == 2 and row.shape[0] == 1:
            row = row[0]
        if row.ndim != 1 or row.shape[0] != self.n_map:
            raise ValueError(f"SequenceMatcher.update: expected a row of shape ({self.n_map},), got {row.shape}")
        cfg = self.config
        L = cfg.seq_len
        nrow = normalize_rows(row[None, :], cfg.r_window, cfg.similarity, cfg.normalize)
        if self._n_buf == L:
            self._buf[:-1] = self._buf[1:]
            self._buf[-1] = nrow[0]
        else:
            self._buf[self._n_buf] = nrow[0]
            self._n_buf += 1
        block = self._buf[:self._n_buf]
        best, best_v = _score_block(block, 1, self._offsets, L, cfg.min_overlap)
        t = self._t
        self._t += 1
        return _summarise(best, best_v, self._vel, np.array([t]), np.array([min(t + 1, L)]),
                          min(cfg.top_k, self.n_map), cfg.uniqueness_window)
