"""The Milvus index backend (milvus-lite, an embedded ``.db`` file; no network) on a real map.

One map is built per module through ``vpr-localizer build-map`` from the 14 even lund_gps frames
(EXIF GPS, VGG16 at 160x120, NetVLAD K=16); the 15 odd frames are the queries.  The map is
exported to a milvus-lite collection and checked against FAISS flat: the same top-k ids and
scores (1e-5), the same localisations, the fingerprint check, box-restricted search on both
backends, persistence across clients, other Milvus index types and the ``map-export`` CLI.

Round trip (``import_milvus_to_map`` / ``map-import``): map directory -> collection -> map
directory gives the same keyframes (every field, NaN kept), descriptors, encoder checkpoint,
fingerprint, datum and localisations, on the Lund map (GPS, datum, NaN stamps) and on a
Gardens Point night map (place / sequence / condition tags, NaN positions, no datum); a fleet
collection with gaps or a robot filter is renumbered; a tampered or incomplete encoder
checkpoint is refused.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
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
from vpr_localizer.mapping.milvus_index import (ENCODER_CHUNK_BYTES, MilvusIndex, box_filter_expr,  # noqa: E402
                                                connect, drop_map_collection, encoder_collection_name,
                                                export_map_to_milvus, import_milvus_to_map,
                                                map_descriptors, use_milvus_index)
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
    np.testing.assert_array_equal(rows["x"], pos[:, 0])  # DOUBLE columns: exact
    np.testing.assert_array_equal(rows["y"], pos[:, 1])
    for name in ("stamp", "z", "qx", "qy", "qz", "qw", "lat", "lon", "alt", "frame", "image_path"):
        np.testing.assert_array_equal(rows[name], [getattr(k, name) for k in lund.vmap.keyframes])
    assert np.isnan(rows["stamp"]).all() and (rows["frame"] == MAP_FRAMES).all()
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


# ---------------------------------------------------------------------------------------------
# map directory -> collection -> map directory
# ---------------------------------------------------------------------------------------------

def _same_value(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_same_keyframes(got, want):
    """Every field of every keyframe equal (NaN == NaN), types included."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for f in dataclasses.fields(w):
            a, b = getattr(g, f.name), getattr(w, f.name)
            assert type(a) is type(b) and _same_value(a, b), (w.id, f.name, a, b)


def assert_same_checkpoint(a, b, path="ckpt"):
    import torch

    if isinstance(b, dict):
        assert isinstance(a, dict) and sorted(a) == sorted(b), path
        for key in b:
            assert_same_checkpoint(a[key], b[key], f"{path}.{key}")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_checkpoint(x, y, f"{path}[{i}]")
    elif isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert type(a) is type(b) and _same_value(a, b), path


