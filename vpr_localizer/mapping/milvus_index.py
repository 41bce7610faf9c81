"""Milvus index backend of the map: the keyframes' global descriptors in a Milvus collection.

FAISS (:mod:`vpr_localizer.mapping.index`, ``index.faiss`` in the map directory) stays the
default.  This module keeps the same descriptors in a Milvus collection instead, so that several
robots / processes can share and grow one map database (a Milvus server, ``http://host:19530``)
or a robot can keep it in one embedded file (milvus-lite, ``uri = "/path/map.db"``); the client
API (``pymilvus.MilvusClient``) is the same for both.

:class:`MilvusIndex` looks like a FAISS index to the rest of the package: it has ``d``,
``ntotal`` and ``search(queries (Q, D) float32, k) -> (scores (Q, k) float32, ids (Q, k)
int64)`` with the inner-product metric and ``-1`` ids for missing hits, so
:func:`vpr_localizer.mapping.index.search` and :class:`~vpr_localizer.localization.localize.
Localizer` work on it unchanged (``vmap.index = MilvusIndex.open(...)``).  ``search(...,
box=(xmin, xmax, ymin, ymax))`` restricts the hits to keyframes whose ``x, y`` (metres, map
frame) are inside the box, with a Milvus scalar filter expression; the FAISS equivalent is
:func:`vpr_localizer.mapping.box_search.search_near`.

Collection schema (:func:`collection_schema`):

============  =====================  ===============================================
field         type                   meaning
============  =====================  ===============================================
id            INT64, primary key     keyframe id = row of the map (0..N-1)
descriptor    FLOAT_VECTOR(D)        global descriptor after PCA (L2-normalised)
x, y, z       FLOAT                  position in the map frame, metres (NaN unknown)
lat, lon      DOUBLE                 WGS84 degrees (NaN unknown)
stamp         DOUBLE                 seconds (NaN unknown)
robot_id      VARCHAR(256)           which robot mapped the keyframe ('' unknown)
============  =====================  ===============================================

Collection properties (strings) record what :meth:`MilvusIndex.open` checks:
``vpr.format = vpr_localizer.milvus``, ``vpr.format_version``, ``vpr.descriptor_dim``,
``vpr.encoder`` (the map's encoder fingerprint, JSON, compared with the running encoder's on
every open: a mismatch raises :class:`~vpr_localizer.errors.FingerprintMismatchError`),
``vpr.datum`` (the map's ENU datum, JSON) and ``vpr.source_map`` (map directory exported).

Vector index types (:data:`INDEX_TYPES`, metric always ``IP``): ``FLAT`` (exact), ``IVF_FLAT``,
``IVF_SQ8`` (param ``nlist``), ``IVF_PQ`` (``nlist``, ``m``, ``nbits``), ``HNSW`` / ``HNSW_SQ``
(``M``, ``efConstruction``) and ``AUTOINDEX``.  milvus-lite 3.2.2 (pymilvus 3.0.2) builds FLAT
(numpy brute force), IVF_FLAT, IVF_SQ8, HNSW, HNSW_SQ (faiss-cpu inside milvus-lite) and AUTOINDEX
(= its HNSW); it accepts IVF_PQ in ``create_index`` but cannot build it (NotImplementedError in
``milvus_lite/index/factory.py``, searches then fall back to brute force), so :meth:`MilvusIndex.
create` refuses IVF_PQ on milvus-lite (:data:`MILVUS_LITE_INDEX_TYPES`); a Milvus server builds
all of them.  Search parameters: ``nprobe`` (IVF, default 16), ``ef`` (HNSW, default
``max(64, k)``).

Limits: Milvus returns at most :data:`MAX_TOPK` (16384) hits per query, so ``k`` is clamped to
it; queries are sent in batches of :data:`QUERY_BATCH`.  ``pymilvus`` is imported lazily: the
rest of the package works without it.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.errors import FingerprintMismatchError, MapError
from vpr_localizer.mapping.box_search import check_box
from vpr_localizer.mapping.fingerprint import fingerprint_diffs
from vpr_localizer.mapping.index import _check_matrix

LOG = logging.getLogger(__name__)

COLLECTION_FORMAT = "vpr_localizer.milvus"
COLLECTION_FORMAT_VERSION = 1
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "HNSW_SQ", "AUTOINDEX")
#: the vector index types milvus-lite 3.2.2 builds (``milvus_lite/index/factory.py``): IVF_PQ is
#: accepted by ``create_index`` but its segment build raises NotImplementedError, so it is refused.
MILVUS_LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX")
DESCRIPTOR_FIELD = "descriptor"
SCALAR_FIELDS = ("x", "y", "z", "lat", "lon", "stamp", "robot_id")
ROBOT_ID_MAX_LENGTH = 256
#: Milvus's largest ``limit`` (top-k) per search.
MAX_TOPK = 16384
#: queries per Milvus search request.
QUERY_BATCH = 1024
#: bytes of descriptors per insert request (gRPC messages are limited to 64 MiB).
INSERT_BATCH_BYTES = 8 << 20
DEFAULT_NPROBE = 16
DEFAULT_EF = 64

PROP_FORMAT = "vpr.format"
PROP_VERSION = "vpr.format_version"
PROP_DIM = "vpr.descriptor_dim"
PROP_ENCODER = "vpr.encoder"
PROP_DATUM = "vpr.datum"
PROP_SOURCE = "vpr.source_map"


def connect(uri: str, **kwargs):
    """A ``pymilvus.MilvusClient`` for ``uri``.

    Args:
        uri: a local file ending in ``.db`` (milvus-lite, created when missing; its directory
            must exist) or a server address ``http://host:19530`` / ``https://...``.
        kwargs: passed to ``MilvusClient`` (``token``, ``db_name``, ...).

    Raises:
        MapError: pymilvus (or milvus-lite for a ``.db`` file) is not installed, the uri is
            neither form, or the connection fails (the message names ``uri``).
    """
    uri = str(uri)
    if not (uri.endswith(".db") or uri.startswith(("http://", "https://", "tcp://", "unix:"))):
        raise MapError(f"milvus uri {uri!r} is neither a milvus-lite file (*.db) nor a server address "
                       f"(http://host:19530)")
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise MapError(f"the milvus backend needs pymilvus and milvus-lite (pip install pymilvus milvus-lite): "
                       f"{exc}") from exc
    try:
        return MilvusClient(uri, **kwargs)
    except Exception as exc:  # pymilvus raises MilvusException, ConnectionError, ImportError (no milvus-lite)
        raise MapError(f"cannot connect to milvus at {uri}: {exc}") from exc


def collection_schema(dim: int, description: str = ""):
    """The ``pymilvus`` schema of a map collection of ``dim``-D descriptors (module doc).

    Raises:
        ValueError: ``dim < 1``.
    """
    from pymilvus import DataType, MilvusClient

    if int(dim) < 1:
        raise ValueError(f"descriptor dimension must be >= 1, got {dim}")
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    s.add_field("id", DataType.INT64, is_primary=True, description="keyframe id (map row)")
    s.add_field(DESCRIPTOR_FIELD, DataType.FLOAT_VECTOR, dim=int(dim), description="global descriptor after PCA")
    for name in ("x", "y", "z"):
        s.add_field(name, DataType.FLOAT, description="map frame, metres")
    for name in ("lat", "lon"):
        s.add_field(name, DataType.DOUBLE, description="WGS84 degrees")
    s.add_field("stamp", DataType.DOUBLE, description="seconds")
    s.add_field("robot_id", DataType.VARCHAR, max_length=ROBOT_ID_MAX_LENGTH)
    return s


def box_filter_expr(box: Sequence[float]) -> str:
    """Milvus filter expression selecting keyframes with ``x, y`` inside ``box``.

    Args:
        box: ``(xmin, xmax, ymin, ymax)``, metres in the map frame (finite, min <= max).

    Returns:
        e.g. ``"x >= -5.0 and x <= 5.0 and y >= 0.0 and y <= 20.0"`` (NaN positions never match).

    Raises:
        ValueError: bad ``box`` (:func:`~vpr_localizer.mapping.box_search.check_box`).
    """
    xmin, xmax, ymin, ymax = check_box(box)
    return f"x >= {xmin!r} and x <= {xmax!r} and y >= {ymin!r} and y <= {ymax!r}"


def _canonical(value) -> Any:
    """JSON round trip: tuples become lists, so a fingerprint compares equal to its stored copy."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _search_params(index_type: str, k: int, overrides: Optional[Dict]) -> Dict:
    params: Dict[str, Any] = {}
    if index_type.startswith("IVF"):
        params["nprobe"] = DEFAULT_NPROBE
    elif index_type == "HNSW":
        params["ef"] = max(DEFAULT_EF, int(k))
    params.update(overrides or {})
    if "ef" in params:
        params["ef"] = max(int(params["ef"]), int(k))
    return {"metric_type": "IP", "params": params}


