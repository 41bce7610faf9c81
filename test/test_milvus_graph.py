"""The Milvus index backend in the ROS 2 graph (real rclpy, milvus-lite ``.db`` file, real Lund data).

(a) ``vpr_localizer`` with ``index.backend: milvus`` (the Lund map exported to a collection)
    publishes the same poses as with FAISS for the 15 query descriptors;
(b) ``index.prior_box_m``: the poses equal an offline box-restricted search around the previous
    estimate (falling back to the full search when the box has no candidate at the loop-closure
    threshold), on both backends; a far-away kidnap is a counted relocalisation search;
(c) ``map_builder`` (robot_a) appends keyframes to the collection a ``vpr_localizer`` (robot_b)
    searches: the localizer's next query finds the new keyframe (pose on its position) and
    publishes a ``vpr/loop_closure_robot`` candidate naming robot_a.

The descriptors are published on ``vpr/descriptor`` one at a time, each waited for (no sleeps).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus + milvus-lite (requirements.txt)")

from conftest import graph_probe, wait_for, write_params  # noqa: E402

pytestmark = pytest.mark.integration

COLLECTION = "lund_map"
PRIOR_BOX_M = 8.0   # small enough to change a pose (frame 2: 4.3 m) against the unrestricted search


@pytest.fixture(scope="module")
def milvus(lund, tmp_path_factory):
    """A milvus-lite file holding the Lund map as collection ``lund_map`` (robot_id robot_b)."""
    from vpr_localizer.mapping.milvus_index import connect, export_map_to_milvus

    db = str(tmp_path_factory.mktemp("milvus_graph") / "vpr.db")
    client = connect(db)
    idx = export_map_to_milvus(lund.map, client, COLLECTION, robot_id="robot_b")
    assert idx.ntotal == 14
    yield {"db": db, "client": client}
    client.close()


def _localizer_params(milvus, backend: str, **index) -> dict:
    p = {"index": {"backend": backend, **index}, "robot_id": "robot_b"}
    if backend == "milvus":
        p["index"].update(milvus_uri=milvus["db"], collection=index.get("collection", COLLECTION))
    return p


def _publish_descriptors(lund, tmp_path, localizer: dict, frames, name: str):
    """vpr_localizer alone; descriptors of ``frames`` (query indices) published 1 s apart, each
    pose waited for. Returns (pose messages, vpr_localizer diagnostics, node)."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from vpr_ros.convert import descriptor_to_msg, sec_to_stamp
    from vpr_ros.graph import Graph
    from vpr_ros.qos import reliable_qos

    graph = Graph(write_params(lund, tmp_path / f"{name}.yaml", localizer=localizer, nodes=("vpr_localizer",)),
                  names=["vpr_localizer"])
    probe = None
    try:
        probe = graph_probe(graph)
        node = graph.node("vpr_localizer")
        pub = probe.node.create_publisher(Image, "vpr/descriptor", reliable_qos())
        assert wait_for(lambda: pub.get_subscription_count() >= 1 and probe.node.count_publishers("vpr/pose") >= 1,
                        timeout=15.0), "discovery"
        for n, i in enumerate(frames):
            pub.publish(descriptor_to_msg(lund.descriptors[i:i + 1],
                                          Header(stamp=sec_to_stamp(1000.0 + n), frame_id="camera")))
            assert wait_for(lambda: probe.count("pose") == n + 1, timeout=15.0), f"{name}: no pose for frame {n}"
        assert wait_for(lambda: len(probe.statuses("vpr_localizer")) >= len(frames), timeout=10.0)
        return probe.messages("pose"), probe.statuses("vpr_localizer"), node
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()


def _xy(msg):
    p = msg.pose.pose.position
    return np.array([p.x, p.y])


