"""The Milvus index backend (milvus-lite, an embedded ``.db`` file; no network) on a real map.

One map is built per module through ``vpr-localizer build-map`` from the 14 even lund_gps frames
(EXIF GPS, VGG16 at 160x120, NetVLAD K=16); the 15 odd frames are the queries.  The map is
exported to a milvus-lite collection and checked against FAISS flat: the same top-k ids and
scores (1e-5), the same localisations, the fingerprint check, box-restricted search on both
backends, persistence across clients, other Milvus index types and the ``map-export`` CLI.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus + milvus-lite (requirements.txt)")

from vpr_localizer.cli.main import main  # noqa: E402
from vpr_localizer.errors import FingerprintMismatchError, MapError  # noqa: E402
from vpr_localizer.localization.localize import Localizer, encoder_for_map  # noqa: E402
from vpr_localizer.mapping.box_search import inside_box, search_near  # noqa: E402
from vpr_localizer.mapping.index import search  # noqa: E402
from vpr_localizer.mapping.milvus_index import (MilvusIndex, box_filter_expr, connect,  # noqa: E402
                                                export_map_to_milvus, map_descriptors, use_milvus_index)
from vpr_localizer.mapping.store import VprMap  # noqa: E402

MAP_FRAMES = tuple(range(2, 30, 2))
QUERY_FRAMES = tuple(range(1, 30, 2))
K = 5
COLLECTION = "lund_even"


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def lund(tmp_path_factory, datasets_dir, data_file, vgg_path):
    """The even-frame map (built by the CLI), the odd-frame query descriptors, a milvus-lite file."""
    root = tmp_path_factory.mktemp("lund_milvus")
    images = root / "map_images"
    images.mkdir()
    for i in MAP_FRAMES:
        shutil.copyfile(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg"), images / f"{i:02d}.jpg")
    map_dir = root / "map"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in ["build-map", "--images", images, "--gps", "exif", "--out", map_dir,
                                    "--weights", vgg_path, "--image-size", 160, 120, "--clusters", 16,
                                    "--device", "cpu"]])
    assert rc == 0
    vmap = VprMap.load(str(map_dir))
    enc = encoder_for_map(vmap, device="cpu")
    res = enc.encode_paths([str(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg")) for i in QUERY_FRAMES])
    assert len(res.ok) == len(QUERY_FRAMES)
    return SimpleNamespace(map_dir=map_dir, vmap=vmap, queries=np.ascontiguousarray(res.descriptors, np.float32),
                           fingerprint=enc.fingerprint(), db=str(root / "vpr.db"))


@pytest.fixture(scope="module")
def client(lund):
    """One milvus-lite client for the module (starting milvus-lite takes about a second)."""
    c = connect(lund.db)
    yield c
    c.close()


@pytest.fixture(scope="module")
def exported(lund, client):
    """The map exported to collection ``lund_even`` (FLAT, IP)."""
    return export_map_to_milvus(lund.vmap, client, COLLECTION, robot_id="robot_a")


def test_round_trip_same_top_k_as_faiss_flat(lund, exported):
    assert exported.ntotal == len(lund.vmap) == len(MAP_FRAMES)
    assert exported.d == lund.vmap.index.d
    assert exported.index_type == "FLAT"
    s_f, i_f = search(lund.vmap.index, lund.queries, K)
    s_m, i_m = search(exported, lund.queries, K)  # the index layer's search() accepts a MilvusIndex
    assert i_m.dtype == np.int64 and s_m.dtype == np.float32 and i_m.shape == (len(QUERY_FRAMES), K)
    np.testing.assert_array_equal(i_m, i_f)
    np.testing.assert_allclose(s_m, s_f, atol=1e-5)
    # more neighbours than keyframes: search() clamps to ntotal on both backends
    s_all, i_all = search(exported, lund.queries, 100)
    assert i_all.shape == (len(QUERY_FRAMES), len(MAP_FRAMES)) and (i_all >= 0).all()


def test_localizer_on_milvus_index_matches_faiss(lund, exported):
    faiss_loc = Localizer(lund.vmap)
    vmap_m = copy.copy(lund.vmap)
    vmap_m.index = exported
    milvus_loc = Localizer(vmap_m)
    ests_f, ests_m = faiss_loc.localize(lund.queries), milvus_loc.localize(lund.queries)
    assert len(ests_f) == len(ests_m) == len(QUERY_FRAMES)
    for a, b in zip(ests_f, ests_m):
        da, db = a.as_dict(), b.as_dict()
        assert da["top_ids"] == db["top_ids"] and da["best_id"] == db["best_id"]
        np.testing.assert_allclose(da["top_scores"], db["top_scores"], atol=1e-5)
        scalars = sorted(key for key, v in da.items() if isinstance(v, float))
        expected = pytest.approx({key: da[key] for key in scalars}, rel=1e-4, abs=1e-4, nan_ok=True)
        assert {key: db[key] for key in scalars} == expected  # covariances: float32 scores, rel 1e-5


def test_use_milvus_index_on_a_loaded_map(lund, exported, client):
    vmap = VprMap.load(str(lund.map_dir), verify_hashes=False)
    idx = use_milvus_index(vmap, client, COLLECTION)
    assert vmap.index is idx
    _, i_f = search(lund.vmap.index, lund.queries, K)
    np.testing.assert_array_equal(Localizer(vmap).retrieve(lund.queries, K)[1], i_f)
    with pytest.raises(FingerprintMismatchError):
        use_milvus_index(VprMap.load(str(lund.map_dir), verify_hashes=False), client, COLLECTION,
                         dict(lund.fingerprint, image_size=[320, 240]))


def test_stored_rows_equal_the_map(lund, exported):
    rows = exported.fetch()
    np.testing.assert_array_equal(rows["id"], np.arange(len(MAP_FRAMES)))
    np.testing.assert_array_equal(rows["descriptor"], map_descriptors(lund.vmap.index))
    pos = lund.vmap.positions
    np.testing.assert_array_equal(rows["x"], pos[:, 0].astype(np.float32))
    np.testing.assert_array_equal(rows["y"], pos[:, 1].astype(np.float32))
    np.testing.assert_array_equal(rows["lat"], [k.lat for k in lund.vmap.keyframes])
    assert set(rows["robot_id"]) == {"robot_a"}
    assert exported.fingerprint == json.loads(json.dumps(lund.vmap.fingerprint))
    assert exported.datum["lat"] == pytest.approx(lund.vmap.datum.lat)


def test_fingerprint_checked_on_open(lund, exported, client):
    ok = MilvusIndex.open(client, COLLECTION, lund.fingerprint)
    assert ok.ntotal == len(MAP_FRAMES)
    other = dict(lund.fingerprint, weights_sha256="0" * 64, num_clusters=8)
    with pytest.raises(FingerprintMismatchError) as err:
        MilvusIndex.open(client, COLLECTION, other)
    msg = str(err.value)
    assert COLLECTION in msg and "different encoder" in msg
    assert "num_clusters: map 16 vs encoder 8" in msg and "weights_sha256: map " in msg
    with pytest.raises(MapError, match="not found"):
        MilvusIndex.open(client, "no_such_collection", lund.fingerprint)
    with pytest.raises(MapError, match="already exists"):
        export_map_to_milvus(lund.vmap, client, COLLECTION)


def _box_around_half(vmap):
    """A box holding about half of the keyframes (those west of the median x, all y)."""
    pos = vmap.positions
    xmed = float(np.median(pos[:, 0]))
    return (float(pos[:, 0].min()) - 1.0, xmed, float(pos[:, 1].min()) - 1.0, float(pos[:, 1].max()) + 1.0)


def test_box_filtered_search_same_on_both_backends(lund, exported):
    box = _box_around_half(lund.vmap)
    inside = inside_box(lund.vmap.positions, box)
    assert 3 <= inside.sum() < len(MAP_FRAMES)
    k = 4
    s_f, i_f = search_near(lund.vmap, lund.queries, k, box)            # FAISS post-filter
    s_m, i_m = exported.search(lund.queries, k, box=box)               # Milvus filter expression
    vmap_m = copy.copy(lund.vmap)
    vmap_m.index = exported
    s_n, i_n = search_near(vmap_m, lund.queries, k, box)                # the same helper, Milvus index
    assert (i_f >= 0).all() and inside[i_f].all()
    np.testing.assert_array_equal(i_m, i_f)
    np.testing.assert_array_equal(i_n, i_f)
    np.testing.assert_allclose(s_m, s_f, atol=1e-5)
    # the box-restricted ranking is the unrestricted ranking with the outside keyframes removed
    _, i_all = search(lund.vmap.index, lund.queries, len(MAP_FRAMES))
    for row, full in zip(i_f, i_all):
        np.testing.assert_array_equal(row, full[inside[full]][:k])
    # more hits wanted than keyframes in the box: -1 / -inf padding on both backends
    s_f, i_f = search_near(lund.vmap, lund.queries, len(MAP_FRAMES), box)
    s_m, i_m = exported.search(lund.queries, len(MAP_FRAMES), box=box)
    np.testing.assert_array_equal(i_m, i_f)
    assert ((i_f >= 0).sum(axis=1) == inside.sum()).all() and np.isneginf(s_f[i_f < 0]).all()
    # an empty box: no hit at all
    far = (1e6, 1e6 + 1, 1e6, 1e6 + 1)
    assert (search_near(lund.vmap, lund.queries, k, far)[1] == -1).all()
    assert (exported.search(lund.queries, k, box=far)[1] == -1).all()


def test_box_errors(lund, exported):
    assert box_filter_expr((0, 1.5, -2, 3)) == "x >= 0.0 and x <= 1.5 and y >= -2.0 and y <= 3.0"
    for bad in [(1, 0, 0, 1), (0, 1, 0), (0, float("nan"), 0, 1)]:
        with pytest.raises(ValueError):
            exported.search(lund.queries, 3, box=bad)
        with pytest.raises(ValueError):
            search_near(lund.vmap, lund.queries, 3, bad)
    with pytest.raises(ValueError, match="positions"):
        search_near(lund.vmap.index, lund.queries, 3, (0, 1, 0, 1))  # a bare FAISS index has no positions
    with pytest.raises(ValueError, match="dimension"):
        exported.search(lund.queries[:, :10].copy(), 3)


def test_second_client_sees_the_data(lund, exported):
    with MilvusIndex.open(lund.db, COLLECTION, lund.fingerprint) as again:  # its own client
        assert again.ntotal == len(MAP_FRAMES)
        s, i = again.search(lund.queries, K)
    s_f, i_f = search(lund.vmap.index, lund.queries, K)
    np.testing.assert_array_equal(i, i_f)
    np.testing.assert_allclose(s, s_f, atol=1e-5)
    assert exported.search(lund.queries[:1], 1)[1][0, 0] == i_f[0, 0]  # the module client still works


@pytest.mark.parametrize("index_type,params,sparams", [("HNSW", {"M": 8, "efConstruction": 32}, {}),
                                                       ("IVF_FLAT", {"nlist": 2}, {"nprobe": 2})])
def test_other_index_types(lund, client, index_type, params, sparams):
    idx = export_map_to_milvus(lund.vmap, client, f"lund_{index_type.lower()}", index_type=index_type,
                               index_params=params, search_params=sparams)
    assert idx.index_type == index_type
    _, i_f = search(lund.vmap.index, lund.queries, 3)
    _, i_m = search(idx, lund.queries, 3)
    np.testing.assert_array_equal(i_m[:, 0], i_f[:, 0])  # 14 keyframes: the graph / 2 probed cells are exact


def test_ivf_pq_refused_on_milvus_lite(lund, client):
    with pytest.raises(ValueError, match="milvus-lite cannot build IVF_PQ"):
        export_map_to_milvus(lund.vmap, client, "lund_ivfpq", index_type="IVF_PQ", index_params={"nlist": 2})
    assert not client.has_collection("lund_ivfpq")


def test_map_export_cli(lund, client, capsys):
    argv = ["map-export", "--map", lund.map_dir, "--milvus-uri", lund.db, "--collection", "lund_cli",
            "--robot-id", "r2", "--index-type", "hnsw", "--index-param", "M=8", "--index-param", "efConstruction=40"]
    assert main([str(a) for a in argv]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["rows"] == len(MAP_FRAMES) and out["index_type"] == "HNSW" and out["collection"] == "lund_cli"
    assert main([str(a) for a in argv]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(a) for a in argv + ["--overwrite"]]) == 0
    idx = MilvusIndex.open(client, "lund_cli", lund.fingerprint)
    assert idx.ntotal == len(MAP_FRAMES) and set(idx.fetch(with_descriptors=False)["robot_id"]) == {"r2"}
