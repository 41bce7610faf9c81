"""The Lund ROS graph with ``attention_node`` on ``runtime: onnxruntime`` (rclpy from PyPI, one process).

The session's Lund map (``conftest.lund``: even frames, VGG16 at 160x120, NetVLAD K=16) has its
encoder exported to ONNX (:func:`~vpr_localizer.models.onnx_export.export_onnx`, fp32) in a
temporary directory; the 15 odd frames are replayed losslessly through ``attention_node``
(ONNX Runtime, CPU) -> ``vpr_localizer``. Every descriptor must lie within :data:`TOLERANCE` of
the torch offline descriptors and every pose within 1e-3 m of the offline pose. Start-up
refusals: an ONNX file exported from another map's encoder (FingerprintMismatchError), a missing
file (WeightsError), and settings that need backbone features (ConfigError naming the parameter).

Every test uses its own random ``ROS_DOMAIN_ID`` with localhost-only discovery (``conftest.ros_env``).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import RELIABLE_IMAGE, descriptor_of, graph_probe, replay_lund, wait_for, write_params

pytestmark = pytest.mark.integration

#: max |onnxruntime - torch| per descriptor component (test_onnx_export measured 5.6e-6)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def lund_onnx(lund, tmp_path_factory):
    """``lund.map``'s encoder exported to ONNX (fp32) with the map's fingerprint."""
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.models.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("lund_onnx") / "lund.onnx"
    export_onnx(lund.encoder, str(out), fingerprint=VprMap.load(lund.map).fingerprint)
    return str(out)


@pytest.fixture(scope="module")
def other_onnx(datasets_dir, vgg_path, tmp_path_factory):
    """The encoder of another map (GeM, 4 even Lund frames, same backbone and size) exported to ONNX."""
    from vpr_localizer.io.records import load_records
    from vpr_localizer.localization.localize import encoder_for_map
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.models.onnx_export import export_onnx

    from conftest import IMAGE_SIZE

    root = tmp_path_factory.mktemp("other_onnx")
    recs = load_records(str(datasets_dir / "lund_gps"), gps="exif", parity="even")[:4]
    cfg = EncoderConfig(backbone="vgg16", weights=str(vgg_path), image_size=IMAGE_SIZE, aggregator="gem",
                        device="cpu")
    build_map(recs, Encoder(cfg), str(root / "map"), progress=False)
    vmap = VprMap.load(str(root / "map"))
    out = root / "other.onnx"
    export_onnx(encoder_for_map(vmap, device="cpu"), str(out), fingerprint=vmap.fingerprint)
    return str(out)


def onnx_params(lund, path, onnx_path, attention=None):
    """write_params with attention_node on runtime onnxruntime (lossless input), ``attention`` overriding."""
    return write_params(lund, path, attention={**RELIABLE_IMAGE, "runtime": "onnxruntime", "onnx_path": onnx_path,
                                               **(attention or {})})


def test_replayed_bag_onnxruntime_gives_offline_poses(lund, lund_onnx, ros_env, tmp_path, capfd):
    from sensor_msgs.msg import Image

    from vpr_localizer.models.onnx_runtime import OnnxEncoder
    from vpr_ros.graph import Graph

    # config/lund_graph.yaml has publish_attention: true: switched off (INFO), not refused
    graph = Graph(onnx_params(lund, tmp_path / "params.yaml", lund_onnx))
    probe = None
    try:
        att_node = graph.node("attention_node")
        assert isinstance(att_node.encoder, OnnxEncoder) and att_node.runtime == "onnxruntime"
        assert att_node.encoder.providers == ["CPUExecutionProvider"]  # device: cpu (write_params)
        assert att_node.pub_attention is None and att_node.pub_patches is None and att_node.pub_patch_netvlad is None
        probe = graph_probe(graph)
        probe.record("attention", Image, "vpr/attention")
        att_node, loc_node = replay_lund(graph, probe, lund, what="onnxruntime: ")
        att, loc = att_node.worker.stats, loc_node.worker.stats
        assert not wait_for(lambda: probe.count("pose") > 15, timeout=0.5), f"{probe.count('pose')} poses"
        assert (att.received, att.processed, att.dropped, att.errors) == (15, 15, 0, 0), att
        assert (loc.processed, loc.dropped, loc.errors) == (15, 0, 0), loc
        assert probe.count("attention") == 0

        poses, descs = probe.by_stamp("pose"), probe.by_stamp("descriptor")
        assert sorted(poses) == sorted(lund.stamps)
        worst = 0.0
        for i, key in enumerate(lund.stamps):
            est = lund.estimates[i]
            assert len(poses[key]) == 1 and len(descs[key]) == 1, lund.records[i].name
            d = descriptor_of(descs[key][0])
            assert d.shape == lund.descriptors[i:i + 1].shape
            diff = float(np.abs(d - lund.descriptors[i:i + 1]).max())
            worst = max(worst, diff)
            assert diff <= TOLERANCE, (lund.records[i].name, diff)
            p = poses[key][0].pose.pose.position
            assert abs(p.x - est.x) <= 1e-3 and abs(p.y - est.y) <= 1e-3, (lund.records[i].name, p, est)

        assert wait_for(lambda: len(probe.statuses("attention_node")) >= 15, timeout=10.0)
        diag = probe.last_status("attention_node")
        assert diag["runtime"] == "onnxruntime" and diag["onnx_precision"] == "fp32", diag
        assert diag["onnx_provider"] == "CPUExecutionProvider" and diag["guided"] == "False", diag
        assert (diag["received"], diag["errors"], diag["dropped"]) == ("15", "0", "0"), diag
        assert int(diag["descriptor_dim"]) == lund.descriptors.shape[1]
        print(f"\n15 frames through attention_node (onnxruntime) -> vpr_localizer; max |onnx - torch| {worst:.2g}")
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()
    err = capfd.readouterr().err
    assert "publish_attention switched off" in err, err[-3000:]
    assert "onnxruntime encoder" in err and "CPUExecutionProvider" in err, err[-3000:]


def test_torch_runtime_reports_runtime_in_diagnostics(lund, ros_env, tmp_path):
    """runtime: torch (the default) is unchanged apart from the ``runtime`` diagnostics value."""
    from attention_node.node import AttentionParams
    from vpr_localizer.io.image_files import load_image, resize_image
    from vpr_ros.convert import rgb_to_image_msg, sec_to_stamp
    from vpr_ros.graph import Graph
    from vpr_ros.qos import sensor_qos
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    assert AttentionParams().runtime == "torch" and AttentionParams().onnx_path is None
    graph = Graph(write_params(lund, tmp_path / "params.yaml"), names=["attention_node"])
    probe = None
    try:
        node = graph.node("attention_node")
        assert node.runtime == "torch" and node.pub_attention is not None
        probe = graph_probe(graph)
        pub = probe.node.create_publisher(Image, "image", sensor_qos(depth=5))
        assert wait_for(lambda: pub.get_subscription_count() >= 1, timeout=15.0), "discovery"
        rgb = resize_image(load_image(lund.records[0].path), (320, 240))
        pub.publish(rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(7.0), frame_id="camera")))
        assert wait_for(lambda: probe.last_status("attention_node"), timeout=30.0), "no diagnostics"
        diag = probe.last_status("attention_node")
        assert diag["runtime"] == "torch" and "onnx_provider" not in diag, diag
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()


@pytest.mark.parametrize("case", ["other_map", "missing_file", "patch_netvlad", "patch_descriptors",
                                  "empty_onnx_path", "onnx_path_with_torch", "unknown_runtime"])
def test_onnxruntime_startup_refusals(case, lund, lund_onnx, other_onnx, ros_env, tmp_path):
    from vpr_localizer.errors import ConfigError, FingerprintMismatchError, WeightsError
    from vpr_ros.graph import Graph

    missing = str(tmp_path / "nothing.onnx")
    attention, error, match = {
        "other_map": ({"onnx_path": other_onnx}, FingerprintMismatchError, "different encoder.*aggregator"),
        "missing_file": ({"onnx_path": missing}, WeightsError, "ONNX model not found: .*nothing.onnx"),
        "patch_netvlad": ({"publish_patch_netvlad": True}, ConfigError, "publish_patch_netvlad.*runtime onnxruntime"),
        "patch_descriptors": ({"publish_patch_descriptors": True}, ConfigError,
                              "publish_patch_descriptors.*runtime onnxruntime"),
        "empty_onnx_path": ({"onnx_path": ""}, ConfigError, "parameter onnx_path is empty"),
        "onnx_path_with_torch": ({"runtime": "torch"}, ConfigError, "onnx_path only applies with runtime"),
        "unknown_runtime": ({"runtime": "tensorrt"}, ConfigError, "parameter runtime must be one of"),
    }[case]
    params = onnx_params(lund, tmp_path / "params.yaml", lund_onnx, attention)
    with pytest.raises(error, match=match):
        Graph(params, names=["attention_node"])


def test_run_with_other_maps_onnx_exits_2(lund, other_onnx, ros_env, tmp_path):
    """``vpr-localizer run``: an ONNX file of another map's encoder is one fatal line and exit status 2,
    like a missing map."""
    import subprocess
    import sys
    from pathlib import Path

    params = onnx_params(lund, tmp_path / "params.yaml", other_onnx)
    proc = subprocess.run([sys.executable, "-m", "vpr_localizer.cli.main", "run", "--params", params],
                          cwd=str(Path(__file__).resolve().parents[1]), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if "different encoder" in ln]
    assert len(lines) == 1 and "cannot start" in lines[0] and "aggregator" in lines[0], out
