"""Online sequence localisation (vpr_localizer.localization.tracking) on in-memory maps.

Synthetic route: ``N`` keyframes ``SPACING`` m apart on a line, each with a random unit
descriptor (64-D). A query frame at keyframe ``i`` has the descriptor ``m_i + NOISE * n``
(``n`` standard normal, renormalised): with ``NOISE = 0.4`` single-frame retrieval returns the
right keyframe first only about a third of the time, and its pose is more than 5 m off in most
frames. The filter (:data:`FILTER_CFG`) must converge and follow the route.
"""
from __future__ import annotations

from dataclasses import replace

import math

import numpy as np
import pytest

from vpr_localizer.errors import ConfigError
from vpr_localizer.localization.localize import Localizer, LocalizerConfig, PoseEstimate
from vpr_localizer.localization.tracking import (FilteredLocalizer, OdometryTrack, TrackedPose, TrackingConfig,
                                                 route_order_keys)
from vpr_localizer.mapping.index import build_index
from vpr_localizer.mapping.store import Keyframe, VprMap

# The synthetic route's filter: observation from the top 10 with a sharp likelihood. The node's
# defaults (top_k 50, temperature 0.1, floor 0.3) are tuned on real Nordland descriptors
# (benchmarks/tune_filter.py), whose similarities are spread differently.
FILTER_CFG = TrackingConfig(top_k=10, temperature=0.05, floor=0.05)

N = 400
DIM = 64
SPACING = 2.0   # m between keyframes
NOISE = 0.4
LOC_CFG = LocalizerConfig(top_k=10)  # sigma_floor_m 2, sigma_ambiguous_m 50


