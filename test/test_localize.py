"""Pose estimate of :class:`vpr_localizer.localization.localize.Localizer` on hand-built in-memory maps.

Every expected value is computed here by hand from the formulas in the module doc of
``vpr_localizer/localization/localize.py``: weights ``exp((s_i - s_1) / T)`` over the candidates within
``consistency_radius_m`` of the best match, covariance = weighted spread +
``(sigma_floor^2 + (1 - min(margin / margin_scale, 1)) * sigma_ambiguous^2) * I``.

Map descriptors are the standard basis vectors e_0..e_{N-1}, so a query ``sum_i s_i e_i`` has
inner product exactly ``s_i`` with keyframe ``i`` and the FAISS ranking is known in advance.
"""
from __future__ import annotations

import math

import numpy as np
import pymap3d
import pytest

from vpr_localizer.geodesy import EnuDatum
from vpr_localizer.mapping.index import build_index
from vpr_localizer.localization.localize import Localizer, LocalizerConfig, PoseEstimate
from vpr_localizer.mapping.store import Keyframe, VprMap

DIM = 8
CFG = LocalizerConfig(top_k=DIM, consistency_radius_m=25.0, temperature=0.02, margin_scale=0.1,
                      sigma_floor_m=2.0, sigma_ambiguous_m=50.0)
LUND_DATUM = EnuDatum(55.69824166666666, 13.1952, 38.0)  # EXIF fix of lund_gps/02.jpg


def make_map(positions, datum=None, dim=DIM) -> VprMap:
    """In-memory map: keyframe i at ``positions[i]`` (x, y, z) with descriptor e_i."""
    keyframes = []
    for i, p in enumerate(positions):
        x, y, z = (math.nan, math.nan, math.nan) if p is None else (float(v) for v in p)
        keyframes.append(Keyframe(id=i, x=x, y=y, z=z, frame=i, image_path=f"kf{i:02d}.jpg"))
    desc = np.eye(len(positions), dim, dtype=np.float32)
    meta = {"format": "vpr_localizer.map", "format_version": 1, "encoder": {},
            "datum": None if datum is None else datum.as_dict()}
    return VprMap("/nonexistent/in-memory-map", meta, keyframes, build_index(desc, "flat"), {})


def query(scores_by_id, dim=DIM) -> np.ndarray:
    q = np.zeros((1, dim), np.float32)
    for i, s in scores_by_id.items():
        q[0, i] = s
    return q


# --------------------------------------------------------------------------------------------
# the best match alone
# --------------------------------------------------------------------------------------------

def test_estimate_is_best_match_when_others_are_far():
    # keyframe 2 is best; every other candidate is > 25 m away from it
    positions = [(100.0, 0.0, 0.0), (0.0, 200.0, 1.0), (10.0, -5.0, 3.0), (-80.0, -80.0, 0.0)]
    loc = Localizer(make_map(positions), CFG)
    [est] = loc.localize(query({2: 0.9, 0: 0.85, 1: 0.6, 3: 0.3}))
    assert isinstance(est, PoseEstimate)
    assert list(est.ids[:4]) == [2, 0, 1, 3]
    np.testing.assert_allclose(est.scores[:4], [0.9, 0.85, 0.6, 0.3], atol=1e-6)
    assert est.best_id == 2
    assert (est.x, est.y, est.z) == pytest.approx((10.0, -5.0, 3.0), abs=1e-9)
    assert est.consistent == 1
    # margin to the best inconsistent candidate (0.85) = 0.05 -> confidence 0.5
    assert est.margin == pytest.approx(0.05, abs=1e-6)
    expected_var = 2.0 ** 2 + (1.0 - 0.5) * 50.0 ** 2
    np.testing.assert_allclose(est.covariance_xy, expected_var * np.eye(2), rtol=1e-5, atol=1e-3)
    # no datum: no geodetic output
    assert math.isnan(est.lat) and math.isnan(est.lon)


