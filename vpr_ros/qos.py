"""QoS profiles: sensor-data QoS on camera input (REP-2003 sensor data), reliable QoS on outputs."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy


def sensor_qos(depth: int = 1) -> QoSProfile:
    """Best effort, volatile, keep only the last ``depth`` (default 1) messages: camera input."""
    return QoSProfile(reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE,
                      history=HistoryPolicy.KEEP_LAST, depth=depth)


def reliable_qos(depth: int = 10) -> QoSProfile:
    """Reliable, volatile, keep last ``depth``: outputs (poses, descriptors, loop closures)."""
    return QoSProfile(reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE,
                      history=HistoryPolicy.KEEP_LAST, depth=depth)


def latched_qos() -> QoSProfile:
    """Reliable, transient-local, depth 1: state a late subscriber still needs (e.g. map markers)."""
    return QoSProfile(reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                      history=HistoryPolicy.KEEP_LAST, depth=1)


def sensor_subscription(node, msg_type, topic: str, callback, depth: int = 1, **kwargs):
    """Subscribe to sensor input with :func:`sensor_qos`, overridable by standard ROS 2 QoS parameters.

    The subscription accepts the ``qos_overrides.<topic>.subscription.{reliability,depth,history,
    durability}`` parameters (rclpy ``QoSOverridingOptions``), so a deployment or a test that needs
    lossless delivery (e.g. a bag replayed with ``--reliable``) sets, in the node's params YAML::

        qos_overrides:
          /image:
            subscription: {reliability: reliable, depth: 10}

    Args:
        node: the rclpy node.
        msg_type: message class.
        topic: topic name (relative names are resolved by the node).
        callback: message callback.
        depth: keep-last depth of the default sensor-data profile.
        **kwargs: passed to ``Node.create_subscription`` (e.g. ``callback_group``).
    """
    from rclpy.qos_overriding_options import QoSOverridingOptions

    return node.create_subscription(msg_type, topic, callback, sensor_qos(depth=depth),
                                    qos_overriding_options=QoSOverridingOptions.with_default_policies(), **kwargs)


def camera_subscription(node, compressed: bool, callback, **kwargs):
    """The camera input of a node: ``image`` (sensor_msgs/Image) or, when ``compressed``,
    ``image/compressed`` (sensor_msgs/CompressedImage), through :func:`sensor_subscription`.

    Returns:
        The subscription (``.topic_name`` is the resolved topic).
    """
    from sensor_msgs.msg import CompressedImage, Image

    if compressed:
        return sensor_subscription(node, CompressedImage, "image/compressed", callback, **kwargs)
    return sensor_subscription(node, Image, "image", callback, **kwargs)
