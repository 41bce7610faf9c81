"""The geotagged image map on disk (the README's "Map format").

A map is a directory::

    map.yaml          format version, encoder fingerprint, ENU datum, counts, file sizes + SHA-256
    keyframes.sqlite  one row per keyframe (id, stamp, x/y/z, orientation, lat/lon/alt, image, tags)
    index.faiss       FAISS index of the global descriptors (row i = keyframe id i)
    encoder.pt        the encoder's aggregator + PCA (torch, loaded with weights_only=True)
    patches.npy, patch_offsets.npy, patch_pca.npz
                      optional (``build-map --patches``): Patch-NetVLAD descriptors of every
                      keyframe (float16, memory-mapped) and the patch PCA, described by the
                      ``patches`` section of map.yaml (:mod:`vpr_localizer.mapping.patches`)

It is written atomically: everything goes to a temporary sibling directory
(``.NAME.tmp-PID``) which is then renamed into place, so a reader never sees a half-written map.
Replacing a map moves the previous one aside first (``.NAME.old-PID``); should the process die
between the two renames, the next :meth:`VprMap.load` or :func:`write_map` of that path puts the
previous map back (:func:`recover_interrupted_replace`), and every save removes the temporary and
backup siblings left by processes that are gone (:func:`clean_stale_siblings`). Only a map
directory is ever replaced: ``overwrite`` refuses any other file or folder
(:func:`check_map_target`). Loading checks every file against the sizes and hashes in
``map.yaml`` and the keyframe count against the index, so a truncated or mixed-up map is one
clear :class:`~vpr_localizer.errors.MapError`.

A map can also grow in place (:class:`vpr_localizer.mapping.append.MapAppender`, the live
``map_builder`` node's periodic flushes): new keyframes are appended to ``keyframes.sqlite`` and
their descriptors to ``descriptors_tail.f32`` (raw float32 rows after the ``index.faiss`` ones),
and ``map.yaml`` is replaced last. Such files have ``files`` entries that cover a prefix only:

``{rows: N, rows_sha256: H}``
    ``keyframes.sqlite`` holds the map's keyframes as its rows with ids ``0..N-1``; ``H`` is
    :func:`rows_sha256` of those rows. Rows with larger ids (an interrupted append) are ignored.
``{bytes: B, sha256: H, append: true}``
    the map is the first ``B`` bytes of the file (SHA-256 ``H``); the file may be longer.

so that the directory is a complete map at every instant: the previous ``map.yaml`` still
describes the previous keyframes while the files grow.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from vpr_localizer.errors import FingerprintMismatchError, MapError, WeightsError
from vpr_localizer.mapping.fingerprint import fingerprint_diffs
from vpr_localizer.files import sha256_file, torch_load_weights_only
from vpr_localizer.geodesy import EnuDatum
from vpr_localizer.mapping.patches import MapPatches, check_patch_config

FORMAT_VERSION = 1
MAP_YAML = "map.yaml"
KEYFRAMES_DB = "keyframes.sqlite"
INDEX_FILE = "index.faiss"
ENCODER_FILE = "encoder.pt"
TAIL_FILE = "descriptors_tail.f32"   # descriptors appended after index.faiss (raw float32 rows)
SQLITE_TIMEOUT_S = 10.0              # wait for a writer's lock on keyframes.sqlite

LOG = logging.getLogger(__name__)

_WRITING: set = set()          # absolute map paths this process is writing right now
_WRITING_LOCK = threading.Lock()
SWAP_WAIT_S = 1.0              # how long to let a live writer finish its two renames before recovering


@dataclass
class Keyframe:
    """One map image.

    Attributes:
        id: row number in the FAISS index (0..N-1).
        stamp: seconds (NaN when unknown).
        x, y, z: position in the ``map`` frame, metres (NaN when unknown; ENU when geotagged).
        qx, qy, qz, qw: orientation in the map frame (identity when unknown).
        lat, lon: WGS84 degrees, alt metres (NaN when unknown).
        frame: frame index (-1 when unknown).
        image_path: source image.
        place_id, sequence, condition: tags ('' when unknown).
    """

    id: int
    stamp: float = math.nan
    x: float = math.nan
    y: float = math.nan
    z: float = math.nan
    qx: float = 0.0
    qy: float = 0.0
    qz: float = 0.0
    qw: float = 1.0
    lat: float = math.nan
    lon: float = math.nan
    alt: float = math.nan
    frame: int = -1
    image_path: str = ""
    place_id: str = ""
    sequence: str = ""
    condition: str = ""


_COLUMNS = [f.name for f in fields(Keyframe)]
_SQL_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}


def _write_keyframes(path: str, keyframes: Sequence[Keyframe]) -> None:
    con = sqlite3.connect(path)
    try:
        cols = ", ".join(f"{f.name} {_SQL_TYPES[f.type if isinstance(f.type, str) else f.type.__name__]}"
                         + (" PRIMARY KEY" if f.name == "id" else "") for f in fields(Keyframe))
        con.execute(f"CREATE TABLE keyframes ({cols})")
        con.executemany(f"INSERT INTO keyframes ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                        [tuple(getattr(k, c) for c in _COLUMNS) for k in keyframes])
        con.commit()
    finally:
        con.close()


_TEXT_COLUMNS = ("image_path", "place_id", "sequence", "condition")


def rows_sha256(rows, h=None):
    """Content hash of keyframe rows as ``SELECT <columns> ... ORDER BY id`` returns them.

    Args:
        rows: tuples of the :class:`Keyframe` columns, in id order.
        h: a running ``hashlib.sha256`` object to update (the rows continue those it has seen),
            or None for a new one.

    Returns:
        The updated hash object (``.hexdigest()`` is the ``rows_sha256`` of ``map.yaml``).
    """
    h = hashlib.sha256() if h is None else h
    for row in rows:
        h.update(repr(tuple(row)).encode("utf-8") + b"\n")
    return h


def _rollback_hot_journal(path: str) -> bool:
    """Roll back what a writer killed inside a transaction left in ``path`` (a read-only SQLite
    connection cannot): open it read-write once. Returns True when a journal was rolled back."""
    if not os.path.exists(path + "-journal"):
        return False
    con = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchall()
    finally:
        con.close()
    LOG.warning("%s: rolled back the transaction of an interrupted keyframe append", path)
    return True


def select_keyframe_rows(path: str, count: Optional[int] = None) -> List[Tuple]:
    """Raw keyframe rows of ``keyframes.sqlite`` ``path`` in id order: all of them, or those with
    ``id < count``.

    A transaction left behind by a writer killed in the middle of an append (a hot journal) is
    rolled back first (this needs write access to the map directory).

    Raises:
        MapError: not a readable keyframe database (names ``path``).
    """
    sql = f"SELECT {', '.join(_COLUMNS)} FROM keyframes" + (" WHERE id < ?" if count is not None else "") \
        + " ORDER BY id"
    args = (int(count),) if count is not None else ()
    for attempt in (0, 1):
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S)
            try:
                return con.execute(sql, args).fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            if attempt == 0 and isinstance(exc, sqlite3.OperationalError):
                try:
                    if _rollback_hot_journal(path):
                        continue
                except sqlite3.Error:
                    pass
            raise MapError(f"{path}: cannot read keyframes ({exc})") from exc
    raise AssertionError("unreachable")


def _keyframes_from_rows(rows) -> List[Keyframe]:
    out = []
    for row in rows:
        vals = {c: (math.nan if v is None and c not in _TEXT_COLUMNS else ("" if v is None else v))
                for c, v in zip(_COLUMNS, row)}
        out.append(Keyframe(**vals))
    return out


def _read_keyframes(path: str) -> List[Keyframe]:
    return _keyframes_from_rows(select_keyframe_rows(path))


def sha256_prefix(path: str, nbytes: int, h=None, chunk: int = 1 << 20):
    """Running SHA-256 of the first ``nbytes`` bytes of file ``path`` (fewer if it is shorter).

    Returns:
        ``(hash object, bytes read)``; ``h`` is updated when given.
    """
    h = hashlib.sha256() if h is None else h
    done = 0
    with open(path, "rb") as f:
        while done < nbytes:
            block = f.read(min(chunk, nbytes - done))
            if not block:
                break
            h.update(block)
            done += len(block)
    return h, done


def entry_kind(info) -> Optional[str]:
    """Kind of a ``files`` entry of ``map.yaml``: ``'file'`` (``bytes`` + ``sha256`` of the whole
    file), ``'prefix'`` (the same plus ``append: true``: the first ``bytes`` bytes), ``'rows'``
    (``rows`` + ``rows_sha256``: the keyframe rows with ids below ``rows``), or None when malformed."""
    if not isinstance(info, dict):
        return None
    if "rows" in info:
        ok = (isinstance(info.get("rows"), int) and not isinstance(info["rows"], bool) and info["rows"] >= 0
              and isinstance(info.get("rows_sha256"), str))
        return "rows" if ok else None
    if not (isinstance(info.get("bytes"), int) and not isinstance(info["bytes"], bool) and info["bytes"] >= 0
            and isinstance(info.get("sha256"), str)):
        return None
    append = info.get("append", False)
    if not isinstance(append, bool):
        return None
    return "prefix" if append else "file"


# --------------------------------------------------------------------------------------------
# replacing a map safely: what may be overwritten, recovery after a crash, stale siblings
# --------------------------------------------------------------------------------------------

def _read_map_yaml(path: str) -> Optional[Dict]:
    """``map.yaml`` of directory ``path`` when it parses as a vpr_localizer map, else None."""
    meta_path = os.path.join(path, MAP_YAML)
    if not (os.path.isdir(path) and os.path.isfile(meta_path)):
        return None
    try:
        with open(meta_path) as f:
            meta = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != "vpr_localizer.map":
        return None
    return meta


def is_map_dir(path: str) -> bool:
    """True when ``path`` is a directory whose ``map.yaml`` parses as a vpr_localizer map (its
    other files are not checked: a truncated map still counts, so that it can be replaced)."""
    return _read_map_yaml(path) is not None


def _is_complete_map(path: str) -> bool:
    """A map directory holding every file its ``map.yaml`` lists, at the listed size (at least
    that size for an appended file; no hashes)."""
    meta = _read_map_yaml(path)
    files = None if meta is None else meta.get("files")
    if not isinstance(files, dict) or not all(n in files for n in (KEYFRAMES_DB, INDEX_FILE, ENCODER_FILE)):
        return False
    for name, info in files.items():
        fp = confined_map_file(path, name)
        kind = entry_kind(info)
        if fp is None or kind is None or not os.path.isfile(fp):
            return False
        size = os.path.getsize(fp)
        if (kind == "file" and size != info["bytes"]) or (kind == "prefix" and size < info["bytes"]):
            return False
    return True


def confined_map_file(path: str, name) -> Optional[str]:
    """The file ``name`` of map directory ``path`` when ``name`` (a ``files`` entry of
    ``map.yaml``) is a plain file name inside the map directory, else None.

    Refused: a non-string or empty name, an absolute path, any path separator (``a/b``,
    ``../x``), ``.`` / ``..``, and a name that resolves (through symbolic links) outside
    ``path``: ``map.yaml`` must never make the loader stat, hash or open another file.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or "\0" in name:
        return None
    if os.path.isabs(name) or os.path.basename(name) != name or (os.altsep and os.altsep in name):
        return None
    fp = os.path.join(path, name)
    root = os.path.realpath(path)
    if os.path.dirname(os.path.realpath(fp)) != root:
        return None
    return fp


