"""Loop-closure candidates from global descriptors, and their evaluation.

A *loop closure* is a revisit: the current keyframe shows a place seen earlier in the same
run. The detector keeps every keyframe's descriptor in a FAISS inner-product index and, for
each new keyframe, proposes the most similar keyframe that is at least ``min_age_s`` older
(so that the immediate past, which always looks alike, is excluded) when the cosine similarity
reaches ``score_threshold``. Candidates follow the LIO-SAM convention used on the
``vpr/loop_closure`` topic: ``[query_stamp_s, match_stamp_s, score, keyframe_id]``.

Temporal consistency (``consistency_frames`` = c > 1; after D. Gálvez-López and J. D. Tardós,
"Bags of binary words for fast place recognition in image sequences", IEEE T-RO 28(5), 2012,
whose DBoW2 accepts a loop only when it agrees with the previous matches): a candidate is
accepted only when the best matches of the last c query keyframes (this one included) form a
consistent run, as the consecutive frames of a revisit do: every one of them has a match, and
their matched keyframe indices ``m_1 .. m_c`` (row numbers, i.e. keyframe order) advance
monotonically by at most ``consistency_tolerance`` per keyframe (every step
``m_{i+1} - m_i`` lies in ``[0, tol]``, or every one in ``[-tol, 0]`` for a revisit driven in
the opposite direction). The check uses the match indices only, not their scores, so the
threshold still applies to the current score alone and precision-recall curves over the
threshold stay comparable with and without it. The first c - 1 keyframes of every revisit are
never accepted (the price in recall). ``c = 1`` is the plain single-frame detector.

Evaluation (as for loop-closure detectors such as FAB-MAP, Cummins & Newman, IJRR 2008): precision-recall over the score threshold, its area
(average precision), and the recall at 100 % precision, against a ground-truth matrix such as
``rtabmap_loop/samples_GT.bmp`` (255 where frame i revisits frame j).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from vpr_localizer.mapping.index import search


@dataclass
class LoopClosureConfig:
    """Parameters of :class:`LoopClosureDetector`.

    Attributes:
        min_age_s: only keyframes at least this much older than the query are candidates, s.
        score_threshold: minimum cosine similarity of a published candidate.
        top_k: neighbours searched per query before the age filter.
        consistency_frames: c: accept only when the last c keyframes' best matches form a
            consistent run (module doc); 1 = no temporal check. >= 1.
        consistency_tolerance: largest step of the matched keyframe index between consecutive
            query keyframes of a consistent run, keyframes. >= 0.

    Raises:
        ValueError: ``consistency_frames < 1`` or ``consistency_tolerance < 0``.
    """

    min_age_s: float = 30.0
    score_threshold: float = 0.5
    top_k: int = 50
    consistency_frames: int = 1
    consistency_tolerance: int = 2

    def __post_init__(self) -> None:
        if int(self.consistency_frames) != self.consistency_frames or self.consistency_frames < 1:
            raise ValueError(f"consistency_frames must be an integer >= 1, got {self.consistency_frames!r}")
        if int(self.consistency_tolerance) != self.consistency_tolerance or self.consistency_tolerance < 0:
            raise ValueError(f"consistency_tolerance must be an integer >= 0, got {self.consistency_tolerance!r}")


@dataclass
class LoopCandidate:
    """One loop-closure candidate.

    Attributes:
        query_stamp: stamp of the new keyframe, s.
        match_stamp: stamp of the older keyframe it revisits, s.
        score: cosine similarity.
        match_id: keyframe id of the older keyframe.
        query_id: keyframe id of the new keyframe.
        consistent: passed the temporal consistency check (always True with
            ``consistency_frames`` 1).
    """

    query_stamp: float
    match_stamp: float
    score: float
    match_id: int
    query_id: int
    consistent: bool = True

    def as_array(self) -> List[float]:
        """LIO-SAM layout ``[query_stamp_s, match_stamp_s, score, keyframe_id]``."""
        return [float(self.query_stamp), float(self.match_stamp), float(self.score), float(self.match_id)]


class LoopClosureDetector:
    """Incremental loop-closure detection over a growing set of keyframes.

    Args:
        dim: descriptor dimension D.
        config: :class:`LoopClosureConfig`.
    """

    def __init__(self, dim: int, config: Optional[LoopClosureConfig] = None):
        import faiss

        self.config = config or LoopClosureConfig()
        self.index = faiss.IndexFlatIP(int(dim))
        self.stamps: List[float] = []
        # best match id (or None) of the last consistency_frames keyframes
        self._recent: deque = deque(maxlen=int(self.config.consistency_frames))

    def __len__(self) -> int:
        return len(self.stamps)

    def best_match(self, descriptor: np.ndarray, stamp: float) -> Optional[LoopCandidate]:
        """Most similar keyframe at least ``min_age_s`` older than ``stamp``, whatever its score.

        Args:
            descriptor: ``(D,)`` or ``(1, D)`` float32, L2-normalised.
            stamp: query time, s.

        Returns:
            The candidate, or None when no keyframe is old enough (``query_id`` is -1: the query
            is not in the map).

        Raises:
            ValueError: wrong dimension or non-finite values.
        """
        if not self.stamps:
            return None
        q = np.asarray(descriptor, dtype=np.float32).reshape(1, -1)
        old_enough = np.asarray(self.stamps) <= stamp - self.config.min_age_s
        if not old_enough.any():
            return None
        k = len(self.stamps) if old_enough.sum() <= self.config.top_k else self.config.top_k
        scores, ids = search(self.index, q, k)
        for s, i in zip(scores[0], ids[0]):
            if i >= 0 and old_enough[i]:
                return LoopCandidate(float(stamp), float(self.stamps[i]), float(s), int(i), -1)
        # the top_k nearest were all too recent: search exhaustively among the old ones
        scores, ids = search(self.index, q, len(self.stamps))
        for s, i in zip(scores[0], ids[0]):
            if i >= 0 and old_enough[i]:
                return LoopCandidate(float(stamp), float(self.stamps[i]), float(s), int(i), -1)
        return None

    def check(self, descriptor: np.ndarray, stamp: float) -> Optional[LoopCandidate]:
        """Add a new keyframe and return its best old-enough match, whatever its score, with
        ``consistent`` set by the temporal check (module doc); None when no keyframe is old
        enough. For evaluation; :meth:`add` applies the threshold and the check.

        Raises:
            ValueError: wrong dimension or non-finite values.
        """
        q = np.asarray(descriptor, dtype=np.float32).reshape(1, -1)
        cand = self.best_match(q, stamp)
        self.index.add(q)
        self.stamps.append(float(stamp))
        self._recent.append(None if cand is None else cand.match_id)
        if cand is not None:
            cand.query_id = len(self.stamps) - 1
            cand.consistent = self._consistent()
        return cand

    def _consistent(self) -> bool:
        """The best matches of the last ``consistency_frames`` keyframes form a consistent run."""
        c = self.config.consistency_frames
        if c <= 1:
            return True
        if len(self._recent) < c or any(m is None for m in self._recent):
            return False
        steps = np.diff(np.asarray(self._recent, dtype=np.int64))
        tol = self.config.consistency_tolerance
        return bool(np.all((steps >= 0) & (steps <= tol)) or np.all((steps <= 0) & (steps >= -tol)))

    def add(self, descriptor: np.ndarray, stamp: float) -> Optional[LoopCandidate]:
        """Check a new keyframe for a loop closure, then add it.

        Returns:
            A candidate when the best old-enough match reaches ``score_threshold`` and passes the
            temporal consistency check, else None.

        Raises:
            ValueError: wrong dimension or non-finite values.
        """
        cand = self.check(descriptor, stamp)
        if cand is not None and cand.consistent and cand.score >= self.config.score_threshold:
            return cand
        return None


def best_matches(descriptors: np.ndarray, stamps: np.ndarray, min_age_s: float, consistency_frames: int = 1,
                 consistency_tolerance: int = 2) -> List[Optional[LoopCandidate]]:
    """Best old-enough match of every keyframe of a sequence (threshold-free, for evaluation).

    Args:
        descriptors: ``(N, D)`` float32, in time order.
        stamps: ``(N,)`` seconds.
        min_age_s, consistency_frames, consistency_tolerance: see :class:`LoopClosureConfig`.

    Returns:
        N entries: the best candidate for keyframe i among keyframes 0..i-1 old enough (its
        ``consistent`` flag set by the temporal check), or None. :func:`evaluate_candidates`
        scores only the consistent ones.
    """
    det = LoopClosureDetector(descriptors.shape[1], LoopClosureConfig(
        min_age_s=min_age_s, score_threshold=-np.inf, consistency_frames=consistency_frames,
        consistency_tolerance=consistency_tolerance))
    return [det.check(d, float(t)) for d, t in zip(descriptors, stamps)]


def evaluate_candidates(candidates: List[Optional[LoopCandidate]], ground_truth: np.ndarray) -> Dict:
    """Precision-recall of loop-closure candidates over the score threshold.

    A candidate of keyframe i is a true positive when ``ground_truth[i, match_id]``. Recall is
    over the keyframes that have at least one ground-truth revisit among the keyframes they were
    allowed to match (the ones older than min_age_s, i.e. the ones the detector could see), so a
    perfect detector reaches recall 1. Candidates that failed the temporal consistency check
    (``consistent`` False) are not scored but still count for those positives, so the recall is
    comparable with and without the check.

    Args:
        candidates: output of :func:`best_matches` (one entry per keyframe, None allowed).
        ground_truth: ``(N, N)`` bool, ``[i, j]`` True when keyframe i revisits keyframe j.

    Returns:
        dict with ``precision``/``recall``/``thresholds`` arrays (decreasing threshold),
        ``average_precision`` (area under the PR curve, step-wise), ``recall_at_100_precision``,
        ``positives`` (keyframes with a visible revisit), and ``best_f1`` with its threshold.
    """
    gt = np.asarray(ground_truth, dtype=bool)
    scored = [(c.score, bool(gt[c.query_id, c.match_id]), c.query_id) for c in candidates
              if c is not None and c.consistent]
    visible = np.zeros(len(candidates), dtype=bool)
    for c in candidates:
        if c is not None:
            older = np.zeros(gt.shape[1], dtype=bool)
            older[: c.query_id] = True
            visible[c.query_id] = bool((gt[c.query_id] & older).any())
    positives = int(visible.sum())
    if not scored or positives == 0:
        return {"precision": [], "recall": [], "thresholds": [], "average_precision": float("nan"),
                "recall_at_100_precision": float("nan"), "positives": positives, "candidates": len(scored),
                "best_f1": float("nan"), "best_f1_threshold": float("nan")}
    scored.sort(key=lambda t: -t[0])
    scores = np.array([s for s, _, _ in scored])
    tp = np.cumsum([ok for _, ok, _ in scored])
    n = np.arange(1, len(scored) + 1)
    precision = tp / n
    recall = tp / positives
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    perfect = precision >= 1.0 - 1e-12
    r100 = float(recall[perfect].max()) if perfect.any() else 0.0
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    b = int(np.argmax(f1))
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": scores.tolist(),
            "average_precision": ap, "recall_at_100_precision": r100, "positives": positives,
            "candidates": len(scored), "best_f1": float(f1[b]), "best_f1_threshold": float(scores[b])}
