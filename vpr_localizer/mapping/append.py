"""Growing a map on disk in place: incremental flushes of the live ``map_builder`` node.

:func:`~vpr_localizer.mapping.store.write_map` rewrites the whole map directory, so a flush
costs as much as the map (hundreds of MB for a few thousand NetVLAD keyframes).
:class:`MapAppender` adds keyframes to an existing map with a cost that depends only on the
keyframes added:

0. (first append after a full write only) ``map.yaml`` is rewritten to list
   ``keyframes.sqlite`` by its rows rather than by its whole-file hash (same map);
1. their rows are inserted into ``keyframes.sqlite`` in one SQLite transaction;
2. their descriptors are appended to ``descriptors_tail.f32`` (raw little-endian float32 rows,
   the index rows after those of ``index.faiss``; ``index.faiss`` itself is not rewritten: the
   next full :func:`write_map` folds the tail into it) and fsynced;
3. ``map.yaml`` is written to a temporary file, fsynced and renamed over the old one
   (``os.replace``), last.

``map.yaml`` lists ``keyframes.sqlite`` by its first ``rows`` keyframe rows and their content
hash, and ``descriptors_tail.f32`` by its first ``bytes`` bytes and their SHA-256
(:mod:`vpr_localizer.mapping.store`, module doc), so the data appended before step 3 is not part
of the map yet. Crash safety: at every instant the directory is a complete map that
:meth:`VprMap.load` accepts, with the previous or the new keyframe count, never a mix. A process
killed (or an exception) anywhere before the ``os.replace`` leaves the previous map; rows and
bytes beyond it (and a dead process's ``.map.yaml.tmp-PID``) are removed by the next append. A kill inside the SQLite commit leaves a hot
journal that the next load or append rolls back. The SHA-256 of the growing parts is kept
running in memory, so an append reads nothing but ``map.yaml``'s status.

The encoder must not change between appends (``encoder.pt`` is not rewritten): a map whose
encoder changed needs a full :func:`write_map`. Maps with Patch-NetVLAD descriptors cannot be
appended to.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import logging
import os
import sqlite3
from typing import Dict, Optional, Sequence

import numpy as np
import yaml

from vpr_localizer.errors import FingerprintMismatchError, MapError
from vpr_localizer.files import sha256_file
from vpr_localizer.mapping.store import (
    _COLUMNS, KEYFRAMES_DB, MAP_YAML, SQLITE_TIMEOUT_S, TAIL_FILE, Keyframe, check_encoder_section,
    _pid_alive, entry_kind, recover_interrupted_replace, rows_sha256, select_keyframe_rows, sha256_prefix)

LOG = logging.getLogger(__name__)


def _stat_key(path: str):
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class MapAppender:
    """Appends keyframes to an existing map directory, in place, at a cost independent of its size.

    One appender per map and process; calls must not overlap (the caller serialises them, as
    the node's flush lock does). When ``map.yaml`` changed on disk since the last append (a full
    :func:`write_map` replaced the map meanwhile), the next :meth:`append` re-reads the map first
    (a one-off cost of reading the keyframe rows and hashing ``descriptors_tail.f32``).

    Attributes:
        path: map directory (absolute).
        count: keyframes in the map on disk as of the last open / append.
        dim: descriptor dimension ``D``.

    Args:
        path: an existing map directory (written by :func:`write_map`).
        fingerprint: the encoder fingerprint appended descriptors come from; checked against the
            map's at every append (None: not checked).

    Raises:
        MapError: no map at ``path`` (after putting back one an interrupted replacement left
            aside), a malformed ``map.yaml``, a map with patch descriptors, or a keyframe
            database / descriptor file that does not match ``map.yaml``.
        FingerprintMismatchError: the map was built by another encoder than ``fingerprint``.
    """

    def __init__(self, path: str, fingerprint: Optional[Dict] = None):
        self.path = os.path.abspath(path)
        self.fingerprint = fingerprint
        self.count = 0
        self.dim = 0
        self._meta: Dict = {}
        self._yaml_key = None
        self._rows_hash = None
        self._tail_hash = None
        self._tail_bytes = 0
        self._open()

    # --- state from disk ------------------------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _open(self) -> None:
        """Read ``map.yaml`` and the growing parts' running hashes (O(map) once)."""
        recover_interrupted_replace(self.path)
        meta_path = self._file(MAP_YAML)
        if not os.path.isfile(meta_path):
            raise MapError(f"cannot append to {self.path}: no map there (no {MAP_YAML})")
        self._remove_stale_yaml_temps()
        key = _stat_key(meta_path)
        try:
            with open(meta_path) as f:
                meta = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise MapError(f"cannot append to {self.path}: unreadable {MAP_YAML} ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != "vpr_localizer.map":
            raise MapError(f"cannot append to {self.path}: {MAP_YAML} is not a vpr_localizer map")
        check_encoder_section(meta_path, meta.get("encoder"))
        if meta.get("patches") is not None:
            raise MapError(f"cannot append to {self.path}: the map holds patch descriptors "
                           f"(rewrite it with write_map)")
        counts, files = meta.get("counts"), meta.get("files")
        if not (isinstance(counts, dict) and isinstance(counts.get("keyframes"), int)
                and isinstance(counts.get("descriptor_dim"), int) and counts["descriptor_dim"] > 0
                and isinstance(files, dict) and KEYFRAMES_DB in files):
            raise MapError(f"cannot append to {self.path}: {MAP_YAML} lacks counts or files")
        n, dim = counts["keyframes"], counts["descriptor_dim"]
        db = self._file(KEYFRAMES_DB)
        entry = files[KEYFRAMES_DB]
        kind = entry_kind(entry)
        if kind == "file" and sha256_file(db) != entry["sha256"]:
            raise MapError(f"cannot append to {self.path}: {KEYFRAMES_DB} does not match its SHA-256")
        if kind not in ("file", "rows") or (kind == "rows" and entry["rows"] != n):
            raise MapError(f"cannot append to {self.path}: bad {KEYFRAMES_DB} entry in {MAP_YAML}")
        rows = select_keyframe_rows(db, n)
        if [r[0] for r in rows] != list(range(n)):
            raise MapError(f"cannot append to {self.path}: {KEYFRAMES_DB} does not hold keyframes 0..{n - 1}")
        rows_hash = rows_sha256(rows)
        if kind == "rows" and rows_hash.hexdigest() != entry["rows_sha256"]:
            raise MapError(f"cannot append to {self.path}: the rows of {KEYFRAMES_DB} do not match map.yaml")
        tail_entry = files.get(TAIL_FILE)
        tail_bytes = 0
        tail_hash = hashlib.sha256()
        if tail_entry is not None:
            if entry_kind(tail_entry) != "prefix" or tail_entry["bytes"] % (4 * dim) \
                    or tail_entry["bytes"] // (4 * dim) > n:
                raise MapError(f"cannot append to {self.path}: bad {TAIL_FILE} entry in {MAP_YAML}")
            tail_bytes = tail_entry["bytes"]
            tail_hash, got = sha256_prefix(self._file(TAIL_FILE), tail_bytes)
            if got != tail_bytes or tail_hash.hexdigest() != tail_entry["sha256"]:
                raise MapError(f"cannot append to {self.path}: {TAIL_FILE} does not match map.yaml")
        self._meta, self._yaml_key = meta, key
        self.count, self.dim = n, dim
        self._rows_hash, self._tail_hash, self._tail_bytes = rows_hash, tail_hash, tail_bytes

    def _remove_stale_yaml_temps(self) -> None:
        """Remove the ``.map.yaml.tmp-PID`` files of appenders that died before their replace."""
        prefix = f".{MAP_YAML}.tmp-"
        for name in os.listdir(self.path):
            pid = name[len(prefix):]
            if name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                try:
                    os.unlink(self._file(name))
                except OSError as exc:
                    LOG.warning("cannot remove stale %s: %s", self._file(name), exc)

    def _check_current(self) -> None:
        """Re-read the map when ``map.yaml`` is no longer the one this appender wrote or read."""
        try:
            key = _stat_key(self._file(MAP_YAML))
        except OSError:
            key = None
        if key != self._yaml_key:
            LOG.info("map %s changed on disk since the last append: re-reading it", self.path)
            self._open()
        if self.fingerprint is not None and self._meta.get("encoder") != self.fingerprint:
            raise FingerprintMismatchError(f"cannot append to {self.path}: the map was built with a different "
                                           f"encoder (write it in full)")

    # --- appending --------------------------------------------------------------------------

    def append(self, keyframes: Sequence[Keyframe], descriptors: np.ndarray,
               extra: Optional[Dict] = None) -> int:
        """Add keyframes and their descriptors to the map; ``map.yaml`` is replaced last.

        Args:
            keyframes: ``k`` keyframes with ids ``count..count+k-1`` (continuing the map's).
            descriptors: ``(k, D)`` float32-convertible, finite, L2-normalised global
                descriptors, row ``i`` for ``keyframes[i]``.
            extra: top-level ``map.yaml`` sections to set (e.g. ``build``); ``format``,
                ``encoder``, ``datum``, ``counts``, ``files`` cannot be set this way.

        Returns:
            The map's keyframe count after the append.

        Raises:
            ValueError: ids that do not continue the map, a descriptor array of the wrong shape
                or with NaN / Inf, or a forbidden ``extra`` key (nothing is written).
            FingerprintMismatchError: the map on disk was built with another encoder.
            MapError: the map cannot be read or written (disk full, permissions...); the map on
                disk stays the previous one.
        """
        self._check_current()
        n0 = self.count
        k = len(keyframes)
        x = np.ascontiguousarray(descriptors, dtype="<f4")
        if x.ndim != 2 or x.shape != (k, self.dim):
            raise ValueError(f"descriptors must be ({k}, {self.dim}) for {k} keyframes, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("descriptors contain NaN or Inf")
        if [kf.id for kf in keyframes] != list(range(n0, n0 + k)):
            raise ValueError(f"keyframe ids must continue the map: {n0}..{n0 + k - 1}")
        bad = sorted(set(extra or {}) & {"format", "format_version", "encoder", "datum", "counts", "files"})
        if bad:
            raise ValueError(f"extra cannot set {', '.join(bad)}")
        if k == 0 and not extra:
            return n0
        try:
            meta = self._append(keyframes, x, extra)
        except (OSError, sqlite3.Error) as exc:
            raise MapError(f"cannot append to map {self.path}: {exc}") from exc
        self._meta = meta
        return self.count

    def _append(self, keyframes, x, extra) -> Dict:
        n0, k = self.count, len(keyframes)
        db, tail_path = self._file(KEYFRAMES_DB), self._file(TAIL_FILE)
        if entry_kind(self._meta["files"][KEYFRAMES_DB]) == "file":
            # 0. first append to a fully written map: list the database by its rows before it
            # changes (same map, so a reader never sees a database that differs from map.yaml)
            meta0 = copy.deepcopy(self._meta)
            meta0["files"][KEYFRAMES_DB] = {"rows": n0, "rows_sha256": self._rows_hash.hexdigest()}
            self._replace_yaml(meta0)
            self._meta = meta0
        # 1. keyframe rows, one transaction (rows of an earlier interrupted append are dropped)
        con = sqlite3.connect(db, timeout=SQLITE_TIMEOUT_S, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM keyframes WHERE id >= ?", (n0,))
                con.executemany(f"INSERT INTO keyframes ({', '.join(_COLUMNS)}) "
                                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                                [tuple(getattr(kf, c) for c in _COLUMNS) for kf in keyframes])
                new_rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM keyframes WHERE id >= ? ORDER BY id",
                                       (n0,)).fetchall()
                con.execute("COMMIT")
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # no transaction left (the COMMIT itself failed and SQLite rolled back)
                raise
        finally:
            con.close()
        rows_hash = rows_sha256(new_rows, self._rows_hash.copy())
        # 2. descriptors, appended after the committed prefix (bytes of an interrupted append dropped)
        fd = os.open(tail_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self._tail_bytes)
            os.lseek(fd, self._tail_bytes, os.SEEK_SET)
            data = x.tobytes()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        tail_hash = self._tail_hash.copy()
        tail_hash.update(data)
        tail_bytes = self._tail_bytes + len(data)
        # 3. map.yaml, replaced last
        meta = copy.deepcopy(self._meta)
        if extra:
            meta.update(copy.deepcopy(extra))
        meta["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        meta["counts"]["keyframes"] = n0 + k
        meta["files"][KEYFRAMES_DB] = {"rows": n0 + k, "rows_sha256": rows_hash.hexdigest()}
        meta["files"][TAIL_FILE] = {"bytes": tail_bytes, "sha256": tail_hash.hexdigest(), "append": True}
        self._replace_yaml(meta)
        self.count, self._rows_hash, self._tail_hash, self._tail_bytes = n0 + k, rows_hash, tail_hash, tail_bytes
        return meta

    def _replace_yaml(self, meta: Dict) -> None:
        """Write ``map.yaml`` to a temporary file, fsync it, ``os.replace`` it in, fsync the folder."""
        target = self._file(MAP_YAML)
        tmp = self._file(f".{MAP_YAML}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                yaml.safe_dump(meta, f, sort_keys=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(self.path)
        self._yaml_key = _stat_key(target)


def append_keyframes(path: str, keyframes: Sequence[Keyframe], descriptors: np.ndarray,
                     extra: Optional[Dict] = None, fingerprint: Optional[Dict] = None) -> int:
    """One-off :meth:`MapAppender.append` (opens the map first: O(map) reading; keep a
    :class:`MapAppender` for repeated appends). Same arguments, result and errors."""
    return MapAppender(path, fingerprint).append(keyframes, descriptors, extra)
