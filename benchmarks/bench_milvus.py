"""Milvus (milvus-lite, embedded) vs FAISS for the map index: build time, single-query latency, recall@1.

    .venv/bin/python benchmarks/bench_milvus.py [--n 100000] [--dim 256] [--queries 200]
        [--out results/bench_milvus.json]

Data: ``n`` random 256-D unit vectors (seeded Gaussian, L2-normalised) as the map and ``queries``
perturbed copies of random map rows (``0.5 * noise`` before normalising; so that nearest
neighbours are meaningful, unlike independent random queries) - a synthetic stress test of the
index, not a place-recognition result.  recall@1 = fraction of queries whose top-1 id equals the
exact (FAISS flat) top-1.  Single-query latency: each query searched alone, median and p90 in
milliseconds.  Build: seconds from an empty index/collection to searchable (for Milvus: create,
insert, flush, milvus-lite's background compaction + index build finished, loaded, first search;
``insert_s`` is the part up to the flush).

Backends: FAISS flat / IVF-PQ / HNSW (:func:`vpr_localizer.mapping.index.build_index` defaults)
and milvus-lite FLAT / IVF_FLAT / HNSW / IVF_PQ through
:class:`vpr_localizer.mapping.milvus_index.MilvusIndex` (the same code path as a map collection).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vpr_localizer.mapping.index import build_index, search  # noqa: E402
from vpr_localizer.mapping.milvus_index import MilvusIndex, connect  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def wait_for_milvus_lite(db_path: str, collection: str) -> bool:
    """Block until milvus-lite's background compaction + index build of ``collection`` is done.

    milvus-lite 3.x runs in-process and builds segment indexes in a background thread after a
    flush; until then searches fall back to brute force and compete for the CPU.  This reaches
    into milvus-lite internals (``server_manager_instance``, ``Collection._wait_for_bg``), so it is
    for this benchmark only; returns False when they are not there.
    """
    try:
        from milvus_lite.server_manager import server_manager_instance as sm

        _, db, _ = sm._servers[os.path.abspath(db_path)]
        db.get_collection(collection)._wait_for_bg()
        return True
    except Exception as exc:  # other milvus-lite version
        print(f"cannot wait for milvus-lite background work: {exc}", file=sys.stderr)
        return False


def timed_queries(index, q: np.ndarray, k: int = 1):
    lat, ids = [], []
    for row in q:
        t = time.perf_counter()
        _, i = search(index, row[None], k)
        lat.append((time.perf_counter() - t) * 1e3)
        ids.append(i[0, 0])
    return np.array(lat), np.array(ids)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--out", default="results/bench_milvus.json")
    ap.add_argument("--skip", nargs="*", default=["faiss_hnsw", "milvus_IVF_PQ"],
                    help="backend names to skip (default: faiss_hnsw, slow to build on 2 cores; milvus_IVF_PQ, "
                         "which milvus-lite cannot build)")
    ap.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads in this process (0 = faiss default)")
    args = ap.parse_args(argv)
    import faiss

    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    src = rng.choice(args.n, args.queries, replace=False)
    q = unit(x[src] + args.noise * rng.standard_normal((args.queries, args.dim), dtype=np.float32) / np.sqrt(args.dim))

    rows = []
    exact = None
    faiss_cfgs = [("faiss_flat", "flat", {}), ("faiss_ivfpq", "ivfpq", {}), ("faiss_hnsw", "hnsw", {})]
    for name, kind, kw in faiss_cfgs:
        if name in args.skip:
            continue
        t = time.perf_counter()
        index = build_index(x, kind, **kw)
        build_s = time.perf_counter() - t
        lat, ids = timed_queries(index, q)
        if exact is None:
            exact = ids
        rows.append({"backend": name, "build_s": round(build_s, 2),
                     "ms_per_query_median": round(float(np.median(lat)), 3),
                     "ms_per_query_p90": round(float(np.percentile(lat, 90)), 3),
                     "recall_at_1": float(np.mean(ids == exact))})
        print(json.dumps(rows[-1]), flush=True)
        del index

    tmp = tempfile.mkdtemp(prefix="bench_milvus_")
    db_path = os.path.join(tmp, "bench.db")
    client = connect(db_path)
    nlist = 1024
    milvus_cfgs = [("milvus_FLAT", "FLAT", {}, {}),
                   ("milvus_IVF_FLAT", "IVF_FLAT", {"nlist": nlist}, {"nprobe": 16}),
                   ("milvus_HNSW", "HNSW", {"M": 16, "efConstruction": 100}, {"ef": 64}),
                   ("milvus_IVF_PQ", "IVF_PQ", {"nlist": nlist, "m": 32, "nbits": 8}, {"nprobe": 16})]  # server only
    for name, itype, params, sparams in milvus_cfgs:
        if name in args.skip:
            continue
        t = time.perf_counter()
        idx = MilvusIndex.create(client, name.lower(), args.dim, {"bench": "random"}, index_type=itype,
                                 index_params=params, search_params=sparams, overwrite=True, uri=tmp)
        idx.add(x)
        insert_s = time.perf_counter() - t
        drained = wait_for_milvus_lite(db_path, idx.collection)
        client.load_collection(idx.collection)
        search(idx, q[:1], 1)  # first search: builds what is still missing
        build_s = time.perf_counter() - t
        state = client.describe_index(idx.collection, "descriptor")
        search(idx, q[:2], 1)  # warm-up
        lat, ids = timed_queries(idx, q)
        rows.append({"backend": name, "build_s": round(build_s, 2), "insert_s": round(insert_s, 2),
                     "waited_for_background_index_build": drained,
                     "ms_per_query_median": round(float(np.median(lat)), 3),
                     "ms_per_query_p90": round(float(np.percentile(lat, 90)), 3),
                     "recall_at_1": float(np.mean(ids == exact)) if exact is not None else None,
                     "index_params": params, "search_params": sparams,
                     "describe_index": {k: state.get(k) for k in ("index_type", "indexed_rows", "state")}})
        print(json.dumps(rows[-1]), flush=True)
    client.close()  # the collections stay in the temporary milvus-lite file (dropping 100k rows waits
    # for milvus-lite's background compaction, minutes); delete it by hand
    print(f"milvus-lite file left at {db_path}")

    import pymilvus

    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "n": args.n, "dim": args.dim,
           "queries": args.queries, "noise": args.noise, "data": "seeded random unit vectors; queries = "
           "perturbed map rows; recall@1 vs FAISS flat top-1", "faiss": faiss.__version__,
           "pymilvus": pymilvus.__version__, "faiss_threads": faiss.omp_get_max_threads(),
           "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
