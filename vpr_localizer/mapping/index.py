"""FAISS index layer of the map: nearest-neighbour search over global place descriptors.

The map stores one L2-normalised global descriptor (NetVLAD, optionally PCA-whitened) per
keyframe.  Similarity is the inner product, which equals the cosine similarity for unit vectors,
so every index built here uses ``faiss.METRIC_INNER_PRODUCT`` and scores are "larger is better".

Three index kinds are supported (:data:`INDEX_KINDS`):

``"flat"``
    ``faiss.IndexFlatIP``: exact exhaustive search, ``4 * D`` bytes per keyframe.  The right
    choice up to ~100k keyframes on a CPU.
``"ivfpq"``
    ``faiss.IndexIVFPQ`` (Jegou et al., "Product quantization for nearest neighbor search",
    TPAMI 2011): inverted file of ``nlist`` k-means cells over an ``IndexFlatIP`` coarse
    quantizer, residuals compressed by a product quantizer of ``pq_m`` sub-quantizers with
    ``2**pq_nbits`` centroids each (``pq_m * pq_nbits / 8`` bytes + an 8-byte id per keyframe).
    Approximate; needs training, falls back to ``"flat"`` when there are too few descriptors.
``"hnsw"``
    ``faiss.IndexHNSWFlat`` (Malkov & Yashunin, TPAMI 2018): graph search over uncompressed
    vectors.  Approximate, no training, ``4 * D + ~8 * hnsw_m`` bytes per keyframe.

FAISS ids are always the row numbers ``0..N-1`` of the descriptor array passed to
:func:`build_index`, so they index the map's keyframe table directly.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Tuple

import faiss
import numpy as np

from vpr_localizer.errors import MapError

LOG = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivfpq", "hnsw")

#: faiss k-means warns below this many training points per centroid (``Clustering.h``); the
#: IVF ``nlist`` is clamped so that the training set has at least this many points per cell.
MIN_POINTS_PER_CENTROID = 39
#: The IVF coarse quantizer is trained on a seeded random subsample of at most this many points
#: per cell (faiss accepts 39..256, the fewer the faster).  39 keeps k-means for 1M x 512
#: descriptors (nlist 4000) at about a minute on a 2-core CPU; faiss's own cap of 256 would take
#: over six times longer for centroids that are hardly better.
TRAIN_POINTS_PER_CENTROID = 39
#: Each PQ codebook is trained on at most this many points per PQ centroid (faiss default 256):
#: 64 * 256 = 16384 residuals.  faiss's PQ k-means is slow on 8-dim sub-vectors (~0.5 s per
#: codebook on 65536 points), and with 64 codebooks the default would cost minutes per build.
PQ_TRAIN_POINTS_PER_CENTROID = 64
#: k-means iterations per PQ codebook (faiss default 25).  Measured on 20k clustered 512-d
#: descriptors: 10-NN recall 0.768 with 10 iterations vs 0.769 with 25, at 60% of the time.
PQ_TRAIN_NITER = 10
#: ``nlist`` default: about ``4 * sqrt(N)`` (faiss guideline is 4..16 * sqrt(N)).
NLIST_PER_SQRT_N = 4
#: Largest number of PQ sub-quantizers chosen by default, and smallest sub-vector dimension.
MAX_DEFAULT_PQ_M = 64
MIN_PQ_SUBVECTOR_DIM = 8
#: Search-time defaults written into new indexes (and saved with them): faiss's own defaults
#: (``nprobe=1``, ``efSearch=16``) lose too much recall for place recognition.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64

_CHUNK_ROWS = 65536  # rows per chunk when validating large arrays (bounds temporary memory)


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def _check_matrix(x: np.ndarray, name: str, dim: Optional[int] = None, allow_empty: bool = False) -> np.ndarray:
    """Check that ``x`` is a finite C-contiguous ``(N, D)`` float32 array; return it (no copy of
    contiguous input).  Raises ValueError with a readable message otherwise."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero dimensions per vector (shape {x.shape})")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]} but the index has dimension {dim}")
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[start:start + _CHUNK_ROWS]
        if not np.isfinite(chunk).all():
            bad = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise ValueError(f"{name} contain non-finite values (NaN or inf), first in row {bad}")
    return np.ascontiguousarray(x)