#: fingerprint fields ``encoder_for_map`` rebuilds the encoder from: name -> (check, what is expected)
_FINGERPRINT_FIELDS = {
    "backbone": (lambda v: isinstance(v, str) and bool(v), "a backbone name"),
    "preprocessing": (lambda v: isinstance(v, str) and bool(v), "a preprocessing name"),
    "aggregator": (lambda v: isinstance(v, str) and bool(v), "an aggregator name"),
    "image_size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                   and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v),
                   "[W, H], two positive integers"),
    "num_clusters": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                     "an integer >= 0"),
}
_GUIDANCE_FLAGS = ("static_mask", "seg_stream", "attention")


def check_encoder_section(where: str, fingerprint) -> Dict:
    """Check the ``encoder`` section (fingerprint) of a ``map.yaml``.

    Args:
        where: the ``map.yaml`` path (or the map), for the message.
        fingerprint: the parsed section.

    Returns:
        ``fingerprint``.

    Raises:
        MapError: one line naming ``where`` and the bad field: the section is not a mapping, one
            of backbone / preprocessing / aggregator / image_size / num_clusters is missing or of
            the wrong type, or a ``guidance`` section lacks its flags, segmentation backend or
            segmentation size.
    """
    if not isinstance(fingerprint, dict):
        raise MapError(f"{where}: no encoder fingerprint ('encoder' must be a mapping, "
                       f"got {type(fingerprint).__name__})")
    for key, (ok, what) in _FINGERPRINT_FIELDS.items():
        if key not in fingerprint:
            raise MapError(f"{where}: the 'encoder' section has no '{key}'")
        if not ok(fingerprint[key]):
            raise MapError(f"{where}: 'encoder.{key}' must be {what}, got {fingerprint[key]!r}")
    guidance = fingerprint.get("guidance")
    if guidance is None:
        return fingerprint
    if not isinstance(guidance, dict):
        raise MapError(f"{where}: 'encoder.guidance' must be a mapping, got {type(guidance).__name__}")
    for key in _GUIDANCE_FLAGS:
        if not isinstance(guidance.get(key), bool):
            raise MapError(f"{where}: 'encoder.guidance.{key}' must be true or false, got {guidance.get(key)!r}")
    if guidance["static_mask"] or guidance["seg_stream"]:
        if not (isinstance(guidance.get("segmentation"), str) and guidance["segmentation"]):
            raise MapError(f"{where}: 'encoder.guidance.segmentation' must be a backend name, "
                           f"got {guidance.get('segmentation')!r}")
        size = guidance.get("segmentation_size")
        if not _FINGERPRINT_FIELDS["image_size"][0](size):
            raise MapError(f"{where}: 'encoder.guidance.segmentation_size' must be [W, H], two positive "
                           f"integers, got {size!r}")
    return fingerprint


