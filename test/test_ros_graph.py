"""Real ROS 2 graph tests (rclpy from PyPI): attention_node + vpr_localizer in one process.

A small real map (even Lund frames, EXIF GPS, VGG16 at 160x120, NetVLAD K=16) is built into a
temporary directory; the 15 odd frames are packed into a rosbag2 and replayed through
``attention_node`` -> ``vpr_localizer``; every published pose must equal the offline result
(``encoder_for_map`` + ``Localizer.localize`` on the same image files). Further tests feed bad
input to both nodes and start ``vpr-localizer run`` with a missing map.

Every test uses its own random ``ROS_DOMAIN_ID`` with localhost-only discovery (``conftest.ros_env``), and shuts its
graph down (executor before context) so that the process exits cleanly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from conftest import (RELIABLE_IMAGE, attention_has_labels, descriptor_of, graph_probe, in_fresh_thread, replay_lund,
                      wait_for, write_params)

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

def test_node_encode_equals_offline_encoder(lund, ros_env, tmp_path):
    """The attention node's own pass (its encoder, loaded from the map) gives exactly the offline
    Encoder.encode_images of the encoder that built the map (any input size)."""
    from attention_node.node import attention_heatmap, patch_descriptors
    from vpr_localizer.io.image_files import load_image, resize_image
    from vpr_ros.graph import Graph

    rgb = resize_image(load_image(lund.records[0].path), (333, 250))  # not the network size
    graph = Graph(write_params(lund, tmp_path / "params.yaml"), names=["attention_node"])
    try:
        node = graph.node("attention_node")
        assert node.encoder is not lund.encoder
        desc, feats = node.encode(rgb)
    finally:
        graph.shutdown()
    np.testing.assert_array_equal(desc, lund.encoder.encode_images([rgb]))
    heat = attention_heatmap(feats.image[0], (333, 250))
    assert heat.shape == (250, 333, 3) and heat.dtype == np.uint8
    patches = patch_descriptors(feats.image[0])
    c, h, w = feats.image[0].shape
    assert patches.shape == (h * w, c)
    np.testing.assert_allclose(np.linalg.norm(patches, axis=1), 1.0, atol=1e-5)


def test_replayed_bag_gives_offline_poses(lund, ros_env, tmp_path):
    from vpr_ros.graph import Graph

    # Lossless on purpose: a reliable replay into a subscription whose standard QoS override asks
    # for reliability (the default sensor-data QoS may lose frames on a loaded machine).
    graph = Graph(write_params(lund, tmp_path / "params.yaml", attention=RELIABLE_IMAGE))
    probe = None
    try:
        assert graph.names == ["attention_node", "vpr_localizer"]
        probe = graph_probe(graph)
        att_node, loc_node = replay_lund(graph, probe, lund)
        att, loc = att_node.worker.stats, loc_node.worker.stats
        # one pose per frame: a bounded 0.5 s wait in which no 16th pose (a duplicate) may arrive
        assert not wait_for(lambda: probe.count("pose") > 15, timeout=0.5), f"{probe.count('pose')} poses"
        assert (att.received, att.processed, att.dropped, att.errors) == (15, 15, 0, 0), att
        assert (loc.processed, loc.dropped, loc.errors) == (15, 0, 0), loc

        poses, fixes, descs = probe.by_stamp("pose"), probe.by_stamp("fix"), probe.by_stamp("descriptor")
        assert sorted(poses) == sorted(lund.stamps)
        for i, key in enumerate(lund.stamps):
            est = lund.estimates[i]
            assert len(poses[key]) == 1, f"query {lund.records[i].name}: {len(poses[key])} poses"
            assert len(descs[key]) == 1 and len(fixes[key]) == 1
            # bit-identical in practice; a tolerance in case torch ran concurrently in another thread
            np.testing.assert_allclose(descriptor_of(descs[key][0]), lund.descriptors[i:i + 1], rtol=0, atol=1e-6)
            m = poses[key][0]
            assert m.header.frame_id == "map"
            p = m.pose.pose.position
            assert abs(p.x - est.x) <= 1e-3 and abs(p.y - est.y) <= 1e-3, (lund.records[i].name, p, est)
            cov = np.asarray(m.pose.covariance).reshape(6, 6)[:2, :2]
            np.testing.assert_allclose(cov, est.covariance_xy, rtol=1e-6, atol=1e-9)
            f = fixes[key][0]
            assert abs(f.latitude - est.lat) <= 1e-8 and abs(f.longitude - est.lon) <= 1e-8
        # attention_node publishes one diagnostics status per frame; the last one is the 15th frame's
        assert wait_for(lambda: len(probe.statuses("attention_node")) >= 15, timeout=10.0), \
            f"{len(probe.statuses('attention_node'))} attention_node diagnostics for 15 frames"
        assert len(probe.statuses("attention_node")) == 15
        diag = probe.last_status("attention_node")
        assert (diag["received"], diag["errors"], diag["dropped"]) == ("15", "0", "0"), diag
        with PILImage.open(lund.records[-1].path) as im:
            assert (int(diag["image_width"]), int(diag["image_height"])) == im.size
        assert int(diag["descriptor_dim"]) == lund.descriptors.shape[1]
        # the frame's stage times (3 decimals each) lie within the worker's time for that frame
        stages_ms = sum(float(diag[k]) for k in ("decode_ms", "encode_ms", "publish_ms"))
        assert stages_ms <= 1e3 * att.last_seconds + 0.002, (diag, att.last_seconds)
        print(f"\n15 frames through attention_node -> vpr_localizer; "
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
        probe = graph_probe(graph)
        probe.record("cmp_descriptor", Image, "/cmp/vpr/descriptor")
        att, loc = graph.node("attention_node"), graph.node("vpr_localizer")
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
        key = (101, 0)
        pub_lab.publish(labels)
        assert wait_for(lambda: attention_has_labels(att, key), timeout=10.0), "the node did not get the labels"
        pub_img.publish(good)
        assert wait_for(lambda: probe.stamped("pose", key), timeout=30.0), "no descriptor/pose for the good frame"
        fmt, jpeg = rgb_to_compressed(rgb, "jpeg", 95)
        pub_cmp.publish(CompressedImage(header=Header(stamp=sec_to_stamp(101.0)), format=fmt, data=jpeg))
        assert wait_for(lambda: probe.stamped("cmp_descriptor", key), timeout=30.0), \
            "no descriptor for the good compressed frame"
        # one frame at a time, so no concurrent torch work: equal to the offline encoder
        d = descriptor_of(probe.stamped("descriptor", key)[0])
        np.testing.assert_allclose(d, in_fresh_thread(lambda: att.encoder.encode_images([rgb])), rtol=0, atol=1e-6)
        dc = descriptor_of(probe.stamped("cmp_descriptor", key)[0])
        rgb_jpeg = compressed_to_rgb(fmt, jpeg)
        np.testing.assert_allclose(dc, in_fresh_thread(lambda: cmp.encoder.encode_images([rgb_jpeg])),
                                   rtol=0, atol=1e-6)
        assert att.worker.stats.errors == 3 and cmp.worker.stats.errors == 1
        assert att.labelled_frames == 1 and att.unlabelled_frames == 0
        assert wait_for(lambda: probe.last_status("attention_node").get("labelled_frames") == "1", 10.0)
        diag = probe.last_status("attention_node")
        assert diag["errors"] == "3" and diag["received"] == "4"

        # a good frame without labels: encoded after labels_wait_s, counted as unlabelled
        pub_img.publish(rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(102.0), frame_id="camera")))
        assert wait_for(lambda: probe.stamped("pose", (102, 0)), timeout=30.0)
        assert att.labelled_frames == 1 and att.unlabelled_frames == 1

        # vpr_localizer: NaN, all-zero and rescaled (1e30) descriptors are logged and dropped, the
        # next good one gives a pose
        errors0, received0 = loc.worker.stats.errors, loc.worker.stats.received
        dim = lund.descriptors.shape[1]
        bad = [np.full((1, dim), np.nan, np.float32), np.zeros((1, dim), np.float32), lund.descriptors[:1] * 1e30]
        for i, d in enumerate(bad):
            pub_desc.publish(descriptor_to_msg(d, Header(stamp=sec_to_stamp(200.0 + 0.1 * i), frame_id="camera")))
            settle(loc.worker, errors0 + i + 1, received0 + i + 1)
        pub_desc.publish(descriptor_to_msg(lund.descriptors[:1], Header(stamp=sec_to_stamp(201.0), frame_id="camera")))
        assert wait_for(lambda: probe.stamped("pose", (201, 0)), timeout=15.0), "no pose after the bad descriptors"
        assert not any(probe.stamped("pose", (200, n)) for n in (0, 100_000_000, 200_000_000))
        p = probe.stamped("pose", (201, 0))[0].pose.pose.position
        assert abs(p.x - lund.estimates[0].x) <= 1e-3 and abs(p.y - lund.estimates[0].y) <= 1e-3
        assert loc.worker.stats.errors == errors0 + 3

        # every problem was logged (rcutils logs to stderr)
        err = capfd.readouterr().err
        for needle in ("unsupported image encoding 'weird16'", "data length 100 bytes", "zero size",
                       "compressed image (jpeg", "NaN", "L2 norm 0, not 1", "L2 norm 1e+30"):
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
    proc = subprocess.run([sys.executable, "-m", "vpr_localizer.cli.main", "run", "--params", str(params)],
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if str(missing) in ln]
    assert len(lines) == 1 and "cannot start" in lines[0] and "map not found" in lines[0], out


def test_demo_accounts_for_every_frame(datasets_dir, weights_dir, data_file, ros_env, tmp_path):
    """The ROS part of the main job (``vpr-localizer demo``), small: Lund at 160x120, replayed
    four times faster than the CLI default. Lossless by default: every query gets its pose, and
    the frame counts (published, received, dropped, failed) say so."""
    from vpr_ros.demo import ros_demo

    data_file(weights_dir / "vgg16_features_imagenet_caffe_bgr.pth")
    m = ros_demo(str(datasets_dir.parent), str(tmp_path / "demo"), image_size=(160, 120), rate=1.0)
    fr = m["frames"]
    assert m["queries"] == 15 and m["poses_received"] == 15, m
    assert (fr["published"], fr["received_attention"], fr["lost_in_transport"]) == (15, 15, 0), fr
    assert fr["dropped_attention"] == fr["dropped_localizer"] == fr["errors_attention"] == fr["errors_localizer"] == 0
    saved = json.loads((tmp_path / "demo" / "ros_demo.json").read_text())
    assert saved["frames"] == fr and saved["lossless"] is True
