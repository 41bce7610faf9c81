"""Soak: a long camera stream through attention_node -> vpr_localizer in one process.

Real Lund frames (cycled) are published as sensor_msgs/Image with sensor-data QoS at a fixed
rate, as a live camera would, into the graph with its live defaults (newest-frame workers, best
effort camera subscription). Reported: frames published, received by attention_node (the rest
were lost in transport), dropped by each node's newest-frame policy, failed, poses received, and
the process's resident memory (RSS) at the start, after warm-up and at the end (growth per 1,000
frames), so that a leak or an unbounded queue shows up.

    python benchmarks/soak.py --frames 2000 --rate 5      # writes results/soak.json

It builds its own small map (the even Lund frames at ``--image-size``, K=16) in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def rss_mb() -> float:
    """Resident set size of this process, MB (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=5.0, help="camera rate, Hz")
    ap.add_argument("--image-size", type=int, nargs=2, default=(160, 120), metavar=("W", "H"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=None, help="folder for the map (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "results" / "soak.json"))
    args = ap.parse_args(argv)

    from rclpy.node import Node
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from vpr_localizer.io.image_files import load_image, resize_image
    from vpr_localizer.io.records import load_records
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_ros.convert import rgb_to_image_msg, sec_to_stamp
    from vpr_ros.graph import Graph
    from vpr_ros.qos import reliable_qos, sensor_qos

    work = Path(args.work or tempfile.mkdtemp(prefix="vpr_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    lund = os.path.join(args.shared, "datasets", "lund_gps")
    weights = os.path.join(args.shared, "weights", "vgg16_features_imagenet_caffe_bgr.pth")
    cfg = EncoderConfig(weights=weights, image_size=tuple(args.image_size), num_clusters=16, device="cpu")
    build_map(load_records(lund, gps="exif", parity="even"), Encoder(cfg), str(work / "map"), overwrite=True,
              progress=False)
    # camera frames: the odd Lund images at twice the network input (the node resizes them)
    frames = [resize_image(load_image(r.path), (2 * args.image_size[0], 2 * args.image_size[1]))
              for r in load_records(lund, gps="exif", parity="odd")]
    params = work / "soak.yaml"
    params.write_text(yaml.safe_dump({"attention_node": {"ros__parameters": {"map_path": str(work / "map"),
                                                                             "device": "cpu"}},
                                      "vpr_localizer": {"ros__parameters": {"map_path": str(work / "map")}}}))
    rss0 = rss_mb()
    graph = Graph(str(params))
    poses = [0]
    try:
        probe = Node("soak_probe", context=graph.context)
        probe.create_subscription(PoseWithCovarianceStamped, "vpr/pose",
                                  lambda m: poses.__setitem__(0, poses[0] + 1), reliable_qos(depth=50))
        pub = probe.create_publisher(Image, "image", sensor_qos())
        graph.executor.add_node(probe)
        t_wait = time.monotonic()
        while pub.get_subscription_count() < 1 and time.monotonic() - t_wait < 15.0:
            time.sleep(0.05)  # discovery (a real camera would simply publish)
        att, loc = graph.node("attention_node").worker, graph.node("vpr_localizer").worker
        period = 1.0 / args.rate
        warm = min(100, args.frames // 10)
        rss_warm = None
        t0 = time.monotonic()
        samples = []
        for i in range(args.frames):
            target = t0 + i * period
            now = time.monotonic()
            if target > now:
                time.sleep(target - now)  # pacing the camera, not synchronisation
            pub.publish(rgb_to_image_msg(frames[i % len(frames)],
                                         Header(stamp=sec_to_stamp(1_800_000_000.0 + i * period), frame_id="camera")))
            if i + 1 == warm:
                rss_warm = rss_mb()
            if (i + 1) % max(1, args.frames // 20) == 0:
                samples.append({"frame": i + 1, "rss_mb": round(rss_mb(), 1), "poses": poses[0]})
                print(f"{i + 1}/{args.frames} frames, {poses[0]} poses, RSS {rss_mb():.0f} MB", flush=True)
        wall = time.monotonic() - t0
        t_end = time.monotonic()
        while not (att.idle() and loc.idle()) and time.monotonic() - t_end < 30.0:
            time.sleep(0.05)
        time.sleep(0.5)  # last pose in flight to the probe (a benchmark, not a test)
        rss_end = rss_mb()
        a, l_ = att.stats, loc.stats
        growth = (rss_end - rss_warm) / max(args.frames - warm, 1) * 1000.0 if rss_warm else float("nan")
        out = {"frames_published": args.frames, "rate_hz": args.rate, "wall_s": round(wall, 1),
               "image_size": list(args.image_size), "received_attention": a.received,
               "lost_in_transport": args.frames - a.received, "dropped_attention": a.dropped,
               "errors_attention": a.errors, "processed_attention": a.processed,
               "received_localizer": l_.received, "dropped_localizer": l_.dropped, "errors_localizer": l_.errors,
               "poses": poses[0], "encode_ms_last": round(1e3 * a.last_seconds, 1),
               "rss_mb_start": round(rss0, 1), "rss_mb_after_warmup": round(rss_warm or float("nan"), 1),
               "rss_mb_end": round(rss_end, 1), "rss_growth_mb_per_1000_frames": round(growth, 2),
               "samples": samples}
    finally:
        graph.shutdown()
    write_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