def check_build_section(where: str, build) -> Dict:
    """Check the optional ``build`` section of a ``map.yaml``.

    Returns:
        The section, ``{}`` when absent (None).

    Raises:
        MapError: one line naming ``where``: ``build`` is not a mapping, or its ``weights`` /
            ``segmentation_weights`` is neither a path (string) nor null.
    """
    if build is None:
        return {}
    if not isinstance(build, dict):
        raise MapError(f"{where}: 'build' must be a mapping, got {type(build).__name__}")
    for key in ("weights", "segmentation_weights"):
        if build.get(key) is not None and not isinstance(build[key], str):
            raise MapError(f"{where}: 'build.{key}' must be a file path, got {build[key]!r}")
    return build


def datum_from_meta(where: str, datum) -> Optional[EnuDatum]:
    """The ENU datum of a ``map.yaml`` ``datum`` entry (None / empty: not geotagged).

    Raises:
        MapError: one line naming ``where``: ``datum`` is not a mapping, lacks ``lat`` or
            ``lon``, has unknown keys, or a value that is not a finite number.
    """
    if not datum:
        return None
    if not isinstance(datum, dict):
        raise MapError(f"{where}: 'datum' must be a mapping with lat, lon, alt, got {type(datum).__name__}")
    unknown = sorted(str(k) for k in datum if k not in ("lat", "lon", "alt"))
    if unknown:
        raise MapError(f"{where}: 'datum' has unknown key(s) {', '.join(unknown)} (expected lat, lon, alt)")
    for key in ("lat", "lon"):
        if key not in datum:
            raise MapError(f"{where}: 'datum' has no '{key}'")
    for key, v in datum.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MapError(f"{where}: 'datum.{key}' must be a finite number, got {v!r}")
    return EnuDatum(**{k: float(v) for k, v in datum.items()})


