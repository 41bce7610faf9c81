"""Semantic segmentation: Cityscapes classes, the backend base class and registry, ESPNet, ESPNetv2, Panoptic-DeepLab."""
