#!/usr/bin/env python3
"""Benchmark: per-frame latency of the ROS pipeline, camera image -> ``vpr/pose`` (not a test).

The real nodes run in this process (:class:`vpr_ros.graph.Graph`: ``attention_node`` +
``vpr_localizer``, and ``segmentation_node`` with ``--segmentation``); a probe node publishes
real Lund images (odd frames, resized to ``--image-size``, default 640x480) as
sensor_msgs/Image on ``image`` one at a time and waits for each frame's ``vpr/pose`` (matched by
header stamp) before the next, so the latency contains no queueing. Per frame it records the
end-to-end time (just before ``publish`` -> the pose callback of the probe) and the stage times
the nodes report in ``diagnostics``: attention_node ``decode`` / ``labels_wait`` / ``encode`` /
``publish``, vpr_localizer ``decode`` / ``search`` / ``pose`` / ``publish`` (segmentation_node
``segment``); median and p95 of each, frames per second (timed frames / wall time of the timed
loop), the process RSS (now and peak so far: every variant runs in the same process) and, on
CUDA, ``torch.cuda.max_memory_allocated`` of the variant (torch only: ONNX Runtime's CUDA
allocations are not counted there).

Variants (VGG16 + NetVLAD, the same map): ``torch``; ``onnxruntime`` fp32 (the map's encoder
exported with :func:`~vpr_localizer.models.onnx_export.export_onnx`); ``onnxruntime-int8`` with
``--int8`` (backbone convolutions quantised, calibrated on ``--calibration-images`` map
keyframes). ONNX Runtime's execution providers come from
:class:`~vpr_localizer.models.onnx_runtime.OnnxEncoder` for ``--device``. Ratios are to torch in
the same run. ``publish_attention`` is off for every variant (onnxruntime has no features for it).

The map (Lund even frames, EXIF GPS, K = ``--clusters``, network input = ``--image-size``) is built
into ``--work DIR`` (reused when it matches) or a temporary directory.

Writes ``results/bench_pipeline.json`` and prints a table.

    python benchmarks/bench_pipeline.py --frames 30 --device cpu --int8
    python benchmarks/bench_pipeline.py --frames 5 --image-size 320 240
    python benchmarks/bench_pipeline.py --frames 50 --device cuda --int8 --segmentation
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_common import peak_rss_mb, write_results  # noqa: E402
from vpr_localizer.errors import VprError  # noqa: E402
from vpr_localizer.io.image_files import load_image, resize_image  # noqa: E402
from vpr_localizer.io.records import load_records  # noqa: E402

REPO_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VGG_FILE = "vgg16_features_imagenet_caffe_bgr.pth"
SEG_WEIGHTS = "espnetv2_s_2.0_city_1024x512.pth"
#: (node, diagnostics key) -> stage name in the results
STAGES = {("segmentation_node", "segment_ms"): "seg_segment",
          ("attention_node", "decode_ms"): "att_decode", ("attention_node", "labels_wait_ms"): "att_labels_wait",
          ("attention_node", "encode_ms"): "encode", ("attention_node", "publish_ms"): "att_publish",
          ("vpr_localizer", "decode_ms"): "loc_decode", ("vpr_localizer", "search_ms"): "search",
          ("vpr_localizer", "pose_ms"): "pose", ("vpr_localizer", "publish_ms"): "loc_publish"}
POSE_TIMEOUT_S = 120.0


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc; nan elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def stats_ms(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"median": float("nan"), "p95": float("nan"), "mean": float("nan")}
    return {"median": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "mean": round(float(a.mean()), 3)}


# --- map and exports ----------------------------------------------------------------------------

def build_or_reuse_map(work: str, lund_dir: str, weights: str, size_wh, clusters: int, device: str) -> str:
    """Map of the even Lund frames at ``size_wh`` with ``clusters`` NetVLAD clusters, in ``work/map``."""
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.mapping.store import VprMap, is_map_dir
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder

    path = os.path.join(work, f"map_{size_wh[0]}x{size_wh[1]}_k{clusters}")
    if is_map_dir(path):
        try:
            fp = VprMap.load(path).fingerprint
            if list(fp.get("image_size", [])) == list(size_wh) and fp.get("num_clusters") == clusters:
                print(f"reusing map {path}")
                return path
        except VprError:
            pass
        shutil.rmtree(path)
    recs = load_records(lund_dir, gps="exif", parity="even")
    cfg = EncoderConfig(backbone="vgg16", weights=weights, image_size=tuple(size_wh), num_clusters=clusters,
                        device=device)
    t0 = time.perf_counter()
    build_map(recs, Encoder(cfg), path, progress=False)
    print(f"built map {path} ({len(recs)} keyframes, {size_wh[0]}x{size_wh[1]}, K={clusters}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return path


def export_variants(map_path: str, work: str, int8: bool, calibration_images: int) -> Dict[str, str]:
    """``{variant: onnx path}``: the map's encoder exported fp32 (and int8)."""
    from vpr_localizer.localization.localize import encoder_for_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.models.onnx_export import export_onnx, list_calibration_images

    vmap = VprMap.load(map_path)
    enc = encoder_for_map(vmap, device="cpu")
    tag = os.path.basename(map_path)
    out = {}
    t0 = time.perf_counter()
    out["onnxruntime"] = export_onnx(enc, os.path.join(work, f"{tag}_fp32.onnx"), fingerprint=vmap.fingerprint).onnx_path
    if int8:
        calib = list_calibration_images([k.image_path for k in vmap.keyframes], calibration_images)
        out["onnxruntime-int8"] = export_onnx(enc, os.path.join(work, f"{tag}_int8.onnx"), fingerprint=vmap.fingerprint,
                                              int8=True, calibration_paths=calib).onnx_path
    print(f"exported {', '.join(out)} in {time.perf_counter() - t0:.1f} s")
    del enc, vmap
    return out


