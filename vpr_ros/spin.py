"""Running one node as a process: the console entry point shared by every node of the suite."""
from __future__ import annotations

from typing import Optional, Sequence

from vpr_localizer.errors import VprError


def startup_errors() -> tuple:
    """Exceptions that mean "bad configuration" when a node is constructed (one fatal line, exit 2):
    our own :class:`~vpr_localizer.errors.VprError` (missing map, weights ...), ``ValueError``
    from a configuration dataclass, and rclpy's parameter / name errors (e.g. an int in the YAML
    where the node expects a double)."""
    from rclpy.exceptions import NameValidationException, ParameterException

    return (VprError, ValueError, ParameterException, NameValidationException)


def spin_single_node(factory, name: str, argv: Optional[Sequence[str]] = None, num_threads: Optional[int] = None) -> int:
    """Console entry point shared by every node: run one node until Ctrl-C/SIGTERM.

    ROS arguments pass through (``--ros-args --params-file F -p key:=value -r image:=/cam``).
    Ctrl-C and SIGTERM are handled here rather than by rclpy, so the context is still valid
    while a node with a ``flush()`` method (map_builder) writes its map before it is destroyed.

    Args:
        factory: the node class (called with no arguments after ``rclpy.init``).
        name: node name, for the fatal log line.
        argv: command line (default ``sys.argv``).
        num_threads: executor threads (None: rclpy's default, the CPU count).

    Returns:
        0 after a clean stop, 1 when the final ``flush()`` failed (logged), 2 when the node cannot
        start (one fatal log line, no traceback).
    """
    import signal
    import sys

    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=list(sys.argv if argv is None else argv), signal_handler_options=SignalHandlerOptions.NO)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    node = None
    status = 0
    try:
        try:
            node = factory()
        except startup_errors() as exc:
            rclpy.logging.get_logger(name).fatal(f"cannot start: {exc}")
            return 2
        executor = MultiThreadedExecutor(num_threads=num_threads)
        executor.add_node(node)
        try:
            # spin_once with a timeout, not spin(): an idle executor blocks in C, where the
            # Python-level SIGINT/SIGTERM handler above could never raise
            while rclpy.ok():
                executor.spin_once(timeout_sec=0.2)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            if hasattr(node, "flush"):
                try:
                    node.flush()
                except VprError as exc:
                    node.get_logger().error(f"final flush failed: {exc}")
                    status = 1
            executor.shutdown(timeout_sec=2.0)
        return status
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
