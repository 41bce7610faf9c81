"""Milvus (milvus-lite, embedded) beside FAISS on the same vectors: build time, ms/query (single and
batched), recall@1 vs exact, bytes per keyframe.

    .venv/bin/python benchmarks/bench_milvus.py [--sizes 100000,1000000] [--dim 256] [--queries 200]
        [--single-queries 100] [--nordland] [--nordland-step 2] [--nordland-sizes 100000]
        [--backends faiss_flat,faiss_ivfpq,milvus_FLAT,milvus_IVF_FLAT,milvus_HNSW]
        [--milvus-hnsw-max-n 100000] [--out results/bench_milvus.json] [--append]

Data sets (every one is searched by every backend):

``random`` (one per ``--sizes`` entry)
    ``n`` seeded random 256-D unit vectors (Gaussian, L2-normalised) as the map and ``--queries``
    perturbed copies of random map rows (``0.5 * noise / sqrt(D)`` per component before
    normalising, so nearest neighbours are meaningful) - a synthetic stress test of the index.
``nordland`` (``--nordland``, one per ``--nordland-sizes`` entry)
    real descriptors: the held-out Nordland route part (positions 2600-3575, every
    ``--nordland-step``-th) encoded with the project's encoder (VGG16 at 128x64 = the 64x32
    thumbnails upscaled 2x, NetVLAD K=16 k-means-fitted on the summer images, PCA-whitened to
    ``--dim`` on them, L2-normalised); the summer descriptors are the first map rows, the
    winter ones the queries; the rest of the ``n`` map rows are distractors drawn from a Gaussian
    with the summer descriptors' mean and covariance, L2-normalised (real descriptors for
    100k-1M places are not available here).  Encoded once and cached in
    ``results/bench_milvus_nordland_step{S}_d{D}.npz``.  Also reported: ``place_recall_at_1``,
    the fraction of winter queries whose top-1 is the summer image of the same place (same file
    name, the dataset's ground truth), distractors included.

Metrics per (data set, backend):

* ``build_s``: seconds from nothing to searchable.  FAISS: :func:`vpr_localizer.mapping.index.
  build_index` (training + adding).  Milvus: create the collection, insert, flush, wait for
  milvus-lite's background segment index build, load, first search (``insert_s`` is the part up
  to the flush).
* ``single_ms_median`` / ``single_ms_p90``: one query per call (``--single-queries`` queries, at
  most 20 when ``n >= 1,000,000``), milliseconds.
* ``batched_ms_per_query``: all queries in one call (Milvus: :data:`QUERY_BATCH` per request),
  total milliseconds / number of queries.
* ``recall_at_1``: fraction of queries whose top-1 id equals the exact (FAISS flat) top-1.
* ``bytes_per_keyframe``: FAISS ``len(faiss.serialize_index(index)) / n``; Milvus the size on
  disk of the collection's folder in the milvus-lite database (raw vectors, scalar fields,
  segment index, write-ahead log) / n.  A 256-D float32 vector alone is 1024 bytes.

Backends: FAISS flat / IVF-PQ / HNSW (``build_index`` defaults) and milvus-lite FLAT / IVF_FLAT
(``nlist=1024``, ``nprobe=16``) / HNSW (``M=16, efConstruction=100``, ``ef=64``) through
:class:`vpr_localizer.mapping.milvus_index.MilvusIndex` (the same code path as a map collection).
milvus-lite 3.2.2 cannot build IVF_PQ (a Milvus server can), so it is not measured.  milvus HNSW
is only built up to ``--milvus-hnsw-max-n`` (its build is the slowest; larger sizes are recorded
as skipped with an extrapolated build time).  FAISS HNSW is not in the default backends (slow to
build on 2 cores; ``benchmarks/bench_search.py`` measures it).  Each collection is released and
dropped after its measurement.

Output: ``--out`` holds ``{"runs": [...]}``, one entry per invocation (command line, versions,
load average, rows); ``--append`` adds this run to an existing file instead of replacing it (so
a long 1M run can be added to the 100k results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vpr_localizer.mapping.index import build_index, search  # noqa: E402
from vpr_localizer.mapping.milvus_index import QUERY_BATCH, MilvusIndex, connect, is_milvus_lite  # noqa: E402

DEFAULT_BACKENDS = "faiss_flat,faiss_ivfpq,milvus_FLAT,milvus_IVF_FLAT,milvus_HNSW"
NLIST = 1024
MILVUS_CFGS = {"milvus_FLAT": ("FLAT", {}, {}),
               "milvus_IVF_FLAT": ("IVF_FLAT", {"nlist": NLIST}, {"nprobe": 16}),
               "milvus_HNSW": ("HNSW", {"M": 16, "efConstruction": 100}, {"ef": 64})}
FAISS_CFGS = {"faiss_flat": "flat", "faiss_ivfpq": "ivfpq", "faiss_hnsw": "hnsw"}


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def wait_for_milvus_lite(db_path: str, collection: str) -> bool:
    """Block until milvus-lite's background compaction + index build of ``collection`` is done.

    milvus-lite 3.x builds segment indexes in a background thread after a flush; until then
    searches fall back to brute force and compete for the CPU.  This reaches into milvus-lite
    internals (``server_manager_instance``, ``Collection._wait_for_bg``), so it is for this
    benchmark only; returns False when they are not there.
    """
    try:
        from milvus_lite.server_manager import server_manager_instance as sm

        _, db, _ = sm._servers[os.path.abspath(db_path)]
        db.get_collection(collection)._wait_for_bg()
        return True
    except Exception as exc:  # other milvus-lite version
        print(f"cannot wait for milvus-lite background work: {exc}", file=sys.stderr)
        return False


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def timed_single(index, q: np.ndarray):
    lat = []
    for row in q:
        t = time.perf_counter()
        search(index, row[None], 1)
        lat.append((time.perf_counter() - t) * 1e3)
    return np.array(lat)


def timed_batched(index, q: np.ndarray):
    t = time.perf_counter()
    _, ids = search(index, q, 1)
    return (time.perf_counter() - t) * 1e3 / len(q), ids[:, 0]


# ----------------------------------------------------------------------------------------------
# data sets
# ----------------------------------------------------------------------------------------------

def random_set(n: int, dim: int, n_queries: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 262144):  # chunks: no (n, dim) float64 temporary
        stop = min(n, start + 262144)
        x[start:stop] = unit(rng.standard_normal((stop - start, dim), dtype=np.float32))
    src = rng.choice(n, n_queries, replace=False)
    q = unit(x[src] + noise * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim))
    return x, q, None


def nordland_descriptors(step: int, dim: int, cache_dir: str):
    """(summer (M, dim) float32, winter (M, dim) float32, info dict): encoded once, then cached."""
    cache = os.path.join(cache_dir, f"bench_milvus_nordland_step{step}_d{dim}.npz")
    if os.path.isfile(cache):
        z = np.load(cache, allow_pickle=False)
        return z["summer"], z["winter"], json.loads(str(z["info"]))
    from vpr_localizer.evaluation.scenarios import get_scenario
    from vpr_localizer.mapping.build import encode_map
    from vpr_localizer.models.config import EncoderConfig
    from vpr_localizer.models.encoder import Encoder

    sc = get_scenario("nordland_heldout_winter_vs_summer")
    ds = os.path.join(os.path.dirname(REPO), "shared", "datasets")
    summer, winter = sc.map.load(ds)[::step], sc.queries.load(ds)[::step]
    assert [os.path.basename(r.path) for r in summer] == [os.path.basename(r.path) for r in winter]
    weights = os.path.join(os.path.dirname(REPO), "shared", "weights", "vgg16_features_imagenet_caffe_bgr.pth")
    enc = Encoder(EncoderConfig(weights=weights, image_size=(128, 64), num_clusters=16, pca_dim=dim,
                                device="cpu", pca_min_images=min(100, len(summer))))
    t = time.perf_counter()
    m = encode_map(summer, enc, progress=False)
    res_w = enc.encode_paths([r.path for r in winter])
    enc_s = time.perf_counter() - t
    if len(m.result.ok) != len(summer) or len(res_w.ok) != len(winter):
        raise RuntimeError("some Nordland images could not be read")
    s, w = unit(m.result.descriptors), unit(res_w.descriptors)
    if s.shape[1] != dim:
        raise RuntimeError(f"PCA gave {s.shape[1]}-D descriptors, wanted {dim}")
    info = {"scenario": sc.name, "step": step, "images_per_season": len(summer), "encode_s": round(enc_s, 1),
            "encoder": "VGG16 128x64 (64x32 thumbnails upscaled 2x), NetVLAD K=16 + PCA-whitening "
                       f"to {dim} fitted on the summer images"}
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(cache, summer=s, winter=w, info=json.dumps(info))
    return s, w, info


def nordland_set(n: int, summer: np.ndarray, winter: np.ndarray, seed: int = 0):
    """Map: the summer descriptors then ``n - M`` distractors (Gaussian fitted to them); queries:
    the winter descriptors; ground truth: query i <-> map row i."""
    m, dim = summer.shape
    if n < m:
        raise ValueError(f"nordland size {n} < {m} real descriptors")
    rng = np.random.default_rng(seed)
    mean = summer.mean(axis=0).astype(np.float64)
    cov = np.cov(summer.astype(np.float64), rowvar=False) + 1e-6 * np.eye(dim)
    chol = np.linalg.cholesky(cov)
    x = np.empty((n, dim), np.float32)
    x[:m] = summer
    for start in range(m, n, 262144):
        stop = min(n, start + 262144)
        z = rng.standard_normal((stop - start, dim))
        x[start:stop] = unit((mean + z @ chol.T).astype(np.float32))
    return x, np.ascontiguousarray(winter), np.arange(m)


# ----------------------------------------------------------------------------------------------
# one data set through every backend
# ----------------------------------------------------------------------------------------------

def run_set(name: str, x: np.ndarray, q: np.ndarray, gt, args, client, db_path: str, hnsw_build_rate):
    import faiss

    n, dim = x.shape
    n_single = min(args.single_queries, 20) if n >= 1_000_000 else args.single_queries
    qs = q[:n_single]
    rows, exact = [], None
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "faiss_flat" not in backends:
        backends = ["faiss_flat"] + backends  # the exact reference
    for backend in backends:
        row = {"set": name, "n": n, "backend": backend, "queries": len(q), "single_queries": n_single}
        if backend in FAISS_CFGS:
            t = time.perf_counter()
            index = build_index(x, FAISS_CFGS[backend])
            row["build_s"] = round(time.perf_counter() - t, 2)
            lat = timed_single(index, qs)
            row["batched_ms_per_query"], ids = timed_batched(index, q)
            row["bytes_per_keyframe"] = round(len(faiss.serialize_index(index)) / n, 1)
            del index
        elif backend in MILVUS_CFGS:
            itype, params, sparams = MILVUS_CFGS[backend]
            if itype == "HNSW" and n > args.milvus_hnsw_max_n:
                row["skipped"] = f"n > --milvus-hnsw-max-n {args.milvus_hnsw_max_n}"
                if hnsw_build_rate.get("s_per_row"):
                    row["extrapolated_build_s_linear"] = round(hnsw_build_rate["s_per_row"] * n)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            coll = f"bench_{name}_{n}_{itype}".lower()
            t = time.perf_counter()
            idx = MilvusIndex.create(client, coll, dim, {"bench": name}, index_type=itype, index_params=params,
                                     search_params=sparams, overwrite=True, uri=db_path)
            idx.add(x)
            row["insert_s"] = round(time.perf_counter() - t, 2)
            row["waited_for_background_index_build"] = wait_for_milvus_lite(db_path, coll)
            client.load_collection(coll)
            search(idx, q[:1], 1)  # first search: builds what is still missing
            row["build_s"] = round(time.perf_counter() - t, 2)
            if itype == "HNSW":
                hnsw_build_rate["s_per_row"] = row["build_s"] / n
            state = client.describe_index(coll, "descriptor")
            row["describe_index"] = {k: state.get(k) for k in ("index_type", "indexed_rows", "state")}
            row["index_params"], row["search_params"] = params, sparams
            search(idx, q[:2], 1)  # warm-up
            lat = timed_single(idx, qs)
            row["batched_ms_per_query"], ids = timed_batched(idx, q)
            row["bytes_per_keyframe"] = round(dir_bytes(os.path.join(db_path, "collections", coll)) / n, 1)
            client.release_collection(coll)
            client.drop_collection(coll)
        else:
            raise SystemExit(f"unknown backend {backend!r}; known: {', '.join([*FAISS_CFGS, *MILVUS_CFGS])}")
        if exact is None:
            exact = ids
        row["single_ms_median"] = round(float(np.median(lat)), 3)
        row["single_ms_p90"] = round(float(np.percentile(lat, 90)), 3)
        row["batched_ms_per_query"] = round(row["batched_ms_per_query"], 3)
        row["recall_at_1"] = round(float(np.mean(ids == exact)), 4)
        if gt is not None:
            row["place_recall_at_1"] = round(float(np.mean(ids == gt)), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000", help="random data set sizes, comma-separated ('' = none)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200, help="queries of the random sets (batched search)")
    ap.add_argument("--single-queries", type=int, default=100, help="queries timed one by one (max 20 at n >= 1M)")
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--nordland", action="store_true", help="also the real Nordland descriptors + distractors")
    ap.add_argument("--nordland-step", type=int, default=2, help="every S-th place of the held-out route part")
    ap.add_argument("--nordland-sizes", default="100000", help="map sizes (real + distractors), comma-separated")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS)
    ap.add_argument("--milvus-hnsw-max-n", type=int, default=100_000)
    ap.add_argument("--out", default="results/bench_milvus.json")
    ap.add_argument("--append", action="store_true", help="add this run to the runs already in --out")
    ap.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads in this process (0 = faiss default)")
    args = ap.parse_args(argv)
    import faiss
    import pymilvus

    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    nsizes = [int(s) for s in args.nordland_sizes.split(",") if s.strip()] if args.nordland else []

    tmp = tempfile.mkdtemp(prefix="bench_milvus_")
    db_path = os.path.join(tmp, "bench.db")
    client = connect(db_path)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": shlex.join([".venv/bin/python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
           "dim": args.dim, "faiss": faiss.__version__, "pymilvus": pymilvus.__version__,
           "milvus_lite": is_milvus_lite(client), "faiss_threads": faiss.omp_get_max_threads(),
           "cpu_count": os.cpu_count(), "platform": platform.platform(), "query_batch": QUERY_BATCH,
           "load_average_at_start": os.getloadavg(), "rows": []}
    hnsw_rate: dict = {}
    try:
        for n in sizes:
            x, q, gt = random_set(n, args.dim, args.queries, args.noise)
            out["rows"] += run_set("random", x, q, gt, args, client, db_path, hnsw_rate)
            del x
        if nsizes:
            summer, winter, info = nordland_descriptors(args.nordland_step, args.dim, os.path.join(REPO, "results"))
            out["nordland"] = info
            print(json.dumps({"nordland": info}), flush=True)
            for n in nsizes:
                x, q, gt = nordland_set(n, summer, winter)
                out["rows"] += run_set("nordland", x, q, gt, args, client, db_path, hnsw_rate)
                del x
    finally:
        client.close()
        out["load_average_at_end"] = os.getloadavg()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        runs = []
        if args.append and os.path.isfile(args.out):
            with open(args.out) as f:
                runs = json.load(f).get("runs", [])
        with open(args.out + ".tmp", "w") as f:
            json.dump({"runs": runs + [out]}, f, indent=2)
        os.replace(args.out + ".tmp", args.out)
        print(f"wrote {args.out}")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