# --- one variant through the graph --------------------------------------------------------------

def write_params(path: str, map_path: str, device: str, runtime: str, onnx_path: Optional[str],
                 segmentation: Optional[Dict]) -> str:
    """The graph's parameter YAML: config/lund_graph.yaml's sections with the bench's settings."""
    with open(os.path.join(REPO_ROOT, "config", "lund_graph.yaml")) as f:
        base = yaml.safe_load(f)
    att = dict(base["attention_node"]["ros__parameters"])
    att.update({"map_path": map_path, "device": device, "publish_attention": False,
                "publish_patch_descriptors": False, "publish_patch_netvlad": False, "queue_depth": 4,
                # lossless: a reliable camera subscription (the live default is sensor-data QoS)
                "qos_overrides": {"/image": {"subscription": {"reliability": "reliable", "depth": 10}}}})
    att["runtime"] = runtime
    att["onnx_path"] = onnx_path or ""
    loc = dict(base["vpr_localizer"]["ros__parameters"])
    loc.update({"map_path": map_path, "queue_depth": 4})
    doc = {"attention_node": {"ros__parameters": att}, "vpr_localizer": {"ros__parameters": loc}}
    if segmentation is not None:
        att.update({"use_labels": True, "labels_wait_s": 5.0})  # the plain map only synchronises them
        doc["segmentation_node"] = {"ros__parameters": {
            **segmentation, "device": device, "publish_overlay": False,
            "qos_overrides": {"/image": {"subscription": {"reliability": "reliable", "depth": 10}}}}}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


class Probe:
    """A node in the graph's context: publishes camera frames, records poses and diagnostics."""

    def __init__(self, graph):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from sensor_msgs.msg import Image

        from vpr_ros.qos import reliable_qos

        self.graph = graph
        self.node = rclpy.create_node("bench_probe", context=graph.context)
        self.lock = threading.Lock()
        self.pose_at: Dict[tuple, float] = {}
        self.events: Dict[tuple, threading.Event] = {}
        self.diag: Dict[str, List[Dict[str, str]]] = {}
        self.pub = self.node.create_publisher(Image, "image", reliable_qos(depth=10))
        self.node.create_subscription(PoseWithCovarianceStamped, "vpr/pose", self._pose, reliable_qos(depth=50))
        self.node.create_subscription(DiagnosticArray, "diagnostics", self._diag, reliable_qos(depth=200))
        graph.executor.add_node(self.node)

    def _pose(self, msg) -> None:
        t = time.perf_counter()
        key = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
        with self.lock:
            self.pose_at.setdefault(key, t)
            ev = self.events.get(key)
        if ev is not None:
            ev.set()

    def _diag(self, arr) -> None:
        with self.lock:
            for s in arr.status:
                self.diag.setdefault(s.name, []).append({kv.key: kv.value for kv in s.values})

    def n_diag(self, name: str) -> int:
        with self.lock:
            return len(self.diag.get(name, []))

    def last_diag(self, name: str) -> Dict[str, str]:
        with self.lock:
            return dict(self.diag[name][-1]) if self.diag.get(name) else {}

    def wait_subscribers(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pub.get_subscription_count() < n or self.node.count_publishers("vpr/pose") < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"discovery: {self.pub.get_subscription_count()} of {n} image subscribers")
            time.sleep(0.05)

    def send(self, msg, key) -> float:
        """Publish one frame and wait for its pose: end-to-end seconds."""
        ev = threading.Event()
        with self.lock:
            self.events[key] = ev
        t0 = time.perf_counter()
        self.pub.publish(msg)
        if not ev.wait(POSE_TIMEOUT_S):
            raise RuntimeError(f"no vpr/pose for frame {key} within {POSE_TIMEOUT_S:.0f} s")
        with self.lock:
            return self.pose_at[key] - t0

    def wait_diag(self, names, counts, timeout: float = 30.0) -> None:
        """Wait until each node published its diagnostics for the frame (they follow the pose's
        publication: the localizer publishes after the pose, the others before)."""
        deadline = time.monotonic() + timeout
        while any(self.n_diag(n) < c for n, c in zip(names, counts)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"diagnostics missing: {[(n, self.n_diag(n), c) for n, c in zip(names, counts)]}")
            time.sleep(0.002)

    def close(self) -> None:
        self.graph.executor.remove_node(self.node)
        self.node.destroy_node()


