#!/usr/bin/env python3
"""Benchmark of the map's FAISS index kinds (``vpr_localizer.mapping.index``): flat vs ivfpq vs hnsw.

Not a test.  For every map size N and index kind it reports

* build/train seconds (``build_index``: training + adding all N descriptors),
* search time: batched (all ``--queries`` queries in one call, ms per query) and single-query
  latency (one query per call, median over up to ``--single-queries`` calls), with ``--threads``
  OpenMP threads and with 1 (one query is too little work to split: with a busy core, OpenMP
  barriers can make 2 threads 10x slower than 1),
* recall relative to the exact ``flat`` result: ``R@1`` = fraction of queries whose exact nearest
  neighbour is the index's top-1, ``R@10`` = ... is among the index's top 10 (faiss's
  "1-recall@R"), and ``10-R@10`` = mean overlap of the top-10 lists (|approx ∩ exact| / 10),
* bytes per keyframe: ``len(faiss.serialize_index(index)) / N``,
* memory: every (N, kind) case runs in a fresh child process (multiprocessing "spawn"); ``peak
  RSS`` is that child's peak resident set size (``VmHWM`` from /proc/self/status, i.e. its own
  ``ru_maxrss``, taken before serialisation; ``getrusage`` itself is not used because on Linux
  ``ru_maxrss`` survives ``exec`` and can report the parent's peak), and includes the
  memory-mapped database pages it read plus Python/numpy/faiss (``base RSS``, measured after the
  imports); ``index RSS`` is the child's RSS after building with the database unmapped, minus
  ``base RSS``: the resident size of the index itself.

Data: the database is N random unit vectors (i.i.d. Gaussian, L2-normalised) of ``--dim``
dimensions; the queries are database rows plus Gaussian noise of relative norm ``--noise``,
re-normalised, so the true nearest neighbour is the source row (also reported, as ``gt@1``).
Random vectors have no cluster structure, which is the worst case for IVF and PQ (real NetVLAD
descriptors are far more clustered), so approximate recalls here are pessimistic.

Dimension: NetVLAD's 4096-d PCA output would need 1M x 4096 x 4 B = 16 GB for a flat 1M map
(plus the same again while building), too much for a 24 GB machine; the default ``--dim 512``
keeps the 1M flat map at 2 GB.

HNSW construction is slow on few cores (~10 min for 1M x 512 on 2 cores), so by default it is
only built up to ``--hnsw-max-n`` descriptors; larger sizes are recorded as skipped with the
reason (and an extrapolated build time when a smaller HNSW was built).

Usage::

    PYTHONPATH=. python benchmarks/bench_search.py                 # defaults: ~10 min, 2 cores
    PYTHONPATH=. python benchmarks/bench_search.py --sizes 1000,10000 --kinds flat,hnsw
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SIZES = (1000, 10000, 100000, 1000000)
K = 10


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def make_data(n: int, dim: int, n_queries: int, noise: float, seed: int, workdir: Path):
    """Write ``db.npy`` ((n, dim) float32 unit rows) and ``queries.npy`` ((Q, dim) float32) into
    ``workdir``, in chunks so the parent never holds the database in anonymous memory.
    Returns (db_path, queries_path, source_rows (Q,) int64)."""
    rng = np.random.default_rng(seed)
    db_path, q_path = workdir / f"db_{n}.npy", workdir / f"queries_{n}.npy"
    db = np.lib.format.open_memmap(db_path, mode="w+", dtype=np.float32, shape=(n, dim))
    chunk = 65536
    for start in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        db[start:start + len(x)] = x
    q_count = min(n_queries, n)
    rows = np.sort(rng.choice(n, size=q_count, replace=False)).astype(np.int64)
    q = np.array(db[rows])
    q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db.flush()
    del db
    np.save(q_path, q.astype(np.float32))
    return db_path, q_path, rows


# ----------------------------------------------------------------------------------------------
# one (N, kind) case, run in a fresh child process
# ----------------------------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _run_case(spec: dict) -> dict:
    import faiss

    from vpr_localizer.mapping import index as vindex

    faiss.omp_set_num_threads(spec["threads"])
    base_rss = _rss_bytes()
    db = np.load(spec["db_path"], mmap_mode="r")
    queries = np.load(spec["q_path"])
    n = db.shape[0]

    t0 = time.perf_counter()
    idx = vindex.build_index(db, spec["kind"], **spec["build_kwargs"])
    build_s = time.perf_counter() - t0
    del db
    gc.collect()
    index_rss = _rss_bytes() - base_rss
    vindex.set_search_params(idx, nprobe=spec["nprobe"], ef_search=spec["ef_search"])
    actual_kind = vindex.index_kind(idx)
    params = {}
    if actual_kind == "ivfpq":
        params = {"nlist": int(idx.nlist), "nprobe": int(idx.nprobe), "pq_m": int(idx.pq.M),
                  "pq_nbits": int(idx.pq.nbits)}
    elif actual_kind == "hnsw":
        params = {"M": int(idx.hnsw.nb_neighbors(1)), "ef_construction": int(idx.hnsw.efConstruction),
                  "ef_search": int(idx.hnsw.efSearch)}

    vindex.search(idx, queries[:10], K)  # warm-up (page-in, thread pool start)
    t0 = time.perf_counter()
    _, ids = vindex.search(idx, queries, K)
    batch_ms = (time.perf_counter() - t0) * 1000.0 / len(queries)

    def single_query_ms(threads: int) -> list:
        faiss.omp_set_num_threads(threads)
        times = []
        t_end = time.perf_counter() + spec["single_budget_s"]
        for i in range(min(spec["single_queries"], len(queries))):
            t0 = time.perf_counter()
            vindex.search(idx, queries[i:i + 1], K)
            times.append((time.perf_counter() - t0) * 1000.0)
            if len(times) >= 5 and time.perf_counter() > t_end:
                break
        return times

    single = single_query_ms(spec["threads"])
    single1 = single_query_ms(1) if spec["threads"] != 1 else single

    # VmHWM is this process's own high-water mark (ru_maxrss can carry the parent's over exec)
    peak_rss = _status_bytes("VmHWM")
    size = int(faiss.serialize_index(idx).size)
    return {
        "kind_built": actual_kind, "params": params, "build_s": build_s,
        "batch_ms_per_query": batch_ms, "single_ms_median": statistics.median(single),
        "single_ms_p95": float(np.percentile(single, 95)), "single_queries_timed": len(single),
        "single_ms_median_1thread": statistics.median(single1),
        "serialized_bytes": size, "bytes_per_keyframe": size / n,
        "peak_rss_bytes": peak_rss, "base_rss_bytes": base_rss, "index_rss_bytes": index_rss,
        "ids": ids,
    }


def run_in_child(spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_run_case, (spec,))


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    import faiss
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "numpy": np.__version__,
        "faiss": faiss.__version__, "load_average_at_start": list(os.getloadavg()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


def fmt_table(rows: list) -> str:
    head = ["N", "kind", "build s", "batch ms/q", "1-query ms", "1-q ms 1thr", "R@1", "R@10", "10-R@10",
            "gt@1", "B/keyframe", "peak RSS MB", "index RSS MB", "notes"]
    lines = []
    for r in rows:
        if r.get("skipped"):
            lines.append([f"{r['n']:,}", r["kind"]] + ["-"] * 11 + [f"skipped: {r['skipped']}"])
            continue
        notes = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        if r["kind_built"] != r["kind"]:
            notes = f"fell back to {r['kind_built']}" + (f"; {notes}" if notes else "")
        lines.append([
            f"{r['n']:,}", r["kind"], f"{r['build_s']:.2f}", f"{r['batch_ms_per_query']:.3f}",
            f"{r['single_ms_median']:.3f}", f"{r['single_ms_median_1thread']:.3f}", f"{r['recall_at_1']:.3f}", f"{r['recall_at_10']:.3f}",
            f"{r['overlap_at_10']:.3f}", f"{r['gt_at_1']:.3f}", f"{r['bytes_per_keyframe']:.0f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['index_rss_bytes'] / 2**20:.1f}", notes])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    last = len(head) - 1  # notes column: left-aligned
    out = ["  ".join(str(h).rjust(w) if i < last else str(h) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for ln in lines:
        out.append("  ".join(str(c).rjust(w) if i < last else str(c) for i, (c, w) in enumerate(zip(ln, widths))))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512,
                   help="descriptor dimension (default 512: a 1M flat map is 2 GB; 1M x 4096 "
                        "float32 would be 16 GB, too much for a 24 GB machine)")
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                   help="comma-separated map sizes N (default %(default)s)")
    p.add_argument("--kinds", default="flat,ivfpq,hnsw", help="comma-separated index kinds (default %(default)s)")
    p.add_argument("--queries", type=int, default=1000, help="queries per map (batched search; default %(default)s)")
    p.add_argument("--single-queries", type=int, default=100,
                   help="at most this many one-query calls for the latency (default %(default)s; "
                        "stops after 5 s once 5 were timed)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss OpenMP threads (default: all cores = %(default)s)")
    p.add_argument("--noise", type=float, default=0.3,
                   help="query noise norm relative to the unit descriptor (default %(default)s: cosine ~0.96 to the source row)")
    p.add_argument("--hnsw-max-n", type=int, default=100000,
                   help="skip hnsw for larger maps (build too slow on few cores; default %(default)s; 0 = no cap)")
    p.add_argument("--ef-construction", type=int, default=80, help="hnsw efConstruction (default %(default)s)")
    p.add_argument("--nprobe", type=int, default=None, help="ivfpq nprobe (default: build_index's, min(nlist, 16))")
    p.add_argument("--ef-search", type=int, default=None, help="hnsw efSearch (default: build_index's, 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the temporary database files go (default: system temp)")
    p.add_argument("--out", default="results/bench_search.json", help="JSON output (default %(default)s)")
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    from vpr_localizer.mapping.index import INDEX_KINDS
    bad = [k for k in a.kinds if k not in INDEX_KINDS]
    if bad or not a.kinds:
        p.error(f"--kinds must be a subset of {','.join(INDEX_KINDS)}, got {bad or 'nothing'}")
    if a.dim < 1 or a.queries < 1 or a.threads < 1 or any(s < 1 for s in a.sizes):
        p.error("--dim, --queries, --threads and --sizes must be positive")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    info = machine_info(args.threads)
    print(f"faiss {info['faiss']}, {info['cpu_count']} CPUs ({info.get('cpu_model')}), {args.threads} threads, "
          f"dim={args.dim}, queries={args.queries}, noise={args.noise}, load average {info['load_average_at_start']}")
    if "hnsw" in args.kinds and args.hnsw_max_n:
        over = [n for n in args.sizes if n > args.hnsw_max_n]
        if over:
            print(f"hnsw is capped at N <= {args.hnsw_max_n:,} (--hnsw-max-n): N={over} will be recorded as skipped")
    print("peak RSS = VmHWM (peak RSS, i.e. ru_maxrss) of a fresh child process per (N, kind), including the memory-mapped database "
          "and ~base RSS of Python+faiss; index RSS = child RSS after build with the database unmapped - base RSS")

    # the exact flat search is the reference for recall: run it first, even when not reported
    kinds = ["flat"] + [k for k in args.kinds if k != "flat"]
    cases = [(n, k) for n in args.sizes for k in kinds]
    workdir = Path(tempfile.mkdtemp(prefix="bench_search_", dir=args.workdir))
    results, data, hnsw_ref = [], {}, None
    t_start = time.time()
    try:
        bar = tqdm(cases, desc="cases", unit="case", dynamic_ncols=True)
        for n, kind in bar:
            bar.set_postfix_str(f"N={n:,} {kind}")
            if n not in data:
                for old in list(data):  # keep only the current size on disk
                    os.remove(data[old]["db"])
                    os.remove(data.pop(old)["q"])
                db_path, q_path, rows = make_data(n, args.dim, args.queries, args.noise, args.seed, workdir)
                data[n] = {"db": db_path, "q": q_path, "rows": rows, "ref": None}
            db_path, q_path, rows = data[n]["db"], data[n]["q"], data[n]["rows"]
            row = {"n": n, "kind": kind, "dim": args.dim, "queries": int(len(rows))}
            if kind == "hnsw" and args.hnsw_max_n and n > args.hnsw_max_n:
                reason = f"N > --hnsw-max-n={args.hnsw_max_n:,}"
                if hnsw_ref is not None:  # HNSW build cost grows ~ N log N
                    m0, t0 = hnsw_ref
                    est = t0 * (n / m0) * (np.log(n) / np.log(m0))
                    reason += f"; build extrapolated to ~{est / 60:.0f} min from {t0:.0f} s at N={m0:,}"
                row["skipped"] = reason
                results.append(row)
                tqdm.write(f"N={n:,} hnsw skipped: {reason}")
                continue
            build_kwargs = {"seed": args.seed}
            if kind == "hnsw":
                build_kwargs["ef_construction"] = args.ef_construction
            spec = {"db_path": str(db_path), "q_path": str(q_path), "kind": kind, "threads": args.threads,
                    "build_kwargs": build_kwargs, "nprobe": args.nprobe, "ef_search": args.ef_search,
                    "single_queries": args.single_queries, "single_budget_s": 5.0}
            res = run_in_child(spec)
            ids = res.pop("ids")
            if kind == "flat":
                data[n]["ref"] = ids
            ref = data[n]["ref"]
            res["recall_at_1"] = float(np.mean(ids[:, 0] == ref[:, 0]))
            res["recall_at_10"] = float(np.mean((ids[:, :K] == ref[:, :1]).any(axis=1)))
            res["overlap_at_10"] = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids[:, :K], ref[:, :K])]))
            res["gt_at_1"] = float(np.mean(ids[:, 0] == rows))
            row.update(res)
            if kind == "hnsw" and res["kind_built"] == "hnsw":
                hnsw_ref = (n, res["build_s"])
            if kind in args.kinds:
                results.append(row)
                tqdm.write(f"N={n:,} {kind}: build {res['build_s']:.1f} s, {res['batch_ms_per_query']:.3f} ms/query "
                           f"batched, R@1 {res['recall_at_1']:.3f}, R@10 {res['recall_at_10']:.3f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    info["load_average_at_end"] = list(os.getloadavg())
    info["total_s"] = round(time.time() - t_start, 1)
    table = fmt_table(results)
    print()
    print(table)
    print(f"\nR@1/R@10: exact top-1 within the index's top 1/10; 10-R@10: top-10 overlap with exact; "
          f"gt@1: top-1 is the query's source row. Total {info['total_s']:.0f} s, "
          f"load average at end {info['load_average_at_end']}.")
    out = {
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "definitions": {
            "build_s": "wall seconds of vpr_localizer.mapping.index.build_index (train + add)",
            "batch_ms_per_query": f"wall ms of one search() call over all queries (k={K}) / number of queries",
            "single_ms_median": "median wall ms of search() with one query (k=10), --threads OpenMP threads",
            "single_ms_median_1thread": "the same with faiss.omp_set_num_threads(1)",
            "recall_at_1": "fraction of queries whose exact (flat) top-1 is the index's top-1",
            "recall_at_10": "fraction of queries whose exact (flat) top-1 is within the index's top-10",
            "overlap_at_10": "mean |index top-10 ∩ exact top-10| / 10",
            "gt_at_1": "fraction of queries whose top-1 is the database row the query was made from",
            "bytes_per_keyframe": "len(faiss.serialize_index(index)) / N",
            "peak_rss_bytes": "VmHWM (= own ru_maxrss) of a fresh child process per (N, kind) (before serialisation), "
                              "including the memory-mapped database pages and base_rss_bytes",
            "base_rss_bytes": "child RSS after importing numpy/faiss, before loading data",
            "index_rss_bytes": "child RSS after build with the database unmapped, minus base_rss_bytes",
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    txt = Path(args.out).with_suffix(".txt")
    txt.write_text(table + "\n")
    print(f"wrote {args.out} and {txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
