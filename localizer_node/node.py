"""``vpr_localizer`` node: queries the map with each descriptor and publishes the pose.

Subscribes:
    ``vpr/descriptor`` (sensor_msgs/Image, 32FC1, 1 x D, camera header) -- newest only;
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
    ``vpr/matches`` (visualization_msgs/MarkerArray: top-k keyframes, line to the best),
    ``diagnostics`` (diagnostic_msgs/DiagnosticArray: per-stage latency, map size, best score;
    with the filter also converged, posterior probability, hypotheses, reset, odometry distance).
Parameters (:class:`LocalizerParams`, ``config/*.yaml``): ``map_path``, ``frame_id``, ``localizer.*``
(:class:`vpr_localizer.localization.localize.LocalizerConfig`), ``filter.*``
(:class:`vpr_localizer.localization.tracking.TrackingConfig`; ``filter.enabled`` false = single-frame
mode), ``loop_closure.score_threshold``,
``faiss_threads``, ``publish_tf`` (broadcast ``map`` -> ``tf_child_frame`` at the estimate; only
where ``tf2_ros`` is importable, i.e. on a real ROS 2 install).

A map that cannot be loaded is fatal (the constructor raises :class:`MapError`); a bad
descriptor message is logged and dropped, and the node keeps running.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from geometry_msgs.msg import Point, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import Image, NavSatFix, NavSatStatus
from std_msgs.msg import ColorRGBA, Float64MultiArray, Header
from visualization_msgs.msg import Marker, MarkerArray

from vpr_localizer.errors import MapError
from vpr_localizer.localization.localize import Localizer, LocalizerConfig
from vpr_localizer.localization.tracking import FilteredLocalizer, OdometryTrack, TrackingConfig
from vpr_localizer.mapping.store import VprMap
from vpr_ros.convert import msg_to_descriptor, stamp_to_sec
from vpr_ros.params import declare_params
from vpr_ros.qos import reliable_qos
from vpr_ros.spin import spin_single_node
from vpr_ros.worker_node import WorkerNode

NODE_NAME = "vpr_localizer"
YAW_VARIANCE_UNKNOWN = 1e6  # rad^2: orientation is not estimated by retrieval


@dataclass
class LoopClosureParams:
    """``loop_closure.*`` parameters of the ``vpr_localizer`` node.

    Attributes:
        score_threshold: publish ``vpr/loop_closure`` when the best score (cosine similarity)
            reaches this.
    """

    score_threshold: float = 0.5


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
    """

    map_path: str = ""
    frame_id: str = "map"
    faiss_threads: int = 1
    publish_tf: bool = False
    tf_child_frame: str = "vpr_camera"
    loop_closure: LoopClosureParams = field(default_factory=LoopClosureParams)
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)
    filter: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        """Raises :class:`MapError` for an empty ``map_path``."""
        if not self.map_path:
            raise MapError("parameter map_path is empty: set it to a map directory built with build-map")


class LocalizerNode(WorkerNode):
    """The ``vpr_localizer`` node (see module doc)."""

    NAME, OK_MESSAGE, BAD_INPUT = NODE_NAME, "localising", "descriptor message"

    def _setup(self) -> None:
        self.params = p = declare_params(self, LocalizerParams)
        t0 = time.perf_counter()
        self.map = VprMap.load(p.map_path)
        self.faiss_threads = max(1, p.faiss_threads)
        self.localizer = Localizer(self.map, p.localizer)
        self.tracker = self.odometry = None
        if p.filter.enabled:
            if self.map.has_positions:
                self.odometry = OdometryTrack(p.filter.odom_max_age_s)
            self.tracker = FilteredLocalizer(self.localizer, p.filter, odometry=self.odometry)
        self.frame_id = p.frame_id
        self.loop_threshold = p.loop_closure.score_threshold
        self.dim = int(self.map.index.d)
        self.pub_pose = self.create_publisher(PoseWithCovarianceStamped, "vpr/pose", reliable_qos())
        self.pub_fix = self.create_publisher(NavSatFix, "vpr/fix", reliable_qos()) if self.map.datum else None
        self.pub_loop = self.create_publisher(Float64MultiArray, "vpr/loop_closure", reliable_qos())
        self.pub_markers = self.create_publisher(MarkerArray, "vpr/matches", reliable_qos())
        self.create_subscription(Image, "vpr/descriptor", self.start_worker().offer, reliable_qos(depth=5))
        if self.odometry is not None:
            self.create_subscription(Odometry, "odom", self._on_odom, reliable_qos(depth=50))
        self.tf = self._make_tf_broadcaster() if p.publish_tf else None
        self.get_logger().info(
            f"map {self.map.path}: {len(self.map)} keyframes, {self.dim}-D descriptors, "
            f"{'geotagged' if self.map.datum else 'no datum'}, loaded in {time.perf_counter() - t0:.2f} s; "
            + (f"filtered poses (HMM over keyframes{', odometry on odom' if self.odometry is not None else ''})"
               if self.tracker else "single-frame poses"))

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
        t0 = time.perf_counter()
        desc = msg_to_descriptor(msg)
        if desc.shape[0] != 1 or desc.shape[1] != self.dim:
            raise ValueError(f"descriptor is {desc.shape[0]} x {desc.shape[1]}, the map needs 1 x {self.dim}")
        t1 = time.perf_counter()
        scores, ids = self.localizer.retrieve(desc)
        t2 = time.perf_counter()
        if self.tracker is not None:
            est = self.tracker.update_retrieval(ids[0], scores[0], stamp_to_sec(msg.header.stamp))
        else:
            est = self.localizer.estimate(ids[0], scores[0])
        t3 = time.perf_counter()
        header = Header(stamp=msg.header.stamp, frame_id=self.frame_id)
        best = self.map.keyframes[est.best_id]
        top = self.map.keyframes[int(est.ids[0])]  # the retrieval's best (== best without the filter)
        if self.map.has_positions:
            self.pub_pose.publish(self._pose_msg(header, est, best))
            if self.pub_fix is not None:
                self.pub_fix.publish(self._fix_msg(msg.header, est))
        if float(est.scores[0]) >= self.loop_threshold:
            self.pub_loop.publish(Float64MultiArray(data=[
                stamp_to_sec(msg.header.stamp), float(top.stamp) if math.isfinite(top.stamp) else float("nan"),
                float(est.scores[0]), float(est.ids[0])]))
        if self.map.has_positions:
            self.pub_markers.publish(self._markers(header, est))
            if self.tf is not None:
                self.tf.sendTransform(self._transform(header, est, best))
        t4 = time.perf_counter()
        values = {"decode_ms": 1e3 * (t1 - t0), "search_ms": 1e3 * (t2 - t1), "pose_ms": 1e3 * (t3 - t2),
                  "publish_ms": 1e3 * (t4 - t3), "map_keyframes": len(self.map), "best_score": float(est.scores[0]),
                  "best_keyframe": est.best_id, "margin": float(est.margin)}
        if self.tracker is not None:
            f = est.filter
            values.update({"filter_converged": bool(f.converged), "posterior_probability": float(f.probability),
                           "hypotheses": int(f.n_hypotheses), "filter_reset": bool(f.was_reset),
                           "odom_distance_m": math.nan if est.distance_m is None else float(est.distance_m)})
        self.publish_diagnostics(values)

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

    def _markers(self, header: Header, est) -> MarkerArray:
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
        return MarkerArray(markers=[pts, line])


def main(argv=None) -> int:
    """Console entry point ``vpr_localizer_node``: see :func:`vpr_ros.spin.spin_single_node`."""
    return spin_single_node(LocalizerNode, NODE_NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
