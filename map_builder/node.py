"""``map_builder`` node: live mapping from a camera (+ GNSS fix or odometry) into a VPR map.

Subscribes:
    ``image`` (sensor_msgs/Image, sensor-data QoS; newest frame only, through
    :class:`~vpr_ros.latest.LatestFrameWorker`), or ``image/compressed``
    (sensor_msgs/CompressedImage) with ``compressed: true``;
    ``fix`` (sensor_msgs/NavSatFix) with ``position_source: fix``, or ``odom``
    (nav_msgs/Odometry) with ``position_source: odom`` -- best effort, depth 10, so that both
    sensor-QoS (best effort) and reliable publishers connect.
Publishes:
    ``vpr/loop_closure`` (std_msgs/Float64MultiArray, reliable, LIO-SAM layout
    ``[query_stamp_s, match_stamp_s, score, keyframe_id]``) for every loop-closure candidate
    between a new keyframe and one at least ``loop_min_age_s`` older;
    ``diagnostics`` (diagnostic_msgs/DiagnosticArray: keyframes, loop closures, received /
    dropped / bad frames, encode time, flushes).
Writes:
    the map directory ``map_path`` (same format as ``vpr-localizer build-map``, so
    :meth:`VprMap.load` and :func:`~vpr_localizer.localization.localize.encoder_for_map` open it), every
    ``flush_interval_s`` from a timer and in :meth:`MapBuilderNode.flush` (which ``Graph.shutdown``
    and :func:`main` call on shutdown). The timer's flushes are incremental: only the keyframes
    added since the last flush are appended in place
    (:class:`~vpr_localizer.mapping.append.MapAppender`), so their cost does not grow with the
    map; the first write, a write after the encoder changed and :meth:`MapBuilderNode.flush`
    rewrite the whole directory atomically (:func:`~vpr_localizer.mapping.store.write_map`).
    Either way the directory is a complete map at every instant.

Keyframes
    With a position source, a frame becomes a keyframe when the camera moved at least
    ``keyframe_distance`` metres (horizontal x-y distance in the map frame: GNSS altitude is
    too noisy to trigger keyframes) since the last keyframe; the first positioned frame is
    always one. The position of a frame is taken at its header stamp from the newest positions
    (the last 64 kept): linear interpolation between the two that bracket the stamp, else the
    nearest one when it is at most ``max_position_age_s`` away. A camera frame usually arrives
    just *before* the fix with the same stamp, so the worker waits up to ``position_wait_s``
    for a position at or after the frame's stamp. Frames without a usable position are counted
    (``no_position``) and never become keyframes.
    Without a position source (``position_source: none``), a keyframe is taken every
    ``keyframe_interval_s`` seconds of header time (0 = every frame).
    Map frame: ``fix`` -> local ENU (REP-103) whose datum is the first valid fix (altitude 0
    when the fix has none); ``odom`` -> the odometry frame itself (no datum).
    ``Keyframe.frame`` is the 0-based arrival number of the image message on the image topic
    (dropped frames are counted too), so it identifies the frame in the stream.

Encoder
    ``encoder.*`` parameters are the fields of :class:`~vpr_localizer.models.encoder.EncoderConfig`
    (``encoder.weights`` is required for vgg16; ``encoder.checkpoint`` loads a trained
    aggregator, and its PCA when it has one, or only a fine-tuned conv5 like the shipped
    ``vgg16_conv5_nordland`` of ``config/live_mapping.yaml``). Without a trained aggregator, NetVLAD is *bootstrapped*
    on the run itself: the backbone feature maps of the first ``bootstrap_keyframes`` keyframes
    are buffered (at most that many, a few hundred kB each at 160x120), local features are
    sampled from them by the encoder's own :func:`~vpr_localizer.models.encoder.sample_feature_locations` (same per-image
    count and seeded RNG, so the result equals ``fit_aggregator`` on those images), k-means
    initialises NetVLAD, the buffered keyframes are aggregated and mapping goes on. Buffering
    feature maps instead of images keeps the per-frame cost flat: the bootstrap step itself
    is only k-means plus a few cheap aggregations. Keyframes arriving before the bootstrap
    cannot be published as descriptors yet; they enter the map (and loop detection) in order
    when it completes; a shutdown before that completes it with the keyframes buffered so far.

    Live maps use no PCA whitening (``encoder.pca_dim`` is forced to 0) unless the checkpoint
    brings one: PCA would have to be fitted on the *finished* map, and refitting it while the
    map grows would change the meaning of every descriptor already computed -- the ones in the
    index and loop-closure detector and any published downstream -- which must stay valid for
    the whole run. A fixed, pre-trained PCA from a checkpoint is fine.

Shared Milvus collection
    With ``milvus_uri`` and ``collection`` set, every new keyframe is also appended to that
    collection (:meth:`~vpr_localizer.mapping.milvus_index.MilvusIndex.add`: descriptor, position,
    lat/lon, stamp, ``robot_id``) once the encoder is final (after the NetVLAD bootstrap; at
    start-up with a checkpoint), so that ``vpr_localizer`` nodes searching that collection
    (``index.backend: milvus``) find it. A missing collection is created with this map's encoder
    fingerprint and ENU datum; an existing one must have been built with the same encoder
    (:class:`~vpr_localizer.errors.FingerprintMismatchError`: fatal at start-up with a checkpoint,
    after a bootstrap logged as an error and the appends stop). Positions are stored in the
    collection's ENU frame (converted from the keyframe's lat/lon when the collection has a datum
    and the keyframe GNSS coordinates), else as mapped. Rows get the ids following the
    collection's row count (one writer at a time per collection: concurrent writers could pick
    the same ids); ``milvus_ids`` holds the row id of each keyframe. A failed append is logged and
    retried with the next keyframe. The map directory is written as without it.

Loop closures
    :class:`~vpr_localizer.mapping.loop_closure.LoopClosureDetector` (``loop_min_age_s``,
    ``loop_score_threshold``, ``loop_top_k``, and the temporal consistency check
    ``loop_consistency_frames`` / ``loop_consistency_tolerance``) over the keyframe descriptors. Its in-memory
    ``faiss.IndexFlatIP`` *is* the map index (row i = keyframe i), so descriptors are held once.
    Candidates are also kept in ``self.loop_closures``.

Errors
    Bad configuration (empty ``map_path``, an existing map without ``overwrite: true``, a
    ``map_path`` that is a file or a non-map folder (never replaced, even with ``overwrite``),
    unknown ``position_source``, vgg16 without weights, too few local features for K) raises
    :class:`ConfigError` / :class:`~vpr_localizer.errors.VprError` from the constructor (fatal:
    :func:`main` logs one line and exits with status 2). A bad frame (undecodable image,
    wrong encoding) is logged and dropped; the node keeps running. A failed periodic flush is
    logged and retried at the next one.
"""
from __future__ import annotations