def test_milvus_backend_same_poses_as_faiss(lund, milvus, ros_env, tmp_path):
    frames = list(range(15))
    runs = {b: _publish_descriptors(lund, tmp_path, _localizer_params(milvus, b), frames, b)
            for b in ("faiss", "milvus")}
    assert type(runs["milvus"][2].map.index).__name__ == "MilvusIndex"
    assert type(runs["faiss"][2].map.index).__name__ != "MilvusIndex"
    for (mf, mm, ref) in zip(runs["faiss"][0], runs["milvus"][0], lund.estimates):
        np.testing.assert_allclose(_xy(mm), _xy(mf), atol=1e-3)
        np.testing.assert_allclose(_xy(mm), [ref.x, ref.y], atol=1e-3)
        np.testing.assert_allclose(np.asarray(mm.pose.covariance), np.asarray(mf.pose.covariance),
                                   rtol=1e-4, atol=1e-5)
    for df, dm in zip(runs["faiss"][1], runs["milvus"][1]):
        assert df["best_keyframe"] == dm["best_keyframe"]
        assert (dm["prior_searches"], dm["relocalisation_searches"]) == ("0", "0")


def test_milvus_fingerprint_mismatch_is_fatal(lund, milvus, ros_env, tmp_path):
    from vpr_localizer.errors import FingerprintMismatchError
    from vpr_localizer.mapping.milvus_index import MilvusIndex
    from vpr_localizer.mapping.store import VprMap
    from vpr_ros.graph import Graph

    fp = dict(VprMap.load(lund.map).fingerprint, num_clusters=8)
    MilvusIndex.create(milvus["client"], "other_encoder", 16 * 512, fp, uri=milvus["db"], overwrite=True)
    params = write_params(lund, tmp_path / "bad.yaml", nodes=("vpr_localizer",),
                          localizer=_localizer_params(milvus, "milvus", collection="other_encoder"))
    with pytest.raises(FingerprintMismatchError, match="num_clusters: map 8 vs encoder 16"):
        Graph(params, names=["vpr_localizer"])


def _offline_prior(lund, index_map, frames, threshold: float, k: int):
    """The node's rule offline: box around the previous estimate, full search as fallback.
    Returns (estimates, relocalised flags)."""
    from vpr_localizer.localization.localize import Localizer, LocalizerConfig
    from vpr_localizer.mapping.box_search import search_near

    cfg = LocalizerConfig.from_dict(lund.params["vpr_localizer"]["ros__parameters"]["localizer"])
    loc = Localizer(index_map, cfg)
    prior, out, reloc = None, [], []
    for i in frames:
        q = lund.descriptors[i:i + 1]
        used = False
        if prior is not None:
            b = PRIOR_BOX_M
            s, ids = search_near(index_map, q, k, (prior[0] - b, prior[0] + b, prior[1] - b, prior[1] + b))
            ok = ids[0] >= 0
            if ok.any() and s[0][ok][0] >= threshold:
                est, used = loc.estimate(ids[0][ok][:cfg.top_k], s[0][ok][:cfg.top_k]), True
        if not used:
            s, ids = loc.retrieve(q, k)
            est = loc.estimate(ids[0][:cfg.top_k], s[0][:cfg.top_k])
        reloc.append(prior is not None and not used)
        out.append(est)
        prior = (est.x, est.y)
    return out, reloc


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_prior_box_and_relocalisation(lund, milvus, ros_env, tmp_path, backend):
    from vpr_localizer.mapping.box_search import search_near
    from vpr_localizer.mapping.milvus_index import MilvusIndex
    from vpr_localizer.mapping.store import VprMap

    vmap = VprMap.load(lund.map)
    threshold = lund.params["vpr_localizer"]["ros__parameters"]["loop_closure"]["score_threshold"]
    k = min(lund.params["vpr_localizer"]["ros__parameters"]["localizer"]["top_k"], len(vmap))
    # the route, then a kidnap back to the query frame farthest from the last one
    last = np.array([lund.estimates[14].x, lund.estimates[14].y])
    far = int(np.argmax([np.hypot(e.x - last[0], e.y - last[1]) for e in lund.estimates]))
    frames = list(range(15)) + [far]
    index_map = vmap
    if backend == "milvus":
        index_map = copy.copy(vmap)
        index_map.index = MilvusIndex.open(milvus["client"], COLLECTION, vmap.fingerprint, uri=milvus["db"])
    offline, reloc = _offline_prior(lund, index_map, frames, threshold, k)
    # the kidnap: far from the previous estimate, nothing in the box reaches the threshold
    prev = offline[-2]
    b = PRIOR_BOX_M
    s, ids = search_near(vmap, lund.descriptors[far:far + 1], k, (prev.x - b, prev.x + b, prev.y - b, prev.y + b))
    assert np.hypot(offline[-1].x - prev.x, offline[-1].y - prev.y) > 2 * b
    assert (ids[0] < 0).all() or s[0][ids[0] >= 0][0] < threshold
    assert reloc[-1]
    # the box changes something: some pose differs from the unrestricted search
    assert any(abs(e.x - r.x) > 1e-3 or abs(e.y - r.y) > 1e-3 for e, r in zip(offline, lund.estimates))

    poses, diags, node = _publish_descriptors(lund, tmp_path, _localizer_params(milvus, backend, prior_box_m=b),
                                              frames, f"prior_{backend}")
    assert len(poses) == len(frames)
    for n, (m, ref) in enumerate(zip(poses, offline)):
        np.testing.assert_allclose(_xy(m), [ref.x, ref.y], atol=1e-3, err_msg=f"frame {n}")
    for n, d in enumerate(diags[:len(frames)]):
        assert int(d["prior_searches"]) == n                      # every frame after the first
        assert int(d["relocalisation_searches"]) == sum(reloc[:n + 1])
        assert d["relocalised"] == str(reloc[n])
    assert diags[len(frames) - 1]["relocalised"] == "True"      # the kidnap
    # after relocalising, the pose is the full search's (the offline single-frame estimate)
    np.testing.assert_allclose(_xy(poses[-1]), [lund.estimates[far].x, lund.estimates[far].y], atol=1e-3)


