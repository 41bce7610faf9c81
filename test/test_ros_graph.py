"""Real ROS 2 graph tests (rclpy from PyPI): attention_node + vpr_localizer in one process.

A small real map (even Lund frames, EXIF GPS, VGG16 at 160x120, NetVLAD K=16) is built into a
temporary directory; the 15 odd frames are packed into a rosbag2 and replayed through
``attention_node`` -> ``vpr_localizer``; every published pose must equal the offline result
(``encoder_for_map`` + ``Localizer.localize`` on the same image files). Further tests feed bad
input to both nodes and start ``vpr-localizer run`` with a missing map.

Every test uses its own random ``ROS_DOMAIN_ID`` with localhost-only discovery, and shuts its
graph down (executor before context) so that the process exits cleanly.
"""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

IMAGE_SIZE = (160, 120)   # network input W, H: small, the machine has 2 slow cores
CLUSTERS = 16
BAG_RATE_HZ = 2.0
# The camera subscription keeps only the newest frame; a frame is dropped when two arrive while
# one is encoded. Encoding a 1024x768 frame at 160x120 takes 0.1-0.7 s on a loaded 2-core CPU,
# so frames are replayed 1 s apart (2 Hz bag at rate 0.5), leaving a wide margin.
REPLAY_RATE = 0.5
IMAGE_TOPIC = "/camera/image_raw"
VGG16_WEIGHTS = "vgg16_features_imagenet_caffe_bgr.pth"


def wait_for(cond, timeout: float, period: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(period)
    return bool(cond())


@pytest.fixture
def ros_env(monkeypatch):
    """A random ROS_DOMAIN_ID (0..101) and localhost-only discovery for this test."""
    domain = random.SystemRandom().randint(0, 101)
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return domain


@pytest.fixture(scope="module")
def lund(datasets_dir, weights_dir, data_file, tmp_path_factory):
    """Map of the even Lund frames, bag of the odd ones, and the offline localisation of the odd ones."""
    from vpr_localizer.io import bags
    from vpr_localizer.models.encoder import Encoder, EncoderConfig
    from vpr_localizer.localization.localize import Localizer, LocalizerConfig, encoder_for_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.io.records import load_records

    weights = data_file(weights_dir / VGG16_WEIGHTS)
    images = datasets_dir / "lund_gps"
    tmp = tmp_path_factory.mktemp("ros_graph")
    map_recs = load_records(str(images), gps="exif", parity="even")
    query_recs = load_records(str(images), gps="exif", parity="odd")
    assert len(map_recs) == 14 and len(query_recs) == 15
    cfg = EncoderConfig(backbone="vgg16", weights=str(weights), image_size=IMAGE_SIZE, num_clusters=CLUSTERS,
                        device="cpu")
    build_map(map_recs, Encoder(cfg), str(tmp / "map"), progress=False)
    bag = bags.make_bag(query_recs, str(tmp / "bag"), rate_hz=BAG_RATE_HZ, storage="sqlite3",
                        image_topic=IMAGE_TOPIC, progress=False)
    assert bag["images_written"] == 15
    # header stamp of each bag image -> index into query_recs (images are written in order)
    stamps = [(int(m.header.stamp.sec), int(m.header.stamp.nanosec))
              for _, _, _, m in bags.read_bag(bag["path"], topics=[IMAGE_TOPIC])]
    assert len(set(stamps)) == 15

    params = yaml.safe_load((REPO_ROOT / "config" / "lund_graph.yaml").read_text())
    vmap = VprMap.load(str(tmp / "map"))
    encoder = encoder_for_map(vmap, device="cpu", batch_size=1)  # one image per pass, as the node
    res = encoder.encode_paths([r.path for r in query_recs])
    assert res.ok == list(range(15))
    loc_cfg = LocalizerConfig.from_dict(params["vpr_localizer"]["ros__parameters"]["localizer"])
    estimates = Localizer(vmap, loc_cfg).localize(res.descriptors)
    return SimpleNamespace(map=str(tmp / "map"), bag=bag["path"], records=query_recs, stamps=stamps,
                           descriptors=res.descriptors, estimates=estimates, params=params, encoder=encoder)


RELIABLE_IMAGE = {"qos_overrides": {"/image": {"subscription": {"reliability": "reliable", "depth": 10}}}}


def write_params(lund, path: Path, attention=None, localizer=None, nodes=("attention_node", "vpr_localizer")) -> str:
    """config/lund_graph.yaml with map_path set to the test map (and overrides), written to ``path``."""
    doc = {}
    for name, extra in (("attention_node", attention), ("vpr_localizer", localizer)):
        if name in nodes:
            p = dict(lund.params[name]["ros__parameters"])
            p.update({"map_path": lund.map}, **(extra or {}))
            if name == "attention_node":
                p["device"] = "cpu"
            doc[name] = {"ros__parameters": p}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


class Probe:
    """A test node in the graph's context: records what the graph publishes, keyed by stamp."""

    def __init__(self, graph, namespace: str = ""):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from sensor_msgs.msg import Image, NavSatFix

        from vpr_ros.qos import reliable_qos

        self.graph = graph
        self.node = rclpy.create_node("test_probe", context=graph.context)
        self.lock = threading.Lock()
        self.poses, self.fixes, self.descriptors, self.diagnostics = {}, {}, {}, []
        qos = reliable_qos(depth=50)

        def keep(store):
            def cb(msg):
                key = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
                with self.lock:
                    store.setdefault(key, []).append(msg)
            return cb

        def diag(msg):
            with self.lock:
                self.diagnostics.extend(msg.status)

        self.subs = [
            self.node.create_subscription(PoseWithCovarianceStamped, "vpr/pose", keep(self.poses), qos),
            self.node.create_subscription(NavSatFix, "vpr/fix", keep(self.fixes), qos),
            self.node.create_subscription(Image, "vpr/descriptor", keep(self.descriptors), qos),
            self.node.create_subscription(DiagnosticArray, "diagnostics", diag, qos),
        ]
        graph.executor.add_node(self.node)

    def count(self, store) -> int:
        with self.lock:
            return len(store)

    def close(self) -> None:
        self.graph.executor.remove_node(self.node)
        self.node.destroy_node()


def encode_in_fresh_thread(encoder, rgb: np.ndarray) -> np.ndarray:
    """``encoder.encode_images([rgb])`` in a new thread, as the node's worker runs it.

    The vpr_localizer node calls ``faiss.omp_set_num_threads(faiss_threads)`` in the thread that
    constructs it (here the test's main thread); FAISS and torch share OpenMP, so torch in the
    main thread then runs single-threaded and sums in another order (descriptors differ by
    ~1e-6). A fresh thread has OpenMP's default thread count, like the node's worker.
    """
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("d", encoder.encode_images([rgb])))
    t.start()
    t.join()
    return out["d"]