def test_estimate_call_matches_localize():
    positions = [(0.0, 0.0, 0.0), (5.0, 5.0, 0.0), (300.0, 0.0, 0.0)]
    loc = Localizer(make_map(positions), CFG)
    [via_index] = loc.localize(query({1: 0.7, 0: 0.69, 2: 0.65}))
    direct = loc.estimate(np.array([1, 0, 2]), np.array([0.7, 0.69, 0.65], np.float32))
    assert direct.best_id == via_index.best_id == 1
    assert (direct.x, direct.y) == pytest.approx((via_index.x, via_index.y), abs=1e-4)
    np.testing.assert_allclose(direct.covariance_xy, via_index.covariance_xy, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# weighted mean and covariance of the consistent set
# --------------------------------------------------------------------------------------------

POS_CLUSTER = [(0.0, 0.0, 0.0), (10.0, 0.0, 2.0), (0.0, 20.0, 4.0), (500.0, 500.0, 0.0),
               (3.0, 4.0, -1.0), (-400.0, 0.0, 0.0)]


def test_weighted_mean_of_consistent_candidates_by_hand():
    loc = Localizer(make_map(POS_CLUSTER), CFG)
    scores = {0: 0.90, 1: 0.88, 2: 0.86, 4: 0.84, 3: 0.70, 5: 0.50}
    [est] = loc.localize(query(scores))
    assert list(est.ids[:6]) == [0, 1, 2, 4, 3, 5]

    # by hand: keyframes 0, 1, 2, 4 lie within 25 m of keyframe 0 (10, 20 and 5 m), 3 and 5 do not;
    # w = exp((s - 0.90) / 0.02) = [1, e^-1, e^-2, e^-3], sum S = 1.5530018
    w = np.array([1.0, math.exp(-1.0), math.exp(-2.0), math.exp(-3.0)])
    w /= w.sum()
    p = np.array([POS_CLUSTER[i] for i in (0, 1, 2, 4)])
    mean = (w[:, None] * p).sum(axis=0)
    # x = (10 e^-1 + 3 e^-3) / S, y = (20 e^-2 + 4 e^-3) / S, z = (2 e^-1 + 4 e^-2 - e^-3) / S
    assert tuple(mean) == pytest.approx((2.465004, 1.871121, 0.790284), abs=1e-6)
    assert (est.x, est.y, est.z) == pytest.approx(tuple(mean), abs=1e-4)
    # the best match alone would be (0, 0): the weighting really moved the estimate
    assert est.x > 1.0 and est.y > 1.0
    assert est.consistent == 4
    # margin = 0.90 - 0.70 = 0.2 >= margin_scale -> confident: only sigma_floor is added
    assert est.margin == pytest.approx(0.2, abs=1e-6)
    spread = sum(wi * np.outer(pi[:2] - mean[:2], pi[:2] - mean[:2]) for wi, pi in zip(w, p))
    np.testing.assert_allclose(spread, [[17.900565, -4.227617], [-4.227617, 31.869572]], atol=1e-5)
    np.testing.assert_allclose(est.covariance_xy, spread + 4.0 * np.eye(2), rtol=1e-4, atol=1e-4)
    assert est.covariance_xy[0, 1] == pytest.approx(est.covariance_xy[1, 0])
    assert est.covariance_xy[0, 1] != 0.0  # the spread is anisotropic and correlated here


def test_consistency_is_measured_from_the_best_match():
    # keyframe 1 is 20 m from the best (consistent) and keyframe 2 is 40 m from the best but only
    # 20 m from keyframe 1: it must be excluded (distance to the best match, not chained)
    positions = [(0.0, 0.0, 0.0), (20.0, 0.0, 0.0), (40.0, 0.0, 0.0)]
    loc = Localizer(make_map(positions), CFG)
    est = loc.estimate(np.array([0, 1, 2]), np.array([0.9, 0.9, 0.9], np.float32))
    assert est.consistent == 2
    assert est.x == pytest.approx(10.0, abs=1e-9)  # equal weights over keyframes 0 and 1
    assert est.margin == pytest.approx(0.0, abs=1e-7)  # keyframe 2 scores as high as the best
    # covariance: spread of {0, 20} around 10 (100 m^2 in x) + fully ambiguous term
    np.testing.assert_allclose(est.covariance_xy, np.diag([100.0, 0.0]) + (4.0 + 2500.0) * np.eye(2),
                               rtol=1e-6)


@pytest.mark.parametrize("alt_score,expected_conf", [(0.895, 0.05), (0.86, 0.4), (0.75, 1.0), (0.2, 1.0)])
def test_covariance_ambiguity_term_by_hand(alt_score, expected_conf):
    positions = [(0.0, 0.0, 0.0), (300.0, 0.0, 0.0)]
    loc = Localizer(make_map(positions), CFG)
    est = loc.estimate(np.array([0, 1]), np.array([0.9, alt_score], np.float32))
    var = 2.0 ** 2 + (1.0 - expected_conf) * 50.0 ** 2
    np.testing.assert_allclose(est.covariance_xy, var * np.eye(2), rtol=1e-4)
    assert (est.x, est.y) == (0.0, 0.0)


def test_large_margin_gives_smaller_covariance_than_tiny_margin():
    m = make_map(POS_CLUSTER)
    loc = Localizer(m, CFG)
    ids = np.array([0, 1, 3])
    confident = loc.estimate(ids, np.array([0.9, 0.88, 0.5], np.float32))
    ambiguous = loc.estimate(ids, np.array([0.9, 0.88, 0.899], np.float32))
    assert confident.margin == pytest.approx(0.4, abs=1e-6)
    assert ambiguous.margin == pytest.approx(0.001, abs=1e-6)
    # same consistent set, same mean, same spread: only the isotropic term differs
    assert (confident.x, confident.y) == pytest.approx((ambiguous.x, ambiguous.y), abs=1e-9)
    assert np.trace(confident.covariance_xy) < np.trace(ambiguous.covariance_xy)
    diff = ambiguous.covariance_xy - confident.covariance_xy
    np.testing.assert_allclose(diff, (1.0 - 0.01) * 2500.0 * np.eye(2), rtol=1e-3, atol=1e-9)
    assert np.all(np.linalg.eigvalsh(confident.covariance_xy) >= 4.0 - 1e-9)


def test_invalid_ids_from_approximate_indexes_are_ignored():
    loc = Localizer(make_map(POS_CLUSTER), CFG)
    a = loc.estimate(np.array([0, 1, 3, -1, -1]), np.array([0.9, 0.88, 0.5, -np.inf, -np.inf], np.float32))
    b = loc.estimate(np.array([0, 1, 3]), np.array([0.9, 0.88, 0.5], np.float32))
    assert list(a.ids) == [0, 1, 3]
    assert (a.x, a.y) == pytest.approx((b.x, b.y))
    assert a.margin == pytest.approx(b.margin)
    np.testing.assert_allclose(a.covariance_xy, b.covariance_xy)


def test_custom_config_is_used():
    cfg = LocalizerConfig(top_k=3, consistency_radius_m=500.0, temperature=1.0, margin_scale=1.0,
                          sigma_floor_m=1.0, sigma_ambiguous_m=10.0)
    positions = [(0.0, 0.0, 0.0), (100.0, 0.0, 0.0), (0.0, 100.0, 0.0), (1000.0, 0.0, 0.0)]
    loc = Localizer(make_map(positions), cfg)
    [est] = loc.localize(query({0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6}))
    assert list(est.ids) == [0, 1, 2]  # top_k 3
    assert est.consistent == 3  # 500 m radius: keyframes 1 and 2 are 100 m from the best
    # by hand, T = 1: w = [1, e^-0.1, e^-0.2] / S with S = 2.7235682 -> w1 = 0.3322250, w2 = 0.3006096
    w1, w2 = math.exp(-0.1) / 2.7235682, math.exp(-0.2) / 2.7235682
    # mean = w0 (0, 0) + w1 (100, 0) + w2 (0, 100) = (33.2225, 30.0610)
    assert (est.x, est.y) == pytest.approx((100.0 * w1, 100.0 * w2), abs=1e-4)
    assert (est.x, est.y) == pytest.approx((33.2225, 30.0610), abs=1e-4)
    # spread = sum w_i p_i p_i^T - mean mean^T = 100^2 [[w1 (1 - w1), -w1 w2], [-w1 w2, w2 (1 - w2)]]
    spread = 1e4 * np.array([[w1 * (1 - w1), -w1 * w2], [-w1 * w2, w2 * (1 - w2)]])
    # all retrieved candidates are consistent: margin to the last retrieved score, 0.9 - 0.7 = 0.2;
    # confidence 0.2 / margin_scale 1.0 = 0.2 -> variance 1^2 + (1 - 0.2) * 10^2 = 81
    assert est.margin == pytest.approx(0.2, abs=1e-6)
    np.testing.assert_allclose(est.covariance_xy, spread + 81.0 * np.eye(2), rtol=1e-4)
    np.testing.assert_allclose(est.covariance_xy, [[2299.515, -998.700], [-998.700, 2183.435]], atol=5e-3)


# --------------------------------------------------------------------------------------------
# geodetic output, maps without positions, bad queries
# --------------------------------------------------------------------------------------------

def test_lat_lon_filled_from_the_datum():
    positions = [(-11.9, 8.4, 1.0), (-15.7, 10.8, 1.0), (-54.5, 171.6, -2.0)]
    m = make_map(positions, datum=LUND_DATUM)
    assert m.datum == LUND_DATUM
    loc = Localizer(m, CFG)
    [est] = loc.localize(query({0: 0.8, 1: 0.79, 2: 0.1}))
    assert est.consistent == 2
    lat, lon, _ = pymap3d.enu2geodetic(est.x, est.y, est.z, LUND_DATUM.lat, LUND_DATUM.lon, LUND_DATUM.alt)
    assert est.lat == pytest.approx(float(lat), abs=1e-9)
    assert est.lon == pytest.approx(float(lon), abs=1e-9)
    # sanity: the estimate lies between keyframes 0 and 1, i.e. a few metres north-west of the datum
    assert 55.69824 < est.lat < 55.69836 and 13.1949 < est.lon < 13.1952
    d = est.as_dict("q.jpg", m.keyframes)
    assert d["lat"] == est.lat and d["lon"] == est.lon
    assert d["best_image"] == "kf00.jpg" and d["top_ids"][:3] == [0, 1, 2]
    assert d["cov_xx"] == pytest.approx(float(est.covariance_xy[0, 0]))


def test_map_without_positions_gives_nan():
    m = make_map([None, None, None])
    assert not m.has_positions
    loc = Localizer(m, CFG)
    [est] = loc.localize(query({1: 0.9, 0: 0.5, 2: 0.1}))
    assert est.best_id == 1 and list(est.ids[:3]) == [1, 0, 2]
    assert math.isnan(est.x) and math.isnan(est.y)
    assert math.isnan(est.lat) and math.isnan(est.lon)
    assert np.isnan(est.covariance_xy).all()
    assert est.consistent == 0


def test_nan_query_descriptor_raises_value_error():
    loc = Localizer(make_map(POS_CLUSTER), CFG)
    q = query({0: 0.9})
    q[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        loc.localize(q)
    q[0, 3] = np.inf
    with pytest.raises(ValueError):
        loc.localize(q)


@pytest.mark.parametrize("dim", [DIM - 1, DIM + 1, 4096])
def test_wrong_descriptor_dimension_raises_value_error(dim):
    loc = Localizer(make_map(POS_CLUSTER), CFG)
    q = np.zeros((1, dim), np.float32)
    q[0, 0] = 1.0
    with pytest.raises(ValueError, match="dimension"):
        loc.localize(q)


def test_several_queries_one_estimate_each():
    loc = Localizer(make_map(POS_CLUSTER), CFG)
    q = np.concatenate([query({5: 1.0}), query({3: 1.0}), query({2: 0.9, 0: 0.1})])
    ests = loc.localize(q)
    assert [e.best_id for e in ests] == [5, 3, 2]
    assert (ests[0].x, ests[0].y) == pytest.approx((-400.0, 0.0))
    assert (ests[1].x, ests[1].y) == pytest.approx((500.0, 500.0))
    # best 2 at (0, 20); keyframes 0 (20 m), 1 (22.4 m) and 4 (16.3 m) are consistent but their
    # weights exp(-40) and exp(-45) are negligible
    assert ests[2].consistent == 4
    assert ests[2].y == pytest.approx(20.0, abs=1e-6)
