"""Online sequence localisation: a :class:`~vpr_localizer.localization.localize.Localizer` whose
single-frame retrieval drives a discrete Bayes filter over the map keyframes.

References: S. Thrun, W. Burgard and D. Fox, *Probabilistic Robotics* (MIT Press 2005), ch. 4
(discrete Bayes filter, grid localisation); P. Hansen and B. Browning, "Visual place recognition
using HMM sequence matching", IROS 2014 (an HMM over keyframes driven by image similarities).

Per frame (:meth:`FilteredLocalizer.update`), for a ``(1, D)`` float32 query descriptor:

1. top-k retrieval (``LocalizerConfig.top_k``; FAISS, sparse: only ``k`` keyframes are touched);
2. :meth:`HmmFilter.update <vpr_localizer.localization.hmm_filter.HmmFilter.update>` with those
   ``k`` ids and cosine similarities, the frame's stamp (a gap longer than ``max_gap_s``, or a
   stamp going backwards, resets the filter) and the travelled distance (odometry) when known,
   else the constant-velocity prior (``v_min .. v_max`` keyframes per frame);
3. the pose: ``pose="mode_mean"`` (default): the posterior-weighted mean position of the
   hypotheses within ``mode_radius_m`` of the MAP keyframe; ``pose="map"``: the position of the
   MAP keyframe itself. Measured on the Lund replay (14 map keyframes 5-25 m apart, 15 queries
   between them, default filter parameters; ``test/test_filter_graph.py``): mean error 7.1 m
   with ``mode_mean``, 7.8 m with ``map`` (single-frame retrieval: 13.2 m) -- the mode mean
   interpolates between neighbouring keyframes when the query lies between them;
4. the covariance (x-y, m^2): the spread of the posterior's MAP mode
   (:attr:`HmmEstimate.mode_covariance`) plus ``sigma_floor_m^2 * I``, plus
   ``sigma_ambiguous_m^2 * I`` while the filter has not converged (the sigmas are the
   :class:`~vpr_localizer.localization.localize.LocalizerConfig` ones, so an unconverged filter
   reports what a fully ambiguous single frame reports).

The result is a :class:`TrackedPose`, a :class:`PoseEstimate` (ids / scores = this frame's
retrieval, ``best_id`` = the MAP keyframe, ``margin`` / ``consistent`` = the single-frame values)
with the filter's :class:`HmmEstimate` (converged flag, posterior probability, hypotheses) and
the single-frame estimate attached for diagnostics.

Keyframe graph: the route order is the keyframes' ``frame`` index, grouped by ``sequence`` in
order of first appearance (row order when a keyframe has no frame index); arc lengths (for
odometry and the covariance) come from the keyframe x-y positions when the map has them. A map
without positions is filtered by route rank only (no odometry; the pose stays NaN as in
single-frame mode).

:class:`OdometryTrack` turns a stream of odometry positions into the distance travelled between
two frame stamps (what the ``vpr_localizer`` node feeds the filter when ``odom`` arrives).

No ROS, no torch.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Optional, Tuple

import numpy as np

from vpr_localizer.errors import ConfigError
from vpr_localizer.localization.hmm_filter import HmmEstimate, HmmFilter, HmmFilterConfig
from vpr_localizer.localization.localize import Localizer, PoseEstimate

__all__ = ["TrackingConfig", "TrackedPose", "FilteredLocalizer", "OdometryTrack", "route_order_keys"]

POSE_MODES = ("map", "mode_mean")


@dataclass
class TrackingConfig:
    """Parameters of :class:`FilteredLocalizer` (the ``filter.*`` section of the
    ``vpr_localizer`` node); the filter fields are passed to
    :class:`~vpr_localizer.localization.hmm_filter.HmmFilterConfig` (units in brackets).

    Attributes:
        enabled: the vpr_localizer node publishes the filtered pose (False = single-frame
            retrieval, the default; :class:`FilteredLocalizer` itself ignores this).
        pose: ``mode_mean`` (posterior-weighted mean position of the MAP mode's keyframes) or
            ``map`` (position of the MAP keyframe).
        top_k: keyframes retrieved per frame as the filter's observation [-]; >= 1 (the
            single-frame estimate inside :class:`TrackedPose` keeps ``localizer.top_k``).
        temperature: T of the observation likelihood exp(sim / T) [cosine similarity]; > 0.
        floor: likelihood of a keyframe outside the top-k relative to the best one [-]; in
            (0, 1]. Smaller = trust the retrieval more.
        v_min: smallest motion per frame without odometry [keyframes, integer].
        v_max: largest motion per frame without odometry [keyframes, integer].
        odom_sigma_m: odometry noise per frame [m]; > 0.
        odom_sigma_frac: odometry noise proportional to the travelled distance [-]; >= 0.
        closed_loop: the map's route is a loop (its last keyframe connects to the first).
        kidnap_prob: share of the belief moved to the uniform background per frame [-]; in
            [0, 1). Larger = faster relocalisation after a jump, less smoothing.
        max_hypotheses: cap on explicit hypotheses [-]; >= 1.
        max_gap_s: reset the filter when consecutive frames are more than this apart, or the
            stamp goes backwards [s]; 0 = never.
        converged_radius: neighbourhood of the MAP keyframe [route keyframes, +-]; >= 0.
        converged_threshold: converged when that neighbourhood holds more than this posterior
            probability [-]; in (0, 1].
        mode_radius_m: keyframes within this distance of the MAP keyframe form its mode
            (covariance, mode_mean) [m]; > 0.
        odom_max_age_s: odometry may end at most this long before a frame's stamp (or start
            after the previous one) and still give the distance between them [s]; >= 0.

    Raises:
        ConfigError: an invalid value (also from :meth:`hmm_config`).
    """

    enabled: bool = False
    pose: str = "mode_mean"
    # top_k, temperature and floor: the best of a sweep on the Nordland tuning part of the route
    # (positions 1600-2575, never the held-out part): benchmarks/tune_filter.py
    top_k: int = 50
    temperature: float = 0.1
    floor: float = 0.3
    v_min: int = 0
    v_max: int = 2
    odom_sigma_m: float = 1.0
    odom_sigma_frac: float = 0.1
    closed_loop: bool = False
    kidnap_prob: float = 0.01
    max_hypotheses: int = 2000
    max_gap_s: float = 2.0
    converged_radius: int = 2
    converged_threshold: float = 0.5
    mode_radius_m: float = 10.0
    odom_max_age_s: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"filter top_k must be an integer >= 1, got {self.top_k!r}")
        if self.pose not in POSE_MODES:
            raise ConfigError(f"filter pose must be one of {', '.join(POSE_MODES)}, got {self.pose!r}")
        if not (isinstance(self.max_gap_s, (int, float)) and math.isfinite(self.max_gap_s) and self.max_gap_s >= 0):
            raise ConfigError(f"filter max_gap_s must be a finite number >= 0 (0 = never reset), got {self.max_gap_s!r}")
        if not (isinstance(self.odom_max_age_s, (int, float)) and math.isfinite(self.odom_max_age_s)
                and self.odom_max_age_s >= 0):
            raise ConfigError(f"filter odom_max_age_s must be a finite number >= 0, got {self.odom_max_age_s!r}")
        self.hmm_config()  # validates the filter fields

    def hmm_config(self) -> HmmFilterConfig:
        """The :class:`HmmFilterConfig` of these values (``velocity_unit="keyframes"``).

        Raises:
            ConfigError: an invalid filter value.
        """
        return HmmFilterConfig(
            temperature=self.temperature, floor=self.floor, velocity_unit="keyframes",
            v_min=self.v_min, v_max=self.v_max, odom_sigma_m=self.odom_sigma_m,
            odom_sigma_frac=self.odom_sigma_frac, closed_loop=self.closed_loop, kidnap_prob=self.kidnap_prob,
            max_hypotheses=self.max_hypotheses, max_gap_s=self.max_gap_s if self.max_gap_s > 0 else None,
            converged_radius=self.converged_radius, converged_threshold=self.converged_threshold,
            mode_radius_m=self.mode_radius_m)

    @classmethod
    def from_dict(cls, d: Dict) -> "TrackingConfig":
        """From a parameter-file section (unknown keys raise :class:`ConfigError`)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown filter parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class TrackedPose(PoseEstimate):
    """A :class:`PoseEstimate` from :class:`FilteredLocalizer` (see the module doc).

    Attributes (besides :class:`PoseEstimate`'s; ``best_id`` is the MAP keyframe, ``ids`` /
    ``scores`` this frame's retrieval, ``margin`` / ``consistent`` the single-frame values):
        filter: the filter's :class:`HmmEstimate` (``converged``, ``probability``,
            ``n_hypotheses``, ``was_reset`` ...).
        single: the single-frame :meth:`Localizer.estimate` of the same retrieval.
        distance_m: travelled distance used by the motion step [m], None when the
            constant-velocity prior was used.
    """

    filter: Optional[HmmEstimate] = None
    single: Optional[PoseEstimate] = None
    distance_m: Optional[float] = None

    @property
    def converged(self) -> bool:
        return bool(self.filter is not None and self.filter.converged)

    @property
    def probability(self) -> float:
        """Posterior probability of the MAP keyframe [-]."""
        return float(self.filter.probability) if self.filter is not None else math.nan

    def as_dict(self, query: str = "", keyframes=None) -> Dict:
        d = super().as_dict(query, keyframes)
        if self.filter is not None:
            d.update(converged=bool(self.filter.converged), probability=float(self.filter.probability),
                     hypotheses=int(self.filter.n_hypotheses), was_reset=bool(self.filter.was_reset),
                     distance_m=math.nan if self.distance_m is None else float(self.distance_m))
        return d