def _warn_if_not_normalised(x: np.ndarray, tol: float = 1e-3) -> None:
    lo, hi = np.inf, -np.inf
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[start:start + _CHUNK_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64))
        lo, hi = min(lo, float(norms.min())), max(hi, float(norms.max()))
    if lo < 1.0 - tol or hi > 1.0 + tol:
        LOG.warning("descriptors are not L2-normalised (norms in [%.4g, %.4g]): inner-product "
                    "scores are not cosine similarities", lo, hi)


def default_pq_m(dim: int) -> int:
    """Default number of PQ sub-quantizers for ``dim``-dimensional descriptors.

    Rule: the largest divisor ``m`` of ``dim`` with ``m <= 64`` sub-quantizers and sub-vectors of
    ``dim / m >= 8`` dimensions (faiss needs ``m`` to divide ``dim``; fewer than 8 dims per
    sub-vector wastes 8-bit codebooks, more than 64 codes slows the table look-ups).  Examples:
    512 -> 64 (8 dims each), 4096 -> 64 (64 dims), 100 -> 10, 96 -> 12.  When no divisor
    qualifies (``dim < 16`` or awkward primes) it is 1, i.e. one codebook over the whole vector.

    Raises:
        ValueError: ``dim < 1``.
    """
    if dim < 1:
        raise ValueError(f"descriptor dimension must be >= 1, got {dim}")
    best = 1
    for m in range(1, min(MAX_DEFAULT_PQ_M, dim) + 1):
        if dim % m == 0 and dim // m >= MIN_PQ_SUBVECTOR_DIM:
            best = m
    return best


