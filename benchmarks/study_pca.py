"""PCA-whitening regulariser sweep on real Nordland descriptors (how the default was chosen).

Raw NetVLAD descriptors (VGG16, K=64, 128x64) of a part of the route, summer as map and winter
as queries (+-1 frame); for map windows of N = 111, 200, 400 and all images, recall@1 without
PCA, with a fixed regulariser (1e-3 ... 5e-2 of the largest eigenvalue) and with the default
``regulariser_for(N)``. Choose on the *training* part (default positions 1000-1974); run it on
the held-out part only to report.

    python benchmarks/study_pca.py                               # training part -> results/study_pca_train.json
    python benchmarks/study_pca.py --range 2600 3576 --out results/study_pca_heldout.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXED = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)


def recall_at_1(m, q, mf, qf, tol) -> int:
    best = mf[np.argmax(q @ m.T, 1)]
    return int((np.abs(best - qf) <= tol).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--range", type=int, nargs=2, default=(1000, 1975), metavar=("START", "STOP"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--out", default=str(REPO / "results" / "study_pca_train.json"))
    args = ap.parse_args(argv)

    from vpr_localizer.evaluation.scenarios import ImageSetSpec
    from vpr_localizer.mapping.build import encode_map
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.models.pca import PCAWhitening, regulariser_for

    ds = os.path.join(args.shared, "datasets")
    rng = tuple(args.range)
    m_recs = ImageSetSpec("nordland_thumbs/summer", gps="none", index_range=rng).load(ds)
    q_recs = ImageSetSpec("nordland_thumbs/winter", gps="none", index_range=rng).load(ds)
    cfg = EncoderConfig(weights=os.path.join(args.shared, "weights", "vgg16_features_imagenet_caffe_bgr.pth"),
                        image_size=(128, 64), pca_dim=0, num_clusters=64, device="cpu")
    enc = Encoder(cfg)
    M = encode_map(m_recs, enc, progress=True).result.descriptors
    Q = enc.encode_paths([r.path for r in q_recs], progress="encoding queries").descriptors
    mf, qf = np.array([r.frame for r in m_recs]), np.array([r.frame for r in q_recs])
    tol = float(np.median(np.diff(mf)))  # +-1 position
    n_all, res = len(M), {}
    for n in (111, 200, 400, n_all):
        starts = list(range(0, n_all - n + 1, max(1, (n_all - n) // 3))) if n < n_all else [0]
        acc = {"windows": len(starts), "none": 0, "default": 0, **{f"eps_{e:g}": 0 for e in FIXED}}
        for st in starts:
            sl = slice(st, st + n)
            m, q = M[sl], Q[sl]
            acc["none"] += recall_at_1(m, q, mf[sl], qf[sl], tol)
            p = PCAWhitening.fit(m, min(4096, n - 1))
            for e in FIXED:
                p.eps = e
                acc[f"eps_{e:g}"] += recall_at_1(p.transform(m), p.transform(q), mf[sl], qf[sl], tol)
            p.eps = regulariser_for(n)
            acc["default"] += recall_at_1(p.transform(m), p.transform(q), mf[sl], qf[sl], tol)
        acc["queries"] = n * len(starts)
        res[str(n)] = acc
        print(f"N={n}: " + ", ".join(f"{k} {v}" for k, v in acc.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"range": list(rng), "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
