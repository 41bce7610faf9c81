"""``vpr_localizer`` node: queries the map with each descriptor and publishes the pose.

Subscribes:
    ``vpr/descriptor`` (sensor_msgs/Image, 32FC1, 1 x D, camera header) -- newest only;
    ``vpr/patch_netvlad`` (sensor_msgs/Image, 32FC1, R x D, camera header; from ``attention_node``
    with ``publish_patch_netvlad: true``) -- only with ``rerank.mode`` ``ransac`` / ``spatial``:
    the frame's Patch-NetVLAD patches, matched to the descriptor by stamp (waiting up to
    ``rerank.wait_s``); the top ``rerank.k`` of the global retrieval are re-ranked with the map's
    stored patches (:class:`~vpr_localizer.localization.rerank.PatchReranker`, Hausler et al.,
    CVPR 2021) before the pose estimate. Without patches in time (or with a message that does not
    fit the map's patch layout) the frame keeps the global order (throttled warning, counted);
    ``odom`` (nav_msgs/Odometry, reliable QoS) -- only with ``filter.enabled`` on a map with
    positions: the x-y path length between consecutive descriptor stamps drives the filter's
    motion step (without odometry covering that interval: the constant-velocity prior).
Publishes:
    ``vpr/pose`` (geometry_msgs/PoseWithCovarianceStamped, frame ``map``): the single-frame
    estimate, or with ``filter.enabled`` the filtered one
    (:class:`~vpr_localizer.localization.tracking.FilteredLocalizer`: discrete Bayes filter over
    the keyframes, covariance = posterior mode spread + floor, + the ambiguous sigma while not
    converged),
    ``vpr/fix`` (sensor_msgs/NavSatFix, when the map has a geodetic datum),
    ``vpr/loop_closure`` (std_msgs/Float64MultiArray ``[query_stamp_s, match_stamp_s, score,
    keyframe_id]``, LIO-SAM layout, when the best score reaches ``loop_closure.score_threshold``),
    ``vpr/loop_closure_robot`` (std_msgs/String JSON, see below: best match mapped by another robot),
    ``vpr/matches`` (visualization_msgs/MarkerArray: top-k keyframes coloured by rank, line from
    the estimate to the best keyframe -- the re-ranked best with re-ranking -- and, when
    re-ranking changed the first place, a grey cube on the global retrieval's best),
    ``diagnostics`` (diagnostic_msgs/DiagnosticArray: per-stage latency, map size, best score;
    with re-ranking also rerank_ms, patch wait, whether the first place changed, frames without patches;
    with the filter also converged, posterior probability, hypotheses, reset, odometry distance).
Parameters (:class:`LocalizerParams`, ``config/*.yaml``): ``map_path``, ``frame_id``, ``localizer.*``
(:class:`vpr_localizer.localization.localize.LocalizerConfig`), ``filter.*``
(:class:`vpr_localizer.localization.tracking.TrackingConfig`; ``filter.enabled`` false = single-frame
mode), ``rerank.*`` (:class:`RerankParams`), ``loop_closure.score_threshold``, ``queue_depth``,
``faiss_threads``, ``publish_tf`` (broadcast ``map`` -> ``tf_child_frame`` at the estimate; only
where ``tf2_ros`` is importable, i.e. on a real ROS 2 install), ``index.*`` (:class:`IndexParams`),
``robot_id``.

Index backend (``index.backend``): ``faiss`` (the map's ``index.faiss``) or ``milvus``: at start-up
the map's index is replaced by the Milvus collection ``index.collection`` at ``index.milvus_uri``
(:class:`~vpr_localizer.mapping.milvus_index.MilvusIndex`; its encoder fingerprint must equal the
map's, else :class:`~vpr_localizer.errors.FingerprintMismatchError` is fatal). Rows with ids beyond
the map (keyframes other robots appended, e.g. ``map_builder`` with ``milvus_uri``) become extra
keyframes of the node (position, GPS, stamp, robot id from the collection); the node re-reads the
row count (``refresh``) before a search at most every ``index.refresh_s``, so keyframes appended
while it runs are found. Appended keyframes are used by single-frame localisation; with
``filter.enabled`` or re-ranking the candidates are limited to the map's own keyframes (the
filter's state space and the patch store are fixed at start-up).

Position prior (``index.prior_box_m`` > 0, a map with positions): once the node has an estimate,
the next search is restricted to the box of half-size ``prior_box_m`` around it
(:func:`~vpr_localizer.mapping.box_search.search_near`: a post-filter on FAISS, a scalar filter on
Milvus; same result). When that box holds no candidate or its best score is below
``loop_closure.score_threshold``, the frame is searched again without the box (relocalisation).
Diagnostics count ``prior_searches`` (box searches run) and ``relocalisation_searches`` (of those,
the ones that fell back to the full search).

Multi-robot loop closures: when the retrieval's best keyframe reaches the loop-closure threshold
and was mapped by another robot (its ``robot_id`` in the collection is not empty and differs from
this node's ``robot_id``), it is also published on ``vpr/loop_closure_robot`` (std_msgs/String,
JSON ``{"query_stamp": s, "keyframe_id": id, "robot_id": "...", "score": s}``).

With the filter on, its observation is the first ``filter.top_k`` candidates of the retrieval
(after re-ranking: of the re-ranked order) with their global cosines, exactly as the offline
:meth:`~vpr_localizer.localization.tracking.FilteredLocalizer.update`.

A map that cannot be loaded (or ``rerank.mode`` set on a map without patches) is fatal (the constructor raises :class:`MapError`); a bad
descriptor message (wrong size, NaN, not L2-normalised: an all-zero or rescaled descriptor) is
logged and dropped, and the node keeps running. Header stamps that are zero, negative, repeated
or older than the newest are counted (diagnostics ``stamps_*``) and logged; with the filter on, a
repeated or out-of-order descriptor is dropped (it would reset the filter or count twice) and
a zero or negative stamp updates the filter without the time-gap check.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from geometry_msgs.msg import Point, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Image, NavSatFix, NavSatStatus
from std_msgs.msg import ColorRGBA, Float64MultiArray, Header, String
from visualization_msgs.msg import Marker, MarkerArray

from vpr_localizer.errors import ConfigError, ImageLoadError, MapError
from vpr_localizer.localization.localize import Localizer, LocalizerConfig, check_unit_norm
from vpr_localizer.localization.rerank import RerankConfig, merge_ranking
from vpr_localizer.localization.tracking import FilteredLocalizer, OdometryTrack, TrackingConfig
from vpr_localizer.mapping.box_search import search_near
from vpr_localizer.mapping.store import Keyframe, VprMap
from vpr_ros.convert import msg_to_descriptor, stamp_to_sec
from vpr_ros.params import declare_params
from vpr_ros.qos import reliable_qos
from vpr_ros.spin import spin_single_node
from vpr_ros.stamp_sync import StampBuffer, stamp_key
from vpr_ros.worker_node import WorkerNode

NODE_NAME = "vpr_localizer"
YAW_VARIANCE_UNKNOWN = 1e6  # rad^2: orientation is not estimated by retrieval
PATCH_BUFFER = 8            # vpr/patch_netvlad messages kept by stamp (frames in flight)
PATCH_WARN_PERIOD_S = 5.0   # throttle of the "no patches" warning
INDEX_BACKENDS = ("faiss", "milvus")


@dataclass
class LoopClosureParams:
    """``loop_closure.*`` parameters of the ``vpr_localizer`` node.

    Attributes:
        score_threshold: publish ``vpr/loop_closure`` when the best score (cosine similarity)
            reaches this.
    """

    score_threshold: float = 0.5


@dataclass
class RerankParams:
    """``rerank.*`` parameters of the ``vpr_localizer`` node: Patch-NetVLAD re-ranking.

    Attributes:
        mode: ``none`` | ``ransac`` (the paper's performance mode) | ``spatial`` (speed mode,
            rapid spatial scoring); anything but ``none`` needs a map built with ``--patches``.
        k: global candidates re-ranked (paper: 100).
        wait_s: longest wait for a frame's ``vpr/patch_netvlad`` after its descriptor, s.
        device: torch device of the patch matching (``cpu``, ``cuda``...).
    """

    mode: str = "none"
    k: int = 100
    wait_s: float = 0.5
    device: str = "cpu"

    def config(self) -> RerankConfig:
        """As :class:`~vpr_localizer.localization.rerank.RerankConfig` (ConfigError: bad mode / k)."""
        return RerankConfig(mode=self.mode, k=self.k, device=self.device)

    def validate(self) -> None:
        """Raises :class:`ConfigError` for a bad mode or k, or a negative / non-finite ``wait_s``."""
        self.config()
        if not (math.isfinite(self.wait_s) and self.wait_s >= 0):
            raise ConfigError(f"rerank.wait_s must be a finite number >= 0, got {self.wait_s}")


@dataclass
class IndexParams:
    """``index.*`` parameters of the ``vpr_localizer`` node: index backend and position prior.

    Attributes:
        backend: ``faiss`` (the map's own index) | ``milvus`` (the collection ``collection`` at
            ``milvus_uri`` replaces it at start-up; fingerprint checked).
        milvus_uri: a milvus-lite file (``*.db``) or a server address (``http://host:19530``).
        collection: the Milvus collection exported from the map (``vpr-localizer map-export``).
        prior_box_m: half-size of the search box around the previous estimate, metres
            (0 = off): retrieval only among keyframes inside it, the full map when it finds none
            above ``loop_closure.score_threshold``.
        refresh_s: re-read the collection's row count (keyframes appended by other robots) before
            a search at most this often, seconds (0 = before every search; milvus only).
    """

    backend: str = "faiss"
    milvus_uri: str = ""
    collection: str = ""
    prior_box_m: float = 0.0
    refresh_s: float = 2.0

    def validate(self) -> None:
        """Raises :class:`ConfigError` for an unknown backend, milvus without uri / collection, or a
        negative / non-finite ``prior_box_m`` or ``refresh_s``."""
        if self.backend.lower() not in INDEX_BACKENDS:
            raise ConfigError(f"index.backend must be one of {', '.join(INDEX_BACKENDS)}, got {self.backend!r}")
        if self.backend.lower() == "milvus" and not (self.milvus_uri and self.collection):
            raise ConfigError("index.backend milvus needs index.milvus_uri and index.collection")
        for name in ("prior_box_m", "refresh_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"index.{name} must be a finite number >= 0, got {value}")


@dataclass
class LocalizerParams:
    """Parameters of the ``vpr_localizer`` node (:func:`vpr_ros.params.declare_params`).

    Attributes:
        map_path: map directory built with ``build-map`` (required).
        frame_id: frame of ``vpr/pose``, ``vpr/matches`` and the TF parent (REP-105).
        faiss_threads: OpenMP threads of the FAISS search (values below 1 count as 1).
        publish_tf: broadcast ``map`` -> ``tf_child_frame`` at the estimate (only where
            ``tf2_ros`` is importable).
        tf_child_frame: child frame of that transform.
        loop_closure: ``loop_closure.*`` (:class:`LoopClosureParams`).
        localizer: ``localizer.*`` (:class:`~vpr_localizer.localization.localize.LocalizerConfig`).
        filter: ``filter.*`` (:class:`~vpr_localizer.localization.tracking.TrackingConfig`):
            sequence localisation over the keyframes; ``filter.enabled`` false = single-frame.
        rerank: ``rerank.*`` (:class:`RerankParams`): Patch-NetVLAD re-ranking.
        index: ``index.*`` (:class:`IndexParams`): FAISS or Milvus backend, position prior box.
        robot_id: this robot's id: a best match on a keyframe another robot mapped (collection
            ``robot_id`` not empty and different) is also published on ``vpr/loop_closure_robot``.
    """

    map_path: str = ""
    frame_id: str = "map"
    faiss_threads: int = 1
    publish_tf: bool = False
    tf_child_frame: str = "vpr_camera"
    loop_closure: LoopClosureParams = field(default_factory=LoopClosureParams)
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    filter: TrackingConfig = field(default_factory=TrackingConfig)
    rerank: RerankParams = field(default_factory=RerankParams)
    index: IndexParams = field(default_factory=IndexParams)
    robot_id: str = ""

    def validate(self) -> None:
        """Raises :class:`MapError` for an empty ``map_path``, :class:`ConfigError` for bad ``index.*``."""
        if not self.map_path:
            raise MapError("parameter map_path is empty: set it to a map directory built with build-map")
        self.index.validate()


class LocalizerNode(WorkerNode):
    """The ``vpr_localizer`` node (see module doc)."""

    NAME, OK_MESSAGE, BAD_INPUT = NODE_NAME, "localising", "descriptor message"

    def _setup(self) -> None:
        self.params = p = declare_params(self, LocalizerParams)
        t0 = time.perf_counter()
        self.map = VprMap.load(p.map_path)
        self.map_size = len(self.map)  # keyframes of the map directory (the filter's / patch store's range)
        self.kf_robot = [""] * self.map_size  # robot_id of every keyframe ('' = unknown, faiss)
        self.milvus = None
        if p.index.backend.lower() == "milvus":
            self._open_milvus(p.index)  # FingerprintMismatchError / MapError: fatal
        self.robot_id = p.robot_id
        self.prior_box_m = p.index.prior_box_m
        self.refresh_s = p.index.refresh_s
        self.prior = None  # (x, y) of the previous estimate, metres
        self.prior_searches = self.relocalisation_searches = 0
        self.positions = self.map.positions  # (N, 3), grows with appended keyframes
        self.has_positions = self.map.has_positions  # of the map directory's keyframes (appended ones may lack one)
        self.usable = np.ones(len(self.map), bool)  # appended keyframes without a position are not
        self.faiss_threads = max(1, p.faiss_threads)
        self.localizer = Localizer(self.map, p.localizer)
        rcfg = p.rerank.config()
        # MapError on a map without patches: fatal, with the map's "rebuild it with --patches"
        self.reranker = self.localizer.reranker(rcfg) if rcfg.enabled else None
        # candidates retrieved per frame: the estimate's top_k, the filter's observation, the re-ranked k
        self.retrieve_k = min(max(p.localizer.top_k, p.filter.top_k if p.filter.enabled else 0,
                                  rcfg.k if self.reranker is not None else 0), len(self.map))
        self.patch_buffer: StampBuffer[Image] = StampBuffer(PATCH_BUFFER)
        self.rerank_wait_s = p.rerank.wait_s
        self.reranked_frames = self.unranked_frames = self.changed_first = 0
        self.tracker = self.odometry = None
        if p.filter.enabled:
            if self.map.has_positions:
                self.odometry = OdometryTrack(p.filter.odom_max_age_s)
            self.tracker = FilteredLocalizer(self.localizer, p.filter, odometry=self.odometry)
        if self.prior_box_m > 0 and not self.map.has_positions:
            self.get_logger().warning("index.prior_box_m is set but the map has no keyframe positions: "
                                      "no prior box")
            self.prior_box_m = 0.0
        self._last_refresh = time.monotonic()
        if self.milvus is not None:
            self._load_new_keyframes()  # rows other robots appended before this start
        self.frame_id = p.frame_id
        self.loop_threshold = p.loop_closure.score_threshold
        self.dim = int(self.map.index.d)
        self.pub_pose = self.create_publisher(PoseWithCovarianceStamped, "vpr/pose", reliable_qos())
        self.pub_fix = self.create_publisher(NavSatFix, "vpr/fix", reliable_qos()) if self.map.datum else None
        self.pub_loop = self.create_publisher(Float64MultiArray, "vpr/loop_closure", reliable_qos())
        self.pub_loop_robot = self.create_publisher(String, "vpr/loop_closure_robot", reliable_qos())
        self.pub_markers = self.create_publisher(MarkerArray, "vpr/matches", reliable_qos())
        self.create_subscription(Image, "vpr/descriptor", self.start_worker().offer, reliable_qos(depth=5))
        if self.reranker is not None:
            self.create_subscription(Image, "vpr/patch_netvlad",
                                     lambda m: self.patch_buffer.put(stamp_key(m.header.stamp), m),
                                     reliable_qos(depth=5))
        if self.odometry is not None:
            self.create_subscription(Odometry, "odom", self._on_odom, reliable_qos(depth=50))
        self.tf = self._make_tf_broadcaster() if p.publish_tf else None
        self.get_logger().info(
            f"map {self.map.path}: {len(self.map)} keyframes, {self.dim}-D descriptors, "
            f"{'geotagged' if self.map.datum else 'no datum'}, loaded in {time.perf_counter() - t0:.2f} s; "
            + (f"filtered poses (HMM over keyframes{', odometry on odom' if self.odometry is not None else ''})"
               if self.tracker else "single-frame poses")
            + (f"; Patch-NetVLAD re-ranking ({rcfg.paper_name} mode, top {rcfg.k}, patch sizes "
               f"{list(self.reranker.sizes)}) with vpr/patch_netvlad" if self.reranker is not None else "")
            + (f"; index {self.milvus!r}" if self.milvus is not None else "")
            + (f"; prior box +-{self.prior_box_m} m" if self.prior_box_m > 0 else ""))

    # --- index backend -----------------------------------------------------------------------

    def _open_milvus(self, ip: IndexParams) -> None:
        """Replace the map's index by the Milvus collection (fingerprint checked against the map's).

        Like :func:`~vpr_localizer.mapping.milvus_index.use_milvus_index`, but the collection may
        hold more rows than the map (keyframes appended by other robots: :meth:`_load_new_keyframes`).

        Raises:
            FingerprintMismatchError: the collection was built with another encoder than the map.
            MapError: connection / collection errors, another descriptor dimension, fewer rows
                than the map.
        """
        from vpr_localizer.mapping.milvus_index import MilvusIndex

        idx = MilvusIndex.open(ip.milvus_uri, ip.collection, self.map.fingerprint)
        try:
            if idx.d != int(self.map.index.d) or idx.ntotal < len(self.map):
                raise MapError(f"milvus collection {ip.collection!r} at {idx.uri} holds {idx.ntotal} {idx.d}-D "
                               f"descriptors but map {self.map.path} has {len(self.map)} keyframes of "
                               f"{int(self.map.index.d)}-D descriptors (export it with vpr-localizer map-export)")
            rows = idx.fetch(ids=range(len(self.map)), with_descriptors=False)
            if len(rows["id"]) != len(self.map):
                raise MapError(f"milvus collection {ip.collection!r} at {idx.uri} lacks some of the map's "
                               f"{len(self.map)} keyframe ids")
        except BaseException:
            idx.close()
            raise
        self.kf_robot = [str(r) for r in rows["robot_id"]]
        self.map.index = self.milvus = idx

    def _refresh_index(self) -> None:
        """At most every ``index.refresh_s``: re-read the collection's row count and take in the
        keyframes appended since (milvus only)."""
        now = time.monotonic()
        if self.milvus is None or now - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = now
        try:
            self.milvus.refresh()
            self._load_new_keyframes()
        except Exception as exc:  # noqa: BLE001 - MapError, pymilvus errors: search what is known
            self.get_logger().warning(f"cannot refresh the milvus collection: {exc}", throttle_duration_sec=5.0)

    def _load_new_keyframes(self) -> None:
        """Keyframes of the collection beyond the known ones (ids ``len(keyframes)..ntotal-1``,
        contiguous; a gap is retried at the next refresh) become keyframes of the node."""
        n, total = len(self.map.keyframes), int(self.milvus.ntotal)
        if total <= n:
            return
        rows = self.milvus.fetch(ids=range(n, total), with_descriptors=False)
        new = []
        for j, kid in enumerate(rows["id"]):
            if int(kid) != n + len(new):
                break
            new.append(Keyframe(id=int(kid), stamp=float(rows["stamp"][j]), x=float(rows["x"][j]),
                                y=float(rows["y"][j]), z=float(rows["z"][j]), lat=float(rows["lat"][j]),
                                lon=float(rows["lon"][j])))
            self.kf_robot.append(str(rows["robot_id"][j]))
        if not new:
            return
        self.map.keyframes.extend(new)
        pos = np.array([[k.x, k.y, k.z] for k in new], np.float64)
        self.positions = np.concatenate([self.positions, pos])
        ok = np.isfinite(pos[:, :2]).all(axis=1) if self.has_positions else np.ones(len(new), bool)
        self.usable = np.concatenate([self.usable, ok])
        # the Localizer caches the keyframe positions: give it the grown table (appended keyframes
        # without a position never become candidates, so the cache keeps meaning "all finite")
        self.localizer._pos = self.positions
        robots = sorted({self.kf_robot[k.id] or "?" for k in new})
        self.get_logger().info(f"{len(new)} keyframe(s) appended to the collection by {', '.join(robots)}: "
                               f"{len(self.map.keyframes)} keyframes")

    def _candidates(self, ids: np.ndarray, scores: np.ndarray):
        """Drop missing hits (-1), rows not loaded yet, appended keyframes without a position and,
        with the filter or re-ranking, every keyframe appended after start-up."""
        limit = self.map_size if (self.tracker is not None or self.reranker is not None) else len(self.usable)
        ok = (ids >= 0) & (ids < limit)
        ok[ok] &= self.usable[ids[ok]]
        return ids[ok], scores[ok]

    def _retrieve(self, desc: np.ndarray):
        """Top ``retrieve_k`` candidates of one descriptor, in the prior box when there is one
        (module doc); returns ``(ids (n,), scores (n,), relocalised)``."""
        relocalised = False
        if self.prior_box_m > 0 and self.prior is not None:
            b, (x, y) = self.prior_box_m, self.prior
            self.prior_searches += 1
            scores, ids = search_near(self.map.index, desc, self.retrieve_k, (x - b, x + b, y - b, y + b),
                                      positions=self.positions)
            ids, scores = self._candidates(ids[0], scores[0])
            if len(ids) and float(scores[0]) >= self.loop_threshold:
                return ids, scores, False
            self.relocalisation_searches += 1
            relocalised = True
        scores, ids = self.localizer.retrieve(desc, k=self.retrieve_k)
        ids, scores = self._candidates(ids[0], scores[0])
        if not len(ids):
            raise ValueError("no map candidate returned for this descriptor")
        return ids, scores, relocalised

    def _on_odom(self, msg: Odometry) -> None:
        p = msg.pose.pose.position
        if not self.odometry.add(stamp_to_sec(msg.header.stamp), float(p.x), float(p.y)):
            self.get_logger().warning("ignoring Odometry with a non-finite stamp or position",
                                      throttle_duration_sec=5.0)

    def _make_tf_broadcaster(self):
        try:
            from tf2_ros import TransformBroadcaster
        except ImportError:
            self.get_logger().warning("publish_tf is set but tf2_ros is not importable: no TF broadcast")
            return None
        return TransformBroadcaster(self)

    def _process(self, msg: Image) -> None:
        if self.faiss_threads:  # OpenMP thread counts are per thread: set it in the worker thread
            import faiss

            faiss.omp_set_num_threads(self.faiss_threads)
            self.faiss_threads = 0
        anomaly = self.check_stamp(msg.header, "descriptor")
        if self.tracker is not None and anomaly in ("duplicate", "out_of_order"):
            raise ValueError(f"descriptor stamp is {anomaly.replace('_', ' ')}: not fed to the filter "
                             f"(a late or repeated frame would reset or double-count it)")
        t0 = time.perf_counter()
        desc = msg_to_descriptor(msg)
        if desc.shape[0] != 1 or desc.shape[1] != self.dim:
            raise ValueError(f"descriptor is {desc.shape[0]} x {desc.shape[1]}, the map needs 1 x {self.dim}")
        desc = check_unit_norm(desc)  # NaN, all-zero or rescaled descriptors: logged and dropped
        t1 = time.perf_counter()
        self._refresh_index()
        ids, scores, relocalised = self._retrieve(desc)
        global_best = int(ids[0])
        t2 = time.perf_counter()
        rerank_values = {}
        if self.reranker is not None:
            ids, scores, rerank_values = self._rerank(msg.header, ids, scores)
        t_rr = time.perf_counter()
        top_k = self.localizer.config.top_k
        if self.tracker is not None:  # observation: the first filter.top_k of the (re-ranked) order
            n = self.tracker.config.top_k
            stamp = None if anomaly is not None else stamp_to_sec(msg.header.stamp)  # zero / negative: no gap check
            est = self.tracker.update_retrieval(ids[:n], scores[:n], stamp)
        else:
            est = self.localizer.estimate(ids[:top_k], scores[:top_k])
        t3 = time.perf_counter()
        header = Header(stamp=msg.header.stamp, frame_id=self.frame_id)
        best = self.map.keyframes[est.best_id]
        top = self.map.keyframes[int(est.ids[0])]  # the retrieval's best (== best without the filter)
        if self.has_positions:
            self.pub_pose.publish(self._pose_msg(header, est, best))
            if self.pub_fix is not None:
                self.pub_fix.publish(self._fix_msg(msg.header, est))
        if float(est.scores[0]) >= self.loop_threshold:
            self.pub_loop.publish(Float64MultiArray(data=[
                stamp_to_sec(msg.header.stamp), float(top.stamp) if math.isfinite(top.stamp) else float("nan"),
                float(est.scores[0]), float(est.ids[0])]))
            robot = self.kf_robot[int(est.ids[0])]
            if robot and robot != self.robot_id:  # mapped by another robot: a multi-robot loop closure
                self.pub_loop_robot.publish(String(data=json.dumps({
                    "query_stamp": stamp_to_sec(msg.header.stamp), "keyframe_id": int(est.ids[0]),
                    "robot_id": robot, "score": float(est.scores[0])})))
        if self.prior_box_m > 0 and math.isfinite(est.x) and math.isfinite(est.y):
            self.prior = (float(est.x), float(est.y))
        if self.has_positions:
            self.pub_markers.publish(self._markers(header, est, global_best))
            if self.tf is not None:
                self.tf.sendTransform(self._transform(header, est, best))
        t4 = time.perf_counter()
        values = {"decode_ms": 1e3 * (t1 - t0), "search_ms": 1e3 * (t2 - t1), "pose_ms": 1e3 * (t3 - t_rr),
                  "publish_ms": 1e3 * (t4 - t3), "map_keyframes": len(self.map), "best_score": float(est.scores[0]),
                  "best_keyframe": est.best_id, "margin": float(est.margin), **rerank_values,
                  "prior_searches": self.prior_searches, "relocalisation_searches": self.relocalisation_searches,
                  "relocalised": relocalised}
        if self.tracker is not None:
            f = est.filter
            values.update({"filter_converged": bool(f.converged), "posterior_probability": float(f.probability),
                           "hypotheses": int(f.n_hypotheses), "filter_reset": bool(f.was_reset),
                           "odom_distance_m": math.nan if est.distance_m is None else float(est.distance_m)})
        self.publish_diagnostics(values)

    def _rerank(self, header: Header, ids: np.ndarray, scores: np.ndarray):
        """The retrieval re-ranked with the frame's ``vpr/patch_netvlad`` (module doc), or unchanged
        when none arrives within ``rerank.wait_s`` or it does not fit the map's patch layout.

        Returns:
            ``(ids (n,), scores (n,), diagnostics values)``.
        """
        t0 = time.perf_counter()
        patch_msg = self.patch_buffer.wait(stamp_key(header.stamp), self.rerank_wait_s)
        wait_ms = 1e3 * (time.perf_counter() - t0)
        problem = None
        if patch_msg is None:
            problem = (f"no vpr/patch_netvlad with this frame's stamp within {self.rerank_wait_s:.2f} s "
                       f"(is attention_node's publish_patch_netvlad true?)")
        else:
            try:
                query = self.reranker.patches.layout.split(msg_to_descriptor(patch_msg))
            except (ImageLoadError, ValueError) as exc:
                problem = f"bad vpr/patch_netvlad message: {exc}"
        if problem is not None:
            self.unranked_frames += 1
            self.get_logger().warning(f"{problem}; global order kept ({self.unranked_frames} frame(s) so far)",
                                      throttle_duration_sec=PATCH_WARN_PERIOD_S)
            return ids, scores, {"patch_wait_ms": wait_ms, "reranked": False,
                                 "frames_without_patches": self.unranked_frames}
        rr = self.reranker.rerank(query, ids, scores)
        new_ids, new_scores = merge_ranking(rr, ids, scores)
        self.reranked_frames += 1
        changed = bool(len(new_ids) and int(new_ids[0]) != int(ids[0]))
        self.changed_first += int(changed)
        return new_ids, new_scores, {"patch_wait_ms": wait_ms, "rerank_ms": 1e3 * rr.seconds, "reranked": True,
                                     "rerank_changed_best": changed, "reranked_frames": self.reranked_frames,
                                     "rerank_changed_frames": self.changed_first,
                                     "frames_without_patches": self.unranked_frames}

    def _wake_worker(self) -> None:
        self.patch_buffer.close()  # a frame waiting for its patches goes on at once

    def _release(self) -> None:
        if self.milvus is not None:  # after the worker stopped: no search in flight
            try:
                self.milvus.close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                self.get_logger().warning(f"closing the milvus client: {exc}")

    def _pose_msg(self, header: Header, est, best) -> PoseWithCovarianceStamped:
        m = PoseWithCovarianceStamped()
        m.header = header
        m.pose.pose.position.x, m.pose.pose.position.y = est.x, est.y
        m.pose.pose.position.z = est.z if math.isfinite(est.z) else 0.0
        m.pose.pose.orientation.x, m.pose.pose.orientation.y = best.qx, best.qy
        m.pose.pose.orientation.z, m.pose.pose.orientation.w = best.qz, best.qw
        cov = np.zeros((6, 6))
        cov[:2, :2] = est.covariance_xy
        cov[2, 2] = max(est.covariance_xy[0, 0], est.covariance_xy[1, 1])
        cov[3, 3] = cov[4, 4] = cov[5, 5] = YAW_VARIANCE_UNKNOWN
        m.pose.covariance = cov.reshape(-1).tolist()
        return m

    def _transform(self, header: Header, est, best):
        """``map`` -> ``tf_child_frame`` at the estimated position (orientation of the best keyframe)."""
        from geometry_msgs.msg import TransformStamped

        t = TransformStamped()
        t.header = header
        t.child_frame_id = self.params.tf_child_frame
        t.transform.translation.x, t.transform.translation.y = est.x, est.y
        t.transform.translation.z = est.z if math.isfinite(est.z) else 0.0
        t.transform.rotation.x, t.transform.rotation.y = best.qx, best.qy
        t.transform.rotation.z, t.transform.rotation.w = best.qz, best.qw
        return t

    def _fix_msg(self, cam_header: Header, est) -> NavSatFix:
        m = NavSatFix()
        m.header = Header(stamp=cam_header.stamp, frame_id=cam_header.frame_id or "camera")
        m.status.status = NavSatStatus.STATUS_FIX
        m.latitude, m.longitude = est.lat, est.lon
        m.altitude = float(self.map.datum.alt)
        cov = np.zeros((3, 3))
        cov[:2, :2] = est.covariance_xy  # NavSatFix covariance is ENU (east, north, up), as the map frame
        cov[2, 2] = YAW_VARIANCE_UNKNOWN
        m.position_covariance = cov.reshape(-1).tolist()
        m.position_covariance_type = NavSatFix.COVARIANCE_TYPE_APPROXIMATED
        return m

    def _markers(self, header: Header, est, global_best: int) -> MarkerArray:
        pts = Marker(header=header, ns="vpr_matches", id=0, type=Marker.SPHERE_LIST, action=Marker.ADD)
        pts.scale.x = pts.scale.y = pts.scale.z = 2.0
        pts.pose.orientation.w = 1.0
        top = float(est.scores[0])
        for kid, s in zip(est.ids, est.scores):
            kf = self.map.keyframes[int(kid)]
            pts.points.append(Point(x=kf.x, y=kf.y, z=kf.z if math.isfinite(kf.z) else 0.0))
            w = float(np.clip(1.0 - (top - float(s)) / 0.2, 0.1, 1.0))
            pts.colors.append(ColorRGBA(r=1.0 - w, g=w, b=0.2, a=1.0))
        line = Marker(header=header, ns="vpr_best", id=1, type=Marker.LINE_LIST, action=Marker.ADD)
        line.scale.x = 0.5
        line.pose.orientation.w = 1.0
        line.color = ColorRGBA(r=0.1, g=0.4, b=1.0, a=1.0)
        best = self.map.keyframes[est.best_id]
        line.points = [Point(x=est.x, y=est.y, z=0.0), Point(x=best.x, y=best.y, z=0.0)]
        markers = [pts, line]
        if global_best != est.best_id:  # re-ranking (or the filter) moved the first place: show the old one
            g = self.map.keyframes[global_best]
            cube = Marker(header=header, ns="vpr_global_best", id=2, type=Marker.CUBE, action=Marker.ADD)
            cube.scale.x = cube.scale.y = cube.scale.z = 1.5
            cube.pose.position = Point(x=g.x, y=g.y, z=g.z if math.isfinite(g.z) else 0.0)
            cube.pose.orientation.w = 1.0
            cube.color = ColorRGBA(r=0.6, g=0.6, b=0.6, a=0.8)
        else:
            cube = Marker(header=header, ns="vpr_global_best", id=2, action=Marker.DELETE)
        markers.append(cube)
        return MarkerArray(markers=markers)


def main(argv=None) -> int:
    """Console entry point ``vpr_localizer_node``: see :func:`vpr_ros.spin.spin_single_node`."""
    return spin_single_node(LocalizerNode, NODE_NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
