"""``attention_node``: camera image (+ segmentation labels) -> global descriptor for the map.

The encoder is rebuilt from the map (:func:`encoder_for_map`), including its segmentation /
attention guidance (:mod:`vpr_localizer.models.guided`: static-structure mask, segmentation stream,
learned spatial attention), so every descriptor equals what the offline
:meth:`Encoder.encode_images` gives for the same image (and the same labels).

Subscribes:
    ``image`` (sensor_msgs/Image), or ``image/compressed`` (sensor_msgs/CompressedImage) with
    ``compressed: true`` -- sensor-data QoS, newest frame only (:class:`LatestFrameWorker`);
    ``segmentation/labels`` (sensor_msgs/Image, mono8 Cityscapes trainIds, any size, e.g. from
    ``segmentation_node``) with ``use_labels: true``, matched to the camera frame by header
    stamp (waiting up to ``labels_wait_s``).
Labels and the descriptor:
    * map encoder needs labels (``static_mask`` or ``seg_stream``) and ``use_labels: true``: the
      synchronised label message is used (``encode_images([rgb], labels=[labels])``); when none
      arrives within ``labels_wait_s`` (or it is not mono8/8UC1), the frame is encoded with the
      encoder's own segmentation backend instead (throttled warning, counted);
    * map encoder needs labels and ``use_labels: false``: the encoder segments every frame itself
      with the backend recorded in the map (``encode_images([rgb])``);
    * map encoder needs no labels (plain NetVLAD / GeM / GAP, or attention only): labels, when
      subscribed, are only synchronised and counted.
Publishes (reliable QoS, header copied from the camera image):
    ``vpr/descriptor`` (sensor_msgs/Image, 32FC1, 1 x D): the encoder's global descriptor;
    ``vpr/patch_descriptors`` (32FC1, N x C, ``publish_patch_descriptors: true``): the
    L2-normalised local features of the image stream's backbone map, N = h * w locations in
    row-major order;
    ``vpr/patch_netvlad`` (32FC1, R x D, ``publish_patch_netvlad: true``, a map built with
    ``--patches``): the frame's Patch-NetVLAD patch descriptors (Hausler et al., CVPR 2021) with
    the map's patch sizes, strides and patch PCA, rows = the sizes in the map's order, each
    row-major over its patch grid (:meth:`~vpr_localizer.mapping.patches.PatchLayout.stack`),
    published before ``vpr/descriptor`` for ``vpr_localizer``'s re-ranking (``rerank.mode``);
    ``vpr/attention`` (sensor_msgs/Image, rgb8, camera image size, ``publish_attention: true``):
    where the descriptor looks. With a guided encoder that weights the image stream (static
    mask and/or learned attention) it is that NetVLAD weight map -- static mask x attention,
    divided by its maximum, upsampled bilinearly and colour-mapped (jet: blue = weight 0, e.g.
    sky and cars under the static mask; red = full weight) by :func:`weight_heatmap`. Otherwise
    (plain encoder, or segmentation stream only) it is the per-location L2 norm of the backbone
    features, min-max normalised and colour-mapped the same way (:func:`attention_heatmap`);
    ``diagnostics`` (diagnostic_msgs/DiagnosticArray): decode / labels wait / encode / publish ms,
    received, dropped and error counts, the ``runtime`` (``torch`` | ``onnxruntime``; with
    onnxruntime also ``onnx_precision`` and ``onnx_provider``), the guidance flags (``guided``, ``static_mask``,
    ``seg_stream``, ``attention``, ``needs_labels``), frames with / without synchronised labels,
    and frames encoded with topic labels vs the encoder's own segmentation.
Parameters (:class:`AttentionParams`, ``config/lund_graph.yaml``): ``map_path`` (required),
``weights`` (backbone weight file; ``""`` = the one recorded in map.yaml), ``segmentation_weights``
(segmentation backend weight file of a guided map; ``""`` = the one recorded in map.yaml),
``device``, ``compressed``, ``use_labels``, ``labels_wait_s``, ``publish_patch_descriptors``,
``publish_patch_netvlad``, ``publish_attention``, ``queue_depth`` (frames kept waiting, default 1 =
newest only), ``runtime`` (``torch`` | ``onnxruntime``), ``onnx_path``.

Runtimes:
    * ``torch`` (default): the encoder rebuilt from the map, as above;
    * ``onnxruntime``: the map's encoder exported with ``vpr-localizer export --map MAP --out
      FILE.onnx`` (:class:`~vpr_localizer.models.onnx_runtime.OnnxEncoder`, ``onnx_path``; its
      execution providers follow ``device``), checked against the map's fingerprint at start-up.
      The graph outputs only the global descriptor, so whatever needs backbone features is
      refused at start-up with a :class:`ConfigError` naming the parameter
      (``publish_patch_descriptors``, ``publish_patch_netvlad``) or the runtime (a guided map);
      ``publish_attention`` is switched off (one INFO line). ``weights`` and
      ``segmentation_weights`` are not used; labels are only synchronised and counted.

A map that cannot be loaded (or an encoder that does not fit it, e.g. other segmentation
weights, or with ``runtime: onnxruntime`` an ONNX file that is missing or was exported from another
map's encoder) is fatal: the constructor raises :class:`MapError` / :class:`WeightsError` /
:class:`FingerprintMismatchError` / :class:`ConfigError`. A bad camera
message (unsupported encoding, size not matching the data, zero size, corrupt compressed data)
is logged by the worker and dropped; the node keeps running. A bad label message is logged
(throttled) and the frame is encoded with the encoder's own segmentation.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from vpr_localizer.errors import ConfigError, ImageLoadError, MapError
from vpr_localizer.models.guided import StreamFeatures
from vpr_localizer.localization.localize import encoder_for_map
from vpr_localizer.localization.rerank import query_patch_encoder
from vpr_localizer.mapping.store import VprMap
from vpr_ros.convert import descriptor_to_msg, image_msg_to_rgb, msg_to_labels, rgb_to_image_msg
from vpr_ros.params import declare_params
from vpr_ros.qos import camera_subscription, reliable_qos, sensor_subscription
from vpr_ros.spin import spin_single_node
from vpr_ros.stamp_sync import StampBuffer, stamp_key
from vpr_ros.worker_node import WorkerNode

NODE_NAME = "attention_node"
LABELS_BUFFER = 16            # label messages kept for stamp matching (bounded, oldest evicted)
LABELS_WARN_PERIOD_S = 5.0    # at most one "no labels" warning per this many seconds
RUNTIMES = ("torch", "onnxruntime")


def _jet_lut() -> np.ndarray:
    """256 x 3 uint8 'jet' colour map (blue = low, red = high)."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=1)
    return np.round(255.0 * rgb).astype(np.uint8)


