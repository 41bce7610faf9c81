"""Camera-input QoS: sensor-data by default, overridable through the standard ROS 2 parameters."""
from __future__ import annotations


def _subscription_qos(args):
    import rclpy
    from rclpy.context import Context
    from sensor_msgs.msg import Image

    from vpr_ros.qos import sensor_subscription

    ctx = Context()
    rclpy.init(args=args, context=ctx)
    try:
        node = rclpy.create_node("qos_probe", context=ctx)
        sub = sensor_subscription(node, Image, "image", lambda _m: None)
        out = (sub.qos_profile.reliability, sub.qos_profile.depth)
        node.destroy_node()
        return out
    finally:
        rclpy.shutdown(context=ctx)


def test_sensor_subscription_default_is_best_effort_depth_1(ros_env):
    from rclpy.qos import ReliabilityPolicy

    assert _subscription_qos([]) == (ReliabilityPolicy.BEST_EFFORT, 1)


def test_sensor_subscription_accepts_qos_overrides(ros_env):
    from rclpy.qos import ReliabilityPolicy

    args = ["--ros-args", "-p", "qos_overrides./image.subscription.reliability:=reliable",
            "-p", "qos_overrides./image.subscription.depth:=7"]
    assert _subscription_qos(args) == (ReliabilityPolicy.RELIABLE, 7)
