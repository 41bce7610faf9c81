"""Incremental map flushes (issue 12 item 3): :class:`vpr_localizer.mapping.append.MapAppender`.

The live map_builder node used to rewrite the whole map directory at every flush. Appends add
the new keyframe rows to ``keyframes.sqlite`` and their descriptors to ``descriptors_tail.f32``
and replace ``map.yaml`` last, so that

(a) after every append the map loads with the right count and localises exactly like a map of
    the same keyframes written in one go (real map: 10 even lund_gps frames, VGG16 at 64x48,
    NetVLAD K=8; queries: the odd frames, encoded by the map's own encoder);
(b) the bytes written per append do not grow with the map (5 keyframes appended to a 10- and a
    200-keyframe map, synthetic unit-norm descriptors, bytes counted by the kernel:
    ``wchar`` of ``/proc/self/io``);
(c) a failure anywhere in an append (the ``map.yaml`` replace raising, the descriptor write
    failing, a process killed inside the SQLite transaction or at any instant) leaves a loadable
    map with the previous count, and a reader never sees a torn map while another process
    appends.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from vpr_localizer.cli.main import main
from vpr_localizer.errors import FingerprintMismatchError, MapError
from vpr_localizer.localization.localize import Localizer, encoder_for_map
from vpr_localizer.mapping import append as map_append
from vpr_localizer.mapping.append import MapAppender, append_keyframes
from vpr_localizer.mapping.index import build_index
from vpr_localizer.mapping.store import TAIL_FILE, Keyframe, VprMap, write_map

MAP_FRAMES = tuple(range(2, 21, 2))    # 10 keyframes
QUERY_FRAMES = tuple(range(1, 20, 2))  # 10 queries
ENC = ["--image-size", "64", "48", "--clusters", "8", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory, datasets_dir, data_file, vgg_path):
    """A real map of 10 lund_gps frames (build-map CLI) and the odd frames' query descriptors."""
    images = tmp_path_factory.mktemp("append_images")
    for i in MAP_FRAMES:
        shutil.copyfile(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg"), images / f"{i:02d}.jpg")
    out = tmp_path_factory.mktemp("append_map") / "lund10"
    rc = main([str(a) for a in ["build-map", "--images", images, "--gps", "exif", "--out", out,
                                "--weights", vgg_path, *ENC]])
    assert rc == 0
    vmap = VprMap.load(str(out))
    assert len(vmap) == len(MAP_FRAMES) and vmap.has_positions
    enc = encoder_for_map(vmap, weights=str(vgg_path), device="cpu")
    queries = enc.encode_paths([str(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg"))
                                for i in QUERY_FRAMES]).descriptors
    return SimpleNamespace(path=out, vmap=vmap, descriptors=vmap.index.reconstruct_n(0, len(vmap)),
                           queries=np.asarray(queries, np.float32))


def write_first(vmap, descriptors, path, n, overwrite=False):
    """``write_map`` of the first ``n`` keyframes of ``vmap`` (no encoding)."""
    return write_map(str(path), vmap.keyframes[:n], build_index(descriptors[:n]), vmap.encoder_checkpoint,
                     vmap.fingerprint, vmap.datum, extra={"build": vmap.meta["build"]}, overwrite=overwrite)


def kf_tuple(k: Keyframe):
    return repr(dataclasses.astuple(k))  # NaN-safe comparison


def wchar() -> int:
    """Bytes this process passed to write() so far (Linux ``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def synthetic(n0, n, dim, seed):
    """Keyframes ``n0..n-1`` with positions and ``(n-n0, dim)`` unit-norm float32 descriptors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n - n0, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kfs = [Keyframe(id=i, stamp=float(i), x=float(i), y=0.5 * i, z=0.0, frame=i, image_path=f"img_{i:05d}.jpg",
                    sequence="synthetic") for i in range(n0, n)]
    return kfs, x


# --------------------------------------------------------------------------------------------
# (a) appends load and localise like a map written in one go
# --------------------------------------------------------------------------------------------

def test_appends_load_and_localise_like_a_map_written_in_one_go(built, tmp_path):
    vmap, desc = built.vmap, built.descriptors
    path = tmp_path / "grown"
    write_first(vmap, desc, path, 3)
    first = yaml.safe_load((path / "map.yaml").read_text())
    appender = MapAppender(str(path), vmap.fingerprint)
    assert appender.count == 3 and appender.dim == desc.shape[1]
    for n0, n in ((3, 5), (5, 8), (8, 9), (9, 10)):  # four flushes of 2, 3, 1, 1 keyframes
        assert appender.append(vmap.keyframes[n0:n], desc[n0:n], extra={"build": {"images": n}}) == n
        grown = VprMap.load(str(path))
        assert len(grown) == n and grown.meta["counts"]["keyframes"] == n
        assert grown.meta["build"] == {"images": n}
        assert [kf_tuple(k) for k in grown.keyframes] == [kf_tuple(k) for k in vmap.keyframes[:n]]
        assert np.array_equal(grown.index.reconstruct_n(0, n), desc[:n])
        assert grown.fingerprint == vmap.fingerprint and grown.datum == vmap.datum
        one_go = VprMap.load(write_first(vmap, desc, tmp_path / f"one_go_{n}", n))
        got = Localizer(grown).localize(built.queries)
        want = Localizer(one_go).localize(built.queries)
        assert [e.best_id for e in got] == [e.best_id for e in want]
        assert np.allclose([[e.x, e.y] for e in got], [[e.x, e.y] for e in want])
        assert VprMap.load(str(path), verify_hashes=False).index.ntotal == n
    meta = yaml.safe_load((path / "map.yaml").read_text())
    assert meta["files"]["keyframes.sqlite"]["rows"] == 10
    assert meta["files"][TAIL_FILE]["append"] is True
    assert meta["files"][TAIL_FILE]["bytes"] == 7 * 4 * desc.shape[1]  # only the appended descriptors
    # index.faiss and encoder.pt were not rewritten
    for name in ("index.faiss", "encoder.pt"):
        assert meta["files"][name] == first["files"][name]
    # a fresh appender (another process) continues the map; a full rewrite folds the tail in
    assert append_keyframes(str(path), [], np.zeros((0, desc.shape[1]), np.float32)) == 10
    grown = VprMap.load(str(path))
    write_map(str(path), grown.keyframes, grown.index, grown.encoder_checkpoint, grown.fingerprint, grown.datum,
              extra={"build": grown.meta["build"]}, overwrite=True)
    assert TAIL_FILE not in os.listdir(path)
    assert np.array_equal(VprMap.load(str(path)).index.reconstruct_n(0, 10), desc)
    # the old appender notices the full rewrite and re-reads the map before its next append
    kfs, x = synthetic(10, 12, desc.shape[1], seed=1)
    assert appender.append(kfs, x) == 12
    assert len(VprMap.load(str(path))) == 12


def test_append_refuses_bad_input_and_another_encoder(built, tmp_path):
    vmap, desc = built.vmap, built.descriptors
    path = tmp_path / "m"
    write_first(vmap, desc, path, 4)
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    appender = MapAppender(str(path), vmap.fingerprint)
    with pytest.raises(ValueError, match=r"ids must continue the map: 4\.\.5"):
        appender.append(vmap.keyframes[5:7], desc[5:7])
    with pytest.raises(ValueError, match=r"descriptors must be \(2, "):
        appender.append(vmap.keyframes[4:6], desc[4:6, :-1])
    bad = desc[4:6].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        appender.append(vmap.keyframes[4:6], bad)
    with pytest.raises(ValueError, match="counts"):
        appender.append(vmap.keyframes[4:6], desc[4:6], extra={"counts": {}})
    other = dict(vmap.fingerprint, num_clusters=16)
    with pytest.raises(FingerprintMismatchError, match="different encoder"):
        MapAppender(str(path), other).append(vmap.keyframes[4:6], desc[4:6])
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before  # nothing written
    with pytest.raises(MapError, match="no map there"):
        MapAppender(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# (b) the bytes written per append do not grow with the map
# --------------------------------------------------------------------------------------------

def test_bytes_written_per_append_do_not_grow_with_the_map(built, tmp_path):
    vmap = built.vmap
    dim = built.descriptors.shape[1]
    written = {}
    for n in (10, 200):
        path = tmp_path / f"syn{n}"
        kfs, x = synthetic(0, n, dim, seed=n)
        w0 = wchar()
        write_map(str(path), kfs, build_index(x), vmap.encoder_checkpoint, vmap.fingerprint, None)
        full = wchar() - w0
        appender = MapAppender(str(path), vmap.fingerprint)
        per_append = []
        for n0 in (n, n + 5, n + 10):  # the first append also relists keyframes.sqlite by rows
            kfs, x = synthetic(n0, n0 + 5, dim, seed=n0)
            w0 = wchar()
            appender.append(kfs, x, extra={"build": {"images": n0 + 5}})
            per_append.append(wchar() - w0)
        assert len(VprMap.load(str(path))) == n + 15
        written[n] = SimpleNamespace(full=full, per_append=per_append)
    small, large = written[10], written[200]
    print(f"\n[append] D={dim}: full write of 10 / 200 keyframes {small.full} / {large.full} bytes; "
          f"5-keyframe appends to 10: {small.per_append}, to 200: {large.per_append} bytes")
    descriptor_bytes = 5 * 4 * dim
    for a, b in zip(small.per_append, large.per_append):
        assert a >= descriptor_bytes and b >= descriptor_bytes
        assert b / a < 1.3, (a, b)  # not ~20x: the cost depends on the keyframes appended only
    assert max(large.per_append) < large.full / 15
    # whereas a full write rewrites every descriptor: 190 more keyframes cost at least their descriptors
    # (the encoder checkpoint, e.g. a fine-tuned conv5 of ~14 MB, is the same in both full writes)
    assert large.full - small.full >= 190 * 4 * dim, (small.full, large.full)


# --------------------------------------------------------------------------------------------
# (c) failures and kills in the middle of an append
# --------------------------------------------------------------------------------------------

def _failing_replace(real):
    def replace(src, dst, *a, **kw):
        if os.path.basename(os.fspath(dst)) == "map.yaml":
            raise OSError(28, "No space left on device (injected)")
        return real(src, dst, *a, **kw)
    return replace


@pytest.mark.parametrize("first", [True, False], ids=["first-append", "later-append"])
def test_failing_map_yaml_replace_leaves_the_previous_map(built, tmp_path, monkeypatch, first):
    vmap, desc = built.vmap, built.descriptors
    path = tmp_path / "m"
    write_first(vmap, desc, path, 4)
    appender = MapAppender(str(path), vmap.fingerprint)
    n = 4
    if not first:
        n = appender.append(vmap.keyframes[4:6], desc[4:6])
    yaml_before = (path / "map.yaml").read_bytes()
    monkeypatch.setattr(map_append.os, "replace", _failing_replace(os.replace))
    with pytest.raises(MapError, match="injected"):
        appender.append(vmap.keyframes[n:n + 3], desc[n:n + 3])
    monkeypatch.undo()
    assert (path / "map.yaml").read_bytes() == yaml_before
    assert not [f for f in os.listdir(path) if ".tmp-" in f]
    m = VprMap.load(str(path))
    assert len(m) == n and m.index.ntotal == n
    assert [kf_tuple(k) for k in m.keyframes] == [kf_tuple(k) for k in vmap.keyframes[:n]]
    if not first:  # the interrupted append's rows and bytes are on disk, beyond the map
        con = sqlite3.connect(str(path / "keyframes.sqlite"))
        assert con.execute("SELECT count(*) FROM keyframes").fetchone()[0] == n + 3
        con.close()
        assert (path / TAIL_FILE).stat().st_size == (n - 4 + 3) * 4 * desc.shape[1]
    # the next append (same process or another) replaces the leftovers
    assert MapAppender(str(path), vmap.fingerprint).append(vmap.keyframes[n:10], desc[n:10]) == 10
    m = VprMap.load(str(path))
    assert [kf_tuple(k) for k in m.keyframes] == [kf_tuple(k) for k in vmap.keyframes]
    assert np.array_equal(m.index.reconstruct_n(0, 10), desc)


def test_failing_descriptor_write_leaves_the_previous_map(built, tmp_path, monkeypatch):
    vmap, desc = built.vmap, built.descriptors
    path = tmp_path / "m"
    write_first(vmap, desc, path, 4)
    appender = MapAppender(str(path), vmap.fingerprint)
    assert appender.append(vmap.keyframes[4:6], desc[4:6]) == 6

    def broken_fsync(fd):
        raise OSError(5, "Input/output error (injected)")
    monkeypatch.setattr(map_append.os, "fsync", broken_fsync)
    with pytest.raises(MapError, match="injected"):
        appender.append(vmap.keyframes[6:8], desc[6:8])
    monkeypatch.undo()
    assert len(VprMap.load(str(path))) == 6
    assert appender.append(vmap.keyframes[6:10], desc[6:10]) == 10
    assert np.array_equal(VprMap.load(str(path)).index.reconstruct_n(0, 10), desc)


def test_kill_inside_the_sqlite_transaction_is_rolled_back_on_load(built, tmp_path):
    """A writer killed while its transaction had already written pages of keyframes.sqlite leaves
    a hot journal: the load rolls it back and sees the previous map."""
    vmap, desc = built.vmap, built.descriptors
    path = tmp_path / "m"
    write_first(vmap, desc, path, 4)
    assert append_keyframes(str(path), vmap.keyframes[4:6], desc[4:6], fingerprint=vmap.fingerprint) == 6
    snapshot = tmp_path / "killed"
    con = sqlite3.connect(str(path / "keyframes.sqlite"), isolation_level=None)
    con.execute("PRAGMA cache_size=1")  # spill the transaction's pages into the database file
    con.execute("BEGIN IMMEDIATE")
    con.execute("DELETE FROM keyframes WHERE id >= 3")
    con.executemany("INSERT INTO keyframes (id, image_path) VALUES (?, ?)",
                    [(i, "x" * 500) for i in range(3, 2000)])
    assert os.path.exists(path / "keyframes.sqlite-journal")
    shutil.copytree(path, snapshot)  # the directory as a kill -9 would leave it
    con.execute("ROLLBACK")
    con.close()
    m = VprMap.load(str(snapshot))
    assert len(m) == 6 and not os.path.exists(snapshot / "keyframes.sqlite-journal")
    assert [kf_tuple(k) for k in m.keyframes] == [kf_tuple(k) for k in vmap.keyframes[:6]]
    assert MapAppender(str(snapshot), vmap.fingerprint).append(vmap.keyframes[6:10], desc[6:10]) == 10


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from vpr_localizer.mapping.append import MapAppender
    from vpr_localizer.mapping.store import Keyframe

    path, dim = sys.argv[1], int(sys.argv[2])
    appender = MapAppender(path)
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    while True:
        n = appender.count
        x = rng.standard_normal((3, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        appender.append([Keyframe(id=i, x=float(i), y=0.0, frame=i) for i in range(n, n + 3)], x)
""")


def test_readers_never_see_a_torn_map_and_a_kill_leaves_a_loadable_one(built, tmp_path):
    """Another process appends 3 keyframes at a time as fast as it can while this one loads the
    map again and again; then it is killed (SIGKILL) at an arbitrary instant."""
    vmap = built.vmap
    dim = built.descriptors.shape[1]
    path = tmp_path / "live"
    kfs, x = synthetic(0, 6, dim, seed=6)
    write_map(str(path), kfs, build_index(x), vmap.encoder_checkpoint, vmap.fingerprint, None)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(dim)], stdout=subprocess.PIPE,
                             env=env, cwd=str(REPO))
    try:
        assert child.stdout.readline().strip() == b"ready"
        counts = []
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and (len(counts) < 15 or counts[-1] < 60):
            m = VprMap.load(str(path))  # must never fail: complete old or new map
            assert len(m) % 3 == 0 and m.index.ntotal == len(m)
            assert [k.id for k in m.keyframes] == list(range(len(m)))
            counts.append(len(m))
        assert child.poll() is None, "the appending process died"
        assert counts == sorted(counts) and counts[-1] > 6, counts
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    m = VprMap.load(str(path))
    assert len(m) >= counts[-1] and len(m) % 3 == 0 and m.index.ntotal == len(m)
    assert np.array_equal(m.index.reconstruct_n(0, 6), x)
    print(f"\n[append] {len(counts)} loads during appends saw {counts[0]}..{counts[-1]} keyframes; "
          f"after SIGKILL: {len(m)}")
    n = len(m)
    more, y = synthetic(n, n + 3, dim, seed=7)
    assert MapAppender(str(path), vmap.fingerprint).append(more, y) == n + 3
    assert len(VprMap.load(str(path))) == n + 3
    assert not [f for f in os.listdir(path) if ".tmp-" in f]  # a killed appender's map.yaml temp is gone
