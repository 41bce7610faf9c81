"""Discrete Bayes (HMM) filter over map keyframes for online visual localisation.

References: S. Thrun, W. Burgard and D. Fox, *Probabilistic Robotics* (MIT Press 2005), ch. 4
(discrete Bayes filter, grid localisation); P. Hansen and B. Browning, "Visual place recognition
using HMM sequence matching", IROS 2014 (an HMM over keyframes driven by image similarities).

State: the index of the map keyframe the camera is at. The keyframes form a *route*: they are
ordered by ``frame_indices`` (or by their row order when none are given); the "rank" of a
keyframe is its position on the route, and ``positions`` (metres) give each keyframe's arc
length along the route (cumulative distance between consecutive keyframes).

Sparse posterior. The belief over all ``N`` keyframes is represented as

    P(i) = u + p_i      (p_i = 0 for keyframes that are not hypotheses)

with ``u`` a uniform *background* density (the same for every keyframe) and ``p_i >= 0`` the
*excess* mass of at most ``max_hypotheses`` explicit hypotheses. Everything that touches the
background is done analytically (its total is ``u * N``), so an update costs
``O(k + H * w)`` (``k`` retrieved keyframes, ``H`` hypotheses, ``w`` keyframes reached by one
motion step) plus ``O(log N)`` look-ups, independent of ``N``. Nothing of size ``N`` is
allocated per update; the constructor keeps the route order (``O(N)``, only when
``frame_indices`` are not already sorted) and the arc lengths (``O(N)``, only with positions).

Predict (motion model), one step per frame:

* kidnapping: a fraction ``kidnap_prob`` of the explicit mass moves to the uniform background
  (the robot may have been carried anywhere; this also keeps ``u`` from vanishing, so a
  relocalisation is always possible);
* **odometry** (``distance_m`` given, needs ``positions``): mass at arc length ``s_i`` moves to
  the keyframes with arc length in ``s_i + d +- window_sigmas * sigma``, weighted by a Gaussian
  ``N(s_i + d, sigma^2)`` with ``sigma^2 = odom_sigma_m^2 + (odom_sigma_frac * d)^2``; when no
  keyframe lies in the window (a gap in the map) the nearest one to ``s_i + d`` receives it;
* **constant velocity without odometry**: ``velocity_unit="keyframes"``: rank ``r`` moves to
  ``r + v`` for integer ``v`` in ``[v_min, v_max]`` with weights ``v_weights`` (uniform by
  default); ``velocity_unit="metres"``: to every keyframe with arc length in
  ``[s_i + v_min, s_i + v_max]`` (uniform weights; needs ``positions``).

Route ends: with ``closed_loop=True`` the route wraps around (rank ``N`` is rank 0; arc length
modulo the loop length, which includes the segment from the last keyframe back to the first);
otherwise moves past an end land on the end keyframe. The background stays uniform under every
motion model (exact on a loop, ignoring end effects on an open route).

Update (observation model), from the top-k retrieval of the current frame
``(indices (k,), similarities (k,))``: the likelihood of a retrieved keyframe is
``exp((sim - sim_max) / temperature)`` (``exp(sim / T)`` up to a constant factor, which
normalisation removes; scaled so the best retrieved keyframe has likelihood 1), clipped below
at ``floor``; every keyframe not retrieved gets likelihood ``floor``. The floor is what lets a
kidnapped robot relocalise: the unnormalised mass outside the top-k is
``floor * (mass there)``, handled analytically (``u -> u * floor``, ``p_i -> p_i * floor``), and
retrieved keyframes without a hypothesis become new hypotheses with excess ``u * (l - floor)``.

Pruning: hypotheses whose excess is below ``min_excess * u`` (indistinguishable from the
background) are dropped, then only the ``max_hypotheses`` largest are kept; dropped mass is
returned to the background, so the total stays exactly 1.

Outputs (:class:`HmmEstimate`): MAP keyframe (by map row id), its posterior probability, the
probability of its route neighbourhood (``+- converged_radius`` ranks), ``converged`` when that
exceeds ``converged_threshold``, and the posterior's spatial spread: the weighted mean and
covariance (2x2, m^2) of keyframe positions over all hypotheses (global; large while the
posterior is multi-modal), and the same restricted to the MAP mode (hypotheses within
``mode_radius_m`` of the MAP keyframe: ``mode_covariance``, the pose covariance to publish once
``converged``; on the synthetic route a converged posterior keeps ~1% of its mass on distant
distractors, which alone makes the global covariance thousands of m^2).

Neighbour look-ups are along the route (``numpy.searchsorted`` on the sorted arc lengths); no
k-d tree is needed (scipy is not a dependency of this module and is not installed in the
project's virtual environment). Branching routes (several sessions in one map) are treated as
one route in ``frame_indices`` order; the distance between the end of one session and the start
of the next counts as route length, so transitions across them need that much odometry.

Pure NumPy: no torch, no ROS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from vpr_localizer.errors import ConfigError

__all__ = ["HmmFilterConfig", "HmmEstimate", "HmmFilter"]


def _is_num(val) -> bool:
    return isinstance(val, (int, float, np.integer, np.floating)) and not isinstance(val, bool)


@dataclass(frozen=True)
class HmmFilterConfig:
    """Parameters of :class:`HmmFilter` (units in brackets).

    Attributes:
        temperature: ``T`` of the observation likelihood ``exp(sim / T)`` [similarity units,
            e.g. cosine]; > 0.
        floor: likelihood of a keyframe outside the top-k, relative to the best retrieved
            keyframe (likelihood 1) [-]; in (0, 1]. Smaller = trust the retrieval more.
        velocity_unit: ``"keyframes"`` (``v_min``/``v_max`` are integer rank offsets per frame)
            or ``"metres"`` (arc-length offsets per frame; needs positions). Used when no
            odometry is given.
        v_min, v_max: velocity range per frame [keyframes or metres]; ``v_min <= v_max``.
        v_weights: for ``"keyframes"``: one weight per offset ``v_min .. v_max`` (>= 0, not all
            0; normalised), ``None`` = uniform. Must be ``None`` for ``"metres"``.
        odom_sigma_m: odometry noise per frame [m]; > 0.
        odom_sigma_frac: odometry noise proportional to the travelled distance [-]; >= 0.
        window_sigmas: odometry kernel half-width in sigmas [-]; > 0.
        closed_loop: the route is a loop (last keyframe connects to the first).
        kidnap_prob: fraction of the explicit mass moved to the uniform background per frame
            [-]; in [0, 1).
        max_hypotheses: cap on explicit hypotheses kept [-]; >= 1.
        min_excess: a hypothesis is dropped when its excess mass is below ``min_excess * u``
            (``u`` = background mass per keyframe) [-]; >= 0.
        max_gap_s: reset when consecutive stamps are further apart than this, or go backwards
            [s]; ``None`` disables. > 0.
        converged_radius: neighbourhood of the MAP keyframe, +- ranks [keyframes]; >= 0.
        converged_threshold: ``converged`` when the neighbourhood holds more than this
            probability [-]; in (0, 1].
        mode_radius_m: hypotheses within this distance of the MAP keyframe's position form its
            mode (``mode_covariance``, ``mode_probability``) [m]; > 0.

    Raises:
        vpr_localizer.errors.ConfigError (a ``ValueError``): on an invalid value.
    """

    temperature: float = 0.05
    floor: float = 0.05
    velocity_unit: str = "keyframes"
    v_min: float = 0
    v_max: float = 2
    v_weights: Optional[Tuple[float, ...]] = None
    odom_sigma_m: float = 1.0
    odom_sigma_frac: float = 0.1
    window_sigmas: float = 3.0
    closed_loop: bool = False
    kidnap_prob: float = 0.01
    max_hypotheses: int = 2000
    min_excess: float = 0.1
    max_gap_s: Optional[float] = 2.0
    converged_radius: int = 2
    converged_threshold: float = 0.5
    mode_radius_m: float = 10.0

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ConfigError:
            return ConfigError(f"HmmFilterConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("temperature", "floor", "v_min", "v_max", "odom_sigma_m", "odom_sigma_frac",
                     "window_sigmas", "kidnap_prob", "min_excess", "converged_threshold", "mode_radius_m"):
            val = getattr(self, name)
            if not _is_num(val) or not math.isfinite(val):
                raise bad(name, "a finite number")
        for name in ("temperature", "odom_sigma_m", "window_sigmas", "mode_radius_m"):
            if getattr(self, name) <= 0:
                raise bad(name, "> 0")
        for name in ("odom_sigma_frac", "min_excess"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if not 0 < self.floor <= 1:
            raise bad("floor", "in (0, 1]")
        if not 0 <= self.kidnap_prob < 1:
            raise bad("kidnap_prob", "in [0, 1)")
        if not 0 < self.converged_threshold <= 1:
            raise bad("converged_threshold", "in (0, 1]")
        for name, lo in (("max_hypotheses", 1), ("converged_radius", 0)):
            val = getattr(self, name)
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
                raise bad(name, f"an integer >= {lo}")
        if self.max_gap_s is not None and (not _is_num(self.max_gap_s) or not self.max_gap_s > 0):
            raise bad("max_gap_s", "None or a number > 0")
        if self.v_min > self.v_max:
            raise ConfigError(f"HmmFilterConfig: v_min ({self.v_min}) must be <= v_max ({self.v_max})")
        if self.velocity_unit == "keyframes":
            if float(self.v_min) != int(self.v_min) or float(self.v_max) != int(self.v_max):
                raise ConfigError("HmmFilterConfig: with velocity_unit='keyframes' v_min and v_max must be "
                                  f"integers, got {self.v_min}, {self.v_max}")
            n = int(self.v_max) - int(self.v_min) + 1
            if self.v_weights is not None:
                w = np.asarray(self.v_weights, dtype=np.float64)
                if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                    raise ConfigError(f"HmmFilterConfig.v_weights must be {n} finite non-negative weights "
                                      f"(one per offset {int(self.v_min)}..{int(self.v_max)}), not all 0; "
                                      f"got {self.v_weights!r}")
        elif self.velocity_unit == "metres":
            if self.v_weights is not None:
                raise ConfigError("HmmFilterConfig.v_weights is only used with velocity_unit='keyframes'")
        else:
            raise ConfigError(f"HmmFilterConfig.velocity_unit must be 'keyframes' or 'metres', "
                              f"got {self.velocity_unit!r}")


@dataclass
class HmmEstimate:
    """Result of one :meth:`HmmFilter.update`.

    Attributes:
        keyframe: MAP keyframe, as a map row index (-1 when the posterior is uniform).
        probability: posterior probability of that keyframe [-].
        neighbourhood_probability: posterior probability of the keyframes within
            ``+- converged_radius`` route ranks of it [-].
        converged: ``neighbourhood_probability > converged_threshold``.
        position: ``(2,)`` float64 position of the MAP keyframe [m], or ``None`` without
            positions.
        mean_position: ``(2,)`` float64 posterior-weighted mean position over the hypotheses
            [m], or ``None``.
        covariance: ``(2, 2)`` float64 weighted covariance of keyframe positions over all
            hypotheses (weights = their posterior probabilities) [m^2], or ``None`` without
            positions. The global spread: a fraction of a percent of mass on distant
            distractors makes it large, which flags a multi-modal posterior.
        mode_covariance: ``(2, 2)`` float64 the same over the hypotheses within
            ``mode_radius_m`` of the MAP keyframe [m^2] (``None`` without positions): the pose
            covariance to publish when ``converged``.
        mode_probability: posterior probability of those hypotheses [-] (``nan`` without
            positions).
        n_hypotheses: explicit hypotheses after the update.
        background_probability: probability spread uniformly over the non-hypothesis keyframes.
        was_reset: the filter was reset (time gap) before this update.
    """

    keyframe: int
    probability: float
    neighbourhood_probability: float
    converged: bool
    position: Optional[np.ndarray]
    mean_position: Optional[np.ndarray]
    covariance: Optional[np.ndarray]
    mode_covariance: Optional[np.ndarray]
    mode_probability: float
    n_hypotheses: int
    background_probability: float
    was_reset: bool


class HmmFilter:
    """Sparse discrete Bayes filter over map keyframes (see the module docstring).

    Args:
        config: parameters (default :class:`HmmFilterConfig()`).
        n_keyframes: number of keyframes ``N``; may be omitted when ``positions`` or
            ``frame_indices`` are given (then it must agree with them).
        positions: ``(N, 2)`` float64 keyframe positions [m] (map x-y / ENU); needed for
            odometry, ``velocity_unit="metres"`` and the covariance output.
        frame_indices: ``(N,)`` integer frame index of each keyframe; the route order is
            ascending frame index (stable for ties). ``None`` = row order.

    Raises:
        ValueError: missing/inconsistent ``N``, bad shapes, non-finite positions, or a config
            needing positions without them.
    """

    def __init__(self, config: Optional[HmmFilterConfig] = None, *, n_keyframes: Optional[int] = None,
                 positions: Optional[np.ndarray] = None, frame_indices: Optional[np.ndarray] = None) -> None:
        cfg = config if config is not None else HmmFilterConfig()
        if not isinstance(cfg, HmmFilterConfig):
            raise ValueError(f"HmmFilter: config must be a HmmFilterConfig, got {type(cfg).__name__}")
        self.config = cfg
        sizes = []
        if n_keyframes is not None:
            if isinstance(n_keyframes, bool) or not isinstance(n_keyframes, (int, np.integer)) or n_keyframes < 1:
                raise ValueError(f"HmmFilter: n_keyframes must be an integer >= 1, got {n_keyframes!r}")
            sizes.append(("n_keyframes", int(n_keyframes)))
        pos = None
        if positions is not None:
            pos = np.asarray(positions, dtype=np.float64)
            if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] < 1:
                raise ValueError(f"HmmFilter: positions must have shape (N, 2), got {pos.shape}")
            if not np.all(np.isfinite(pos)):
                raise ValueError("HmmFilter: positions contain NaN or inf")
            sizes.append(("positions", pos.shape[0]))
        order = None
        if frame_indices is not None:
            fi = np.asarray(frame_indices)
            if fi.ndim != 1 or fi.shape[0] < 1 or not np.issubdtype(fi.dtype, np.integer):
                raise ValueError(f"HmmFilter: frame_indices must be a 1-D integer array, got shape {fi.shape} "
                                 f"dtype {fi.dtype}")
            sizes.append(("frame_indices", fi.shape[0]))
            if np.any(fi[1:] < fi[:-1]):
                order = np.argsort(fi, kind="stable")
        if not sizes:
            raise ValueError("HmmFilter: give n_keyframes, positions or frame_indices")
        if len({n for _, n in sizes}) != 1:
            raise ValueError("HmmFilter: inconsistent keyframe counts: "
                             + ", ".join(f"{name}={n}" for name, n in sizes))
        self.n = sizes[0][1]
        self._order = order  # rank -> map id (None = identity)
        if order is not None:
            inv = np.empty(self.n, dtype=np.int64)
            inv[order] = np.arange(self.n)
            self._rank_of = inv
        else:
            self._rank_of = None
        self._pos = pos
        self._arc = None
        self._loop_len = math.inf
        if pos is not None:
            p = pos[order] if order is not None else pos
            seg = np.hypot(np.diff(p[:, 0]), np.diff(p[:, 1]))
            self._arc = np.concatenate([[0.0], np.cumsum(seg)])
            if cfg.closed_loop:
                closing = float(np.hypot(*(p[0] - p[-1])))
                self._loop_len = float(self._arc[-1]) + max(closing, 1e-9)
        if cfg.velocity_unit == "metres" and pos is None:
            raise ValueError("HmmFilter: velocity_unit='metres' needs keyframe positions")
        if cfg.velocity_unit == "keyframes":
            self._v_off = np.arange(int(cfg.v_min), int(cfg.v_max) + 1, dtype=np.int64)
            w = (np.ones(len(self._v_off)) if cfg.v_weights is None
                 else np.asarray(cfg.v_weights, dtype=np.float64))
            self._v_w = w / w.sum()
        self._last_stamp: Optional[float] = None
        self.reset()

    # ---------------------------------------------------------------- state

    def reset(self) -> None:
        """Uniform posterior over all keyframes; forget the last stamp."""
        self._r = np.zeros(0, dtype=np.int64)   # ranks of the hypotheses, sorted
        self._p = np.zeros(0, dtype=np.float64)  # their excess mass
        self._u = 1.0 / self.n                   # background mass per keyframe
        self._last_stamp = None

    @property
    def n_hypotheses(self) -> int:
        """Number of explicit hypotheses."""
        return int(self._r.shape[0])

    def posterior(self) -> Tuple[np.ndarray, np.ndarray, float]:
        """Sparse posterior.

        Returns:
            ``(ids (H,) int64, probabilities (H,) float64, background)``: map ids of the
            hypotheses and their posterior probabilities (background included), and the
            probability of every other keyframe (each).
        """
        return self._ids(self._r), self._p + self._u, float(self._u)

    def _ids(self, ranks: np.ndarray) -> np.ndarray:
        return self._order[ranks] if self._order is not None else ranks.astype(np.int64, copy=True)

    # ---------------------------------------------------------------- predict

    def predict(self, distance_m: Optional[float] = None) -> None:
        """Motion step: kidnap mixing, then odometry or constant-velocity transition.

        Args:
            distance_m: distance travelled along the route since the previous frame [m]
                (signed; negative = backwards); ``None`` = constant-velocity prior.

        Raises:
            ValueError: ``distance_m`` not finite, or given without keyframe positions.
        """
        cfg = self.config
        if distance_m is not None:
            if not _is_num(distance_m) or not math.isfinite(distance_m):
                raise ValueError(f"HmmFilter.predict: distance_m must be a finite number, got {distance_m!r}")
            if self._arc is None:
                raise ValueError("HmmFilter.predict: odometry (distance_m) needs keyframe positions")
        if self._r.size == 0:
            return  # uniform stays uniform
        if cfg.kidnap_prob > 0:
            moved = cfg.kidnap_prob * float(self._p.sum())
            self._p *= 1.0 - cfg.kidnap_prob
            self._u += moved / self.n
        if distance_m is not None:
            d = float(distance_m)
            sigma = math.sqrt(cfg.odom_sigma_m ** 2 + (cfg.odom_sigma_frac * d) ** 2)
            half = cfg.window_sigmas * sigma
            tgt, mass = self._arc_transition(d - half, d + half, d, sigma)
        elif cfg.velocity_unit == "metres":
            tgt, mass = self._arc_transition(float(cfg.v_min), float(cfg.v_max),
                                             0.5 * (cfg.v_min + cfg.v_max), None)
        else:
            tgt = self._r[:, None] + self._v_off[None, :]
            tgt = np.mod(tgt, self.n) if cfg.closed_loop else np.clip(tgt, 0, self.n - 1)
            mass = self._p[:, None] * self._v_w[None, :]
            tgt, mass = tgt.ravel(), mass.ravel()
        uniq, inv = np.unique(tgt, return_inverse=True)
        self._r = uniq.astype(np.int64)
        self._p = np.bincount(inv.ravel(), weights=mass, minlength=uniq.shape[0])

    def _count_below(self, x: np.ndarray, side: str) -> np.ndarray:
        """Unwrapped rank bound: number of keyframes with (unwrapped) arc length < x (or <=)."""
        if math.isinf(self._loop_len):
            return np.searchsorted(self._arc, x, side=side)
        turns = np.floor(x / self._loop_len)
        return self.n * turns.astype(np.int64) + np.searchsorted(self._arc, x - turns * self._loop_len, side=side)

    def _arc_transition(self, lo_off: float, hi_off: float, centre_off: float,
                        sigma: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
        """Spread each hypothesis over the keyframes with arc length in ``[s + lo_off, s + hi_off]``.

        Gaussian weights around ``s + centre_off`` (``sigma`` [m]) or uniform (``sigma=None``);
        the nearest keyframe to the centre receives the mass when the window is empty.
        Returns ``(target ranks (T,), masses (T,))``.
        """
        s0 = self._arc[self._r]
        loop = not math.isinf(self._loop_len)
        lo = self._count_below(s0 + lo_off, "left")
        hi = self._count_below(s0 + hi_off, "right")
        if loop:
            hi = np.minimum(hi, lo + self.n)  # a window longer than the loop visits each keyframe once
        else:
            lo = np.clip(lo, 0, self.n)
            hi = np.clip(hi, 0, self.n)
        empty = hi <= lo
        if np.any(empty):
            c = s0[empty] + centre_off
            j = self._count_below(c, "left")
            if loop:
                prev_arc = self._unwrapped_arc(j - 1)
                next_arc = self._unwrapped_arc(j)
                nearest = np.where(np.abs(next_arc - c) < np.abs(c - prev_arc), j, j - 1)
            else:
                jn = np.clip(j, 0, self.n - 1)
                jp = np.clip(j - 1, 0, self.n - 1)
                nearest = np.where(np.abs(self._arc[jn] - c) < np.abs(c - self._arc[jp]), jn, jp)
            lo[empty] = nearest
            hi[empty] = nearest + 1
        counts = hi - lo
        total = int(counts.sum())
        hyp = np.repeat(np.arange(self._r.shape[0]), counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        ur = lo[hyp] + within  # unwrapped ranks
        if sigma is None:
            w = np.ones(total)
        else:
            arc = self._unwrapped_arc(ur) if loop else self._arc[ur]
            z = (arc - (s0[hyp] + centre_off)) / sigma
            w = np.exp(-0.5 * z * z)
        norm = np.bincount(hyp, weights=w, minlength=self._r.shape[0])
        mass = self._p[hyp] * w / norm[hyp]
        tgt = np.mod(ur, self.n) if loop else ur
        return tgt, mass

    def _unwrapped_arc(self, ur: np.ndarray) -> np.ndarray:
        turns = np.floor_divide(ur, self.n)
        return self._arc[ur - turns * self.n] + turns * self._loop_len

    # ---------------------------------------------------------------- update

    def observe(self, indices: np.ndarray, similarities: np.ndarray) -> None:
        """Measurement step with the top-k retrieval of the current frame.

        Args:
            indices: ``(k,)`` integer map row ids of the retrieved keyframes (k >= 1; duplicates
                keep their highest similarity).
            similarities: ``(k,)`` float similarities (higher = more similar), finite.

        Raises:
            ValueError: shape mismatch, empty top-k, ids outside ``[0, N)``, non-finite values.
        """
        cfg = self.config
        idx = np.asarray(indices)
        sim = np.asarray(similarities, dtype=np.float64)
        if idx.ndim != 1 or sim.ndim != 1 or idx.shape != sim.shape:
            raise ValueError(f"HmmFilter.observe: indices and similarities must be 1-D of equal length, got "
                             f"{idx.shape} and {sim.shape}")
        if idx.shape[0] == 0:
            raise ValueError("HmmFilter.observe: empty top-k")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"HmmFilter.observe: indices must be integers, got dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= self.n:
            raise ValueError(f"HmmFilter.observe: indices must be in [0, {self.n}), got {idx.min()}..{idx.max()}")
        if not np.all(np.isfinite(sim)):
            raise ValueError("HmmFilter.observe: similarities contain NaN or inf")
        ranks = self._rank_of[idx] if self._rank_of is not None else idx.astype(np.int64)
        f = cfg.floor
        lik = np.maximum(np.exp((sim - sim.max()) / cfg.temperature), f)
        # union of hypotheses and retrieved keyframes (duplicates: keep the largest likelihood)
        H = self._r.shape[0]
        uniq, inv = np.unique(np.concatenate([self._r, ranks]), return_inverse=True)
        inv = inv.ravel()
        p = np.zeros(uniq.shape[0])
        p[inv[:H]] = self._p
        lk = np.full(uniq.shape[0], f)
        np.maximum.at(lk, inv[H:], lik)
        u = self._u
        p = (p + u) * lk - u * f   # excess over the new background u * f; >= 0 since lk >= f
        np.maximum(p, 0.0, out=p)
        u_new = u * f
        z = float(p.sum()) + u_new * self.n
        p /= z
        u_new /= z
        # prune: indistinguishable from the background, then cap
        keep = p > cfg.min_excess * u_new
        if keep.sum() > cfg.max_hypotheses:
            cand = np.flatnonzero(keep)
            top = cand[np.argpartition(p[cand], -cfg.max_hypotheses)[-cfg.max_hypotheses:]]
            keep = np.zeros_like(keep)
            keep[top] = True
        dropped = float(p[~keep].sum())
        self._r = uniq[keep]
        self._p = p[keep]
        self._u = u_new + dropped / self.n

    def update(self, indices: np.ndarray, similarities: np.ndarray, stamp_s: Optional[float] = None,
               distance_m: Optional[float] = None) -> HmmEstimate:
        """One filter step: time-gap check, predict, observe, estimate.

        Args:
            indices: ``(k,)`` map row ids of the top-k retrieval of this frame.
            similarities: ``(k,)`` their similarities.
            stamp_s: frame time [s] (``None`` = no gap check). The filter resets when the stamp
                is more than ``max_gap_s`` after the previous one, or before it.
            distance_m: travelled distance since the previous frame [m] (odometry), or ``None``.

        Returns:
            :class:`HmmEstimate`.

        Raises:
            ValueError: invalid observation, stamp or distance (see :meth:`observe`,
                :meth:`predict`).
        """
        was_reset = False
        if stamp_s is not None:
            if not _is_num(stamp_s) or not math.isfinite(stamp_s):
                raise ValueError(f"HmmFilter.update: stamp_s must be a finite number, got {stamp_s!r}")
            last = self._last_stamp
            gap = self.config.max_gap_s
            if last is not None and gap is not None and (stamp_s - last > gap or stamp_s < last):
                self.reset()
                was_reset = True
        self.predict(distance_m)
        self.observe(indices, similarities)
        if stamp_s is not None:
            self._last_stamp = float(stamp_s)
        return self.estimate(was_reset=was_reset)

    # ---------------------------------------------------------------- output

    def _window_mass(self, centre: int, radius: int) -> float:
        """Posterior mass of ranks ``centre - radius .. centre + radius`` (wrapping on a loop)."""
        n = self.n
        if 2 * radius + 1 >= n:
            return 1.0
        spans = []
        lo, hi = centre - radius, centre + radius
        if self.config.closed_loop:
            if lo < 0:
                spans += [(lo + n, n - 1), (0, hi)]
            elif hi >= n:
                spans += [(lo, n - 1), (0, hi - n)]
            else:
                spans.append((lo, hi))
        else:
            spans.append((max(lo, 0), min(hi, n - 1)))
        mass = 0.0
        for a, b in spans:
            i0 = np.searchsorted(self._r, a, side="left")
            i1 = np.searchsorted(self._r, b, side="right")
            mass += float(self._p[i0:i1].sum()) + self._u * (b - a + 1)
        return min(mass, 1.0)

    def estimate(self, was_reset: bool = False) -> HmmEstimate:
        """Summary of the current posterior (see :class:`HmmEstimate`)."""
        cfg = self.config
        H = self._r.shape[0]
        background = float(self._u * (self.n - H))
        if H == 0:
            return HmmEstimate(-1, float(self._u), min(1.0, self._u * (2 * cfg.converged_radius + 1)),
                               False, None, None, None, None, math.nan, 0, background, was_reset)
        m = int(np.argmax(self._p))
        r_map = int(self._r[m])
        kf = int(self._ids(np.array([r_map]))[0])
        prob = float(self._p[m] + self._u)
        neigh = self._window_mass(r_map, cfg.converged_radius)
        position = mean = cov = mode_cov = None
        mode_prob = math.nan
        if self._pos is not None:
            xy = self._pos[self._ids(self._r)]
            w = self._p + self._u
            mean, cov = _weighted_cov(xy, w)
            position = self._pos[kf].copy()
            near = np.hypot(xy[:, 0] - position[0], xy[:, 1] - position[1]) <= cfg.mode_radius_m
            mode_prob = float(w[near].sum())
            mode_cov = _weighted_cov(xy[near], w[near])[1]
        return HmmEstimate(kf, prob, neigh, neigh > cfg.converged_threshold, position, mean, cov,
                           mode_cov, mode_prob, H, background, was_reset)


def _weighted_cov(xy: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Weighted mean ``(2,)`` and covariance ``(2, 2)`` of points ``xy (n, 2)`` with weights ``w (n,)``."""
    w = w / w.sum()
    mean = w @ xy
    d = xy - mean
    return mean, (d * w[:, None]).T @ d
