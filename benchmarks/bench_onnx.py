#!/usr/bin/env python3
"""Benchmark: per-image encode time, torch vs ONNX Runtime fp32 vs ONNX Runtime int8 (not a test).

For each input size, a VGG16 + NetVLAD encoder (K clusters, no PCA) is fitted by k-means on
real lund_gps images, exported with :func:`vpr_localizer.models.onnx_export.export_onnx` (fp32,
and int8 with static QDQ quantisation of the backbone calibrated on the same images) and run
through :class:`vpr_localizer.models.onnx_runtime.OnnxEncoder`. Every runtime encodes the same
decoded images one at a time (batch 1: resize + preprocessing + network, the live-node case);
the time per image is the median over ``--repeats`` runs after one warm-up. Ratios are to torch
in the same run (stable on a noisy shared machine where absolute times are not). The max
|difference| of the descriptors against torch is recorded too.

Writes ``results/bench_onnx.json`` and prints a table.

    python benchmarks/bench_onnx.py --sizes 160x120 640x480 --images 4 --repeats 3
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_common import peak_rss_mb, write_results  # noqa: E402
from vpr_localizer.io.image_files import load_image  # noqa: E402
from vpr_localizer.models.config import EncoderConfig  # noqa: E402
from vpr_localizer.models.encoder import Encoder  # noqa: E402
from vpr_localizer.models.onnx_export import export_onnx  # noqa: E402
from vpr_localizer.models.onnx_runtime import OnnxEncoder  # noqa: E402


def per_image_s(encode, images, repeats: int) -> float:
    """Median over ``repeats`` runs (after one warm-up) of the mean seconds per image of
    ``encode([image])`` called once per image."""
    encode(images[:1])
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for im in images:
            encode([im])
        runs.append((time.perf_counter() - t) / len(images))
    return float(np.median(runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("VPR_SHARED_DIR", "../shared"))
    ap.add_argument("--sizes", nargs="+", default=["160x120", "640x480"], help="WxH")
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--images", type=int, default=4, help="timed lund images (even frames); also the calibration set")
    ap.add_argument("--fit-images", type=int, default=8, help="images for the NetVLAD k-means")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--out", default="results/bench_onnx.json")
    args = ap.parse_args()

    shared = args.shared if os.path.isdir(args.shared) else os.path.join(os.path.dirname(__file__), "..", args.shared)
    weights = os.path.join(shared, "weights", "vgg16_features_imagenet_caffe_bgr.pth")
    paths = sorted(glob.glob(os.path.join(shared, "datasets", "lund_gps", "*.jpg")))
    if not paths or not os.path.isfile(weights):
        sys.exit(f"missing data: {weights} or {shared}/datasets/lund_gps/*.jpg")
    fit_paths = paths[1::2][:args.fit_images]
    timed_paths = paths[0::2][:args.images]
    images = [load_image(p) for p in timed_paths]  # decoded once: decode time is not measured
    torch.set_num_threads(args.threads)
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench_onnx_")
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        enc = Encoder(EncoderConfig(weights=weights, image_size=(w, h), num_clusters=args.clusters, pca_dim=0,
                                    device="cpu", batch_size=1))
        enc.fit_aggregator(fit_paths)
        fp32 = export_onnx(enc, os.path.join(tmp, f"fp32_{size}.onnx"))
        int8 = export_onnx(enc, os.path.join(tmp, f"int8_{size}.onnx"), int8=True, calibration_paths=timed_paths)
        runtimes = {"torch": enc,
                    "onnxruntime_fp32": OnnxEncoder(fp32.onnx_path, device="cpu", batch_size=1, threads=args.threads),
                    "onnxruntime_int8": OnnxEncoder(int8.onnx_path, device="cpu", batch_size=1, threads=args.threads)}
        ref = enc.encode_images(images)
        times = {}
        for name, runner in runtimes.items():
            times[name] = per_image_s(runner.encode_images, images, args.repeats)
            desc = runner.encode_images(images)
            row = {"size": [w, h], "runtime": name, "ms_per_image": 1e3 * times[name],
                   "ratio_vs_torch": times[name] / times["torch"], "dim": int(desc.shape[1]),
                   "max_abs_diff_vs_torch": float(np.abs(desc - ref).max()),
                   "providers": getattr(runner, "providers", ["torch cpu"]),
                   "model_mb": (os.path.getsize(runner.path) / 2**20) if hasattr(runner, "path") else None}
            rows.append(row)
            print(f"{w}x{h} {name:18s} {row['ms_per_image']:8.1f} ms/image  x{row['ratio_vs_torch']:.2f} vs torch  "
                  f"max|diff| {row['max_abs_diff_vs_torch']:.2g}", flush=True)
        del runtimes, enc
    write_results(args.out, rows, torch.device("cpu"), images=len(images), repeats=args.repeats,
                  clusters=args.clusters, pca=False, batch=1, ort_threads=args.threads,
                  peak_rss_mb=peak_rss_mb(), dataset="lund_gps even frames",
                  note="per-image time = resize + preprocessing + network on a decoded image, batch 1; "
                       "median of repeats; int8 = backbone Conv layers only (QDQ per-channel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