def default_nlist(n: int) -> int:
    """Default IVF cell count for ``n`` descriptors: ``round(4 * sqrt(n))`` clamped to
    ``[1, n // 39]`` so every cell has faiss's minimum of 39 training points (0 if ``n < 39``)."""
    return max(0, min(int(round(NLIST_PER_SQRT_N * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID))


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------

def build_index(descriptors: np.ndarray, kind: str = "flat", *, nlist: int | None = None,
                pq_m: int | None = None, pq_nbits: int = 8, hnsw_m: int = 32,
                ef_construction: int = 80, seed: int = 0) -> faiss.Index:
    """Build an inner-product FAISS index over the map's global descriptors.

    Row ``i`` of ``descriptors`` gets FAISS id ``i`` (ids are ``0..N-1`` in order).

    Args:
        descriptors: ``(N, D)`` float32, C-contiguous or not, finite, L2-normalised rows
            (a warning is logged when the norms are not 1; the index still works on raw inner
            products).  Not modified; a ``np.memmap`` is fine.
        kind: one of :data:`INDEX_KINDS`.
        nlist: ``"ivfpq"`` only: number of IVF cells.  Default ``round(4 * sqrt(N))``; both the
            default and an explicit value are clamped to ``N // 39`` (a warning is logged when an
            explicit value is reduced).
        pq_m: ``"ivfpq"`` only: number of PQ sub-quantizers; must divide ``D``.  Default
            :func:`default_pq_m` (largest divisor of ``D`` that is <= 64 and leaves >= 8 dims
            per sub-vector).
        pq_nbits: ``"ivfpq"`` only: bits per PQ code, 1..16 (8 = one byte per sub-quantizer).
        hnsw_m: ``"hnsw"`` only: graph degree ``M`` (>= 2); level 0 has ``2 * M`` links.
        ef_construction: ``"hnsw"`` only: beam width while building (>= 1).
        seed: seeds the IVF training subsample and faiss's k-means (IVF and PQ).  HNSW level
            assignment uses faiss's fixed seed; with several OpenMP threads the HNSW graph (and
            therefore its results) can differ slightly from run to run.

    ``"ivfpq"`` needs ``N >= max(2**pq_nbits, 39)`` training points (every PQ codebook has
    ``2**pq_nbits`` centroids, every IVF cell needs 39 points); with fewer, a warning is logged
    and an exact ``"flat"`` index is returned instead (check with :func:`index_kind`).  With
    fewer than ``39 * 2**pq_nbits`` points the PQ codebooks are under-trained; a warning is
    logged (faiss's own stderr warning is silenced in favour of it).  The IVF quantizer is
    trained on a seeded subsample of ``min(N, 39 * nlist)`` descriptors (10 k-means
    iterations), the PQ codebooks on the residuals of at most ``64 * 2**pq_nbits`` of them
    (10 iterations); these caps bound the build time on small CPUs (see the constants).

    New approximate indexes get ``nprobe = min(nlist, 16)`` / ``efSearch = 64`` (saved with the
    index); change them with :func:`set_search_params`.

    Returns:
        A populated ``faiss.IndexFlatIP``, ``faiss.IndexIVFPQ`` or ``faiss.IndexHNSWFlat`` with
        ``ntotal == N`` and ``d == D``.

    Raises:
        ValueError: unknown ``kind``; ``descriptors`` not a numpy array, not float32, not 2-D,
            empty, zero-dimensional or containing NaN/inf; invalid ``nlist``, ``pq_m``,
            ``pq_nbits``, ``hnsw_m`` or ``ef_construction``.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    x = _check_matrix(descriptors, "descriptors")
    n, d = x.shape
    _warn_if_not_normalised(x)

    if kind == "ivfpq":
        index = _build_ivfpq(x, nlist=nlist, pq_m=pq_m, pq_nbits=pq_nbits, seed=seed)
        if index is None:
            index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        if int(hnsw_m) < 2:
            raise ValueError(f"hnsw_m must be >= 2, got {hnsw_m}")
        if int(ef_construction) < 1:
            raise ValueError(f"ef_construction must be >= 1, got {ef_construction}")
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.hnsw.efSearch = DEFAULT_EF_SEARCH
    else:
        index = faiss.IndexFlatIP(d)

    index.add(x)
    assert index.ntotal == n
    return index


def _build_ivfpq(x: np.ndarray, *, nlist: Optional[int], pq_m: Optional[int], pq_nbits: int,
                 seed: int) -> Optional[faiss.Index]:
    """Create and train an IndexIVFPQ for ``x``, or return None (after a warning) when ``x`` has
    too few rows.  Does not add ``x``."""
    n, d = x.shape
    pq_nbits = int(pq_nbits)
    if not 1 <= pq_nbits <= 16:
        raise ValueError(f"pq_nbits must be in 1..16, got {pq_nbits}")
    if pq_m is None:
        m = default_pq_m(d)
    else:
        m = int(pq_m)
        if m < 1 or d % m != 0:
            raise ValueError(f"pq_m={pq_m} must be a positive divisor of the descriptor dimension {d}")
    if nlist is not None and int(nlist) < 1:
        raise ValueError(f"nlist must be >= 1, got {nlist}")

    min_n = max(2 ** pq_nbits, MIN_POINTS_PER_CENTROID)
    if n < min_n:
        LOG.warning("ivfpq needs at least %d descriptors (2**pq_nbits=%d PQ centroids, %d points "
                    "per IVF cell), got %d: falling back to an exact flat index",
                    min_n, 2 ** pq_nbits, MIN_POINTS_PER_CENTROID, n)
        return None

    max_nlist = n // MIN_POINTS_PER_CENTROID
    if nlist is None:
        nl = default_nlist(n)
    else:
        nl = int(nlist)
        if nl > max_nlist:
            LOG.warning("nlist=%d needs %d training points, only %d descriptors: using nlist=%d",
                        nl, nl * MIN_POINTS_PER_CENTROID, n, max_nlist)
            nl = max_nlist

    n_train = min(n, TRAIN_POINTS_PER_CENTROID * nl)
    if n_train < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        train = np.ascontiguousarray(x[rows])
    else:
        train = x
    if n_train < MIN_POINTS_PER_CENTROID * 2 ** pq_nbits:
        LOG.warning("PQ codebooks of %d centroids trained on only %d descriptors (faiss recommends "
                    ">= %d): ivfpq recall will be lower than with a larger map",
                    2 ** pq_nbits, n_train, MIN_POINTS_PER_CENTROID * 2 ** pq_nbits)

    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nl, m, pq_nbits, faiss.METRIC_INNER_PRODUCT)
    # faiss's Python wrapper keeps `quantizer` alive as long as `index` (referenced_objects)
    index.cp.seed = int(seed)
    index.pq.cp.seed = int(seed)
    index.pq.cp.min_points_per_centroid = 1  # we log our own warning above instead of faiss's
    index.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
    index.pq.cp.niter = PQ_TRAIN_NITER
    index.train(train)
    del train
    index.nprobe = min(nl, DEFAULT_NPROBE)
    LOG.debug("ivfpq: N=%d D=%d nlist=%d pq_m=%d pq_nbits=%d trained on %d", n, d, nl, m, pq_nbits, n_train)
    return index


# ----------------------------------------------------------------------------------------------
# searching
# ----------------------------------------------------------------------------------------------

def set_search_params(index: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set search-time accuracy/speed knobs in place.

    Args:
        index: an index from :func:`build_index` or :func:`load_index`.
        nprobe: IVF cells visited per query (``"ivfpq"``; clamped to ``nlist``).  Ignored for
            other kinds.  Higher = better recall, slower.
        ef_search: HNSW beam width at query time (``"hnsw"``; faiss uses ``max(ef_search, k)``).
            Ignored for other kinds.

    Raises:
        ValueError: ``nprobe`` or ``ef_search`` given and < 1.
    """
    if nprobe is not None:
        if int(nprobe) < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(int(nprobe), int(index.nlist))
    if ef_search is not None:
        if int(ef_search) < 1:
            raise ValueError(f"ef_search must be >= 1, got {ef_search}")
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = int(ef_search)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Find the ``k`` most similar map descriptors for every query.

    Args:
        index: an index from :func:`build_index` / :func:`load_index`.
        queries: ``(Q, D)`` float32, finite, ``D == index.d`` (L2-normalised for cosine scores).
            ``Q == 0`` is allowed.
        k: number of neighbours wanted, >= 1.

    Returns:
        ``(scores, ids)``: ``(Q, k')`` float32 inner products and ``(Q, k')`` int64 FAISS ids
        (= map row numbers), best first, with ``k' = min(k, index.ntotal)``.  Approximate
        indexes can return fewer than ``k'`` real hits (e.g. IVF with a small ``nprobe`` visiting
        near-empty cells); the missing slots have id ``-1`` and score ``-inf``.

    Raises:
        ValueError: ``k < 1`` or not an integer; ``queries`` not a float32 2-D array, dimension
            different from ``index.d``, or containing NaN/inf.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    q = _check_matrix(queries, "queries", dim=int(index.d), allow_empty=True)
    kk = int(min(int(k), int(index.ntotal)))
    if kk == 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], kk), np.float32), np.zeros((q.shape[0], kk), np.int64)
    scores, ids = index.search(q, kk)
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    missing = ids < 0
    if missing.any():
        scores[missing] = -np.inf
    return scores, ids


