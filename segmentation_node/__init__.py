"""segmentation_node: camera image -> Cityscapes trainId labels.

Not implemented yet: the node comes with the ROS 2 node-suite issue and its backends with the
segmentation issue. Nothing in this package is used by the core pipeline.
"""