_JET = _jet_lut()


def _jet_image(scaled: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    """``(h, w)`` values in 0..1 -> 0..255, resized bilinearly to ``size_wh`` = (width, height)
    pixels, colour-mapped (jet): ``uint8`` ``(height, width, 3)`` RGB."""
    gray = np.round(255.0 * scaled).astype(np.uint8)
    up = np.asarray(PILImage.fromarray(gray, "L").resize((int(size_wh[0]), int(size_wh[1])),
                                                         PILImage.BILINEAR), dtype=np.uint8)
    return _JET[up]


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
    return _jet_image(scaled, size_wh)


def weight_heatmap(map_hw: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    """Colour-mapped NetVLAD weight map (static mask x learned attention) of one image.

    ``map_hw`` ``(h, w)`` non-negative weights on the feature grid is divided by its maximum
    (NetVLAD's normalisations make the overall scale of the weights irrelevant, only their ratios
    count; a uniform map is all 1, an all-zero map stays 0), scaled to 0..255, resized
    bilinearly to ``size_wh`` = (width, height) pixels and colour-mapped (jet: blue = weight 0,
    red = the largest weight), like :func:`attention_heatmap`.

    Returns:
        ``uint8`` ``(height, width, 3)`` RGB.

    Raises:
        ValueError: not a 2-D array.
    """
    m = np.asarray(map_hw, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"weight map must be a non-empty 2-D array, got shape {m.shape}")
    m = np.nan_to_num(np.clip(m, 0.0, None), nan=0.0, posinf=0.0)
    hi = float(m.max())
    scaled = m / hi if hi > 0 else np.zeros_like(m)
    return _jet_image(scaled, size_wh)


def patch_descriptors(features: torch.Tensor) -> np.ndarray:
    """``(C, h, w)`` features -> ``float32 (h*w, C)`` L2-normalised local descriptors (row-major)."""
    c = features.shape[0]
    flat = features.reshape(c, -1).transpose(0, 1)
    return F.normalize(flat.float(), p=2, dim=1).cpu().numpy().astype(np.float32)


@dataclass
class AttentionParams:
    """Parameters of ``attention_node`` (:func:`vpr_ros.params.declare_params`).

    Attributes:
        map_path: map directory built with ``build-map`` (required: the encoder is rebuilt from it).
        weights: backbone weight file; "" = the one recorded in map.yaml.
        segmentation_weights: segmentation backend weight file of a guided map; "" = the one
            recorded in map.yaml.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` ("" = ``auto``).
        compressed: subscribe sensor_msgs/CompressedImage on ``image/compressed`` instead of
            sensor_msgs/Image on ``image``.
        use_labels: subscribe ``segmentation/labels`` and match them to the frames by stamp.
        labels_wait_s: longest wait for the labels of a frame, s (negative counts as 0).
        publish_patch_descriptors: publish ``vpr/patch_descriptors`` (32FC1, N x C).
        publish_patch_netvlad: publish ``vpr/patch_netvlad`` (32FC1, R x D: the map's Patch-NetVLAD
            patches, for ``vpr_localizer``'s ``rerank.mode``); the map must store patches.
        publish_attention: publish ``vpr/attention`` (rgb8, camera image size); switched off
            (INFO log) with ``runtime: onnxruntime``.
        runtime: ``torch`` (the encoder rebuilt from the map) | ``onnxruntime`` (the exported ONNX
            encoder ``onnx_path``; no backbone features: no patch descriptors, no Patch-NetVLAD, no
            attention image, no guided maps).
        onnx_path: ONNX encoder file written by ``vpr-localizer export --map MAP`` (its sidecar
            JSON beside it), required with ``runtime: onnxruntime``; "" = unset.
    """

    map_path: str = ""
    weights: Optional[str] = None
    segmentation_weights: Optional[str] = None
    device: str = "auto"
    compressed: bool = False
    use_labels: bool = False
    labels_wait_s: float = 0.2
    publish_patch_descriptors: bool = False
    publish_patch_netvlad: bool = False
    publish_attention: bool = True
    runtime: str = "torch"
    onnx_path: Optional[str] = None

    def validate(self) -> None:
        """Raises :class:`MapError` for an empty ``map_path``; :class:`ConfigError` for an unknown
        ``runtime``, ``runtime: onnxruntime`` without ``onnx_path`` or with a publication that needs
        backbone features, and ``onnx_path`` with ``runtime: torch``."""
        if not self.map_path:
            raise MapError("parameter map_path is empty: set it to a map directory built with build-map "
                           "(the encoder is rebuilt from it)")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"parameter runtime must be one of {' | '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "torch":
            if self.onnx_path:
                raise ConfigError("parameter onnx_path only applies with runtime: onnxruntime "
                                  "(set onnx_path: \"\" or runtime: onnxruntime)")
            return
        if not self.onnx_path:
            raise ConfigError("parameter onnx_path is empty: runtime onnxruntime needs the ONNX encoder file "
                              "written by 'vpr-localizer export --map MAP --out FILE.onnx'")
        for name in ("publish_patch_descriptors", "publish_patch_netvlad"):
            if getattr(self, name):
                raise ConfigError(f"parameter {name}: true needs backbone features, which runtime onnxruntime "
                                  f"does not have (the ONNX graph outputs only the global descriptor): "
                                  f"set {name}: false or runtime: torch")


class AttentionNode(WorkerNode):
    """The ``attention_node`` node (see module doc)."""

    NAME, OK_MESSAGE, BAD_INPUT = NODE_NAME, "encoding", "camera message"

    def _setup(self) -> None:
        self.params = p = declare_params(self, AttentionParams)
        self.runtime = p.runtime
        if self.runtime == "onnxruntime":
            self._setup_onnx(p)
            return
        t0 = time.perf_counter()
        vmap = VprMap.load(p.map_path)
        self.encoder = encoder_for_map(vmap, weights=p.weights, device=p.device or "auto",
                                       segmentation_weights=p.segmentation_weights)
        self.map_path = vmap.path
        self.map_keyframes = len(vmap)
        # the map's patch sizes, strides and patch PCA (MapError: a map without patches)
        self.patch_encoder = query_patch_encoder(self.encoder, vmap) if p.publish_patch_netvlad else None
        self.patch_layout = vmap.patches.layout if self.patch_encoder is not None else None
        del vmap  # only the encoder is needed; the index stays with the vpr_localizer node
        self.compressed = p.compressed
        self.use_labels = p.use_labels
        self.labels_wait_s = max(0.0, p.labels_wait_s)
        self.publish_patches = p.publish_patch_descriptors
        self.publish_attention = p.publish_attention
        cfg = self.encoder.config
        self.needs_labels = bool(cfg.needs_labels)
        if self.needs_labels:
            _ = self.encoder.segmenter  # built now: bad weights are fatal here, not at the first frame
        self._setup_io()
        if not self.needs_labels:
            labels_info = ", labels synchronised (not used by this encoder)" if self.use_labels else ""
        elif self.use_labels:
            labels_info = (f", labels from segmentation/labels (fallback: own {cfg.segmentation} segmentation "
                           f"after {self.labels_wait_s:.2f} s)")
        else:
            labels_info = f", own {cfg.segmentation} segmentation"
        self.get_logger().info(
            f"encoder for map {self.map_path} ({self.map_keyframes} keyframes): {cfg.backbone}/{cfg.aggregator}"
            f"{' guided ' + str(self.guidance_flags()) if cfg.guided else ''} "
            f"at {cfg.image_size[0]}x{cfg.image_size[1]}, {self.encoder.dim}-D descriptors on "
            f"{self.encoder.device}; input {'image/compressed' if self.compressed else 'image'}"
            + (f"; Patch-NetVLAD patches {list(self.patch_layout.patch_sizes)} x {self.patch_layout.dim}-D "
               f"({self.patch_layout.rows_per_keyframe} rows) on vpr/patch_netvlad" if self.patch_layout else "")
            + f"{labels_info}; ready in {time.perf_counter() - t0:.2f} s")

    def _setup_onnx(self, p: AttentionParams) -> None:
        """``runtime: onnxruntime``: the exported encoder ``onnx_path``, checked against the map."""
        from vpr_localizer.models.onnx_runtime import OnnxEncoder

        t0 = time.perf_counter()
        vmap = VprMap.load(p.map_path)
        if vmap.fingerprint.get("guidance"):
            raise ConfigError(f"parameter runtime: onnxruntime cannot run the guided (segmentation/attention) "
                              f"encoder of map {vmap.path}: the ONNX export supports plain encoders only; "
                              f"use runtime: torch")
        # WeightsError: missing / corrupt file or sidecar; FingerprintMismatchError: another map's encoder
        self.encoder = OnnxEncoder(p.onnx_path, device=p.device or "auto", batch_size=1)
        self.encoder.check_map(vmap)
        self.map_path = vmap.path
        self.map_keyframes = len(vmap)
        del vmap
        log = self.get_logger()
        for name in ("weights", "segmentation_weights"):
            if getattr(p, name):
                log.warning(f"parameter {name} is not used with runtime onnxruntime (the weights are in {p.onnx_path})")
        if p.publish_attention:
            log.info("publish_attention switched off: runtime onnxruntime has no backbone features for vpr/attention")
        self.patch_encoder = self.patch_layout = None
        self.compressed = p.compressed
        self.use_labels = p.use_labels
        self.labels_wait_s = max(0.0, p.labels_wait_s)
        self.publish_patches = False
        self.publish_attention = False
        self.needs_labels = False  # a plain encoder (guided maps are refused above)
        self._setup_io()
        fp = self.encoder.fingerprint
        w, h = self.encoder.image_size
        log.info(
            f"onnxruntime encoder {self.encoder.path} ({self.encoder.precision}) for map {self.map_path} "
            f"({self.map_keyframes} keyframes): {fp.get('backbone')}/{fp.get('aggregator')} at {w}x{h}, "
            f"{self.encoder.dim}-D descriptors on {', '.join(self.encoder.providers)}; input "
            f"{'image/compressed' if self.compressed else 'image'}"
            f"{', labels synchronised (not used by this encoder)' if self.use_labels else ''}; "
            f"ready in {time.perf_counter() - t0:.2f} s")

    def _setup_io(self) -> None:
        """Counters, publishers, the worker and the subscriptions (both runtimes)."""
        self.label_buffer: StampBuffer[Image] = StampBuffer(LABELS_BUFFER)  # by stamp; the worker waits on it
        self.labelled_frames = 0        # camera frames with a synchronised label message
        self.unlabelled_frames = 0      # ... without one (use_labels only)
        self.topic_label_frames = 0     # frames encoded with the topic's labels (encoder needs labels)
        self.self_segmented_frames = 0  # frames encoded with the encoder's own segmentation
        self.bad_label_msgs = 0

        self.pub_desc = self.create_publisher(Image, "vpr/descriptor", reliable_qos())
        self.pub_patches = (self.create_publisher(Image, "vpr/patch_descriptors", reliable_qos())
                            if self.publish_patches else None)
        self.pub_patch_netvlad = (self.create_publisher(Image, "vpr/patch_netvlad", reliable_qos())
                                  if self.patch_encoder is not None else None)
        self.pub_attention = (self.create_publisher(Image, "vpr/attention", reliable_qos())
                              if self.publish_attention else None)
        camera_subscription(self, self.compressed, self.start_worker().offer)
        if self.use_labels:
            sensor_subscription(self, Image, "segmentation/labels",
                                lambda msg: self.label_buffer.put(stamp_key(msg.header.stamp), msg), depth=5)

    @property
    def guided(self) -> bool:
        """Whether the map's encoder is guided (always False with ``runtime: onnxruntime``)."""
        return self.runtime == "torch" and bool(self.encoder.config.guided)

    def guidance_flags(self) -> dict:
        """The map encoder's segmentation/attention guidance (all False for a plain encoder)."""
        if self.runtime != "torch":
            return {"static_mask": False, "seg_stream": False, "attention": False}
        cfg = self.encoder.config
        return {"static_mask": bool(cfg.guided and cfg.static_mask), "seg_stream": bool(cfg.guided and cfg.seg_stream),
                "attention": bool(cfg.guided and cfg.attention)}

    # --- labels ---------------------------------------------------------------------

    def _wait_labels(self, header: Header) -> Optional[Image]:
        """The label message with the camera frame's stamp, waiting up to ``labels_wait_s``."""
        key = stamp_key(header.stamp)
        labels = self.label_buffer.wait(key, self.labels_wait_s)
        if labels is None:
            self.unlabelled_frames += 1
            what = (f"falling back to the encoder's own {self.encoder.config.segmentation} segmentation"
                    if self.needs_labels else "encoding without labels")
            self.get_logger().warning(
                f"no segmentation/labels with stamp {key[0]}.{key[1]:09d} within {self.labels_wait_s:.2f} s; "
                f"{what} ({self.unlabelled_frames} frame(s) so far)", throttle_duration_sec=LABELS_WARN_PERIOD_S)
        else:
            self.labelled_frames += 1
        return labels

    # --- frames ---------------------------------------------------------------------

    def encode(self, rgb: np.ndarray, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, StreamFeatures]:
        """One pass: ``(H, W, 3)`` RGB (+ ``(H', W')`` trainIds) -> (``(1, D)`` descriptor, stream features).

        It is the encoder's own pass, :meth:`~vpr_localizer.models.encoder.Encoder.encode_batch`
        on a batch of one (labels None: the encoder segments the image itself if it needs
        labels). The features are those of that batch (``feats.image`` is ``(1, C, h, w)``).
        With ``runtime: onnxruntime`` it is :meth:`OnnxEncoder.encode_images` of the one image
        and the features are None (the graph outputs only the descriptor; labels are not used).
        """
        if self.runtime != "torch":
            return self.encoder.encode_images([rgb]), None
        out = self.encoder.encode_batch([rgb], None if labels is None else [labels])
        return out.descriptors, out.features

    def attention_image(self, feats: StreamFeatures, size_wh: Tuple[int, int]) -> np.ndarray:
        """``vpr/attention`` content: the image stream's NetVLAD weight map when the encoder has one
        (:func:`weight_heatmap`), else the activation-norm heat map (:func:`attention_heatmap`)."""
        if self.encoder.config.guided:
            weights = self.encoder.attention_maps(feats).get("image")
            if weights is not None:
                return weight_heatmap(weights[0, 0].float().cpu().numpy(), size_wh)
        return attention_heatmap(feats.image[0], size_wh)

    def _labels_for(self, header: Header) -> Optional[np.ndarray]:
        """The topic labels to encode this frame with (None: own segmentation, or not needed)."""
        msg = self._wait_labels(header) if self.use_labels else None
        if msg is None or not self.needs_labels:
            return None  # only synchronised and counted when the encoder does not use labels
        try:
            return msg_to_labels(msg)
        except (ImageLoadError, ValueError) as exc:
            self.bad_label_msgs += 1
            self.get_logger().warning(
                f"bad segmentation/labels message ({exc}); falling back to the encoder's own "
                f"{self.encoder.config.segmentation} segmentation ({self.bad_label_msgs} so far)",
                throttle_duration_sec=LABELS_WARN_PERIOD_S)
            return None

    def _process(self, msg) -> None:
        self.check_stamp(msg.header)
        t0 = time.perf_counter()
        rgb = image_msg_to_rgb(msg)
        t1 = time.perf_counter()
        labels = self._labels_for(msg.header)
        t2 = time.perf_counter()
        desc, feats = self.encode(rgb, labels)
        t3 = time.perf_counter()
        if self.needs_labels:
            if labels is None:
                self.self_segmented_frames += 1
            else:
                self.topic_label_frames += 1
        header = Header(stamp=msg.header.stamp, frame_id=msg.header.frame_id)
        t_patch = time.perf_counter()
        if self.pub_patch_netvlad is not None:  # before the descriptor: the localizer waits for it
            rows = self.patch_layout.stack(self.patch_encoder.extract(feats)[0])
            self.pub_patch_netvlad.publish(descriptor_to_msg(rows, header))
        t_patch = time.perf_counter() - t_patch
        self.pub_desc.publish(descriptor_to_msg(desc, header))
        if self.pub_patches is not None:
            self.pub_patches.publish(descriptor_to_msg(patch_descriptors(feats.image[0]), header))
        if self.pub_attention is not None:
            heat = self.attention_image(feats, (rgb.shape[1], rgb.shape[0]))
            self.pub_attention.publish(rgb_to_image_msg(heat, header))
        t4 = time.perf_counter()
        values = {"decode_ms": 1e3 * (t1 - t0), "encode_ms": 1e3 * (t3 - t2),
                  "publish_ms": 1e3 * (t4 - t3 - t_patch),
                  "image_width": int(rgb.shape[1]), "image_height": int(rgb.shape[0]),
                  "descriptor_dim": int(desc.shape[1]), "runtime": self.runtime, "guided": self.guided,
                  **self.guidance_flags(), "needs_labels": self.needs_labels}
        if self.runtime == "onnxruntime":
            values.update({"onnx_precision": self.encoder.precision, "onnx_provider": self.encoder.device})
        if self.pub_patch_netvlad is not None:
            values["patch_netvlad_ms"] = 1e3 * t_patch
        if self.use_labels:
            values.update({"labels_wait_ms": 1e3 * (t2 - t1), "labelled_frames": self.labelled_frames,
                           "unlabelled_frames": self.unlabelled_frames})
        if self.needs_labels:
            values.update({"segmentation": str(self.encoder.config.segmentation),
                           "topic_label_frames": self.topic_label_frames,
                           "self_segmented_frames": self.self_segmented_frames,
                           "bad_label_messages": self.bad_label_msgs})
        self.publish_diagnostics(values)

    def _wake_worker(self) -> None:
        self.label_buffer.close()  # a frame waiting for its labels goes on at once


def main(argv=None) -> int:
    """Console entry point ``attention_node`` (``attention_node --ros-args --params-file F -r image:=/cam``):
    see :func:`vpr_ros.spin.spin_single_node` (fatal start-up error: one log line, status 2)."""
    return spin_single_node(AttentionNode, NODE_NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
