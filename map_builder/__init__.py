"""map_builder: images (folder + EXIF GPS | CSV | frame index) -> geotagged VPR map.

``vpr_localizer.cli.build_map`` is the ``vpr-localizer build-map`` subcommand. The thinking (encoding,
k-means, PCA, index, atomic write) lives in the ROS-free core, :mod:`vpr_localizer.mapping.build`.
"""
