"""Helpers shared by the ``vpr-localizer`` subcommands: encoder options and scenario defaults."""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional


def default_shared_dir() -> str:
    """``$VPR_SHARED_DIR`` or ``../shared`` relative to the working directory."""
    return os.environ.get("VPR_SHARED_DIR", os.path.join("..", "shared"))


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Encoder options shared by build-map and evaluate (override the --params file)."""
    g = p.add_argument_group("encoder")
    g.add_argument("--params", help="ROS parameter YAML (config/*.yaml); its 'encoder' section is the base")
    g.add_argument("--backbone", choices=["vgg16", "efficientnet_lite0"])
    g.add_argument("--weights", help="backbone weight file (vgg16: ../shared/weights/vgg16_features_imagenet_caffe_bgr.pth)")
    g.add_argument("--preprocessing", choices=["caffe_bgr", "torchvision", "efficientnet_lite"])
    g.add_argument("--image-size", nargs=2, type=int, metavar=("W", "H"), help="network input size, pixels")
    g.add_argument("--aggregator", choices=["netvlad", "gem", "gap"])
    g.add_argument("--clusters", type=int, dest="num_clusters", help="NetVLAD K (default 64)")
    g.add_argument("--pca-dim", type=int, help="PCA-whitening dimension, 0 = off (default 4096)")
    g.add_argument("--pca-min-images", type=int, help="fit PCA only on maps with at least this many images")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--checkpoint", help="trained encoder checkpoint (aggregator + PCA)")
    g.add_argument("--static-mask", action="store_true", default=None,
                   help="NetVLAD weighted by the segmentation's static-structure mask")
    g.add_argument("--seg-stream", action="store_true", default=None,
                   help="add the segmentation stream (colour-coded labels through the backbone, concatenated)")
    g.add_argument("--attention", action="store_true", default=None, help="one spatial attention module per stream")
    g.add_argument("--segmentation", help="segmentation backend for --static-mask/--seg-stream (e.g. espnetv2)")
    g.add_argument("--segmentation-weights", help="that backend's weight file")
    g.add_argument("--segmentation-size", nargs=2, type=int, metavar=("W", "H"),
                   help="segmentation network input size, pixels (default 512 256)")


def encoder_config_from_args(args, base: Optional[Dict] = None):
    """EncoderConfig from --params file, scenario defaults (``base``) and explicit flags."""
    from vpr_localizer.models.encoder import EncoderConfig
    from vpr_localizer.param_files import load_params

    d: Dict = dict(base or {})
    if getattr(args, "params", None):
        d.update(load_params(args.params).get("encoder", {}))
    for key in ("backbone", "weights", "preprocessing", "aggregator", "num_clusters", "pca_dim",
                "pca_min_images", "batch_size", "device", "checkpoint", "static_mask", "seg_stream",
                "attention", "segmentation", "segmentation_weights", "segmentation_size"):
        v = getattr(args, key, None)
        if v is not None:
            d[key] = v
    if getattr(args, "image_size", None):
        d["image_size"] = args.image_size
    if d.get("backbone", "vgg16") != "vgg16" and "weights" in d and base and d["weights"] == base.get("weights"):
        d.pop("weights")  # the scenario's VGG16 file does not fit another backbone
    return EncoderConfig.from_dict(d)


def scenario_encoder_base(scenario, shared: str) -> Dict:
    """Encoder defaults of a scenario or training set: the shared VGG16 and ESPNetv2 weights, its
    input and segmentation sizes."""
    from vpr_localizer.evaluation.scenarios import SEGMENTATION_BACKEND, SEGMENTATION_WEIGHTS, VGG16_WEIGHTS

    return {"weights": os.path.join(shared, VGG16_WEIGHTS), "image_size": list(scenario.image_size),
            "segmentation_size": list(scenario.segmentation_size),
            "segmentation": SEGMENTATION_BACKEND, "segmentation_weights": os.path.join(shared, SEGMENTATION_WEIGHTS)}