def route_order_keys(vpr_map) -> Optional[np.ndarray]:
    """Route rank of every keyframe of ``vpr_map``: sorted by ``frame`` within each ``sequence``,
    sequences in order of first appearance (stable for ties).

    Returns:
        ``(N,)`` int64 ranks (a permutation of ``0..N-1``), or None (row order) when some
        keyframe has no frame index (``frame < 0``) or the map is empty.
    """
    kfs = vpr_map.keyframes
    if not kfs:
        return None
    frames = np.array([int(k.frame) for k in kfs], dtype=np.int64)
    if np.any(frames < 0):
        return None
    seq_code: Dict[str, int] = {}
    seq = np.array([seq_code.setdefault(k.sequence, len(seq_code)) for k in kfs], dtype=np.int64)
    order = np.lexsort((frames, seq))  # by sequence, then frame; stable
    rank = np.empty(len(kfs), dtype=np.int64)
    rank[order] = np.arange(len(kfs))
    return rank


class FilteredLocalizer:
    """Online localisation of a frame stream: retrieval + :class:`HmmFilter` (see module doc).

    Args:
        localizer: the single-frame :class:`Localizer` (its map, ``top_k`` and sigmas are used).
        config: :class:`TrackingConfig` (default ``TrackingConfig()``).
        odometry: an :class:`OdometryTrack` fed by the caller; when an update gets no
            ``distance_m`` and the track covers the time since the previous frame, its travelled
            distance drives the motion step (else the constant-velocity prior). Ignored on a map
            without positions.

    Attributes:
        filter: the :class:`HmmFilter` over the map's keyframes.
        last: the newest :class:`TrackedPose` (None before the first frame).

    Raises:
        ValueError: an empty map. ConfigError: an invalid ``config``.
    """

    def __init__(self, localizer: Localizer, config: Optional[TrackingConfig] = None,
                 odometry: Optional["OdometryTrack"] = None):
        self.localizer = localizer
        self.config = config if config is not None else TrackingConfig()
        self.odometry = odometry
        self._last_stamp: Optional[float] = None
        vmap = localizer.map
        if len(vmap) == 0:
            raise ValueError("FilteredLocalizer: the map has no keyframe")
        self._has_pos = bool(vmap.has_positions)
        self._pos = vmap.positions if self._has_pos else None  # (N, 3) m
        self.filter = HmmFilter(self.config.hmm_config(), n_keyframes=len(vmap),
                                positions=self._pos[:, :2] if self._has_pos else None,
                                frame_indices=route_order_keys(vmap))
        self.last: Optional[TrackedPose] = None

    @property
    def has_positions(self) -> bool:
        """Whether the map has keyframe positions (odometry and poses need them)."""
        return self._has_pos

    def reset(self) -> None:
        """Forget the belief (uniform over the map) and the last stamp."""
        self.filter.reset()
        self.last = None
        self._last_stamp = None

    def update(self, descriptor: np.ndarray, stamp_s: Optional[float] = None,
               distance_m: Optional[float] = None) -> TrackedPose:
        """One frame: retrieve, filter, estimate.

        Args:
            descriptor: ``(1, D)`` (or ``(D,)``) float32 L2-normalised query descriptor.
            stamp_s: frame time [s] (``None`` = no gap check, no odometry track look-up).
            distance_m: distance travelled since the previous frame [m] (odometry), or None:
                the :class:`OdometryTrack` distance between the previous frame's stamp and
                ``stamp_s`` when the track covers it, else the constant-velocity prior.

        Returns:
            :class:`TrackedPose` (also kept in :attr:`last`).

        Raises:
            ValueError: a descriptor of the wrong size or with NaN / inf, more than one
                descriptor, a non-finite stamp or distance, or a distance on a map without
                positions.
        """
        d = np.asarray(descriptor, dtype=np.float32)
        if d.ndim == 1:
            d = d[None]
        if d.ndim != 2 or d.shape[0] != 1:
            raise ValueError(f"FilteredLocalizer.update: one descriptor (1, D) expected, got shape {d.shape}")
        scores, ids = self.localizer.retrieve(d, k=min(self.config.top_k, len(self.localizer.map)))
        return self.update_retrieval(ids[0], scores[0], stamp_s, distance_m)

    def update_retrieval(self, ids: np.ndarray, scores: np.ndarray, stamp_s: Optional[float] = None,
                         distance_m: Optional[float] = None) -> TrackedPose:
        """:meth:`update` from an existing top-k retrieval ``ids (k,)`` int64, ``scores (k,)``
        (best first; ids of -1 are ignored): all k are the filter's observation, the first
        ``localizer.top_k`` give the single-frame estimate.

        Raises:
            ValueError: no valid id, non-finite scores, stamp or distance, or a distance without
                positions.
        """
        if distance_m is not None and not self._has_pos:
            raise ValueError("FilteredLocalizer: odometry (distance_m) needs a map with keyframe positions")
        ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
        ok = ids >= 0
        k = self.localizer.config.top_k
        single = self.localizer.estimate(ids[:k], scores[:k])  # raises on an empty retrieval
        if (distance_m is None and self.odometry is not None and self._has_pos and stamp_s is not None
                and self._last_stamp is not None):
            distance_m = self.odometry.distance(self._last_stamp, float(stamp_s))
        est = self.filter.update(ids[ok], scores[ok].astype(np.float64), stamp_s, distance_m)
        if stamp_s is not None:
            self._last_stamp = float(stamp_s)
        out = TrackedPose(ids=single.ids, scores=single.scores, best_id=int(est.keyframe),
                          margin=single.margin, consistent=single.consistent, filter=est, single=single,
                          distance_m=None if distance_m is None else float(distance_m))
        if self._has_pos:
            cfg, lcfg = self.config, self.localizer.config
            if cfg.pose == "mode_mean":
                xyz = self._mode_mean(est)
            else:
                xyz = self._pos[est.keyframe]
            out.x, out.y = float(xyz[0]), float(xyz[1])
            out.z = float(xyz[2]) if math.isfinite(float(xyz[2])) else 0.0
            var = lcfg.sigma_floor_m ** 2 + (0.0 if est.converged else lcfg.sigma_ambiguous_m ** 2)
            out.covariance_xy = np.asarray(est.mode_covariance, dtype=np.float64) + var * np.eye(2)
            datum = self.localizer.map.datum
            if datum is not None:
                lat, lon, _ = datum.to_geodetic(out.x, out.y, out.z)
                out.lat, out.lon = float(lat), float(lon)
        self.last = out
        return out

    def _mode_mean(self, est: HmmEstimate) -> np.ndarray:
        """Posterior-weighted mean ``(3,)`` of the hypotheses within ``mode_radius_m`` of the MAP
        keyframe (x-y distance), metres."""
        ids, probs, _ = self.filter.posterior()
        xyz = self._pos[ids]
        centre = self._pos[est.keyframe]
        near = np.hypot(xyz[:, 0] - centre[0], xyz[:, 1] - centre[1]) <= self.config.mode_radius_m
        w = probs[near] / probs[near].sum()
        z = xyz[near, 2]
        mean = w @ np.nan_to_num(xyz[near], nan=0.0)
        if not np.all(np.isfinite(z)):
            mean[2] = centre[2]
        return mean


