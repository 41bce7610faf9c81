"""Top-k retrieval restricted to a box around a position prior, on any index backend.

A robot with a position prior (GPS, odometry, the previous fix) only needs map keyframes near
it.  :func:`search_near` answers "the ``k`` best keyframes whose ``x, y`` lie inside
``box = (xmin, xmax, ymin, ymax)``" (metres, the map frame: ENU for a geotagged map):

* on a FAISS index (:mod:`vpr_localizer.mapping.index`) as a post-filter: it over-fetches
  (``max(4 k, 64)`` candidates, then 4x more until every query has ``k`` hits inside the box or
  the whole map was ranked) and keeps the candidates whose keyframe position is inside the box.
  On an exact (``flat``) index this is the exact box-restricted top-k;
* on an index that filters itself (``supports_box_filter = True``, e.g.
  :class:`~vpr_localizer.mapping.milvus_index.MilvusIndex`, where the box becomes a Milvus scalar
  filter expression on the stored ``x``/``y``), by passing ``box`` to its ``search``.

Both backends use the same rule, so they return the same ids: a keyframe is inside when
``xmin <= x <= xmax and ymin <= y <= ymax`` with ``x, y`` rounded to float32 (Milvus stores them
as ``FLOAT``); a keyframe with an unknown (NaN) position is never inside.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.mapping.index import _check_matrix, search

#: first over-fetch of the FAISS post-filter: ``max(OVERFETCH_FACTOR * k, MIN_OVERFETCH)``; it
#: grows by ``OVERFETCH_FACTOR`` until every query has ``k`` hits in the box or all are ranked.
OVERFETCH_FACTOR = 4
MIN_OVERFETCH = 64

Box = Tuple[float, float, float, float]


def check_box(box: Sequence[float]) -> Box:
    """Validate a search box.

    Args:
        box: ``(xmin, xmax, ymin, ymax)``, metres in the map frame, finite, ``xmin <= xmax``,
            ``ymin <= ymax``.

    Returns:
        The box as a tuple of four Python floats.

    Raises:
        ValueError: not four finite numbers, or a minimum above its maximum.
    """
    try:
        vals = tuple(float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"box must be four numbers (xmin, xmax, ymin, ymax) in metres, got {box!r}") from exc
    if len(vals) != 4:
        raise ValueError(f"box must be four numbers (xmin, xmax, ymin, ymax) in metres, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"box bounds must be finite, got {vals}")
    xmin, xmax, ymin, ymax = vals
    if xmin > xmax or ymin > ymax:
        raise ValueError(f"box must have xmin <= xmax and ymin <= ymax, got {vals}")
    return vals


def inside_box(positions: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Which positions lie inside ``box``.

    Args:
        positions: ``(N, 2)`` or ``(N, 3)`` float, metres in the map frame (NaN = unknown).
        box: ``(xmin, xmax, ymin, ymax)`` metres (see :func:`check_box`).

    Returns:
        ``(N,)`` bool: ``xmin <= x <= xmax and ymin <= y <= ymax`` on the float32-rounded
        coordinates (the precision of the Milvus ``x``/``y`` fields); False for NaN.

    Raises:
        ValueError: bad ``box`` or ``positions`` not ``(N, >=2)``.
    """
    xmin, xmax, ymin, ymax = check_box(box)
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"positions must be an (N, 2) or (N, 3) array, got shape {p.shape}")
    xy = p[:, :2].astype(np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return (xy[:, 0] >= xmin) & (xy[:, 0] <= xmax) & (xy[:, 1] >= ymin) & (xy[:, 1] <= ymax)


def search_near(index_or_map, queries: np.ndarray, k: int, box: Optional[Sequence[float]],
                positions: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` search restricted to keyframes inside ``box`` (module doc).

    Args:
        index_or_map: a :class:`~vpr_localizer.mapping.store.VprMap` (its ``index`` and
            ``positions`` are used), a FAISS index from :mod:`vpr_localizer.mapping.index` (then
            ``positions`` is required), or an index with ``supports_box_filter = True`` (e.g. a
            :class:`~vpr_localizer.mapping.milvus_index.MilvusIndex`, also as ``VprMap.index``),
            which filters by itself.
        queries: ``(Q, D)`` float32, finite, ``D == index.d``; ``Q == 0`` allowed.
        k: neighbours wanted per query, integer >= 1.
        box: ``(xmin, xmax, ymin, ymax)`` metres in the map frame; None = no restriction (plain
            :func:`~vpr_localizer.mapping.index.search`).
        positions: ``(N, 2|3)`` keyframe positions, metres (row i = keyframe id i); needed for a
            FAISS index given without its map, otherwise ignored.

    Returns:
        ``(scores, ids)``: ``(Q, k')`` float32 inner products and ``(Q, k')`` int64 keyframe ids,
        best first, ``k' = min(k, index.ntotal)``, only keyframes inside the box; slots without a
        hit (fewer than ``k'`` keyframes in the box) have id ``-1`` and score ``-inf``.

    Raises:
        ValueError: bad ``k``, ``queries`` or ``box``; a FAISS index without ``positions``, or
            ``positions`` whose row count differs from ``index.ntotal``.
    """
    index = getattr(index_or_map, "index", index_or_map)
    if box is None:
        return search(index, queries, k)
    box = check_box(box)
    if getattr(index, "supports_box_filter", False):
        return search(_BoxView(index, box), queries, k)
    if positions is None:
        positions = getattr(index_or_map, "positions", None)
        if positions is None or index_or_map is index:
            raise ValueError("search_near on a FAISS index needs the keyframe positions (pass the VprMap "
                             "or positions=)")
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape[0] != int(index.ntotal):
        raise ValueError(f"positions must have one row per indexed keyframe ({int(index.ntotal)}), "
                         f"got shape {pos.shape}")
    inside = inside_box(pos, box)

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    q = _check_matrix(queries, "queries", dim=int(index.d), allow_empty=True)
    n = int(index.ntotal)
    kk = min(int(k), n)
    out_s = np.full((q.shape[0], kk), -np.inf, np.float32)
    out_i = np.full((q.shape[0], kk), -1, np.int64)
    if kk == 0 or q.shape[0] == 0:
        return out_s, out_i
    todo = np.arange(q.shape[0])
    fetch = min(n, max(OVERFETCH_FACTOR * kk, MIN_OVERFETCH))
    while len(todo):
        scores, ids = search(index, np.ascontiguousarray(q[todo]), fetch)
        ok = (ids >= 0) & inside[np.clip(ids, 0, None)]
        again = []
        for row, (qi, s, i, m) in enumerate(zip(todo, scores, ids, ok)):
            s, i = s[m][:kk], i[m][:kk]
            if len(i) < kk and fetch < n:
                again.append(row)
                continue
            out_s[qi, :len(i)] = s
            out_i[qi, :len(i)] = i
        todo = todo[again]
        fetch = min(n, fetch * OVERFETCH_FACTOR)
    return out_s, out_i


class _BoxView:
    """An index that filters by itself, seen through :func:`search` with a fixed box."""

    def __init__(self, index, box: Box):
        self._index, self._box = index, box
        self.d, self.ntotal = index.d, index.ntotal

    def search(self, queries: np.ndarray, k: int):
        return self._index.search(queries, k, box=self._box)
