"""``vpr-localizer map-export`` / ``map-import``: map directory <-> Milvus collection.

    vpr-localizer map-export --map DIR --milvus-uri FILE.db --collection NAME
        [--robot-id R] [--index-type FLAT|IVF_FLAT|IVF_SQ8|IVF_PQ|HNSW|HNSW_SQ|AUTOINDEX]
        [--index-param nlist=64 ...] [--overwrite]
    vpr-localizer map-import --milvus-uri FILE.db --collection NAME --out DIR
        [--robot-id R] [--overwrite]

``--milvus-uri`` is a milvus-lite database file (``*.db``, created when missing) or a Milvus
server (``http://host:19530``); milvus-lite builds every index type but IVF_PQ.  map-export
copies the descriptors, every keyframe field, the encoder fingerprint, datum and the encoder
checkpoint (companion collection ``NAME__encoder``); map-import writes them back as a map
directory (exact FAISS flat index; ``--robot-id`` keeps one robot's keyframes, renumbered).
Each prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

from vpr_localizer.errors import ConfigError


def _parse_params(items: Optional[List[str]]) -> Dict:
    """``["nlist=64", "M=16"]`` -> ``{"nlist": 64, "M": 16}`` (values parsed as JSON when they can be).

    Raises:
        ConfigError: an item without ``=``.
    """
    out: Dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--index-param {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def add_map_export_parser(sub) -> argparse.ArgumentParser:
    """Register the ``map-export`` subcommand on an argparse subparsers object."""
    from vpr_localizer.mapping.milvus_index import INDEX_TYPES

    m = sub.add_parser("map-export", help="copy a map directory into a Milvus (milvus-lite) collection",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--map", required=True, help="map directory")
    m.add_argument("--milvus-uri", required=True, help="milvus-lite file (*.db) or http://host:19530")
    m.add_argument("--collection", required=True, help="collection name to create")
    m.add_argument("--robot-id", default="", help="robot id stored with every keyframe")
    m.add_argument("--index-type", default="FLAT", type=str.upper, choices=list(INDEX_TYPES),
                   help="Milvus vector index (metric IP); default FLAT = exact")
    m.add_argument("--index-param", action="append", metavar="KEY=VALUE",
                   help="vector index build parameter, repeatable (nlist, m, nbits, M, efConstruction)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing collection of that name")
    m.set_defaults(func=run_map_export)
    return m


def add_map_import_parser(sub) -> argparse.ArgumentParser:
    """Register the ``map-import`` subcommand on an argparse subparsers object."""
    m = sub.add_parser("map-import", help="write a map directory from a Milvus (milvus-lite) collection",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--milvus-uri", required=True, help="milvus-lite file (*.db) or http://host:19530")
    m.add_argument("--collection", required=True, help="map collection to read")
    m.add_argument("--out", required=True, help="map directory to write")
    m.add_argument("--robot-id", default=None, help="import only this robot's keyframes (renumbered 0..N-1)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing map directory at --out")
    m.set_defaults(func=run_map_import)
    return m


def run_map_export(args) -> int:
    """Execute ``map-export``; returns the exit status (0).

    Raises:
        MapError: unreadable map, existing collection without ``--overwrite``, Milvus errors.
        ConfigError: malformed ``--index-param``.
    """
    from vpr_localizer.mapping.milvus_index import export_map_to_milvus

    params = _parse_params(args.index_param)
    idx = export_map_to_milvus(args.map, args.milvus_uri, args.collection, robot_id=args.robot_id,
                               index_type=args.index_type, index_params=params, overwrite=args.overwrite)
    try:
        print(json.dumps({"collection": idx.collection, "uri": idx.uri, "rows": idx.ntotal, "dim": idx.d,
                          "index_type": idx.index_type, "map": args.map}))
    finally:
        idx.close()
    return 0


def run_map_import(args) -> int:
    """Execute ``map-import``; prints one JSON line (map, rows, dim, collection, uri, robot_id,
    renumbered) and returns the exit status (0).

    Raises:
        MapError: ``--out`` exists without ``--overwrite`` (or is not a map directory), no such
            collection, no encoder checkpoint stored / tampered, no rows for ``--robot-id``,
            Milvus or write errors.
    """
    import os

    from vpr_localizer.mapping.milvus_index import import_milvus_to_map

    uri = args.milvus_uri
    if uri.endswith(".db") and not os.path.exists(uri):  # milvus-lite would create an empty database
        from vpr_localizer.errors import MapError

        raise MapError(f"milvus-lite database not found: {uri}")
    info = import_milvus_to_map(uri, args.collection, args.out, overwrite=args.overwrite, robot_id=args.robot_id)
    print(json.dumps(info))
    return 0
