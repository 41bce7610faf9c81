"""Semantic segmentation for place recognition.

* :mod:`.classes` -- Cityscapes trainIds, palette, static/dynamic/sky/ignore classes, weights,
  colouring (numpy only);
* :mod:`.registry` -- :func:`~.registry.make_backend` by name, the ``none`` backend (no torch);
* :mod:`.base` -- :class:`~.base.SegmentationBackend`, the base class of the network backends;
* :mod:`.espnet`, :mod:`.espnetv2`, :mod:`.panoptic` -- ESPNet (Mehta et al., ECCV 2018),
  ESPNetv2 (Mehta et al., CVPR 2019), Panoptic-DeepLab (Cheng et al., CVPR 2020).
"""
