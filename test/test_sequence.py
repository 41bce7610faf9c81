"""Tests of vpr_localizer.localization.sequence (SeqSLAM, Milford & Wyeth ICRA 2012) on synthetic matrices.

The synthetic distance matrix: i.i.d. N(1, 0.1) noise with a planted low-distance "route": the
true map index gets -0.2 and its two neighbours -0.1 (neighbouring keyframes look alike). With
600 map entries the single-frame argmin finds the true index (+-1) for only ~20% of queries;
a 20-frame sequence recovers it for >= 95%.
"""
from __future__ import annotations

import numpy as np
import pytest

from vpr_localizer.errors import ConfigError
from vpr_localizer.localization.sequence import (SequenceConfig, SequenceMatcher, SequenceMatches,
                                                  match_sequences, normalize_rows,
                                                  sequence_length_frames, velocity_range)

Q, M = 400, 600
SEG = 200  # queries [0, 200): slope 1 from map 50; [200, 400): slope 0.8 from map 350


def _plant(D: np.ndarray, truth: np.ndarray, delta: float = 0.2) -> np.ndarray:
    rows = np.arange(len(truth))
    D[rows, truth] -= delta
    D[rows, np.minimum(truth + 1, D.shape[1] - 1)] -= delta / 2
    D[rows, np.maximum(truth - 1, 0)] -= delta / 2
    return D


def _route_matrix(seed: int = 0):
    rng = np.random.default_rng(seed)
    D = rng.normal(1.0, 0.1, (Q, M)).astype(np.float32)
    t = np.arange(Q)
    truth = np.where(t < SEG, 50 + t, np.floor(350 + 0.8 * (t - SEG) + 0.5).astype(int))
    return _plant(D, truth), truth


def _eligible(L: int, seg_start=(0, SEG), n=Q) -> np.ndarray:
    """Queries whose whole L-frame sequence lies inside one planted segment."""
    t = np.arange(n)
    ok = np.zeros(n, bool)
    bounds = list(seg_start) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        ok |= (t >= a + L - 1) & (t < b)
    return ok


@pytest.fixture(scope="module")
def route():
    return _route_matrix(0)


def test_sequence_recovers_planted_route_where_single_frame_fails(route):
    D, truth = route
    single_ok = np.abs(D.argmin(axis=1) - truth) <= 1
    assert single_ok.mean() < 0.3  # single-frame matching is mostly wrong

    L = 20
    res = match_sequences(D, SequenceConfig(seq_len=L))
    assert isinstance(res, SequenceMatches) and len(res) == Q
    ok = np.abs(res.best_index - truth) <= 1
    elig = _eligible(L)
    assert ok[elig].mean() >= 0.95, ok[elig].mean()
    # both slopes are found, with the right velocity
    t = np.arange(Q)
    assert ok[elig & (t < SEG)].mean() >= 0.95
    assert ok[elig & (t >= SEG)].mean() >= 0.9  # slope 0.8: rounding of the line costs a little
    assert np.median(res.best_velocity[elig & (t < SEG)]) == pytest.approx(1.0)
    assert np.median(res.best_velocity[elig & (t >= SEG)]) == pytest.approx(0.8)
    # correct matches are more distinctive than wrong ones (uniqueness ratio, lower = better)
    assert np.all((res.uniqueness[np.isfinite(res.uniqueness)] >= 0) & (res.uniqueness[np.isfinite(res.uniqueness)] <= 1))
    assert np.nanmedian(res.uniqueness[ok & elig]) < np.nanmedian(res.uniqueness[~ok])
    assert np.all(res.confidence[ok & elig] >= 0)


def test_result_layout_and_topk(route):
    D, _ = route
    L = 10
    res = match_sequences(D[:60, :200], SequenceConfig(seq_len=L, top_k=7))
    assert res.query_index.tolist() == list(range(60))
    assert res.seq_len.tolist() == [min(t + 1, L) for t in range(60)]  # first L-1: shorter sequences
    assert res.topk_indices.shape == (60, 7) and res.topk_scores.shape == (60, 7)
    assert res.best_index.dtype == np.int64 and res.best_score.dtype == np.float32
    assert np.array_equal(res.topk_indices[:, 0], res.best_index)
    assert np.array_equal(res.topk_scores[:, 0], res.best_score)
    assert np.all(np.diff(res.topk_scores, axis=1) >= 0)
    assert np.all(res.best_score >= 0)
    # top_k larger than the map is clipped
    small = match_sequences(D[:5, :4], SequenceConfig(seq_len=3, top_k=10, uniqueness_window=0))
    assert small.topk_indices.shape == (5, 4)
    assert sorted(small.topk_indices[0].tolist()) == [0, 1, 2, 3]