def last_status(probe: Probe, name: str) -> dict:
    """Key/values of the newest diagnostics status named ``name`` ({} when none yet)."""
    with probe.lock:
        sts = [s for s in probe.diagnostics if s.name == name]
    return {kv.key: kv.value for kv in sts[-1].values} if sts else {}


def test_node_encode_equals_offline_encoder(lund):
    """The node's single backbone pass gives exactly Encoder.encode_images (any input size)."""
    from attention_node.node import attention_heatmap, patch_descriptors
    from vpr_localizer.io.image_files import load_image, resize_image

    rgb = resize_image(load_image(lund.records[0].path), (333, 250))  # not the network size
    enc = lund.encoder
    feats = enc.feature_maps(np.stack([resize_image(rgb, enc.config.image_size)]))
    desc = enc.apply_pca(enc.aggregate(feats))
    np.testing.assert_array_equal(desc, enc.encode_images([rgb]))
    heat = attention_heatmap(feats[0], (333, 250))
    assert heat.shape == (250, 333, 3) and heat.dtype == np.uint8
    patches = patch_descriptors(feats[0])
    c, h, w = feats[0].shape
    assert patches.shape == (h * w, c)
    np.testing.assert_allclose(np.linalg.norm(patches, axis=1), 1.0, atol=1e-5)


