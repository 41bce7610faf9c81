"""Patch-NetVLAD: patch extraction (vs brute-force NetVLAD on cropped windows), grid check,
float16 storage, mutual matching, RANSAC / rapid spatial scoring, fusion and re-ranking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_localizer.localization.patch_matching import (
    PAPER_SCALE_WEIGHTS, PatchMatchConfig, default_scale_weights, fuse_scale_scores, match_pair,
    mutual_nearest_neighbours, ransac_inliers, rapid_spatial_score, rerank)
from vpr_localizer.models.aggregation import NetVLAD
from vpr_localizer.models.patch_netvlad import (
    PatchDescriptors, PatchNetVLAD, bytes_per_keyframe, check_patch_grid, extract_patch_descriptors,
    from_storage, num_patches, patch_centres, patch_grid_problem, patch_grid_shape, to_storage)
from vpr_localizer.models.pca import PCAWhitening

K, C, H, W = 8, 16, 7, 10  # grid 10x7 (w x h)


def _netvlad(sharp: bool = True, seed: int = 0) -> NetVLAD:
    torch.manual_seed(seed)
    nv = NetVLAD(K, C)
    if sharp:  # k-means-style initialisation: sharp soft assignment, the numerically hard case
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((500, C)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        nv.init_from_clusters(x[:K].copy(), x)
    return nv.eval()


def _features(b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(b, C, H, W, generator=g))


def _brute(nv: NetVLAD, feats: torch.Tensor, p: int, stride: int = 1, weights=None) -> np.ndarray:
    """NetVLAD.forward on every cropped p x p window, row-major: (B, P, K*C)."""
    out = []
    with torch.no_grad():
        for y in range(0, feats.shape[2] - p + 1, stride):
            for x in range(0, feats.shape[3] - p + 1, stride):
                wt = None if weights is None else weights[:, :, y:y + p, x:x + p]
                out.append(nv(feats[:, :, y:y + p, x:x + p], wt).numpy())
    return np.stack(out, axis=1)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharp,box_sum,atol", [
    (False, "doubling", 1e-5), (True, "doubling", 1e-5), (False, "integral", 1e-5),
    # the integral's cancellation noise (~1e-16 |I| in float64) is amplified by intra-normalisation
    # for clusters with no assignment mass in the window (module doc): a few 1e-5 there
    (True, "integral", 2e-4)])
def test_extraction_matches_brute_force(sharp, box_sum, atol):
    nv, feats = _netvlad(sharp), _features()
    sizes = (1, 2, 5, 7)
    out = extract_patch_descriptors(nv, feats, patch_sizes=sizes, box_sum=box_sum)
    assert len(out) == 2 and all(len(o) == len(sizes) for o in out)
    for s, p in enumerate(sizes):
        ref = _brute(nv, feats, p)
        for b in range(2):
            pd = out[b][s]
            assert pd.patch_size == p and pd.grid_hw == (H, W) and pd.stride == 1
            assert pd.descriptors.dtype == np.float32 and pd.descriptors.shape == ((H - p + 1) * (W - p + 1), K * C)
            assert pd.centres.dtype == np.float32 and pd.centres.shape == (pd.num_patches, 2)
            np.testing.assert_allclose(pd.descriptors, ref[b], atol=atol, rtol=0)
            np.testing.assert_allclose(np.linalg.norm(pd.descriptors, axis=1), 1.0, atol=1e-5)


def test_full_window_equals_global_descriptor():
    nv, feats = _netvlad(), _features()
    out = extract_patch_descriptors(nv, feats, patch_sizes=(min(H, W),))
    # a 7x7 window on a 7x10 grid: 4 windows; compare window 0 with the global NetVLAD of the crop
    with torch.no_grad():
        np.testing.assert_allclose(out[0][0].descriptors[0], nv(feats[:1, :, :, :7])[0].numpy(), atol=1e-5)


def test_extraction_with_weights_and_stride():
    nv, feats = _netvlad(), _features()
    g = torch.Generator().manual_seed(3)
    weights = torch.rand(2, 1, H, W, generator=g)
    out = PatchNetVLAD(nv, patch_sizes=(2, 5, 3), strides=(2, 3, 1)).extract(feats, weights)
    for s, (p, st) in enumerate([(2, 2), (5, 3), (3, 1)]):
        ref = _brute(nv, feats, p, st, weights)
        for b in range(2):
            np.testing.assert_allclose(out[b][s].descriptors, ref[b], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(out[b][s].centres, patch_centres((H, W), p, st))
    assert patch_grid_shape((H, W), 5, 3) == (1, 2)


def test_patch_centres_geometry():
    c = patch_centres((H, W), 5)
    assert c.shape == (3 * 6, 2) and c.dtype == np.float32
    np.testing.assert_array_equal(c[0], [2.0, 2.0])  # top-left patch: cells 0..4 -> centre 2
    np.testing.assert_array_equal(c[1], [3.0, 2.0])  # row-major: next column first
    np.testing.assert_array_equal(c[-1], [W - 3.0, H - 3.0])
    np.testing.assert_array_equal(patch_centres((H, W), 2)[0], [0.5, 0.5])


def test_pca_projection_matches_pca_transform():
    nv, feats = _netvlad(), _features()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((60, K * C)).astype(np.float32)
    pca = PCAWhitening.fit(sample, 40)
    out = PatchNetVLAD(nv, patch_sizes=(2, 5), pca=pca).extract(feats)
    out20 = PatchNetVLAD(nv, patch_sizes=(2, 5), pca=pca, pca_dim=20).extract(feats)
    pca20 = PCAWhitening.fit(sample, 20)  # truncating the 40-dim PCA == fitting 20 dims
    for s, p in enumerate((2, 5)):
        ref = _brute(nv, feats, p)
        for b in range(2):
            np.testing.assert_allclose(out[b][s].descriptors, pca.transform(ref[b]), atol=1e-4)
            assert out20[b][s].descriptors.shape[1] == 20
            np.testing.assert_allclose(out20[b][s].descriptors, pca20.transform(ref[b]), atol=1e-4)


def test_extractor_argument_errors():
    nv = _netvlad(sharp=False)
    pca = PCAWhitening.fit(np.random.default_rng(0).standard_normal((30, 2 * K * C)).astype(np.float32), 10)
    with pytest.raises(ValueError, match="concatenated"):
        PatchNetVLAD(nv, pca=pca)
    with pytest.raises(ValueError, match="pca_dim"):
        PatchNetVLAD(nv, pca_dim=8)
    with pytest.raises(ValueError, match="box_sum"):
        PatchNetVLAD(nv, box_sum="cumsum")
    with pytest.raises(ValueError, match="one stride per patch size"):
        PatchNetVLAD(nv, patch_sizes=(2, 5), strides=(1, 1, 1))
    with pytest.raises(ValueError, match="too small"):
        PatchNetVLAD(nv, patch_sizes=(2, 8)).extract(_features())
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        PatchNetVLAD(nv, patch_sizes=(2,)).extract(torch.zeros(1, C + 1, H, W))


# ---------------------------------------------------------------------------------------------
# Grid check, storage, cost
# ---------------------------------------------------------------------------------------------

def test_grid_check():
    # Nordland 128x64 px through VGG16 (16 px/cell): 8 wide x 4 high
    msg = patch_grid_problem((4, 8), (2, 5, 8))
    assert msg is not None and "[5, 8]" in msg and "min(h, w) = 4" in msg
    with pytest.raises(ValueError, match="too small for patch size"):
        check_patch_grid((4, 8), (2, 5, 8))
    assert patch_grid_problem((16, 32), (2, 5, 8)) is None  # 512x256 px
    assert patch_grid_problem((30, 40), (2, 5, 8)) is None  # 640x480 px (the paper)
    check_patch_grid((4, 8), (2, 4))
    assert patch_grid_problem((4, 8), (0, 2)) is not None
    assert patch_grid_problem((4, 8), ()) is not None
    assert num_patches((30, 40), (2, 5, 8)) == [29 * 39, 26 * 36, 23 * 33]


def test_float16_storage_round_trip():
    nv, feats = _netvlad(), _features(1)
    sets = extract_patch_descriptors(nv, feats, patch_sizes=(2, 5))[0]
    arrays = to_storage(sets, prefix="kf7/")
    assert arrays["kf7/desc_0"].dtype == np.float16 and "kf7/centres_0" not in arrays  # regular grid: not stored
    back = from_storage(arrays, prefix="kf7/")
    assert [b.patch_size for b in back] == [2, 5]
    for a, b in zip(sets, back):
        assert b.descriptors.dtype == np.float32 and b.grid_hw == (H, W)
        np.testing.assert_array_equal(a.centres, b.centres)
        np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-3)
        # inner products (what matching uses) survive
        np.testing.assert_allclose(a.descriptors @ a.descriptors.T, b.descriptors @ b.descriptors.T, atol=2e-3)
    # hand-built set: centres stored
    hand = [PatchDescriptors(3, np.eye(4, dtype=np.float32), np.arange(8, dtype=np.float32).reshape(4, 2))]
    back = from_storage(to_storage(hand))
    np.testing.assert_array_equal(back[0].centres, hand[0].centres)
    assert back[0].grid_hw is None
    stored_bytes = sum(v.nbytes for k, v in to_storage(sets).items() if "desc" in k)
    assert stored_bytes == bytes_per_keyframe((H, W), (2, 5), K * C)
    with pytest.raises(ValueError, match="lacks key"):
        from_storage({"patch_sizes": np.array([2])})


def test_bytes_per_keyframe():
    assert bytes_per_keyframe((30, 40), (2, 5, 8), 4096) == (1131 + 936 + 759) * 4096 * 2
    assert bytes_per_keyframe((16, 32), (5,), 512) == 12 * 28 * 512 * 2
    assert bytes_per_keyframe((16, 32), (5,), 512, bytes_per_value=4) == 12 * 28 * 512 * 4


# ---------------------------------------------------------------------------------------------
# Matching (hand-built patch sets with known answers)
# ---------------------------------------------------------------------------------------------

def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


ROWS, COLS, D = 6, 8, 32  # a 6x8 patch grid (p = 2 on a 7x9 feature grid)


def _query(p=2, seed=10):
    cen = patch_centres((ROWS + p - 1, COLS + p - 1), p)
    return PatchDescriptors(p, _unit(ROWS * COLS, D, seed), cen, 1, (ROWS + p - 1, COLS + p - 1))


def _translated(q, shift=(3.0, 1.0), noise=0.0, seed=0):
    d = q.descriptors + noise * _unit(q.num_patches, q.dim, seed + 100)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return PatchDescriptors(q.patch_size, d, q.centres + np.float32(shift))


def _shuffled(q, seed=0):
    perm = np.random.default_rng(seed).permutation(q.num_patches)
    return PatchDescriptors(q.patch_size, q.descriptors.copy(), q.centres[perm])


def test_translated_candidate_all_matches_full_score():
    q = _query()
    cand = _translated(q, (3, 1), noise=0.05)
    qi, ci = mutual_nearest_neighbours(q.descriptors, cand.descriptors)
    np.testing.assert_array_equal(qi, np.arange(q.num_patches))
    np.testing.assert_array_equal(ci, np.arange(q.num_patches))
    (m,) = match_pair([q], [cand], PatchMatchConfig(mode="ransac"))
    assert m.num_matches == q.num_patches and m.num_inliers == q.num_patches and m.score == pytest.approx(1.0)
    (m,) = match_pair([q], [cand], PatchMatchConfig(mode="ransac", ransac_method="magsac"))
    assert m.num_inliers == q.num_patches
    (s,) = match_pair([q], [cand], PatchMatchConfig(mode="speed"))
    max_x, max_y = COLS - 1, ROWS - 1  # extent of the patch grid, cells
    assert s.score == pytest.approx(max_x ** 2 + max_y ** 2)  # the known maximum


def test_shuffled_candidate_few_inliers_lower_spatial_score():
    q = _query()
    good, bad = _translated(q), _shuffled(q, seed=1)
    (mb,) = match_pair([q], [bad], PatchMatchConfig(mode="ransac"))
    assert mb.num_matches == q.num_patches  # same descriptors: every patch still matches...
    assert mb.num_inliers < 0.25 * q.num_patches  # ...but no homography explains the positions
    (sg,) = match_pair([q], [good], PatchMatchConfig(mode="spatial"))
    (sb,) = match_pair([q], [bad], PatchMatchConfig(mode="spatial"))
    assert sb.score < 0.8 * sg.score


def test_fewer_than_four_matches_scores_zero_ransac():
    q = _query()
    three = PatchDescriptors(2, q.descriptors[[0, 9, 20]].copy(), q.centres[[0, 9, 20]] + 1)
    (m,) = match_pair([q], [three], PatchMatchConfig(mode="ransac"))
    assert m.num_matches == 3 and m.num_inliers == 0 and m.score == 0.0
    assert ransac_inliers(np.zeros((3, 2)), np.zeros((3, 2))) == 0
    # spatial mode still scores 3 consistent matches: 3/48 of the maximum
    (s,) = match_pair([q], [three], PatchMatchConfig(mode="spatial"))
    assert s.score == pytest.approx(3 / q.num_patches * ((COLS - 1) ** 2 + (ROWS - 1) ** 2))
    (s,) = match_pair([q], [three], PatchMatchConfig(mode="spatial", spatial_normaliser="matches"))
    assert s.score == pytest.approx((COLS - 1) ** 2 + (ROWS - 1) ** 2)


def test_rapid_spatial_score_formula():
    q = np.array([[0, 0], [1, 0], [2, 1], [3, 3]], np.float64)
    c = q + np.array([[2, 1], [2, 1], [3, 1], [1, 3]], np.float64)
    d = c - q
    dev = np.abs(d - d.mean(0))
    expect = (((5 - dev[:, 0]) ** 2) + ((4 - dev[:, 1]) ** 2)).sum() / 10
    assert rapid_spatial_score(q, c, 5, 4, 10) == pytest.approx(expect)
    assert rapid_spatial_score(np.zeros((0, 2)), np.zeros((0, 2)), 5, 4, 10) == 0.0
    # clamped: a deviation beyond the grid extent earns nothing (not (max - dev)^2 > 0)
    far = rapid_spatial_score(np.zeros((2, 2)), np.array([[20.0, 0], [-20.0, 0]]), 5, 0, 1)
    assert far == 0.0


@pytest.mark.parametrize("mode", ["ransac", "spatial"])
def test_rerank_puts_true_candidate_first(mode):
    q = _query()
    sets = [[_shuffled(q, 1)], [PatchDescriptors(2, _unit(q.num_patches, D, 77), q.centres.copy())],
            [_translated(q, (3, 1), noise=0.3, seed=5)], [_shuffled(q, 2)]]
    ids, scores = rerank([q], sets, [11, 12, 13, 14], [0.9, 0.85, 0.5, 0.4], mode=mode)
    assert ids[0] == 13
    assert scores.shape == (4,) and np.all(np.diff(scores) <= 0)


def test_rerank_ties_broken_by_global_score():
    q = _query()
    same = [[_translated(q)] for _ in range(3)]  # identical patch scores
    ids, scores = rerank([q], same, [5, 6, 7], [0.2, 0.9, 0.5], mode="ransac")
    np.testing.assert_array_equal(ids, [6, 7, 5])
    np.testing.assert_allclose(scores, 0.0)  # z-scored: no spread -> 0
    with pytest.raises(ValueError, match="one id and one global score"):
        rerank([q], same, [5, 6], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="different patch sizes"):
        rerank([q], [[_query(p=5)]], [1], [0.1])
    with pytest.raises(ValueError, match="unknown patch scoring mode"):
        rerank([q], same, [5, 6, 7], [0.2, 0.9, 0.5], mode="fast")


def test_multiscale_fusion_weights():
    assert default_scale_weights((2, 5, 8)) == (0.45, 0.15, 0.40)
    assert default_scale_weights((8, 2, 5)) == (0.40, 0.45, 0.15)
    assert default_scale_weights((5,)) == (1.0,)
    assert default_scale_weights((3, 4)) == (0.5, 0.5)
    assert PAPER_SCALE_WEIGHTS == {2: 0.45, 5: 0.15, 8: 0.40}
    s = np.array([[1.0, 10.0, 0.5], [3.0, 10.0, 0.1], [2.0, 10.0, 0.3]])
    w = (0.45, 0.15, 0.4)
    z0 = (s[:, 0] - 2.0) / np.std([1.0, 3.0, 2.0])
    z2 = (s[:, 2] - 0.3) / np.std([0.5, 0.1, 0.3])
    np.testing.assert_allclose(fuse_scale_scores(s, w), 0.45 * z0 + 0.4 * z2)  # constant scale -> 0
    np.testing.assert_allclose(fuse_scale_scores(s, w, "none"), s @ np.array(w))
    with pytest.raises(ValueError, match="one fusion weight per patch size"):
        fuse_scale_scores(s, (1.0, 1.0))

    # end to end: three scales; candidate A wins at scale 0, B at scales 1 and 2
    q = [_query(2, seed=1), _query(5, seed=2), _query(8, seed=3)]
    a = [_translated(q[0]), _shuffled(q[1], 1), _shuffled(q[2], 1)]
    b = [_shuffled(q[0], 2), _translated(q[1]), _translated(q[2])]
    ids, fused, per_scale = rerank(q, [a, b], [1, 2], [0.5, 0.5], mode="ransac", return_details=True)
    np.testing.assert_allclose(sorted(fused, reverse=True), fuse_scale_scores(per_scale, (0.45, 0.15, 0.40))[[1, 0]])
    assert ids[0] == 2  # 0.15 + 0.40 > 0.45
    ids, _ = rerank(q, [a, b], [1, 2], [0.5, 0.5], mode="ransac", weights=(0.9, 0.05, 0.05))
    assert ids[0] == 1
    with pytest.raises(ValueError, match="one fusion weight per patch size"):
        rerank(q, [a, b], [1, 2], [0.5, 0.5], weights=(1.0,))


def test_config_from_dict():
    cfg = PatchMatchConfig.from_dict({"mode": "performance", "ransac_threshold": 2.0})
    assert cfg.mode == "ransac" and cfg.ransac_threshold == 2.0
    with pytest.raises(ValueError, match="unknown patch matching options"):
        PatchMatchConfig.from_dict({"modee": "speed"})
    with pytest.raises(ValueError, match="ransac_method"):
        PatchMatchConfig(ransac_method="lmeds")