def test_velocity_range_excluding_planted_slope_fails(route):
    D, truth = route
    L = 20
    t = np.arange(Q)
    elig = _eligible(L)
    seg_b = elig & (t >= SEG)
    good = match_sequences(D, SequenceConfig(seq_len=L, v_min=0.7, v_max=0.9, v_steps=3))
    wrong = match_sequences(D, SequenceConfig(seq_len=L, v_min=1.1, v_max=1.4, v_steps=4))
    assert (np.abs(good.best_index - truth) <= 1)[seg_b].mean() >= 0.9
    assert (np.abs(wrong.best_index - truth) <= 1)[seg_b].mean() < 0.5
    seg_a = elig & (t < SEG)
    too_fast = match_sequences(D, SequenceConfig(seq_len=L, v_min=1.5, v_max=2.0, v_steps=3))
    assert (np.abs(too_fast.best_index - truth) <= 1)[seg_a].mean() < 0.5


def test_reverse_traversal():
    rng = np.random.default_rng(1)
    q, m = 300, 500
    D = rng.normal(1.0, 0.1, (q, m)).astype(np.float32)
    truth = 420 - np.arange(q)  # route driven backwards
    _plant(D, truth)
    L = 20
    elig = np.arange(q) >= L - 1
    fwd = match_sequences(D, SequenceConfig(seq_len=L))
    assert (np.abs(fwd.best_index - truth) <= 1)[elig].mean() < 0.5
    both = match_sequences(D, SequenceConfig(seq_len=L, reverse=True))
    ok = np.abs(both.best_index - truth) <= 1
    assert ok[elig].mean() >= 0.95
    assert np.all(both.best_velocity[elig & ok] < 0)
    neg_only = match_sequences(D, SequenceConfig(seq_len=L, v_min=-1.2, v_max=-0.8))
    assert (np.abs(neg_only.best_index - truth) <= 1)[elig].mean() >= 0.95
    assert np.array_equal(SequenceConfig(reverse=True).velocities()[5:], -SequenceConfig().velocities())


def _assert_same(a: SequenceMatches, b: SequenceMatches) -> None:
    for name in SequenceMatches.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.floating)), name


def test_streaming_equals_batch_row_by_row(route):
    D, _ = route
    sub = D[:90, :250]
    for cfg in (SequenceConfig(seq_len=12, top_k=4),
                SequenceConfig(seq_len=5, reverse=True, r_window=6, min_overlap=1.0)):
        batch = match_sequences(sub, cfg)
        matcher = SequenceMatcher(sub.shape[1], cfg)
        rows = [matcher.update(sub[t]) for t in range(sub.shape[0])]
        assert matcher.n_seen == sub.shape[0]
        for t, r in enumerate(rows):
            assert len(r) == 1 and r.query_index[0] == t
            _assert_same(r, SequenceMatches(*[getattr(batch, f)[t:t + 1] for f in SequenceMatches.__dataclass_fields__]))
        _assert_same(SequenceMatches.concatenate(rows), batch)
    matcher.reset()
    assert matcher.n_seen == 0
    first = matcher.update(sub[40])
    assert first.seq_len[0] == 1 and first.query_index[0] == 0
    with pytest.raises(ValueError, match="shape"):
        matcher.update(sub[0, :10])


def test_chunked_equals_unchunked(route, tmp_path):
    D, _ = route
    cfg = SequenceConfig(seq_len=15)
    full = match_sequences(D, cfg)
    for chunk in (1, 7, 64, 399):
        _assert_same(match_sequences(D, SequenceConfig(seq_len=15, chunk_rows=chunk)), full)
    # tiny memory budget -> automatic chunks; memmap input
    mm = np.lib.format.open_memmap(tmp_path / "D.npy", mode="w+", dtype=np.float32, shape=D.shape)
    mm[:] = D
    mm.flush()
    ro = np.load(tmp_path / "D.npy", mmap_mode="r")
    _assert_same(match_sequences(ro, SequenceConfig(seq_len=15, max_chunk_mb=0.5)), full)


def test_similarity_input_equals_negated_distance(route):
    D, _ = route
    cfg = SequenceConfig(seq_len=8)
    a = match_sequences(D[:50], cfg)
    b = match_sequences(-D[:50], SequenceConfig(seq_len=8, similarity=True))
    _assert_same(a, b)


