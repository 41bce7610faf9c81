"""segmentation_node: camera image -> Cityscapes trainId labels (``segmentation/labels``) and a
colour overlay (``segmentation/overlay``).

Backends come from :mod:`vpr_localizer.segmentation.classes`; today only ``none`` (every pixel ignore)
exists, the ESPNet/ESPNetv2/Panoptic-DeepLab backends come with the segmentation issue on the
same topics.
"""