def test_replayed_bag_gives_offline_poses(lund, ros_env, tmp_path):
    from vpr_ros.graph import Graph
    from vpr_ros.replay import replay_bag

    # Lossless on purpose: a reliable replay into a subscription whose standard QoS override asks
    # for reliability (the default sensor-data QoS may lose frames on a loaded machine).
    graph = Graph(write_params(lund, tmp_path / "params.yaml", attention=RELIABLE_IMAGE))
    probe = None
    try:
        assert graph.names == ["attention_node", "vpr_localizer"]
        probe = Probe(graph)
        t0 = time.monotonic()
        stats = replay_bag(probe.node, lund.bag, rate=REPLAY_RATE, topics=[IMAGE_TOPIC],
                           remap={IMAGE_TOPIC: "image"}, start_delay_s=2.0, reliable=True)
        assert stats.published == {IMAGE_TOPIC: 15}
        assert wait_for(lambda: probe.count(probe.poses) >= 15, timeout=60.0), \
            f"only {probe.count(probe.poses)} of 15 poses within 60 s"
        time.sleep(0.5)  # would catch a duplicate
        elapsed = time.monotonic() - t0
        att = graph.node("attention_node").worker.stats
        loc = graph.node("vpr_localizer").worker.stats
        assert (att.received, att.processed, att.dropped, att.errors) == (15, 15, 0, 0), att
        assert (loc.processed, loc.dropped, loc.errors) == (15, 0, 0), loc

        with probe.lock:
            poses, fixes, descs = dict(probe.poses), dict(probe.fixes), dict(probe.descriptors)
        assert sorted(poses) == sorted(lund.stamps)
        for i, key in enumerate(lund.stamps):
            est = lund.estimates[i]
            assert len(poses[key]) == 1, f"query {lund.records[i].name}: {len(poses[key])} poses"
            assert len(descs[key]) == 1 and len(fixes[key]) == 1
            d = np.frombuffer(bytes(descs[key][0].data), "<f4").reshape(1, -1)
            # bit-identical in practice; a tolerance in case torch ran concurrently in another thread
            np.testing.assert_allclose(d, lund.descriptors[i:i + 1], rtol=0, atol=1e-6)
            m = poses[key][0]
            assert m.header.frame_id == "map"
            p = m.pose.pose.position
            assert abs(p.x - est.x) <= 1e-3 and abs(p.y - est.y) <= 1e-3, (lund.records[i].name, p, est)
            cov = np.asarray(m.pose.covariance).reshape(6, 6)[:2, :2]
            np.testing.assert_allclose(cov, est.covariance_xy, rtol=1e-6, atol=1e-9)
            f = fixes[key][0]
            assert abs(f.latitude - est.lat) <= 1e-8 and abs(f.longitude - est.lon) <= 1e-8
        diag = last_status(probe, "attention_node")
        assert diag, "no diagnostics from attention_node"
        for k in ("decode_ms", "encode_ms", "publish_ms"):
            assert float(diag[k]) >= 0.0
        assert int(diag["errors"]) == 0 and int(diag["dropped"]) == 0
        print(f"\n15 frames through attention_node -> vpr_localizer in {elapsed:.1f} s; "
              f"attention_node last frame {1e3 * att.last_seconds:.0f} ms")
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()


def _image(encoding, height, width, step, data, stamp_s):
    from sensor_msgs.msg import Image

    from vpr_ros.convert import sec_to_stamp

    m = Image()
    m.header.stamp = sec_to_stamp(stamp_s)
    m.header.frame_id = "camera"
    m.encoding, m.height, m.width, m.step = encoding, height, width, step
    m.data = bytes(data)
    return m


