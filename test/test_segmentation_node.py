"""ROS graph tests of segmentation_node (in-process through vpr_ros.graph.Graph, real rclpy),
its console entry point, and the RViz2 config.

Every test uses its own random ROS_DOMAIN_ID (set before any rclpy.init) and localhost
discovery (``conftest.ros_env``); nodes and executors are shut down before their context.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import MessageProbe, ProbeContext, wait_for
from vpr_localizer.errors import WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]
RVIZ_FILE = REPO_ROOT / "rviz" / "vpr_localizer.rviz"
CAMERA_TOPIC = "/camera/image_raw"
SIZE = (512, 256)  # (W, H) the Cityscapes frame is resized to


@pytest.fixture(autouse=True)
def _own_ros_domain(ros_env):
    """Every test of this module on its own ROS domain (see conftest.ros_env)."""


@pytest.fixture(scope="module")
def city_rgb(datasets_dir) -> np.ndarray:
    """A real Cityscapes frame, resized to 512x256, uint8 (H, W, 3) RGB."""
    from PIL import Image as PILImage

    frames = sorted((datasets_dir / "cityscapes_frames").glob("*.png"))
    if not frames:
        pytest.fail(f"no PNG frame in {datasets_dir / 'cityscapes_frames'}", pytrace=False)
    with PILImage.open(frames[0]) as im:
        return np.asarray(im.convert("RGB").resize(SIZE, PILImage.BILINEAR), dtype=np.uint8).copy()


def write_params(tmp_path: Path, **params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"segmentation_node": {"ros__parameters": params}}))
    return str(path)


class Probe(MessageProbe):
    """A test node in the graph's context: publishes camera frames, records the outputs
    (``labels``, ``overlay``, ``diagnostics``)."""

    def __init__(self, graph, compressed: bool = False):
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import CompressedImage, Image

        from vpr_ros.qos import sensor_qos

        super().__init__(graph, {"labels": (Image, "/segmentation/labels"),
                                 "overlay": (Image, "/segmentation/overlay"),
                                 "diagnostics": (DiagnosticArray, "/diagnostics")}, name="segmentation_test_probe")
        if compressed:
            self.pub = self.node.create_publisher(CompressedImage, CAMERA_TOPIC + "/compressed", sensor_qos())
        else:
            self.pub = self.node.create_publisher(Image, CAMERA_TOPIC, sensor_qos())
        seg = graph.node("segmentation_node")
        outputs = [seg.pub_labels] + ([seg.pub_overlay] if seg.pub_overlay is not None else [])
        assert wait_for(lambda: self.pub.get_subscription_count() >= 1
                        and all(p.get_subscription_count() >= 1 for p in outputs), 10.0), "topics did not match"

    def publish_until(self, msg, done, tries: int = 5, timeout: float = 3.0) -> bool:
        """Publish ``msg`` (best effort) until ``done()`` holds, at most ``tries`` times."""
        for _ in range(tries):
            self.pub.publish(msg)
            if wait_for(done, timeout):
                return True
        return False


@pytest.fixture
def make_graph(tmp_path):
    """``make_graph(compressed=False, **params) -> (graph, probe)``; everything stopped at teardown."""
    from vpr_ros.graph import Graph

    made = []

    def factory(compressed: bool = False, **params):
        params.setdefault("backend", "none")
        params["compressed"] = compressed
        remap = "image/compressed" if compressed else "image"
        target = CAMERA_TOPIC + ("/compressed" if compressed else "")
        graph = Graph(write_params(tmp_path, **params), extra_args=["-r", f"{remap}:={target}"])
        made.append([graph, None])
        probe = Probe(graph, compressed)
        made[-1][1] = probe
        return graph, probe

    yield factory
    for graph, probe in reversed(made):
        if probe is not None:
            probe.close()
        graph.shutdown()


def image_msg(rgb: np.ndarray, stamp, frame_id="camera_optical_frame", encoding="rgb8"):
    from std_msgs.msg import Header

    from vpr_ros.convert import rgb_to_image_msg

    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = stamp
    return rgb_to_image_msg(rgb, header, encoding)


def raw_image_msg(stamp, encoding, height, width, step, data):
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = "camera_optical_frame"
    msg.encoding, msg.height, msg.width, msg.step, msg.data = encoding, height, width, step, data
    return msg


def compressed_msg(data: bytes, stamp, fmt="jpeg"):
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = "camera_optical_frame"
    msg.format, msg.data = fmt, data
    return msg


def check_labels(msg, rgb, frame_id="camera_optical_frame"):
    h, w = rgb.shape[:2]
    assert msg.encoding == "mono8"
    assert (msg.height, msg.width, msg.step) == (h, w, w)
    assert msg.header.frame_id == frame_id
    labels = np.frombuffer(bytes(msg.data), np.uint8).reshape(h, w)
    assert (labels == 19).all(), "backend none labels every pixel 19 (ignore)"


# --- the graph ---------------------------------------------------------------------------------

def test_labels_and_overlay_for_a_real_frame(make_graph, city_rgb):
    graph, probe = make_graph()
    seg = graph.node("segmentation_node")
    assert seg.sub.topic_name == CAMERA_TOPIC
    stamp = (1_700_000_123, 456_789_000)
    assert probe.publish_until(image_msg(city_rgb, stamp),
                               lambda: probe.stamped("labels", stamp) and probe.stamped("overlay", stamp))
    check_labels(probe.stamped("labels", stamp)[0], city_rgb)
    ov = probe.stamped("overlay", stamp)[0]
    assert ov.encoding == "rgb8" and (ov.height, ov.width) == city_rgb.shape[:2]
    assert ov.header.frame_id == "camera_optical_frame"
    # backend none: every pixel ignore, and ignore pixels are shown as the camera image
    np.testing.assert_array_equal(np.frombuffer(bytes(ov.data), np.uint8).reshape(city_rgb.shape), city_rgb)
    assert wait_for(lambda: probe.messages("diagnostics"), 10.0)
    status = probe.messages("diagnostics")[-1].status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert status.name == "segmentation_node" and status.level == b"\x00"
    assert values["backend"] == "none" and values["ignore_fraction"] == "1.000"
    assert values["width"] == str(SIZE[0]) and values["height"] == str(SIZE[1])

    # bgr8 input: same labels, overlay back in RGB order
    stamp2 = (1_700_000_124, 0)
    assert probe.publish_until(image_msg(city_rgb, stamp2, frame_id="cam2", encoding="bgr8"),
                               lambda: probe.stamped("overlay", stamp2) and probe.stamped("labels", stamp2))
    check_labels(probe.stamped("labels", stamp2)[0], city_rgb, frame_id="cam2")
    ov2 = probe.stamped("overlay", stamp2)[0]
    np.testing.assert_array_equal(np.frombuffer(bytes(ov2.data), np.uint8).reshape(city_rgb.shape), city_rgb)
    assert seg.worker.stats.errors == 0


def test_bad_frames_are_logged_and_the_node_keeps_running(make_graph, city_rgb, capfd):
    graph, probe = make_graph()
    seg = graph.node("segmentation_node")
    h, w = city_rgb.shape[:2]
    good = bytes(city_rgb.tobytes())
    bad = [
        ("unsupported image encoding 'yuv9'", raw_image_msg((10, 0), "yuv9", h, w, 3 * w, good)),
        ("does not match", raw_image_msg((11, 0), "rgb8", h, w, 3 * w, good[: len(good) // 2])),
        ("zero size", raw_image_msg((12, 0), "rgb8", 0, 0, 0, b"")),
    ]
    for expected, msg in bad:
        before = seg.worker.stats.errors
        assert probe.publish_until(msg, lambda: seg.worker.stats.errors > before), expected
        assert expected in seg.worker.stats.last_error
    assert not probe.messages("labels"), "no labels for a bad frame"
    stamp = (13, 5)
    assert probe.publish_until(image_msg(city_rgb, stamp), lambda: probe.stamped("labels", stamp))
    check_labels(probe.stamped("labels", stamp)[0], city_rgb)
    assert seg.worker.stats.errors == 3
    assert wait_for(lambda: probe.messages("diagnostics"), 10.0)
    status = probe.messages("diagnostics")[-1].status[0]
    assert status.level == b"\x01" and "3 bad image message(s)" in status.message
    err = capfd.readouterr().err
    assert err.count("dropped frame:") >= 3, err[-2000:]


def test_compressed_input_and_no_overlay(make_graph, city_rgb):
    from vpr_localizer.io.image_msgs import rgb_to_compressed

    graph, probe = make_graph(compressed=True, publish_overlay=False)
    seg = graph.node("segmentation_node")
    assert seg.sub.topic_name == CAMERA_TOPIC + "/compressed"
    assert seg.pub_overlay is None
    fmt, jpeg = rgb_to_compressed(city_rgb, "jpeg", 90)
    stamp = (20, 1)
    assert probe.publish_until(compressed_msg(jpeg, stamp, fmt), lambda: probe.stamped("labels", stamp))
    check_labels(probe.stamped("labels", stamp)[0], city_rgb)

    before = seg.worker.stats.errors
    corrupt = compressed_msg(jpeg[: len(jpeg) // 3], (21, 0), fmt)  # truncated JPEG
    assert probe.publish_until(corrupt, lambda: seg.worker.stats.errors > before)
    assert "corrupt or truncated" in seg.worker.stats.last_error
    before = seg.worker.stats.errors
    assert probe.publish_until(compressed_msg(b"not an image at all", (22, 0), "png"),
                               lambda: seg.worker.stats.errors > before)
    assert "not a decodable image" in seg.worker.stats.last_error

    stamp = (23, 0)
    _, png = rgb_to_compressed(city_rgb, "png")
    assert probe.publish_until(compressed_msg(png, stamp, "png"), lambda: probe.stamped("labels", stamp))
    check_labels(probe.stamped("labels", stamp)[0], city_rgb)
    assert not probe.messages("overlay")


@pytest.mark.parametrize("backend,match", [("bogus_net", "unknown segmentation backend 'bogus_net'"),
                                           ("panoptic_deeplab", "panoptic_deeplab needs weights"),
                                           ("espnetv2", "needs weights")])
def test_unavailable_backend_is_fatal(tmp_path, backend, match):
    from vpr_ros.graph import Graph

    with pytest.raises(WeightsError, match=match):
        Graph(write_params(tmp_path, backend=backend))


# --- console entry point -----------------------------------------------------------------------

def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


ENTRY = "import sys; from segmentation_node.node import main; sys.exit(main())"


def test_main_fatal_error_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-c", ENTRY, "--ros-args", "-p", "backend:=bogus_net"],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert "cannot start" in lines[0] and "bogus_net" in lines[0] and "FATAL" in lines[0]


def test_main_runs_and_stops_cleanly_on_sigint():
    from sensor_msgs.msg import Image

    from vpr_ros.qos import reliable_qos

    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "--ros-args", "-p", "backend:=none"],
                            cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    ctx = probe = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "backend none" in line:
                break
        assert any("backend none" in ln for ln in lines), "".join(lines)
        # the node spins (so Ctrl-C lands in the executor): it answers a camera frame with labels
        ctx = ProbeContext()
        probe = MessageProbe(ctx, {"labels": (Image, "/segmentation/labels")}, name="sigint_test_probe")
        pub = probe.node.create_publisher(Image, "/image", reliable_qos())
        assert wait_for(lambda: pub.get_subscription_count() >= 1
                        and probe.node.count_publishers("/segmentation/labels") >= 1, 30.0), "topics did not match"
        frame = image_msg(np.zeros((24, 32, 3), np.uint8), (30, 0))
        for _ in range(5):
            pub.publish(frame)
            if wait_for(lambda: probe.stamped("labels", (30, 0)), 5.0):
                break
        assert probe.stamped("labels", (30, 0)), "the node did not answer a camera frame"
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
            pytest.fail("no exit within 30 s of SIGINT; output:\n" + "".join(lines) + rest)
    finally:
        if probe is not None:
            probe.close()
        if ctx is not None:
            ctx.shutdown()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "terminate called" not in out, out


# --- RViz2 config ------------------------------------------------------------------------------

def test_rviz_config_parses_and_shows_the_suite():
    doc = yaml.safe_load(RVIZ_FILE.read_text())
    for key in ("Panels", "Visualization Manager", "Window Geometry"):
        assert key in doc, key
    vm = doc["Visualization Manager"]
    assert vm["Global Options"]["Fixed Frame"] == "map"
    assert vm["Tools"] and vm["Views"]["Current"]["Class"].startswith("rviz_default_plugins/")
    displays = vm["Displays"]
    shown = {(d["Class"], d.get("Topic", {}).get("Value")) for d in displays}
    for expected in (("rviz_default_plugins/Image", "/camera/image_raw"),
                     ("rviz_default_plugins/Image", "/segmentation/overlay"),
                     ("rviz_default_plugins/Image", "/vpr/attention"),
                     ("rviz_default_plugins/PoseWithCovariance", "/vpr/pose"),
                     ("rviz_default_plugins/MarkerArray", "/vpr/matches"),
                     ("rviz_default_plugins/Grid", None)):
        assert expected in shown, expected
    pose = next(d for d in displays if d["Class"] == "rviz_default_plugins/PoseWithCovariance")
    assert pose["Covariance"]["Value"] is True and pose["Covariance"]["Position"]["Value"] is True
    assert all(d["Enabled"] is True for d in displays)
    names = [d["Name"] for d in displays]
    assert len(names) == len(set(names)), "display names must be unique (RViz keys panels by name)"


def test_espnetv2_backend_through_the_node(make_graph, city_rgb, weights_dir):
    """The node publishes exactly what the ESPNetv2 backend computes offline on the same frame."""
    from vpr_localizer.segmentation.classes import overlay
    from vpr_localizer.segmentation.registry import make_backend

    weights = str(weights_dir / "espnetv2_s_2.0_city_1024x512.pth")
    graph, probe = make_graph(backend="espnetv2", weights=weights, device="cpu")
    stamp = (1_700_000_500, 0)
    assert probe.publish_until(image_msg(city_rgb, stamp),
                               lambda: probe.stamped("labels", stamp) and probe.stamped("overlay", stamp),
                               timeout=20.0)
    msg = probe.stamped("labels", stamp)[0]
    h, w = city_rgb.shape[:2]
    labels = np.frombuffer(bytes(msg.data), np.uint8).reshape(h, w)
    expected = make_backend("espnetv2", weights=weights, device="cpu")(city_rgb)
    np.testing.assert_array_equal(labels, expected)
    # a real street scene: road (0), building (2), vegetation (8) and cars (13) all present
    assert {0, 2, 8, 13} <= set(np.unique(labels).tolist())
    ov = probe.stamped("overlay", stamp)[0]
    np.testing.assert_array_equal(np.frombuffer(bytes(ov.data), np.uint8).reshape(city_rgb.shape),
                                  overlay(city_rgb, expected))