def test_round_trip_lund_map_identical(lund, client, tmp_path, datasets_dir, data_file):
    export_map_to_milvus(lund.map_dir, client, "lund_rt", robot_id="robot_a").close()
    info = import_milvus_to_map(client, "lund_rt", tmp_path / "imported")
    assert info["rows"] == len(MAP_FRAMES) and info["renumbered"] is False and info["dim"] == lund.vmap.index.d
    back = VprMap.load(str(tmp_path / "imported"))  # sizes + SHA-256 of every file checked
    orig = lund.vmap
    assert_same_keyframes(back.keyframes, orig.keyframes)
    assert back.keyframes[0].frame == 2 and math.isnan(back.keyframes[0].stamp) and back.keyframes[0].alt == 38.0
    np.testing.assert_array_equal(map_descriptors(back.index), map_descriptors(orig.index))
    assert type(back.index).__name__ == "IndexFlatIP"
    assert back.fingerprint == orig.fingerprint
    assert back.datum == orig.datum and back.meta["build"] == orig.meta["build"]
    assert back.meta["milvus_import"]["collection"] == "lund_rt"
    assert_same_checkpoint(back.encoder_checkpoint, orig.encoder_checkpoint)
    # identical top-k and localisations (same vectors in an exact index: bit-identical scores)
    k = len(MAP_FRAMES)
    s_o, i_o = Localizer(orig).retrieve(lund.queries, k)
    s_b, i_b = Localizer(back).retrieve(lund.queries, k)
    np.testing.assert_array_equal(i_b, i_o)
    np.testing.assert_array_equal(s_b, s_o)
    for a, b in zip(Localizer(orig).localize(lund.queries), Localizer(back).localize(lund.queries)):
        assert json.dumps(a.as_dict()) == json.dumps(b.as_dict())
    # the imported map needs no other file: its encoder (from the collection) encodes as the original
    paths = [str(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg")) for i in QUERY_FRAMES[:3]]
    enc = encoder_for_map(back, device="cpu")
    assert enc.fingerprint() == lund.fingerprint
    np.testing.assert_allclose(enc.encode_paths(paths).descriptors, lund.queries[:3], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def gardens_map(tmp_path_factory, datasets_dir, vgg_path):
    """Gardens Point night map (6 keyframes with place / sequence / condition tags, no positions)."""
    gp = datasets_dir / "gardens_point_mini"
    out = tmp_path_factory.mktemp("gardens_milvus") / "map"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in ["build-map", "--images", gp, "--csv", gp / "manifest.csv", "--condition",
                                    "night", "--out", out, "--weights", vgg_path, "--image-size", 160, 96,
                                    "--clusters", 16, "--device", "cpu"]])
    assert rc == 0
    return VprMap.load(str(out))


def test_round_trip_tagged_map_and_fleet_renumbering(gardens_map, lund, client, tmp_path, caplog):
    orig = gardens_map
    assert [k.condition for k in orig.keyframes] == ["night"] * 6
    assert [k.place_id for k in orig.keyframes] == ["0", "1", "2", "3", "8", "9"]
    assert all(math.isnan(k.x) for k in orig.keyframes) and orig.datum is None
    idx = export_map_to_milvus(orig, client, "gardens_fleet", robot_id="robot_g")
    import_milvus_to_map(client, "gardens_fleet", tmp_path / "plain")
    back = VprMap.load(str(tmp_path / "plain"))
    assert_same_keyframes(back.keyframes, orig.keyframes)
    np.testing.assert_array_equal(map_descriptors(back.index), map_descriptors(orig.index))
    assert back.datum is None and back.fingerprint == orig.fingerprint
    assert_same_checkpoint(back.encoder_checkpoint, orig.encoder_checkpoint)
    q = map_descriptors(orig.index)[::-1].copy()
    np.testing.assert_array_equal(Localizer(back).retrieve(q, 6)[1], Localizer(orig).retrieve(q, 6)[1])

    # VARCHAR limits are bytes: a 1025-byte tag (513 two-byte characters) is refused, nothing inserted
    with pytest.raises(ValueError, match="place_id longer than 1024 bytes"):
        idx.add(map_descriptors(orig.index)[:1], [dataclasses.replace(orig.keyframes[0], id=50, place_id="é" * 513)])
    assert idx.refresh() == 6
    # a second robot appends 3 keyframes with ids 100..102: gaps, and a robot filter
    x_b = map_descriptors(orig.index)[:3]
    kf_b = [dataclasses.replace(k, sequence="robot_b_run") for k in orig.keyframes[:3]]
    idx.add(x_b, kf_b, ids=[100, 101, 102], robot_id="robot_b")
    idx.close()
    caplog.set_level(logging.WARNING, logger="vpr_localizer.mapping.milvus_index")
    info = import_milvus_to_map(client, "gardens_fleet", tmp_path / "all")
    assert info["rows"] == 9 and info["renumbered"] is True
    assert "gaps in the collection's ids" in caplog.text and "renumbered 0..8" in caplog.text
    all_kf = VprMap.load(str(tmp_path / "all")).keyframes
    assert [k.id for k in all_kf] == list(range(9))
    assert_same_keyframes(all_kf[:6], orig.keyframes)
    assert_same_keyframes(all_kf[6:], [dataclasses.replace(k, id=6 + i) for i, k in enumerate(kf_b)])
    caplog.clear()
    info = import_milvus_to_map(client, "gardens_fleet", tmp_path / "robot_b", robot_id="robot_b")
    assert info["rows"] == 3 and info["renumbered"] is True and "robot_id 'robot_b' filter" in caplog.text
    rb = VprMap.load(str(tmp_path / "robot_b"))
    assert_same_keyframes(rb.keyframes, [dataclasses.replace(k, id=i) for i, k in enumerate(kf_b)])
    np.testing.assert_array_equal(map_descriptors(rb.index), x_b)
    with pytest.raises(MapError, match="no keyframes of robot 'robot_z'"):
        import_milvus_to_map(client, "gardens_fleet", tmp_path / "none", robot_id="robot_z")
    assert not (tmp_path / "none").exists()


def _one_line_map_error(fn) -> str:
    with pytest.raises(MapError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_tampered_or_missing_encoder_refused(lund, client, tmp_path):
    name = "lund_tamper"
    comp = encoder_collection_name(name)
    idx = export_map_to_milvus(lund.vmap, client, name)
    n_chunks = int(idx.properties["vpr.encoder_chunks"])
    size = int(idx.properties["vpr.encoder_bytes"])
    assert n_chunks == -(-size // ENCODER_CHUNK_BYTES) >= 2  # the Lund checkpoint spans several chunks
    assert client.has_collection(comp)
    out = tmp_path / "map"
    # one byte of chunk 1 changed (base64 still valid): the SHA-256 check refuses it
    row = client.get(comp, ids=[1], output_fields=["chunk", "dummy", "data"])[0]
    raw = bytearray(base64.b64decode(row["data"]))
    raw[100] ^= 0xFF
    client.upsert(comp, [{"chunk": 1, "dummy": [0.0, 0.0], "data": base64.b64encode(bytes(raw)).decode()}])
    msg = _one_line_map_error(lambda: import_milvus_to_map(client, name, out))
    assert f"encoder checkpoint corrupt in {comp!r}" in msg and f"{size} bytes" in msg
    # a chunk removed: incomplete
    client.delete(comp, ids=[n_chunks - 1])
    msg = _one_line_map_error(lambda: import_milvus_to_map(client, name, out))
    assert "encoder checkpoint incomplete" in msg and f"missing [{n_chunks - 1}]" in msg
    # the companion collection dropped: missing
    client.drop_collection(comp)
    msg = _one_line_map_error(lambda: import_milvus_to_map(client, name, out))
    assert f"no companion collection {comp!r}" in msg
    assert not out.exists()
    # a collection made without a checkpoint (as map_builder does) cannot be imported
    MilvusIndex.create(client, "no_encoder", 8, lund.fingerprint).close()
    msg = _one_line_map_error(lambda: import_milvus_to_map(client, "no_encoder", out))
    assert "holds no encoder checkpoint" in msg
    # overwrite re-creates the companion; drop_map_collection drops both
    export_map_to_milvus(lund.vmap, client, name, overwrite=True).close()
    assert client.has_collection(comp)
    import_milvus_to_map(client, name, out)
    assert drop_map_collection(client, name) is True
    assert not client.has_collection(name) and not client.has_collection(comp)


def test_map_import_cli(lund, client, tmp_path, capsys):
    export_map_to_milvus(lund.vmap, client, "lund_import_cli", robot_id="r9").close()
    out = tmp_path / "from_milvus"
    argv = ["map-import", "--milvus-uri", lund.db, "--collection", "lund_import_cli", "--out", out]
    assert main([str(a) for a in argv]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["rows"] == len(MAP_FRAMES) and line["map"] == str(out) and line["renumbered"] is False
    assert_same_keyframes(VprMap.load(str(out)).keyframes, lund.vmap.keyframes)
    assert main([str(a) for a in argv]) == 2  # the map exists: refused, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"vpr-localizer map-import: error: map already exists: {out} (use --overwrite)"
    assert main([str(a) for a in argv + ["--overwrite", "--robot-id", "r9"]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["robot_id"] == "r9"
    assert main([str(a) for a in ["map-import", "--milvus-uri", lund.db, "--collection", "nope", "--out",
                                  tmp_path / "x"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "not found" in err[0]
    missing_db = tmp_path / "missing.db"
    assert main([str(a) for a in ["map-import", "--milvus-uri", missing_db, "--collection", "lund", "--out",
                                  tmp_path / "y"]]) == 2
    assert capsys.readouterr().err.strip() == (f"vpr-localizer map-import: error: milvus-lite database not found: "
                                               f"{missing_db}")
    assert not missing_db.exists() and not (tmp_path / "y").exists()
