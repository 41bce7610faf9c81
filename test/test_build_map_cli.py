"""``vpr-localizer build-map`` and ``vpr-localizer localize`` on real lund_gps images.

Builds run in-process through :func:`vpr_localizer.cli.main.main` (small inputs: VGG16 at 128x96,
NetVLAD K=8); the error cases run the installed command as subprocesses, all started at once,
to check the exit status and that stderr holds one error line and no traceback.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pymap3d
import pytest
import yaml
from PIL import Image

from conftest import exif_gps_pillow
from vpr_localizer.cli.main import main
from vpr_localizer.io.image_files import read_exif_gps
from vpr_localizer.mapping.store import VprMap

REPO_ROOT = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "vpr-localizer build-map: error:"


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def lund(datasets_dir, data_file):
    """``lund(i)`` -> path of lund_gps/<i:02d>.jpg (fails the test when missing)."""
    d = datasets_dir / "lund_gps"
    return lambda i: data_file(d / f"{i:02d}.jpg")


@pytest.fixture(scope="module")
def enc_args(vgg_path):
    return ["--weights", str(vgg_path), "--image-size", "128", "96", "--clusters", "8", "--device", "cpu"]


def copy_file(src, dst) -> Path:
    shutil.copyfile(src, dst)  # not copy(): the shared data is read-only
    return Path(dst)


def to_png(src, dst, size=(320, 240)) -> Path:
    """A real image re-encoded as PNG (no EXIF), downsized to keep decoding cheap."""
    with Image.open(src) as im:
        im.convert("RGB").resize(size, Image.BILINEAR).save(dst)
    assert read_exif_gps(dst) is None
    return Path(dst)


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def load_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def enu(lat, lon, alt, datum):
    e, n, u = pymap3d.geodetic2enu(lat, lon, alt, datum.lat, datum.lon, datum.alt)
    return float(e), float(n), float(u)


# --------------------------------------------------------------------------------------------
# layout (a): EXIF GPS, with unreadable files
# --------------------------------------------------------------------------------------------

def test_exif_layout_skips_bad_files(tmp_path, lund, enc_args, capsys, caplog, error_procs):
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 3, 4):
        copy_file(lund(i), images / f"{i:02d}.jpg")
    (images / "bad_empty.jpg").write_bytes(b"")
    data = lund(5).read_bytes()
    (images / "bad_trunc.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "map"

    caplog.set_level(logging.WARNING)
    rc, stdout, _ = run(["build-map", "--images", images, "--out", out, *enc_args], capsys)
    assert rc == 0

    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for bad in ("bad_empty.jpg", "bad_trunc.jpg"):
        assert any(str(images / bad) in m for m in warned), f"no warning names {bad}: {warned}"
    assert any("empty" in m and "bad_empty.jpg" in m for m in warned)
    assert any("truncated" in m and "bad_trunc.jpg" in m for m in warned)
    assert not any(f"{i:02d}.jpg" in m for m in warned for i in (1, 2, 3, 4))

    assert f"map written to {out}" in stdout
    assert "4 keyframes" in stdout and "2 image(s) skipped" in stdout
    assert "geotagged" in stdout

    vmap = VprMap.load(str(out))
    assert len(vmap) == 4 and vmap.index.ntotal == 4
    assert [k.frame for k in vmap.keyframes] == [1, 2, 3, 4]
    assert [k.image_path for k in vmap.keyframes] == [str(images / f"{i:02d}.jpg") for i in (1, 2, 3, 4)]
    assert vmap.meta["build"]["skipped"] == 2 and vmap.meta["build"]["images"] == 4
    gps = [exif_gps_pillow(lund(i)) for i in (1, 2, 3, 4)]
    assert (vmap.datum.lat, vmap.datum.lon, vmap.datum.alt) == pytest.approx(gps[0], abs=1e-9)
    for kf, g in zip(vmap.keyframes, gps):
        assert (kf.lat, kf.lon) == pytest.approx(g[:2], abs=1e-9)
        assert (kf.x, kf.y, kf.z) == pytest.approx(enu(*g, vmap.datum), abs=1e-6)
    # 01 -> 04 walks about 21 m north-west
    assert 15.0 < math.hypot(vmap.keyframes[3].x, vmap.keyframes[3].y) < 30.0


# --------------------------------------------------------------------------------------------
# layout (b): CSV
# --------------------------------------------------------------------------------------------

@pytest.fixture
def png_folder(tmp_path, lund):
    """PNG copies (no EXIF) of lund 01..04 with names that carry no position."""
    images = tmp_path / "images"
    images.mkdir()
    names = []
    for i, tag in zip((1, 2, 3, 4), "abcd"):
        to_png(lund(i), images / f"view_{tag}.png")
        names.append(f"view_{tag}.png")
    return SimpleNamespace(dir=images, names=names, src=[lund(i) for i in (1, 2, 3, 4)])


def test_csv_layout_lat_lon(tmp_path, png_folder, enc_args, capsys):
    meta_dir = tmp_path / "meta"  # the CSV lives elsewhere: image paths are relative to --images
    meta_dir.mkdir()
    csv_path = meta_dir / "positions.csv"
    gps = [exif_gps_pillow(p) for p in png_folder.src]
    headings = [0.0, 90.0, 180.0, 270.0]  # degrees clockwise from north
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "lat", "lon", "alt", "heading"])
        for name, (lat, lon, alt), h in zip(png_folder.names, gps, headings):
            w.writerow([name, repr(lat), repr(lon), repr(alt), h])
    out = tmp_path / "map"
    rc, stdout, _ = run(["build-map", "--images", png_folder.dir, "--csv", csv_path, "--out", out, *enc_args],
                        capsys)
    assert rc == 0
    assert "4 keyframes" in stdout and "0 image(s) skipped" in stdout

    vmap = VprMap.load(str(out))
    assert len(vmap) == 4
    assert [os.path.basename(k.image_path) for k in vmap.keyframes] == png_folder.names
    assert all(os.path.dirname(k.image_path) == str(png_folder.dir) for k in vmap.keyframes)
    assert vmap.datum is not None
    assert (vmap.datum.lat, vmap.datum.lon, vmap.datum.alt) == pytest.approx(gps[0], abs=1e-12)
    for kf, g, h in zip(vmap.keyframes, gps, headings):
        assert (kf.lat, kf.lon, kf.alt) == pytest.approx(g, abs=1e-12)
        assert (kf.x, kf.y, kf.z) == pytest.approx(enu(*g, vmap.datum), abs=1e-6)
        yaw = math.radians(90.0 - h)  # ENU yaw, counter-clockwise from east
        assert (kf.qx, kf.qy, kf.qz, kf.qw) == pytest.approx((0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)),
                                                             abs=1e-9)
    assert vmap.keyframes[1].x < -10.0 and vmap.keyframes[1].y > 5.0  # 02 is ~12 m W, ~8 m N of 01
    with open(out / "map.yaml") as f:
        assert yaml.safe_load(f)["datum"]["lat"] == pytest.approx(gps[0][0], abs=1e-12)


def test_csv_layout_metric_x_y(tmp_path, png_folder, enc_args, capsys):
    csv_path = tmp_path / "xy.csv"
    xy = [(0.0, 0.0), (12.5, -3.25), (25.0, 1.5), (-7.75, 40.0)]
    with open(csv_path, "w", newline="") as f:
        f.write("Image,X,Y,condition\n")  # header case is ignored
        for name, (x, y) in zip(png_folder.names, xy):
            f.write(f"{name},{x},{y},day\n")
    out = tmp_path / "map"
    rc, stdout, _ = run(["build-map", "--images", png_folder.dir, "--csv", csv_path, "--out", out, *enc_args],
                        capsys)
    assert rc == 0
    assert "4 keyframes" in stdout and "no geodetic datum" in stdout

    vmap = VprMap.load(str(out))
    assert [(k.x, k.y) for k in vmap.keyframes] == xy  # verbatim
    assert all(math.isnan(k.z) and math.isnan(k.lat) and math.isnan(k.lon) for k in vmap.keyframes)
    assert all(k.condition == "day" for k in vmap.keyframes)
    assert vmap.datum is None and vmap.has_positions
    with open(out / "map.yaml") as f:
        meta = yaml.safe_load(f)
    assert "datum" in meta and meta["datum"] is None


# --------------------------------------------------------------------------------------------
# layout (c): frame index only, and --select
# --------------------------------------------------------------------------------------------

def test_frame_index_layout(tmp_path, lund, enc_args, capsys):
    images = tmp_path / "frames"
    images.mkdir()
    for i in (10, 11, 12, 13):
        to_png(lund(i), images / f"frame_{i:04d}.png")
    out = tmp_path / "map"
    rc, stdout, _ = run(["build-map", "--images", images, "--gps", "none", "--out", out, *enc_args], capsys)
    assert rc == 0
    assert "4 keyframes" in stdout and "no geodetic datum" in stdout
    vmap = VprMap.load(str(out))
    assert [k.frame for k in vmap.keyframes] == [10, 11, 12, 13]
    assert [os.path.basename(k.image_path) for k in vmap.keyframes] == [f"frame_{i:04d}.png" for i in (10, 11, 12, 13)]
    assert np.isnan(vmap.positions).all() and not vmap.has_positions
    assert all(math.isnan(k.lat) and math.isnan(k.lon) for k in vmap.keyframes)
    assert vmap.datum is None and vmap.meta["datum"] is None
    # real, distinct images: each one retrieves itself first
    scores, ids = vmap.index.search(vmap.index.reconstruct_n(0, 4), 1)
    assert list(ids[:, 0]) == [0, 1, 2, 3]


def test_select_even_with_gps_none_ignores_exif(tmp_path, lund, enc_args, capsys):
    images = tmp_path / "frames"
    images.mkdir()
    for i in (10, 11, 12, 13, 14, 15):  # JPEG copies that still carry EXIF GPS
        copy_file(lund(i), images / f"frame_{i:04d}.jpg")
    assert read_exif_gps(images / "frame_0010.jpg") is not None
    out = tmp_path / "map"
    rc, stdout, _ = run(["build-map", "--images", images, "--gps", "none", "--select", "even",
                         "--out", out, *enc_args], capsys)
    assert rc == 0
    assert "3 keyframes" in stdout
    vmap = VprMap.load(str(out))
    assert [k.frame for k in vmap.keyframes] == [10, 12, 14]
    assert [k.image_path for k in vmap.keyframes] == [str(images / f"frame_{i:04d}.jpg") for i in (10, 12, 14)]
    assert np.isnan(vmap.positions).all() and vmap.datum is None  # --gps none: EXIF not used


def test_select_even_with_exif(tmp_path, lund, enc_args, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 3, 4, 5, 6):
        copy_file(lund(i), images / f"{i:02d}.jpg")
    out = tmp_path / "map"
    rc, stdout, _ = run(["build-map", "--images", images, "--gps", "exif", "--select", "even", "--out", out,
                         *enc_args], capsys)
    assert rc == 0 and "3 keyframes" in stdout
    vmap = VprMap.load(str(out))
    assert [k.frame for k in vmap.keyframes] == [2, 4, 6]
    g2 = exif_gps_pillow(lund(2))
    assert (vmap.datum.lat, vmap.datum.lon) == pytest.approx(g2[:2], abs=1e-9)  # datum = first kept image
    for kf, i in zip(vmap.keyframes, (2, 4, 6)):
        assert (kf.x, kf.y, kf.z) == pytest.approx(enu(*exif_gps_pillow(lund(i)), vmap.datum), abs=1e-6)


# --------------------------------------------------------------------------------------------
# errors: exit status 2, one line on stderr, no traceback (subprocesses, started together)
# --------------------------------------------------------------------------------------------

def cli_command():
    exe = Path(sys.executable).with_name("vpr-localizer")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vpr_localizer.cli.main"]


ERROR_CASES = ("missing-folder", "empty-folder", "exif-without-gps", "missing-weights", "existing-map")


@pytest.fixture(scope="module")
def error_procs(tmp_path_factory, lund, vgg_path):
    """Start the error-case subprocesses (all at once); the first test of the module requests
    this fixture so that their start-up (torch import) overlaps with the in-process tests.
    :func:`error_runs` collects them."""
    base = tmp_path_factory.mktemp("cli_errors")
    pngs = base / "pngs"
    pngs.mkdir()
    for i in (1, 2):
        to_png(lund(i), pngs / f"frame_{i:04d}.png")
    (base / "empty").mkdir()
    (base / "empty" / "notes.txt").write_text("not an image")
    existing = base / "existing_map"
    existing.mkdir()
    (existing / "map.yaml").write_text("format: vpr_localizer.map  # sentinel: must not be replaced\n")
    enc = ["--image-size", "128", "96", "--clusters", "8", "--device", "cpu"]
    w = ["--weights", str(vgg_path)]
    cases = {
        "missing-folder": (["--images", base / "nope", "--out", base / "m1", *w],
                           ["image folder not found", str(base / "nope")], base / "m1"),
        "empty-folder": (["--images", base / "empty", "--out", base / "m2", *w],
                         ["no images", str(base / "empty")], base / "m2"),
        "exif-without-gps": (["--images", pngs, "--gps", "exif", "--out", base / "m3", *w],
                             ["no GPS position in EXIF", str(pngs / "frame_0001.png")], base / "m3"),
        "missing-weights": (["--images", pngs, "--out", base / "m4", "--weights", base / "missing.pth"],
                            ["weight file not found", str(base / "missing.pth")], base / "m4"),
        "existing-map": (["--images", pngs, "--out", existing, *w],
                         ["already exists", str(existing), "--overwrite"], None),
    }
    # OMP_WAIT_POLICY=PASSIVE: same results, but torch's and faiss's OpenMP threads stop spinning
    # against each other on the 2-core test machine
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    procs = {}
    try:
        for name, (args, expect, out_path) in cases.items():
            fout, ferr = open(base / f"{name}.out", "w+"), open(base / f"{name}.err", "w+")
            p = subprocess.Popen([*cli_command(), "build-map", *map(str, args), *enc], cwd=REPO_ROOT, env=env,
                                 stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL, text=True)
            procs[name] = SimpleNamespace(proc=p, fout=fout, ferr=ferr, expect=expect, out_path=out_path,
                                          existing=existing)
        yield procs
    finally:
        for c in procs.values():
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
            c.fout.close()
            c.ferr.close()


@pytest.fixture(scope="module")
def error_runs(error_procs):
    results = {}
    for name, c in error_procs.items():
        rc = c.proc.wait(timeout=300)
        c.fout.seek(0)
        c.ferr.seek(0)
        results[name] = SimpleNamespace(rc=rc, out=c.fout.read(), err=c.ferr.read(), expect=c.expect,
                                        out_path=c.out_path)
    ex = error_procs["existing-map"].existing
    results["existing-map"].unchanged = (sorted(os.listdir(ex)) == ["map.yaml"] and "sentinel" in
                                         (ex / "map.yaml").read_text())
    return results


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_exit_status_and_message(error_runs, case):
    r = error_runs[case]
    assert r.rc == 2, r.err
    assert "Traceback" not in r.err
    lines = [ln for ln in r.err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, r.err
    assert errors[0].startswith(ERROR_PREFIX)
    assert lines[-1] == errors[0]  # the error is the last thing printed
    for text in r.expect:
        assert text in errors[0]
    assert "map written" not in r.out
    if r.out_path is not None:
        assert not os.path.exists(r.out_path)
    else:
        assert r.unchanged  # the existing map was not touched


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_prints_exactly_one_stderr_line(error_runs, case):
    r = error_runs[case]
    assert r.err.count("\n") == 1 and r.err.endswith("\n"), r.err
    assert r.err.startswith(ERROR_PREFIX)
    assert r.out == ""


# --------------------------------------------------------------------------------------------
# localize
# --------------------------------------------------------------------------------------------

MAP_FRAMES = (2, 4, 6, 8, 10, 12)
QUERY_FRAMES = (3, 7, 11)


@pytest.fixture(scope="module")
def lund_map(tmp_path_factory, lund, enc_args):
    base = tmp_path_factory.mktemp("lund_map")
    images = base / "map_images"
    images.mkdir()
    for i in MAP_FRAMES:
        copy_file(lund(i), images / f"{i:02d}.jpg")
    out = base / "map"
    assert main(["build-map", "--images", str(images), "--gps", "exif", "--out", str(out), *enc_args]) == 0
    return SimpleNamespace(path=str(out), map=VprMap.load(str(out)))


@pytest.fixture(scope="module")
def query_dir(tmp_path_factory, lund):
    q = tmp_path_factory.mktemp("queries")
    for i in QUERY_FRAMES:
        copy_file(lund(i), q / f"{i:02d}.jpg")
    data = lund(9).read_bytes()
    (q / "09_broken.jpg").write_bytes(data[: len(data) // 3])
    return q


def _check_rows(rows, vmap, lund):
    datum = vmap.datum
    assert [r["query"] for r in rows] == [f"{i:02d}.jpg" for i in QUERY_FRAMES]
    pos = vmap.positions
    for r, qf in zip(rows, QUERY_FRAMES):
        ids, scores = r["top_ids"], r["top_scores"]
        assert sorted(ids) == list(range(len(MAP_FRAMES)))  # top_k 10 > 6 keyframes: all of them
        assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0 + 1e-5
        assert r["best_id"] == ids[0]
        best = vmap.keyframes[ids[0]]
        assert r["best_image"] == best.image_path
        # real retrieval: the best match is the map frame just before or after the query
        assert abs(best.frame - qf) == 1, (qf, best.frame, scores)
        x, y, z = float(r["x"]), float(r["y"]), float(r["z"])
        assert pos[:, 0].min() - 1e-6 <= x <= pos[:, 0].max() + 1e-6  # a weighted mean of keyframes
        assert pos[:, 1].min() - 1e-6 <= y <= pos[:, 1].max() + 1e-6
        true = enu(*exif_gps_pillow(lund(qf)), datum)
        assert math.hypot(x - true[0], y - true[1]) < 15.0
        lat, lon, _ = pymap3d.enu2geodetic(x, y, z, datum.lat, datum.lon, datum.alt)
        assert float(r["lat"]) == pytest.approx(float(lat), abs=1e-9)
        assert float(r["lon"]) == pytest.approx(float(lon), abs=1e-9)
        cxx, cxy, cyy = float(r["cov_xx"]), float(r["cov_xy"]), float(r["cov_yy"])
        assert cxx >= 4.0 - 1e-9 and cyy >= 4.0 - 1e-9  # sigma_floor_m = 2 m
        assert cxx * cyy - cxy ** 2 > 0.0
        # consistent set: the keyframes within 25 m (LocalizerConfig default) of the best match;
        # margin: best score - best score outside it (or - the last score when all are inside)
        inside = np.hypot(*(pos[ids, :2] - pos[ids[0], :2]).T) <= 25.0
        assert int(r["consistent"]) == int(inside.sum())
        outside = np.asarray(scores)[~inside]
        margin = scores[0] - (outside.max() if outside.size else scores[-1])
        assert float(r["margin"]) == pytest.approx(margin, abs=1e-5)  # scores are rounded to 1e-6


def test_localize_writes_csv(lund_map, query_dir, lund, tmp_path, capsys, caplog):
    out = tmp_path / "res" / "results.csv"
    caplog.set_level(logging.WARNING)
    rc, stdout, _ = run(["localize", "--map", lund_map.path, "--images", query_dir, "--out", out,
                         "--device", "cpu"], capsys)
    assert rc == 0
    assert "localised 3 of 4 images" in stdout and "skipped 1" in stdout and str(out) in stdout
    assert any("09_broken.jpg" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    rows = load_csv(out)
    assert len(rows) == 3
    assert {"query", "best_id", "top_ids", "top_scores", "x", "y", "z", "lat", "lon", "cov_xx", "cov_xy",
            "cov_yy", "margin", "consistent", "best_image"} <= set(rows[0])
    parsed = [dict(r, best_id=int(r["best_id"]), top_ids=json.loads(r["top_ids"]),
                   top_scores=json.loads(r["top_scores"])) for r in rows]
    _check_rows(parsed, lund_map.map, lund)


def test_localize_writes_json_and_reports_skipped(lund_map, query_dir, lund, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc, stdout, _ = run(["localize", "--map", lund_map.path, "--images", query_dir, "--out", out,
                         "--device", "cpu", "--top-k", "3"], capsys)
    assert rc == 0 and "skipped 1" in stdout
    with open(out) as f:
        doc = json.load(f)
    assert doc["map"] == lund_map.path
    assert len(doc["skipped"]) == 1
    path, reason = doc["skipped"][0]
    assert path == str(query_dir / "09_broken.jpg") and "truncated" in reason
    rows = doc["results"]
    assert len(rows) == 3
    assert all(len(r["top_ids"]) == 3 and len(r["top_scores"]) == 3 for r in rows)  # --top-k 3
    # with top-k 3 the lists are a prefix of the full ranking; re-run with the default to compare
    full = tmp_path / "full.json"
    assert main(["localize", "--map", lund_map.path, "--images", str(query_dir), "--out", str(full),
                 "--device", "cpu"]) == 0
    with open(full) as f:
        full_rows = json.load(f)["results"]
    for r, fr in zip(rows, full_rows):
        assert r["top_ids"] == fr["top_ids"][:3]
        assert r["top_scores"] == pytest.approx(fr["top_scores"][:3], abs=1e-5)
    _check_rows(full_rows, lund_map.map, lund)


def test_localize_against_missing_map_is_an_error(tmp_path, query_dir, capsys):
    rc, stdout, err = run(["localize", "--map", tmp_path / "nope", "--images", query_dir,
                           "--out", tmp_path / "r.csv"], capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("vpr-localizer localize: error: map not found")
    assert not (tmp_path / "r.csv").exists()
