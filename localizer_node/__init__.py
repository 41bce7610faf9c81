"""localizer_node: the ``vpr_localizer`` ROS 2 node (descriptor -> pose, fix, loop closure)."""