def test_normalize_rows():
    rng = np.random.default_rng(3)
    X = rng.normal(5.0, 2.0, (3, 40))
    N = normalize_rows(X, r_window=10)
    assert N.dtype == np.float32 and N.shape == X.shape
    assert np.allclose(N.min(axis=1), 0.0)
    # entry j is (x - mean) / std over [j-5, j+5] (then shifted by the row minimum)
    j = 20
    w = X[1, 15:26]
    z = X[1]
    ref = np.array([(z[i] - z[max(0, i - 5):i + 6].mean()) / z[max(0, i - 5):i + 6].std() for i in range(40)])
    assert np.allclose(N[1], ref - ref.min(), atol=1e-4)
    assert np.isclose((X[1, j] - w.mean()) / w.std() - ref.min(), N[1, j], atol=1e-4)
    # flat rows and flat windows: no division by zero
    flat = np.ones((2, 30), np.float32)
    assert np.array_equal(normalize_rows(flat), np.zeros((2, 30), np.float32))
    step = np.concatenate([np.zeros(15), np.ones(15)])[None, :]
    out = normalize_rows(step, r_window=4)
    assert np.all(np.isfinite(out))
    # without normalisation: only the shift
    assert np.allclose(normalize_rows(X, normalize=False), X - X.min(axis=1, keepdims=True), atol=1e-5)


def test_sequence_length_and_velocity_helpers():
    assert sequence_length_frames(20.0, 1.0) == 20
    assert sequence_length_frames(20.0, 0.75) == 27   # 26.67 -> 27
    assert sequence_length_frames(0.1, 5.0) == 1      # never 0
    for bad in ((0.0, 1.0), (10.0, 0.0), (-1.0, 1.0), (float("nan"), 1.0), (10.0, float("inf"))):
        with pytest.raises(ValueError):
            sequence_length_frames(*bad)
    lo, hi = velocity_range(1.0, 1.0)
    assert (lo, hi) == pytest.approx((0.8, 1.2))
    assert velocity_range(2.0, 1.0, 0.1) == pytest.approx((1.8, 2.2))
    with pytest.raises(ValueError):
        velocity_range(1.0, 0.0)
    with pytest.raises(ValueError):
        velocity_range(1.0, 1.0, 1.5)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="2-D"):
        match_sequences(np.zeros(10))
    with pytest.raises(ValueError, match="M = 0"):
        match_sequences(np.zeros((3, 0)))
    bad = np.ones((4, 10))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        match_sequences(bad)
    assert len(match_sequences(np.zeros((0, 10)))) == 0
    for kwargs in (dict(seq_len=0), dict(v_min=1.2, v_max=0.8), dict(v_steps=0), dict(r_window=0),
                   dict(top_k=0), dict(min_overlap=0.0), dict(min_overlap=1.5), dict(chunk_rows=0),
                   dict(v_steps=1, v_min=0.8, v_max=1.2), dict(seq_len=2.5), dict(v_min=float("nan"))):
        with pytest.raises(ConfigError):
            SequenceConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        SequenceMatcher(0)
    with pytest.raises(ValueError):
        match_sequences(np.ones((3, 3)), config="fast")


def test_map_edges_and_short_map():
    # a route at the very start of the map: end indices 0..L-2 are reached by trajectories
    # that partly leave the map; they stay valid when >= min_overlap of the points are inside
    rng = np.random.default_rng(5)
    D = rng.normal(1.0, 0.1, (60, 200)).astype(np.float32)
    truth = np.arange(60)
    _plant(D, truth, delta=0.4)
    res = match_sequences(D, SequenceConfig(seq_len=10))
    assert np.all(res.best_index >= 0)
    assert (np.abs(res.best_index - truth) <= 1)[9:].mean() >= 0.95
    strict = match_sequences(D, SequenceConfig(seq_len=10, min_overlap=1.0, v_min=1.0, v_max=1.0, v_steps=1))
    # with velocity 1 and full overlap required, end index j < L-1 is unreachable for full sequences
    assert np.all((strict.topk_indices[9:] >= 9) | (strict.topk_indices[9:] == -1))
    assert np.all(strict.best_index[:9] >= 0)  # first L-1 queries: shorter sequences fit
    # one-column map
    one = match_sequences(np.ones((5, 1)), SequenceConfig(seq_len=3, v_min=0.0, v_max=0.0, v_steps=1))
    assert one.best_index.tolist() == [0] * 5
    assert np.all(np.isnan(one.uniqueness))
