"""map_builder: images (folder + EXIF GPS | CSV | frame index) -> geotagged VPR map.

``map_builder.cli`` is the ``vpr-localizer build-map`` subcommand. The thinking (encoding,
k-means, PCA, index, atomic write) lives in the ROS-free core, :mod:`vpr_localizer.mapping`.
"""
