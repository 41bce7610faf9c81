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

Collection schema (:func:`collection_schema`): one row per keyframe, every field of
:class:`~vpr_localizer.mapping.store.Keyframe` (so that map directory -> collection -> map
directory is lossless, :func:`import_milvus_to_map`) plus the descriptor and the robot id:

==================================  =====================  ======================================
field                               type                   meaning
==================================  =====================  ======================================
id                                  INT64, primary key     keyframe id = row of the map (0..N-1)
descriptor                          FLOAT_VECTOR(D)        global descriptor after PCA (L2-normalised)
stamp                               DOUBLE                 seconds (NaN unknown)
x, y, z                             DOUBLE                 position in the map frame, metres (NaN unknown)
qx, qy, qz, qw                      DOUBLE                 orientation in the map frame (identity unknown)
lat, lon / alt                      DOUBLE                 WGS84 degrees / metres (NaN unknown)
frame                               INT64                  frame index (-1 unknown)
image_path                          VARCHAR(4096)          source image ('' unknown)
place_id, sequence, condition       VARCHAR(1024)          tags ('' unknown)
robot_id                            VARCHAR(256)           which robot mapped the keyframe ('' unknown)
==================================  =====================  ======================================

Collection properties (strings) record what :meth:`MilvusIndex.open` checks:
``vpr.format = vpr_localizer.milvus``, ``vpr.format_version``, ``vpr.descriptor_dim``,
``vpr.encoder`` (the map's encoder fingerprint, JSON, compared with the running encoder's on
every open: a mismatch raises :class:`~vpr_localizer.errors.FingerprintMismatchError`),
``vpr.datum`` (the map's ENU datum, JSON), ``vpr.source_map`` (map directory exported) and
``vpr.build`` (the map's ``map.yaml`` ``build`` section, JSON, or ``null``).

The encoder checkpoint travels with the collection (:meth:`MilvusIndex.create` with
``encoder_checkpoint``, done by :func:`export_map_to_milvus`): the dict is serialised with
``torch.save`` and stored base64-encoded in a companion collection ``<name>__encoder``
(:func:`encoder_collection_name`; fields ``chunk`` INT64 primary key, a dummy 2-D
``FLOAT_VECTOR`` - Milvus collections need a vector field - and ``data`` VARCHAR(65535) holding
:data:`ENCODER_CHUNK_BYTES` bytes per row); the main collection's properties hold its SHA-256
(``vpr.encoder_sha256``), size (``vpr.encoder_bytes``) and chunk count (``vpr.encoder_chunks``).
:meth:`MilvusIndex.encoder_checkpoint` checks all three and reads it back with the project's
weights-only loader (``torch.load(weights_only=True)``, never plain pickle).
:func:`drop_map_collection` and ``create(..., overwrite=True)`` drop the companion with the map
collection.  Collections made without a checkpoint (the ``map_builder`` node's shared collection)
have none: they can be searched but not imported.

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

import base64
import hashlib
import io
import json
import logging
import math
from dataclasses import fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.errors import FingerprintMismatchError, MapError, WeightsError
from vpr_localizer.mapping.box_search import check_box
from vpr_localizer.mapping.fingerprint import fingerprint_diffs
from vpr_localizer.mapping.index import _check_matrix
from vpr_localizer.mapping.store import Keyframe

LOG = logging.getLogger(__name__)

COLLECTION_FORMAT = "vpr_localizer.milvus"
COLLECTION_FORMAT_VERSION = 1
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "HNSW_SQ", "AUTOINDEX")
#: the vector index types milvus-lite 3.2.2 builds (``milvus_lite/index/factory.py``): IVF_PQ is
#: accepted by ``create_index`` but its segment build raises NotImplementedError, so it is refused.
MILVUS_LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ", "AUTOINDEX")
DESCRIPTOR_FIELD = "descriptor"
#: Keyframe fields stored as DOUBLE (NaN kept), INT64 and VARCHAR (with their maximum lengths).
FLOAT_FIELDS = ("stamp", "x", "y", "z", "qx", "qy", "qz", "qw", "lat", "lon", "alt")
INT_FIELDS = ("frame",)
ROBOT_ID_MAX_LENGTH = 256
TEXT_FIELDS = {"image_path": 4096, "place_id": 1024, "sequence": 1024, "condition": 1024,
               "robot_id": ROBOT_ID_MAX_LENGTH}
#: every scalar column of a map collection (all :class:`~vpr_localizer.mapping.store.Keyframe`
#: fields but ``id``, plus ``robot_id``).
SCALAR_FIELDS = FLOAT_FIELDS + INT_FIELDS + tuple(TEXT_FIELDS)
#: name suffix of the companion collection holding the encoder checkpoint.
ENCODER_SUFFIX = "__encoder"
ENCODER_FORMAT = "vpr_localizer.milvus.encoder"
#: checkpoint bytes per companion row: base64 of 49149 bytes = 65532 characters <= VARCHAR 65535.
ENCODER_CHUNK_BYTES = 3 * 16383
VARCHAR_MAX = 65535
#: companion rows per insert request (about 4 MiB).
ENCODER_INSERT_ROWS = 64
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
PROP_BUILD = "vpr.build"
PROP_ENC_SHA = "vpr.encoder_sha256"
PROP_ENC_BYTES = "vpr.encoder_bytes"
PROP_ENC_CHUNKS = "vpr.encoder_chunks"
PROP_ENC_OF = "vpr.encoder_of"

#: Keyframe defaults of the fields (``math.nan`` floats, identity quaternion, frame -1, '' text).
_KF_DEFAULTS: Dict[str, Any] = {f.name: f.default for f in fields(Keyframe) if f.name != "id"}


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
    units = {"stamp": "seconds", "lat": "WGS84 degrees", "lon": "WGS84 degrees", "alt": "metres"}
    for name in FLOAT_FIELDS:
        s.add_field(name, DataType.DOUBLE, description=units.get(name, "map frame"))
    for name in INT_FIELDS:
        s.add_field(name, DataType.INT64)
    for name, length in TEXT_FIELDS.items():
        s.add_field(name, DataType.VARCHAR, max_length=length)
    return s


def encoder_collection_name(collection: str) -> str:
    """Name of the companion collection holding ``collection``'s encoder checkpoint (module doc)."""
    return f"{collection}{ENCODER_SUFFIX}"


def _encoder_schema():
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                   description="vpr_localizer encoder checkpoint (base64 chunks)")
    s.add_field("chunk", DataType.INT64, is_primary=True, description="chunk number 0..n-1")
    s.add_field("dummy", DataType.FLOAT_VECTOR, dim=2, description="unused (a collection needs a vector)")
    s.add_field("data", DataType.VARCHAR, max_length=VARCHAR_MAX, description="base64 of the checkpoint bytes")
    return s


def checkpoint_to_bytes(checkpoint: Dict) -> bytes:
    """``torch.save`` of an encoder checkpoint dict (tensors, strings, numbers) to bytes."""
    import torch

    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    return buf.getvalue()


def checkpoint_from_bytes(blob: bytes, where: str = "milvus encoder checkpoint") -> Dict:
    """Read a ``torch.save`` checkpoint from bytes with the weights-only loader
    (:func:`vpr_localizer.files.torch_load_weights_only`).

    Raises:
        MapError: pickled objects beyond tensors and plain containers, or unreadable bytes
            (one line naming ``where``).
    """
    from vpr_localizer.files import refused_pickle_message, torch_load_weights_only

    try:
        ckpt = torch_load_weights_only(io.BytesIO(blob))
    except WeightsError as exc:
        raise MapError(refused_pickle_message(where)) from exc
    except Exception as exc:
        raise MapError(f"{where}: cannot read the encoder checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict):
        raise MapError(f"{where}: the encoder checkpoint is a {type(ckpt).__name__}, not a dict")
    return ckpt


def _drop_companion(client, collection: str, uri: str) -> bool:
    """Drop ``collection``'s encoder companion when it is one of ours; True when dropped.

    Raises:
        MapError: a collection of that name exists that is not an encoder companion.
    """
    comp = encoder_collection_name(collection)
    if not client.has_collection(comp):
        return False
    props = {str(k): str(v) for k, v in (client.describe_collection(comp).get("properties") or {}).items()}
    if props.get(PROP_FORMAT) != ENCODER_FORMAT:
        raise MapError(f"milvus collection {comp!r} at {uri} exists but is not the encoder companion of "
                       f"{collection!r} (no {PROP_FORMAT} = {ENCODER_FORMAT}); rename or drop it")
    client.drop_collection(comp)
    return True


def drop_map_collection(uri_or_client, collection: str, uri: Optional[str] = None) -> bool:
    """Drop a map collection and its encoder companion (``<collection>__encoder``).

    Args:
        uri_or_client: milvus uri (:func:`connect`) or an open ``MilvusClient``.
        collection: map collection name.
        uri: the uri, for messages, when a client is given.

    Returns:
        True when the map collection existed (and was dropped).

    Raises:
        MapError: connection / Milvus errors; a collection named like the companion that is not
            one.
    """
    client, uri, owns = _client(uri_or_client, uri)
    try:
        existed = bool(client.has_collection(collection))
        if existed:
            client.drop_collection(collection)
        _drop_companion(client, collection, uri)
        return existed
    except MapError:
        raise
    except Exception as exc:
        raise MapError(f"cannot drop milvus collection {collection!r} at {uri}: {exc}") from exc
    finally:
        if owns:
            client.close()


def _store_encoder(client, collection: str, blob: bytes) -> int:
    """Create the companion collection of ``collection`` holding ``blob``; returns the chunk count."""
    comp = encoder_collection_name(collection)
    ip = client.prepare_index_params()
    ip.add_index(field_name="dummy", index_type="FLAT", metric_type="L2")
    client.create_collection(comp, schema=_encoder_schema(), index_params=ip,
                             properties={PROP_FORMAT: ENCODER_FORMAT, PROP_ENC_OF: collection})
    n = max(1, -(-len(blob) // ENCODER_CHUNK_BYTES))
    rows = [{"chunk": i, "dummy": [0.0, 0.0],
             "data": base64.b64encode(blob[i * ENCODER_CHUNK_BYTES:(i + 1) * ENCODER_CHUNK_BYTES]).decode("ascii")}
            for i in range(n)]
    for start in range(0, n, ENCODER_INSERT_ROWS):
        client.insert(comp, rows[start:start + ENCODER_INSERT_ROWS])
    client.flush(comp)
    return n


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
        build: the exported map's ``map.yaml`` ``build`` section (dict) or None.
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
        self.build = json.loads(self.properties.get(PROP_BUILD, "null"))
        self.ntotal = 0
        self.refresh()

    # ------------------------------------------------------------------------------------------
    # opening / creating
    # ------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, uri_or_client, collection: str, dim: int, fingerprint: Dict, *,
               index_type: str = "FLAT", index_params: Optional[Dict] = None, datum: Optional[Dict] = None,
               source_map: str = "", overwrite: bool = False, search_params: Optional[Dict] = None,
               uri: Optional[str] = None, encoder_checkpoint: Optional[Dict] = None,
               build: Optional[Dict] = None) -> "MilvusIndex":
        """Create an empty map collection (schema, IP vector index, properties) and load it;
        with ``encoder_checkpoint``, also its encoder companion collection (module doc).

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
            overwrite: drop an existing collection of that name (and its encoder companion)
                first.
            search_params: default search parameters (``nprobe``, ``ef``).
            uri: the uri, for messages, when a client is given.
            encoder_checkpoint: the map's encoder checkpoint dict (``VprMap.encoder_checkpoint``,
                tensors / strings / numbers), stored in ``<collection>__encoder``; None: none
                stored (the collection cannot be imported back to a map directory).
            build: the map's ``map.yaml`` ``build`` section (JSON-serialisable dict) or None.

        Raises:
            ValueError: unknown ``index_type``, ``IVF_PQ`` on milvus-lite, or ``dim < 1``.
            MapError: the collection exists and ``overwrite`` is False; a collection named like
                the encoder companion exists that is not one; connection or Milvus errors (bad
                index parameters, ...).  Nothing is left behind on failure.
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
        blob = None if encoder_checkpoint is None else checkpoint_to_bytes(encoder_checkpoint)
        created = False
        try:
            if client.has_collection(collection):
                if not overwrite:
                    raise MapError(f"milvus collection {collection!r} already exists at {uri} "
                                   f"(use overwrite / --overwrite to replace it)")
                client.drop_collection(collection)
            if _drop_companion(client, collection, uri):  # an orphan of an interrupted create, or overwrite
                LOG.info("dropped the encoder companion %r of %r at %s", encoder_collection_name(collection),
                         collection, uri)
            schema = collection_schema(dim, description="vpr_localizer map keyframes")
            ip = client.prepare_index_params()
            ip.add_index(field_name=DESCRIPTOR_FIELD, index_type=index_type, metric_type="IP",
                         params=dict(index_params or {}))
            props = {PROP_FORMAT: COLLECTION_FORMAT, PROP_VERSION: str(COLLECTION_FORMAT_VERSION),
                     PROP_DIM: str(int(dim)), PROP_ENCODER: json.dumps(_canonical(fingerprint), sort_keys=True),
                     PROP_DATUM: json.dumps(_canonical(datum)), PROP_SOURCE: str(source_map),
                     PROP_BUILD: json.dumps(_canonical(build), sort_keys=True)}
            if blob is not None:
                props.update({PROP_ENC_SHA: hashlib.sha256(blob).hexdigest(), PROP_ENC_BYTES: str(len(blob)),
                              PROP_ENC_CHUNKS: str(max(1, -(-len(blob) // ENCODER_CHUNK_BYTES)))})
            client.create_collection(collection, schema=schema, index_params=ip, properties=props)
            created = True
            if blob is not None:
                _store_encoder(client, collection, blob)
        except Exception as exc:
            if created:  # leave nothing half made
                try:
                    client.drop_collection(collection)
                    _drop_companion(client, collection, uri)
                except Exception as exc2:  # the original error matters more
                    LOG.warning("cannot drop the half-created collection %r at %s: %s", collection, uri, exc2)
            if owns:
                client.close()
            if isinstance(exc, MapError):
                raise
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
            keyframes: ``N`` :class:`~vpr_localizer.mapping.store.Keyframe` (or objects with
                some of its attributes: ``stamp`` seconds; ``x, y, z`` metres; ``qx..qw``;
                ``lat, lon`` degrees, ``alt`` metres; ``frame`` int; ``image_path, place_id,
                sequence, condition`` str), or None.  Missing attributes take the Keyframe
                defaults; ``None`` values become NaN / -1 / ''.
            ids: ``N`` int64 keyframe ids; default the keyframes' ``id`` attributes, else
                ``ntotal .. ntotal + N - 1``.
            robot_id: stored in every row (at most 256 characters).
            flush: persist the rows (``flush``) before returning.

        Returns:
            ``(N,)`` int64 ids inserted.

        Raises:
            ValueError: bad ``descriptors`` (dtype, shape, dimension, NaN), ``keyframes`` or
                ``ids`` of another length, ``robot_id`` or a keyframe text field longer than its
                VARCHAR (:data:`TEXT_FIELDS`).
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
        if len(str(robot_id).encode("utf-8")) > ROBOT_ID_MAX_LENGTH:
            raise ValueError(f"robot_id longer than {ROBOT_ID_MAX_LENGTH} bytes (UTF-8)")
        rid = str(robot_id)
        defaults = _keyframe_scalars(None)
        if keyframes is not None:  # checked before anything is inserted
            for r, kf in enumerate(keyframes):
                for name, length in TEXT_FIELDS.items():
                    v = getattr(kf, name, None) if name != "robot_id" else None
                    if v is not None and len(str(v).encode("utf-8")) > length:  # Milvus: VARCHAR bytes
                        raise ValueError(f"keyframe {int(ids[r])}: {name} longer than {length} bytes (UTF-8)")

        batch = max(1, INSERT_BATCH_BYTES // (4 * self.d))
        try:
            for start in range(0, n, batch):
                rows = []
                for r in range(start, min(n, start + batch)):
                    sc = defaults if keyframes is None else _keyframe_scalars(keyframes[r])
                    rows.append({"id": int(ids[r]), DESCRIPTOR_FIELD: x[r], **sc, "robot_id": rid})
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
            Columns, each ``(N,)``: ``id`` int64; ``stamp`` (s), ``x, y, z`` (m), ``qx, qy, qz,
            qw``, ``lat, lon`` (deg), ``alt`` (m) float64 (NaN kept); ``frame`` int64;
            ``image_path, place_id, sequence, condition, robot_id`` object (str); and
            ``descriptor`` ``(N, D)`` float32 when asked for.  :func:`rows_to_keyframes` turns
            them into :class:`~vpr_localizer.mapping.store.Keyframe`.

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
        for name in FLOAT_FIELDS:
            out[name] = np.array([r[name] for r in rows], np.float64).reshape(-1)
        for name in INT_FIELDS:
            out[name] = np.array([r[name] for r in rows], np.int64).reshape(-1)
        for name in TEXT_FIELDS:
            col = np.empty(len(rows), object)
            col[:] = [str(r[name]) for r in rows]
            out[name] = col
        if with_descriptors:
            out[DESCRIPTOR_FIELD] = np.array([np.asarray(r[DESCRIPTOR_FIELD], np.float32) for r in rows],
                                             np.float32).reshape(-1, self.d)
        return out


    def has_encoder_checkpoint(self) -> bool:
        """True when the collection was created with an encoder checkpoint (``vpr.encoder_sha256``)."""
        return PROP_ENC_SHA in self.properties

    def encoder_checkpoint(self) -> Dict:
        """The encoder checkpoint stored with the collection (module doc), checked and loaded
        with the weights-only loader.

        Returns:
            The checkpoint dict (as ``VprMap.encoder_checkpoint``: tensors, strings, numbers).

        Raises:
            MapError: one line naming the collection: no checkpoint stored (a collection created
                without one, e.g. by the ``map_builder`` node), the companion collection is
                missing, chunks are missing or extra, the bytes' size or SHA-256 differs from the
                stored one (tampered / truncated), or the bytes are not a weights-only
                checkpoint.
        """
        where = f"milvus collection {self.collection!r} at {self.uri}"
        comp = encoder_collection_name(self.collection)
        if not self.has_encoder_checkpoint():
            raise MapError(f"{where} holds no encoder checkpoint (created without one, e.g. by map_builder); "
                           f"export it from a map directory with vpr-localizer map-export")
        try:
            want_sha = self.properties[PROP_ENC_SHA]
            want_bytes = int(self.properties.get(PROP_ENC_BYTES, "-1"))
            want_chunks = int(self.properties.get(PROP_ENC_CHUNKS, "-1"))
        except ValueError as exc:
            raise MapError(f"{where}: corrupt encoder properties ({exc})") from exc
        try:
            if not self.client.has_collection(comp):
                raise MapError(f"{where}: its encoder checkpoint is missing (no companion collection {comp!r})")
            self.client.load_collection(comp)
            rows = self.client.query(comp, filter="chunk >= 0", output_fields=["chunk", "data"],
                                     limit=min(max(want_chunks, 0) + 1, MAX_TOPK))
        except MapError:
            raise
        except Exception as exc:
            raise MapError(f"{where}: cannot read its encoder checkpoint from {comp!r}: {exc}") from exc
        rows.sort(key=lambda r: int(r["chunk"]))
        got = [int(r["chunk"]) for r in rows]
        if got != list(range(want_chunks)):
            missing = sorted(set(range(want_chunks)) - set(got))
            extra = sorted(set(got) - set(range(want_chunks)))
            raise MapError(f"{where}: encoder checkpoint incomplete in {comp!r}: {want_chunks} chunks stored, "
                           f"{len(got)} found (missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
                           f"{f', unexpected {extra[:10]}' if extra else ''})")
        try:
            blob = b"".join(base64.b64decode(r["data"], validate=True) for r in rows)
        except (ValueError, TypeError) as exc:
            raise MapError(f"{where}: encoder checkpoint corrupt in {comp!r} (bad base64: {exc})") from exc
        sha = hashlib.sha256(blob).hexdigest()
        if len(blob) != want_bytes or sha != want_sha:
            raise MapError(f"{where}: encoder checkpoint corrupt in {comp!r}: {len(blob)} bytes, SHA-256 "
                           f"{sha[:12]}.. but the collection records {want_bytes} bytes, {want_sha[:12]}..")
        return checkpoint_from_bytes(blob, f"{where} (encoder checkpoint)")


def _keyframe_scalars(kf) -> Dict[str, Any]:
    """The scalar columns (all but id, descriptor, robot_id) of one keyframe-like object or None."""
    row: Dict[str, Any] = {}
    for name in FLOAT_FIELDS:
        v = _KF_DEFAULTS[name] if kf is None else getattr(kf, name, _KF_DEFAULTS[name])
        row[name] = math.nan if v is None else float(v)
    for name in INT_FIELDS:
        v = _KF_DEFAULTS[name] if kf is None else getattr(kf, name, _KF_DEFAULTS[name])
        row[name] = -1 if v is None or (isinstance(v, float) and not math.isfinite(v)) else int(v)
    for name in TEXT_FIELDS:
        if name == "robot_id":
            continue
        v = _KF_DEFAULTS[name] if kf is None else getattr(kf, name, _KF_DEFAULTS[name])
        row[name] = "" if v is None else str(v)
    return row


def rows_to_keyframes(rows: Dict[str, np.ndarray], ids: Optional[Sequence[int]] = None) -> List[Keyframe]:
    """:class:`~vpr_localizer.mapping.store.Keyframe` objects from :meth:`MilvusIndex.fetch` columns.

    Args:
        rows: fetched columns (``N`` rows; ``descriptor`` and ``robot_id`` ignored).
        ids: ``N`` new keyframe ids; default the rows' ``id``.

    Returns:
        ``N`` keyframes in row order (floats as Python ``float``, NaN kept; ``frame`` int; text str).

    Raises:
        ValueError: ``ids`` of another length.
    """
    n = len(rows["id"])
    ids = rows["id"] if ids is None else np.asarray(list(ids), np.int64)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} rows")
    out = []
    for r in range(n):
        kw: Dict[str, Any] = {"id": int(ids[r])}
        kw.update({name: float(rows[name][r]) for name in FLOAT_FIELDS})
        kw.update({name: int(rows[name][r]) for name in INT_FIELDS})
        kw.update({name: str(rows[name][r]) for name in TEXT_FIELDS if name != "robot_id"})
        out.append(Keyframe(**kw))
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
    Milvus collection: descriptors, every keyframe field, the encoder fingerprint, the ENU datum,
    the ``build`` section and the encoder checkpoint (companion collection ``<collection>__encoder``),
    so that :func:`import_milvus_to_map` rebuilds the map directory.  Patch-NetVLAD descriptors
    (``build-map --patches``) are not exported (a warning is logged).

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
        ValueError: unknown ``index_type``; a keyframe text field longer than its VARCHAR.
    """
    from vpr_localizer.mapping.store import VprMap

    vmap = map_dir if isinstance(map_dir, VprMap) else VprMap.load(str(map_dir))
    x = map_descriptors(vmap.index)
    datum = None
    if vmap.datum is not None:
        datum = {k: float(getattr(vmap.datum, k)) for k in ("lat", "lon", "alt") if hasattr(vmap.datum, k)}
    if getattr(vmap, "patches", None) is not None:
        LOG.warning("map %s has Patch-NetVLAD descriptors: they are not exported to milvus (global "
                    "descriptors, keyframes and encoder only)", vmap.path)
    idx = MilvusIndex.create(uri_or_client, collection, x.shape[1], vmap.fingerprint, index_type=index_type,
                             index_params=index_params, datum=datum, source_map=str(vmap.path),
                             overwrite=overwrite, search_params=search_params,
                             uri=uri_or_client if isinstance(uri_or_client, str) else None,
                             encoder_checkpoint=vmap.encoder_checkpoint, build=(vmap.meta or {}).get("build"))
    try:
        idx.add(x, vmap.keyframes, robot_id=robot_id)
    except Exception:
        try:  # leave no partial collection behind
            drop_map_collection(idx.client, collection, idx.uri)
        except MapError as exc2:
            LOG.warning("%s", exc2)
        idx.close()
        raise
    if idx.ntotal != len(vmap):
        n = idx.ntotal
        idx.close()
        raise MapError(f"milvus collection {collection!r} holds {n} rows after exporting {len(vmap)} keyframes")
    LOG.info("exported %d keyframes of %s to milvus collection %r at %s (%s/IP)", len(vmap), vmap.path,
             collection, idx.uri, idx.index_type)
    return idx


def import_milvus_to_map(uri_or_client, collection: str, out_dir, overwrite: bool = False,
                         robot_id: Optional[str] = None) -> Dict[str, Any]:
    """Write a map directory from a map collection (the reverse of :func:`export_map_to_milvus`).

    All rows are fetched (only those of ``robot_id`` when given), sorted by id, and written with
    :func:`vpr_localizer.mapping.store.write_map` (atomic): the keyframes with every field, an
    exact ``faiss.IndexFlatIP`` of the descriptors (whatever Milvus index the collection has),
    the encoder checkpoint stored with the collection (:meth:`MilvusIndex.encoder_checkpoint`),
    the encoder fingerprint, the ENU datum and the ``build`` section; ``map.yaml`` also gets a
    ``milvus_import`` section (uri, collection, robot_id, renumbered).  The map's keyframe ids
    must be ``0..N-1``: when the collection's sorted ids are not (a fleet collection with gaps, or
    a ``robot_id`` filter), the keyframes are renumbered in id order and a warning says so.

    Args:
        uri_or_client: milvus uri (:func:`connect`) or an open ``MilvusClient``.
        collection: map collection name.
        out_dir: map directory to write.
        overwrite: replace an existing map directory (only a map directory is ever replaced,
            :func:`~vpr_localizer.mapping.store.check_map_target`).
        robot_id: keep only the rows of this robot; None = all rows.

    Returns:
        ``{"map": absolute path, "rows": N, "dim": D, "collection", "uri", "robot_id",
        "renumbered": bool}``.

    Raises:
        MapError: ``out_dir`` exists and ``overwrite`` is False (checked before reading
            anything), or is not a map directory; no such collection / not a map collection;
            no rows (for ``robot_id``); no, incomplete or tampered encoder checkpoint; Milvus or
            write errors.  Every message is one line.
    """
    import os

    from vpr_localizer.geodesy import EnuDatum
    from vpr_localizer.mapping.index import build_index
    from vpr_localizer.mapping.store import check_map_target, write_map

    out_dir = os.path.abspath(str(out_dir))
    check_map_target(out_dir, overwrite)
    idx = MilvusIndex.open(uri_or_client, collection, None,
                           uri=uri_or_client if isinstance(uri_or_client, str) else None)
    where = f"milvus collection {collection!r} at {idx.uri}"
    try:
        ckpt = idx.encoder_checkpoint()
        rows = idx.fetch()
    finally:
        idx.close()
    n_all = len(rows["id"])
    if robot_id is not None:
        keep = np.array([r == str(robot_id) for r in rows["robot_id"]], bool)
        if not keep.any():
            robots = sorted(set(map(str, rows["robot_id"])))
            raise MapError(f"{where} holds no keyframes of robot {robot_id!r} ({n_all} rows of robots "
                           f"{', '.join(map(repr, robots[:10])) or 'none'})")
        rows = {k: v[keep] for k, v in rows.items()}
    n = len(rows["id"])
    if n == 0:
        raise MapError(f"{where} holds no keyframes: nothing to import")
    renumbered = not np.array_equal(rows["id"], np.arange(n))
    if renumbered:
        why = f"robot_id {robot_id!r} filter" if robot_id is not None else "gaps in the collection's ids"
        LOG.warning("%s: %d rows with ids %d..%d (%s) renumbered 0..%d in id order", where, n,
                    int(rows["id"][0]), int(rows["id"][-1]), why, n - 1)
    keyframes = rows_to_keyframes(rows, ids=range(n))
    index = build_index(rows[DESCRIPTOR_FIELD], "flat")
    datum = None
    if idx.datum:
        datum = EnuDatum(float(idx.datum["lat"]), float(idx.datum["lon"]), float(idx.datum.get("alt", 0.0)))
    extra: Dict[str, Any] = {"milvus_import": {"uri": str(idx.uri), "collection": collection,
                                               "robot_id": robot_id, "renumbered": bool(renumbered)}}
    if idx.build:
        extra = {"build": idx.build, **extra}
    path = write_map(out_dir, keyframes, index, ckpt, idx.fingerprint, datum, extra=extra, overwrite=overwrite)
    LOG.info("imported %d keyframes of %s into map %s", n, where, path)
    return {"map": path, "rows": n, "dim": int(index.d), "collection": collection, "uri": str(idx.uri),
            "robot_id": robot_id, "renumbered": bool(renumbered)}


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
