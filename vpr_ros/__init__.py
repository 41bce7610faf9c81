"""ROS 2 glue shared by every node of the suite (rclpy + standard messages only).

Nodes only adapt messages and parameters; this package holds what they would otherwise
copy from each other: QoS profiles and the camera subscription (:mod:`.qos`), message <-> NumPy
conversion (:mod:`.convert`), the newest-frame worker (:mod:`.latest`), parameters declared from
dataclasses (:mod:`.params`), diagnostics (:mod:`.diagnostics`), header-stamp matching between
topics (:mod:`.stamp_sync`), the nodes' base class with set-up / teardown (:mod:`.worker_node`)
and the console entry point (:mod:`.spin`). The thinking stays in the ROS-free core
:mod:`vpr_localizer`.
"""
