"""First use of the command line (issue 12, items 9, 10, 17 and 19).

* 9: a ``map.yaml`` with a malformed ``datum``, ``build`` or ``encoder`` section is one
  :class:`MapError` naming the map and the field (``VprMap.load``, ``encoder_for_map``), and the
  CLI prints one line and exits 2, no traceback.
* 10: ``files`` entries of ``map.yaml`` are confined to the map directory (no absolute path, no
  ``..``, no symbolic link leading out): nothing outside the map is stat'ed or hashed.
* 17: ``--shared`` is found from any working directory, and ``evaluate --scenario --name``
  writes to its own folder.
* 19: progress bars redirected to a log file are a handful of lines, not one per image.

One real map (all 29 lund_gps frames, VGG16 at 64x48, NetVLAD K=8, batch size 1) is built per
module by ``python -m vpr_localizer.cli.main build-map`` in a subprocess whose stderr goes to a
file; the other maps are copies of it with an edited ``map.yaml``.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vpr_localizer.cli.common import repository_root, resolve_shared_dir
from vpr_localizer.cli.main import main, scenario_output
from vpr_localizer.errors import MapError
from vpr_localizer.files import sha256_file
from vpr_localizer.localization.localize import encoder_for_map
from vpr_localizer.mapping import store as map_store
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.progress import LOG_INTERVAL_S, LOG_NCOLS, progress_bar

REPO = Path(__file__).resolve().parents[1]
LOCALIZE_ERROR = "vpr-localizer localize: error:"


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory, datasets_dir, vgg_path):
    """A real map built by the CLI in a subprocess; its stderr is kept (a file, not a terminal)."""
    root = tmp_path_factory.mktemp("first_use")
    out = root / "lund"
    err_path = root / "build_map.stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(err_path, "wb") as err:
        proc = subprocess.run([sys.executable, "-m", "vpr_localizer.cli.main", "build-map",
                               "--images", str(datasets_dir / "lund_gps"), "--gps", "exif", "--out", str(out),
                               "--weights", str(vgg_path), "--image-size", "64", "48", "--clusters", "8",
                               "--device", "cpu", "--batch-size", "1"],
                              cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=err, timeout=300)
    assert proc.returncode == 0, err_path.read_bytes()[-2000:]
    vmap = VprMap.load(str(out))
    return SimpleNamespace(path=out, vmap=vmap, stderr=err_path.read_bytes(), n=len(vmap),
                           images=datasets_dir / "lund_gps")


@pytest.fixture
def map_copy(built, tmp_path):
    dst = tmp_path / "maps" / "lund"
    shutil.copytree(built.path, dst)
    return dst


def edit_yaml(map_dir: Path, edit) -> Path:
    """Apply ``edit(meta)`` to ``map_dir/map.yaml`` (in place when it returns None)."""
    p = map_dir / "map.yaml"
    meta = yaml.safe_load(p.read_text())
    new = edit(meta)
    p.write_text(yaml.safe_dump(meta if new is None else new, sort_keys=False))
    return p


def one_error_line(err: str, prefix: str = LOCALIZE_ERROR) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def localize_cli(map_dir, images, tmp_path, capsys):
    rc = main(["localize", "--map", str(map_dir), "--images", str(images), "--out", str(tmp_path / "res.csv"),
               "--device", "cpu"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------------------------
# 9: malformed sections of map.yaml are one MapError naming the map and the field
# --------------------------------------------------------------------------------------------

def _set(section, key, value):
    def edit(meta):
        if section is None:
            meta[key] = value
        else:
            meta[section][key] = value
    return edit


def _drop(section, key):
    def edit(meta):
        (meta if section is None else meta[section]).pop(key)
    return edit


BAD_SECTIONS = {
    "datum_string": (_set(None, "datum", "Lund, Sweden"), "'datum'"),
    "datum_list": (_set(None, "datum", [55.7, 13.2]), "'datum'"),
    "datum_no_lat": (_drop("datum", "lat"), "'datum' has no 'lat'"),
    "datum_unknown_key": (_set("datum", "height", 3.0), "height"),
    "datum_lat_text": (_set("datum", "lat", "north"), "datum.lat"),
    "build_string": (_set(None, "build", "yesterday"), "'build' must be a mapping"),
    "build_list": (_set(None, "build", ["a", "b"]), "'build' must be a mapping"),
    "build_weights_number": (_set("build", "weights", 42), "build.weights"),
    "encoder_no_backbone": (_drop("encoder", "backbone"), "no 'backbone'"),
    "encoder_image_size_text": (_set("encoder", "image_size", "64x48"), "encoder.image_size"),
    "encoder_no_num_clusters": (_drop("encoder", "num_clusters"), "no 'num_clusters'"),
    "encoder_guidance_string": (_set("encoder", "guidance", "yes"), "encoder.guidance"),
}


@pytest.mark.parametrize("case", sorted(BAD_SECTIONS))
def test_malformed_map_yaml_is_one_map_error(case, map_copy):
    edit, field = BAD_SECTIONS[case]
    meta_path = edit_yaml(map_copy, edit)
    with pytest.raises(MapError) as ei:
        VprMap.load(str(map_copy))
    msg = str(ei.value)
    assert "\n" not in msg and str(meta_path) in msg and field in msg, msg


@pytest.mark.parametrize("case", ["datum_string", "datum_no_lat", "build_list", "encoder_no_backbone"])
def test_localize_cli_reports_a_malformed_map_in_one_line(case, map_copy, built, tmp_path, capsys):
    edit, field = BAD_SECTIONS[case]
    edit_yaml(map_copy, edit)
    rc, out, err = localize_cli(map_copy, built.images, tmp_path, capsys)
    assert rc == 2
    line = one_error_line(err)
    assert str(map_copy) in line and field in line, line
    assert not (tmp_path / "res.csv").exists()


def test_localize_console_script_has_no_traceback(map_copy, built, tmp_path):
    """The real entry point, in a fresh interpreter: exit status 2, one line on stderr."""
    edit_yaml(map_copy, _drop("encoder", "backbone"))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vpr_localizer.cli.main", "localize", "--map", str(map_copy),
                           "--images", str(built.images), "--out", str(tmp_path / "res.csv"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "backbone" in line and str(map_copy) in line


@pytest.mark.parametrize("edit, field", [
    (lambda meta: meta["encoder"].pop("backbone"), "backbone"),
    (lambda meta: meta["encoder"].update(preprocessing=None), "encoder.preprocessing"),
    (lambda meta: meta.update(build="nope"), "'build' must be a mapping"),
    (lambda meta: meta["encoder"].update(guidance={"static_mask": True, "seg_stream": False,
                                                   "attention": False}), "encoder.guidance.segmentation"),
])
def test_encoder_for_map_checks_the_sections_it_reads(built, edit, field):
    """A map object built in memory (not through load) with a bad section: MapError, not KeyError."""
    meta = yaml.safe_load(yaml.safe_dump(built.vmap.meta))
    edit(meta)
    vmap = VprMap(built.vmap.path, meta, built.vmap.keyframes, built.vmap.index, built.vmap.encoder_checkpoint)
    with pytest.raises(MapError) as ei:
        encoder_for_map(vmap, device="cpu")
    assert field in str(ei.value) and str(built.vmap.path) in str(ei.value)


def test_a_good_map_still_loads_and_localizes(built, map_copy, tmp_path, capsys):
    assert VprMap.load(str(map_copy)).datum is not None
    rc, out, err = localize_cli(map_copy, built.images, tmp_path, capsys)
    assert rc == 0, err
    assert f"localised {built.n} of {built.n} images" in out


# --------------------------------------------------------------------------------------------
# 10: files entries are confined to the map directory
# --------------------------------------------------------------------------------------------

def _listed(target: Path):
    return {"bytes": os.path.getsize(target), "sha256": sha256_file(str(target))}


@pytest.fixture
def hashed(monkeypatch):
    """Every file the map store hashes."""
    seen = []
    real = map_store.sha256_file

    def spy(path, *a, **kw):
        seen.append(os.path.realpath(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(map_store, "sha256_file", spy)
    return seen


def _outside_file(tmp_path: Path) -> Path:
    p = tmp_path / "maps" / "secret.txt"
    p.write_text("not part of any map\n")
    return p


@pytest.mark.parametrize("how", ["absolute", "dotdot", "subpath_dotdot", "symlink", "etc_hostname"])
def test_files_entries_outside_the_map_are_refused(how, map_copy, tmp_path, hashed, capsys, built):
    outside = _outside_file(tmp_path)
    if how == "absolute":
        name = str(outside)
    elif how == "dotdot":
        name = "../secret.txt"
    elif how == "subpath_dotdot":
        name = "sub/../../secret.txt"
    elif how == "symlink":
        name = "link.bin"
        os.symlink(outside, map_copy / name)
    else:
        name = "/etc/hostname"
        outside = Path(name)
    info = _listed(outside) if outside.exists() else {"bytes": 1, "sha256": "0" * 64}
    edit_yaml(map_copy, lambda meta: meta["files"].update({name: info}))
    with pytest.raises(MapError) as ei:
        VprMap.load(str(map_copy))
    msg = str(ei.value)
    assert repr(name) in msg and "map.yaml" in msg and str(map_copy) in msg, msg
    root = os.path.realpath(map_copy)
    assert all(os.path.dirname(p) == root for p in hashed), hashed  # nothing outside was hashed
    rc, out, err = localize_cli(map_copy, built.images, tmp_path, capsys)
    assert rc == 2 and repr(name) in one_error_line(err)


def test_confined_map_file(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    assert map_store.confined_map_file(str(d), "index.faiss") == str(d / "index.faiss")
    for bad in ["", ".", "..", "/etc/hostname", "../x", "a/b", "a/../b", 7, None]:
        assert map_store.confined_map_file(str(d), bad) is None, bad


def test_recovery_ignores_a_backup_listing_outside_files(built, tmp_path):
    """``recover_interrupted_replace`` only trusts a backup whose files are all inside it."""
    target = tmp_path / "maps" / "lund"
    backup = tmp_path / "maps" / ".lund.old-999999"
    shutil.copytree(built.path, backup)
    outside = _outside_file(tmp_path)
    edit_yaml(backup, lambda meta: meta["files"].update({str(outside): _listed(outside)}))
    assert map_store.recover_interrupted_replace(str(target)) is False
    assert not target.exists() and backup.is_dir()


# --------------------------------------------------------------------------------------------
# 17: --shared from any working directory; evaluate --scenario --name
# --------------------------------------------------------------------------------------------

def test_resolve_shared_dir_from_another_working_directory(tmp_path, monkeypatch, shared_dir):
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / ".." / "shared").is_dir()
    assert os.path.realpath(resolve_shared_dir(os.path.join("..", "shared"))) == os.path.realpath(shared_dir)
    assert os.path.realpath(repository_root()) == os.path.realpath(REPO)
    (tmp_path / "mydata").mkdir()
    assert resolve_shared_dir("mydata") == "mydata"  # found relative to the cwd: kept
    assert resolve_shared_dir("no_such_folder") == "no_such_folder"  # nowhere: unchanged
    assert resolve_shared_dir(str(shared_dir)) == str(shared_dir)


def test_scenario_output_uses_name():
    args = SimpleNamespace(out="results/evaluate", name=None)
    assert scenario_output(args, "lund_odd_vs_even") == (os.path.join("results/evaluate", "lund_odd_vs_even"),
                                                         "lund_odd_vs_even")
    args.name = "try2"
    assert scenario_output(args, "lund_odd_vs_even") == (os.path.join("results/evaluate", "try2"), "try2")
    assert scenario_output(SimpleNamespace(out="o"), "x") == (os.path.join("o", "x"), "x")  # demo: no --name


@pytest.fixture
def fake_evaluate(monkeypatch):
    """Replace the (minutes-long) evaluation by a recorder that writes metrics.json; the scenario's
    images are still loaded from the shared folder by the CLI."""
    import vpr_localizer.evaluation.evaluate as ev

    calls = []

    def fake(map_records, query_records, cfg, gt, out_dir, name="evaluation", **kw):
        calls.append(SimpleNamespace(out_dir=out_dir, name=name, n_map=len(map_records),
                                     n_query=len(query_records), weights=cfg.weights))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"name": name}, f)
        return SimpleNamespace(metrics={"encoder": {"encode_ms_per_image": 1.0, "device": "cpu"}})

    monkeypatch.setattr(ev, "evaluate", fake)
    monkeypatch.setattr(ev, "summary_lines", lambda metrics: [])
    return calls


def test_evaluate_scenario_from_another_cwd_with_names(tmp_path, monkeypatch, fake_evaluate, shared_dir, capsys):
    monkeypatch.delenv("VPR_SHARED_DIR", raising=False)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name in ("first", "second"):
        assert main(["evaluate", "--scenario", "lund_odd_vs_even", "--name", name, "--device", "cpu"]) == 0
    assert main(["evaluate", "--scenario", "lund_odd_vs_even", "--device", "cpu"]) == 0
    capsys.readouterr()
    outs = [c.out_dir for c in fake_evaluate]
    assert outs == [os.path.join("results", "evaluate", n) for n in ("first", "second", "lund_odd_vs_even")]
    assert [c.name for c in fake_evaluate] == ["first", "second", "lund_odd_vs_even"]
    for c in fake_evaluate:
        assert c.n_map > 0 and c.n_query > 0  # the scenario's images were found from another cwd
        assert os.path.realpath(c.weights).startswith(os.path.realpath(shared_dir))
        assert json.loads((cwd / c.out_dir / "metrics.json").read_text())["name"] == c.name


# --------------------------------------------------------------------------------------------
# 19: progress bars in logs
# --------------------------------------------------------------------------------------------

def test_progress_bars_in_a_log_file_are_a_handful_of_lines(built):
    """The module's build-map ran with stderr to a file: 29 images one by one through two bars
    (k-means sample, encoding) would be ~45 carriage returns with tqdm's defaults."""
    err = built.stderr
    assert b"encoding map" in err  # the bar is still there, once
    assert err.count(b"\r") <= 8, err.count(b"\r")
    assert err.count(b"img/s]") <= 4


def test_progress_bar_settings():
    bar = progress_bar(range(3), file=io.StringIO(), desc="x")
    assert bar.mininterval == LOG_INTERVAL_S and bar.ncols == LOG_NCOLS
    bar.close()
    bar = progress_bar(total=3, file=io.StringIO(), mininterval=1.0)
    assert bar.mininterval == 1.0  # an explicit value wins
    bar.close()

    class Tty(io.StringIO):
        def isatty(self):
            return True
    bar = progress_bar(total=3, file=Tty())
    assert bar.mininterval < LOG_INTERVAL_S and bar.ncols is None  # a terminal keeps tqdm's defaults
    bar.close()
