"""ROS 2 glue shared by every node of the suite (rclpy + standard messages only).

Nodes only adapt messages and parameters; this package holds what they would otherwise
copy from each other: QoS profiles (:mod:`.qos`), message <-> NumPy conversion (:mod:`.convert`),
the newest-frame worker (:mod:`.latest`), nested parameters (:mod:`.params`) and diagnostics
(:mod:`.diagnostics`). The thinking stays in the ROS-free core :mod:`vpr_localizer`.
"""