def run_variant(name: str, params_file: str, frames: List[np.ndarray], n_frames: int, warmup: int,
                cuda: bool) -> Dict:
    """Start the graph, send ``warmup`` + ``n_frames`` frames one at a time, stop it: the variant's row."""
    from std_msgs.msg import Header

    from vpr_ros.convert import rgb_to_image_msg, sec_to_stamp
    from vpr_ros.graph import Graph

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_mb()
    t_start = time.perf_counter()
    graph = Graph(params_file)
    startup_s = time.perf_counter() - t_start
    probe = None
    e2e, stages = [], {}
    try:
        probe = Probe(graph)
        nodes = list(graph.names)
        probe.wait_subscribers(sum(1 for n in nodes if n in ("attention_node", "segmentation_node")))
        att = graph.node("attention_node")
        base = 1000
        wall = 0.0
        for i in range(warmup + n_frames):
            rgb = frames[i % len(frames)]
            key = (base + i, 0)
            msg = rgb_to_image_msg(rgb, Header(stamp=sec_to_stamp(float(base + i)), frame_id="camera"))
            t0 = time.perf_counter()
            dt = probe.send(msg, key)
            probe.wait_diag(nodes, [i + 1] * len(nodes))
            if i >= warmup:
                wall += time.perf_counter() - t0
                e2e.append(1e3 * dt)
                for node in nodes:
                    d = probe.last_diag(node)
                    for (n, k), stage in STAGES.items():
                        if n == node and k in d:
                            stages.setdefault(stage, []).append(float(d[k]))
        diag = probe.last_diag("attention_node")
        row = {"variant": name, "runtime": diag.get("runtime", "torch"),
               "precision": diag.get("onnx_precision", "fp32"),
               "provider": diag.get("onnx_provider", str(getattr(att.encoder, "device", ""))),
               "nodes": nodes, "frames": n_frames, "warmup": warmup, "startup_s": round(startup_s, 2),
               "end_to_end_ms": stats_ms(e2e), "stages_ms": {k: stats_ms(v) for k, v in stages.items()},
               "fps": round(n_frames / wall, 3) if wall > 0 else float("nan"),
               "descriptor_dim": int(diag.get("descriptor_dim", 0)),
               "rss_mb": round(rss_mb(), 1), "rss_delta_mb": round(rss_mb() - rss0, 1),
               "peak_rss_mb_so_far": round(peak_rss_mb(), 1)}
        if cuda:
            row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        return row
    finally:
        if probe is not None:
            probe.close()
        graph.shutdown()


# --- main ---------------------------------------------------------------------------------------

