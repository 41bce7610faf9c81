"""segmentation_node: camera image -> Cityscapes trainId labels (``segmentation/labels``) and a
colour overlay (``segmentation/overlay``).

Backends come from :func:`vpr_localizer.segmentation.registry.make_backend`: ``none`` (every pixel
ignore), ``espnetv2``, ``espnet`` and ``panoptic_deeplab`` (accuracy unverified), all on the same
topics.
"""
