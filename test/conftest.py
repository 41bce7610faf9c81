"""Shared fixtures: locate the real data in ``../shared`` (next to the repository root).

The data is never copied into the repository. When it is missing the tests that need it
fail (they do not skip) with a message naming the path that was looked for.

Shared helpers of the test modules (``from conftest import ...``): :func:`wait_for` (wait on
state instead of sleeping), :func:`in_fresh_thread`, the ``ros_env`` fixture (per-test ROS
domain, localhost discovery), :class:`MessageProbe` / :class:`ProbeContext` (a test node that
records messages), :func:`attention_has_labels` and the EXIF reader :func:`exif_gps_pillow`.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.fail(f"{what} not found: expected directory {path} "
                    f"(the shared data lives in ../shared relative to the repo root {REPO_ROOT})",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo>/../shared``."""
    return _require_dir(SHARED_DIR, "shared data directory")


@pytest.fixture(scope="session")
def datasets_dir(shared_dir: Path) -> Path:
    """``<repo>/../shared/datasets``."""
    return _require_dir(shared_dir / "datasets", "shared datasets directory")


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    """``<repo>/../shared/weights``."""
    return _require_dir(shared_dir / "weights", "shared weights directory")


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else fail the test with a message naming it."""
    if not Path(path).is_file():
        pytest.fail(f"required data file not found: {path}", pytrace=False)
    return Path(path)


@pytest.fixture(scope="session")
def data_file():
    """Callable ``data_file(path) -> path`` that fails the test when ``path`` is not a file."""
    return require_file


VGG_FILE = "vgg16_features_imagenet_caffe_bgr.pth"


@pytest.fixture(scope="session")
def vgg_path(weights_dir, data_file) -> Path:
    """``../shared/weights/vgg16_features_imagenet_caffe_bgr.pth`` (fails the test when missing)."""
    return data_file(weights_dir / VGG_FILE)


@pytest.fixture(scope="module")
def faiss_single_thread():
    """One faiss OpenMP thread for a test module: faiss's threads spin-wait and fight torch's for
    the 2 cores of the test machine (k-means of a few hundred points takes seconds); one faiss
    thread gives the same results. The previous setting is restored afterwards."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


