"""Base class of the suite's nodes: set-up that cleans up after itself, one newest-frame worker,
diagnostics from its counters, one teardown.

A node subclasses :class:`WorkerNode`, sets :attr:`~WorkerNode.NAME` (and the diagnostics
texts :attr:`~WorkerNode.OK_MESSAGE` / :attr:`~WorkerNode.BAD_INPUT`) and implements:

* ``_setup()``: declare parameters (:func:`vpr_ros.params.declare_params`), load models,
  create publishers, :meth:`~WorkerNode.start_worker`, subscribe. An exception from it destroys
  the half-built node and propagates (fatal: :func:`vpr_ros.spin.spin_single_node` logs one line);
* ``_process(msg)``: one frame, run by the worker thread;
* optionally ``_wake_worker()`` (release whatever the worker may be waiting on, before it is
  stopped) and ``_release()`` (after it stopped: write state, free resources).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node

from vpr_localizer.errors import ConfigError

from .diagnostics import worker_diagnostics
from .latest import LatestFrameWorker
from .qos import reliable_qos
from .stamp_check import StampMonitor

STAMP_WARN_PERIOD_S = 5.0  # throttle of the stamp-anomaly warning


class WorkerNode(Node):
    """An rclpy node whose frames are processed by one :class:`LatestFrameWorker` (``self.worker``).

    Publishes ``diagnostics`` (diagnostic_msgs/DiagnosticArray, reliable QoS) through
    :meth:`publish_diagnostics`.

    Args:
        **kwargs: passed to ``rclpy.node.Node`` (``context``, ``namespace``, ``parameter_overrides`` ...).

    Raises:
        Whatever ``_setup`` raises (the node is destroyed first).
    """

    NAME = "vpr_node"          #: default node name (also the diagnostics status name)
    OK_MESSAGE = "running"     #: diagnostics message while nothing is wrong
    BAD_INPUT = "message"      #: what a frame that fails is, for the diagnostics message
    QUEUE_DEPTH = 1            #: default of the ``queue_depth`` parameter (frames kept waiting)

    def __init__(self, **kwargs):
        super().__init__(self.NAME, **kwargs)
        self.worker: Optional[LatestFrameWorker] = None
        self.stamps = StampMonitor()  # input header stamps (check_stamp), reported in diagnostics
        self._torn_down = False
        self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", reliable_qos())
        try:
            self._setup()
        except BaseException:
            self.destroy_node()  # release the half-built node now (else the context destroys it at shutdown)
            raise

    def _setup(self) -> None:
        raise NotImplementedError

    def _process(self, msg: Any) -> None:
        raise NotImplementedError

    def start_worker(self) -> LatestFrameWorker:
        """Declare the ``queue_depth`` parameter (int, default :attr:`QUEUE_DEPTH`: frames kept
        waiting while one is processed, the oldest dropped beyond it) and start ``self.worker`` on
        ``self._process``; returns it.

        Raises:
            ConfigError: ``queue_depth`` < 1.
        """
        depth = self.declare_parameter("queue_depth", self.QUEUE_DEPTH).value
        if not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"parameter queue_depth must be an integer >= 1, got {depth!r}")
        self.worker = LatestFrameWorker(self._process, self.get_logger(), self.NAME, depth=depth)
        return self.worker

    def check_stamp(self, header, what: str = "frame") -> Optional[str]:
        """Classify the input message's header stamp (:class:`~vpr_ros.stamp_check.StampMonitor`:
        zero, negative, duplicate or out of order); an anomaly is counted (diagnostics
        ``stamps_*``) and logged (throttled). Call it from ``_process``. Returns the anomaly or None."""
        kind = self.stamps.check(header.stamp)
        if kind is not None:
            last = self.stamps.last
            self.get_logger().warning(
                f"{what} stamp {header.stamp.sec}.{header.stamp.nanosec:09d} is {kind.replace('_', ' ')}"
                + (f" (newest so far {last[0]}.{last[1]:09d})" if last is not None and kind != "zero" else "")
                + f"; {self.stamps.counts[kind]} such so far", throttle_duration_sec=STAMP_WARN_PERIOD_S)
        return kind

    def publish_diagnostics(self, values: Dict[str, object], ok_message: Optional[str] = None,
                            problems: Sequence[str] = ()) -> None:
        """Publish :func:`~vpr_ros.diagnostics.worker_diagnostics` of ``self.worker``: ``values``
        + frame counters, OK with ``ok_message`` (default :attr:`OK_MESSAGE`) or WARN with the bad
        frames and ``problems``. Call it from ``_process`` once the frame's work is done."""
        self.pub_diag.publish(worker_diagnostics(
            self.get_clock().now().to_msg(), self.get_name(), self.worker.stats,
            {**values, **self.stamps.diagnostics()},
            self.OK_MESSAGE if ok_message is None else ok_message, self.BAD_INPUT, problems))

    def _wake_worker(self) -> None:
        """Wake the worker out of any wait of its own (called at teardown, before it is stopped)."""

    def _release(self) -> None:
        """Release the node's own resources (called at teardown, after the worker stopped)."""

    def destroy_node(self):
        """Stop the worker (it finishes its frame), release the node's resources, destroy the node.

        Safe to call more than once and on a half-built node (rclpy's context shutdown calls it
        on every node it still tracks); the worker hooks run only once, and only when the worker
        was started.
        """
        if not getattr(self, "_torn_down", True) and self.worker is not None:
            self._torn_down = True
            self._wake_worker()
            self.worker.stop()
            self._release()
        return super().destroy_node()
