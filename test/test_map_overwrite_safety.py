"""Replacing a map on disk without losing data (issue 12, "Data loss and crash safety").

``--overwrite`` only ever replaces a map directory (never a plain folder or a file), and a writer
killed between "move the old map aside" and "rename the new map in" leaves a state that the next
load or save repairs: the previous map is put back and the temporary / backup siblings of dead
writers are removed.

One tiny real map is built per module through the command line (3 lund_gps frames, VGG16 at
64x48, NetVLAD K=8); the other maps are rewritten from it without encoding.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from vpr_localizer.cli.main import main
from vpr_localizer.errors import MapError
from vpr_localizer.mapping import store as map_store
from vpr_localizer.mapping.index import build_index
from vpr_localizer.mapping.store import VprMap, write_map

FRAMES = (2, 4, 6)
ENC = ["--image-size", "64", "48", "--clusters", "8", "--device", "cpu"]
ERROR_PREFIX = "vpr-localizer build-map: error:"


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


def tree_digest(root) -> dict:
    """relative path -> SHA-256 (files) or 'dir' of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def leftovers(map_path) -> list:
    """Temporary / backup siblings the writer may leave next to ``map_path``."""
    parent, base = os.path.split(os.path.abspath(map_path))
    return sorted(n for n in os.listdir(parent)
                  if n.startswith(f".{base}.") and (".tmp-" in n or ".old-" in n))


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(p.pid, 0)
    return p.pid


@pytest.fixture(scope="module")
def images(tmp_path_factory, datasets_dir, data_file):
    d = tmp_path_factory.mktemp("overwrite_images")
    for i in FRAMES:
        shutil.copyfile(data_file(datasets_dir / "lund_gps" / f"{i:02d}.jpg"), d / f"{i:02d}.jpg")
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory, images, vgg_path):
    """A real map built by ``vpr-localizer build-map`` (3 keyframes) and its loaded form."""
    out = tmp_path_factory.mktemp("overwrite_map") / "lund3"
    rc = main([str(a) for a in ["build-map", "--images", images, "--gps", "exif", "--out", out,
                                "--weights", vgg_path, *ENC]])
    assert rc == 0
    vmap = VprMap.load(str(out))
    assert len(vmap) == len(FRAMES)
    return SimpleNamespace(path=out, vmap=vmap)


@pytest.fixture
def map_copy(built, tmp_path):
    dst = tmp_path / "maps" / "lund3"
    shutil.copytree(built.path, dst)
    return dst


def write(vmap, path, n=None, overwrite=False):
    """Rewrite the first ``n`` keyframes of ``vmap`` to ``path`` (no encoding)."""
    n = len(vmap) if n is None else n
    index = build_index(vmap.index.reconstruct_n(0, n))
    return write_map(str(path), vmap.keyframes[:n], index, vmap.encoder_checkpoint, vmap.fingerprint,
                     vmap.datum, extra={"build": vmap.meta["build"]}, overwrite=overwrite)


def non_map_folder(root: Path) -> Path:
    d = root / "my_notes"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("field notes, not a map\n")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


# --------------------------------------------------------------------------------------------
# (a), (b), (c): --overwrite replaces a map and nothing else
# --------------------------------------------------------------------------------------------