import bisect
import collections
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nav_msgs.msg import Odometry
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import NavSatFix, NavSatStatus
from std_msgs.msg import Float64MultiArray

from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.models.fitting import sample_feature_locations
from vpr_localizer.errors import ConfigError, FingerprintMismatchError, MapError, WeightsError
from vpr_localizer.geodesy import EnuDatum
from vpr_localizer.mapping.loop_closure import LoopCandidate, LoopClosureConfig, LoopClosureDetector
from vpr_localizer.mapping.append import MapAppender
from vpr_localizer.mapping.store import Keyframe, check_map_target, write_map
from vpr_ros.convert import image_msg_to_rgb, stamp_to_sec
from vpr_ros.params import declare_params
from vpr_ros.qos import camera_subscription, reliable_qos, sensor_subscription
from vpr_ros.spin import spin_single_node
from vpr_ros.worker_node import WorkerNode

NODE_NAME = "map_builder"
POSITION_SOURCES = ("fix", "odom", "none")


# ----------------------------------------------------------------------------------------------
# ROS-free helpers of the node (position lookup, NetVLAD bootstrap buffer)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Position:
    """A position sample in the map frame.

    Attributes:
        stamp: header time, s.
        x, y, z: map-frame position, metres.
        q: orientation (qx, qy, qz, qw) in the map frame (identity when unknown).
        lat, lon, alt: WGS84 (degrees, metres) or NaN when the source is not GNSS.
    """

    stamp: float
    x: float
    y: float
    z: float
    q: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)
    lat: float = math.nan
    lon: float = math.nan
    alt: float = math.nan


def interpolate_position(a: Position, b: Position, t: float) -> Position:
    """Linear interpolation between two samples at time ``t`` (``a.stamp <= t <= b.stamp``).

    Positions and WGS84 coordinates are interpolated linearly (fine over the metres between
    two fixes); the orientation is the nearer sample's.
    """
    if b.stamp <= a.stamp:
        return b
    w = min(max((t - a.stamp) / (b.stamp - a.stamp), 0.0), 1.0)

    def lerp(u: float, v: float) -> float:
        return u + w * (v - u)

    return Position(t, lerp(a.x, b.x), lerp(a.y, b.y), lerp(a.z, b.z), a.q if w < 0.5 else b.q,
                    lerp(a.lat, b.lat), lerp(a.lon, b.lon), lerp(a.alt, b.alt))


class LatestPositions:
    """The newest position samples (thread-safe, at most ``history`` of them), queried by stamp.

    ``put`` is called from the position callback, :meth:`at` from the image worker. Keeping a
    short history (not only the two newest) lets a worker that lags a few frames behind the
    positions still interpolate at its frame's stamp instead of taking a later sample.
    """

    def __init__(self, history: int = 64):
        self._cond = threading.Condition()
        self._samples: Deque[Position] = collections.deque(maxlen=max(2, int(history)))

    @property
    def _last(self) -> Optional[Position]:
        return self._samples[-1] if self._samples else None

    def put(self, pos: Position) -> None:
        with self._cond:
            if self._samples and pos.stamp < self._samples[-1].stamp:
                # out of order (or time jumped back): restart the history from this sample
                self._samples.clear()
            self._samples.append(pos)
            self._cond.notify_all()

    def newest(self) -> Optional[Position]:
        with self._cond:
            return self._last

    def at(self, t: float, wait_s: float = 0.0, max_age_s: float = 1.0) -> Optional[Position]:
        """Position at time ``t``.

        Waits up to ``wait_s`` (wall time) for a sample stamped at or after ``t``; then
        interpolates between the two kept samples that bracket ``t``, else returns the nearest
        sample if it is at most ``max_age_s`` from ``t`` (else None).
        """
        with self._cond:
            self._cond.wait_for(lambda: self._last is not None and self._last.stamp >= t, max(0.0, wait_s))
            samples = list(self._samples)
        if not samples:
            return None
        i = bisect.bisect_left([p.stamp for p in samples], t)
        if 0 < i < len(samples) or (i < len(samples) and samples[i].stamp == t):
            if samples[i].stamp == t:
                return samples[i]
            return interpolate_position(samples[i - 1], samples[i], t)
        nearest = min(samples, key=lambda p: abs(p.stamp - t))
        return nearest if abs(nearest.stamp - t) <= max_age_s else None