def route_map(n=N, positions=True, order=None, seed=0):
    """In-memory map of a straight route; ``order[r]`` = map row of route rank ``r`` (rows
    shuffled, the route order only in ``Keyframe.frame``). Returns (map, descriptors by rank)."""
    rng = np.random.default_rng(seed)
    desc = rng.normal(size=(n, DIM)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    order = np.arange(n) if order is None else np.asarray(order)
    rows = np.empty_like(desc)
    rows[order] = desc
    keyframes = []
    for row in range(n):
        rank = int(np.flatnonzero(order == row)[0])
        x, y = (SPACING * rank, 0.0) if positions else (math.nan, math.nan)
        keyframes.append(Keyframe(id=row, x=x, y=y, z=0.0 if positions else math.nan, frame=rank))
    meta = {"format": "vpr_localizer.map", "format_version": 1, "encoder": {}, "datum": None}
    return VprMap("/nonexistent/in-memory-route", meta, keyframes, build_index(rows, "flat"), {}), desc


def noisy(desc, i, rng, noise=NOISE):
    q = desc[i] + noise * rng.normal(size=DIM).astype(np.float32)
    return (q / np.linalg.norm(q))[None]


def drive(fl, desc, true_ranks, seed=1, stamps=None, distances=None):
    """Feed one noisy query per true rank; returns the TrackedPoses."""
    rng = np.random.default_rng(seed)
    out = []
    for t, r in enumerate(true_ranks):
        stamp = 0.1 * t if stamps is None else stamps[t]
        dist = None if distances is None else distances[t]
        out.append(fl.update(noisy(desc, int(r), rng), stamp, dist))
    return out


def walk(frames, seed=2, start=20, steps=(0, 1, 1, 2)):
    rng = np.random.default_rng(seed)
    return start + np.concatenate([[0], np.cumsum(rng.choice(steps, frames - 1))])


def errors(ests, true_ranks, single=False):
    """x error [m] of the filtered (or single-frame) poses."""
    return np.array([abs((e.single if single else e).x - SPACING * r) for e, r in zip(ests, true_ranks)])


def test_converges_and_follows_where_single_frame_is_wrong():
    vmap, desc = route_map()
    fl = FilteredLocalizer(Localizer(vmap, LOC_CFG), FILTER_CFG)
    true = walk(200)
    ests = drive(fl, desc, true)
    single_top1 = np.mean([e.single.ids[0] == r for e, r in zip(ests, true)])
    err_single, err = errors(ests, true, single=True), errors(ests, true)
    assert single_top1 < 0.5, single_top1
    assert (err_single > 5.0).mean() > 0.5
    t0 = next(t for t, e in enumerate(ests) if e.converged)
    assert t0 <= 10, t0
    assert (err[t0:] <= 5.0).mean() >= 0.95, (err[t0:] <= 5.0).mean()
    assert err[t0:].mean() < 0.1 * err_single[t0:].mean()
    # the result is a PoseEstimate the node publishes unchanged; the filter's state rides along
    e = ests[-1]
    assert isinstance(e, TrackedPose) and isinstance(e, PoseEstimate)
    assert e.best_id == e.filter.keyframe and e.converged and 0.0 < e.probability <= 1.0
    np.testing.assert_array_equal(e.ids, e.single.ids)
    assert len(e.ids) == LOC_CFG.top_k and e.filter.n_hypotheses >= 1
    assert fl.last is e
    d = e.as_dict()
    assert d["converged"] is True and d["hypotheses"] == e.filter.n_hypotheses
    # covariance: the mode's spread + the floor once converged (a few m^2), + sigma_ambiguous^2 before
    conv = [x for x in ests[t0:] if x.converged]
    assert np.median([np.trace(x.covariance_xy) for x in conv]) < 2 * (2 * 2.0 ** 2)
    for x in conv:
        np.testing.assert_allclose(x.covariance_xy, x.filter.mode_covariance + 4.0 * np.eye(2))
        assert np.all(np.linalg.eigvalsh(x.covariance_xy) >= 4.0 - 1e-9)


def test_pose_modes_map_and_mode_mean():
    vmap, desc = route_map()
    loc = Localizer(vmap, LOC_CFG)
    true = walk(80)
    by_mode = {m: drive(FilteredLocalizer(loc, replace(FILTER_CFG, pose=m)), desc, true) for m in ("map", "mode_mean")}
    for a, b in zip(by_mode["map"], by_mode["mode_mean"]):
        assert a.best_id == b.best_id                      # the same filter, only the pose differs
        assert a.x == SPACING * vmap.keyframes[a.best_id].frame and a.y == 0.0   # the MAP keyframe
        assert abs(b.x - a.x) <= TrackingConfig().mode_radius_m + 1e-9          # within its mode
    assert TrackingConfig().pose == "mode_mean"


def test_relocalises_after_a_jump():
    vmap, desc = route_map()
    fl = FilteredLocalizer(Localizer(vmap, LOC_CFG), FILTER_CFG)
    true = walk(200)
    true[100:] += 150                                      # kidnapped 300 m ahead at frame 100
    err = errors(drive(fl, desc, true), true)
    assert (err[20:100] <= 5.0).mean() >= 0.95
    assert err[100] > 100.0                                # not followed instantly
    back = next(t for t in range(100, 190) if np.all(err[t:t + 10] <= 5.0)) - 100
    assert back <= 15, back
    assert (err[100 + back:] <= 5.0).mean() >= 0.95


def test_resets_on_a_time_gap():
    vmap, desc = route_map()
    fl = FilteredLocalizer(Localizer(vmap, LOC_CFG), FILTER_CFG)
    true = walk(60)
    stamps = 0.1 * np.arange(60)
    stamps[40:] += 10.0                                    # 10 s without frames > max_gap_s = 2 s
    ests = drive(fl, desc, true, stamps=stamps)
    assert ests[39].converged and not any(e.filter.was_reset for e in ests[:40])
    gap = ests[40]
    assert gap.filter.was_reset and not gap.converged
    # unconverged: the single-frame ambiguous sigma is added
    assert np.all(np.diag(gap.covariance_xy) >= 2.0 ** 2 + 50.0 ** 2)
    assert not any(e.filter.was_reset for e in ests[41:])
    assert ests[-1].converged and abs(ests[-1].x - SPACING * true[-1]) <= 5.0
    # explicit reset
    fl.reset()
    assert fl.last is None and fl.filter.estimate().keyframe == -1


def test_uses_odometry_distance_when_given():
    """The camera moves 3 keyframes (6 m) per frame, faster than the constant-velocity prior's
    v_max = 2 keyframes: without odometry the filter cannot follow, with it it does."""
    vmap, desc = route_map()
    loc = Localizer(vmap, LOC_CFG)
    true = 20 + 3 * np.arange(110)
    rng = np.random.default_rng(3)
    odom = [None] + list(3 * SPACING + rng.normal(0.0, 0.3, len(true) - 1))
    with_odom = errors(drive(FilteredLocalizer(loc, FILTER_CFG), desc, true, distances=odom), true)
    without = errors(drive(FilteredLocalizer(loc, FILTER_CFG), desc, true), true)
    assert (with_odom[10:] <= 5.0).mean() >= 0.95, (with_odom[10:] <= 5.0).mean()
    assert (without[10:] <= 5.0).mean() < 0.5, (without[10:] <= 5.0).mean()
    # the same from an OdometryTrack (what the node feeds from nav_msgs/Odometry): 10 odometry
    # samples per frame along the true route, the distance between frame stamps looked up
    track = OdometryTrack(max_age_s=0.05)
    fl = FilteredLocalizer(loc, FILTER_CFG, odometry=track)
    rng = np.random.default_rng(1)
    ests = []
    for t, r in enumerate(true):
        for k in range(10):  # odometry at t-1 .. t (stamps 0.1 s apart per frame)
            x = SPACING * (r - 3 + 0.3 * (k + 1)) if t else SPACING * r
            track.add(0.1 * t - 0.09 + 0.01 * k, x + rng.normal(0.0, 0.05), 0.0)
        ests.append(fl.update(noisy(desc, int(r), rng), 0.1 * t))
    assert ests[0].distance_m is None and all(e.distance_m is not None for e in ests[1:])
    assert np.median([e.distance_m for e in ests[1:]]) == pytest.approx(3 * SPACING, abs=1.0)
    from_track = errors(ests, true)
    assert (from_track[10:] <= 5.0).mean() >= 0.95, (from_track[10:] <= 5.0).mean()


def test_route_order_from_frame_indices_and_map_without_positions():
    order = np.random.default_rng(4).permutation(N)        # map rows shuffled
    vmap, desc = route_map(order=order)
    ranks = route_order_keys(vmap)
    np.testing.assert_array_equal(ranks, [kf.frame for kf in vmap.keyframes])
    true = walk(120)
    ests = drive(FilteredLocalizer(Localizer(vmap, LOC_CFG), FILTER_CFG), desc, true)
    assert (errors(ests, true)[10:] <= 5.0).mean() >= 0.95

    bare, desc = route_map(positions=False, order=order)
    fl = FilteredLocalizer(Localizer(bare, LOC_CFG), FILTER_CFG)
    assert not fl.has_positions
    ests = drive(fl, desc, true)
    follow = [abs(bare.keyframes[e.best_id].frame - r) <= 2 for e, r in zip(ests[10:], true[10:])]
    assert np.mean(follow) >= 0.95
    assert math.isnan(ests[-1].x) and np.isnan(ests[-1].covariance_xy).all()
    with pytest.raises(ValueError, match="positions"):
        fl.update(noisy(desc, 5, np.random.default_rng(0)), 100.0, distance_m=2.0)
    # no frame index on some keyframe: row order
    bare.keyframes[3].frame = -1
    assert route_order_keys(bare) is None


def test_bad_input():
    vmap, desc = route_map(n=20)
    fl = FilteredLocalizer(Localizer(vmap, LOC_CFG), FILTER_CFG)
    with pytest.raises(ValueError, match="one descriptor"):
        fl.update(np.zeros((2, DIM), np.float32), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        fl.update(np.full((1, DIM), np.nan, np.float32), 0.0)
    with pytest.raises(ValueError, match="stamp_s"):
        fl.update(desc[:1], math.inf)
    for kw in (dict(pose="centroid"), dict(max_gap_s=-1.0), dict(temperature=0.0), dict(v_min=3, v_max=1),
               dict(odom_max_age_s=math.nan)):
        with pytest.raises(ConfigError):
            TrackingConfig(**kw)
    assert TrackingConfig(max_gap_s=0.0).hmm_config().max_gap_s is None
    assert TrackingConfig().hmm_config().max_gap_s == 2.0
    with pytest.raises(ConfigError, match="unknown"):
        TrackingConfig.from_dict({"enabled": True, "tempreature": 0.1})
    assert TrackingConfig.from_dict({"enabled": True}).enabled


def test_odometry_track_distance():
    track = OdometryTrack(max_age_s=0.2)
    assert track.distance(0.0, 1.0) is None                 # nothing yet
    # an L: 0 -> (3, 0) -> (3, 4), one sample per second
    for t, x, y in ((0.0, 0.0, 0.0), (1.0, 3.0, 0.0), (2.0, 3.0, 4.0)):
        assert track.add(t, x, y)
    assert not track.add(2.5, math.nan, 0.0) and len(track) == 3
    assert track.distance(0.0, 2.0) == pytest.approx(7.0)   # path length, not displacement (5)
    assert track.distance(0.5, 1.5) == pytest.approx(1.5 + 2.0)
    assert track.distance(0.5, 0.5) == pytest.approx(0.0)
    assert track.distance(1.5, 2.1) == pytest.approx(2.0)   # 0.1 s past the newest: nearest sample
    assert track.distance(1.5, 2.5) is None                 # 0.5 s past the newest > max_age_s
    assert track.distance(-0.5, 1.0) is None                # before the oldest
    assert track.distance(1.0, 0.5) is None                 # backwards interval
    track.add(0.5, 10.0, 10.0)                              # time went back: history restarts
    assert len(track) == 1 and track.distance(0.0, 2.0) is None
    with pytest.raises(ValueError):
        OdometryTrack(max_age_s=-1.0)
