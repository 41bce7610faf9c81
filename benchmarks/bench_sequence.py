#!/usr/bin/env python3
"""Benchmark of sequence localisation: the sparse HMM filter and SeqSLAM (pure NumPy).

Not a test. Reports

* **HMM filter** (``vpr_localizer.localization.hmm_filter``): milliseconds per frame
  (``update`` = predict + observe + estimate) for maps of 1k, 100k and 1M keyframes, in two
  motion modes: constant velocity in keyframes (no positions) and odometry (keyframe positions
  on a line, 1 m apart). Synthetic observations: top-10 with the true keyframe in 40% of the
  frames; the first ``--warmup`` frames are not timed (the hypothesis set fills up); reported
  are the mean and median per-frame time and the mean number of hypotheses. Ratio: ms/frame at
  N divided by ms/frame at the smallest N (should stay near 1: the cost does not grow with N).
* **SeqSLAM batch** (``match_sequences``): wall time (ms) for Q x M matrices of 1,000 x 1,000
  and 3,576 x 3,576 (Nordland's size) at L = 10, 20, 40 (default 5 velocities 0.8..1.2,
  unchunked), best of ``--repeats`` runs. Ratios: time / time at L = 10 (cost is linear in L),
  and 3,576^2 time / 1,000^2 time at equal L (12.8x more cells).
* **SeqSLAM streaming** (``SequenceMatcher.update``): ms per frame for M = 3,576.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_sequence.py            # ~2 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/bench_sequence.py --quick    # smaller, seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vpr_localizer.localization.hmm_filter import HmmFilter, HmmFilterConfig  # noqa: E402
from vpr_localizer.localization.sequence import SequenceConfig, SequenceMatcher, match_sequences  # noqa: E402

K = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_filter(n: int, mode: str, frames: int, warmup: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    if mode == "odometry":
        pos = np.stack([np.arange(n, dtype=np.float64), np.zeros(n)], axis=1)
        filt = HmmFilter(HmmFilterConfig(), positions=pos)
    else:
        filt = HmmFilter(HmmFilterConfig(), n_keyframes=n)
    true = n // 10
    obs = []
    for _ in range(warmup + frames):  # observations prepared outside the timed loop
        step = int(rng.choice([0, 1, 1, 1, 2]))
        true = min(true + step, n - 1)
        idx = rng.integers(0, n, K)
        if rng.random() < 0.4:
            idx[rng.integers(0, K)] = true
        obs.append((idx, np.sort(rng.uniform(0.6, 0.7, K))[::-1], step + rng.normal(0, 0.1), true))
    times, hyps, hits = [], [], 0
    for t, (idx, sims, dist, true) in enumerate(obs):
        t0 = time.perf_counter()
        est = filt.update(idx, sims, distance_m=dist if mode == "odometry" else None)
        dt = time.perf_counter() - t0
        if t >= warmup:
            times.append(dt)
            hyps.append(est.n_hypotheses)
            hits += abs(est.keyframe - true) <= 2
    times_ms = 1e3 * np.array(times)
    return {"kind": "hmm_filter", "mode": mode, "n_keyframes": n, "frames": frames,
            "ms_per_frame_mean": float(times_ms.mean()), "ms_per_frame_median": float(np.median(times_ms)),
            "hypotheses_mean": float(np.mean(hyps)), "map_within_2": hits / frames}


def bench_seqslam(q: int, m: int, L: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    D = rng.normal(1.0, 0.1, (q, m)).astype(np.float32)
    cfg = SequenceConfig(seq_len=L)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        match_sequences(D, cfg)
        best = min(best, time.perf_counter() - t0)
    return {"kind": "seqslam_batch", "Q": q, "M": m, "L": L, "n_velocities": 5, "ms": 1e3 * best,
            "ns_per_cell_L_v": 1e9 * best / (q * m * L * 5)}


def bench_stream(m: int, L: int, frames: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = rng.normal(1.0, 0.1, (frames + L, m)).astype(np.float32)
    sm = SequenceMatcher(m, SequenceConfig(seq_len=L))
    for r in rows[:L]:  # fill the history
        sm.update(r)
    t0 = time.perf_counter()
    for r in rows[L:]:
        sm.update(r)
    return {"kind": "seqslam_stream", "M": m, "L": L, "ms_per_frame": 1e3 * (time.perf_counter() - t0) / frames}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--frames", type=int, default=300, help="timed filter frames (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed filter frames (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="SeqSLAM runs, best kept (default %(default)s)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_sequence.json"), help="JSON output")
    a = ap.parse_args(argv)
    sizes = [1000, 10_000] if a.quick else [1000, 100_000, 1_000_000]
    mats = [(300, 300), (1000, 1000)] if a.quick else [(1000, 1000), (3576, 3576)]
    Ls = [10, 20, 40]

    rows = []
    print("HMM filter (top-10, 40% hits), ms per frame")
    print(f"{'mode':<10}{'N':>10}{'mean ms':>10}{'median ms':>11}{'hyps':>8}{'MAP+-2':>8}{'x vs N0':>9}")
    for mode in ("velocity", "odometry"):
        base = None
        for n in sizes:
            r = bench_filter(n, mode, a.frames, a.warmup)
            base = base or r["ms_per_frame_mean"]
            r["ratio_vs_smallest_n"] = r["ms_per_frame_mean"] / base
            rows.append(r)
            print(f"{mode:<10}{n:>10}{r['ms_per_frame_mean']:>10.3f}{r['ms_per_frame_median']:>11.3f}"
                  f"{r['hypotheses_mean']:>8.0f}{r['map_within_2']:>8.2f}{r['ratio_vs_smallest_n']:>9.2f}")

    print("\nSeqSLAM batch (5 velocities 0.8..1.2, r_window 10), best of", a.repeats)
    print(f"{'Q x M':>13}{'L':>4}{'ms':>10}{'ns/cell/L/v':>13}{'x vs L=10':>11}{'x vs small':>12}")
    small = {}
    for (q, m) in mats:
        base = None
        for L in Ls:
            r = bench_seqslam(q, m, L, a.repeats)
            base = base or r["ms"]
            r["ratio_vs_L10"] = r["ms"] / base
            if (q, m) == mats[0]:
                small[L] = r["ms"]
            else:
                r["ratio_vs_smaller_matrix"] = r["ms"] / small[L]
                r["cell_ratio"] = (q * m) / (mats[0][0] * mats[0][1])
            rows.append(r)
            extra = f"{r['ratio_vs_smaller_matrix']:>12.1f}" if "ratio_vs_smaller_matrix" in r else f"{'':>12}"
            print(f"{f'{q} x {m}':>13}{L:>4}{r['ms']:>10.1f}{r['ns_per_cell_L_v']:>13.3f}{r['ratio_vs_L10']:>11.2f}{extra}")
    if len(mats) > 1:
        print(f"(matrix cell ratio {mats[1][0] * mats[1][1] / (mats[0][0] * mats[0][1]):.1f}x)")

    m_stream = mats[-1][1]
    print(f"\nSeqSLAM streaming, M = {m_stream}")
    print(f"{'L':>4}{'ms/frame':>10}")
    for L in Ls:
        r = bench_stream(m_stream, L, frames=50 if a.quick else 200)
        rows.append(r)
        print(f"{L:>4}{r['ms_per_frame']:>10.2f}")

    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "numpy": np.__version__,
           "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
           "peak_rss_mb": _peak_rss_mb(), "quick": a.quick, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\npeak RSS {out['peak_rss_mb']:.0f} MiB; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
