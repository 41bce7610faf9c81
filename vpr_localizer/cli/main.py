"""``vpr-localizer``: one command line with subcommands.

build-map   images (EXIF GPS | CSV | frame index) -> map directory
map-export  map directory -> Milvus / milvus-lite collection
map-import  Milvus / milvus-lite collection -> map directory (keyframes, descriptors, encoder)
export      a map's encoder -> ONNX (+ sidecar JSON), optionally int8
localize    offline batch localisation of an image folder against a map -> CSV / JSON
evaluate    recall@N, errors, baselines and plots for a scenario or two image sets
demo        every real-data scenario, then the results table
train       guided NetVLAD + attention: triplet loss, hard negatives, cached features (CPU)
make-bag    images (+ GPS / positions) -> rosbag2 (sqlite3 or MCAP) at a fixed rate
replay      publish a rosbag2 with its original timing (real ROS 2, rclpy)
run         start the ROS 2 nodes of a parameter YAML in one process

Errors a user can cause end the command with one readable line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional

from vpr_localizer.cli.common import (add_encoder_args, add_patch_args, add_rerank_args, add_sequence_args,
                                      default_shared_dir, encoder_config_from_args, patch_settings_from_args,
                                      rerank_configs_from_args, online_filter_from_args, resolve_shared_dir,
                                      scenario_encoder_base,
                                      sequence_config_from_args)
from vpr_localizer.errors import ConfigError

LOG = logging.getLogger("vpr_localizer")


def _cmd_localize(args) -> int:
    import csv as _csv

    from vpr_localizer.localization.localize import Localizer, LocalizerConfig, encoder_for_map
    from vpr_localizer.mapping.store import VprMap
    from vpr_localizer.param_files import load_params
    from vpr_localizer.io.records import load_records

    rerank = rerank_configs_from_args(args)
    if rerank and args.sequence:
        raise ConfigError("--rerank and --sequence cannot be combined (re-ranking is single-frame)")
    vmap = VprMap.load(args.map)
    if getattr(args, "runtime", "torch") == "onnxruntime":
        from vpr_localizer.models.onnx_runtime import OnnxEncoder

        if not args.onnx:
            raise ConfigError("--runtime onnxruntime needs --onnx FILE (written by 'vpr-localizer export')")
        if rerank:
            raise ConfigError("--rerank needs backbone features: use --runtime torch")
        encoder = OnnxEncoder(args.onnx, device=args.device or "auto")
        encoder.check_map(vmap)  # FingerprintMismatchError: exported from another map's encoder
    else:
        if getattr(args, "onnx", None):
            raise ConfigError("--onnx only applies with --runtime onnxruntime")
        encoder = encoder_for_map(vmap, weights=args.weights, device=args.device or "auto",
                                  checkpoint=args.checkpoint)
    lcfg = dict(load_params(args.params).get("localizer", {})) if args.params else {}
    if args.top_k:
        lcfg["top_k"] = args.top_k
    loc = Localizer(vmap, LocalizerConfig.from_dict(lcfg))
    recs = load_records(args.images, args.csv, "auto", args.select)
    on_batch, rerank_ests = None, []
    if rerank:
        from vpr_localizer.localization.rerank import query_patch_encoder

        expected = {k: v for k, v in (("patch_sizes", args.patch_sizes), ("dim", args.patch_dim)) if v}
        loc.reranker(rerank[0], expected)  # no patches / another patch configuration: fail before encoding
        penc = query_patch_encoder(encoder, vmap)

        def localize_batch(idx, enc):  # re-rank batch by batch: the query patches are not kept
            rerank_ests.extend(loc.localize_reranked(enc.descriptors, penc.extract(enc.features), rerank[0]))
        on_batch = localize_batch
    res = encoder.encode_paths([r.path for r in recs], progress="encoding queries", on_batch=on_batch)
    if not len(res.ok):
        ests = []
    elif rerank:
        ests = rerank_ests
    elif args.sequence:
        ests = loc.localize_sequence(res.descriptors, sequence_config_from_args(args))
    else:
        ests = loc.localize(res.descriptors)
    rows = [e.as_dict(recs[i].name, vmap.keyframes) for i, e in zip(res.ok, ests)]
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".json"):
        with open(out, "w") as f:
            json.dump({"map": vmap.path, "skipped": res.skipped, "results": rows}, f, indent=2, default=float)
    else:
        with open(out, "w", newline="") as f:
            if rows:
                w = _csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                for r in rows:
                    w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    how = (f" with Patch-NetVLAD re-ranking ({rerank[0].mode}, top {rerank[0].k}; "
           f"{1e3 * res.callback_seconds / max(len(res.ok), 1):.0f} ms/image for patches + re-ranking)" if rerank else "")
    print(f"localised {len(rows)} of {len(recs)} images against {vmap.path} ({len(vmap)} keyframes){how}; "
          f"skipped {len(res.skipped)}; wrote {out}")
    return 0


def _rerank_kwargs(args) -> Dict:
    """``evaluate()`` keyword arguments of the --rerank / --patch-* / --query-step flags."""
    rerank = rerank_configs_from_args(args)
    patch_flags = [f for f, v in (("--patch-sizes", args.patch_sizes), ("--patch-dim", args.patch_dim),
                                  ("--patch-pca-images", args.patch_pca_images),
                                  ("--patch-pca-samples", args.patch_pca_samples)) if v is not None]
    if patch_flags and not rerank:
        raise ConfigError(f"{', '.join(patch_flags)} only apply with --rerank")
    settings = patch_settings_from_args(args) if rerank else None
    if settings is not None and args.patch_sizes is None and all(c.mode == "spatial" for c in rerank):
        from dataclasses import replace

        from vpr_localizer.localization.rerank import SPEED_MODE_PATCH_SIZE

        settings = replace(settings, patch_sizes=(SPEED_MODE_PATCH_SIZE,), strides=(1,))  # speed mode only scores p=5
    return {"rerank": rerank, "patch_settings": settings, "query_step": args.query_step}


def scenario_output(args, scenario: str) -> tuple:
    """``(output folder, run name)`` of one scenario run: ``--out/NAME`` and ``NAME`` when
    ``--name`` is given (so runs with different names do not overwrite each other), else
    ``--out/SCENARIO`` and the scenario name."""
    run_name = getattr(args, "name", None) or scenario
    return os.path.join(args.out, run_name), run_name


def _run_scenario(name: str, args) -> Dict:
    from vpr_localizer.evaluation.evaluate import evaluate, summary_lines
    from vpr_localizer.evaluation.scenarios import get_scenario

    sc = get_scenario(name)
    shared = args.shared
    datasets = os.path.join(shared, "datasets")
    cfg = encoder_config_from_args(args, scenario_encoder_base(sc, shared))
    out, run_name = scenario_output(args, sc.name)
    LOG.info("scenario %s: %s", sc.name, sc.description)
    res = evaluate(sc.map.load(datasets), sc.queries.load(datasets), cfg, sc.gt, out, name=run_name,
                   description=sc.description, save_map_dir=not getattr(args, "no_map", False),
                   sequence_lengths=args.sequence, sequence_config=sequence_config_from_args(args),
                   online_filter=online_filter_from_args(args), **_rerank_kwargs(args))
    print(f"== {sc.name}: {sc.description}")
    for line in summary_lines(res.metrics):
        print("   " + line)
    print(f"   encode {res.metrics['encoder']['encode_ms_per_image']:.0f} ms/image at "
          f"{cfg.image_size[0]}x{cfg.image_size[1]} on {res.metrics['encoder']['device']}; outputs in {out}")
    return res.metrics


def _cmd_evaluate(args) -> int:
    from vpr_localizer.evaluation.evaluate import GroundTruth, evaluate, ground_truth_from_file, summary_lines
    from vpr_localizer.io.records import load_records

    if args.scenario:
        if args.gt_file or args.gt:
            raise ConfigError("--gt / --gt-file apply to --map-images/--query-images, not to a --scenario "
                              "(it has its own ground truth)")
        _run_scenario(args.scenario, args)
        return 0
    if not (args.map_images and args.query_images):
        raise ConfigError("evaluate needs --scenario NAME, or --map-images and --query-images")
    if args.gt_file and args.gt:
        raise ConfigError("--gt and --gt-file exclude each other")
    if args.gt_file:
        gt = ground_truth_from_file(args.gt_file)
    else:
        gt = GroundTruth(args.gt or "position", thresholds_m=tuple(args.thresholds),
                         frame_tolerance=args.frame_tolerance)
    cfg = encoder_config_from_args(args)
    mrec = load_records(args.map_images, args.map_csv, "auto", args.map_select, args.map_condition)
    qrec = load_records(args.query_images, args.query_csv, "auto", args.query_select, args.query_condition)
    res = evaluate(mrec, qrec, cfg, gt, args.out, name=args.name or "evaluation", sequence_lengths=args.sequence,
                   sequence_config=sequence_config_from_args(args), online_filter=online_filter_from_args(args),
                   **_rerank_kwargs(args))
    for line in summary_lines(res.metrics):
        print(line)
    print(f"metrics and plots in {args.out}")
    return 0


def _cmd_demo(args) -> int:
    from vpr_localizer.evaluation.report import results_table
    from vpr_localizer.evaluation.scenarios import SCENARIOS

    os.makedirs(args.out, exist_ok=True)
    if not args.ros_only:
        names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
        all_metrics = {}
        for n in names:
            all_metrics[n] = _run_scenario(n, args)
        table = results_table(all_metrics)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({n: {"methods": {m: {k: v for k, v in e.items() if k != "recall_curve"}
                                       for m, e in mm["methods"].items()},
                           "encoder": mm["encoder"]} for n, mm in all_metrics.items()}, f, indent=2)
        print()
        print(table)
        print(f"\nsummary written to {os.path.join(args.out, 'summary.md')}")
    if not args.no_ros:
        from vpr_ros.demo import DEFAULT_CHECKPOINT, ros_demo

        out = os.path.join(args.out, "ros_graph")
        print(f"\n== ROS graph: map {args.ros_scenario} map images, replay its queries as a bag through "
              "attention_node -> vpr_localizer")
        m = ros_demo(args.shared, out, args.ros_scenario, rate=args.rate,
                     checkpoint=args.checkpoint if args.checkpoint is not None else DEFAULT_CHECKPOINT)
        fr = m["frames"]
        print(f"   frames: {fr['published']} published, {fr['received_attention']} reached attention_node "
              f"({fr['lost_in_transport']} lost in transport), dropped {fr['dropped_attention']} + "
              f"{fr['dropped_localizer']}, failed {fr['errors_attention']} + {fr['errors_localizer']} "
              f"(attention_node + vpr_localizer)")
        print(f"   poses received {m['poses_received']}/{m['queries']} (frames dropped {m['frames_dropped']}); "
              f"error mean {m['mean_error_m']:.1f} m, median {m['median_error_m']:.1f} m; "
              f"within 3 m {m['within_3m']}/{m['queries']}, within 25 m {m['within_25m']}/{m['queries']}; "
              f"metrics in {os.path.join(out, 'ros_demo.json')}")
    return 0


def _cmd_train(args) -> int:
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.evaluation.scenarios import get_training_set
    from vpr_localizer.training.train import TrainConfig, train_encoder

    ts = get_training_set(args.training_set)
    # training starts from ImageNet (checkpoint None), not from the shipped default; --checkpoint overrides
    cfg = encoder_config_from_args(args, {**scenario_encoder_base(ts, args.shared), "checkpoint": None})
    if cfg.aggregator != "netvlad":
        raise ConfigError(f"train trains NetVLAD (--aggregator netvlad), not {cfg.aggregator}")
    datasets = os.path.join(args.shared, "datasets")
    traversals = [spec.load(datasets) for spec in ts.traversals]
    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, tail_lr=args.tail_lr, attention_lr=args.attention_lr,
                       lr_gamma=args.lr_gamma, train_tail=not args.no_tail, tail_block=args.train_from, loss=args.loss,
                       margin=args.margin if args.margin is not None else (0.1 if args.loss == "squared" else 0.1 ** 0.5),
                       negatives=args.negatives, queries_per_step=args.queries_per_step,
                       queries_per_epoch=args.queries_per_epoch,
                       d_pos=ts.d_pos if args.d_pos is None else args.d_pos,
                       d_neg=ts.d_neg if args.d_neg is None else args.d_neg,
                       val_fraction=args.val_fraction, night_augmentation=not args.no_night,
                       fit_pca=not args.no_pca, seed=args.seed)
    LOG.info("training set %s: %s", ts.name, ts.description)
    torch_threads(args.threads)
    rep = train_encoder(Encoder(cfg), traversals, ts.gt, tcfg, args.out, cache_dir=args.cache_dir)
    for e in rep.epochs:
        loss = "-" if e["loss"] is None else f"{e['loss']:.4f}"
        active = "-" if e["active_fraction"] is None else f"{100 * e['active_fraction']:.0f}%"
        print(f"epoch {e['epoch']:2d}: loss {loss:>7} triplets {e['triplets']:5d} active {active:>4}  validation "
              f"recall@1 {e['val_recall@1']:.3f} ({e['val_hits']}/{e['val_queries']}), "
              f"@5 {e['val_recall@5']:.3f}")
    if rep.pca:
        print(f"PCA whitening to {rep.pca['dim']} dims fitted on {rep.pca['fitted_on']} training images: validation "
              f"recall@1 {rep.pca['val_recall@1']:.3f} ({rep.pca['val_hits']}/{rep.pca['val_queries']})")
    print(f"kept epoch {rep.best_epoch}; {rep.train_items} training / {rep.val_items} validation images; "
          f"features cached in {rep.cache_seconds:.0f} s ({rep.cache_bytes / 2**20:.0f} MiB), trained in "
          f"{rep.train_seconds:.0f} s; wrote {args.out} (+ .json, .png)")
    return 0


def torch_threads(n: Optional[int]) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is given (>= 1)."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def _parse_remaps(items: Optional[List[str]]) -> List[tuple]:
    """``["FROM:=TO", ...]`` -> ``[(FROM, TO), ...]``; ValueError on a malformed entry."""
    out = []
    for item in items or []:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ValueError(f"remap {item!r} must look like FROM:=TO")
        out.append((src, dst))
    return out


def _cmd_make_bag(args) -> int:
    from vpr_localizer.io.bags import make_bag
    from vpr_localizer.io.records import load_records

    recs = load_records(args.images, args.csv, args.gps, args.select)
    s = make_bag(recs, args.out, rate_hz=args.rate, storage=args.storage, image_topic=args.image_topic,
                 fix_topic=args.fix_topic, compressed=args.compressed,
                 size_wh=tuple(args.resize) if args.resize else None)
    topics = ", ".join(f"{t} {n}" for t, n in s["messages"].items())
    print(f"bag written to {s['path']}: {s['images_written']} of {len(recs)} images "
          f"({'CompressedImage jpeg' if s['compressed'] else 'Image rgb8'}), {s['storage']}, "
          f"{s['rate_hz']:g} Hz, {s['duration_s']:.1f} s; messages: {topics}; skipped {len(s['skipped'])}")
    return 0


def _cmd_replay(args) -> int:
    import signal
    import threading

    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    from vpr_ros.replay import replay_bag

    remap = dict(_parse_remaps(args.remap))
    if args.rate <= 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    context = Context()
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = rclpy.create_node("vpr_replay", context=context)
        stats = replay_bag(node, args.bag, rate=args.rate, topics=args.topics, remap=remap, stop=stop,
                           start_delay_s=args.start_delay, reliable=args.reliable)
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.shutdown(context=context)
    counts = ", ".join(f"{remap.get(t, t)} {n}" for t, n in stats.published.items()) or "nothing"
    print(f"replayed {args.bag} at rate {args.rate:g}{' (stopped early)' if stop.is_set() else ''}: "
          f"published {counts} in {stats.wall_s:.1f} s (bag time {stats.bag_s:.1f} s)")
    return 0


def _cmd_run(args) -> int:
    from vpr_ros.graph import NODE_CLASSES, run

    names = None
    if args.nodes:
        names = [n.strip() for n in args.nodes.split(",") if n.strip()]
        unknown = [n for n in names if n not in NODE_CLASSES]
        if unknown or not names:
            raise ValueError(f"unknown node(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(NODE_CLASSES)}")
    if args.duration is not None and args.duration < 0:
        raise ValueError(f"--duration must be >= 0, got {args.duration}")
    extra: List[str] = []
    for src, dst in _parse_remaps(args.remap):
        extra += ["-r", f"{src}:={dst}"]
    return run(args.params, names, args.duration, extra)  # bad parameters: one fatal line, status 2


def build_parser() -> argparse.ArgumentParser:
    from vpr_localizer.cli.build_map import add_build_map_parser
    from vpr_localizer.cli.milvus import add_map_export_parser, add_map_import_parser
    from vpr_localizer.cli.export import add_export_parser

    from vpr_localizer.evaluation.scenarios import SCENARIOS

    p = argparse.ArgumentParser(prog="vpr-localizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    add_build_map_parser(sub)
    add_map_export_parser(sub)
    add_map_import_parser(sub)
    add_export_parser(sub)

    q = sub.add_parser("localize", help="localise a folder of images against a map")
    q.add_argument("--map", required=True)
    q.add_argument("--images", required=True)
    q.add_argument("--csv")
    q.add_argument("--select", default="all", choices=["all", "even", "odd"])
    q.add_argument("--weights", help="backbone weight file (default: the one recorded in map.yaml)")
    q.add_argument("--checkpoint")
    q.add_argument("--device")
    q.add_argument("--params", help="ROS parameter YAML; its 'localizer' section sets the pose estimator")
    q.add_argument("--top-k", type=int)
    q.add_argument("--out", required=True, help="results .csv or .json")
    q.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="run the encoder in torch (default) or ONNX Runtime (needs --onnx)")
    q.add_argument("--onnx", help="ONNX encoder file from 'vpr-localizer export' (with --runtime onnxruntime)")
    add_sequence_args(q, many=False)
    add_rerank_args(q, many=False)
    q.add_argument("--patch-sizes", nargs="+", type=int, metavar="P",
                   help="expected patch sizes of the map (cells); a map built with others is refused")
    q.add_argument("--patch-dim", type=int, help="expected patch descriptor dimension of the map")
    q.set_defaults(func=_cmd_localize)

    e = sub.add_parser("evaluate", help="recall@N / error metrics with GeM and GAP baselines, plots")
    e.add_argument("--scenario", choices=list(SCENARIOS))
    e.add_argument("--shared", default=default_shared_dir(),
                   help="folder holding datasets/ and weights/ (relative: to the working directory, "
                        "else to the repository root)")
    e.add_argument("--out", default=os.path.join("results", "evaluate"))
    e.add_argument("--name", help="run name: with --scenario the outputs go to --out/NAME (default: "
                                  "--out/SCENARIO); without, the name in the metrics (default 'evaluation')")
    e.add_argument("--no-map", action="store_true", help="do not write the evaluation map to disk")
    for side in ("map", "query"):
        e.add_argument(f"--{side}-images", help=f"{side} image folder")
        e.add_argument(f"--{side}-csv", help=f"CSV with the {side} images' positions / frame / place_id "
                                              f"(paths relative to --{side}-images)")
        e.add_argument(f"--{side}-select", default="all", choices=["all", "even", "odd"],
                       help=f"keep all {side} images, or those with an even / odd frame number (the last "
                            "integer in the file name, or the CSV 'frame' column; images without one count "
                            "by their position in the list, from 1)")
        e.add_argument(f"--{side}-condition", nargs="*", help=f"keep only {side} images with these CSV condition tags")
    e.add_argument("--gt", default=None, choices=["position", "frame", "place"],
                   help="ground truth (default position): position = a retrieved map image is correct within "
                        "--thresholds metres (needs GPS in EXIF, or lat/lon or x/y in a CSV, for every image); "
                        "frame = within --frame-tolerance frames, the frame number being the last integer in "
                        "the file name (or the CSV 'frame' column); place = same CSV place_id. Checked before "
                        "any image is encoded")
    e.add_argument("--gt-file", metavar="FILE",
                   help="explicit ground truth instead of --gt: a CSV with the columns query,map (image file "
                        "names; several rows per query = several correct map images). VPR-Bench .npy files "
                        "are pickled object arrays and are not read: convert them to this CSV")
    e.add_argument("--thresholds", nargs="+", type=float, default=[25.0, 3.0],
                   help="distance thresholds of --gt position, metres; the first is the primary (default 25 3)")
    e.add_argument("--frame-tolerance", type=int, default=1,
                   help="--gt frame: a map image is correct when |query frame - map frame| <= this tolerance "
                        "times the map's frame spacing (the median difference of its sorted frame numbers; "
                        "default 1)")
    add_encoder_args(e)
    add_sequence_args(e)
    add_rerank_args(e)
    add_patch_args(e)
    e.add_argument("--query-step", type=int, default=1, help="keep every N-th query (all methods alike; default 1)")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser("demo", help="run every real-data scenario and print the results table")
    d.add_argument("--scenarios", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    d.add_argument("--shared", default=default_shared_dir())
    d.add_argument("--out", default=os.path.join("results", "demo"))
    d.add_argument("--no-map", action="store_true")
    d.add_argument("--no-ros", action="store_true", help="skip the ROS node-graph part")
    d.add_argument("--ros-only", action="store_true", help="only the ROS node-graph part")
    d.add_argument("--ros-scenario", default="lund_odd_vs_even", help="geotagged scenario for the ROS part")
    d.add_argument("--rate", type=float, default=0.25,
                   help="bag replay speed for the ROS part (slow enough for the encoder on this machine)")
    add_encoder_args(d)
    add_sequence_args(d)
    add_rerank_args(d)
    add_patch_args(d)
    d.add_argument("--query-step", type=int, default=1, help="keep every N-th query (all methods alike; default 1)")
    d.set_defaults(func=_cmd_demo)

    from vpr_localizer.evaluation.scenarios import TRAINING_SETS
    from vpr_localizer.training.train import LOSSES, TrainConfig

    t = sub.add_parser("train", help="train VGG16 conv5 + NetVLAD (+ attention) with the triplet loss and hard "
                                     "negatives on cached conv4 features (CPU)")
    t.add_argument("--training-set", default="nordland_train", choices=list(TRAINING_SETS))
    t.add_argument("--shared", default=default_shared_dir())
    t.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--lr", type=float, default=TrainConfig.lr, help="NetVLAD learning rate (Adam)")
    t.add_argument("--tail-lr", type=float, default=TrainConfig.tail_lr,
                   help="learning rate of the backbone tail (VGG16 conv5_1..conv5_3; Adam)")
    t.add_argument("--attention-lr", type=float, default=TrainConfig.attention_lr, help="attention learning rate (Adam)")
    t.add_argument("--lr-gamma", type=float, default=TrainConfig.lr_gamma, help="learning-rate decay per epoch")
    t.add_argument("--no-tail", action="store_true", help="train NetVLAD (+ attention) only, conv5 frozen")
    t.add_argument("--train-from", default="", metavar="BLOCK",
                   help="first trained backbone block: conv5 (default) or conv4 (conv4_1..conv5_3 on cached pool3 "
                        "features; end to end on a GPU: scripts/train_gpu.sh)")
    t.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss,
                   help="squared: NetVLAD's margin on squared distances; l2: TripletMarginLoss on distances")
    t.add_argument("--margin", type=float, help="triplet margin (default 0.1 squared, sqrt(0.1) l2)")
    t.add_argument("--negatives", type=int, default=TrainConfig.negatives, help="hardest negatives per query")
    t.add_argument("--queries-per-step", type=int, default=TrainConfig.queries_per_step)
    t.add_argument("--queries-per-epoch", type=int, default=TrainConfig.queries_per_epoch,
                   help="training queries drawn per epoch (0 = all)")
    t.add_argument("--no-pca", action="store_true", help="do not fit PCA whitening on the training set")
    t.add_argument("--cache-dir", help="keep the float16 feature cache here (reused by the next run)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--d-pos", type=float, help="positive radius (frame steps or metres; default: the set's)")
    t.add_argument("--d-neg", type=float, help="negative radius (frame steps or metres; default: the set's)")
    t.add_argument("--val-fraction", type=float, default=0.15, help="route fraction held out for validation")
    t.add_argument("--no-night", action="store_true", help="no simulated-night augmentation")
    t.add_argument("--seed", type=int, default=0)
    add_encoder_args(t)
    t.set_defaults(func=_cmd_train)

    mb = sub.add_parser("make-bag", help="pack images and their GPS/positions into a rosbag2")
    mb.add_argument("--images", required=True, help="image folder")
    mb.add_argument("--csv", help="CSV with positions; paths relative to --images")
    mb.add_argument("--gps", default="auto", choices=["auto", "exif", "none"])
    mb.add_argument("--select", default="all", choices=["all", "even", "odd"])
    mb.add_argument("--out", required=True, help="bag directory to create (must not exist)")
    mb.add_argument("--rate", type=float, default=2.0, help="image rate, Hz (default 2)")
    mb.add_argument("--storage", default="sqlite3", choices=["sqlite3", "mcap"])
    mb.add_argument("--compressed", action="store_true", help="sensor_msgs/CompressedImage (JPEG)")
    mb.add_argument("--image-topic", default="/camera/image_raw")
    mb.add_argument("--fix-topic", default="/gps/fix")
    mb.add_argument("--resize", nargs=2, type=int, metavar=("W", "H"), help="resize every image, pixels")
    mb.set_defaults(func=_cmd_make_bag)

    r = sub.add_parser("replay", help="publish a rosbag2 with its original timing (ROS 2)")
    r.add_argument("bag", help="rosbag2 directory or storage file")
    r.add_argument("--rate", type=float, default=1.0, help="speed factor (2 = twice as fast)")
    r.add_argument("--topics", nargs="+", help="only these bag topics")
    r.add_argument("--remap", nargs="+", action="extend", metavar="FROM:=TO",
                   help="publish bag topic FROM as TO (e.g. /camera/image_raw:=image)")
    r.add_argument("--start-delay", type=float, default=1.0,
                   help="seconds between creating the publishers and the first message (discovery)")
    r.add_argument("--reliable", action="store_true",
                   help="publish images reliable too (lossless into subscribers that set "
                        "qos_overrides.<topic>.subscription.reliability: reliable)")
    r.set_defaults(func=_cmd_replay)

    g = sub.add_parser("run", help="start the ROS 2 nodes of a parameter YAML in one process")
    g.add_argument("--params", required=True, help="ROS 2 parameter YAML (node_name: ros__parameters: ...)")
    g.add_argument("--nodes", help="comma-separated subset of the nodes in the file")
    g.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    g.add_argument("--remap", nargs="+", action="extend", metavar="FROM:=TO",
                   help="topic remaps for every node (e.g. image:=/camera/image_raw)")
    g.set_defaults(func=_cmd_run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point. Returns the exit status (0 ok, 2 user error)."""
    from vpr_localizer.errors import VprError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(levelname)s] %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if getattr(args, "shared", None):
        args.shared = resolve_shared_dir(args.shared)
    try:
        return int(args.func(args) or 0)
    except (VprError, ValueError) as exc:
        if args.verbose:
            LOG.exception("failed")
        print(f"vpr-localizer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpr-localizer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
