"""``segmentation_node``: camera image -> Cityscapes trainId labels (+ a colour overlay for RViz).

Subscribes (sensor-data QoS, newest frame only):
    ``image`` (sensor_msgs/Image: rgb8, bgr8, rgba8, bgra8, mono8, mono16), or, with
    ``compressed: true``, ``image/compressed`` (sensor_msgs/CompressedImage, JPEG/PNG).
Publishes (reliable QoS):
    ``segmentation/labels`` (sensor_msgs/Image, mono8, one trainId per pixel: 0..18 the
    Cityscapes train classes, 19 background/ignore; same size and header as the camera image),
    ``segmentation/overlay`` (sensor_msgs/Image, rgb8, the Cityscapes colours blended over the
    image, ignore pixels left as they are; only when ``publish_overlay``),
    ``diagnostics`` (diagnostic_msgs/DiagnosticArray: backend, per-stage latency, static /
    dynamic / sky / ignore pixel fractions, frame counters).
Parameters: ``backend`` (``none`` | ``espnetv2`` | ``espnet`` | ``panoptic_deeplab``; default
``none``), ``weights`` (path, ``""`` = backend default), ``device`` (``auto``/``cpu``/``cuda``),
``compressed`` (bool), ``publish_overlay`` (bool). The overlay uses alpha 0.5 (:data:`OVERLAY_ALPHA`).

Backend ``none`` does no segmentation: every pixel is labelled 19 (ignore). It keeps the topic
interface alive until the real backends exist; downstream it means "weight every pixel equally".

An unknown or unavailable backend is fatal (the constructor raises
:class:`~vpr_localizer.errors.WeightsError`); a bad frame is logged and dropped, and the node
keeps running.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image

from vpr_localizer.segmentation.classes import coarse_fractions, make_backend, overlay
from vpr_ros.convert import image_msg_to_rgb, labels_to_msg, rgb_to_image_msg
from vpr_ros.diagnostics import OK, WARN, diagnostics_msg
from vpr_ros.latest import LatestFrameWorker
from vpr_ros.qos import reliable_qos, sensor_subscription

NODE_NAME = "segmentation_node"
OVERLAY_ALPHA = 0.5  #: opacity of the label colours in ``segmentation/overlay``


class SegmentationNode(Node):
    """The ``segmentation_node`` node (see module doc).

    Raises:
        WeightsError: unknown backend name, or a backend that is not implemented yet / cannot
            load its weights.
    """

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.declare_parameter("backend", "none")
        self.declare_parameter("weights", "")
        self.declare_parameter("device", "auto")
        self.declare_parameter("compressed", False)
        self.declare_parameter("publish_overlay", True)
        name = str(self.get_parameter("backend").value)
        weights = str(self.get_parameter("weights").value) or None
        device = str(self.get_parameter("device").value)
        self.compressed = bool(self.get_parameter("compressed").value)
        self.publish_overlay = bool(self.get_parameter("publish_overlay").value)
        t0 = time.perf_counter()
        try:
            self.backend = make_backend(name, weights=weights, device=device)  # WeightsError: fatal
        except BaseException:
            super().destroy_node()  # release the node now (else the context destroys it at shutdown)
            raise
        self.pub_labels = self.create_publisher(Image, "segmentation/labels", reliable_qos())
        self.pub_overlay = (self.create_publisher(Image, "segmentation/overlay", reliable_qos())
                            if self.publish_overlay else None)
        self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", reliable_qos())
        self.worker = LatestFrameWorker(self._process, self.get_logger(), NODE_NAME)
        if self.compressed:
            self.sub = sensor_subscription(self, CompressedImage, "image/compressed", self.worker.offer)
        else:
            self.sub = sensor_subscription(self, Image, "image", self.worker.offer)
        what = ("no segmentation: every pixel labelled 19 (ignore)" if self.backend.name == "none"
                else f"weights {weights or 'default'}, device {device}")
        self.get_logger().info(
            f"backend {self.backend.name} ({what}), ready in {time.perf_counter() - t0:.2f} s; "
            f"input {self.sub.topic_name} ({'CompressedImage' if self.compressed else 'Image'})")

    def _process(self, msg) -> None:
        t0 = time.perf_counter()
        rgb = image_msg_to_rgb(msg)  # ImageLoadError on a bad frame: logged by the worker
        t1 = time.perf_counter()
        labels = self.backend(rgb)
        if not (isinstance(labels, np.ndarray) and labels.dtype == np.uint8 and labels.shape == rgb.shape[:2]):
            raise ValueError(f"backend {self.backend.name} returned {getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{getattr(labels, 'shape', '')}, expected uint8 {rgb.shape[:2]}")
        t2 = time.perf_counter()
        self.pub_labels.publish(labels_to_msg(labels, msg.header))
        if self.pub_overlay is not None:
            self.pub_overlay.publish(rgb_to_image_msg(overlay(rgb, labels, OVERLAY_ALPHA), msg.header, "rgb8"))
        t3 = time.perf_counter()
        st = self.worker.stats
        values = {"backend": self.backend.name, "width": rgb.shape[1], "height": rgb.shape[0],
                  "decode_ms": 1e3 * (t1 - t0), "segment_ms": 1e3 * (t2 - t1), "publish_ms": 1e3 * (t3 - t2)}
        values.update({f"{k}_fraction": v for k, v in coarse_fractions(labels).items()})
        # the worker counts this frame as processed only after _process returns: hence + 1
        values.update({"received": st.received, "processed": st.processed + 1, "dropped": st.dropped,
                       "errors": st.errors})
        self.pub_diag.publish(diagnostics_msg(
            self.get_clock().now().to_msg(), NODE_NAME, OK if st.errors == 0 else WARN,
            "segmenting" if st.errors == 0 else f"{st.errors} bad image message(s); last: {st.last_error}",
            values))

    def destroy_node(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()
        return super().destroy_node()


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point ``segmentation_node``: see :func:`vpr_ros.spin.spin_single_node`."""
    from vpr_ros.spin import spin_single_node

    return spin_single_node(SegmentationNode, NODE_NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
