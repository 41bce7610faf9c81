"""``attention_node``: camera image (+ segmentation labels) -> global descriptor for the map.

Subscribes:
    ``image`` (sensor_msgs/Image), or ``image/compressed`` (sensor_msgs/CompressedImage) with
    ``compressed: true`` -- sensor-data QoS, newest frame only (:class:`LatestFrameWorker`);
    ``segmentation/labels`` (sensor_msgs/Image, mono8 trainIds) with ``use_labels: true``,
    matched to the camera frame by header stamp.
Publishes (reliable QoS, header copied from the camera image):
    ``vpr/descriptor`` (sensor_msgs/Image, 32FC1, 1 x D): the encoder's global descriptor,
    equal to what the offline :meth:`Encoder.encode_images` gives for the same image;
    ``vpr/patch_descriptors`` (32FC1, N x C, ``publish_patch_descriptors: true``): the
    L2-normalised local features of the backbone map, N = h * w locations in row-major order;
    ``vpr/attention`` (sensor_msgs/Image, rgb8, camera image size, ``publish_attention: true``):
    a heat map of where the descriptor looks. For now it is the per-location L2 norm of the
    backbone features, min-max normalised and colour-mapped (jet); the learned attention map of
    the segmentation/attention issue will replace it on the same topic, in the same format;
    ``diagnostics`` (diagnostic_msgs/DiagnosticArray): decode / encode / publish ms, received,
    dropped and error counts, frames with labels.
Parameters (``config/lund_graph.yaml``): ``map_path`` (required: the encoder is rebuilt from the
map with :func:`encoder_for_map`, so descriptors match the map's fingerprint exactly),
``weights`` (backbone weight file; ``""`` = the one recorded in map.yaml), ``device``,
``compressed``, ``use_labels``, ``labels_wait_s``, ``publish_patch_descriptors``,
``publish_attention``.

Labels are synchronised and counted only: the core cannot use them in the descriptor yet, and
the descriptor must stay identical to the offline encoder's (the map was built with it).

A map that cannot be loaded (or an encoder that does not fit it) is fatal: the constructor
raises :class:`MapError`. A bad camera message (unsupported encoding, size not matching the
data, zero size, corrupt compressed data) is logged by the worker and dropped; the node keeps
running.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from diagnostic_msgs.msg import DiagnosticArray
from PIL import Image as PILImage
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from vpr_localizer.errors import MapError
from vpr_localizer.images import resize_image
from vpr_localizer.localize import encoder_for_map
from vpr_localizer.map_store import VprMap
from vpr_ros.convert import descriptor_to_msg, image_msg_to_rgb, rgb_to_image_msg
from vpr_ros.diagnostics import OK, WARN, diagnostics_msg
from vpr_ros.latest import LatestFrameWorker
from vpr_ros.qos import reliable_qos, sensor_subscription

NODE_NAME = "attention_node"
LABELS_BUFFER = 16            # label messages kept for stamp matching (bounded, oldest evicted)
LABELS_WARN_PERIOD_S = 5.0    # at most one "no labels" warning per this many seconds


def _jet_lut() -> np.ndarray:
    """256 x 3 uint8 'jet' colour map (blue = low, red = high)."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=1)
    return np.round(255.0 * rgb).astype(np.uint8)


_JET = _jet_lut()


def attention_heatmap(features: torch.Tensor, size_wh: Tuple[int, int]) -> np.ndarray:
    """Provisional attention map: per-location L2 norm of ``(C, h, w)`` features.

    Min-max normalised to 0..255 (all zeros when the map is constant), resized bilinearly to
    ``size_wh`` = (width, height) pixels and colour-mapped (jet).

    Returns:
        ``uint8`` ``(height, width, 3)`` RGB.
    """
    norm = torch.linalg.vector_norm(features.float(), dim=0).cpu().numpy().astype(np.float64)
    lo, hi = float(norm.min()), float(norm.max())
    scaled = (norm - lo) / (hi - lo) if hi > lo else np.zeros_like(norm)
    gray = np.round(255.0 * scaled).astype(np.uint8)
    up = np.asarray(PILImage.fromarray(gray, "L").resize((int(size_wh[0]), int(size_wh[1])),
                                                         PILImage.BILINEAR), dtype=np.uint8)
    return _JET[up]


