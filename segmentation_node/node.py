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
Parameters (:class:`SegmentationParams`): ``backend`` (``none`` | ``espnetv2`` | ``espnet`` |
``panoptic_deeplab``; default ``none``), ``weights`` (path, ``""`` = backend default), ``device``
(``auto``/``cpu``/``cuda``), ``compressed`` (bool), ``publish_overlay`` (bool). The overlay uses
alpha 0.5 (:data:`OVERLAY_ALPHA`).

Backend ``none`` does no segmentation: every pixel is labelled 19 (ignore). It keeps the topic
interface alive until the real backends exist; downstream it means "weight every pixel equally".

An unknown or unavailable backend is fatal (the constructor raises
:class:`~vpr_localizer.errors.WeightsError`, or :class:`~vpr_localizer.errors.ConfigError` for an
invalid device); a bad frame (undecodable message, or an image every backend refuses with
:class:`~vpr_localizer.errors.ImageLoadError`) is logged and dropped, and the node keeps running.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from sensor_msgs.msg import Image

from vpr_localizer.segmentation.classes import coarse_fractions, overlay
from vpr_localizer.segmentation.registry import make_backend
from vpr_ros.convert import image_msg_to_rgb, labels_to_msg, rgb_to_image_msg
from vpr_ros.params import declare_params
from vpr_ros.qos import camera_subscription, reliable_qos
from vpr_ros.spin import spin_single_node
from vpr_ros.worker_node import WorkerNode

NODE_NAME = "segmentation_node"
OVERLAY_ALPHA = 0.5  #: opacity of the label colours in ``segmentation/overlay``


@dataclass
class SegmentationParams:
    """Parameters of ``segmentation_node`` (:func:`vpr_ros.params.declare_params`).

    Attributes:
        backend: ``none`` | ``espnetv2`` | ``espnet`` | ``panoptic_deeplab``.
        weights: the backend's weight file; "" = the backend's default.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        compressed: subscribe sensor_msgs/CompressedImage on ``image/compressed`` instead of
            sensor_msgs/Image on ``image``.
        publish_overlay: publish ``segmentation/overlay`` (rgb8, labels blended over the image).
    """

    backend: str = "none"
    weights: Optional[str] = None
    device: str = "auto"
    compressed: bool = False
    publish_overlay: bool = True


class SegmentationNode(WorkerNode):
    """The ``segmentation_node`` node (see module doc).

    Raises:
        WeightsError: unknown backend name, or a backend that cannot load its weights.
        ConfigError: invalid ``device``.
    """

    NAME, OK_MESSAGE, BAD_INPUT = NODE_NAME, "segmenting", "image message"

    def _setup(self) -> None:
        self.params = p = declare_params(self, SegmentationParams)
        self.compressed, self.publish_overlay = p.compressed, p.publish_overlay
        t0 = time.perf_counter()
        self.backend = make_backend(p.backend, weights=p.weights, device=p.device)  # WeightsError: fatal
        self.pub_labels = self.create_publisher(Image, "segmentation/labels", reliable_qos())
        self.pub_overlay = (self.create_publisher(Image, "segmentation/overlay", reliable_qos())
                            if self.publish_overlay else None)
        self.sub = camera_subscription(self, self.compressed, self.start_worker().offer)
        what = ("no segmentation: every pixel labelled 19 (ignore)" if self.backend.name == "none"
                else f"weights {p.weights or 'default'}, device {p.device}")
        self.get_logger().info(
            f"backend {self.backend.name} ({what}), ready in {time.perf_counter() - t0:.2f} s; "
            f"input {self.sub.topic_name} ({'CompressedImage' if self.compressed else 'Image'})")

    def _process(self, msg) -> None:
        self.check_stamp(msg.header)
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
        values = {"backend": self.backend.name, "width": rgb.shape[1], "height": rgb.shape[0],
                  "decode_ms": 1e3 * (t1 - t0), "segment_ms": 1e3 * (t2 - t1), "publish_ms": 1e3 * (t3 - t2)}
        values.update({f"{k}_fraction": v for k, v in coarse_fractions(labels).items()})
        self.publish_diagnostics(values)


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point ``segmentation_node``: see :func:`vpr_ros.spin.spin_single_node`."""
    return spin_single_node(SegmentationNode, NODE_NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
