"""Helpers shared by the ``vpr-localizer`` subcommands: encoder options and scenario defaults."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, Optional


def default_shared_dir() -> str:
    """``$VPR_SHARED_DIR`` or ``../shared`` (resolved by :func:`resolve_shared_dir`: relative to
    the working directory, else to the repository root)."""
    return os.environ.get("VPR_SHARED_DIR", os.path.join("..", "shared"))


def repository_root() -> str:
    """The directory holding the ``vpr_localizer`` package (the repository root of a source
    checkout; the shared data folder ``../shared`` sits beside it)."""
    import vpr_localizer

    return str(Path(vpr_localizer.__file__).resolve().parents[1])


def resolve_shared_dir(path: str) -> str:
    """The shared data folder (``--shared``) ``path``, found from any working directory.

    A relative ``path`` that is not a directory relative to the working directory is tried
    relative to the repository root (:func:`repository_root`), so the default ``../shared`` finds
    the folder beside the repository wherever the command runs. ``~`` is expanded.

    Returns:
        The first candidate that is a directory, else ``path`` unchanged (the commands then
        report the missing dataset or weight file).
    """
    if not path:
        return path
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) or os.path.isabs(expanded):
        return expanded
    cand = os.path.normpath(os.path.join(repository_root(), expanded))
    return cand if os.path.isdir(cand) else path


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Encoder options shared by build-map and evaluate (override the --params file)."""
    from vpr_localizer.models.registry import aggregator_names, backbone_names, preprocessing_names

    g = p.add_argument_group("encoder")
    g.add_argument("--params", help="ROS parameter YAML (config/*.yaml); its 'encoder' section is the base")
    g.add_argument("--backbone", choices=backbone_names())
    g.add_argument("--weights", help="backbone weight file (default: the backbone's conventional file, for vgg16 "
                                     "vgg16_features_imagenet_caffe_bgr.pth, in $VPR_WEIGHTS_DIR, else in "
                                     "../shared/weights beside the repository)")
    g.add_argument("--preprocessing", choices=preprocessing_names())
    g.add_argument("--image-size", nargs=2, type=int, metavar=("W", "H"), help="network input size, pixels")
    g.add_argument("--aggregator", choices=aggregator_names())
    g.add_argument("--clusters", type=int, dest="num_clusters", help="NetVLAD K (default 64)")
    g.add_argument("--pca-dim", type=int, help="PCA-whitening dimension, 0 = off (default 4096)")
    g.add_argument("--pca-min-images", type=int, help="fit PCA only on maps with at least this many images")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--checkpoint", help="trained encoder checkpoint: a file, the name of a shipped one "
                                        "(vgg16_conv5_nordland, the default for vgg16 with its Caffe weights), "
                                        "or none (untrained ImageNet + k-means)")
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
    """EncoderConfig from --params file, scenario defaults (``base``) and explicit flags.

    When none of them names a checkpoint, the shipped default for the backbone is used
    (:func:`vpr_localizer.trained.default_checkpoint`: ``vgg16_conv5_nordland`` for VGG16 with
    its Caffe weights); ``--checkpoint none`` (or ``checkpoint: ""`` in the file) is the
    untrained baseline."""
    from vpr_localizer.models.config import EncoderConfig
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
    if not d.get("weights"):
        from vpr_localizer.models.registry import default_backbone_weights

        # $VPR_WEIGHTS_DIR, then ../shared/weights beside the repository; WeightsError lists both
        d["weights"] = default_backbone_weights(d.get("backbone") or EncoderConfig.backbone)
    if "checkpoint" not in d:  # neither the parameter file, the scenario base nor --checkpoint named one
        from vpr_localizer.trained import default_checkpoint

        d["checkpoint"] = default_checkpoint(d.get("backbone") or EncoderConfig.backbone, d.get("weights"),
                                             d.get("preprocessing"))
    return EncoderConfig.from_dict(d)


def scenario_encoder_base(scenario, shared: str) -> Dict:
    """Encoder defaults of a scenario or training set: the shared VGG16 and ESPNetv2 weights, its
    input and segmentation sizes."""
    from vpr_localizer.evaluation.scenarios import SEGMENTATION_BACKEND, SEGMENTATION_WEIGHTS, VGG16_WEIGHTS

    return {"weights": os.path.join(shared, VGG16_WEIGHTS), "image_size": list(scenario.image_size),
            "segmentation_size": list(scenario.segmentation_size),
            "segmentation": SEGMENTATION_BACKEND, "segmentation_weights": os.path.join(shared, SEGMENTATION_WEIGHTS)}


