"""Which DINOv2 ViT-S/14 block gives the best place descriptors? (AnyLoc-style block sweep.)

Runs on the TRAINING part of the Nordland route only (route positions 0-2499 in frame order;
the held-out scenario ``nordland_heldout_winter_vs_summer`` uses 2600-3575 and is never read):

* map: every summer thumbnail at positions 0-2499 (2,500 images); queries: every ``--query-step``-th
  winter thumbnail of the same positions (default 4: 625 queries);
* ground truth: the project's frame ground truth, +-1 thumbnail position
  (:func:`vpr_localizer.evaluation.evaluate.relevance`, ``GroundTruth("frame", frame_tolerance=1)``);
* input: the 64x32 thumbnails upscaled to ``--image-size`` (default 224x112, 16 x 8 patches),
  the project's image loading / resizing (:func:`~vpr_localizer.io.image_files.iter_image_batches`)
  and the backbone's ImageNet preprocessing;
* features: one pass of the registered ``dinov2_vits14_b11`` backbone (all 12 blocks) with
  forward hooks that keep the patch tokens of every swept block, exactly as
  ``dinov2_vits14_b<N>`` returns them (checked by ``test/test_dinov2.py``);
* aggregation per block: the project's NetVLAD (``--clusters`` K, default 32, initialised by the
  project's FAISS k-means on local features sampled from the map images, like AnyLoc's VLAD
  vocabulary; NetVLAD's soft assignment where AnyLoc assigns hard) and GeM (p = 3); raw
  descriptors, no PCA;
* scoring: the project's flat inner-product index and :func:`recall_at_n`.

Usage::

    nice -n 10 .venv/bin/python benchmarks/sweep_dinov2_blocks.py            # blocks 5..11
    .venv/bin/python benchmarks/sweep_dinov2_blocks.py --blocks 7 8 9 --query-step 8

Prints a table and writes ``results/sweep_dinov2_blocks.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vpr_localizer.evaluation.evaluate import GroundTruth, recall_at_n, relevance  # noqa: E402
from vpr_localizer.evaluation.scenarios import NORDLAND_HELDOUT, ImageSetSpec  # noqa: E402
from vpr_localizer.io.image_files import iter_image_batches  # noqa: E402
from vpr_localizer.mapping.index import build_index, search  # noqa: E402
from vpr_localizer.models.aggregation import GeM, NetVLAD  # noqa: E402
from vpr_localizer.models.config import EncoderConfig  # noqa: E402
from vpr_localizer.models.fitting import init_netvlad_by_kmeans, kmeans_sample_target, sample_feature_locations  # noqa: E402
from vpr_localizer.models.registry import build_backbone, default_backbone_weights  # noqa: E402

TRAIN_RANGE = (0, 2500)


def extract(backbone, blocks, paths, size, batch_size):
    """Patch-token maps of every block in ``blocks`` for ``paths``: block -> float16 (N, C, h, w)."""
    body = backbone.body
    grab = {}
    hooks = [body.vit.blocks[b].register_forward_hook(
        lambda mod, inp, out, b=b: grab.__setitem__(b, out)) for b in blocks]
    out = {b: [] for b in blocks}
    try:
        for idx, batch in iter_image_batches(paths, size, batch_size):
            with torch.no_grad():
                x = backbone.preprocessing(batch)
                body(x)
            h, w = x.shape[2] // 14, x.shape[3] // 14
            for b in blocks:
                t = grab[b][:, body.vit.num_prefix_tokens:]
                out[b].append(t.reshape(len(idx), h, w, -1).permute(0, 3, 1, 2).half())
            if len(idx) < len(batch):
                raise RuntimeError("unreadable images in the sweep set")
    finally:
        for hk in hooks:
            hk.remove()
    return {b: torch.cat(v) for b, v in out.items()}


def describe(agg, feats, batch=64):
    with torch.no_grad():
        return np.concatenate([agg(feats[s:s + batch].float()).numpy() for s in range(0, len(feats), batch)])


def recall(mdesc, qdesc, rel):
    _, ids = search(build_index(np.ascontiguousarray(mdesc, np.float32), "flat"),
                    np.ascontiguousarray(qdesc, np.float32), 10)
    return recall_at_n(ids, rel)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
    ap.add_argument("--blocks", nargs="+", type=int, default=list(range(5, 12)))
    ap.add_argument("--image-size", nargs=2, type=int, default=[224, 112], metavar=("W", "H"))
    ap.add_argument("--clusters", type=int, default=32)
    ap.add_argument("--query-step", type=int, default=4)
    ap.add_argument("--map-step", type=int, default=1,
                    help="keep every N-th map image (smoke tests only: the +-1 ground truth then spans +-N positions)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join("results", "sweep_dinov2_blocks.json"))
    args = ap.parse_args(argv)
    assert TRAIN_RANGE[1] <= NORDLAND_HELDOUT[0], "the sweep must not touch the held-out positions"
    datasets = os.path.join(args.shared, "datasets")
    size = tuple(args.image_size)
    cfg = EncoderConfig(backbone="dinov2_vits14_b11", image_size=size, aggregator="netvlad",
                        num_clusters=args.clusters, pca_dim=0)  # checks the size is a multiple of 14
    mrec = ImageSetSpec("nordland_thumbs/summer", gps="none", index_range=TRAIN_RANGE,
                        index_step=args.map_step).load(datasets)
    qrec = ImageSetSpec("nordland_thumbs/winter", gps="none", index_range=TRAIN_RANGE,
                        index_step=args.query_step).load(datasets)
    gt = GroundTruth("frame", frame_tolerance=1)
    (label, rel), = relevance(mrec, qrec, gt).items()
    weights = default_backbone_weights(cfg.backbone)
    backbone = build_backbone(cfg.backbone, weights)
    print(f"Nordland train part, positions {TRAIN_RANGE[0]}-{TRAIN_RANGE[1] - 1}: {len(qrec)} winter queries "
          f"(every {args.query_step}th) vs {len(mrec)} summer map images, {label}; input {size[0]}x{size[1]} "
          f"(64x32 thumbnails upscaled); torch threads {torch.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    mfeat = extract(backbone, args.blocks, [r.path for r in mrec], size, args.batch_size)
    qfeat = extract(backbone, args.blocks, [r.path for r in qrec], size, args.batch_size)
    t_feat = time.perf_counter() - t0
    print(f"features of {len(mrec) + len(qrec)} images, all blocks in one pass: {t_feat:.0f} s", flush=True)

    rows = []
    for b in args.blocks:
        m, q = mfeat[b], qfeat[b]
        # NetVLAD vocabulary: the project's k-means sample size, spread evenly over the map images
        per_image = max(1, math.ceil(kmeans_sample_target(cfg) / len(m)))
        sample = sample_feature_locations(m.float(), per_image, np.random.default_rng(cfg.seed))
        vlad = NetVLAD(args.clusters, m.shape[1])
        init_netvlad_by_kmeans(vlad, cfg, {"image": sample}, f"{len(m)} Nordland summer map images")
        vlad.eval()
        res = {"netvlad": recall(describe(vlad, m), describe(vlad, q), rel),
               "gem": recall(describe(GeM(3.0), m), describe(GeM(3.0), q), rel)}
        rows.append({"block": b, **res})
        print(f"block {b:2d}: NetVLAD K={args.clusters} R@1 {res['netvlad']['at'][1]['correct']}/"
              f"{res['netvlad']['at'][1]['total']}, GeM R@1 {res['gem']['at'][1]['correct']}", flush=True)

    def cell(r, n):
        a = r["at"][n]
        return f"{100 * a['recall']:.1f}% ({a['correct']}/{a['total']})"

    lines = [f"| block | NetVLAD K={args.clusters} R@1 | R@5 | R@10 | GeM R@1 | R@5 | R@10 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['block']} | {cell(r['netvlad'], 1)} | {cell(r['netvlad'], 5)} | {cell(r['netvlad'], 10)} "
                     f"| {cell(r['gem'], 1)} | {cell(r['gem'], 5)} | {cell(r['gem'], 10)} |")
    print("\n" + "\n".join(lines))
    best = max(rows, key=lambda r: (r["netvlad"]["at"][1]["recall"], r["gem"]["at"][1]["recall"]))
    print(f"\nbest block by NetVLAD recall@1: {best['block']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/sweep_dinov2_blocks.py " + " ".join(argv or sys.argv[1:]),
                   "backbone": "DINOv2 ViT-S/14 (dinov2_vits14_b<N>, 0-based block), weights " + os.path.basename(weights),
                   "weights_sha256": backbone.weights_sha256,
                   "data": {"map": f"nordland_thumbs/summer positions {TRAIN_RANGE[0]}-{TRAIN_RANGE[1] - 1}, "
                                   f"every {args.map_step}",
                            "queries": f"nordland_thumbs/winter positions {TRAIN_RANGE[0]}-{TRAIN_RANGE[1] - 1}, "
                                       f"every {args.query_step}th",
                            "n_map": len(mrec), "n_queries": len(qrec), "ground_truth": label,
                            "held_out_positions_untouched": list(NORDLAND_HELDOUT)},
                   "image_size": list(size), "num_clusters": args.clusters, "pca": "none (raw descriptors)",
                   "feature_seconds": round(t_feat, 1), "torch_threads": torch.get_num_threads(),
                   "machine": platform.processor() or platform.machine(),
                   "best_block_netvlad_r1": best["block"],
                   "table_markdown": "\n".join(lines), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