def patch_descriptors(features: torch.Tensor) -> np.ndarray:
    """``(C, h, w)`` features -> ``float32 (h*w, C)`` L2-normalised local descriptors (row-major)."""
    c = features.shape[0]
    flat = features.reshape(c, -1).transpose(0, 1)
    return F.normalize(flat.float(), p=2, dim=1).cpu().numpy().astype(np.float32)


class AttentionNode(Node):
    """The ``attention_node`` node (see module doc)."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.declare_parameter("map_path", "")
        self.declare_parameter("weights", "")
        self.declare_parameter("device", "auto")
        self.declare_parameter("compressed", False)
        self.declare_parameter("use_labels", False)
        self.declare_parameter("labels_wait_s", 0.2)
        self.declare_parameter("publish_patch_descriptors", False)
        self.declare_parameter("publish_attention", True)
        map_path = self.get_parameter("map_path").value
        if not map_path:
            raise MapError("parameter map_path is empty: set it to a map directory built with build-map "
                           "(the encoder is rebuilt from it)")
        t0 = time.perf_counter()
        vmap = VprMap.load(map_path)
        self.encoder = encoder_for_map(vmap, weights=self.get_parameter("weights").value or None,
                                       device=self.get_parameter("device").value or "auto")
        self.map_path = vmap.path
        self.map_keyframes = len(vmap)
        del vmap  # only the encoder is needed; the index stays with the vpr_localizer node
        self.compressed = bool(self.get_parameter("compressed").value)
        self.use_labels = bool(self.get_parameter("use_labels").value)
        self.labels_wait_s = max(0.0, float(self.get_parameter("labels_wait_s").value))
        self.publish_patches = bool(self.get_parameter("publish_patch_descriptors").value)
        self.publish_attention = bool(self.get_parameter("publish_attention").value)

        # labels by header stamp (bounded); the worker thread waits on _labels_cond
        self._labels: "OrderedDict[Tuple[int, int], Image]" = OrderedDict()
        self._labels_cond = threading.Condition()
        self._stopping = False
        self._last_labels_warn = -float("inf")
        self.labelled_frames = 0
        self.unlabelled_frames = 0

        self.pub_desc = self.create_publisher(Image, "vpr/descriptor", reliable_qos())
        self.pub_patches = (self.create_publisher(Image, "vpr/patch_descriptors", reliable_qos())
                            if self.publish_patches else None)
        self.pub_attention = (self.create_publisher(Image, "vpr/attention", reliable_qos())
                              if self.publish_attention else None)
        self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", reliable_qos())
        self.worker = LatestFrameWorker(self._process, self.get_logger(), NODE_NAME)
        if self.compressed:
            sensor_subscription(self, CompressedImage, "image/compressed", self.worker.offer)
        else:
            sensor_subscription(self, Image, "image", self.worker.offer)
        if self.use_labels:
            sensor_subscription(self, Image, "segmentation/labels", self._on_labels, depth=5)
        cfg = self.encoder.config
        self.get_logger().info(
            f"encoder for map {self.map_path} ({self.map_keyframes} keyframes): {cfg.backbone}/{cfg.aggregator} "
            f"at {cfg.image_size[0]}x{cfg.image_size[1]}, {self.encoder.dim}-D descriptors on "
            f"{self.encoder.device}; input {'image/compressed' if self.compressed else 'image'}"
            f"{', labels synchronised' if self.use_labels else ''}; ready in {time.perf_counter() - t0:.2f} s")

    # --- labels ---------------------------------------------------------------------

    def _on_labels(self, msg: Image) -> None:
        key = (int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
        with self._labels_cond:
            self._labels[key] = msg
            self._labels.move_to_end(key)
            while len(self._labels) > LABELS_BUFFER:
                self._labels.popitem(last=False)
            self._labels_cond.notify_all()

    def _wait_labels(self, header: Header) -> Optional[Image]:
        """The label message with the camera frame's stamp, waiting up to ``labels_wait_s``."""
        key = (int(header.stamp.sec), int(header.stamp.nanosec))
        deadline = time.monotonic() + self.labels_wait_s
        with self._labels_cond:
            while key not in self._labels and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._labels_cond.wait(left)
            labels = self._labels.pop(key, None)
        if labels is None:
            self.unlabelled_frames += 1
            now = time.monotonic()
            if now - self._last_labels_warn >= LABELS_WARN_PERIOD_S:
                self._last_labels_warn = now
                self.get_logger().warning(
                    f"no segmentation/labels with stamp {key[0]}.{key[1]:09d} within {self.labels_wait_s:.2f} s; "
                    f"encoding without labels ({self.unlabelled_frames} frame(s) so far)")
        else:
            self.labelled_frames += 1
        return labels

    # --- frames ---------------------------------------------------------------------

    def encode(self, rgb: np.ndarray) -> Tuple[np.ndarray, torch.Tensor]:
        """One backbone pass: ``(H, W, 3)`` RGB -> (``(1, D)`` descriptor, ``(C, h, w)`` features).

        The descriptor equals ``encoder.encode_images([rgb])`` (same resize, same network).
        """
        batch = np.stack([resize_image(rgb, self.encoder.config.image_size)])  # as encode_images
        feats = self.encoder.feature_maps(batch)
        desc = self.encoder.apply_pca(self.encoder.aggregate(feats))
        return desc, feats[0]

    def _process(self, msg) -> None:
        t0 = time.perf_counter()
        rgb = image_msg_to_rgb(msg)
        t1 = time.perf_counter()
        if self.use_labels:
            self._wait_labels(msg.header)  # synchronised and counted; not used by the descriptor yet
        t2 = time.perf_counter()
        desc, feats = self.encode(rgb)
        t3 = time.perf_counter()
        header = Header(stamp=msg.header.stamp, frame_id=msg.header.frame_id)
        self.pub_desc.publish(descriptor_to_msg(desc, header))
        if self.pub_patches is not None:
            self.pub_patches.publish(descriptor_to_msg(patch_descriptors(feats), header))
        if self.pub_attention is not None:
            heat = attention_heatmap(feats, (rgb.shape[1], rgb.shape[0]))
            self.pub_attention.publish(rgb_to_image_msg(heat, header))
        t4 = time.perf_counter()
        st = self.worker.stats
        values = {"decode_ms": 1e3 * (t1 - t0), "encode_ms": 1e3 * (t3 - t2), "publish_ms": 1e3 * (t4 - t3),
                  "image_width": int(rgb.shape[1]), "image_height": int(rgb.shape[0]),
                  "descriptor_dim": int(desc.shape[1]), "received": st.received, "dropped": st.dropped,
                  "errors": st.errors}
        if self.use_labels:
            values.update({"labels_wait_ms": 1e3 * (t2 - t1), "labelled_frames": self.labelled_frames,
                           "unlabelled_frames": self.unlabelled_frames})
        self.pub_diag.publish(diagnostics_msg(
            self.get_clock().now().to_msg(), NODE_NAME, OK if st.errors == 0 else WARN,
            "encoding" if st.errors == 0 else f"{st.errors} bad camera message(s); last: {st.last_error}",
            values))

    def destroy_node(self):
        # also called by rclpy's context shutdown on a node whose constructor failed half-way
        cond = getattr(self, "_labels_cond", None)
        if cond is not None:
            with cond:
                self._stopping = True
                cond.notify_all()
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()
        return super().destroy_node()


def main(argv=None) -> int:
    """Console entry point ``attention_node`` (``attention_node --ros-args --params-file F -r image:=/cam``):
    see :func:`vpr_ros.graph.spin_single_node` (fatal start-up error: one log line, status 2)."""
    from vpr_ros.graph import spin_single_node

    return spin_single_node(AttentionNode, NODE_NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