def add_sequence_args(p: argparse.ArgumentParser, many: bool = True) -> None:
    """SeqSLAM options (sequence matching over consecutive query frames; Milford & Wyeth, ICRA 2012)."""
    g = p.add_argument_group("sequence matching (SeqSLAM)")
    if many:
        g.add_argument("--sequence", nargs="+", type=int, default=[], metavar="L",
                       help="also score SeqSLAM with these sequence lengths, in query frames (e.g. 10 20 40), "
                            "beside single-frame results")
    else:
        g.add_argument("--sequence", type=int, metavar="L",
                       help="localise by SeqSLAM over the last L query frames (the images in name order)")
    g.add_argument("--sequence-velocity", nargs=2, type=float, metavar=("VMIN", "VMAX"), default=None,
                   help="map keyframes per query frame searched by SeqSLAM (default 0.8 1.2)")
    if many:
        g.add_argument("--online-filter", action="store_true",
                       help="also score the vpr_localizer node's HMM filter run frame by frame over the queries")


def online_filter_from_args(args):
    """The node's default :class:`~vpr_localizer.localization.tracking.TrackingConfig` when
    ``--online-filter`` is given, else None."""
    from vpr_localizer.localization.tracking import TrackingConfig

    return TrackingConfig() if getattr(args, "online_filter", False) else None


def sequence_config_from_args(args):
    """The :class:`~vpr_localizer.localization.sequence.SequenceConfig` of the --sequence-* flags.

    Raises:
        ConfigError: invalid values (a length < 1, VMIN > VMAX ...).
    """
    from vpr_localizer.localization.sequence import SequenceConfig

    lengths = args.sequence if isinstance(args.sequence, list) else [args.sequence]
    kw = {"seq_len": lengths[0]} if lengths and lengths[0] else {}
    if getattr(args, "sequence_velocity", None):
        kw.update(v_min=args.sequence_velocity[0], v_max=args.sequence_velocity[1])
    return SequenceConfig(**kw)


def add_patch_args(p: argparse.ArgumentParser, switch: bool = False) -> None:
    """Patch-NetVLAD descriptor options (Hausler et al., CVPR 2021); ``switch`` adds ``--patches``."""
    from vpr_localizer.models.patch_encoder import DEFAULT_PATCH_DIM
    from vpr_localizer.models.patch_netvlad import DEFAULT_PATCH_SIZES

    g = p.add_argument_group("Patch-NetVLAD patch descriptors")
    if switch:
        g.add_argument("--patches", action="store_true",
                       help="also store every keyframe's Patch-NetVLAD descriptors (float16) and a patch PCA "
                            "in the map, for re-ranking (localize --rerank)")
    g.add_argument("--patch-sizes", nargs="+", type=int, metavar="P", default=None,
                   help=f"square patch sizes in feature-grid cells (default {' '.join(map(str, DEFAULT_PATCH_SIZES))}, "
                        "or 5 alone when only the speed mode is evaluated; "
                        "VGG16 has 16 px per cell, so p needs p*16 px on the shorter input side)")
    g.add_argument("--patch-dim", type=int, default=None,
                   help=f"patch descriptor dimension after the patch PCA (default {DEFAULT_PATCH_DIM}, the paper's speed mode)")
    g.add_argument("--patch-pca-images", type=int, default=None,
                   help="map images sampled to fit the patch PCA (default 50)")
    g.add_argument("--patch-pca-samples", type=int, default=None,
                   help="patch descriptors sampled to fit the patch PCA (default 2048)")


def patch_settings_from_args(args):
    """The :class:`~vpr_localizer.models.patch_encoder.PatchSettings` of the --patch-* flags.

    Raises:
        ConfigError: invalid values.
    """
    from vpr_localizer.models.patch_encoder import PatchSettings

    kw: Dict = {}
    if getattr(args, "patch_sizes", None):
        kw["patch_sizes"] = tuple(args.patch_sizes)
    for key, name in (("patch_dim", "dim"), ("patch_pca_images", "pca_images"), ("patch_pca_samples", "pca_samples")):
        if getattr(args, key, None) is not None:
            kw[name] = getattr(args, key)
    return PatchSettings(**kw)


def add_rerank_args(p: argparse.ArgumentParser, many: bool = True) -> None:
    """Patch-NetVLAD re-ranking options (the global top-k re-ordered by patch matches)."""
    g = p.add_argument_group("Patch-NetVLAD re-ranking")
    if many:
        g.add_argument("--rerank", nargs="+", default=[], choices=["ransac", "spatial"],
                       help="also score NetVLAD + Patch-NetVLAD re-ranking: ransac = performance mode (RANSAC, "
                            "every patch size), spatial = speed mode (rapid spatial scoring, patch size 5)")
    else:
        g.add_argument("--rerank", default="none", choices=["none", "ransac", "spatial"],
                       help="re-rank the global top-k with the map's patch descriptors: ransac = performance "
                            "mode, spatial = speed mode (the map must be built with --patches)")
    g.add_argument("--rerank-k", type=int, default=100, help="global candidates re-ranked (default 100)")


def rerank_configs_from_args(args):
    """One :class:`~vpr_localizer.localization.rerank.RerankConfig` per --rerank mode (none: [])."""
    from vpr_localizer.localization.rerank import RerankConfig

    modes = args.rerank if isinstance(args.rerank, list) else [args.rerank]
    return [RerankConfig(mode=m, k=args.rerank_k) for m in modes if m and m != "none"]
