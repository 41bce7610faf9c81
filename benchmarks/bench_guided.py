#!/usr/bin/env python3
"""Benchmark: latency each addition of the seed method costs (the ablation's latency column; not a test).

Configurations, as the ablation rows: plain NetVLAD; + static mask (ESPNetv2 labels); +
segmentation stream (second backbone pass on the colour-coded labels, second NetVLAD); +
attention (one 10-parameter module per stream). For each input size, one image at a time
(the node's case: ``Encoder.encode_images([rgb])``, resize + segmentation + backbone +
aggregation + PCA-free descriptor), the configurations are timed round-robin (so machine-load
drift hits all of them alike) and reported as median ms/image and as a ratio to plain NetVLAD
in the same run.

Writes JSON (default ``results/bench_guided.json``) and prints a table.

    python benchmarks/bench_guided.py --sizes 640x360 128x64 --repeats 5
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
from vpr_localizer.models.config import EncoderConfig  # noqa: E402
from vpr_localizer.models.encoder import Encoder  # noqa: E402
from vpr_localizer.io.image_files import load_image  # noqa: E402

CONFIGS = (
    ("NetVLAD", {}),
    ("+ static mask", {"static_mask": True}),
    ("+ segmentation stream", {"static_mask": True, "seg_stream": True}),
    ("+ attention", {"static_mask": True, "seg_stream": True, "attention": True}),
)
#: segmentation input per network input (as the scenarios use)
SEG_SIZE = {(128, 64): (256, 128)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("VPR_SHARED_DIR", "../shared"))
    ap.add_argument("--sizes", nargs="+", default=["640x360", "128x64"], help="WxH")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/bench_guided.json")
    args = ap.parse_args()

    paths = sorted(glob.glob(os.path.join(args.shared, "datasets", "lund_gps", "*.jpg")))[:4]
    if not paths:
        print(f"error: no images in {args.shared}/datasets/lund_gps", file=sys.stderr)
        return 2
    images = [load_image(p) for p in paths]
    w_vgg = os.path.join(args.shared, "weights", "vgg16_features_imagenet_caffe_bgr.pth")
    w_seg = os.path.join(args.shared, "weights", "espnetv2_s_2.0_city_1024x512.pth")
    rows = []
    for size in args.sizes:
        wh = tuple(int(v) for v in size.lower().split("x"))
        encoders = {}
        for name, flags in CONFIGS:
            cfg = EncoderConfig(weights=w_vgg, image_size=wh, num_clusters=64, pca_dim=0, device=args.device,
                                segmentation="espnetv2", segmentation_weights=w_seg,
                                segmentation_size=SEG_SIZE.get(wh, (512, 256)), kmeans_max_features=5000, **flags)
            enc = Encoder(cfg)
            enc.fit_aggregator(paths)
            enc.encode_images([images[0]])  # warm-up
            encoders[name] = enc
        times = {name: [] for name in encoders}
        for r in range(args.repeats):
            for name, enc in encoders.items():
                im = images[r % len(images)]
                if enc.device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                d = enc.encode_images([im])
                if enc.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
                assert np.isfinite(d).all()
        base = float(np.median(times["NetVLAD"]))
        for name, enc in encoders.items():
            ms = 1000 * float(np.median(times[name]))
            row = {"config": name, "input_wh": list(wh), "device": str(enc.device), "ms_per_image": ms,
                   "ratio_to_netvlad": ms / (1000 * base), "descriptor_dim": enc.dim,
                   "peak_rss_mb": peak_rss_mb()}
            rows.append(row)
            print(f"{wh[0]:4d}x{wh[1]:<4d} {name:24s} {ms:8.1f} ms/img  {row['ratio_to_netvlad']:5.2f}x  "
                  f"{row['descriptor_dim']:6d}-D", flush=True)
    write_results(args.out, rows, encoders["NetVLAD"].device, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