def test_mapper_appends_and_localizer_finds_it(lund, milvus, ros_env, tmp_path, vgg_path):
    """map_builder (robot_a, checkpoint = the Lund map's encoder) maps two query frames with their
    GPS fixes into the collection vpr_localizer (robot_b, refresh every search) localises in."""
    import yaml
    from sensor_msgs.msg import Image, NavSatFix, NavSatStatus
    from std_msgs.msg import Header, String

    from vpr_localizer.io.image_files import load_image
    from vpr_localizer.localization.localize import Localizer, LocalizerConfig
    from vpr_localizer.mapping.milvus_index import MilvusIndex, export_map_to_milvus
    from vpr_localizer.mapping.store import Keyframe, VprMap
    from vpr_ros.convert import descriptor_to_msg, rgb_to_image_msg, sec_to_stamp
    from vpr_ros.graph import Graph
    from vpr_ros.qos import reliable_qos

    vmap = VprMap.load(lund.map)
    export_map_to_milvus(vmap, milvus["client"], "lund_multi", robot_id="robot_b")
    loc_params = _localizer_params(milvus, "milvus", collection="lund_multi", refresh_s=0.0)
    doc = yaml.safe_load(open(write_params(lund, tmp_path / "loc.yaml", localizer=loc_params,
                                           nodes=("vpr_localizer",))))
    qos = {t: {"subscription": {"reliability": "reliable", "depth": 10}} for t in ("/image", "/fix")}
    doc["map_builder"] = {"ros__parameters": {
        "map_path": str(tmp_path / "robot_a_map"), "position_source": "fix", "keyframe_distance": 2.0,
        "position_wait_s": 2.0, "flush_interval_s": 0.0, "milvus_uri": milvus["db"], "collection": "lund_multi",
        "robot_id": "robot_a", "qos_overrides": qos,
        "encoder": {"backbone": "vgg16", "weights": str(vgg_path), "image_size": [160, 120],
                    "num_clusters": 16, "pca_dim": 0, "device": "cpu", "batch_size": 1,
                    "checkpoint": f"{lund.map}/encoder.pt"}}}
    params = tmp_path / "graph.yaml"
    params.write_text(yaml.safe_dump(doc))
    mapped = [3, 10]          # query frames the mapper drives past (not in the Lund map)
    graph = Graph(str(params), names=["vpr_localizer", "map_builder"])
    probe = None
    try:
        probe = graph_probe(graph)
        probe.record("robot_loops", String, "vpr/loop_closure_robot")
        mapper = graph.node("map_builder")
        assert mapper.encoder.trained and mapper._milvus is not None  # checkpoint: collection checked at start
        pub_desc = probe.node.create_publisher(Image, "vpr/descriptor", reliable_qos())
        pub_img = probe.node.create_publisher(Image, "image", reliable_qos())
        pub_fix = probe.node.create_publisher(NavSatFix, "fix", reliable_qos())
        assert wait_for(lambda: min(p.get_subscription_count() for p in (pub_desc, pub_img, pub_fix)) >= 1
                        and probe.node.count_publishers("vpr/pose") >= 1, timeout=15.0), "discovery"

        def query(n, i):
            pub_desc.publish(descriptor_to_msg(lund.descriptors[i:i + 1],
                                               Header(stamp=sec_to_stamp(2000.0 + n), frame_id="camera")))
            assert wait_for(lambda: probe.count("pose") == n + 1, timeout=15.0), f"no pose for query {n}"
            assert wait_for(lambda: len(probe.statuses("vpr_localizer")) == n + 1, timeout=10.0)
            return probe.messages("pose")[-1], probe.statuses("vpr_localizer")[-1]

        before = [query(n, i) for n, i in enumerate(mapped)]    # the Lund map only
        assert all(int(d["best_keyframe"]) < 14 for _, d in before)
        for n, i in enumerate(mapped):
            rec, t = lund.records[i], 3000.0 + 10 * n
            fix = NavSatFix(header=Header(stamp=sec_to_stamp(t), frame_id="gps"), latitude=rec.lat,
                            longitude=rec.lon, altitude=rec.alt)
            fix.status.status = NavSatStatus.STATUS_FIX
            pub_fix.publish(fix)
            assert wait_for(lambda: mapper.positions.newest() is not None
                            and mapper.positions.newest().stamp == t, timeout=10.0), "fix"
            pub_img.publish(rgb_to_image_msg(load_image(rec.path), Header(stamp=sec_to_stamp(t), frame_id="camera")))
            assert wait_for(lambda: len(mapper.milvus_ids) == n + 1, timeout=30.0), \
                f"keyframe {n} not appended ({mapper.worker.stats}, {mapper.milvus_errors} milvus errors)"
        assert mapper.milvus_ids == [14, 15]
        after = [query(len(mapped) + n, i) for n, i in enumerate(mapped)]
        assert wait_for(lambda: probe.count("robot_loops") >= 2, timeout=10.0)
        robot_loops = [json.loads(m.data) for m in probe.messages("robot_loops")]
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()

    idx = MilvusIndex.open(milvus["client"], "lund_multi", vmap.fingerprint, uri=milvus["db"])
    rows = idx.fetch(ids=[14, 15], with_descriptors=False)
    assert list(rows["robot_id"]) == ["robot_a", "robot_a"]
    # the stored positions are the fixes in the Lund map's ENU frame
    for j, i in enumerate(mapped):
        rec = lund.records[i]
        e, n_, _ = vmap.datum.to_enu(rec.lat, rec.lon, rec.alt)
        assert abs(rows["x"][j] - e) < 1e-2 and abs(rows["y"][j] - n_) < 1e-2
    # the localizer's next query found the appended keyframe: its pose is on that keyframe
    ext = copy.copy(vmap)
    ext.keyframes = list(vmap.keyframes) + [Keyframe(id=14 + j, x=float(rows["x"][j]), y=float(rows["y"][j]),
                                                     z=float(rows["z"][j])) for j in range(2)]
    ext.index = idx
    cfg = LocalizerConfig.from_dict(lund.params["vpr_localizer"]["ros__parameters"]["localizer"])
    for j, (i, (msg, diag)) in enumerate(zip(mapped, after)):
        assert int(diag["best_keyframe"]) == 14 + j and float(diag["best_score"]) > 0.99
        assert int(diag["map_keyframes"]) == 16
        np.testing.assert_allclose(_xy(msg), [rows["x"][j], rows["y"][j]], atol=0.5)
        s, ids = idx.search(lund.descriptors[i:i + 1], 10)
        ref = Localizer(ext, cfg).estimate(ids[0], s[0])
        np.testing.assert_allclose(_xy(msg), [ref.x, ref.y], atol=1e-3)
    assert [(r["robot_id"], r["keyframe_id"]) for r in robot_loops] == [("robot_a", 14), ("robot_a", 15)]
    assert all(r["score"] > 0.99 and r["query_stamp"] >= 2000.0 for r in robot_loops)
    idx.close()