class MilvusIndex:
    """The map's descriptors in a Milvus collection, searchable like a FAISS index.

    Make one with :meth:`create` (new collection) or :meth:`open` (existing one, fingerprint
    checked); :func:`export_map_to_milvus` creates and fills one from a map directory.

    Attributes:
        d: descriptor dimension ``D``.
        ntotal: number of keyframes (rows) in the collection when opened / after :meth:`add`
            (call :meth:`refresh` to see rows other clients added).
        uri, collection: where the data is.
        index_type: the vector index type (``describe_index``), one of :data:`INDEX_TYPES`.
        fingerprint: the encoder fingerprint stored with the collection (dict).
        datum: the ENU datum dict (``lat``, ``lon``, ``alt``) or None.
        metric: ``"IP"``.
        supports_box_filter: True (``search(..., box=...)``).
    """

    metric = "IP"
    supports_box_filter = True

    def __init__(self, client, collection: str, uri: str, properties: Dict[str, str], dim: int,
                 index_type: str, search_params: Optional[Dict] = None, owns_client: bool = False):
        self.client = client
        self.collection = collection
        self.uri = uri
        self.properties = dict(properties)
        self.d = int(dim)
        self.index_type = index_type
        self.search_params = dict(search_params or {})
        self._owns_client = owns_client
        self.fingerprint = json.loads(self.properties.get(PROP_ENCODER, "null"))
        self.datum = json.loads(self.properties.get(PROP_DATUM, "null"))
        self.ntotal = 0
        self.refresh()

    # ------------------------------------------------------------------------------------------
    # opening / creating
    # ------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, uri_or_client, collection: str, dim: int, fingerprint: Dict, *,
               index_type: str = "FLAT", index_params: Optional[Dict] = None, datum: Optional[Dict] = None,
               source_map: str = "", overwrite: bool = False, search_params: Optional[Dict] = None,
               uri: Optional[str] = None) -> "MilvusIndex":
        """Create an empty map collection (schema, IP vector index, properties) and load it.

        Args:
            uri_or_client: milvus uri (:func:`connect`) or an open ``MilvusClient`` (not closed
                by :meth:`close`).
            collection: collection name (letters, digits, ``_``).
            dim: descriptor dimension ``D``.
            fingerprint: the map's encoder fingerprint (``map.yaml`` ``encoder``).
            index_type: one of :data:`INDEX_TYPES`.
            index_params: build parameters of the vector index (``nlist``; ``m``, ``nbits``;
                ``M``, ``efConstruction``).
            datum: ENU datum ``{"lat", "lon", "alt"}`` (degrees, metres) or None.
            source_map: the map directory the data comes from (informational).
            overwrite: drop an existing collection of that name first.
            search_params: default search parameters (``nprobe``, ``ef``).
            uri: the uri, for messages, when a client is given.

        Raises:
            ValueError: unknown ``index_type``, ``IVF_PQ`` on milvus-lite, or ``dim < 1``.
            MapError: the collection exists and ``overwrite`` is False; connection or Milvus
                errors (bad index parameters, ...).
        """
        index_type = str(index_type).upper()
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown milvus index type {index_type!r}; expected one of {', '.join(INDEX_TYPES)}")
        client, uri, owns = _client(uri_or_client, uri)
        if index_type not in MILVUS_LITE_INDEX_TYPES and is_milvus_lite(client):
            if owns:
                client.close()
            raise ValueError(f"milvus-lite cannot build {index_type} indexes (it builds "
                             f"{', '.join(MILVUS_LITE_INDEX_TYPES)}); use a Milvus server for {index_type}")
        try:
            if client.has_collection(collection):
                if not overwrite:
                    raise MapError(f"milvus collection {collection!r} already exists at {uri} "
                                   f"(use overwrite / --overwrite to replace it)")
                client.drop_collection(collection)
            schema = collection_schema(dim, description="vpr_localizer map keyframes")
            ip = client.prepare_index_params()
            ip.add_index(field_name=DESCRIPTOR_FIELD, index_type=index_type, metric_type="IP",
                         params=dict(index_params or {}))
            props = {PROP_FORMAT: COLLECTION_FORMAT, PROP_VERSION: str(COLLECTION_FORMAT_VERSION),
                     PROP_DIM: str(int(dim)), PROP_ENCODER: json.dumps(_canonical(fingerprint), sort_keys=True),
                     PROP_DATUM: json.dumps(_canonical(datum)), PROP_SOURCE: str(source_map)}
            client.create_collection(collection, schema=schema, index_params=ip, properties=props)
        except MapError:
            if owns:
                client.close()
            raise
        except Exception as exc:
            if owns:
                client.close()
            raise MapError(f"cannot create milvus collection {collection!r} at {uri}: {exc}") from exc
        return cls.open(client, collection, fingerprint, search_params=search_params, uri=uri, _owns=owns)

    @classmethod
    def open(cls, uri_or_client, collection: str, fingerprint: Optional[Dict], *,
             search_params: Optional[Dict] = None, uri: Optional[str] = None, _owns: Optional[bool] = None
             ) -> "MilvusIndex":
        """Open a map collection and check it against the running encoder.

        Args:
            uri_or_client: milvus uri (:func:`connect`) or an open ``MilvusClient``.
            collection: collection name.
            fingerprint: the running encoder's fingerprint (``Encoder.fingerprint()``); it must
                equal the one stored with the collection.  ``None`` skips the check (tools that
                only inspect a collection).
            search_params: search parameters (``nprobe``, ``ef``) overriding the defaults.
            uri: the uri, for messages, when a client is given.

        Raises:
            MapError: connection failure; no such collection; a collection that is not a
                vpr_localizer map (no ``vpr.format`` property), of another format version, or
                whose schema dimension differs from ``vpr.descriptor_dim``.
            FingerprintMismatchError: ``fingerprint`` differs from the stored one; the message
                lists each field as ``key: map A vs encoder B``.
        """
        client, uri, owns = _client(uri_or_client, uri)
        owns = owns if _owns is None else _owns
        where = f"milvus collection {collection!r} at {uri}"
        try:
            try:
                exists = client.has_collection(collection)
            except Exception as exc:
                raise MapError(f"cannot reach {where}: {exc}") from exc
            if not exists:
                raise MapError(f"{where} not found (collections there: "
                               f"{', '.join(sorted(client.list_collections())) or 'none'})")
            info = client.describe_collection(collection)
            props = {str(k): str(v) for k, v in (info.get("properties") or {}).items()}
            if props.get(PROP_FORMAT) != COLLECTION_FORMAT:
                raise MapError(f"{where} is not a vpr_localizer map (no {PROP_FORMAT} = {COLLECTION_FORMAT} "
                               f"property)")
            if props.get(PROP_VERSION) != str(COLLECTION_FORMAT_VERSION):
                raise MapError(f"{where}: map collection format version {props.get(PROP_VERSION)} is not "
                               f"supported (this build reads version {COLLECTION_FORMAT_VERSION})")
            dims = [f.get("params", {}).get("dim") for f in info.get("fields", []) if f.get("name") == DESCRIPTOR_FIELD]
            if not dims or str(dims[0]) != props.get(PROP_DIM):
                raise MapError(f"{where} is inconsistent: descriptor field dimension {dims[0] if dims else None} "
                               f"but {PROP_DIM} = {props.get(PROP_DIM)}")
            try:
                stored = json.loads(props.get(PROP_ENCODER, ""))
            except ValueError:
                stored = None
            if not isinstance(stored, dict):
                raise MapError(f"{where}: no encoder fingerprint ({PROP_ENCODER} property)")
            if fingerprint is not None:
                diffs = fingerprint_diffs(stored, _canonical(fingerprint))
                if diffs:
                    raise FingerprintMismatchError(f"map {where} was built with a different encoder ("
                                                   + "; ".join(diffs) + ")")
            idx = client.describe_index(collection, DESCRIPTOR_FIELD) or {}
            index_type = str(idx.get("index_type", "FLAT")).upper()
            client.load_collection(collection)
        except MapError:
            if owns:
                client.close()
            raise
        except Exception as exc:
            if owns:
                client.close()
            raise MapError(f"cannot open {where}: {exc}") from exc
        return cls(client, collection, uri, props, int(dims[0]), index_type, search_params, owns)

    def refresh(self) -> int:
        """Re-read the row count (rows other clients added); returns ``ntotal``."""
        stats = self.client.get_collection_stats(self.collection)
        self.ntotal = int(stats.get("row_count", 0))
        return self.ntotal

    def close(self) -> None:
        """Close the client when this index opened it (not one passed in)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MilvusIndex({self.collection!r} at {self.uri}, d={self.d}, ntotal={self.ntotal}, "
                f"{self.index_type}/IP)")

    # ------------------------------------------------------------------------------------------
    # writing
    # ------------------------------------------------------------------------------------------

    def add(self, descriptors: np.ndarray, keyframes: Optional[Sequence] = None, *, ids: Optional[Iterable[int]] = None,
            robot_id: str = "", flush: bool = True) -> np.ndarray:
        """Insert keyframes.

        Args:
            descriptors: ``(N, D)`` float32, finite (L2-normalised for cosine scores).
            keyframes: ``N`` objects with ``x, y, z`` (metres), ``lat, lon`` (degrees), ``stamp``
                (seconds) attributes (e.g. :class:`~vpr_localizer.mapping.store.Keyframe`), or
                None (all NaN).
            ids: ``N`` int64 keyframe ids; default the keyframes' ``id`` attributes, else
                ``ntotal .. ntotal + N - 1``.
            robot_id: stored in every row (at most 256 characters).
            flush: persist the rows (``flush``) before returning.

        Returns:
            ``(N,)`` int64 ids inserted.

        Raises:
            ValueError: bad ``descriptors`` (dtype, shape, dimension, NaN), ``keyframes`` or
                ``ids`` of another length, ``robot_id`` too long.
            MapError: Milvus refused the insert.
        """
        x = _check_matrix(descriptors, "descriptors", dim=self.d, allow_empty=True)
        n = x.shape[0]
        if keyframes is not None and len(keyframes) != n:
            raise ValueError(f"{len(keyframes)} keyframes for {n} descriptors")
        if ids is None:
            if keyframes is not None and all(hasattr(k, "id") for k in keyframes):
                ids = [k.id for k in keyframes]
            else:
                ids = range(self.ntotal, self.ntotal + n)
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.shape != (n,):
            raise ValueError(f"{ids.size} ids for {n} descriptors")
        if len(str(robot_id)) > ROBOT_ID_MAX_LENGTH:
            raise ValueError(f"robot_id longer than {ROBOT_ID_MAX_LENGTH} characters")
        nan = math.nan

        def val(kf, name):
            v = nan if kf is None else getattr(kf, name, nan)
            return nan if v is None else float(v)

        batch = max(1, INSERT_BATCH_BYTES // (4 * self.d))
        try:
            for start in range(0, n, batch):
                rows = []
                for r in range(start, min(n, start + batch)):
                    kf = None if keyframes is None else keyframes[r]
                    row = {"id": int(ids[r]), DESCRIPTOR_FIELD: x[r], "robot_id": str(robot_id)}
                    for name in ("x", "y", "z", "lat", "lon", "stamp"):
                        row[name] = val(kf, name)
                    rows.append(row)
                self.client.insert(self.collection, rows)
            if flush and n:
                self.client.flush(self.collection)
        except Exception as exc:
            raise MapError(f"cannot insert into milvus collection {self.collection!r} at {self.uri}: {exc}") from exc
        self.refresh()
        return ids

    # ------------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, box: Optional[Sequence[float]] = None,
               search_params: Optional[Dict] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product search, optionally restricted to a box.

        Args:
            queries: ``(Q, D)`` float32, finite; ``Q == 0`` allowed.
            k: hits per query, >= 1 (clamped to :data:`MAX_TOPK`).
            box: ``(xmin, xmax, ymin, ymax)`` metres in the map frame, or None (module doc;
                NaN positions never match).
            search_params: per-call overrides of ``nprobe`` / ``ef``.

        Returns:
            ``(scores, ids)``: ``(Q, k)`` float32 inner products and ``(Q, k)`` int64 keyframe
            ids, best first; slots without a hit have id ``-1`` and score ``-inf``.

        Raises:
            ValueError: ``k < 1``, bad ``queries`` or ``box``.
            MapError: the Milvus search failed.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = _check_matrix(queries, "queries", dim=self.d, allow_empty=True)
        k = int(k)
        scores = np.full((q.shape[0], k), -np.inf, np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        limit = min(k, MAX_TOPK)
        if limit < k:
            LOG.warning("milvus returns at most %d hits per query; k=%d clamped", MAX_TOPK, k)
        expr = box_filter_expr(box) if box is not None else ""
        params = _search_params(self.index_type, limit, {**self.search_params, **(search_params or {})})
        try:
            for start in range(0, q.shape[0], QUERY_BATCH):
                chunk = q[start:start + QUERY_BATCH]
                res = self.client.search(self.collection, data=list(chunk), limit=limit, anns_field=DESCRIPTOR_FIELD,
                                         filter=expr, search_params=params, output_fields=[])
                for row, hits in enumerate(res):
                    for j, h in enumerate(hits):
                        ids[start + row, j] = int(h["id"])
                        scores[start + row, j] = float(h["distance"])
        except Exception as exc:
            raise MapError(f"milvus search on collection {self.collection!r} at {self.uri} failed: {exc}") from exc
        return scores, ids

    def fetch(self, ids: Optional[Sequence[int]] = None, with_descriptors: bool = True,
              batch: int = 4096) -> Dict[str, np.ndarray]:
        """Rows of the collection, sorted by id.

        Args:
            ids: keyframe ids to fetch; None = all rows.
            with_descriptors: include the ``(N, D)`` float32 ``descriptor`` column.
            batch: ids per query request.

        Returns:
            Columns: ``id`` (N,) int64, ``x, y, z`` float32 (metres), ``lat, lon, stamp`` float64,
            ``robot_id`` object, and ``descriptor`` ``(N, D)`` float32 when asked for.

        Raises:
            MapError: the Milvus query failed.
        """
        fields = ["id", *SCALAR_FIELDS] + ([DESCRIPTOR_FIELD] if with_descriptors else [])
        rows: List[Dict] = []
        try:
            if ids is None:
                it = self.client.query_iterator(self.collection, batch_size=batch, filter="id >= 0",
                                                output_fields=fields)
                while True:
                    page = it.next()
                    if not page:
                        it.close()
                        break
                    rows.extend(page)
            else:
                wanted = [int(i) for i in ids]
                for start in range(0, len(wanted), batch):
                    rows.extend(self.client.get(self.collection, ids=wanted[start:start + batch],
                                                output_fields=fields))
        except Exception as exc:
            raise MapError(f"cannot read milvus collection {self.collection!r} at {self.uri}: {exc}") from exc
        rows.sort(key=lambda r: int(r["id"]))
        out: Dict[str, np.ndarray] = {"id": np.array([int(r["id"]) for r in rows], np.int64)}
        for name, dt in (("x", np.float32), ("y", np.float32), ("z", np.float32), ("lat", np.float64),
                         ("lon", np.float64), ("stamp", np.float64)):
            out[name] = np.array([r[name] for r in rows], dt)
        out["robot_id"] = np.array([r["robot_id"] for r in rows], object)
        if with_descriptors:
            out[DESCRIPTOR_FIELD] = np.array([np.asarray(r[DESCRIPTOR_FIELD], np.float32) for r in rows],
                                             np.float32).reshape(-1, self.d)
        return out


def is_milvus_lite(client) -> bool:
    """True when ``client`` talks to an embedded milvus-lite (server version ``milvus_lite-*``)."""
    try:
        return str(client.get_server_version()).lower().startswith("milvus_lite")
    except Exception:  # an old server without the call: not milvus-lite
        return False


def _client(uri_or_client, uri: Optional[str]):
    """``(client, uri, owns)`` for a uri string / path or an open client."""
    if isinstance(uri_or_client, (str, bytes)) or hasattr(uri_or_client, "__fspath__"):
        u = str(uri_or_client)
        return connect(u), u, True
    return uri_or_client, uri or "<client>", False


def map_descriptors(index) -> np.ndarray:
    """The ``(N, D)`` float32 descriptors held by a FAISS map index (row i = keyframe i).

    Exact for ``flat`` and ``hnsw`` indexes; an ``ivfpq`` index only holds PQ codes, so its
    rows are the PQ reconstructions (a warning is logged).

    Raises:
        MapError: the index cannot reconstruct its vectors.
    """
    import faiss

    n = int(index.ntotal)
    try:
        if isinstance(index, faiss.IndexIVF):
            LOG.warning("the map index is IVF-PQ: exporting PQ-reconstructed (approximate) descriptors")
            index.make_direct_map()
        x = index.reconstruct_n(0, n) if n else np.zeros((0, int(index.d)), np.float32)
    except RuntimeError as exc:
        raise MapError(f"cannot read the descriptors back from the {type(index).__name__}: {exc}") from exc
    return np.ascontiguousarray(x, dtype=np.float32).reshape(n, int(index.d))


def export_map_to_milvus(map_dir, uri_or_client, collection: str, robot_id: str = "", *,
                         index_type: str = "FLAT", index_params: Optional[Dict] = None,
                         overwrite: bool = False, search_params: Optional[Dict] = None) -> MilvusIndex:
    """Copy a map directory (or a loaded :class:`~vpr_localizer.mapping.store.VprMap`) into a new
    Milvus collection: descriptors, keyframe positions / GPS / stamps, the encoder fingerprint and
    the ENU datum.

    Args:
        map_dir: map directory or a loaded ``VprMap``.
        uri_or_client: milvus uri (a milvus-lite ``.db`` file or ``http://host:19530``) or a client.
        collection: new collection name.
        robot_id: stored in every row ('' = unknown).
        index_type, index_params, search_params: see :meth:`MilvusIndex.create`.
        overwrite: replace an existing collection of that name.

    Returns:
        The open :class:`MilvusIndex` (``ntotal == len(map)``); close it when done.

    Raises:
        MapError: the map cannot be loaded (:meth:`VprMap.load`), the collection exists and
            ``overwrite`` is False, Milvus errors.
        ValueError: unknown ``index_type``.
    """
    from vpr_localizer.mapping.store import VprMap

    vmap = map_dir if isinstance(map_dir, VprMap) else VprMap.load(str(map_dir))
    x = map_descriptors(vmap.index)
    datum = None
    if vmap.datum is not None:
        datum = {k: float(getattr(vmap.datum, k)) for k in ("lat", "lon", "alt") if hasattr(vmap.datum, k)}
    idx = MilvusIndex.create(uri_or_client, collection, x.shape[1], vmap.fingerprint, index_type=index_type,
                             index_params=index_params, datum=datum, source_map=str(vmap.path),
                             overwrite=overwrite, search_params=search_params,
                             uri=uri_or_client if isinstance(uri_or_client, str) else None)
    try:
        idx.add(x, vmap.keyframes, robot_id=robot_id)
    except Exception:
        idx.close()
        raise
    if idx.ntotal != len(vmap):
        n = idx.ntotal
        idx.close()
        raise MapError(f"milvus collection {collection!r} holds {n} rows after exporting {len(vmap)} keyframes")
    LOG.info("exported %d keyframes of %s to milvus collection %r at %s (%s/IP)", len(vmap), vmap.path,
             collection, idx.uri, idx.index_type)
    return idx


def use_milvus_index(vmap, uri_or_client, collection: str, fingerprint: Optional[Dict] = None, *,
                     search_params: Optional[Dict] = None) -> MilvusIndex:
    """Let a loaded map search a Milvus collection instead of its FAISS index (``vmap.index`` is
    replaced; keyframes, positions and the datum still come from the map directory), so that a
    :class:`~vpr_localizer.localization.localize.Localizer` built on ``vmap`` afterwards uses it.

    Args:
        vmap: a loaded :class:`~vpr_localizer.mapping.store.VprMap`.
        uri_or_client: milvus uri or client (:meth:`MilvusIndex.open`).
        collection: the collection exported from this map (:func:`export_map_to_milvus`).
        fingerprint: the running encoder's fingerprint; default the map's own.
        search_params: ``nprobe`` / ``ef`` overrides.

    Returns:
        The opened :class:`MilvusIndex` (also ``vmap.index``).

    Raises:
        FingerprintMismatchError: the collection was built with another encoder than
            ``fingerprint`` (or the map's).
        MapError: as :meth:`MilvusIndex.open`; the collection's row count or dimension differs
            from the map's (then ``vmap.index`` is left unchanged).
    """
    idx = MilvusIndex.open(uri_or_client, collection, vmap.fingerprint if fingerprint is None else fingerprint,
                           search_params=search_params,
                           uri=uri_or_client if isinstance(uri_or_client, str) else None)
    if idx.ntotal != len(vmap) or idx.d != int(vmap.index.d):
        n, d = idx.ntotal, idx.d
        idx.close()
        raise MapError(f"milvus collection {collection!r} at {idx.uri} holds {n} {d}-D descriptors but map "
                       f"{vmap.path} has {len(vmap)} keyframes of {int(vmap.index.d)}-D descriptors")
    vmap.index = idx
    return idx
