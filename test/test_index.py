"""Unit tests of vpr_localizer.mapping.index (FAISS index layer of the map)."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from vpr_localizer.mapping import index as vindex
from vpr_localizer.errors import MapError


@pytest.fixture(autouse=True, scope="module")
def _single_thread(faiss_single_thread):
    """One OpenMP thread (see conftest.faiss_single_thread): deterministic, and much faster on a
    busy 2-core box (OpenMP barriers with a descheduled thread)."""


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, d: int = 128, n_clusters: int = 50, latent: int = 8,
              spread: float = 0.3) -> np.ndarray:
    """Unit vectors in ``n_clusters`` clusters, each varying along its own ``latent``-dim subspace
    (like place descriptors that change along a few factors: viewpoint, light, season).  With
    i.i.d. full-dimensional noise instead, all within-cluster neighbours are almost equidistant
    (top-1 and top-10 cosines 0.85 vs 0.83) and "the" top-10 is ill-defined for any approximate
    index; here top-1/top-10 cosines are ~0.80/0.53."""
    centres = unit_rows(rng, n_clusters, d).astype(np.float64)
    basis = rng.standard_normal((n_clusters, latent, d)) / np.sqrt(latent)
    label = rng.integers(0, n_clusters, n)
    z = rng.standard_normal((n, latent))
    x = centres[label] + spread * np.einsum("nl,nld->nd", z, basis[label])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(db: np.ndarray, q: np.ndarray, k: int):
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def overlap_at(ids: np.ndarray, ref: np.ndarray, k: int) -> float:
    """k-NN recall: mean |approx top-k ∩ exact top-k| / k."""
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(ids, ref)]))


# ----------------------------------------------------------------------------------------------
# exactness and ids
# ----------------------------------------------------------------------------------------------

def test_flat_search_is_exact_topk():
    rng = np.random.default_rng(1)
    db, q = unit_rows(rng, 3000, 64), unit_rows(rng, 40, 64)
    index = vindex.build_index(db, "flat")
    assert vindex.index_kind(index) == "flat"
    scores, ids = vindex.search(index, q, 10)
    ref_scores, ref_ids = exact_topk(db, q, 10)
    assert scores.dtype == np.float32 and scores.shape == (40, 10)
    assert ids.dtype == np.int64 and ids.shape == (40, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0), "scores must be sorted best first"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_ids_are_row_numbers(kind):
    rng = np.random.default_rng(2)
    db = unit_rows(rng, 2000, 32)
    index = vindex.build_index(db, kind)
    assert index.ntotal == 2000 and index.d == 32
    perm = rng.permutation(2000)[:300]
    scores, ids = vindex.search(index, db[perm], 1)
    np.testing.assert_array_equal(ids[:, 0], perm)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ivfpq_ids_are_row_numbers():
    rng = np.random.default_rng(3)
    db = clustered(rng, 3000, d=64)
    index = vindex.build_index(db, "ivfpq")
    assert vindex.index_kind(index) == "ivfpq" and index.ntotal == 3000
    vindex.set_search_params(index, nprobe=index.nlist)  # exhaustive over cells: only PQ error left
    perm = rng.permutation(3000)[:300]
    _, ids = vindex.search(index, db[perm], 5)
    # a descriptor's own row is within its PQ top-5 (measured: all 300; at most 3 may miss)
    assert np.mean((ids == perm[:, None]).any(axis=1)) >= 0.99


def test_k_is_clamped_to_ntotal():
    rng = np.random.default_rng(4)
    db = unit_rows(rng, 20, 16)
    index = vindex.build_index(db, "flat")
    scores, ids = vindex.search(index, db[:3], 50)
    assert scores.shape == ids.shape == (3, 20)
    assert sorted(ids[0].tolist()) == list(range(20))


def test_empty_query_batch():
    rng = np.random.default_rng(5)
    index = vindex.build_index(unit_rows(rng, 50, 16), "flat")
    scores, ids = vindex.search(index, np.zeros((0, 16), np.float32), 5)
    assert scores.shape == ids.shape == (0, 5)


# ----------------------------------------------------------------------------------------------
# approximate kinds: recall vs exact
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clustered_map():
    rng = np.random.default_rng(0)
    x = clustered(rng, 5200)
    db, q = x[:5000], x[5000:]
    _, ref = exact_topk(db, q, 10)
    return db, q, ref


def test_ivfpq_recall_on_clustered_data(clustered_map):
    """IVF-PQ defaults on 5000 x 128: nlist 128 (clamped to 5000 // 39), nprobe 16, 16 x 8-bit
    PQ = 16 bytes per vector (32x compression) trained on only 5000 points (faiss wants 9984).
    Measured over seeds 0..5: 10-NN overlap 0.77-0.79, exact top-1 within top-10 0.95-0.97;
    about 0.04 of the loss is IVF (nprobe=nlist gives 0.82), the rest PQ.  For this test's seed 0
    (single faiss thread, identical on every run): overlap 0.7825, top-1 within top-10 193/200 =
    0.965. The bounds leave ~0.03 for platform/BLAS differences; a broken index (wrong ids) would
    score ~0.002."""
    db, q, ref = clustered_map
    index = vindex.build_index(db, "ivfpq", seed=0)
    assert vindex.index_kind(index) == "ivfpq"
    assert index.nlist == 5000 // vindex.MIN_POINTS_PER_CENTROID and index.pq.M == 16
    _, ids = vindex.search(index, q, 10)
    assert overlap_at(ids, ref, 10) >= 0.75
    assert np.mean((ids == ref[:, :1]).any(axis=1)) >= 0.94


def test_hnsw_recall_on_clustered_data(clustered_map):
    """HNSW (M=32, efConstruction=80, efSearch=64) keeps full vectors; on 5000 points its graph
    search is essentially exact (measured 1.000 over seeds 0..5); at most 20 of the 2000
    neighbours may differ."""
    db, q, ref = clustered_map
    index = vindex.build_index(db, "hnsw")
    assert vindex.index_kind(index) == "hnsw"
    _, ids = vindex.search(index, q, 10)
    assert overlap_at(ids, ref, 10) >= 0.99


def test_more_nprobe_does_not_lower_recall(clustered_map):
    db, q, ref = clustered_map
    index = vindex.build_index(db, "ivfpq", seed=0)
    vindex.set_search_params(index, nprobe=1)
    assert index.nprobe == 1
    _, ids1 = vindex.search(index, q, 10)
    vindex.set_search_params(index, nprobe=10 ** 6)  # clamped to nlist
    assert index.nprobe == index.nlist
    _, ids_all = vindex.search(index, q, 10)
    # measured: 0.562 with one cell, 0.821 with all (only the PQ error left)
    assert overlap_at(ids_all, ref, 10) > overlap_at(ids1, ref, 10)
    assert overlap_at(ids_all, ref, 10) >= 0.79


# ----------------------------------------------------------------------------------------------
# ivfpq fallback and parameters
# ----------------------------------------------------------------------------------------------

def test_ivfpq_small_n_falls_back_to_flat(caplog):
    rng = np.random.default_rng(6)
    db = unit_rows(rng, 200, 64)  # < 256 points for 8-bit PQ codebooks
    with caplog.at_level(logging.WARNING, logger="vpr_localizer.mapping.index"):
        index = vindex.build_index(db, "ivfpq")
    assert vindex.index_kind(index) == "flat"
    assert any(r.levelno == logging.WARNING and "falling back" in r.getMessage() for r in caplog.records)
    _, ids = vindex.search(index, db[:5], 1)  # and it is the exact index
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))


def test_explicit_nlist_is_clamped_with_warning(caplog):
    rng = np.random.default_rng(7)
    db = unit_rows(rng, 400, 16)
    with caplog.at_level(logging.WARNING, logger="vpr_localizer.mapping.index"):
        index = vindex.build_index(db, "ivfpq", nlist=1000, pq_m=4)
    assert vindex.index_kind(index) == "ivfpq"
    assert index.nlist == 400 // 39 and index.pq.M == 4
    assert any("nlist=1000" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dim, m", [(512, 64), (4096, 64), (128, 16), (100, 10), (96, 12), (7, 1), (13, 1)])
def test_default_pq_m_rule(dim, m):
    assert vindex.default_pq_m(dim) == m


def test_bad_pq_m_raises():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="pq_m"):
        vindex.build_index(unit_rows(rng, 1000, 64), "ivfpq", pq_m=7)


def test_set_search_params():
    rng = np.random.default_rng(9)
    db = unit_rows(rng, 500, 16)
    hnsw = vindex.build_index(db, "hnsw")
    vindex.set_search_params(hnsw, nprobe=4, ef_search=123)  # nprobe ignored
    assert hnsw.hnsw.efSearch == 123
    flat = vindex.build_index(db, "flat")
    vindex.set_search_params(flat, nprobe=4, ef_search=5)  # both ignored, no error
    with pytest.raises(ValueError):
        vindex.set_search_params(hnsw, ef_search=0)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_unknown_kind_raises():
    rng = np.random.default_rng(10)
    with pytest.raises(ValueError, match="unknown index kind"):
        vindex.build_index(unit_rows(rng, 10, 8), "annoy")


@pytest.mark.parametrize("bad, match", [
    (np.ones(8, np.float32), "2-D"),
    (np.ones((2, 3, 4), np.float32), "2-D"),
    (np.ones((10, 8), np.float64), "float32"),
    (np.zeros((0, 8), np.float32), "empty"),
    ([[1.0, 0.0]], "numpy array"),
])
def test_bad_descriptors_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        vindex.build_index(bad, "flat")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_descriptors_raise(value):
    rng = np.random.default_rng(11)
    db = unit_rows(rng, 100, 8)
    db[37, 3] = value
    with pytest.raises(ValueError, match="non-finite.*row 37"):
        vindex.build_index(db, "hnsw")


def test_bad_queries_raise():
    rng = np.random.default_rng(12)
    index = vindex.build_index(unit_rows(rng, 100, 32), "flat")
    with pytest.raises(ValueError, match="dimension 16 but the index has dimension 32"):
        vindex.search(index, unit_rows(rng, 3, 16), 5)
    with pytest.raises(ValueError, match="2-D"):
        vindex.search(index, unit_rows(rng, 1, 32)[0], 5)
    q = unit_rows(rng, 3, 32)
    q[1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        vindex.search(index, q, 5)
    with pytest.raises(ValueError, match="float32"):
        vindex.search(index, unit_rows(rng, 3, 32).astype(np.float64), 5)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            vindex.search(index, unit_rows(rng, 3, 32), k)


def test_index_kind_rejects_foreign_index():
    l2 = faiss.IndexFlatL2(8)
    with pytest.raises(ValueError):
        vindex.index_kind(l2)


# ----------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", vindex.INDEX_KINDS)
def test_save_load_roundtrip(tmp_path, kind):
    rng = np.random.default_rng(13)
    db, q = clustered(rng, 2000, d=32), clustered(rng, 50, d=32)
    index = vindex.build_index(db, kind, seed=3)
    vindex.set_search_params(index, nprobe=7, ef_search=33)
    scores, ids = vindex.search(index, q, 10)
    path = tmp_path / "map.faiss"
    vindex.save_index(index, path)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no temporary left behind
    loaded = vindex.load_index(path)
    assert vindex.index_kind(loaded) == kind and loaded.ntotal == 2000 and loaded.d == 32
    if kind == "ivfpq":
        assert loaded.nprobe == 7
    if kind == "hnsw":
        assert loaded.hnsw.efSearch == 33
    scores2, ids2 = vindex.search(loaded, q, 10)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)


def test_load_missing_file_raises_map_error(tmp_path):
    path = tmp_path / "nope.faiss"
    with pytest.raises(MapError, match="not found") as exc:
        vindex.load_index(path)
    assert str(path) in str(exc.value)


def test_load_garbage_file_raises_map_error(tmp_path):
    path = tmp_path / "garbage.faiss"
    path.write_bytes(b"this is not a faiss index\n" * 10)
    with pytest.raises(MapError) as exc:
        vindex.load_index(path)
    assert str(path) in str(exc.value)


def test_load_empty_or_truncated_file_raises_map_error(tmp_path):
    rng = np.random.default_rng(14)
    good = tmp_path / "good.faiss"
    vindex.save_index(vindex.build_index(unit_rows(rng, 300, 16), "flat"), good)
    data = good.read_bytes()
    for name, content in (("empty.faiss", b""), ("truncated.faiss", data[: len(data) // 2])):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MapError) as exc:
            vindex.load_index(path)
        assert str(path) in str(exc.value)


def test_load_directory_raises_map_error(tmp_path):
    with pytest.raises(MapError, match="not a file"):
        vindex.load_index(tmp_path)


def test_load_foreign_index_raises_map_error(tmp_path):
    path = tmp_path / "l2.faiss"
    l2 = faiss.IndexFlatL2(8)
    l2.add(np.eye(8, dtype=np.float32))
    faiss.write_index(l2, str(path))
    with pytest.raises(MapError, match="unsupported"):
        vindex.load_index(path)


def test_save_to_missing_directory_raises_map_error(tmp_path):
    rng = np.random.default_rng(15)
    index = vindex.build_index(unit_rows(rng, 10, 8), "flat")
    with pytest.raises(MapError, match="cannot write"):
        vindex.save_index(index, tmp_path / "no" / "such" / "dir" / "map.faiss")
