"""Start the suite's nodes in one process from a ROS 2 parameter YAML (``vpr-localizer run``).

The same YAML drives the launch files on a real ROS 2 install: its top-level keys are node
names, and every node whose name is in :data:`NODE_CLASSES` is started, with a
``MultiThreadedExecutor``. rclpy reads the parameters itself (``--ros-args --params-file``).
"""
from __future__ import annotations

import importlib
import signal
import threading
from typing import Dict, List, Optional, Sequence

from vpr_localizer.errors import DatasetError
from vpr_localizer.param_files import read_params_file
from vpr_ros.spin import startup_errors

NODE_CLASSES: Dict[str, str] = {
    "segmentation_node": "segmentation_node.node:SegmentationNode",
    "attention_node": "attention_node.node:AttentionNode",
    "vpr_localizer": "localizer_node.node:LocalizerNode",
    "map_builder": "map_builder.node:MapBuilderNode",
}


def node_names_in(params_file: str) -> List[str]:
    """Node names of the suite listed in a parameter file, in start-up order.

    Raises:
        DatasetError: missing/invalid file or no known node in it.
    """
    doc = read_params_file(params_file)
    names = [n for n in NODE_CLASSES if n in doc]
    if not names:
        raise DatasetError(f"{params_file}: no node of the suite ({', '.join(NODE_CLASSES)}) in it")
    return names


def node_class(name: str):
    mod, cls = NODE_CLASSES[name].split(":")
    return getattr(importlib.import_module(mod), cls)


class Graph:
    """Nodes + executor spinning in a background thread (used by ``run``, ``demo`` and tests).

    Args:
        params_file: ROS parameter YAML.
        names: nodes to start (default: every suite node in the file).
        extra_args: more ``--ros-args`` arguments (e.g. remaps).

    Raises:
        VprError: a node could not start (e.g. unloadable map); nodes already made are destroyed.
    """

    def __init__(self, params_file: str, names: Optional[Sequence[str]] = None,
                 extra_args: Sequence[str] = ()):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor

        self.names = list(names or node_names_in(params_file))
        self.context = Context()
        rclpy.init(args=["--ros-args", "--params-file", params_file, *extra_args], context=self.context)
        self.nodes = []
        try:
            for n in self.names:
                self.nodes.append(node_class(n)(context=self.context))
        except BaseException:
            self.shutdown()
            raise
        self.executor = MultiThreadedExecutor(num_threads=max(4, 2 * len(self.nodes)), context=self.context)
        for node in self.nodes:
            self.executor.add_node(node)
        self._thread = threading.Thread(target=self._spin, name="executor", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # executor shut down while spinning
            pass

    def node(self, name: str):
        return self.nodes[self.names.index(name)]

    def shutdown(self) -> None:
        """Flush and destroy every node, stop the executor, shut the context down."""
        import rclpy

        for node in reversed(getattr(self, "nodes", [])):
            try:
                if hasattr(node, "flush"):
                    node.flush()
                node.destroy_node()
            except Exception as exc:  # noqa: BLE001 - keep shutting the others down
                print(f"[vpr-localizer] error while stopping {node.get_name()}: {exc}")
        if hasattr(self, "executor"):
            self.executor.shutdown(timeout_sec=2.0)
        if self.context.ok():
            rclpy.shutdown(context=self.context)


def run(params_file: str, names: Optional[Sequence[str]] = None, duration_s: Optional[float] = None,
        extra_args: Sequence[str] = ()) -> int:
    """Run the graph until Ctrl-C/SIGTERM (or ``duration_s``). Returns the exit status.

    A node that cannot start (bad ``map_path`` ...) gives one fatal log line and status 2.
    """
    import logging

    log = logging.getLogger("vpr_localizer.run")
    try:
        graph = Graph(params_file, names, extra_args)
    except startup_errors() as exc:
        log.critical("cannot start: %s", exc)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("running %s (Ctrl-C to stop)", ", ".join(graph.names))
    stop.wait(duration_s)
    graph.shutdown()
    return 0