class NetVLADBootstrap:
    """Initialises an untrained NetVLAD encoder from the first keyframes of a live run.

    Args:
        encoder: an :class:`~vpr_localizer.models.encoder.Encoder` with an untrained NetVLAD.
        num_keyframes: keyframes to buffer before k-means (>= 1).

    ``add(feature_maps, item)`` buffers one keyframe's ``(1, C, h, w)`` feature maps (kept on
    the CPU) with an opaque ``item``; :meth:`finish` runs k-means, initialises NetVLAD and
    returns ``[(descriptor (D,), item), ...]`` in the order added. The sampling equals
    ``encoder.fit_aggregator(paths)`` on the same images when ``num_keyframes`` does not
    exceed ``kmeans_max_images``.
    """

    def __init__(self, encoder, num_keyframes: int):
        cfg = encoder.config
        self.encoder = encoder
        self.capacity = max(1, int(num_keyframes))
        n = min(self.capacity, max(1, int(cfg.kmeans_max_images)))
        self.per_image = max(1, math.ceil(cfg.kmeans_max_features / n))
        self.rng = np.random.default_rng(cfg.seed)
        self._maps: List[Any] = []
        self._items: List[Any] = []
        self._samples: List[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    @property
    def num_features(self) -> int:
        return int(sum(len(s) for s in self._samples))

    def add(self, feature_maps, item: Any) -> None:
        if self.full:
            raise RuntimeError("bootstrap buffer is full: call finish()")
        self._samples.append(sample_feature_locations(feature_maps, self.per_image, self.rng))
        self._maps.append(feature_maps.detach().cpu())
        self._items.append(item)

    def finish(self) -> List[Tuple[np.ndarray, Any]]:
        """k-means on the sampled features, NetVLAD initialisation, then the buffered keyframes'
        descriptors. The buffer is emptied.

        Raises:
            ValueError: fewer local features than clusters, or nothing buffered.
        """
        enc = self.encoder
        if not self._items:
            raise ValueError("NetVLAD bootstrap: no keyframe buffered")
        enc.init_aggregator_from_sample(np.concatenate(self._samples),
                                        f"the {len(self._items)} buffered keyframe(s)")
        out = []
        for fm, item in zip(self._maps, self._items):
            desc = enc.describe(fm.to(enc.device))[0][0]
            out.append((desc, item))
        self._maps, self._items, self._samples = [], [], []
        return out


# ----------------------------------------------------------------------------------------------
# the node
# ----------------------------------------------------------------------------------------------

@dataclass
class MapBuilderParams:
    """Parameters of the ``map_builder`` node (:func:`vpr_ros.params.declare_params`; see the module doc).

    Attributes:
        map_path: map directory to write (required).
        overwrite: replace a map already at ``map_path`` (else that is fatal).
        position_source: ``fix`` (NavSatFix -> local ENU) | ``odom`` (Odometry) | ``none``
            (time-based keyframes).
        keyframe_distance: horizontal distance between keyframes, metres (fix / odom).
        keyframe_interval_s: header time between keyframes without a position source, s
            (0 = every frame).
        position_wait_s: longest wait for a position at or after a frame's stamp, s.
        max_position_age_s: largest stamp difference to the nearest position sample, s.
        bootstrap_keyframes: keyframes buffered for the NetVLAD k-means bootstrap (>= 1).
        flush_interval_s: period of the map writes, s (0 = only at shutdown).
        loop_min_age_s: loop-closure candidates only against keyframes this much older, s.
        loop_score_threshold: minimum cosine similarity of a loop-closure candidate.
        loop_top_k: neighbours searched per keyframe before the age filter (>= 1).
        loop_consistency_frames: publish a loop closure only when the best matches of the
            last this many keyframes form a consistent run (matched keyframe ids advancing
            monotonically; Gálvez-López & Tardós, T-RO 2012); 1 = no temporal check (>= 1).
        loop_consistency_tolerance: largest step of the matched keyframe id between
            consecutive keyframes of a consistent run, keyframes (>= 0).
        compressed: subscribe sensor_msgs/CompressedImage on ``image/compressed`` instead of
            sensor_msgs/Image on ``image``.
        sequence: ``Keyframe.sequence`` of every keyframe.
        condition: ``Keyframe.condition`` of every keyframe.
        milvus_uri: also append every keyframe to the Milvus collection ``collection`` there
            (a milvus-lite ``*.db`` file or ``http://host:19530``; "" = off; module doc).
        collection: that collection's name (created with this map's fingerprint when missing).
        robot_id: stored with every keyframe appended to the collection.
        encoder: ``encoder.*`` (:class:`~vpr_localizer.models.encoder.EncoderConfig`; ``pca_dim``
            defaults to 0: live maps fit no PCA).
    """

    map_path: str = ""
    overwrite: bool = False
    position_source: str = "none"
    keyframe_distance: float = 2.0
    keyframe_interval_s: float = 1.0
    position_wait_s: float = 0.1
    max_position_age_s: float = 1.0
    bootstrap_keyframes: int = 10
    flush_interval_s: float = 10.0
    loop_min_age_s: float = 20.0
    loop_score_threshold: float = 0.5
    loop_top_k: int = 50
    loop_consistency_frames: int = 1
    loop_consistency_tolerance: int = 2
    compressed: bool = False
    sequence: str = ""
    condition: str = ""
    milvus_uri: str = ""
    collection: str = ""
    robot_id: str = ""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(pca_dim=0))  # no PCA live

    def validate(self) -> None:
        """Raises :class:`MapError` (empty ``map_path``) or :class:`ConfigError` (unknown
        ``position_source``, a negative or non-finite time / distance, a count below 1)."""
        if not self.map_path:
            raise MapError("parameter map_path is empty: set it to the map directory to write")
        if self.position_source.lower() not in POSITION_SOURCES:
            raise ConfigError(f"position_source must be one of {', '.join(POSITION_SOURCES)}, "
                              f"got {self.position_source!r}")
        for name in ("keyframe_distance", "keyframe_interval_s", "position_wait_s", "max_position_age_s",
                     "loop_min_age_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.bootstrap_keyframes < 1 or self.loop_top_k < 1 or self.loop_consistency_frames < 1:
            raise ConfigError("bootstrap_keyframes, loop_top_k and loop_consistency_frames must be >= 1")
        if self.loop_consistency_tolerance < 0:
            raise ConfigError(f"loop_consistency_tolerance must be >= 0, got {self.loop_consistency_tolerance}")
        if bool(self.milvus_uri) != bool(self.collection):
            raise ConfigError("milvus_uri and collection must be set together (or both left empty)")


class MapBuilderNode(WorkerNode):
    """The ``map_builder`` node (see module doc).

    Attributes of interest to tests and tools: ``keyframes`` (list of
    :class:`~vpr_localizer.mapping.store.Keyframe`), ``loop_closures`` (list of
    :class:`~vpr_localizer.mapping.loop_closure.LoopCandidate`), ``worker`` (its ``stats``),
    ``encoder``, ``datum``, ``flushes``, ``params`` (:class:`MapBuilderParams`).
    """

    NAME, OK_MESSAGE, BAD_INPUT = NODE_NAME, "mapping", "frame"
    QUEUE_DEPTH = 16  # a keyframe dropped while mapping is a hole in the map: absorb bursts

    def _setup(self) -> None:
        self.params = p = declare_params(self, MapBuilderParams)
        self.map_path = os.path.abspath(p.map_path)
        # puts back a map an interrupted replacement left aside; refuses a file or non-map folder
        check_map_target(self.map_path, overwrite=True)
        if os.path.exists(self.map_path) and not p.overwrite:
            raise MapError(f"map_path {self.map_path} exists already: set overwrite: true to replace it")
        self.position_source = p.position_source.lower()
        self.keyframe_distance = p.keyframe_distance
        self.keyframe_interval_s = p.keyframe_interval_s
        self.position_wait_s = p.position_wait_s
        self.max_position_age_s = p.max_position_age_s
        self.sequence, self.condition = p.sequence, p.condition

        self.encoder = self._make_encoder(p.encoder)
        self.bootstrap: Optional[NetVLADBootstrap] = None
        if not self.encoder.trained:
            self.bootstrap = NetVLADBootstrap(self.encoder, p.bootstrap_keyframes)
            self._check_bootstrap_features()

        self.detector = LoopClosureDetector(self.encoder.dim, LoopClosureConfig(
            min_age_s=p.loop_min_age_s, score_threshold=p.loop_score_threshold, top_k=p.loop_top_k,
            consistency_frames=p.loop_consistency_frames, consistency_tolerance=p.loop_consistency_tolerance))
        self.keyframes: List[Keyframe] = []
        self.loop_closures: List[LoopCandidate] = []
        self.datum: Optional[EnuDatum] = None
        self.positions = LatestPositions()
        self.flushes = 0
        self.flush_errors = 0
        self.last_flush_error = ""
        self.no_position = 0
        self.bad_positions = 0
        self.last_encode_ms = math.nan
        self._frame_seq = 0
        self._last_kf_stamp: Optional[float] = None
        self._last_kf_pos: Optional[Position] = None
        self._flushed_count = 0
        self._ckpt: Optional[Dict] = None
        self._fingerprint: Optional[Dict] = None
        self._written_fingerprint: Optional[Dict] = None  # encoder of the map on disk (None: not written)
        self._appender: Optional[MapAppender] = None
        self._appended = False  # the map on disk holds appended keyframes (a full write folds them in)
        self._lock = threading.RLock()        # map state + encoder initialisation
        self._flush_lock = threading.Lock()   # one map write at a time (write_map uses a per-pid temp dir)
        if self.encoder.trained:
            self._freeze_encoder()
        # the shared Milvus collection (module doc)
        self.milvus_enabled = bool(p.milvus_uri)
        self.robot_id = p.robot_id
        self.milvus_ids: List[int] = []   # collection row id of each keyframe appended so far
        self.milvus_errors = 0
        self._milvus = None               # MilvusIndex, opened at the first append
        self._milvus_client = None
        self._milvus_stopped: Optional[str] = None  # why appends stopped (fingerprint mismatch)
        self._milvus_lock = threading.Lock()
        if self.milvus_enabled and self.encoder.trained:  # final encoder: check the collection now (fatal)
            try:
                self._milvus = self._open_collection(create=False)
            except BaseException:
                if self._milvus_client is not None:
                    self._milvus_client.close()
                raise

        self.pub_loop = self.create_publisher(Float64MultiArray, "vpr/loop_closure", reliable_qos())
        self.start_worker()
        camera_subscription(self, p.compressed, self._on_image, callback_group=MutuallyExclusiveCallbackGroup())
        if self.position_source == "fix":
            sensor_subscription(self, NavSatFix, "fix", self._on_fix, depth=10,
                                     callback_group=MutuallyExclusiveCallbackGroup())
        elif self.position_source == "odom":
            sensor_subscription(self, Odometry, "odom", self._on_odom, depth=10,
                                     callback_group=MutuallyExclusiveCallbackGroup())
        if p.flush_interval_s > 0:
            self.create_timer(p.flush_interval_s, self._on_flush_timer,
                              callback_group=MutuallyExclusiveCallbackGroup())
        cfg = self.encoder.config
        fitting = " + ".join(part for part in (
            f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else "",
            f"NetVLAD bootstrap on the first {self.bootstrap.capacity} keyframes" if self.bootstrap is not None else "")
            if part) or "no fitting needed"
        self.get_logger().info(
            f"mapping into {self.map_path}: {cfg.backbone}/{cfg.aggregator}"
            f"{f' K={cfg.num_clusters}' if cfg.aggregator == 'netvlad' else ''} at "
            f"{cfg.image_size[0]}x{cfg.image_size[1]} on {self.encoder.device}, "
            f"{fitting}; "
            f"keyframes {'every ' + str(self.keyframe_distance) + ' m' if self.position_source != 'none' else 'every ' + str(self.keyframe_interval_s) + ' s'} "
            f"(position from {self.position_source}); flush every {p.flush_interval_s} s")

    # --- set-up -------------------------------------------------------------------------

    def _make_encoder(self, cfg: EncoderConfig) -> Encoder:
        if cfg.guided:
            raise ConfigError("live map_builder runs plain NetVLAD / GeM / GAP encoders; build a "
                              "segmentation-guided map (static_mask, seg_stream, attention) offline with "
                              "vpr-localizer build-map")
        if cfg.backbone == "vgg16" and not cfg.weights:
            raise WeightsError("encoder.weights is required for the vgg16 backbone "
                               "(e.g. ../shared/weights/vgg16_features_imagenet_caffe_bgr.pth)")
        if cfg.pca_dim:
            self.get_logger().info(f"encoder.pca_dim={cfg.pca_dim} ignored: live maps fit no PCA "
                                   "(only a checkpoint's fixed PCA is used)")
        try:
            return Encoder(replace(cfg, pca_dim=0))
        except ValueError as exc:
            raise ConfigError(f"encoder parameters: {exc}") from exc

    def _check_bootstrap_features(self) -> None:
        """Fail at start-up (not after N keyframes) when N keyframes cannot give K local features."""
        import torch

        w, h = self.encoder.config.image_size
        with torch.no_grad():
            fm = self.encoder.feature_maps(np.zeros((1, int(h), int(w), 3), np.uint8))
        per = min(self.bootstrap.per_image, int(fm.shape[2] * fm.shape[3]))
        k = int(self.encoder.config.num_clusters)
        if per * self.bootstrap.capacity < k:
            raise ConfigError(f"NetVLAD bootstrap: {self.bootstrap.capacity} keyframe(s) x {per} local features "
                              f"< K={k}; raise bootstrap_keyframes or encoder.image_size, or lower num_clusters")

    def _freeze_encoder(self) -> None:
        """Cache the checkpoint and fingerprint once the encoder is final (written at every flush)."""
        self._ckpt = self.encoder.checkpoint_state()
        self._fingerprint = self.encoder.fingerprint()

    # --- callbacks ----------------------------------------------------------------------

    def _on_image(self, msg) -> None:
        seq = self._frame_seq  # callbacks of the input group never run concurrently
        self._frame_seq += 1
        self.worker.offer((seq, msg))

    def _on_fix(self, msg: NavSatFix) -> None:
        lat, lon, alt = float(msg.latitude), float(msg.longitude), float(msg.altitude)
        if msg.status.status < NavSatStatus.STATUS_FIX or not (math.isfinite(lat) and math.isfinite(lon)):
            self.bad_positions += 1
            self.get_logger().warning(f"ignoring NavSatFix without a valid fix (status {msg.status.status}, "
                                      f"lat {lat}, lon {lon})", throttle_duration_sec=5.0)
            return
        if self.datum is None:
            self.datum = EnuDatum(lat, lon, alt if math.isfinite(alt) else 0.0)
            self.get_logger().info(f"ENU datum = first fix: lat {lat:.7f}, lon {lon:.7f}, alt {self.datum.alt:.1f} m")
        has_alt = math.isfinite(alt)
        e, n, u = self.datum.to_enu(lat, lon, alt if has_alt else None)
        self.positions.put(Position(stamp_to_sec(msg.header.stamp), float(e), float(n),
                                    float(u) if has_alt else 0.0, lat=lat, lon=lon,
                                    alt=alt if has_alt else math.nan))

    def _on_odom(self, msg: Odometry) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        vals = (p.x, p.y, p.z, q.x, q.y, q.z, q.w)
        if not all(math.isfinite(v) for v in vals):
            self.bad_positions += 1
            self.get_logger().warning("ignoring Odometry with non-finite pose", throttle_duration_sec=5.0)
            return
        self.positions.put(Position(stamp_to_sec(msg.header.stamp), float(p.x), float(p.y), float(p.z),
                                    (float(q.x), float(q.y), float(q.z), float(q.w))))

    def _on_flush_timer(self) -> None:
        try:
            self._flush(finish_bootstrap=False, full=False)
        except Exception as exc:  # noqa: BLE001 - the timer must survive; retried next period
            self.flush_errors += 1
            self.last_flush_error = str(exc)
            self.get_logger().error(f"periodic map flush failed (retrying next time): {exc}")

    # --- the image worker ------------------------------------------------------------------

    def _is_keyframe(self, stamp: float, pos: Optional[Position]) -> bool:
        if self._last_kf_stamp is None:
            return True
        if pos is not None and self._last_kf_pos is not None:
            return math.hypot(pos.x - self._last_kf_pos.x, pos.y - self._last_kf_pos.y) >= self.keyframe_distance
        if pos is not None:
            return True
        dt = stamp - self._last_kf_stamp
        if dt < 0:
            self.get_logger().warning(f"image header time went back by {-dt:.3f} s: taking a keyframe",
                                      throttle_duration_sec=5.0)
            return True
        return dt >= self.keyframe_interval_s - 1e-9

    def _process(self, item) -> None:
        seq, msg = item
        anomaly = self.check_stamp(msg.header)
        if anomaly in ("duplicate", "out_of_order"):  # a late frame would break keyframe timing and loop ages
            raise ValueError(f"frame stamp is {anomaly.replace('_', ' ')}: not mapped")
        rgb = image_msg_to_rgb(msg)
        stamp = stamp_to_sec(msg.header.stamp)
        pos = None
        if self.position_source != "none":
            pos = self.positions.at(stamp, self.position_wait_s, self.max_position_age_s)
            if pos is None:
                self.no_position += 1
                self.get_logger().warning(
                    f"frame {seq} (stamp {stamp:.3f}) has no {self.position_source} position within "
                    f"{self.max_position_age_s} s: not a keyframe", throttle_duration_sec=5.0)
                self._publish_diagnostics()
                return
        if not self._is_keyframe(stamp, pos):
            self._publish_diagnostics()
            return
        t0 = time.perf_counter()
        feats = self.encoder.features([rgb]).image  # the encoder's pass, first half (plain NetVLAD)
        kf = Keyframe(id=-1, stamp=stamp, frame=seq, sequence=self.sequence, condition=self.condition)
        if pos is not None:
            kf = replace(kf, x=pos.x, y=pos.y, z=pos.z, qx=pos.q[0], qy=pos.q[1], qz=pos.q[2], qw=pos.q[3],
                         lat=pos.lat, lon=pos.lon, alt=pos.alt)
        with self._lock:
            if self.encoder.trained:
                desc = self.encoder.describe(feats)[0][0]
                cands = [self._add_keyframe_locked(kf, desc)]
            else:
                self.bootstrap.add(feats, kf)
                cands = self._finish_bootstrap_locked() if self.bootstrap.full else []
        self.last_encode_ms = 1e3 * (time.perf_counter() - t0)
        self._last_kf_stamp, self._last_kf_pos = stamp, pos
        self._publish_loops(cands)
        self._append_to_milvus()
        self._publish_diagnostics()

    def _add_keyframe_locked(self, kf: Keyframe, desc: np.ndarray) -> Optional[LoopCandidate]:
        kf = replace(kf, id=len(self.keyframes))
        cand = self.detector.add(np.ascontiguousarray(desc, np.float32), kf.stamp)
        self.keyframes.append(kf)
        if cand is not None:
            self.loop_closures.append(cand)
        return cand

    def _finish_bootstrap_locked(self) -> List[Optional[LoopCandidate]]:
        t0 = time.perf_counter()
        n, nfeat = len(self.bootstrap), self.bootstrap.num_features
        done = self.bootstrap.finish()
        self._freeze_encoder()
        cands = [self._add_keyframe_locked(kf, desc) for desc, kf in done]
        self.get_logger().info(f"NetVLAD bootstrapped: k-means K={self.encoder.config.num_clusters} on {nfeat} "
                               f"local features of {n} keyframe(s) in {time.perf_counter() - t0:.2f} s; "
                               f"descriptors {self.encoder.dim}-D")
        return cands

    def _publish_loops(self, cands: Sequence[Optional[LoopCandidate]]) -> None:
        for c in cands:
            if c is None:
                continue
            self.pub_loop.publish(Float64MultiArray(data=c.as_array()))
            self.get_logger().info(f"loop closure: keyframe {c.query_id} (t={c.query_stamp:.2f}) revisits "
                                   f"keyframe {c.match_id} (t={c.match_stamp:.2f}), score {c.score:.3f}")

    def _publish_diagnostics(self) -> None:
        with self._lock:
            n_kf, n_loops = len(self.keyframes), len(self.loop_closures)
            pending = len(self.bootstrap) if self.bootstrap is not None and not self.encoder.trained else 0
        flush_problems = ([f"{self.flush_errors} failed flush(es); last: {self.last_flush_error}"]
                          if self.flush_errors else [])
        if self._milvus_stopped:
            flush_problems.append(f"milvus appends stopped: {self._milvus_stopped}")
        self.publish_diagnostics(
            {"keyframes": n_kf, "bootstrap_pending": pending, "loop_closures": n_loops,
             "no_position": self.no_position, "encode_ms": float(self.last_encode_ms),
             "flushes": self.flushes, "flushed_keyframes": self._flushed_count,
             **({"milvus_appended": len(self.milvus_ids), "milvus_errors": self.milvus_errors}
                if self.milvus_enabled else {})},
            ok_message="bootstrapping NetVLAD" if pending else None, problems=flush_problems)

    # --- writing the map ------------------------------------------------------------------

    def flush(self, finish_bootstrap: bool = True, full: bool = True) -> Optional[str]:
        """Write the map now (atomically); meant for shutdown (``Graph.shutdown`` calls it).

        Args:
            finish_bootstrap: complete a NetVLAD bootstrap still waiting for keyframes with
                those buffered so far, so that no keyframe is lost (the default, right at
                shutdown). Pass False for a mid-run flush that must not initialise NetVLAD
                on fewer than ``bootstrap_keyframes`` keyframes (the periodic timer does).
            full: rewrite the whole map directory (:func:`write_map`, the default: it also
                folds the appended descriptors into ``index.faiss``); False appends only the
                keyframes added since the last flush (:class:`MapAppender`, what the periodic
                timer does), falling back to a full write when the map was not written yet,
                the encoder changed, or the append fails.

        Nothing is written when the map has no keyframe or nothing changed since the last write
        (a full flush still rewrites a map that grew by appends, folding them into the index).

        Returns:
            The map directory, or None when there was nothing to write.

        Raises:
            MapError: the map cannot be written.
        """
        out = self._flush(finish_bootstrap, full)
        self._append_to_milvus()  # keyframes a finished bootstrap just added
        return out

    def _flush(self, finish_bootstrap: bool, full: bool = True) -> Optional[str]:
        import faiss

        with self._flush_lock:
            cands: List[Optional[LoopCandidate]] = []
            with self._lock:
                if finish_bootstrap and not self.encoder.trained and self.bootstrap is not None \
                        and len(self.bootstrap):
                    cands = self._finish_bootstrap_locked()
                n = len(self.keyframes)
                if n == 0 or (n == self._flushed_count and not (full and self._appended)):
                    return self.map_path if n else None
                m = self._flushed_count
                incremental = (not full and m > 0 and self._written_fingerprint is not None
                               and self._written_fingerprint == self._fingerprint)
                if incremental:  # only what is not on disk yet: the cost does not grow with the map
                    keyframes = self.keyframes[m:n]
                    descriptors = self.detector.index.reconstruct_n(m, n - m)
                else:
                    keyframes = list(self.keyframes)
                    index = faiss.clone_index(self.detector.index)  # a copy: mapping goes on meanwhile
            if cands:
                try:
                    self._publish_loops(cands)
                except Exception:  # noqa: BLE001 - context may be shutting down
                    pass
            t0 = time.perf_counter()
            extra = {"build": {
                "weights": os.path.abspath(self.encoder.backbone.weights_path)
                if getattr(self.encoder.backbone, "weights_path", None) else None,
                "index": "flat", "images": n, "skipped": int(self.worker.stats.errors),
                "source": "map_builder node (live)", "position_source": self.position_source,
                "keyframe_distance": self.keyframe_distance, "keyframe_interval_s": self.keyframe_interval_s,
                "loop_closures": len(self.loop_closures)}}
            how = "in full"
            if incremental:
                try:
                    self._append_locked(keyframes, descriptors, extra)
                    how = f"appended {n - m}"
                    self._appended = True
                except MapError as exc:  # e.g. the directory was changed behind our back
                    self.get_logger().warning(f"incremental map flush failed ({exc}): rewriting the map")
                    self._appender = None
                    with self._lock:
                        keyframes = self.keyframes[:n]
                        index = faiss.IndexFlatIP(self.detector.index.d)
                        index.add(self.detector.index.reconstruct_n(0, n))
                    incremental = False
            if not incremental:
                write_map(self.map_path, keyframes, index, self._ckpt, self._fingerprint, self.datum,
                          extra=extra, overwrite=True)
                self._written_fingerprint = self._fingerprint
                self._appended = False
            self._flushed_count = n
            self.flushes += 1
            self.get_logger().info(f"map flushed ({how}): {n} keyframes -> {self.map_path} "
                                   f"({1e3 * (time.perf_counter() - t0):.0f} ms)")
            return self.map_path

    def _append_locked(self, keyframes: List[Keyframe], descriptors: np.ndarray, extra: Dict) -> None:
        """Append keyframes ``m..n-1`` and their ``(n-m, D)`` float32 descriptors to the map on
        disk (under the flush lock). Raises MapError (also FingerprintMismatchError)."""
        if self._appender is None:
            self._appender = MapAppender(self.map_path, self._fingerprint)
        try:
            self._appender.append(keyframes, descriptors, extra)
        except ValueError as exc:  # ids / shapes that do not continue the map on disk
            raise MapError(str(exc)) from exc

    def _release(self) -> None:
        """At teardown, once the worker stopped: write what is not on disk yet (errors are logged)."""
        try:
            self._flush(finish_bootstrap=True, full=True)
        except Exception as exc:  # noqa: BLE001
            self.get_logger().error(f"final map flush failed: {exc}")
        self._append_to_milvus()
        if self._milvus_client is not None:
            try:
                self._milvus_client.close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                self.get_logger().warning(f"closing the milvus client: {exc}")

    # --- the shared Milvus collection -------------------------------------------------------

    def _open_collection(self, create: bool):
        """The :class:`~vpr_localizer.mapping.milvus_index.MilvusIndex` of ``collection`` (its
        fingerprint checked against the final encoder's); a missing one is created when ``create``
        (else None).

        Raises:
            FingerprintMismatchError: the collection was built with another encoder.
            MapError: connection / Milvus errors.
        """
        from vpr_localizer.mapping.milvus_index import MilvusIndex, connect

        p = self.params
        if self._milvus_client is None:
            self._milvus_client = connect(p.milvus_uri)
        client = self._milvus_client
        if not client.has_collection(p.collection):
            if not create:
                return None
            datum = None if self.datum is None else {"lat": float(self.datum.lat), "lon": float(self.datum.lon),
                                                     "alt": float(self.datum.alt)}
            try:
                # the encoder travels with the collection, so `vpr-localizer map-import` can rebuild a map
                idx = MilvusIndex.create(client, p.collection, int(self.encoder.dim), self._fingerprint, datum=datum,
                                         source_map=self.map_path, uri=p.milvus_uri, encoder_checkpoint=self._ckpt)
                self.get_logger().info(f"created milvus collection {p.collection!r} at {p.milvus_uri}")
                return idx
            except MapError:
                if not client.has_collection(p.collection):  # not a concurrent creation: a real error
                    raise
        idx = MilvusIndex.open(client, p.collection, self._fingerprint, uri=p.milvus_uri)
        if idx.d != int(self.encoder.dim):
            raise MapError(f"milvus collection {p.collection!r} at {p.milvus_uri} holds {idx.d}-D descriptors, "
                           f"this encoder makes {self.encoder.dim}-D ones")
        return idx

    def _collection_rows(self, keyframes: List[Keyframe]) -> List[Keyframe]:
        """The keyframes with their position in the collection's ENU frame (module doc)."""
        d = self._milvus.datum
        if not d:
            return keyframes
        datum = EnuDatum(float(d["lat"]), float(d["lon"]), float(d.get("alt", 0.0)))
        out = []
        for kf in keyframes:
            if math.isfinite(kf.lat) and math.isfinite(kf.lon):
                has_alt = math.isfinite(kf.alt)
                e, n, u = datum.to_enu(kf.lat, kf.lon, kf.alt if has_alt else None)
                kf = replace(kf, x=float(e), y=float(n), z=float(u) if has_alt else 0.0)
            out.append(kf)
        return out

    def _append_to_milvus(self) -> None:
        """Append the keyframes not in the collection yet (only once the encoder is final); errors
        are logged and counted (retried next time), a fingerprint mismatch stops the appends."""
        if not self.milvus_enabled:
            return
        with self._milvus_lock:
            if self._milvus_stopped:
                return
            with self._lock:
                m, n = len(self.milvus_ids), len(self.keyframes)
                if not self.encoder.trained or n <= m:
                    return
                keyframes = self.keyframes[m:n]
                descriptors = self.detector.index.reconstruct_n(m, n - m)
            try:
                if self._milvus is None:
                    self._milvus = self._open_collection(create=True)
                start = self._milvus.refresh()
                ids = self._milvus.add(np.ascontiguousarray(descriptors, np.float32), self._collection_rows(keyframes),
                                       ids=range(start, start + len(keyframes)), robot_id=self.robot_id)
                self.milvus_ids.extend(int(i) for i in ids)
            except FingerprintMismatchError as exc:
                self._milvus_stopped = str(exc)
                self.get_logger().error(f"milvus appends stopped: {exc}")
            except Exception as exc:  # noqa: BLE001 - MapError, pymilvus errors: retried with the next keyframe
                self.milvus_errors += 1
                self.get_logger().error(f"cannot append {n - m} keyframe(s) to milvus collection "
                                        f"{self.params.collection!r} (retrying later): {exc}",
                                        throttle_duration_sec=5.0)


def main(argv=None) -> int:
    """Console entry point ``map_builder_node``: run until Ctrl-C / SIGTERM, then flush the map
    (:func:`vpr_ros.spin.spin_single_node`).

    Returns the exit status: 0, 1 when the final flush failed, 2 on a fatal configuration error.
    """
    return spin_single_node(MapBuilderNode, NODE_NAME, argv, num_threads=4)


if __name__ == "__main__":
    sys.exit(main())