def _pid_alive(pid: int) -> bool:
    """``os.kill(pid, 0)``: False only when no such process exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, it is someone else's
        return True
    return True


def _siblings(path: str) -> List[Tuple[str, str, int]]:
    """``(sibling path, 'tmp' | 'old', pid)`` of every ``.NAME.tmp-PID`` / ``.NAME.old-PID`` next
    to map ``path`` (absolute)."""
    parent, base = os.path.split(path)
    prefix = f".{base}."
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    out = []
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        kind, sep, pid = name[len(prefix):].partition("-")
        if sep and kind in ("tmp", "old") and pid.isdigit() and int(pid) > 0:
            out.append((os.path.join(parent, name), kind, int(pid)))
    return out


def _owner_busy(path: str, pid: int) -> bool:
    """True when process ``pid`` may still be writing map ``path`` (another live process, or this
    one inside :func:`write_map` of ``path``)."""
    if pid == os.getpid():
        with _WRITING_LOCK:
            return path in _WRITING
    return _pid_alive(pid)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _yaml_mtime(path: str) -> float:
    try:
        return os.path.getmtime(os.path.join(path, MAP_YAML))
    except OSError:
        return 0.0


def recover_interrupted_replace(path: str) -> bool:
    """Put back the previous map when a replacement of ``path`` was interrupted.

    :func:`write_map` replaces a map by renaming it aside to ``.NAME.old-PID`` and then renaming
    the new one in; a process killed between the two leaves no map at ``path``. When ``path`` is
    missing and such a sibling holds a complete map (``map.yaml`` and every file it lists, at the
    listed size), the newest one is renamed back to ``path`` with a logged warning. A sibling whose
    writer is still alive gets :data:`SWAP_WAIT_S` to finish its swap first; either way the
    rename cannot clobber a map that appears meanwhile (a directory is never renamed onto a
    non-empty one).

    Args:
        path: map directory.

    Returns:
        True when a previous map was restored.

    Raises:
        MapError: ``path`` is missing, a previous map exists but cannot be renamed back (e.g. a
            read-only parent directory); the message names both paths.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return False
    cands = [(p, pid) for p, kind, pid in _siblings(path) if kind == "old" and _is_complete_map(p)]
    if not cands:
        return False
    if any(_owner_busy(path, pid) for _, pid in cands):
        deadline = time.monotonic() + SWAP_WAIT_S
        while not os.path.lexists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        if os.path.lexists(path):
            return False
    cands.sort(key=lambda c: _yaml_mtime(c[0]), reverse=True)
    for src, pid in cands:
        try:
            os.rename(src, path)
        except FileNotFoundError:
            continue  # someone else restored or removed it meanwhile
        except OSError as exc:
            if os.path.lexists(path):
                return False  # a map appeared meanwhile
            raise MapError(f"map {path} is missing after an interrupted replacement and the previous map "
                           f"{src} cannot be put back ({exc}); rename it to {path} by hand") from exc
        LOG.warning("map %s was missing after an interrupted replacement (process %d): restored the "
                    "previous map from %s", path, pid, src)
        return True
    return False