def test_cli_overwrite_refuses_a_folder_that_is_not_a_map(tmp_path, images, vgg_path, capsys):
    target = non_map_folder(tmp_path)
    before = tree_digest(target)
    rc, out, err = run_cli(["build-map", "--images", images, "--out", target, "--overwrite",
                            "--weights", vgg_path, *ENC], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "refusing to overwrite" in lines[0] and str(target) in lines[0] and "not a map" in lines[0]
    assert "Traceback" not in err and "map written" not in out
    assert tree_digest(target) == before  # nothing deleted, nothing added
    assert sorted(os.listdir(tmp_path)) == ["my_notes"]


def test_cli_overwrite_refuses_a_regular_file(tmp_path, images, vgg_path, capsys):
    target = tmp_path / "important.txt"
    target.write_bytes(b"do not lose me\n")
    rc, out, err = run_cli(["build-map", "--images", images, "--out", target, "--overwrite",
                            "--weights", vgg_path, *ENC], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "refusing to overwrite" in lines[0] and str(target) in lines[0] and "file" in lines[0]
    assert target.read_bytes() == b"do not lose me\n"
    assert sorted(os.listdir(tmp_path)) == ["important.txt"]  # no hidden .important.txt.old-PID


def test_cli_overwrite_replaces_a_real_map(map_copy, images, vgg_path, capsys, tmp_path):
    two = tmp_path / "two_images"
    two.mkdir()
    for i in FRAMES[:2]:
        shutil.copyfile(images / f"{i:02d}.jpg", two / f"{i:02d}.jpg")
    rc, out, err = run_cli(["build-map", "--images", two, "--out", map_copy, "--overwrite",
                            "--weights", vgg_path, *ENC], capsys)
    assert rc == 0, err
    assert "map written to" in out
    new = VprMap.load(str(map_copy))
    assert len(new) == 2 and [k.frame for k in new.keyframes] == list(FRAMES[:2])
    assert leftovers(map_copy) == []
    assert sorted(os.listdir(map_copy.parent)) == ["lund3"]


def test_writer_refuses_non_maps_even_with_overwrite(tmp_path, built):
    folder = non_map_folder(tmp_path)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"\x00\x01")
    fake = tmp_path / "fake_map"
    fake.mkdir()
    (fake / "map.yaml").write_text("format: something.else\n")
    broken = tmp_path / "broken_yaml"
    broken.mkdir()
    (broken / "map.yaml").write_text("format: [unclosed\n")
    before = tree_digest(tmp_path)
    for target, why in ((folder, "no map.yaml"), (plain, "is a file"), (fake, "not a vpr_localizer map"),
                        (broken, "not a vpr_localizer map")):
        with pytest.raises(MapError, match="refusing to overwrite") as ei:
            write(built.vmap, target, n=2, overwrite=True)
        assert why in str(ei.value) and str(target) in str(ei.value)
        assert "\n" not in str(ei.value)
    assert tree_digest(tmp_path) == before


def test_truncated_map_can_still_be_overwritten(map_copy, built):
    (map_copy / "index.faiss").write_bytes(b"")  # a broken map is still a map
    with pytest.raises(MapError):
        VprMap.load(str(map_copy))
    write(built.vmap, map_copy, n=2, overwrite=True)
    assert len(VprMap.load(str(map_copy))) == 2
    assert leftovers(map_copy) == []


# --------------------------------------------------------------------------------------------
# (d) a writer dying between its two renames
# --------------------------------------------------------------------------------------------

class SimulatedKill(BaseException):
    pass


def fail_after_move_aside(monkeypatch):
    """From the moment the old map was renamed aside, every rename fails and nothing is removed:
    what a writer killed at that moment leaves on disk (the new map complete in ``.tmp-PID``, the
    old one in ``.old-PID``, nothing at the map path)."""
    real_rename = os.rename
    state = {"aside": False}

    def rename(src, dst):
        if state["aside"]:
            raise SimulatedKill(f"killed before rename {src} -> {dst}")
        real_rename(src, dst)
        if ".old-" in os.fspath(dst):
            state["aside"] = True

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    return state


def test_load_restores_the_previous_map_after_an_interrupted_replace(map_copy, built, monkeypatch, caplog):
    state = fail_after_move_aside(monkeypatch)
    with pytest.raises(SimulatedKill):
        write(built.vmap, map_copy, n=1, overwrite=True)
    monkeypatch.undo()
    assert state["aside"]
    pid = os.getpid()
    assert not os.path.exists(map_copy)  # the crash window: no map at the path
    assert leftovers(map_copy) == [f".lund3.old-{pid}", f".lund3.tmp-{pid}"]

    with caplog.at_level(logging.WARNING, logger="vpr_localizer.mapping.store"):
        again = VprMap.load(str(map_copy))
    assert len(again) == len(FRAMES)  # the previous map, not the half-swapped new one
    assert [k.frame for k in again.keyframes] == list(FRAMES)
    assert any("restored the previous map" in r.getMessage() and str(map_copy) in r.getMessage()
               for r in caplog.records)
    assert leftovers(map_copy) == [f".lund3.tmp-{pid}"]  # the dead write's temp dir

    # a later save removes the stale temporary directory and replaces the map normally
    write(built.vmap, map_copy, n=2, overwrite=True)
    assert len(VprMap.load(str(map_copy))) == 2
    assert leftovers(map_copy) == []
    assert sorted(os.listdir(map_copy.parent)) == ["lund3"]


def test_save_restores_before_checking_the_target(map_copy, built, monkeypatch):
    fail_after_move_aside(monkeypatch)
    with pytest.raises(SimulatedKill):
        write(built.vmap, map_copy, n=1, overwrite=True)
    monkeypatch.undo()
    assert not os.path.exists(map_copy)
    # without overwrite the restored previous map is protected ...
    with pytest.raises(MapError, match="already exists"):
        write(built.vmap, map_copy, n=2)
    assert len(VprMap.load(str(map_copy))) == len(FRAMES)
    # ... with overwrite it is replaced, and no sibling is left
    write(built.vmap, map_copy, n=2, overwrite=True)
    assert len(VprMap.load(str(map_copy))) == 2
    assert leftovers(map_copy) == []


def test_writer_process_killed_between_renames(map_copy, tmp_path):
    """A real crash: a separate process dies (``os._exit``) right after moving the map aside."""
    script = tmp_path / "killed_writer.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from vpr_localizer.mapping.index import build_index
        from vpr_localizer.mapping.store import VprMap, write_map

        path = {str(map_copy)!r}
        vmap = VprMap.load(path)
        real_rename = os.rename

        def rename(src, dst):
            real_rename(src, dst)
            if ".old-" in os.fspath(dst):
                os._exit(9)

        os.rename = rename
        write_map(path, vmap.keyframes[:1], build_index(vmap.index.reconstruct_n(0, 1)),
                  vmap.encoder_checkpoint, vmap.fingerprint, vmap.datum, overwrite=True)
    """))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 9, stderr
    assert not os.path.exists(map_copy)
    assert leftovers(map_copy) == [f".lund3.old-{p.pid}", f".lund3.tmp-{p.pid}"]

    assert len(VprMap.load(str(map_copy))) == len(FRAMES)
    assert leftovers(map_copy) == [f".lund3.tmp-{p.pid}"]
    removed = map_store.clean_stale_siblings(str(map_copy))
    assert [os.path.basename(r) for r in removed] == [f".lund3.tmp-{p.pid}"]
    assert sorted(os.listdir(map_copy.parent)) == ["lund3"]


def test_incomplete_backup_is_neither_restored_nor_deleted(map_copy):
    aside = map_copy.parent / f".lund3.old-{dead_pid()}"
    os.rename(map_copy, aside)
    (aside / "keyframes.sqlite").unlink()  # not a complete map: do not put it back
    with pytest.raises(MapError, match="map not found"):
        VprMap.load(str(map_copy))
    assert map_store.clean_stale_siblings(str(map_copy)) == []  # the last copy is kept
    assert aside.is_dir() and not map_copy.exists()


# --------------------------------------------------------------------------------------------
# (e) stale siblings of dead writers
# --------------------------------------------------------------------------------------------

def test_save_removes_stale_siblings_of_dead_writers_only(map_copy, built):
    parent = map_copy.parent
    dead = dead_pid()
    live = subprocess.Popen(["sleep", "120"])
    try:
        stale_tmp = parent / f".lund3.tmp-{dead}"
        stale_tmp.mkdir()
        (stale_tmp / "index.faiss").write_bytes(b"half written")
        stale_old = parent / f".lund3.old-{dead}"
        shutil.copytree(map_copy, stale_old)
        stale_file = parent / f".lund3.old-{dead_pid()}"  # a stray file, not a directory
        stale_file.write_text("a stray file")
        live_tmp = parent / f".lund3.tmp-{live.pid}"  # someone else writing right now: keep
        live_tmp.mkdir()
        other = [parent / ".lund3.tmp-notapid", parent / f".lund3x.tmp-{dead}", parent / "notes.txt"]
        for o in other:
            o.write_text("not the writer's")

        write(built.vmap, map_copy, n=2, overwrite=True)

        assert len(VprMap.load(str(map_copy))) == 2
        assert not stale_tmp.exists() and not stale_old.exists() and not stale_file.exists()
        assert live_tmp.is_dir()
        assert all(o.exists() for o in other)
        assert leftovers(map_copy) == sorted([live_tmp.name, ".lund3.tmp-notapid"])
    finally:
        live.kill()
        live.wait()


def test_stale_siblings_removed_when_writing_a_new_map(tmp_path, built):
    target = tmp_path / "fresh"
    stale = tmp_path / f".fresh.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "map.yaml").write_text("half")
    write(built.vmap, target, n=2)
    assert len(VprMap.load(str(target))) == 2
    assert sorted(os.listdir(tmp_path)) == ["fresh"]
