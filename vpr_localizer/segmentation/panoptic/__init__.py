"""Panoptic-DeepLab (Cheng et al., "Panoptic-DeepLab: A Simple, Strong, and Fast Baseline for
Bottom-Up Panoptic Segmentation", CVPR 2020) for Cityscapes (19 classes), written for this project
in detectron2's checkpoint layout.

.. warning::
   **No Panoptic-DeepLab weights exist in this environment, so the accuracy of this backend is
   unverified.** What is tested (``test/test_panoptic.py``) is only: the output shapes of the
   network on random weights, that its ``state_dict`` round-trips through the strict loader,
   that bad checkpoints are refused, and the post-processing on hand-built tensors with known
   answers. Whether a released checkpoint loads (its key names and shapes are reconstructed
   from the reference *source code*, never checked against a real file) and whether our
   forward pass reproduces the reference label maps is not known until such a file is tried.

Modules, by responsibility (import from them directly; this package re-exports nothing):

* :mod:`.postprocess` -- centre NMS / top-k, offset grouping, majority-vote class and
  stuff/thing fusion into panoptic ids (pure torch, paper Sec. 3.2);
* :mod:`.model` -- the network (:class:`~.model.PanopticDeepLab`: R-52 backbone, semantic and
  instance heads);
* :mod:`.checkpoint` -- the safe detectron2 ``.pkl`` / ``torch.save`` reader and the strict
  loader (:func:`~.checkpoint.load_panoptic_deeplab`);
* :mod:`.backend` -- the segmentation backend ``panoptic_deeplab``
  (:class:`~.backend.PanopticDeepLabBackend`, a
  :class:`~vpr_localizer.segmentation.base.SegmentationBackend`).
"""
