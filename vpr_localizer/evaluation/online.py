"""Offline scoring of the online sequence filter: the HMM filter of the ``vpr_localizer`` node
(:class:`~vpr_localizer.localization.tracking.FilteredLocalizer`) run frame by frame over a
query traversal, scored like the single-frame methods plus the frames it needed to converge.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np

from vpr_localizer.localization.localize import Localizer
from vpr_localizer.localization.tracking import FilteredLocalizer, TrackingConfig


def filter_entry(localizer: Localizer, query_descriptors: np.ndarray, relevance: Dict[str, np.ndarray],
                 recall_at_n, ns, config: Optional[TrackingConfig] = None) -> Dict:
    """Run the filter over the queries in their (temporal) order and score it.

    Ranking per frame: the filter's MAP keyframe first, then the frame's own retrieval (without
    that keyframe), so recall@1 is the filter's answer and recall@N>1 falls back on retrieval.

    Args:
        localizer: single-frame :class:`Localizer` on the map.
        query_descriptors: ``(Q, D)`` float32, consecutive frames of one traversal.
        relevance: label -> ``(Q, M)`` bool ground truth.
        recall_at_n: ``(ids (Q, n), relevant (Q, M), ns) -> dict`` (the evaluation's recall).
        ns: the N of recall@N.
        config: :class:`TrackingConfig` (default parameters when None; its ``top_k`` keyframes
            per frame are the filter's observation).

    Returns:
        ``{"recall": label -> recall dict over all frames, "recall_converged": the same over the
        frames from the first converged one on, "converged_after_frames": index of the first
        converged frame (None: never), "converged_frames": frames flagged converged,
        "ms_per_frame": filter + retrieval time}``.
    """
    config = config or TrackingConfig()
    filt = FilteredLocalizer(localizer, config)
    k = min(max(max(ns), config.top_k), len(localizer.map))
    q = np.ascontiguousarray(query_descriptors, np.float32)
    t0 = time.perf_counter()
    scores, ids = localizer.retrieve(q, k)
    ranked = np.empty((len(q), k), np.int64)
    converged = np.zeros(len(q), bool)
    for t in range(len(q)):
        pose = filt.update_retrieval(ids[t, :config.top_k], scores[t, :config.top_k])
        rest = [int(i) for i in ids[t] if int(i) != pose.best_id][:k - 1]
        ranked[t] = [pose.best_id] + rest + [-1] * (k - 1 - len(rest))
        converged[t] = pose.converged
    ms = 1e3 * (time.perf_counter() - t0) / max(len(q), 1)
    first = int(np.argmax(converged)) if converged.any() else None
    after = slice(first, None) if first is not None else slice(0, 0)
    return {"recall": {lab: recall_at_n(ranked, r, ns) for lab, r in relevance.items()},
            "recall_converged": {lab: recall_at_n(ranked[after], r[after], ns) for lab, r in relevance.items()},
            "converged_after_frames": first, "converged_frames": int(converged.sum()), "ms_per_frame": ms}