# --------------------------------------------------------------------------------------------
# waiting on state (instead of sleeping)
# --------------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, period: float = 0.02) -> bool:
    """Poll ``predicate()`` until it holds or ``timeout`` seconds have passed; its final value.

    Use as ``assert wait_for(lambda: ..., timeout), "what did not happen"``: the timeout is
    generous (a loaded 2-core machine), the condition exact. To check that something does *not*
    happen (e.g. no duplicate message), ``assert not wait_for(cond, seconds)`` is a bounded wait
    of exactly ``seconds`` that the test must state.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


def in_fresh_thread(fn):
    """``fn()`` in a new thread, as a node's worker thread runs it; returns its result.

    A node that calls ``faiss.omp_set_num_threads`` in the thread that constructs it (the test's
    main thread) leaves torch in that thread single-threaded (FAISS and torch share OpenMP), and
    torch then sums in another order (descriptors differ by ~1e-6). A fresh thread has OpenMP's
    default thread count, like the node's worker.
    """
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    t.join()
    return out["v"]


# --------------------------------------------------------------------------------------------
# ROS 2 (rclpy): isolation, a probe node, node state
# --------------------------------------------------------------------------------------------

@pytest.fixture
def ros_env(monkeypatch) -> int:
    """A random ROS_DOMAIN_ID (1..101; 0 is everyone's default) and localhost-only discovery for
    this test, set before its ``rclpy.init`` and restored afterwards; subprocesses started with
    ``os.environ`` inherit them."""
    domain = random.SystemRandom().randint(1, 101)
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return domain


class ProbeContext:
    """An rclpy context whose executor spins in a background thread, with no node of the suite:
    what a :class:`MessageProbe` needs (``context``, ``executor``) when the node under test runs
    in another process. ``shutdown()`` stops the executor before the context."""

    def __init__(self):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self.context = Context()
        rclpy.init(args=[], context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self._thread = threading.Thread(target=self._spin, name="probe-executor", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - executor shut down while spinning
            pass

    def shutdown(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        if self.context.ok():
            rclpy.shutdown(context=self.context)
        self._thread.join(5.0)


def stamp_of(msg) -> tuple:
    """``(sec, nanosec)`` of a message's header stamp."""
    return int(msg.header.stamp.sec), int(msg.header.stamp.nanosec)


class MessageProbe:
    """A test node in a graph's context that records every message on the given topics.

    Args:
        graph: anything with ``context`` and ``executor`` (a ``vpr_ros.graph.Graph`` or a
            :class:`ProbeContext`); the probe node is added to its executor.
        topics: ``{key: (message type, topic)}``; each key's messages are kept in arrival order
            (reliable QoS, ``depth`` deep). More topics: :meth:`record`.
        name: node name.

    ``node`` is the probe's rclpy node (for publishers of the test); ``close()`` removes it.
    """

    def __init__(self, graph, topics=None, name: str = "test_probe", depth: int = 50):
        import rclpy

        self.graph = graph
        self.depth = depth
        self.node = rclpy.create_node(name, context=graph.context)
        self.lock = threading.Lock()
        self._messages = {}
        for key, (msg_type, topic) in (topics or {}).items():
            self.record(key, msg_type, topic)
        graph.executor.add_node(self.node)

    def record(self, key: str, msg_type, topic: str, qos=None) -> None:
        """Also record ``topic`` under ``key``."""
        from vpr_ros.qos import reliable_qos

        with self.lock:
            self._messages.setdefault(key, [])

        def keep(msg):
            with self.lock:
                self._messages[key].append(msg)

        self.node.create_subscription(msg_type, topic, keep, qos or reliable_qos(depth=self.depth))

    def messages(self, key: str) -> list:
        """The messages recorded under ``key`` so far, oldest first (a copy)."""
        with self.lock:
            return list(self._messages[key])

    def count(self, key: str) -> int:
        with self.lock:
            return len(self._messages[key])

    def by_stamp(self, key: str) -> dict:
        """``{(sec, nanosec): [messages with that header stamp]}`` for ``key``."""
        out = {}
        for m in self.messages(key):
            out.setdefault(stamp_of(m), []).append(m)
        return out

    def stamped(self, key: str, stamp) -> list:
        """The messages under ``key`` whose header stamp is ``stamp`` ``(sec, nanosec)``."""
        return [m for m in self.messages(key) if stamp_of(m) == tuple(stamp)]

    def statuses(self, name: str, key: str = "diagnostics") -> list:
        """Key/values of every DiagnosticStatus named ``name`` recorded under ``key``, oldest first."""
        return [{kv.key: kv.value for kv in s.values}
                for arr in self.messages(key) for s in arr.status if s.name == name]

    def last_status(self, name: str, key: str = "diagnostics") -> dict:
        """Key/values of the newest DiagnosticStatus named ``name`` ({} when none yet)."""
        sts = self.statuses(name, key)
        return sts[-1] if sts else {}

    def close(self) -> None:
        self.graph.executor.remove_node(self.node)
        self.node.destroy_node()


def attention_has_labels(node, stamp) -> bool:
    """Whether ``attention_node`` ``node`` holds a ``segmentation/labels`` message with header
    stamp ``(sec, nanosec)`` that waits for its camera frame (received, not yet used)."""
    return tuple(stamp) in node.label_buffer


# --------------------------------------------------------------------------------------------
# EXIF
# --------------------------------------------------------------------------------------------

def exif_gps_pillow(path) -> tuple:
    """(lat, lon, alt) from the EXIF GPS IFD, read with Pillow (independent of piexif, which
    the code under test uses)."""
    from PIL import Image

    with Image.open(path) as im:
        g = im.getexif().get_ifd(0x8825)

    def deg(v):
        d, m, s = (float(x) for x in v)
        return d + m / 60.0 + s / 3600.0

    lat = deg(g[2]) * (-1.0 if g.get(1) == "S" else 1.0)
    lon = deg(g[4]) * (-1.0 if g.get(3) == "W" else 1.0)
    alt = float(g[6]) * (-1.0 if g.get(5) in (1, b"\x01") else 1.0)
    return lat, lon, alt


# --- the Lund ROS graph fixture: map, bag and offline poses shared by the graph tests ---------------

IMAGE_SIZE = (160, 120)   # network input W, H: small, the machine has 2 slow cores
CLUSTERS = 16
BAG_RATE_HZ = 2.0
# By default the camera worker keeps only the newest frame; a frame is dropped when two arrive while
# one is encoded (lossless tests raise queue_depth, see RELIABLE_IMAGE). Encoding a 1024x768 frame
# at 160x120 takes 0.1-0.7 s on a loaded 2-core CPU, so frames are replayed 1 s apart (2 Hz bag at
# rate 0.5), leaving a wide margin.
REPLAY_RATE = 0.5
IMAGE_TOPIC = "/camera/image_raw"


@pytest.fixture(scope="session")
def lund(datasets_dir, weights_dir, data_file, tmp_path_factory):
    """Map of the even Lund frames (VGG16 160x120, NetVLAD K=16), bag of the odd ones, and the offline
    localisation of the odd ones: the real-data fixture of the ROS graph tests (built once per session)."""
    from vpr_localizer.io import bags
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.localization.localize import Localizer, LocalizerConfig, encoder_for_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.io.records import load_records

    weights = data_file(weights_dir / VGG_FILE)
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


# A lossless replay: a reliable camera subscription and a worker queue that absorbs load spikes
# (the live default keeps only the newest frame). write_params gives the localizer the same depth.
RELIABLE_IMAGE = {"qos_overrides": {"/image": {"subscription": {"reliability": "reliable", "depth": 10}}},
                  "queue_depth": 16}


def write_params(lund, path: Path, attention=None, localizer=None, nodes=("attention_node", "vpr_localizer")) -> str:
    """config/lund_graph.yaml with map_path set to the test map (and overrides), written to ``path``."""
    doc = {}
    for name, extra in (("attention_node", attention), ("vpr_localizer", localizer)):
        if name in nodes:
            p = dict(lund.params[name]["ros__parameters"])
            p.update({"map_path": lund.map}, **(extra or {}))
            if name == "vpr_localizer" and "queue_depth" in (attention or {}):
                p.setdefault("queue_depth", attention["queue_depth"])
            if name == "attention_node":
                p["device"] = "cpu"
            doc[name] = {"ros__parameters": p}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def graph_probe(graph) -> MessageProbe:
    """A probe node in the graph's context recording what the graph publishes: ``pose``
    (vpr/pose), ``fix`` (vpr/fix), ``descriptor`` (vpr/descriptor), ``diagnostics``."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from sensor_msgs.msg import Image, NavSatFix

    return MessageProbe(graph, {"pose": (PoseWithCovarianceStamped, "vpr/pose"), "fix": (NavSatFix, "vpr/fix"),
                                "descriptor": (Image, "vpr/descriptor"),
                                "diagnostics": (DiagnosticArray, "diagnostics")})


def descriptor_of(msg) -> np.ndarray:
    """The ``(1, D)`` float32 descriptor of a vpr/descriptor message."""
    return np.frombuffer(bytes(msg.data), "<f4").reshape(1, -1)


def replay_lund(graph, probe, lund, what: str = "") -> tuple:
    """Replay the Lund bag losslessly into ``graph`` (attention_node -> vpr_localizer) and wait until
    the 15 poses arrived and both workers counted every frame (they count a frame after publishing
    its results). Returns the (attention_node, vpr_localizer) nodes."""
    from vpr_ros.replay import replay_bag

    stats = replay_bag(probe.node, lund.bag, rate=REPLAY_RATE, topics=[IMAGE_TOPIC],
                       remap={IMAGE_TOPIC: "image"}, start_delay_s=2.0, reliable=True)
    assert stats.published == {IMAGE_TOPIC: 15}
    assert wait_for(lambda: probe.count("pose") >= 15, timeout=60.0), \
        f"{what}only {probe.count('pose')} of 15 poses within 60 s"
    att_node, loc_node = graph.node("attention_node"), graph.node("vpr_localizer")
    att, loc = att_node.worker.stats, loc_node.worker.stats
    assert wait_for(lambda: att.processed + att.dropped + att.errors == 15 and att_node.worker.idle()
                    and loc.processed + loc.dropped + loc.errors == 15 and loc_node.worker.idle(),
                    timeout=10.0), (att, loc)
    return att_node, loc_node
