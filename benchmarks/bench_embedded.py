#!/usr/bin/env python3
"""Benchmark (issue 9, "the embedded default"): recall@1 on held-out Nordland vs encoder time per
image, VGG16 + NetVLAD (torch) against ONNX Runtime fp32 / int8 and EfficientNet-Lite0 (not a test).

Scenario ``nordland_heldout_winter_vs_summer``: the 976 summer frames of route positions
2600-3575 are the map, the 976 winter frames of the same positions the queries; a query is
correct when its top-1 map frame is within +-1 position (the evaluation's own frame ground truth,
:func:`vpr_localizer.evaluation.evaluate.relevance`). The 64x32 thumbnails are upscaled to the
encoder's input size (128x64 unless the candidate says otherwise).

Candidates (``--candidates``, in this order by default):

* ``vgg16``        VGG16 + NetVLAD K=64 + PCA whitening, torch (the baseline);
* ``vgg16_onnx``   the same encoder exported to ONNX fp32, queries through ONNX Runtime;
* ``vgg16_int8``   the same, int8 (static QDQ, per-channel, 32 evenly spaced map images for calibration);
* ``lite0_128``    EfficientNet-Lite0 + NetVLAD K=64 + PCA, torch, 128x64;
* ``lite0_256``    the same at 256x128;
* ``lite0_128_int8`` / ``lite0_256_int8``  those exported int8 through ONNX Runtime;
* ``lite0_cfg``    config/embedded_lite0.yaml as shipped before this benchmark (K=32, 320x240);
* ``vgg16_gem`` / ``lite0_*_gem``  GeM (p=3) on the same backbone pass (no PCA; the evaluation's baseline).

The map is built as ``vpr-localizer build-map`` does (NetVLAD k-means on the map images,
encode, PCA whitening fitted on the map) and the queries are encoded as ``vpr-localizer localize``
does (torch, or ``--runtime onnxruntime --onnx F.onnx`` against the same torch-built map).
Retrieval is exact inner product (the flat index).

Timing: every candidate encodes the same ``--timed-images`` decoded query thumbnails one at a time
(batch 1: resize + preprocessing + network + aggregation + PCA, the live-node case) on CPU with
``--threads`` threads; the candidates are interleaved in each of ``--repeats`` rounds and the median
round is reported; one warm-up first. Ratios are to VGG16 torch in the same run (absolute times on
a shared machine are noisy, ratios less so).

Writes ``results/bench_embedded.json`` and prints a table.

    nice -n 5 python benchmarks/bench_embedded.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_common import peak_rss_mb, write_results  # noqa: E402
from vpr_localizer.evaluation.evaluate import recall_at_n, relevance  # noqa: E402
from vpr_localizer.evaluation.scenarios import get_scenario  # noqa: E402
from vpr_localizer.io.image_files import load_image  # noqa: E402
from vpr_localizer.models.config import EncoderConfig  # noqa: E402
from vpr_localizer.models.encoder import Encoder, baseline_heads  # noqa: E402
from vpr_localizer.models.onnx_export import export_onnx, list_calibration_images  # noqa: E402
from vpr_localizer.models.onnx_runtime import OnnxEncoder  # noqa: E402

SCENARIO = "nordland_heldout_winter_vs_summer"
VGG = "weights/vgg16_features_imagenet_caffe_bgr.pth"

#: torch encoders whose map is built: name -> EncoderConfig kwargs
TORCH = {
    "vgg16": dict(backbone="vgg16", image_size=(128, 64), num_clusters=64),
    "lite0_128": dict(backbone="efficientnet_lite0", image_size=(128, 64), num_clusters=64),
    "lite0_256": dict(backbone="efficientnet_lite0", image_size=(256, 128), num_clusters=64),
    "lite0_cfg": dict(backbone="efficientnet_lite0", image_size=(320, 240), num_clusters=32, pca_dim=1024),
}
DEFAULT = ["vgg16", "vgg16_onnx", "vgg16_int8", "lite0_128", "lite0_256", "lite0_128_int8", "lite0_256_int8",
           "vgg16_gem", "lite0_128_gem", "lite0_256_gem", "lite0_cfg"]


def base_of(name: str) -> str:
    for suffix in ("_onnx", "_int8", "_gem"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def top1(q: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Exact inner-product ranking (the flat index), top 25."""
    s = q.astype(np.float32) @ m.astype(np.float32).T
    return np.argsort(-s, axis=1)[:, :25]


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.environ.get("VPR_SHARED_DIR", "../shared"))
    ap.add_argument("--candidates", nargs="+", default=DEFAULT)
    ap.add_argument("--timed-images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--calibration-images", type=int, default=32)
    ap.add_argument("--work", default="/tmp/bench_embedded", help="cache: checkpoints, descriptors, ONNX files")
    ap.add_argument("--out", default="results/bench_embedded.json")
    args = ap.parse_args()

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    shared = args.shared if os.path.isdir(args.shared) else os.path.join(root, args.shared)
    datasets = os.path.join(shared, "datasets")
    sc = get_scenario(SCENARIO)
    mrecs, qrecs = sc.map.load(datasets), sc.queries.load(datasets)
    mpaths, qpaths = [r.path for r in mrecs], [r.path for r in qrecs]
    rel = next(iter(relevance(mrecs, qrecs, sc.gt).values()))
    print(f"{SCENARIO}: {len(mrecs)} map, {len(qrecs)} queries, {int(rel.any(1).sum())} with a positive", flush=True)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)

    def recall1(q, m) -> int:
        return int(recall_at_n(top1(q, m), rel, (1, 5))["at"][1]["correct"])

    def cfg(base: str, **over) -> EncoderConfig:
        kw = dict(TORCH[base])
        if kw["backbone"] == "vgg16":
            kw["weights"] = os.path.join(shared, VGG)
        kw.update(device="cpu", batch_size=8)
        kw.update(over)
        return EncoderConfig(**kw)

    encoders, store, rows = {}, {}, {}
    need_base = sorted({base_of(c) for c in args.candidates}, key=list(TORCH).index)

    # --- recall: build each torch map (k-means, encode, PCA), encode the queries ------------------
    for base in need_base:
        ck = os.path.join(args.work, f"{base}.pt")
        npz = os.path.join(args.work, f"{base}.npz")
        t0 = time.perf_counter()
        if os.path.isfile(ck) and os.path.isfile(npz):
            enc = Encoder(cfg(base, checkpoint=ck))
            d = dict(np.load(npz))
            print(f"[{base}] cached map/query descriptors from {args.work}", flush=True)
        else:
            enc = Encoder(cfg(base))
            enc.fit_aggregator(mpaths)
            mres = enc.encode_paths(mpaths, extra_heads=baseline_heads())
            assert len(mres.ok) == len(mpaths), mres.skipped
            pca = enc.fit_pca(mres.raw)
            mdesc = enc.apply_pca(mres.raw) if pca else mres.descriptors
            qres = enc.encode_paths(qpaths, extra_heads=baseline_heads())
            assert len(qres.ok) == len(qpaths), qres.skipped
            d = {"map": mdesc, "query": qres.descriptors, "map_raw": l2n(mres.raw), "query_raw": l2n(qres.raw),
                 "map_gem": l2n(mres.extras["GeM"]), "query_gem": l2n(qres.extras["GeM"])}
            enc.save_checkpoint(ck)
            np.savez(npz, **d)
        encoders[base], store[base] = enc, d
        r = {"netvlad_pca": recall1(d["query"], d["map"]), "netvlad_raw": recall1(d["query_raw"], d["map_raw"]),
             "gem": recall1(d["query_gem"], d["map_gem"])}
        store[base]["recalls"] = r
        print(f"[{base}] dim {enc.dim} (raw {enc.raw_dim}); recall@1 NetVLAD+PCA {r['netvlad_pca']}, "
              f"NetVLAD raw {r['netvlad_raw']}, GeM {r['gem']} / {len(qrecs)}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    # --- ONNX exports (fp32 for every base: model size; int8 where asked) ------------------------
    onnx_files = {}
    calib = list_calibration_images(mpaths, args.calibration_images)
    for base in need_base:
        for prec in ("fp32", "int8"):
            want = (prec == "fp32") or (f"{base}_int8" in args.candidates)
            if not want:
                continue
            path = os.path.join(args.work, f"{base}_{prec}.onnx")
            if not os.path.isfile(path):
                t0 = time.perf_counter()
                export_onnx(encoders[base], path, int8=(prec == "int8"),
                            calibration_paths=calib if prec == "int8" else ())
                print(f"[{base}] exported {prec} ONNX ({time.perf_counter() - t0:.0f} s)", flush=True)
            onnx_files[(base, prec)] = path

    runners = {}
    for c in args.candidates:
        base = base_of(c)
        enc = encoders[base]
        if c == base:
            runners[c] = enc.encode_images
            rec = store[base]["recalls"]["netvlad_pca"]
            size_mb = os.path.getsize(onnx_files[(base, "fp32")]) / 2**20
            rows[c] = {"runtime": "torch", "precision": "fp32", "aggregator": "netvlad+pca", "recall_at_1": rec,
                       "model_mb": size_mb, "model_mb_note": "fp32 ONNX export of the same graph"}
        elif c.endswith("_gem"):
            genc = Encoder(cfg(base, aggregator="gem", pca_dim=0))
            runners[c] = genc.encode_images
            rows[c] = {"runtime": "torch", "precision": "fp32", "aggregator": "gem (no pca)",
                       "recall_at_1": store[base]["recalls"]["gem"], "model_mb": None}
        else:
            prec = "int8" if c.endswith("_int8") else "fp32"
            t0 = time.perf_counter()
            oenc = OnnxEncoder(onnx_files[(base, prec)], device="cpu", batch_size=8, threads=args.threads)
            key = f"query_{prec}"
            if key not in store[base]:
                cache = os.path.join(args.work, f"{base}_{prec}_query.npy")
                if os.path.isfile(cache):
                    q = np.load(cache)
                else:
                    res = oenc.encode_paths(qpaths)
                    assert len(res.ok) == len(qpaths)
                    q = res.descriptors
                    np.save(cache, q)
                store[base][key] = q
            q = store[base][key]
            rec = recall1(q, store[base]["map"])
            diff = float(np.abs(q - store[base]["query"]).max())
            oenc.batch_size = 1
            runners[c] = oenc.encode_images
            rows[c] = {"runtime": "onnxruntime " + ",".join(oenc.providers), "precision": prec,
                       "aggregator": "netvlad+pca", "recall_at_1": rec,
                       "model_mb": os.path.getsize(onnx_files[(base, prec)]) / 2**20,
                       "max_abs_diff_query_desc_vs_torch": diff,
                       "note": "queries through ONNX Runtime against the torch-built map"}
            print(f"[{c}] recall@1 {rec}/{len(qrecs)}  max|diff| vs torch {diff:.3g} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        cfgd = encoders[base].config
        rows[c].update(candidate=c, backbone=cfgd.backbone, image_size=list(cfgd.image_size),
                       num_clusters=cfgd.num_clusters if "gem" not in c else None,
                       dim=int(encoders[base].dim) if "gem" not in c else int(store[base]["map_gem"].shape[1]))

    # --- timing: batch 1, interleaved rounds ----------------------------------------------------
    step = max(1, len(qpaths) // args.timed_images)
    images = [load_image(p) for p in qpaths[::step][:args.timed_images]]
    for c, fn in runners.items():
        fn(images[:1])  # warm-up
    times = {c: [] for c in runners}
    with torch.no_grad():
        for r in range(args.repeats):
            for c, fn in runners.items():
                t = time.perf_counter()
                for im in images:
                    fn([im])
                times[c].append((time.perf_counter() - t) / len(images))
            print(f"timing round {r + 1}/{args.repeats} done", flush=True)
    ref_ms = 1e3 * float(np.median(times["vgg16"])) if "vgg16" in times else None
    ref_rec = rows["vgg16"]["recall_at_1"] if "vgg16" in rows else None
    onnx_ms = 1e3 * float(np.median(times["vgg16_onnx"])) if "vgg16_onnx" in times else None
    out_rows = []
    print()
    print(f"{'candidate':16s} {'backbone':18s} {'input':8s} {'runtime':26s} {'R@1':>8s} {'dR@1':>5s} "
          f"{'ms/img':>8s} {'speedup':>8s} {'vs onnx':>8s} {'MB':>7s}  goal(>=5x, >=-20)")
    for c in args.candidates:
        row = rows[c]
        ms = 1e3 * float(np.median(times[c]))
        row["ms_per_image"] = ms
        row["ms_per_image_rounds"] = [1e3 * t for t in times[c]]
        row["recall_at_1_pct"] = 100.0 * row["recall_at_1"] / len(qrecs)
        if ref_ms:
            row["ratio_vs_vgg16_torch"] = ms / ref_ms
            row["speedup_vs_vgg16_torch"] = ref_ms / ms
            row["recall_delta_vs_vgg16_torch"] = row["recall_at_1"] - ref_rec
            if onnx_ms:  # the same network in the same runtime: what the backbone change alone buys
                row["speedup_vs_vgg16_onnx_fp32"] = onnx_ms / ms
            row["meets_goal"] = bool(ref_ms / ms >= 5.0 and row["recall_at_1"] - ref_rec >= -20)
        out_rows.append(row)
        rt = row["runtime"].replace("onnxruntime CPUExecutionProvider", "ort-cpu") + " " + row["precision"]
        mb = "" if row["model_mb"] is None else f"{row['model_mb']:.1f}"
        print(f"{c:16s} {row['backbone']:18s} {'x'.join(map(str, row['image_size'])):8s} {rt:26s} "
              f"{row['recall_at_1']:4d}/{len(qrecs)} {row.get('recall_delta_vs_vgg16_torch', 0):+5d} {ms:8.1f} "
              f"{row.get('speedup_vs_vgg16_torch', float('nan')):7.2f}x "
              f"{row.get('speedup_vs_vgg16_onnx_fp32', float('nan')):7.2f}x {mb:>7s}  {row.get('meets_goal')}")
    write_results(args.out, out_rows, torch.device("cpu"), scenario=SCENARIO, map_images=len(mrecs),
                  queries=len(qrecs), timed_images=len(images), repeats=args.repeats, batch=1,
                  ort_threads=args.threads, calibration_images=len(calib), peak_rss_mb=peak_rss_mb(),
                  speedup_vs_vgg16_onnx_fp32="the same ms ratio against VGG16 + NetVLAD fp32 in ONNX Runtime "
                                             "(same network as the baseline, faster runtime)",
                  goal="at least 5x faster per frame than VGG16 + NetVLAD (torch, same run) and at most "
                       "20/976 (2 points) recall@1 below it on held-out Nordland",
                  note="ms/image = resize + preprocessing + network + aggregation (+ PCA) on a decoded thumbnail, "
                       "batch 1, CPU, median of interleaved rounds; recall@1 = correct/976 (+-1 position); "
                       "ONNX rows: queries through ONNX Runtime against the torch-built map; "
                       "gem rows: GeM p=3 on the same backbone pass, no PCA (the evaluation's baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
