"""Tests of vpr_localizer.localization.hmm_filter (discrete Bayes filter over keyframes).

Synthetic route: 2,000 keyframes 1 m apart on a line (or a loop). The query moves 0, 1 or 2
keyframes per frame (mean 1); each frame's top-10 retrieval holds the true keyframe only 40% of
the time, at a random rank (often not first), the other entries are random keyframes, and the
similarities are sorted random values in [0.6, 0.7].
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_localizer.errors import ConfigError
from vpr_localizer.localization.hmm_filter import HmmEstimate, HmmFilter, HmmFilterConfig

N = 2000
K = 10
CONVERGE_WITHIN = 40    # frames
RELOCALISE_WITHIN = 60  # frames after the kidnap
TOL = 2                 # keyframes


def _observe(rng, true_id: int, n: int, p_hit: float = 0.4):
    idx = rng.integers(0, n, K)
    sims = np.sort(rng.uniform(0.6, 0.7, K))[::-1]
    if rng.random() < p_hit:
        idx[rng.integers(0, K)] = true_id
    return idx, sims


def _line(n=N):
    return np.stack([np.arange(n, dtype=np.float64), np.zeros(n)], axis=1)


def _run(seed: int, frames: int, cfg=None, kidnap_at=None, odometry=False, positions=None,
         id_of_rank=None, start=100):
    """Drive a filter along the route; returns abs rank errors (frames,) and the estimates."""
    rng = np.random.default_rng(seed)
    n = N if positions is None else positions.shape[0]
    kw = {"positions": positions} if positions is not None else {"n_keyframes": n}
    if id_of_rank is not None:
        frame_idx = np.empty(n, dtype=np.int64)
        frame_idx[id_of_rank] = np.arange(n)
        kw["frame_indices"] = frame_idx
    filt = HmmFilter(cfg or HmmFilterConfig(), **kw)
    true = start
    errs, ests = [], []
    for t in range(frames):
        step = int(rng.choice([0, 1, 1, 1, 2])) if t else 0
        true += step
        if kidnap_at is not None and t == kidnap_at:
            true += 800
        true_id = int(id_of_rank[true]) if id_of_rank is not None else true % n  # % n: loops
        idx, sims = _observe(rng, true_id, n)
        dist = step + rng.normal(0.0, 0.2) if odometry else None
        est = filt.update(idx, sims, stamp_s=0.1 * t, distance_m=dist)
        rank = est.keyframe if id_of_rank is None else int(np.flatnonzero(id_of_rank == est.keyframe)[0])
        errs.append(abs(rank - true))
        ests.append(est)
    return np.array(errs), ests, filt


def _first_converged(ests) -> int:
    return next(t for t, e in enumerate(ests) if e.converged)


def _recovery(errs, start, hold=10):
    """Frames after ``start`` until the MAP stays within TOL for ``hold`` frames (None = never)."""
    for t in range(start, len(errs) - hold + 1):
        if np.all(errs[t:t + hold] <= TOL):
            return t - start
    return None


def test_converges_then_follows():
    errs, ests, filt = _run(0, 300, positions=_line())
    t0 = _first_converged(ests)
    assert t0 <= CONVERGE_WITHIN
    follow = (errs[t0:] <= TOL).mean()
    assert follow >= 0.9, follow
    # a converged estimate is well localised: small covariance, probability near its MAP
    est = ests[-1]
    assert isinstance(est, HmmEstimate)
    assert est.position is not None and est.covariance.shape == (2, 2)
    conv = [e for e in ests[t0:] if e.converged]
    assert np.median([np.trace(e.mode_covariance) for e in conv]) < 25.0  # m^2
    assert np.median([e.mode_probability for e in conv]) > 0.5
    first = np.trace(ests[0].covariance)
    assert first > 1e5                                              # first frame: spread over the map
    assert np.median([np.trace(e.covariance) for e in conv]) < 0.1 * first
    for e in (ests[0], ests[-1]):
        for c in (e.covariance, e.mode_covariance):
            assert np.allclose(c, c.T) and np.all(np.linalg.eigvalsh(c) >= -1e-9)
        assert np.trace(e.mode_covariance) <= np.trace(e.covariance) + 1e-9
    ids, probs, u = filt.posterior()
    assert probs.sum() + u * (N - len(ids)) == pytest.approx(1.0)
    assert len(ids) == est.n_hypotheses <= filt.config.max_hypotheses


def test_single_frame_retrieval_is_mostly_wrong():
    # the observation model the filter sees: top-1 is right only in ~4% of the frames
    rng = np.random.default_rng(0)
    hits = [(_observe(rng, 500, N)[0][0] == 500) for _ in range(1000)]
    assert np.mean(hits) < 0.1


def test_relocalises_after_kidnap():
    errs, ests, _ = _run(0, 450, kidnap_at=200)
    t0 = _first_converged(ests)
    assert (errs[t0:200] <= TOL).mean() >= 0.9
    assert errs[200] > 100  # the jump is not followed instantly
    rec = _recovery(errs, 200)
    assert rec is not None and rec <= RELOCALISE_WITHIN, rec
    assert (errs[200 + rec:] <= TOL).mean() >= 0.9


def test_odometry_mode_irregular_spacing():
    rng = np.random.default_rng(7)
    gaps = rng.uniform(0.5, 1.5, N - 1)
    arc = np.concatenate([[0.0], np.cumsum(gaps)])
    # a curved route: positions along a spiral-ish curve with the given arc lengths
    ang = arc / 300.0
    pos = np.stack([300.0 * np.sin(ang), 300.0 * (1 - np.cos(ang))], axis=1)
    cfg = HmmFilterConfig(odom_sigma_m=0.5, odom_sigma_frac=0.1)
    filt = HmmFilter(cfg, positions=pos)
    s = 100.0
    errs, ests = [], []
    for t in range(300):
        step_m = float(rng.uniform(0.0, 2.0)) if t else 0.0
        s += step_m
        true = int(np.argmin(np.abs(arc - s)))
        idx, sims = _observe(rng, true, N)
        est = filt.update(idx, sims, stamp_s=0.1 * t, distance_m=step_m + rng.normal(0, 0.1))
        errs.append(abs(est.keyframe - true))
        ests.append(est)
    errs = np.array(errs)
    t0 = _first_converged(ests)
    assert t0 <= CONVERGE_WITHIN
    assert (errs[t0:] <= TOL).mean() >= 0.9
    # the covariance is in m^2 of the real positions: small once converged
    assert np.median([np.trace(e.mode_covariance) for e in ests[t0:] if e.converged]) < 25.0


def test_odometry_on_line_and_metres_velocity():
    errs, ests, _ = _run(1, 250, odometry=True, positions=_line())
    t0 = _first_converged(ests)
    assert t0 <= CONVERGE_WITHIN and (errs[t0:] <= TOL).mean() >= 0.9
    cfg = HmmFilterConfig(velocity_unit="metres", v_min=0.0, v_max=2.0)
    errs, ests, _ = _run(2, 250, cfg=cfg, positions=_line())
    t0 = _first_converged(ests)
    assert t0 <= CONVERGE_WITHIN and (errs[t0:] <= TOL).mean() >= 0.9


def test_closed_loop_wraps_around():
    n = 1000
    ang = 2 * np.pi * np.arange(n) / n
    pos = np.stack([159.15 * np.cos(ang), 159.15 * np.sin(ang)], axis=1)  # ~1 m spacing
    for odometry in (False, True):
        cfg = HmmFilterConfig(closed_loop=True)
        errs, ests, _ = _run(3, 400, cfg=cfg, positions=pos, odometry=odometry, start=700)
        # the true rank wraps past n-1 -> compare modulo n
        errs = np.minimum(errs % n, n - errs % n)
        t0 = _first_converged(ests)
        assert t0 <= CONVERGE_WITHIN
        assert (errs[t0:] <= TOL).mean() >= 0.9, (odometry, (errs[t0:] <= TOL).mean())


def test_frame_indices_define_route_order():
    rng = np.random.default_rng(11)
    id_of_rank = rng.permutation(N)  # map rows stored in shuffled order
    errs, ests, _ = _run(4, 250, id_of_rank=id_of_rank)
    t0 = _first_converged(ests)
    assert t0 <= CONVERGE_WITHIN and (errs[t0:] <= TOL).mean() >= 0.9


def test_time_gap_and_reset():
    errs, ests, filt = _run(0, 120)
    assert ests[-1].converged
    rng = np.random.default_rng(1)
    last_stamp = 0.1 * 119
    idx, sims = _observe(rng, 500, N, p_hit=1.0)
    est = filt.update(idx, sims, stamp_s=last_stamp + 5.0)   # gap > max_gap_s = 2 s
    assert est.was_reset and not est.converged
    assert est.n_hypotheses <= K and est.probability < 0.2
    est = filt.update(idx, sims, stamp_s=last_stamp + 5.1)   # normal step: no reset
    assert not est.was_reset
    est = filt.update(idx, sims, stamp_s=last_stamp)         # clock went backwards -> reset
    assert est.was_reset
    filt.reset()
    e = filt.estimate()
    assert e.keyframe == -1 and e.n_hypotheses == 0 and not e.converged
    assert e.background_probability == pytest.approx(1.0)
    # max_gap_s=None disables the check
    f2 = HmmFilter(HmmFilterConfig(max_gap_s=None), n_keyframes=100)
    f2.update(np.array([3]), np.array([1.0]), stamp_s=0.0)
    assert not f2.update(np.array([4]), np.array([1.0]), stamp_s=1e6).was_reset


def test_hypotheses_stay_bounded_for_a_million_keyframes():
    n = 1_000_000
    cfg = HmmFilterConfig(max_hypotheses=500)
    filt = HmmFilter(cfg, n_keyframes=n)
    rng = np.random.default_rng(5)
    true = 123_456
    counts = []
    for t in range(200):
        true += int(rng.choice([0, 1, 1, 1, 2]))
        idx, sims = _observe(rng, true, n, p_hit=0.6)
        est = filt.update(idx, sims)
        counts.append(est.n_hypotheses)
        ids, probs, u = filt.posterior()
        assert ids.shape[0] <= cfg.max_hypotheses and probs.shape[0] <= cfg.max_hypotheses
    assert max(counts) <= cfg.max_hypotheses
    ids, probs, u = filt.posterior()
    assert probs.sum() + u * (n - len(ids)) == pytest.approx(1.0)
    assert abs(est.keyframe - true) <= TOL  # and it still localises
    # no O(N) state: identity route order, no arc lengths
    assert filt._order is None and filt._rank_of is None and filt._arc is None


def test_background_likelihood_is_analytic():
    # one observation from uniform: retrieved keyframe i gets (1/N) * l_i, every other (1/N) * floor
    cfg = HmmFilterConfig(floor=0.1, temperature=0.1, kidnap_prob=0.0, min_excess=0.0)
    filt = HmmFilter(cfg, n_keyframes=50)
    filt.update(np.array([10, 20]), np.array([0.9, 0.8]))
    ids, probs, u = filt.posterior()
    l = np.array([1.0, math.exp(-1.0)])
    z = l.sum() + 0.1 * 48
    assert dict(zip(ids.tolist(), probs.tolist())) == pytest.approx({10: 1.0 / z, 20: l[1] / z})
    assert u == pytest.approx(0.1 / z)


def test_bad_inputs():
    for kwargs in (dict(temperature=0.0), dict(floor=0.0), dict(floor=1.5), dict(kidnap_prob=1.0),
                   dict(max_hypotheses=0), dict(v_min=2, v_max=1), dict(v_min=0.5),
                   dict(v_weights=(1.0, 1.0)), dict(velocity_unit="furlongs"),
                   dict(velocity_unit="metres", v_weights=(1.0,)), dict(max_gap_s=0.0),
                   dict(odom_sigma_m=-1.0), dict(converged_threshold=0.0), dict(temperature=float("nan"))):
        with pytest.raises(ConfigError):
            HmmFilterConfig(**kwargs)
    assert HmmFilterConfig(v_weights=(1.0, 2.0, 1.0)).v_weights == (1.0, 2.0, 1.0)
    with pytest.raises(ValueError, match="n_keyframes"):
        HmmFilter()
    with pytest.raises(ValueError, match="inconsistent"):
        HmmFilter(n_keyframes=10, positions=_line(11))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        HmmFilter(positions=np.zeros((10, 3)))
    with pytest.raises(ValueError, match="positions"):
        HmmFilter(HmmFilterConfig(velocity_unit="metres"), n_keyframes=10)
    filt = HmmFilter(n_keyframes=10)
    with pytest.raises(ValueError, match="positions"):
        filt.update(np.array([1]), np.array([0.5]), distance_m=1.0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        filt.observe(np.array([10]), np.array([0.5]))
    with pytest.raises(ValueError, match="equal length"):
        filt.observe(np.array([1, 2]), np.array([0.5]))
    with pytest.raises(ValueError, match="empty"):
        filt.observe(np.array([], dtype=np.int64), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        filt.observe(np.array([1]), np.array([np.nan]))
    with pytest.raises(ValueError, match="integers"):
        filt.observe(np.array([1.0]), np.array([0.5]))
    with pytest.raises(ValueError, match="stamp_s"):
        filt.update(np.array([1]), np.array([0.5]), stamp_s=float("inf"))
