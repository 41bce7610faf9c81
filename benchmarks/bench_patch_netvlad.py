#!/usr/bin/env python3
"""Benchmark of Patch-NetVLAD (not a test): patch extraction and re-ranking cost, storage.

Synthetic data of realistic sizes (no weights, no images): VGG16 conv5_3-like features
(C = 512, ReLU of Gaussian noise) on feature grids ``WxH`` (default 32x16 = 512x256 px input
and 40x30 = 640x480 px, the paper's size), a NetVLAD layer with K = 64 (32,768-dim raw
descriptors), patch sizes 2, 5, 8 at stride 1, and a synthetic PCA-whitening of 32,768 -> 4096
dims (random components; the 512-dim rows use its first 512 components, which is what
truncation does). Timings do not depend on the values.

* ``extract``: ms per image for :meth:`PatchNetVLAD.extract` (residuals, box sums,
  normalisation, PCA projection, copy to numpy), one image per call, median of ``--repeats``
  after one warm-up (default 1 run); ``pca`` none / 512 / 4096. Dominated by the PCA projection at 4096 dims
  (P x 32768 x 4096 multiply-adds: 380 GMAC per 40x30 image).
* ``rerank``: ms per query for :func:`rerank` over k candidates (k = 10, 50, 100), in each mode:
  ``ransac`` (performance mode, sizes 2/5/8, ``cv2.RANSAC`` as the reference code), ``magsac``
  (the same with ``cv2.USAC_MAGSAC``), ``spatial`` (rapid spatial scoring, sizes 2/5/8) and
  ``spatial_p5`` (the paper's speed configuration: size 5 only). Candidates are stored as
  float16 (as a map would hold them) and converted per call; one timed run (no warm-up: nothing
  is compiled or cached), half of them the query's patches
  with noise and a shift (many matches), half unrelated; a pool of 10 distinct candidates is
  cycled to make k (the cost does not depend on repetition: each is 2-23 MB, beyond any cache).
* ``bytes_per_keyframe``: float16 patch descriptors per keyframe.

Writes JSON (default ``results/bench_patch_netvlad.json``) and prints a table.

    PYTHONPATH=. python benchmarks/bench_patch_netvlad.py      # 523 s on 2 shared cores at load ~5.5
    PYTHONPATH=. python benchmarks/bench_patch_netvlad.py --grids 32x16 --ks 10 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_common import peak_rss_mb, write_results  # noqa: E402
from vpr_localizer.localization.patch_matching import PatchMatchConfig, rerank  # noqa: E402
from vpr_localizer.models.aggregation import NetVLAD  # noqa: E402
from vpr_localizer.models.patch_netvlad import (  # noqa: E402
    PatchDescriptors, PatchNetVLAD, bytes_per_keyframe, from_storage, num_patches, patch_centres, to_storage)
from vpr_localizer.models.pca import PCAWhitening  # noqa: E402

K, C = 64, 512
SIZES = (2, 5, 8)
#: (row name, patch sizes, PatchMatchConfig overrides)
MODES = (("ransac", SIZES, {"mode": "ransac", "ransac_method": "ransac"}),
         ("magsac", SIZES, {"mode": "ransac", "ransac_method": "magsac"}),
         ("spatial", SIZES, {"mode": "spatial"}),
         ("spatial_p5", (5,), {"mode": "spatial"}))


def synthetic_pca(in_dim: int, out_dim: int, seed: int = 0) -> PCAWhitening:
    rng = np.random.default_rng(seed)
    comps = rng.standard_normal((out_dim, in_dim), dtype=np.float32)
    comps /= np.sqrt(in_dim)
    evals = np.linspace(1.0, 0.01, out_dim, dtype=np.float32)
    return PCAWhitening(np.zeros(in_dim, np.float32), comps, evals, 1e-3)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_patches(grid_hw, dim, rng, base=None, shift=(0.0, 0.0), noise=0.3) -> List[PatchDescriptors]:
    """Patch sets at SIZES: random unit descriptors, or ``base`` + noise with centres shifted."""
    out = []
    for i, p in enumerate(SIZES):
        cen = patch_centres(grid_hw, p)
        if base is None:
            d = _unit(rng, cen.shape[0], dim)
        else:
            d = base[i].descriptors + noise * _unit(rng, cen.shape[0], dim)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            cen = cen + np.float32(shift)
        out.append(PatchDescriptors(p, d.astype(np.float16), cen, 1, grid_hw if base is None else None))
    return out


def time_median(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", nargs="+", default=["32x16", "40x30"], help="feature grid WxH, cells")
    ap.add_argument("--dims", nargs="+", type=int, default=[512, 4096])
    ap.add_argument("--ks", nargs="+", type=int, default=[10, 50, 100])
    ap.add_argument("--repeats", type=int, default=1, help="timed extraction runs per case (median), after a warm-up")
    ap.add_argument("--rerank-repeats", type=int, default=1, help="timed re-ranking runs per case (median), no warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/bench_patch_netvlad.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    t_start = time.time()
    load_start = os.getloadavg()

    nv = NetVLAD(K, C).to(device).eval()
    t = time.perf_counter()
    pca = synthetic_pca(K * C, max(args.dims))
    print(f"synthetic PCA {K * C} -> {max(args.dims)}: {pca.components.nbytes / 2**20:.0f} MiB float32 "
          f"({time.perf_counter() - t:.1f} s to make)")
    rows: List[Dict] = []

    for g in args.grids:
        w, h = (int(v) for v in g.lower().split("x"))
        grid = (h, w)
        feats = torch.relu(torch.randn(1, C, h, w, device=device))
        # ---- extraction
        for dim in [None] + list(args.dims):
            ex = PatchNetVLAD(nv, SIZES, 1, pca if dim else None, dim)
            ms = time_median(lambda ex=ex: ex.extract(feats), args.repeats)
            rows.append({"kind": "extract", "grid": g, "pca_dim": dim or K * C, "patch_sizes": list(SIZES),
                         "patches": num_patches(grid, SIZES), "ms_per_image": round(ms, 1),
                         "peak_rss_mb": round(peak_rss_mb())})
            print(f"extract  grid {g:>5}  dim {dim or K * C:>5}: {ms:9.1f} ms/image")
            del ex
        # ---- re-ranking
        for dim in args.dims:
            query = synthetic_patches(grid, dim, rng)
            query = from_storage(to_storage(query))  # float32, as a freshly extracted query
            pool = []
            for j in range(10):
                if j % 2 == 0:
                    pool.append(synthetic_patches(grid, dim, rng, base=query, shift=(rng.integers(-3, 4), rng.integers(-2, 3))))
                else:
                    pool.append(synthetic_patches(grid, dim, rng))
            for mode, sizes, overrides in MODES:
                idx = [SIZES.index(p) for p in sizes]
                q = [query[i] for i in idx]
                for k in args.ks:
                    cands = [[pool[j % len(pool)][i] for i in idx] for j in range(k)]
                    ids = np.arange(k)
                    gs = np.linspace(1.0, 0.5, k)
                    cfg = PatchMatchConfig(device=str(device), **overrides)
                    ms = time_median(lambda: rerank(q, cands, ids, gs, config=cfg), args.rerank_repeats, warmup=False)
                    rows.append({"kind": "rerank", "grid": g, "pca_dim": dim, "mode": mode, "patch_sizes": list(sizes),
                                 "k": k, "ms_per_query": round(ms, 1), "ms_per_candidate": round(ms / k, 2),
                                 "bytes_per_keyframe": bytes_per_keyframe(grid, sizes, dim),
                                 "peak_rss_mb": round(peak_rss_mb())})
                    print(f"rerank   grid {g:>5}  dim {dim:>5}  {mode:<10} k={k:>3}: {ms:9.1f} ms/query "
                          f"({ms / k:.1f} ms/candidate)")
            del pool, query
        for dim in args.dims:
            for sizes in (SIZES, (5,)):
                b = bytes_per_keyframe(grid, sizes, dim)
                rows.append({"kind": "storage", "grid": g, "pca_dim": dim, "patch_sizes": list(sizes),
                             "bytes_per_keyframe": b})
                print(f"storage  grid {g:>5}  dim {dim:>5}  sizes {sizes}: {b / 1e6:.2f} MB/keyframe (float16)")

    print(f"total {time.time() - t_start:.0f} s, peak RSS {peak_rss_mb():.0f} MiB")
    write_results(args.out, rows, device, K=K, C=C, wall_s=round(time.time() - t_start, 1),
                  loadavg_start=[round(v, 2) for v in load_start], loadavg_end=[round(v, 2) for v in os.getloadavg()],
                  note="synthetic features/PCA; rerank candidates stored float16, 10-candidate pool cycled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