def test_mapper_created_collection_imports_as_a_map(lund, milvus, ros_env, tmp_path, vgg_path):
    """map_builder creates a new collection (it carries the encoder checkpoint), maps two frames;
    ``import_milvus_to_map`` rebuilds a map directory equal to the node's own map: same
    keyframe positions, bit-identical descriptors, same encoder fingerprint."""
    import yaml
    from sensor_msgs.msg import Image, NavSatFix, NavSatStatus
    from std_msgs.msg import Header

    from vpr_localizer.io.image_files import load_image
    from vpr_localizer.mapping.milvus_index import MilvusIndex, import_milvus_to_map, map_descriptors
    from vpr_localizer.mapping.store import VprMap
    from vpr_ros.convert import rgb_to_image_msg, sec_to_stamp
    from vpr_ros.graph import Graph
    from vpr_ros.qos import reliable_qos

    qos = {t: {"subscription": {"reliability": "reliable", "depth": 10}} for t in ("/image", "/fix")}
    own_map = tmp_path / "robot_a_map"
    doc = {"map_builder": {"ros__parameters": {
        "map_path": str(own_map), "position_source": "fix", "keyframe_distance": 2.0, "position_wait_s": 2.0,
        "flush_interval_s": 0.0, "milvus_uri": milvus["db"], "collection": "robot_a_new", "robot_id": "robot_a",
        "qos_overrides": qos,
        "encoder": {"backbone": "vgg16", "weights": str(vgg_path), "image_size": [160, 120], "num_clusters": 16,
                    "pca_dim": 0, "device": "cpu", "batch_size": 1, "checkpoint": f"{lund.map}/encoder.pt"}}}}
    params = tmp_path / "mapper.yaml"
    params.write_text(yaml.safe_dump(doc))
    assert not milvus["client"].has_collection("robot_a_new")
    graph = Graph(str(params), names=["map_builder"])
    probe = None
    try:
        probe = graph_probe(graph)
        mapper = graph.node("map_builder")
        pub_img = probe.node.create_publisher(Image, "image", reliable_qos())
        pub_fix = probe.node.create_publisher(NavSatFix, "fix", reliable_qos())
        assert wait_for(lambda: min(p.get_subscription_count() for p in (pub_img, pub_fix)) >= 1, timeout=15.0)
        for n, i in enumerate((3, 10)):
            rec, t = lund.records[i], 3000.0 + 10 * n
            fix = NavSatFix(header=Header(stamp=sec_to_stamp(t), frame_id="gps"), latitude=rec.lat,
                            longitude=rec.lon, altitude=rec.alt)
            fix.status.status = NavSatStatus.STATUS_FIX
            pub_fix.publish(fix)
            assert wait_for(lambda: mapper.positions.newest() is not None
                            and mapper.positions.newest().stamp == t, timeout=10.0), "fix"
            pub_img.publish(rgb_to_image_msg(load_image(rec.path), Header(stamp=sec_to_stamp(t), frame_id="camera")))
            assert wait_for(lambda: len(mapper.milvus_ids) == n + 1, timeout=30.0), \
                f"keyframe {n} not appended ({mapper.worker.stats}, {mapper.milvus_errors} milvus errors)"
        assert mapper.milvus_ids == [0, 1]
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()
    idx = MilvusIndex.open(milvus["client"], "robot_a_new", None, uri=milvus["db"])
    assert idx.has_encoder_checkpoint()
    idx.close()
    out = import_milvus_to_map(milvus["client"], "robot_a_new", str(tmp_path / "imported"))
    assert out["rows"] == 2 and not out["renumbered"]
    imported, own = VprMap.load(out["map"]), VprMap.load(str(own_map))
    assert imported.fingerprint == own.fingerprint
    assert len(imported) == len(own) == 2
    np.testing.assert_array_equal(map_descriptors(imported.index), map_descriptors(own.index))
    for a, b in zip(imported.keyframes, own.keyframes):
        assert (a.id, a.stamp) == (b.id, b.stamp)
        np.testing.assert_allclose([a.x, a.y, a.z, a.lat, a.lon], [b.x, b.y, b.z, b.lat, b.lon], rtol=0, atol=1e-9)