class OdometryTrack:
    """Distance travelled between two stamps, from a stream of odometry positions.

    The distance is a path length (>= 0): it assumes travel in the route's direction; a caller
    that knows the camera drives the route backwards passes a negative ``distance_m`` to
    :meth:`FilteredLocalizer.update` itself.

    Thread-safe: :meth:`add` (odometry callback) and :meth:`distance` (frame worker) may run
    in different threads. Keeps the newest ``max_samples`` samples.

    Args:
        max_age_s: how far the samples may fall short of the interval's ends [s] (the
            position there is then the nearest sample's); >= 0.
        max_samples: samples kept (bounded memory); >= 2.

    Raises:
        ValueError: invalid arguments.
    """

    def __init__(self, max_age_s: float = 0.5, max_samples: int = 2000):
        if not (math.isfinite(max_age_s) and max_age_s >= 0):
            raise ValueError(f"OdometryTrack: max_age_s must be a finite number >= 0, got {max_age_s!r}")
        if int(max_samples) < 2:
            raise ValueError(f"OdometryTrack: max_samples must be >= 2, got {max_samples!r}")
        self.max_age_s = float(max_age_s)
        self._samples: Deque[Tuple[float, float, float]] = deque(maxlen=int(max_samples))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def add(self, stamp_s: float, x: float, y: float) -> bool:
        """Add a position ``(x, y)`` [m] at ``stamp_s`` [s]. A sample older than the newest one
        (time went back: a replayed bag, a restarted clock) clears the history first.

        Returns:
            False (and nothing is stored) for a non-finite value.
        """
        if not all(math.isfinite(v) for v in (stamp_s, x, y)):
            return False
        with self._lock:
            if self._samples and stamp_s < self._samples[-1][0]:
                self._samples.clear()
            self._samples.append((float(stamp_s), float(x), float(y)))
        return True

    def distance(self, t0: float, t1: float) -> Optional[float]:
        """Path length [m] of the odometry positions between ``t0`` and ``t1`` (``t0 <= t1``):
        the x-y polyline through the position at ``t0`` (linear interpolation), every sample
        strictly between, and the position at ``t1``.

        Returns:
            None when the samples do not cover ``[t0, t1]`` to within ``max_age_s`` at either
            end, ``t1 < t0``, or a stamp is not finite.
        """
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0:
            return None
        with self._lock:
            if not self._samples:
                return None
            s = np.array(self._samples, dtype=np.float64)
        t = s[:, 0]
        if t[0] > t0 + self.max_age_s or t[-1] < t1 - self.max_age_s:
            return None
        p0, p1 = self._at(s, t0), self._at(s, t1)
        inner = s[(t > t0) & (t < t1), 1:]
        pts = np.vstack([p0[None], inner, p1[None]])
        return float(np.hypot(*np.diff(pts, axis=0).T).sum())

    @staticmethod
    def _at(s: np.ndarray, t: float) -> np.ndarray:
        """x-y at ``t``: interpolated inside the samples' time span, else the nearest sample's."""
        return np.array([np.interp(t, s[:, 0], s[:, 1]), np.interp(t, s[:, 0], s[:, 2])])
