"""NetVLAD, GeM, GlobalAvgPool and kmeans_centroids against direct NumPy computations.

References: Arandjelovic et al., "NetVLAD", CVPR 2016, Eq. (1)-(4); Radenovic et al., TPAMI 2019,
Eq. (3) (GeM).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_localizer.models.aggregation import GeM, GlobalAvgPool, NetVLAD, kmeans_centroids

B, D, K, H, W = 2, 8, 4, 3, 5


# --- NumPy references --------------------------------------------------------------------


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def netvlad_reference(x, conv_w, conv_b, centroids, weights=None, normalize_input=True):
    """NetVLAD written out with loops over images, clusters and locations (float64).

    x: (B, D, H, W); conv_w: (K, D); conv_b: (K,); centroids: (K, D);
    weights: (B, 1, H, W) or None.
    """
    x = np.asarray(x, np.float64)
    bsz, dim, h, w = x.shape
    k_clusters = centroids.shape[0]
    out = np.zeros((bsz, k_clusters * dim))
    for b in range(bsz):
        # local features x_i as rows, i over locations in (h, w) order
        feats = [x[b, :, r, c] for r in range(h) for c in range(w)]
        m = [1.0 if weights is None else float(weights[b, 0, r, c]) for r in range(h) for c in range(w)]
        if normalize_input:
            feats = [f / np.linalg.norm(f) for f in feats]
        v = np.zeros((k_clusters, dim))
        for i, xi in enumerate(feats):
            logits = np.array([conv_w[k] @ xi + conv_b[k] for k in range(k_clusters)])
            a = _softmax(logits, axis=0)
            for k in range(k_clusters):
                v[k] += m[i] * a[k] * (xi - centroids[k])
        for k in range(k_clusters):  # intra-normalisation
            v[k] /= np.linalg.norm(v[k])
        flat = v.reshape(-1)  # k-major: [V(0), V(1), ...]
        out[b] = flat / np.linalg.norm(flat)
    return out


def _random_netvlad(seed: int, normalize_input: bool = True):
    g = torch.Generator().manual_seed(seed)
    layer = NetVLAD(num_clusters=K, dim=D, normalize_input=normalize_input)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.randn(K, D, 1, 1, generator=g) * 2.0)
        layer.conv.bias.copy_(torch.randn(K, generator=g))
        layer.centroids.copy_(torch.randn(K, D, generator=g) * 0.5)
    x = torch.randn(B, D, H, W, generator=g)
    return layer, x


def _params(layer: NetVLAD):
    return (layer.conv.weight.detach().numpy().reshape(K, D).astype(np.float64),
            layer.conv.bias.detach().numpy().astype(np.float64),
            layer.centroids.detach().numpy().astype(np.float64))


# --- NetVLAD -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_netvlad_matches_numpy_reference(seed):
    layer, x = _random_netvlad(seed)
    with torch.no_grad():
        out = layer(x).numpy()
    ref = netvlad_reference(x.numpy(), *_params(layer))
    assert out.shape == (B, K * D) == (B, layer.out_dim)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_netvlad_reference_is_sensitive_to_layout_and_prel2():
    """Guards the reference comparison: a D-major flatten or a missing preL2 gives a different
    descriptor, so the test above would catch those mistakes."""
    layer, x = _random_netvlad(3)
    with torch.no_grad():
        out = layer(x).numpy()
    w, b, c = _params(layer)
    ref = netvlad_reference(x.numpy(), w, b, c)
    d_major = ref.reshape(B, K, D).transpose(0, 2, 1).reshape(B, -1)
    assert np.abs(out - d_major).max() > 1e-2
    no_prel2 = netvlad_reference(x.numpy(), w, b, c, normalize_input=False)
    assert np.abs(out - no_prel2).max() > 1e-2


def test_netvlad_without_input_normalisation_matches_reference():
    layer, x = _random_netvlad(4, normalize_input=False)
    with torch.no_grad():
        out = layer(x).numpy()
    ref = netvlad_reference(x.numpy(), *_params(layer), normalize_input=False)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


def test_netvlad_weighted_matches_numpy_reference():
    layer, x = _random_netvlad(5)
    g = torch.Generator().manual_seed(50)
    m = torch.rand(B, 1, H, W, generator=g)
    m[0, 0, 0, :] = 0.0  # a masked-out row
    with torch.no_grad():
        out = layer(x, weights=m).numpy()
        unweighted = layer(x).numpy()
    ref = netvlad_reference(x.numpy(), *_params(layer), weights=m.numpy())
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    assert np.abs(out - unweighted).max() > 1e-3  # the weights do change the result
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_netvlad_unit_weights_equal_no_weights_and_zero_weight_drops_location():
    layer, x = _random_netvlad(6)
    ones = torch.ones(B, 1, H, W)
    with torch.no_grad():
        np.testing.assert_allclose(layer(x, weights=ones).numpy(), layer(x).numpy(), atol=1e-6)
    # zero weight at a location = that location's feature does not matter
    m = torch.ones(B, 1, H, W)
    m[:, :, 1, 2] = 0.0
    x2 = x.clone()
    x2[:, :, 1, 2] = torch.randn(B, D) * 10.0
    with torch.no_grad():
        np.testing.assert_allclose(layer(x, weights=m).numpy(), layer(x2, weights=m).numpy(), atol=1e-6)
        assert np.abs(layer(x).numpy() - layer(x2).numpy()).max() > 1e-3


def test_netvlad_rejects_wrong_feature_dim():
    layer = NetVLAD(num_clusters=K, dim=D)
    with pytest.raises(ValueError, match=str(D)):
        layer(torch.randn(1, D + 1, H, W))


def test_netvlad_constructor_rejects_nonpositive_sizes():
    with pytest.raises(ValueError):
        NetVLAD(num_clusters=0, dim=D)
    with pytest.raises(ValueError):
        NetVLAD(num_clusters=K, dim=0)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_init_from_clusters_sets_conv_and_alpha_rule():
    rng = np.random.default_rng(10)
    cents = _unit(rng.normal(size=(K, D))).astype(np.float32)
    descs = _unit(rng.normal(size=(200, D))).astype(np.float32)
    layer = NetVLAD(num_clusters=K, dim=D, alpha=123.0)
    layer.init_from_clusters(cents, descs)

    # alpha rule, computed independently: squared distances to all centroids, sorted
    d2 = ((descs[:, None, :].astype(np.float64) - cents[None, :, :]) ** 2).sum(-1)
    d2.sort(axis=1)
    alpha = -np.log(0.01) / np.mean(d2[:, 1] - d2[:, 0])
    assert layer.alpha == pytest.approx(alpha, rel=1e-4)
    assert layer.alpha != pytest.approx(123.0)

    w = layer.conv.weight.detach().numpy()
    b = layer.conv.bias.detach().numpy()
    assert w.shape == (K, D, 1, 1)
    np.testing.assert_allclose(w.reshape(K, D), 2.0 * alpha * cents, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, -alpha * (cents.astype(np.float64) ** 2).sum(1), rtol=1e-4)
    np.testing.assert_array_equal(layer.centroids.detach().numpy(), cents)

    # with this init the soft assignment is softmax_k(-alpha ||x - c_k||^2) for any unit x
    x = _unit(rng.normal(size=(H * W, D))).astype(np.float32)
    xt = torch.from_numpy(x.T.copy()).reshape(1, D, H, W)
    with torch.no_grad():
        a = layer.soft_assignment(xt).numpy().reshape(K, H * W).T
    dist2 = ((x[:, None, :].astype(np.float64) - cents[None]) ** 2).sum(-1)
    np.testing.assert_allclose(a, _softmax(-alpha * dist2, axis=1), atol=1e-5)


def test_init_from_clusters_large_alpha_gives_one_hot_assignment_on_centroids():
    rng = np.random.default_rng(11)
    cents = _unit(rng.normal(size=(K, D))).astype(np.float32)
    # Sample points close to the bisector between centroid 0 and 1: the gap between the nearest
    # and second-nearest squared distances is small, so the alpha rule makes alpha large.
    t = 0.5 + 0.001 * rng.uniform(-1, 1, size=(50, 1))
    descs = _unit(t * cents[0] + (1 - t) * cents[1]).astype(np.float32)
    layer = NetVLAD(num_clusters=K, dim=D)
    layer.init_from_clusters(cents, descs)
    assert layer.alpha > 500.0

    xt = torch.from_numpy(cents.T.copy()).reshape(1, D, 1, K)  # each centroid as a location
    with torch.no_grad():
        a = layer.soft_assignment(xt).numpy().reshape(K, K)  # (cluster, location)
    np.testing.assert_allclose(a, np.eye(K), atol=1e-3)
    assert (a.argmax(axis=0) == np.arange(K)).all()


def test_init_from_clusters_rejects_wrong_centroid_shape():
    layer = NetVLAD(num_clusters=K, dim=D)
    with pytest.raises(ValueError):
        layer.init_from_clusters(np.zeros((K + 1, D), np.float32), np.zeros((10, D), np.float32))


def test_netvlad_after_init_matches_reference_and_is_unit_norm():
    rng = np.random.default_rng(12)
    cents = _unit(rng.normal(size=(K, D))).astype(np.float32)
    descs = _unit(rng.normal(size=(100, D))).astype(np.float32)
    layer = NetVLAD(num_clusters=K, dim=D)
    layer.init_from_clusters(cents, descs)
    x = torch.from_numpy(rng.normal(size=(B, D, H, W)).astype(np.float32))
    with torch.no_grad():
        out = layer(x).numpy()
    ref = netvlad_reference(x.numpy(), *_params(layer))
    assert out.shape == (B, K * D)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


# --- GeM / GlobalAvgPool -------------------------------------------------------------------


def gem_reference(x, p, eps=1e-6, weights=None):
    x = np.maximum(np.asarray(x, np.float64), eps)
    bsz, dim = x.shape[:2]
    out = np.zeros((bsz, dim))
    for b in range(bsz):
        m = np.ones(x.shape[2:]) if weights is None else np.asarray(weights[b, 0], np.float64)
        for d in range(dim):
            out[b, d] = ((m * x[b, d] ** p).sum() / m.sum()) ** (1.0 / p)
        out[b] /= np.linalg.norm(out[b])
    return out


def test_gem_p3_matches_numpy():
    g = torch.Generator().manual_seed(20)
    x = torch.randn(B, D, H, W, generator=g)  # includes negatives: clamped to eps
    with torch.no_grad():
        out = GeM(p=3.0)(x).numpy()
    ref = gem_reference(x.numpy(), 3.0)
    assert out.shape == (B, D)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # differs from plain averaging (the assert above can tell p=3 from p=1)
    assert np.abs(out - gem_reference(x.numpy(), 1.0)).max() > 1e-2


def test_gem_weighted_matches_numpy():
    g = torch.Generator().manual_seed(21)
    x = torch.rand(B, D, H, W, generator=g) + 0.05
    m = torch.rand(B, 1, H, W, generator=g)
    with torch.no_grad():
        out = GeM(p=3.0)(x, weights=m).numpy()
        unweighted = GeM(p=3.0)(x).numpy()
    np.testing.assert_allclose(out, gem_reference(x.numpy(), 3.0, weights=m.numpy()), rtol=1e-5, atol=1e-6)
    assert np.abs(out - unweighted).max() > 1e-3


def test_gem_p1_equals_global_avg_pool():
    g = torch.Generator().manual_seed(22)
    x = torch.rand(B, D, H, W, generator=g) + 0.01  # non-negative: GeM's clamp is inactive
    m = torch.rand(B, 1, H, W, generator=g)
    gem1, gap = GeM(p=1.0), GlobalAvgPool()
    with torch.no_grad():
        np.testing.assert_allclose(gem1(x).numpy(), gap(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gem1(x, m).numpy(), gap(x, m).numpy(), rtol=1e-5, atol=1e-6)
        avg = x.numpy().astype(np.float64).mean(axis=(2, 3))
        avg /= np.linalg.norm(avg, axis=1, keepdims=True)
        np.testing.assert_allclose(gap(x).numpy(), avg, rtol=1e-5, atol=1e-6)


# --- k-means ---------------------------------------------------------------------------------


def _planted(seed: int, k: int, dim: int = 16, per_cluster: int = 100, noise: float = 0.01):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:k]  # orthonormal: distance sqrt(2)
    labels = np.repeat(np.arange(k), per_cluster)
    x = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    perm = rng.permutation(labels.size)
    return x[perm].astype(np.float32), labels[perm], centres


def _assert_recovers(found: np.ndarray, x: np.ndarray, labels: np.ndarray, centres: np.ndarray):
    k = centres.shape[0]
    d2 = ((found[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1)
    match = d2.argmin(axis=1)
    assert sorted(match.tolist()) == list(range(k)), f"centres matched {match.tolist()}"
    means = np.stack([x[labels == j].astype(np.float64).mean(0) for j in range(k)])
    # each found centre is the sample mean of its planted cluster (a k-means fixed point)
    np.testing.assert_allclose(found, means[match], atol=1e-4)


def test_kmeans_centroids_recovers_planted_clusters():
    x, labels, centres = _planted(seed=0, k=4)
    found = kmeans_centroids(x, 4, seed=0)
    assert found.shape == (4, 16) and found.dtype == np.float32
    _assert_recovers(found, x, labels, centres)
    # deterministic for a given seed
    np.testing.assert_array_equal(found, kmeans_centroids(x, 4, seed=0))


def test_kmeans_centroids_recovers_planted_clusters_for_every_draw():
    for seed in range(10):
        x, labels, centres = _planted(seed=seed, k=5)
        _assert_recovers(kmeans_centroids(x, 5, seed=0), x, labels, centres)


def test_kmeans_centroids_raises_when_fewer_points_than_clusters():
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="K=4"):
        kmeans_centroids(x, 4)