# ----------------------------------------------------------------------------------------------
# persistence and introspection
# ----------------------------------------------------------------------------------------------

def index_kind(index: faiss.Index) -> str:
    """Return which of :data:`INDEX_KINDS` ``index`` is.

    Raises:
        ValueError: ``index`` is not an inner-product ``IndexFlatIP``, ``IndexIVFPQ`` or
            ``IndexHNSWFlat`` (i.e. not something :func:`build_index` makes).
    """
    if getattr(index, "metric_type", None) == faiss.METRIC_INNER_PRODUCT:
        if isinstance(index, faiss.IndexHNSWFlat):
            return "hnsw"
        if isinstance(index, faiss.IndexIVFPQ):
            return "ivfpq"
        if isinstance(index, faiss.IndexFlat):
            return "flat"
    raise ValueError(f"{type(index).__name__} (metric {getattr(index, 'metric_type', None)}) is not "
                     f"an inner-product index of a kind in {INDEX_KINDS}")


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` (faiss binary format), atomically: a temporary file next to
    it is written first and renamed over ``path``, so a crash never leaves a truncated index.

    Raises:
        ValueError: ``index`` is not one of :data:`INDEX_KINDS` (see :func:`index_kind`).
        MapError: the file cannot be written (missing directory, permissions, disk full).
    """
    index_kind(index)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise MapError(f"cannot write FAISS index to {path}: {exc}") from exc


def load_index(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by :func:`save_index`.

    Returns:
        The index, of one of :data:`INDEX_KINDS`, with its saved search parameters.

    Raises:
        MapError: ``path`` does not exist or is not a file, is not a readable faiss index
            (truncated, garbage), or holds an index kind this module does not build.  The message
            contains ``path``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MapError(f"FAISS index file not found: {path}")
    if not os.path.isfile(path):
        raise MapError(f"FAISS index path is not a file: {path}")
    try:
        index = faiss.read_index(path)
    except Exception as exc:  # faiss raises RuntimeError (bad magic, short read) or MemoryError
        msg = str(exc).strip().splitlines()
        raise MapError(f"corrupt or unreadable FAISS index file {path}: "
                       f"{msg[-1] if msg else type(exc).__name__}") from exc
    try:
        index_kind(index)
    except ValueError as exc:
        raise MapError(f"unsupported FAISS index in {path}: {exc}") from exc
    return index