def print_table(rows: List[Dict]) -> None:
    ref = next((r for r in rows if r.get("variant") == "torch" and "error" not in r), None)
    cols = ["att_decode", "encode", "att_publish", "search", "pose", "loc_publish"]
    if any("seg_segment" in r.get("stages_ms", {}) for r in rows):
        cols = ["seg_segment", "att_labels_wait"] + cols
    head = f"{'variant':<18}{'e2e med':>9}{'e2e p95':>9}{'fps':>7}" + "".join(f"{c:>{max(13, len(c) + 2)}}" for c in cols) \
        + f"{'RSS MB':>9}{'x e2e':>7}{'x enc':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<18} failed: {r['error']}")
            continue
        st = r["stages_ms"]
        line = f"{r['variant']:<18}{r['end_to_end_ms']['median']:>9.1f}{r['end_to_end_ms']['p95']:>9.1f}{r['fps']:>7.2f}"
        line += "".join(f"{st[c]['median']:>{max(13, len(c) + 2)}.2f}" if c in st else f"{'-':>{max(13, len(c) + 2)}}"
                        for c in cols)
        line += f"{r['rss_mb']:>9.0f}"
        if ref is not None:
            line += f"{r['end_to_end_ms']['median'] / ref['end_to_end_ms']['median']:>7.2f}"
            line += f"{st['encode']['median'] / ref['stages_ms']['encode']['median']:>7.2f}"
        print(line)
    print("(medians in ms; stage columns from the nodes' diagnostics; x = ratio of the median to torch in this run)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("VPR_SHARED_DIR", os.path.join(REPO_ROOT, "..", "shared")))
    ap.add_argument("--frames", type=int, default=30, help="timed frames per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed frames first")
    ap.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"),
                    help="camera frame size and network input size (the map is built at it)")
    ap.add_argument("--clusters", type=int, default=16, help="NetVLAD clusters of the map")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (nodes and ONNX Runtime providers)")
    ap.add_argument("--int8", action="store_true", help="also the int8 ONNX export")
    ap.add_argument("--calibration-images", type=int, default=4, help="int8 calibration keyframes")
    ap.add_argument("--segmentation", nargs="?", const="espnetv2", default=None,
                    help="also run segmentation_node with this backend (default espnetv2, shared weights)")
    ap.add_argument("--work", help="directory for the map and ONNX files (kept; default a temporary one)")
    ap.add_argument("--out", default=os.path.normpath(os.path.join(REPO_ROOT, "results", "bench_pipeline.json")))
    args = ap.parse_args()

    shared = os.path.abspath(args.shared)
    weights = os.path.join(shared, "weights", VGG_FILE)
    lund_dir = os.path.join(shared, "datasets", "lund_gps")
    if not os.path.isfile(weights) or not os.path.isdir(lund_dir):
        sys.exit(f"missing data: {weights} or {lund_dir}")
    size = tuple(int(v) for v in args.image_size)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    segmentation = None
    if args.segmentation:
        segmentation = {"backend": args.segmentation}
        if args.segmentation == "espnetv2":
            segmentation["weights"] = os.path.join(shared, "weights", SEG_WEIGHTS)
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 101)))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="bench_pipeline_")
    os.makedirs(work, exist_ok=True)
    try:
        map_path = build_or_reuse_map(work, lund_dir, weights, size, args.clusters, args.device)
        onnx = export_variants(map_path, work, args.int8, args.calibration_images)
        frames = [resize_image(load_image(r.path), size) for r in load_records(lund_dir, gps="exif", parity="odd")]
        variants = [("torch", "torch", None)] + [(v, "onnxruntime", p) for v, p in onnx.items()]
        rows = []
        for name, runtime, path in variants:
            params = write_params(os.path.join(work, f"params_{name}.yaml"), map_path, args.device, runtime, path,
                                  segmentation)
            t0 = time.perf_counter()
            try:
                rows.append(run_variant(name, params, frames, args.frames, args.warmup, cuda))
            except (VprError, RuntimeError) as exc:  # e.g. no GPU provider for onnxruntime: keep the others
                rows.append({"variant": name, "runtime": runtime, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: {time.perf_counter() - t0:.1f} s")
        ref = next((r for r in rows if r["variant"] == "torch" and "error" not in r), None)
        for r in rows:
            if ref is not None and "error" not in r:
                r["vs_torch"] = {
                    "end_to_end_median": round(r["end_to_end_ms"]["median"] / ref["end_to_end_ms"]["median"], 3),
                    "encode_median": round(r["stages_ms"]["encode"]["median"] / ref["stages_ms"]["encode"]["median"], 3),
                    "fps": round(r["fps"] / ref["fps"], 3)}
        print_table(rows)
        import onnxruntime

        write_results(args.out, rows, torch.device(args.device), image_size=list(size), clusters=args.clusters,
                      frames=args.frames, warmup=args.warmup, segmentation=args.segmentation,
                      onnxruntime=onnxruntime.__version__, onnxruntime_providers=onnxruntime.get_available_providers(),
                      map_keyframes=14, query_frames=len(frames), publish_attention=False,
                      note="frames sent one at a time (each waits for its pose): no queueing in the latency; "
                           "cuda_max_allocated_mb counts torch allocations only")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
