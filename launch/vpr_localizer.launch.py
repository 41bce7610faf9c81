"""Launch the vpr_localizer node graph on a real ROS 2 install (launch / launch_ros).

    ros2 launch vpr_localizer vpr_localizer.launch.py \
        params_file:=/path/to/lund_graph.yaml image:=/camera/image_raw \
        [with_segmentation:=true] [with_map_builder:=true]

Starts ``attention_node`` and ``vpr_localizer`` (plus, optionally, ``segmentation_node`` and
``map_builder``), every node with the same ROS 2 parameter YAML and the camera topic remapped
to the nodes' relative ``image`` input. Without launch/launch_ros (e.g. a pip-only install),
``vpr-localizer run --params FILE --remap image:=/camera/image_raw`` starts the same nodes in
one process.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("vpr_localizer"), "config", "lund_graph.yaml")
    params = LaunchConfiguration("params_file")
    image = LaunchConfiguration("image")
    remaps = [("image", image), ("image/compressed", [image, "/compressed"])]

    def node(executable, name, condition=None):
        return Node(package="vpr_localizer", executable=executable, name=name, output="screen",
                    parameters=[params], remappings=remaps, condition=condition)

    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="ROS 2 parameter YAML (node_name: ros__parameters: ...)"),
        DeclareLaunchArgument("image", default_value="/camera/image_raw",
                              description="camera topic (sensor_msgs/Image; + /compressed for CompressedImage)"),
        DeclareLaunchArgument("with_segmentation", default_value="false",
                              description="also start segmentation_node (publishes segmentation/labels)"),
        DeclareLaunchArgument("with_map_builder", default_value="false",
                              description="also start map_builder (live mapping)"),
        node("segmentation_node", "segmentation_node", IfCondition(LaunchConfiguration("with_segmentation"))),
        node("attention_node", "attention_node"),
        node("vpr_localizer_node", "vpr_localizer"),
        node("map_builder_node", "map_builder", IfCondition(LaunchConfiguration("with_map_builder"))),
    ])
