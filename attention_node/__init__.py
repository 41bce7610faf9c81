"""attention_node: image (+ segmentation labels) -> attention-weighted NetVLAD descriptor.

Not implemented yet: the node comes with the ROS 2 node-suite issue. The descriptor it will
publish is computed by :class:`vpr_localizer.encoder.Encoder`.
"""