def clean_stale_siblings(path: str) -> List[str]:
    """Remove the ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of map ``path`` left behind by
    writers that are gone.

    A sibling is stale when process ``PID`` does not exist (``os.kill(PID, 0)``), or is this
    process outside :func:`write_map` of ``path``. Backups (``.old-``) are only removed while a
    map is in place at ``path`` (call :func:`recover_interrupted_replace` first), so the last copy
    of a map is never deleted. Siblings that cannot be removed are logged and kept.

    Args:
        path: map directory.

    Returns:
        The removed paths.
    """
    path = os.path.abspath(path)
    have_map = is_map_dir(path)
    removed = []
    for sib, kind, pid in _siblings(path):
        if (kind == "old" and not have_map) or _owner_busy(path, pid):
            continue
        try:
            _remove(sib)
        except FileNotFoundError:
            continue
        except OSError as exc:
            LOG.warning("cannot remove stale %s: %s", sib, exc)
            continue
        removed.append(sib)
    if removed:
        LOG.info("removed %d stale sibling(s) of map %s: %s", len(removed), path,
                 ", ".join(os.path.basename(r) for r in removed))
    return removed


def check_map_target(path: str, overwrite: bool) -> None:
    """Check that a map may be written at ``path``; first restores a previous map an interrupted
    replacement left aside (:func:`recover_interrupted_replace`).

    Args:
        path: map directory to write.
        overwrite: an existing map at ``path`` may be replaced.

    Raises:
        MapError: ``map already exists: PATH (use --overwrite)`` when something exists at
            ``path`` and ``overwrite`` is False; ``refusing to overwrite PATH: ...`` when
            ``overwrite`` is True but ``path`` is a regular file, or a directory without a
            ``map.yaml`` that parses as a vpr_localizer map (nothing is touched); or the
            :func:`recover_interrupted_replace` error.
    """
    path = os.path.abspath(path)
    recover_interrupted_replace(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise MapError(f"map already exists: {path} (use --overwrite)")
    if not os.path.isdir(path):
        raise MapError(f"refusing to overwrite {path}: it is a file, not a map directory "
                       f"(--overwrite only replaces a map; remove it or choose another path)")
    if not is_map_dir(path):
        why = (f"{MAP_YAML} is not a vpr_localizer map" if os.path.isfile(os.path.join(path, MAP_YAML))
               else f"no {MAP_YAML}")
        raise MapError(f"refusing to overwrite {path}: it is not a map directory ({why}; --overwrite only "
                       f"replaces a map; remove it or choose another path)")


def write_map(path: str, keyframes: Sequence[Keyframe], index, encoder_checkpoint: Dict,
              fingerprint: Dict, datum: Optional[EnuDatum], extra: Optional[Dict] = None,
              overwrite: bool = False, patches: Optional[MapPatches] = None) -> str:
    """Write a map directory atomically.

    Before writing, a previous map an interrupted replacement left aside is put back
    (:func:`recover_interrupted_replace`); before and after, stale temporary / backup siblings of
    dead writers are removed (:func:`clean_stale_siblings`).

    Args:
        path: map directory to create.
        keyframes: ``N`` keyframes with ids ``0..N-1`` in index order.
        index: FAISS index holding the ``N`` descriptors.
        encoder_checkpoint: :meth:`Encoder.checkpoint_state` of the encoder that built the map.
        fingerprint: :meth:`Encoder.fingerprint` of that encoder.
        datum: ENU origin when the map is geotagged, else None.
        extra: more metadata for ``map.yaml`` (e.g. ``build`` info).
        overwrite: replace an existing map at ``path`` (atomically); only a map directory is
            replaced (:func:`check_map_target`).
        patches: the keyframes' Patch-NetVLAD descriptors (one set per keyframe, same order), or
            None: written as ``patches.npy`` / ``patch_offsets.npy`` / ``patch_pca.npz`` with a
            ``patches`` section in ``map.yaml`` (:mod:`vpr_localizer.mapping.patches`).

    Returns:
        ``path``.

    Raises:
        MapError: ``path`` exists and ``overwrite`` is False; ``overwrite`` is True but ``path``
            is a file or a directory that is not a map (nothing is touched); ids/count are
            inconsistent (also the patch sets' count); or writing fails (the previous map, if
            any, stays at ``path``).
    """
    path = os.path.abspath(path)
    if [k.id for k in keyframes] != list(range(len(keyframes))):
        raise MapError("keyframe ids must be 0..N-1 in index order")
    if index.ntotal != len(keyframes):
        raise MapError(f"index holds {index.ntotal} descriptors but {len(keyframes)} keyframes were given")
    if patches is not None and len(patches) != len(keyframes):
        raise MapError(f"{len(patches)} keyframes' patch descriptors for {len(keyframes)} keyframes")
    check_map_target(path, overwrite)
    clean_stale_siblings(path)
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{os.path.basename(path)}.old-{os.getpid()}")
    with _WRITING_LOCK:
        _WRITING.add(path)
    try:
        _write_and_swap(path, tmp, old, keyframes, index, encoder_checkpoint, fingerprint, datum, extra, patches)
    finally:
        with _WRITING_LOCK:
            _WRITING.discard(path)
    clean_stale_siblings(path)
    return path


def _write_and_swap(path, tmp, old, keyframes, index, encoder_checkpoint, fingerprint, datum, extra, patches) -> None:
    """:func:`write_map` once checked: write ``tmp`` fully, move a map at ``path`` aside to ``old``,
    rename ``tmp`` to ``path``, remove ``old``; on failure, remove ``tmp`` and put ``old`` back."""
    import torch

    from vpr_localizer.mapping.index import save_index

    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_keyframes(os.path.join(tmp, KEYFRAMES_DB), keyframes)
        save_index(index, os.path.join(tmp, INDEX_FILE))
        torch.save(encoder_checkpoint, os.path.join(tmp, ENCODER_FILE))
        names = [KEYFRAMES_DB, INDEX_FILE, ENCODER_FILE]
        if patches is not None:
            names += patches.write_files(tmp)
        files = {}
        for name in names:
            fp = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(fp), "sha256": sha256_file(fp)}
        meta = {
            "format": "vpr_localizer.map",
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "frame_id": "map",
            "encoder": fingerprint,
            "datum": None if datum is None else datum.as_dict(),
            "counts": {"keyframes": len(keyframes), "descriptor_dim": int(index.d)},
            "files": files,
        }
        if patches is not None:
            meta["patches"] = patches.section(fingerprint.get("params_sha256"))
        if extra:
            meta.update(extra)
        with open(os.path.join(tmp, MAP_YAML), "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
        for name in os.listdir(tmp):  # flush file contents before the rename makes them visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(path):
            try:
                os.rename(old, path)  # put the previous map back
            except OSError as exc2:
                LOG.error("cannot put the previous map back from %s to %s (%s): the next load or save "
                          "of %s restores it", old, path, exc2, path)
        if isinstance(exc, (OSError, RuntimeError, sqlite3.Error)) and not isinstance(exc, MapError):
            raise MapError(f"cannot write map {path}: {exc}") from exc
        raise
    try:
        _remove(old)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("cannot remove the previous map %s: %s", old, exc)


#: Attempts of :meth:`VprMap.load` when ``map.yaml`` is replaced while it reads.
LOAD_ATTEMPTS = 5


def _meta_stamp(meta_path: str):
    """``(inode, mtime_ns, size)`` of ``map.yaml`` (None when missing): changes on every replace."""
    try:
        st = os.stat(meta_path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class VprMap:
    """A loaded map (read-only).

    Attributes:
        path: map directory.
        meta: parsed ``map.yaml``.
        keyframes: list of :class:`Keyframe`, index order.
        index: FAISS index.
        encoder_checkpoint: dict for :meth:`Encoder.load_checkpoint_state`.
        datum: :class:`EnuDatum` or None.
        patches: the keyframes' Patch-NetVLAD descriptors (:class:`MapPatches`, memory-mapped),
            or None for a map built without ``--patches``.
    """

    def __init__(self, path, meta, keyframes, index, encoder_checkpoint, patches: Optional[MapPatches] = None):
        self.path = path
        self.meta = meta
        self.keyframes = keyframes
        self.index = index
        self.encoder_checkpoint = encoder_checkpoint
        self.patches = patches
        self.datum = datum_from_meta(os.path.join(str(path), MAP_YAML), meta.get("datum"))

    @property
    def fingerprint(self) -> Dict:
        return self.meta["encoder"]

    @property
    def positions(self) -> np.ndarray:
        """``(N, 3)`` float64 keyframe positions in the map frame, metres (NaN when unknown)."""
        return np.array([[k.x, k.y, k.z] for k in self.keyframes], dtype=np.float64).reshape(-1, 3)

    @property
    def has_patches(self) -> bool:
        """True when the map stores Patch-NetVLAD descriptors (built with ``--patches``)."""
        return self.patches is not None

    def require_patches(self) -> MapPatches:
        """The map's :class:`MapPatches`.

        Raises:
            MapError: ``map <path>: this map has no patch descriptors; rebuild it with --patches``.
        """
        check_patch_config(self.path, self.patches, {})
        return self.patches

    def check_patch_config(self, expected: Dict) -> None:
        """Refuse re-ranking with patches of another configuration, like a fingerprint mismatch.

        Args:
            expected: any of ``patch_sizes``, ``strides`` (lists of ints, cells), ``dim``,
                ``grid_hw`` ([h, w] cells) of the running encoder / node.

        Raises:
            MapError: the map has no patch descriptors.
            FingerprintMismatchError: a value differs from the map's ``patches`` section (each
                difference listed as ``key: map A vs running B``).
        """
        check_patch_config(self.path, self.patches, expected)

    @property
    def has_positions(self) -> bool:
        return bool(len(self.keyframes)) and bool(np.isfinite(self.positions[:, :2]).all())

    def __len__(self) -> int:
        return len(self.keyframes)

    @classmethod
    def load(cls, path: str, verify_hashes: bool = True) -> "VprMap":
        """Open a map directory.

        When ``path`` is missing because a replacement was interrupted (a writer killed between
        its two renames), the previous map is put back first, with a logged warning
        (:func:`recover_interrupted_replace`).

        Args:
            path: map directory.
            verify_hashes: check SHA-256 of every file (sizes are always checked).

        Raises:
            MapError: missing directory or file (also a previous map that cannot be put back),
                unknown format version, a malformed ``encoder`` / ``build`` / ``datum`` section
                (:func:`check_encoder_section`, :func:`check_build_section`,
                :func:`datum_from_meta`; the message names ``map.yaml`` and the field), a
                ``files`` entry that is not a plain file name inside the map directory
                (:func:`confined_map_file`), a file whose size or
                hash differs from ``map.yaml`` (truncated/corrupt; for an appended file: shorter
                than listed, or its listed prefix / keyframe rows differ), keyframe count !=
                index size (``index.faiss`` plus the ``descriptors_tail.f32`` rows), or patch
                files that disagree with the ``patches`` section (:meth:`MapPatches.load`).

        A map that grew by appends (module doc) loads the keyframes with ids below the listed
        ``rows`` and adds the listed prefix of ``descriptors_tail.f32`` to the index; an append
        interrupted inside its SQLite transaction is rolled back (this needs write access).

        A live ``map_builder`` may replace ``map.yaml`` while this reads the files it lists; a
        failed load whose ``map.yaml`` changed meanwhile is retried (up to
        :data:`LOAD_ATTEMPTS` times), so a reader never reports a healthy growing map as corrupt.
        """
        meta_path = os.path.join(os.path.abspath(path), MAP_YAML)
        for attempt in range(LOAD_ATTEMPTS):
            before = _meta_stamp(meta_path)
            try:
                return cls._load_once(path, verify_hashes)
            except MapError:
                if attempt + 1 < LOAD_ATTEMPTS and _meta_stamp(meta_path) != before:
                    continue  # a writer replaced map.yaml while we read: read the new version
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, path: str, verify_hashes: bool = True) -> "VprMap":
        """One attempt of :meth:`load` (same arguments and errors)."""
        from vpr_localizer.mapping.index import load_index

        path = os.path.abspath(path)
        recover_interrupted_replace(path)
        if not os.path.isdir(path):
            raise MapError(f"map not found: {path}")
        meta_path = os.path.join(path, MAP_YAML)
        if not os.path.isfile(meta_path):
            raise MapError(f"{path} is not a map (no {MAP_YAML})")
        try:
            with open(meta_path) as f:
                meta = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise MapError(f"{meta_path}: corrupt ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != "vpr_localizer.map":
            raise MapError(f"{meta_path}: not a vpr_localizer map")
        if meta.get("format_version") != FORMAT_VERSION:
            raise MapError(f"{meta_path}: map format version {meta.get('format_version')} is not supported "
                           f"(this build reads version {FORMAT_VERSION})")
        if not isinstance(meta.get("encoder"), dict):
            raise MapError(f"{meta_path}: no encoder fingerprint")
        check_encoder_section(meta_path, meta["encoder"])
        check_build_section(meta_path, meta.get("build"))
        datum_from_meta(meta_path, meta.get("datum"))
        files = meta.get("files")
        if not isinstance(files, dict):
            raise MapError(f"{meta_path}: no 'files' section")
        file_paths = {}
        for name, info in files.items():
            fp = confined_map_file(path, name)
            if fp is None:
                raise MapError(f"{meta_path}: 'files' entry {name!r} is not a plain file name inside the map "
                               f"directory (absolute paths, '..' and sub-paths are refused)")
            kind = entry_kind(info)
            if kind is None or (kind == "rows" and name != KEYFRAMES_DB):
                raise MapError(f"{meta_path}: corrupt entry for {name} in 'files' (needs bytes and sha256, "
                               f"optionally append: true; or rows and rows_sha256 for {KEYFRAMES_DB})")
            file_paths[name] = fp
        tail = None
        for name, info in files.items():
            fp = file_paths[name]
            if not os.path.isfile(fp):
                raise MapError(f"map {path} is incomplete: {name} is missing")
            kind = entry_kind(info)
            if kind == "rows":
                continue  # checked below, on the rows read
            size = os.path.getsize(fp)
            if size != info["bytes"] and not (kind == "prefix" and size > info["bytes"]):
                raise MapError(f"map {path} is truncated or corrupt: {name} has {size} bytes, "
                               f"map.yaml says {info['bytes']}")
            if kind == "prefix" and name == TAIL_FILE:
                with open(fp, "rb") as f:
                    tail = f.read(info["bytes"])
                if len(tail) != info["bytes"]:
                    raise MapError(f"map {path} is truncated: {name} has fewer than {info['bytes']} bytes")
                if verify_hashes and hashlib.sha256(tail).hexdigest() != info["sha256"]:
                    raise MapError(f"map {path} is corrupt: {name} does not match its SHA-256 in map.yaml")
            elif verify_hashes and (sha256_file(fp) if kind == "file"
                                    else sha256_prefix(fp, info["bytes"])[0].hexdigest()) != info["sha256"]:
                raise MapError(f"map {path} is corrupt: {name} does not match its SHA-256 in map.yaml")
        for name in (KEYFRAMES_DB, INDEX_FILE, ENCODER_FILE):
            if name not in files:
                raise MapError(f"map {path} is incomplete: map.yaml lists no {name}")
        db_entry = files[KEYFRAMES_DB]
        if entry_kind(db_entry) == "rows":
            rows = select_keyframe_rows(file_paths[KEYFRAMES_DB], db_entry["rows"])
            if [r[0] for r in rows] != list(range(db_entry["rows"])):
                raise MapError(f"map {path} is truncated or corrupt: {KEYFRAMES_DB} does not hold the keyframe "
                               f"ids 0..{db_entry['rows'] - 1} that map.yaml lists")
            if verify_hashes and rows_sha256(rows).hexdigest() != db_entry["rows_sha256"]:
                raise MapError(f"map {path} is corrupt: the rows of {KEYFRAMES_DB} do not match their "
                               f"SHA-256 in map.yaml")
            keyframes = _keyframes_from_rows(rows)
        else:
            keyframes = _read_keyframes(file_paths[KEYFRAMES_DB])
        index = load_index(os.path.join(path, INDEX_FILE))
        if TAIL_FILE in files:
            if tail is None:
                raise MapError(f"{meta_path}: the 'files' entry of {TAIL_FILE} needs append: true")
            row_bytes = 4 * int(index.d)
            if len(tail) % row_bytes:
                raise MapError(f"map {path} is corrupt: {TAIL_FILE} holds {len(tail)} bytes, not whole "
                               f"{index.d}-D float32 descriptors")
            if tail:
                try:
                    index.add(np.frombuffer(tail, dtype=np.float32).reshape(-1, int(index.d)))
                except RuntimeError as exc:
                    raise MapError(f"map {path}: cannot add the {TAIL_FILE} descriptors to the index "
                                   f"({exc})") from exc
        if index.ntotal != len(keyframes):
            raise MapError(f"map {path} is inconsistent: {len(keyframes)} keyframes but "
                           f"{index.ntotal} descriptors in the index")
        try:
            ckpt = torch_load_weights_only(os.path.join(path, ENCODER_FILE))
        except WeightsError as exc:  # pickled objects beyond tensors: refused, our own message
            raise MapError(f"map {path}: {exc}") from exc
        except Exception as exc:
            raise MapError(f"map {path}: cannot read {ENCODER_FILE} ({exc})") from exc
        patches = None
        if meta.get("patches") is not None:
            patches = MapPatches.load(path, meta["patches"], len(keyframes), meta["encoder"], list(files))
        return cls(path, meta, keyframes, index, ckpt, patches)

    def check_fingerprint(self, fingerprint: Dict) -> None:
        """Raise :class:`FingerprintMismatchError` unless ``fingerprint`` equals the map's.

        The message lists each differing field (e.g. ``weights_sha256: map 73cf.. vs encoder 5a1f..``).
        """
        diffs = fingerprint_diffs(self.fingerprint, fingerprint)
        if diffs:
            raise FingerprintMismatchError(f"map {self.path} was built with a different encoder ("
                                           + "; ".join(diffs) + ")")
