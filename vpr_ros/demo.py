"""The ROS main job: map one real traversal, replay the other as a bag through the node graph.

``vpr-localizer demo --ros`` (default scenario ``lund_odd_vs_even``):

1. build a map from the scenario's map images (``build-map`` code path);
2. pack the query images and their GPS into a rosbag2 (``make-bag`` code path);
3. start ``attention_node`` + ``vpr_localizer`` in one process (``run`` code path);
4. replay the bag into the graph (``replay`` code path) and collect ``vpr/pose``;
5. score the published poses against the queries' ground truth: error in metres, within 3 m
   and 25 m, and account for every frame: published by the replay, received by
   ``attention_node`` (the difference was lost in transport), dropped or failed in each node,
   poses received.

The replay is lossless by default (reliable image QoS into a reliable subscription and worker
queues deep enough for the whole bag's bursts, as the graph tests), so a loaded machine gives
the same poses, only later; ``lossless=False`` replays as a live camera (best effort, newest
frame only) and the counts show what was lost where.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, Optional

import numpy as np
import yaml

from vpr_localizer.io.bags import make_bag
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.trained import default_checkpoint

#: the encoder checkpoint of the demo's map: what ``vpr-localizer demo`` uses offline too
DEFAULT_CHECKPOINT = default_checkpoint("vgg16")
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import DatasetError
from vpr_localizer.mapping.build import build_map, datum_for, localize_records
from vpr_localizer.evaluation.scenarios import VGG16_WEIGHTS, get_scenario

LOG = logging.getLogger("vpr_localizer.demo")
LOSSLESS_QUEUE_DEPTH = 64   # worker queue of a lossless replay: a whole demo bag's burst
SETTLE_GRACE_S = 2.0        # counters settled: wait this long for frames still in transport


def ros_demo(shared: str, out_dir: str, scenario: str = "lund_odd_vs_even", rate: float = 0.25,
             bag_rate_hz: float = 2.0, image_size: Optional[tuple] = None, timeout_s: float = 600.0,
             lossless: bool = True, checkpoint: Optional[str] = DEFAULT_CHECKPOINT) -> Dict:
    """Run the ROS demo; returns (and writes ``out_dir/ros_demo.json``) the metrics.

    Args:
        shared: folder holding ``datasets/`` and ``weights/``.
        out_dir: where the map, the bag and the metrics go (overwritten).
        scenario: a scenario with metric ground truth (see :mod:`vpr_localizer.evaluation.scenarios`).
        rate: replay speed factor; low enough that the attention node keeps up (it drops stale
            frames by design, which the metrics report).
        bag_rate_hz: image rate written into the bag, Hz.
        image_size: network input (W, H); default the scenario's.
        timeout_s: give up waiting for poses after this long, s.
        lossless: reliable replay and deep worker queues (module doc); False = live-camera QoS.
        checkpoint: encoder checkpoint of the map (a shipped name or a file; None / "none" =
            untrained ImageNet + k-means); default the shipped Nordland-trained conv5.

    Raises:
        DatasetError: the scenario has no metric ground truth, or data is missing.
    """
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.node import Node

    from .graph import Graph
    from .qos import reliable_qos
    from .replay import replay_bag

    sc = get_scenario(scenario)
    if sc.gt.kind != "position":
        raise DatasetError(f"scenario {scenario} has no metric ground truth; the ROS demo needs one")
    datasets = os.path.join(shared, "datasets")
    os.makedirs(out_dir, exist_ok=True)
    map_recs, query_recs = sc.map.load(datasets), sc.queries.load(datasets)
    cfg = EncoderConfig(weights=os.path.join(shared, VGG16_WEIGHTS), image_size=image_size or sc.image_size,
                        checkpoint=checkpoint)
    map_dir = os.path.join(out_dir, "map")
    report = build_map(map_recs, Encoder(cfg), map_dir, overwrite=True)
    LOG.info("map: %d keyframes in %s", report.keyframes, map_dir)
    bag = os.path.join(out_dir, "queries_bag")
    if os.path.exists(bag):
        import shutil
        shutil.rmtree(bag)
    summary = make_bag(query_recs, bag, rate_hz=bag_rate_hz, progress=False)
    written = [r for r in query_recs if r.path not in {s["path"] for s in summary["skipped"]}]
    stamps = [summary["start_ns"] + int(round(k * 1e9 / bag_rate_hz)) for k in range(len(written))]
    truth = localize_records(written, datum_for(map_recs))
    params = os.path.join(out_dir, "graph.yaml")
    with open(params, "w") as f:
        extra = ({"queue_depth": LOSSLESS_QUEUE_DEPTH,
                  "qos_overrides": {"/image": {"subscription": {"reliability": "reliable", "depth": 10}}}}
                 if lossless else {})
        yaml.safe_dump({"attention_node": {"ros__parameters": {"map_path": map_dir, **extra}},
                        "vpr_localizer": {"ros__parameters": {"map_path": map_dir,
                                                              **({"queue_depth": LOSSLESS_QUEUE_DEPTH}
                                                                 if lossless else {})}}}, f)
    graph = Graph(params)
    poses: Dict[int, np.ndarray] = {}
    try:
        collector = Node("vpr_demo_collector", context=graph.context)
        collector.create_subscription(
            PoseWithCovarianceStamped, "vpr/pose",
            lambda m: poses.__setitem__(m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec,
                                        np.array([m.pose.pose.position.x, m.pose.pose.position.y])),
            reliable_qos(depth=50))
        graph.executor.add_node(collector)
        player = Node("vpr_demo_player", context=graph.context)
        t0 = time.monotonic()
        stats = replay_bag(player, bag, rate=rate, remap={"/camera/image_raw": "image"}, start_delay_s=2.0,
                           reliable=lossless)
        sent = stats.published.get("/camera/image_raw", 0)
        attention, localizer = graph.node("attention_node"), graph.node("vpr_localizer")
        att, loc = attention.worker.stats, localizer.worker.stats

        def settled() -> bool:
            """Every frame that reached attention_node is accounted for downstream: processed or
            lost there, every descriptor handled by vpr_localizer, every pose it published received
            (the localizer counts a frame after publishing its pose)."""
            return (attention.worker.idle() and att.processed + att.dropped + att.errors == att.received
                    and localizer.worker.idle() and loc.received >= att.processed
                    and loc.processed + loc.dropped + loc.errors == loc.received and len(poses) >= loc.processed)

        # poll the counters (the executor runs in its own threads) until settled or out of time;
        # frames still in transport keep att.received < sent for a moment, hence the grace period
        t_settled = None
        while time.monotonic() - t0 < timeout_s and len(poses) < sent:
            if settled():
                t_settled = t_settled or time.monotonic()
                if att.received >= sent or time.monotonic() - t_settled > SETTLE_GRACE_S:
                    break
            else:
                t_settled = None
            time.sleep(0.1)
        counts = {"published": int(sent), "received_attention": int(att.received),
                  "lost_in_transport": int(sent - att.received), "dropped_attention": int(att.dropped),
                  "errors_attention": int(att.errors), "received_localizer": int(loc.received),
                  "dropped_localizer": int(loc.dropped), "errors_localizer": int(loc.errors)}
    finally:
        graph.shutdown()
    errors, missing = [], 0
    for r, t in zip(truth, stamps):
        p = poses.get(t)
        if p is None:
            missing += 1
            continue
        errors.append(float(np.hypot(p[0] - r.x, p[1] - r.y)))
    err = np.asarray(errors)
    metrics = {
        "scenario": scenario, "queries": len(truth), "poses_received": len(err),
        "frames_dropped": counts["dropped_attention"] + counts["dropped_localizer"], "frames": counts,
        "lossless": bool(lossless), "replay_rate": rate, "bag_rate_hz": bag_rate_hz,
        "mean_error_m": float(err.mean()) if err.size else None,
        "median_error_m": float(np.median(err)) if err.size else None,
        "within_3m": int((err <= 3.0).sum()), "within_25m": int((err <= 25.0).sum()),
        "errors_m": [round(e, 3) for e in errors],
    }
    lost = len(truth) - len(err)
    (LOG.warning if lost else LOG.info)(
        "frames: %d published, %d reached attention_node (%d lost in transport), %d + %d dropped and "
        "%d + %d failed in attention_node + vpr_localizer, %d poses for %d queries%s",
        counts["published"], counts["received_attention"], counts["lost_in_transport"],
        counts["dropped_attention"], counts["dropped_localizer"], counts["errors_attention"],
        counts["errors_localizer"], len(err), len(truth), f": {lost} LOST" if lost else "")
    with open(os.path.join(out_dir, "ros_demo.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
