"""``vpr-localizer build-map``: the three input layouts -> one map directory."""
from __future__ import annotations

import argparse
import logging

from vpr_localizer.cli.common import add_encoder_args, add_patch_args, encoder_config_from_args, patch_settings_from_args

LOG = logging.getLogger("vpr_localizer.build_map")


def add_build_map_parser(sub) -> argparse.ArgumentParser:
    """Register the ``build-map`` subcommand on an argparse subparsers object."""
    b = sub.add_parser(
        "build-map", help="build a geotagged map from images",
        description="Build a map from (a) a folder of images with GPS in EXIF, (b) a folder plus a CSV "
                    "(image,lat,lon[,alt,heading] or image,x,y[,z,yaw]), or (c) a folder with frame "
                    "indices in the file names only.")
    b.add_argument("--images", required=True, help="image folder")
    b.add_argument("--csv", help="CSV with positions (layout b); paths relative to --images")
    b.add_argument("--gps", default="auto", choices=["auto", "exif", "none"],
                   help="layout a/c: exif = every image must carry EXIF GPS; none = frame index only")
    b.add_argument("--select", default="all", choices=["all", "even", "odd"], help="keep even/odd frames")
    b.add_argument("--condition", nargs="*", help="keep only these CSV condition tags")
    b.add_argument("--out", required=True, help="map directory to write")
    b.add_argument("--index", default=None, choices=["flat", "ivfpq", "hnsw"],
                   help="FAISS index type (default flat = exact inner product)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing map (atomically)")
    add_encoder_args(b)
    add_patch_args(b, switch=True)
    b.set_defaults(func=run_build_map)
    return b


def run_build_map(args) -> int:
    """Execute ``build-map``; returns the exit status.

    Raises:
        MapError: ``--out`` exists and ``--overwrite`` is not given, or ``--overwrite`` is given
            but ``--out`` is a file or a directory that is not a map (nothing is deleted).
        VprError: the other errors of loading images, weights and building the map.
    """
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.mapping.build import build_map
    from vpr_localizer.param_files import load_params
    from vpr_localizer.io.records import load_records

    from vpr_localizer.errors import ConfigError
    from vpr_localizer.mapping.store import check_map_target

    # fail before minutes of encoding: an existing path without --overwrite, or --overwrite onto
    # something that is not a map (MapError)
    check_map_target(args.out, args.overwrite)
    patch_flags = [f for f, v in (("--patch-sizes", args.patch_sizes), ("--patch-dim", args.patch_dim),
                                  ("--patch-pca-images", args.patch_pca_images),
                                  ("--patch-pca-samples", args.patch_pca_samples)) if v is not None]
    if patch_flags and not args.patches:
        raise ConfigError(f"{', '.join(patch_flags)} only apply with --patches")
    patches = patch_settings_from_args(args) if args.patches else None
    records = load_records(args.images, args.csv, args.gps, args.select, args.condition)
    index_kind = args.index or (load_params(args.params).get("map", {}).get("index", "flat")
                                if args.params else "flat")
    cfg = encoder_config_from_args(args)
    encoder = Encoder(cfg)
    LOG.info("building map from %d images in %s with %s/%s at %dx%d on %s", len(records), args.images,
             cfg.backbone, cfg.aggregator, cfg.image_size[0], cfg.image_size[1], encoder.device)
    report = build_map(records, encoder, args.out, index_kind=index_kind, overwrite=args.overwrite, patches=patches)
    for path, reason in report.skipped:
        LOG.warning("skipped %s", reason)
    print(f"map written to {report.path}: {report.keyframes} keyframes, {len(report.skipped)} image(s) "
          f"skipped, descriptor {report.descriptor_dim}-D (PCA {'on' if report.pca_fitted else 'off'}), "
          f"{'geotagged (ENU datum in map.yaml)' if report.geotagged else 'no geodetic datum'}, "
          f"{report.seconds:.1f} s")
    if report.patch_layout is not None:
        lay = report.patch_layout
        print(f"patch descriptors: sizes {lay['patch_sizes']} on a {lay['grid_hw'][1]}x{lay['grid_hw'][0]} cell grid, "
              f"{lay['dim']}-D float16, {report.patch_bytes_per_keyframe} bytes per keyframe "
              f"({report.patch_bytes_per_keyframe * report.keyframes / 2**20:.1f} MiB in all), {report.patch_seconds:.1f} s")
    return 0
