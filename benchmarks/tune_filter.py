"""Parameter sweep of the online HMM filter on the Nordland *tuning* part of the route.

Positions 1600-2575 (summer map, winter queries, +-1 frame), disjoint from the training part
(0-1599) and from the held-out part (2600-3575) that the README reports: the filter's defaults
are chosen here, never on held-out data. Descriptors: VGG16 + NetVLAD (k-means on the map) +
PCA whitening at 128x64, exactly as the held-out scenario builds them.

    python benchmarks/tune_filter.py [--shared ../shared] [--out results/tune_filter.json]

Prints one line per configuration (recall@1 over all frames and after convergence, frame of
convergence) and writes them to the JSON file.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict, replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vpr_localizer.evaluation.evaluate import GroundTruth, recall_at_n, relevance, _in_memory_map  # noqa: E402
from vpr_localizer.evaluation.online import filter_entry  # noqa: E402
from vpr_localizer.evaluation.scenarios import VGG16_WEIGHTS, ImageSetSpec  # noqa: E402
from vpr_localizer.localization.localize import Localizer, LocalizerConfig  # noqa: E402
from vpr_localizer.localization.tracking import TrackingConfig  # noqa: E402
from vpr_localizer.mapping.build import encode_map, localize_records  # noqa: E402
from vpr_localizer.models.config import EncoderConfig  # noqa: E402
from vpr_localizer.models.encoder import Encoder  # noqa: E402

TUNING_PART = (1600, 2576)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.path.join("..", "shared"))
    ap.add_argument("--out", default=os.path.join("results", "tune_filter.json"))
    args = ap.parse_args()
    datasets = os.path.join(args.shared, "datasets")
    mrecs = ImageSetSpec("nordland_thumbs/summer", gps="none", index_range=TUNING_PART).load(datasets)
    qrecs = ImageSetSpec("nordland_thumbs/winter", gps="none", index_range=TUNING_PART).load(datasets)
    enc = Encoder(EncoderConfig(weights=os.path.join(args.shared, VGG16_WEIGHTS), image_size=(128, 64)))
    menc = encode_map(mrecs, enc, progress=True)
    qres = enc.encode_paths([r.path for r in qrecs], progress="encoding queries")
    q = localize_records([qrecs[i] for i in qres.ok], menc.datum)
    rel = relevance(menc.records, q, GroundTruth("frame", frame_tolerance=1))
    vmap = _in_memory_map(menc.records, menc.result.descriptors, menc.datum)
    single = recall_at_n(Localizer(vmap).retrieve(qres.descriptors, 10)[1], rel["frame+-1"], (1,))["at"][1]
    print(f"single frame R@1 {single['correct']}/{single['total']}")
    rows = []
    grid = itertools.product((10, 50), (0.01, 0.03, 0.1), (0.05, 0.3), ((0, 2), (0, 3)))
    for top_k, temp, floor, (vmin, vmax) in grid:
        cfg = replace(TrackingConfig(), temperature=temp, floor=floor, v_min=vmin, v_max=vmax)
        out = filter_entry(Localizer(vmap, LocalizerConfig(top_k=top_k)), qres.descriptors, rel, recall_at_n,
                           (1,), cfg)
        a, c = out["recall"]["frame+-1"]["at"][1], out["recall_converged"]["frame+-1"]["at"][1]
        rows.append({"top_k": top_k, "config": asdict(cfg), "r1": a, "r1_converged": c,
                     "converged_after_frames": out["converged_after_frames"], "ms_per_frame": out["ms_per_frame"]})
        print(f"top_k {top_k:3d} T {temp:5.2f} floor {floor:4.2f} v {vmin}..{vmax}: R@1 {a['correct']}/{a['total']}"
              f"  after convergence (frame {out['converged_after_frames']}) {c['correct']}/{c['total']}"
              f"  {out['ms_per_frame']:.2f} ms/frame", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"tuning_part": TUNING_PART, "single_frame_r1": single, "rows": rows}, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
