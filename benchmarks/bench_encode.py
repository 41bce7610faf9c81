#!/usr/bin/env python3
"""Benchmark: encoder throughput per backbone, aggregator and input resolution (not a test).

For each (backbone, input W x H) it encodes real images from ``../shared/datasets`` in
batches and reports milliseconds per image for the backbone alone and for backbone +
NetVLAD (K=64) / GeM / GAP, plus descriptor size and peak resident memory. The backbone-only
time is the in-run baseline: the table gives each aggregator's cost as a ratio to it, which is
stable on a noisy machine where absolute times are not.

Writes JSON (default ``results/bench_encode.json``) and prints a table.

    python benchmarks/bench_encode.py --sizes 128x64 320x240 640x480 --repeats 3
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_common import peak_rss_mb, write_results  # noqa: E402
from vpr_localizer.models.aggregation import GeM, GlobalAvgPool, NetVLAD  # noqa: E402
from vpr_localizer.models.registry import build_backbone  # noqa: E402
from vpr_localizer.device import resolve_device  # noqa: E402
from vpr_localizer.io.image_files import load_image, resize_image  # noqa: E402


def timed(fn, repeats: int, device) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("VPR_SHARED_DIR", "../shared"))
    ap.add_argument("--backbones", nargs="+", default=["vgg16", "efficientnet_lite0"])
    ap.add_argument("--sizes", nargs="+", default=["128x64", "320x240", "640x480"], help="WxH")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/bench_encode.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    paths = sorted(glob.glob(os.path.join(args.shared, "datasets", "lund_gps", "*.jpg")))[: args.batch]
    if not paths:
        print(f"error: no images in {args.shared}/datasets/lund_gps", file=sys.stderr)
        return 2
    images = [load_image(p) for p in paths]
    weights = {"vgg16": os.path.join(args.shared, "weights", "vgg16_features_imagenet_caffe_bgr.pth"),
               "efficientnet_lite0": None}
    rows = []
    for name in args.backbones:
        bb = build_backbone(name, weights[name]).to(device)
        heads = {"NetVLAD": NetVLAD(64, bb.out_channels), "GeM": GeM(), "GAP": GlobalAvgPool()}
        for h in heads.values():
            h.to(device).eval()
        for size in args.sizes:
            w, h = (int(v) for v in size.lower().split("x"))
            batch = np.stack([resize_image(im, (w, h)) for im in images])
            with torch.no_grad():
                x = bb.preprocessing(batch, device)
                t_bb = timed(lambda: bb(x), args.repeats, device)
                feats = bb(x)
                row = {"backbone": name, "input_wh": [w, h], "batch": len(batch), "device": str(device),
                       "feature_map": list(feats.shape[1:]),
                       "backbone_ms_per_image": 1000 * t_bb / len(batch)}
                for hname, head in heads.items():
                    t = timed(lambda: head(feats), args.repeats, device)
                    row[f"{hname}_ms_per_image"] = 1000 * t / len(batch)
                    row[f"{hname}_dim"] = int(head(feats).shape[1])
                    row[f"{hname}_ratio_to_backbone"] = t / t_bb
            row["peak_rss_mb"] = peak_rss_mb()
            if device.type == "cuda":
                row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
            print(f"{name:19s} {w:4d}x{h:<4d} backbone {row['backbone_ms_per_image']:8.1f} ms/img  "
                  f"NetVLAD +{row['NetVLAD_ms_per_image']:6.2f} ms ({row['NetVLAD_ratio_to_backbone']:.3f}x)  "
                  f"GeM +{row['GeM_ms_per_image']:5.2f}  GAP +{row['GAP_ms_per_image']:5.2f}  "
                  f"peak RSS {row['peak_rss_mb']:.0f} MiB", flush=True)
    write_results(args.out, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
