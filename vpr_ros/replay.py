"""Publish a rosbag2 with its original timing (``vpr-localizer replay BAG --rate R``).

Messages are read raw with ``rosbags`` and handed to rclpy as serialized CDR
(``rclpy.serialization.deserialize_message``), so any standard message type replays without
a conversion table, with its original header stamps.
"""
from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from vpr_localizer.io.bags import _bag_errors, _open_reader
from vpr_localizer.errors import DatasetError

from .qos import reliable_qos, sensor_qos


def message_class(msgtype: str):
    """``sensor_msgs/msg/Image`` -> the rclpy class ``sensor_msgs.msg.Image``.

    Raises:
        DatasetError: the message package is not installed.
    """
    pkg, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise DatasetError(f"message type {msgtype} is not available in this ROS installation") from exc


SENSOR_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
#: Longest wait of a reliable replay for its image publishers to match a subscriber, s.
MATCH_TIMEOUT_S = 15.0


@dataclass
class ReplayStats:
    """What a replay published: messages per topic, wall duration (s), bag duration (s)."""

    published: Dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    bag_s: float = 0.0


def replay_bag(node, bag_path: str, rate: float = 1.0, topics: Optional[Sequence[str]] = None,
               remap: Optional[Dict[str, str]] = None, stop: Optional[threading.Event] = None,
               start_delay_s: float = 0.0, reliable: bool = False) -> ReplayStats:
    """Publish a bag's messages from ``node`` with their original relative timing.

    Args:
        node: an rclpy node to create the publishers on.
        bag_path: rosbag2 directory or storage file.
        rate: speed factor (2.0 = twice as fast); > 0.
        topics: only these bag topics (default all).
        remap: bag topic -> published topic name.
        stop: set this event to stop early.
        start_delay_s: wait this long after creating the publishers (lets subscribers match).
        reliable: publish image topics reliable (depth 10) too, for lossless replay into
            subscribers whose ``qos_overrides`` ask for reliability (see ``qos.sensor_subscription``);
            the replay then also waits (up to :data:`MATCH_TIMEOUT_S`) until every image publisher
            has matched a subscriber, so no frame is sent into the void on a loaded machine.

    Image topics are published with sensor-data QoS (best effort: frames may be lost under load,
    as from a real camera) unless ``reliable``; everything else reliable.

    Raises:
        DatasetError: missing/corrupt bag or unknown message type.
        ValueError: rate <= 0.
    """
    from rclpy.serialization import deserialize_message

    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    remap = remap or {}
    reader = _open_reader(bag_path)
    stats = ReplayStats()
    try:
        conns = [c for c in reader.connections if topics is None or c.topic in topics]
        pubs, classes = {}, {}
        for c in conns:
            if c.topic in pubs:
                continue
            classes[c.topic] = message_class(c.msgtype)
            qos = sensor_qos(depth=5) if c.msgtype in SENSOR_TYPES and not reliable else reliable_qos()
            pubs[c.topic] = node.create_publisher(classes[c.topic], remap.get(c.topic, c.topic), qos)
        if reliable:  # lossless replay: a message sent before its subscriber matched is lost for good
            sensors = [pubs[c.topic] for c in conns if c.msgtype in SENSOR_TYPES]
            deadline = time.monotonic() + MATCH_TIMEOUT_S
            while time.monotonic() < deadline and any(p.get_subscription_count() < 1 for p in sensors):
                if stop is not None and stop.is_set():
                    break
                time.sleep(0.02)  # polling rclpy's match state (no event for it in rclpy)
        if start_delay_s > 0:
            time.sleep(start_delay_s)
        t_wall0 = time.monotonic()
        t_bag0 = None
        try:
            for conn, t_ns, raw in reader.messages(connections=conns):
                if stop is not None and stop.is_set():
                    break
                if t_bag0 is None:
                    t_bag0 = t_ns
                due = (t_ns - t_bag0) * 1e-9 / rate
                wait = due - (time.monotonic() - t_wall0)
                if wait > 0:
                    if stop is not None:
                        if stop.wait(wait):
                            break
                    else:
                        time.sleep(wait)
                pubs[conn.topic].publish(deserialize_message(bytes(raw), classes[conn.topic]))
                stats.published[conn.topic] = stats.published.get(conn.topic, 0) + 1
                stats.bag_s = (t_ns - t_bag0) * 1e-9
        except _bag_errors() as exc:
            raise DatasetError(f"bag {bag_path} is corrupt: {exc}") from exc
        stats.wall_s = time.monotonic() - t_wall0
    finally:
        reader.close()
        for p in locals().get("pubs", {}).values():
            node.destroy_publisher(p)
    return stats
