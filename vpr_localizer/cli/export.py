"""``vpr-localizer export``: a map's encoder -> ONNX (+ sidecar JSON), optionally int8."""
from __future__ import annotations

import argparse
import logging
import os

LOG = logging.getLogger("vpr_localizer.export")


def add_export_parser(sub) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand on an argparse subparsers object."""
    from vpr_localizer.models.onnx_export import DEFAULT_OPSET

    x = sub.add_parser(
        "export", help="write a map's encoder as ONNX (dynamic batch) + sidecar JSON",
        description="Rebuild the encoder of a map (backbone + NetVLAD/GeM + PCA whitening) from its "
                    "fingerprint and write it as ONNX: input float32 (B, 3, H, W) preprocessed as the "
                    "torch encoder does, output (B, D) float32 final descriptors. The sidecar FILE.json "
                    "holds the fingerprint, input size, preprocessing, output dim, opset and versions.")
    x.add_argument("--map", required=True, help="map directory")
    x.add_argument("--out", required=True, help="ONNX file to write (FILE.onnx; the sidecar is FILE.json)")
    x.add_argument("--weights", help="backbone weight file (default: the one recorded in map.yaml)")
    x.add_argument("--checkpoint", help="encoder checkpoint (default: the map's encoder.pt)")
    x.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    x.add_argument("--int8", action="store_true",
                   help="static int8 quantisation of the backbone (onnxruntime, QDQ, per-channel)")
    x.add_argument("--calibration-images", type=int, default=32, metavar="N",
                   help="int8: calibrate on up to N map images (evenly spaced; default 32)")
    x.add_argument("--calibration-dir", help="int8: calibrate on the images of this folder instead")
    x.set_defaults(func=run_export)
    return x


def calibration_paths(vmap, count: int, folder: str = None):
    """Up to ``count`` calibration images: from ``folder`` when given, else the map's keyframe images.

    Raises:
        ConfigError: ``count`` < 1, or no readable image file (the map's recorded image paths
            are gone and no ``--calibration-dir`` was given).
        DatasetError: ``folder`` is not a folder of images.
    """
    from vpr_localizer.errors import ConfigError
    from vpr_localizer.models.onnx_export import list_calibration_images

    if folder:
        from vpr_localizer.io.records import list_images

        paths = [os.path.join(folder, n) for n in list_images(folder)]
    else:
        paths = [k.image_path for k in vmap.keyframes]
    found = list_calibration_images(paths, count)
    if not found:
        where = folder or f"the {len(paths)} image paths recorded in map {vmap.path}"
        raise ConfigError(f"no calibration image found in {where}; give --calibration-dir DIR")
    return found


def run_export(args) -> int:
    """Execute ``export``; returns the exit status.

    Raises:
        ConfigError: a guided map, ``--out`` not an ``.onnx`` file, no calibration images for
            ``--int8``.
        MapError, WeightsError, FingerprintMismatchError: the map or its encoder cannot be rebuilt.
    """
    from vpr_localizer.localization.localize import encoder_for_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.models.onnx_export import check_plain_fingerprint, export_onnx

    vmap = VprMap.load(args.map)
    check_plain_fingerprint(vmap.fingerprint)  # before building the encoder (segmentation weights ...)
    if not args.out.endswith(".onnx"):
        from vpr_localizer.errors import ConfigError

        raise ConfigError(f"--out must be an .onnx file, got {args.out!r}")
    calib = calibration_paths(vmap, args.calibration_images, args.calibration_dir) if args.int8 else ()
    encoder = encoder_for_map(vmap, weights=args.weights, device="cpu", checkpoint=args.checkpoint)
    rep = export_onnx(encoder, args.out, fingerprint=vmap.fingerprint, opset=args.opset, int8=args.int8,
                      calibration_paths=calib)
    s = rep.sidecar
    w, h = s["image_size"]
    print(f"exported {os.path.basename(str(vmap.path))} encoder ({s['fingerprint']['backbone']} + "
          f"{s['fingerprint']['aggregator']}{' + PCA' if s['output']['pca'] else ''}) to {rep.onnx_path}: "
          f"{s['precision']}{f' (calibrated on {rep.calibration_images} images)' if args.int8 else ''}, "
          f"input (B, 3, {h}, {w}) {s['preprocessing']['name']}, output (B, {s['output']['dim']}), "
          f"opset {s['opset']}; sidecar {rep.sidecar_path}; {rep.seconds:.1f} s")
    return 0
