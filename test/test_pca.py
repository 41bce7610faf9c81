"""PCAWhitening against a NumPy SVD reference (both the Gram and the covariance path)."""
from __future__ import annotations

import numpy as np
import pytest

from vpr_localizer.models.pca import PCAWhitening


def _data(n: int, d: int, seed: int) -> np.ndarray:
    """Anisotropic Gaussian data with well-separated variances (so the principal directions are
    unique up to sign) and a non-zero mean."""
    rng = np.random.default_rng(seed)
    r = min(n, d)
    scales = 3.0 * 0.8 ** np.arange(d)
    rot = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = (rng.normal(size=(n, d)) * scales) @ rot.T + rng.normal(size=d) * 2.0
    assert r >= 2
    return x.astype(np.float32)


def svd_reference(x: np.ndarray, dim: int):
    """(mean, components (dim, D), variances (dim,)) from the SVD of the centred data."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dim], (s[:dim] ** 2) / (x.shape[0] - 1)


def whiten_reference(x, mean, comps, variances, eps):
    y = (x.astype(np.float64) - mean) @ comps.T
    y = y / np.sqrt(variances + eps * variances.max())
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _align_signs(comps: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-row signs s (+-1) such that s * comps ~ ref."""
    return np.sign(np.sum(comps.astype(np.float64) * ref, axis=1))


@pytest.mark.parametrize("n,d,dim", [(30, 80, 12),   # N < D: Gram-matrix path
                                     (400, 24, 10)],  # N > D: covariance path
                         ids=["gram", "covariance"])
def test_fit_matches_svd_reference(n, d, dim):
    x = _data(n, d, seed=n + d)
    pca = PCAWhitening.fit(x, dim)
    mean, comps, variances = svd_reference(x, dim)

    assert pca.dim == dim and pca.input_dim == d
    assert pca.mean.dtype == pca.components.dtype == pca.eigenvalues.dtype == np.float32
    np.testing.assert_allclose(pca.mean, mean, atol=1e-5)
    np.testing.assert_allclose(pca.eigenvalues, variances, rtol=1e-4)
    assert np.all(np.diff(pca.eigenvalues) <= 0), "eigenvalues must be in decreasing order"

    signs = _align_signs(pca.components, comps)
    assert np.all(signs != 0)
    np.testing.assert_allclose(pca.components * signs[:, None], comps, atol=1e-4)
    # orthonormal rows
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(dim), atol=1e-5)

    # whitened + normalised output equals the reference up to the same per-component signs
    queries = np.concatenate([x[:5], _data(7, d, seed=999)])
    y = pca.transform(queries)
    ref = whiten_reference(queries, mean, comps, variances, pca.eps)
    assert y.shape == (len(queries), dim) and y.dtype == np.float32
    np.testing.assert_allclose(y * signs[None, :], ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_gram_and_covariance_paths_agree_on_same_subspace():
    """Same population, N < D versus N > D: both fits equal their own SVD reference; and
    on identical data (duplicated rows to cross the N = D boundary) the subspaces coincide."""
    x = _data(20, 40, seed=3)  # Gram path
    x_dup = np.concatenate([x, x, x])  # 60 > 40 rows: covariance path, same mean and directions
    a = PCAWhitening.fit(x, 8)
    b = PCAWhitening.fit(x_dup, 8)
    proj_a = a.components.T.astype(np.float64) @ a.components
    proj_b = b.components.T.astype(np.float64) @ b.components
    np.testing.assert_allclose(proj_a, proj_b, atol=1e-4)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
    # variances scale with (N - 1): sum of squares is 3x, divided by 59 instead of 19
    np.testing.assert_allclose(b.eigenvalues, a.eigenvalues * 3 * 19 / 59, rtol=1e-4)


@pytest.mark.parametrize("n,d,dim", [(30, 80, 12), (400, 24, 10)], ids=["gram", "covariance"])
def test_unnormalised_projection_has_identity_covariance(n, d, dim):
    x = _data(n, d, seed=7 * n + d)
    # eps = 0: pure whitening, identity covariance on the training data
    pca = PCAWhitening.fit(x, dim, eps=0.0)
    z = (x.astype(np.float64) - pca.mean) @ pca.components.T.astype(np.float64)
    z /= np.sqrt(pca.eigenvalues.astype(np.float64))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(dim), atol=1e-3)
    # transform is exactly this projection, L2-normalised
    np.testing.assert_allclose(pca.transform(x), z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-4)

    # default eps: variance j shrinks to lambda_j / (lambda_j + eps * lambda_max)
    reg = PCAWhitening.fit(x, dim)
    lam = reg.eigenvalues.astype(np.float64)
    zr = (x.astype(np.float64) - reg.mean) @ reg.components.T.astype(np.float64)
    zr /= np.sqrt(lam + reg.eps * lam.max())
    np.testing.assert_allclose(np.diag(np.cov(zr, rowvar=False)), lam / (lam + reg.eps * lam.max()),
                               rtol=1e-3)
    np.testing.assert_allclose(reg.transform(x), zr / np.linalg.norm(zr, axis=1, keepdims=True),
                               atol=1e-4)


def test_max_dim_rule():
    assert PCAWhitening.max_dim(10, 100) == 9
    assert PCAWhitening.max_dim(100, 10) == 10
    assert PCAWhitening.max_dim(11, 10) == 10
    assert PCAWhitening.max_dim(1, 5) == 0
    assert PCAWhitening.max_dim(0, 5) == 0


@pytest.mark.parametrize("n,d", [(10, 30), (40, 6)])
def test_dim_limits(n, d):
    x = _data(n, d, seed=11)
    top = PCAWhitening.max_dim(n, d)
    assert PCAWhitening.fit(x, top).dim == top
    with pytest.raises(ValueError, match=str(top)):
        PCAWhitening.fit(x, top + 1)
    with pytest.raises(ValueError):
        PCAWhitening.fit(x, 0)


def test_state_round_trip_reproduces_transform_exactly(tmp_path):
    x = _data(25, 50, seed=5)
    pca = PCAWhitening.fit(x, 10, eps=1e-2)
    back = PCAWhitening.from_state(pca.state())
    np.testing.assert_array_equal(back.mean, pca.mean)
    np.testing.assert_array_equal(back.components, pca.components)
    np.testing.assert_array_equal(back.eigenvalues, pca.eigenvalues)
    q = _data(6, 50, seed=6)
    np.testing.assert_array_equal(back.transform(q), pca.transform(q))
    # through a file, as a map stores it
    path = tmp_path / "pca.npz"
    np.savez(path, **pca.state())
    with np.load(path) as f:
        loaded = PCAWhitening.from_state(dict(f))
    np.testing.assert_array_equal(loaded.components, pca.components)
    np.testing.assert_array_equal(loaded.transform(q), pca.transform(q))


def test_state_round_trip_preserves_eps_exactly():
    pca = PCAWhitening.fit(_data(25, 50, seed=5), 10)  # default eps = 1e-3
    assert PCAWhitening.from_state(pca.state()).eps == pca.eps


def test_transform_rejects_wrong_shape():
    pca = PCAWhitening.fit(_data(20, 16, seed=9), 5)
    with pytest.raises(ValueError, match="16"):
        pca.transform(np.zeros((3, 15), np.float32))
    with pytest.raises(ValueError):
        pca.transform(np.zeros(16, np.float32))  # 1-D
    with pytest.raises(ValueError):
        pca.transform(np.zeros((2, 16, 1), np.float32))