def test_bad_input_is_logged_and_dropped(lund, ros_env, tmp_path, capfd):
    """Bad camera frames and a NaN descriptor are logged and dropped; the next good one works."""
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image

    from attention_node.node import AttentionNode
    from vpr_localizer.io.image_files import load_image, resize_image
    from vpr_localizer.io.image_msgs import compressed_to_rgb, rgb_to_compressed
    from vpr_ros.convert import descriptor_to_msg, rgb_to_image_msg, sec_to_stamp
    from vpr_ros.graph import Graph
    from vpr_ros.qos import reliable_qos, sensor_qos
    from std_msgs.msg import Header

    graph = Graph(write_params(lund, tmp_path / "params.yaml",
                               attention={"use_labels": True, "labels_wait_s": 0.2,
                                          "publish_patch_descriptors": True}))
    probe = cmp = None
    try:
        # a second attention node, in namespace /cmp, on sensor_msgs/CompressedImage
        cmp = AttentionNode(context=graph.context, namespace="cmp", parameter_overrides=[
            Parameter("map_path", value=lund.map), Parameter("device", value="cpu"),
            Parameter("compressed", value=True), Parameter("publish_attention", value=False)])
        graph.executor.add_node(cmp)
        probe = Probe(graph)
        att, loc = graph.node("attention_node"), graph.node("vpr_localizer")
        cmp_descs = {}
        probe.subs.append(probe.node.create_subscription(
            Image, "/cmp/vpr/descriptor",
            lambda m: cmp_descs.setdefault((m.header.stamp.sec, m.header.stamp.nanosec), m), reliable_qos()))
        pub_img = probe.node.create_publisher(Image, "image", sensor_qos(depth=5))
        pub_cmp = probe.node.create_publisher(CompressedImage, "/cmp/image/compressed", sensor_qos(depth=5))
        pub_lab = probe.node.create_publisher(Image, "segmentation/labels", reliable_qos())
        pub_desc = probe.node.create_publisher(Image, "vpr/descriptor", reliable_qos())
        assert wait_for(lambda: all(p.get_subscription_count() >= 1 for p in (pub_img, pub_cmp, pub_lab, pub_desc))
                        and probe.node.count_publishers("vpr/pose") >= 1, timeout=15.0), "discovery"

        def settle(worker, errors, received):
            assert wait_for(lambda: worker.stats.received >= received and worker.idle()
                            and worker.stats.errors == errors, timeout=30.0), worker.stats

        bad = [_image("weird16", 4, 4, 8, b"\0" * 32, 100.0),        # unsupported encoding
               _image("rgb8", 10, 10, 30, b"\0" * 100, 100.1),       # width*height*3 != data length
               _image("rgb8", 0, 0, 0, b"", 100.2)]                  # zero size
        for n, msg in enumerate(bad, start=1):
            pub_img.publish(msg)
            settle(att.worker, n, n)
        pub_cmp.publish(CompressedImage(header=Header(stamp=sec_to_stamp(100.3)), format="jpeg",
                                        data=b"\xff\xd8\xff\xe0\x00\x10JFIF corrupt"))
        settle(cmp.worker, 1, 1)

        # good frames: labels first (same stamp), then the image; the compressed node gets a JPEG
        rgb = resize_image(load_image(lund.records[3].path), (320, 240))
        good = rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(101.0), frame_id="camera"))
        labels = rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(101.0)), encoding="mono8")
        pub_lab.publish(labels)
        time.sleep(0.2)
        pub_img.publish(good)
        key = (101, 0)
        assert wait_for(lambda: key in probe.poses, timeout=30.0), "no descriptor/pose for the good frame"
        fmt, jpeg = rgb_to_compressed(rgb, "jpeg", 95)
        pub_cmp.publish(CompressedImage(header=Header(stamp=sec_to_stamp(101.0)), format=fmt, data=jpeg))
        assert wait_for(lambda: key in cmp_descs, timeout=30.0), "no descriptor for the good compressed frame"
        # one frame at a time, so no concurrent torch work: equal to the offline encoder
        d = np.frombuffer(bytes(probe.descriptors[key][0].data), "<f4").reshape(1, -1)
        np.testing.assert_allclose(d, encode_in_fresh_thread(att.encoder, rgb), rtol=0, atol=1e-6)
        dc = np.frombuffer(bytes(cmp_descs[key].data), "<f4").reshape(1, -1)
        np.testing.assert_allclose(dc, encode_in_fresh_thread(cmp.encoder, compressed_to_rgb(fmt, jpeg)),
                                   rtol=0, atol=1e-6)
        assert att.worker.stats.errors == 3 and cmp.worker.stats.errors == 1
        assert att.labelled_frames == 1 and att.unlabelled_frames == 0
        assert wait_for(lambda: last_status(probe, "attention_node").get("labelled_frames") == "1", 10.0)
        diag = last_status(probe, "attention_node")
        assert diag["errors"] == "3" and diag["received"] == "4"

        # a good frame without labels: encoded after labels_wait_s, counted as unlabelled
        pub_img.publish(rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(102.0), frame_id="camera")))
        assert wait_for(lambda: (102, 0) in probe.poses, timeout=30.0)
        assert att.labelled_frames == 1 and att.unlabelled_frames == 1

        # vpr_localizer: a NaN descriptor is logged and dropped, the next good one gives a pose
        errors0, received0 = loc.worker.stats.errors, loc.worker.stats.received
        nan = np.full((1, lund.descriptors.shape[1]), np.nan, np.float32)
        pub_desc.publish(descriptor_to_msg(nan, Header(stamp=sec_to_stamp(200.0), frame_id="camera")))
        settle(loc.worker, errors0 + 1, received0 + 1)
        pub_desc.publish(descriptor_to_msg(lund.descriptors[:1], Header(stamp=sec_to_stamp(201.0), frame_id="camera")))
        assert wait_for(lambda: (201, 0) in probe.poses, timeout=15.0), "no pose after the NaN descriptor"
        assert (200, 0) not in probe.poses
        p = probe.poses[(201, 0)][0].pose.pose.position
        assert abs(p.x - lund.estimates[0].x) <= 1e-3 and abs(p.y - lund.estimates[0].y) <= 1e-3
        assert loc.worker.stats.errors == errors0 + 1

        # every problem was logged (rcutils logs to stderr)
        err = capfd.readouterr().err
        for needle in ("unsupported image encoding 'weird16'", "data length 100 bytes", "zero size",
                       "compressed image (jpeg", "NaN"):
            assert needle in err, f"{needle!r} not logged; stderr:\n{err[-3000:]}"
    finally:
        if cmp is not None:
            graph.executor.remove_node(cmp)
            cmp.destroy_node()
        if probe is not None:
            probe.close()
        graph.shutdown()


@pytest.mark.parametrize("node", ["vpr_localizer", "attention_node"])
def test_run_with_missing_map_exits_2(node, ros_env, tmp_path):
    missing = tmp_path / "no_such_map"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({node: {"ros__parameters": {"map_path": str(missing)}}}))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vpr_localizer.cli.main", "run", "--params", str(params)],
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if str(missing) in ln]
    assert len(lines) == 1 and "cannot start" in lines[0] and "map not found" in lines[0], out
    assert time.monotonic() - t0 < 90
