"""First use of the command line on a user's own files (issue 12, items 13, 15, 16 and 18).

* 13: a CSV with a UTF-8 byte-order mark is read; a latin-1 CSV, a corrupt SQLite file (bag or
  keyframe database) give one error naming the file; ``batch_size`` < 1 and ``pca_dim`` < 0 are
  ConfigErrors; a duplicated CSV row is kept once with one warning naming the file and lines; a
  weight file with pickled objects is refused with our own message (not torch's advice).
* 15: without ``--weights`` the backbone's conventional file is found in ``$VPR_WEIGHTS_DIR``,
  then in ``../shared/weights`` beside the repository; else one error lists both places.
* 16: ``evaluate`` checks the ground-truth kind before encoding anything; ``--gt``,
  ``--frame-tolerance``, ``--map-select`` have help; ``--gt-file query,map`` CSVs are scored.
* 18: NetVLAD k-means samples at least ``39 * K`` local features when the images have them.

Real files are written by the tests (small PNGs made from lund_gps frames, VGG16 at 64x48,
NetVLAD K=8); nothing touches the network.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpr_localizer import weights_path
from vpr_localizer.cli.main import build_parser, main
from vpr_localizer.errors import ConfigError, DatasetError, MapError, WeightsError
from vpr_localizer.evaluation import evaluate as ev
from vpr_localizer.files import load_state_dict_file
from vpr_localizer.io.bags import read_bag
from vpr_localizer.io.records import load_records, records_from_csv
from vpr_localizer.mapping.store import select_keyframe_rows
from vpr_localizer.models.checkpoint import load_checkpoint
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.registry import default_backbone_weights

VGG_FILE = "vgg16_features_imagenet_caffe_bgr.pth"
ENC = ["--image-size", "64", "48", "--clusters", "8", "--device", "cpu", "--batch-size", "4", "--pca-dim", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """Every test of this module runs with one faiss thread (see conftest.faiss_single_thread)."""


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, datasets_dir, data_file):
    """``pngs(folder, names, first=1)``: lund_gps frames re-encoded as 96x72 PNGs (no EXIF)."""
    def make(folder: Path, names, first: int = 1):
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            with Image.open(data_file(datasets_dir / "lund_gps" / f"{first + i:02d}.jpg")) as im:
                im.convert("RGB").resize((96, 72), Image.BILINEAR).save(folder / name)
        return folder
    return make


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"vpr-localizer {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------
# 13: CSV encodings, duplicates, corrupt SQLite, config values, refused pickles
# --------------------------------------------------------------------------------------------

def test_csv_with_bom_is_read(tmp_path):
    p = tmp_path / "poses.csv"
    p.write_bytes("image,x,y\n1.png,0,0\n2.png,1,0\n".encode("utf-8-sig"))
    recs = records_from_csv(str(p), str(tmp_path))
    assert [(r.name, r.x) for r in recs] == [("1.png", 0.0), ("2.png", 1.0)]


def test_latin1_csv_names_the_file(tmp_path):
    p = tmp_path / "caf\u00e9.csv"
    p.write_bytes("image,x,y,condition\n1.png,0,0,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError) as ei:
        records_from_csv(str(p), str(tmp_path))
    msg = str(ei.value)
    assert str(p) in msg and "UTF-8" in msg and "\n" not in msg


def test_duplicate_csv_rows_warn_once_and_keep_the_first(tmp_path, caplog):
    p = tmp_path / "poses.csv"
    p.write_text("image,x,y\n1.png,0,0\n2.png,1,0\n1.png,9,9\n./2.png,8,8\n3.png,2,0\n4.png,nan,0\n4.png,3,0\n")
    with caplog.at_level(logging.WARNING, logger="vpr_localizer.io.records"):
        recs = records_from_csv(str(p), str(tmp_path))
    # 4.png: its first row is unusable (skipped with its own warning), so the second one counts
    assert [(r.name, r.x) for r in recs] == [("1.png", 0.0), ("2.png", 1.0), ("3.png", 2.0), ("4.png", 3.0)]
    warnings = [r.getMessage() for r in caplog.records if "duplicate image row" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert str(p) in warnings[0] and "line 4 repeats line 2" in warnings[0] and "line 5 repeats line 3" in warnings[0]
    assert "2 duplicate" in warnings[0] and "line 8" not in warnings[0]


def test_corrupt_sqlite_files_are_named(tmp_path):
    bad = tmp_path / "bag.db3"
    bad.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    with pytest.raises(DatasetError) as ei:
        read_bag(bad)
    assert str(bad) in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(MapError) as ei:
        select_keyframe_rows(str(bad))
    assert str(bad) in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("kw, text", [({"batch_size": 0}, "batch_size must be >= 1"),
                                      ({"batch_size": -3}, "batch_size must be >= 1"),
                                      ({"pca_dim": -5}, "pca_dim must be >= 0")])
def test_encoder_config_refuses_bad_sizes(kw, text):
    with pytest.raises(ConfigError, match=text):
        EncoderConfig(**kw)
    with pytest.raises(ConfigError, match=text):
        EncoderConfig.from_dict(kw)


def test_pca_dim_zero_is_off():
    assert EncoderConfig(pca_dim=0).pca_dim == 0


@pytest.mark.parametrize("flag, value, text", [("--pca-dim", "-5", "pca_dim must be >= 0"),
                                               ("--batch-size", "0", "batch_size must be >= 1")])
def test_cli_refuses_bad_sizes(tmp_path, pngs, vgg_path, capsys, flag, value, text):
    imgs = pngs(tmp_path / "imgs", ["f1.png", "f2.png"])
    rc, _, err = run(["build-map", "--images", imgs, "--gps", "none", "--out", tmp_path / "map",
                      "--weights", vgg_path, "--device", "cpu", flag, value], capsys)
    assert rc == 2 and text in one_error_line(err, "build-map")
    assert not (tmp_path / "map").exists()


class _NotATensor:
    """Pickled by reference: ``torch.load(weights_only=True)`` refuses it."""


def test_pickled_objects_are_refused_with_our_message(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "obj": _NotATensor()}, p)
    expected = (f"refused to load {p}: it contains pickled Python objects beyond tensors (possibly "
                "malicious); only plain state dicts are accepted")
    for load in (lambda: load_state_dict_file(str(p), "VGG16"), lambda: load_checkpoint(str(p))):
        with pytest.raises(WeightsError) as ei:
            load()
        assert str(ei.value) == expected
        assert "weights_only" not in str(ei.value)
        assert isinstance(ei.value.__cause__, pickle.UnpicklingError)


# --------------------------------------------------------------------------------------------
# 15: default backbone weights
# --------------------------------------------------------------------------------------------

def test_default_weights_resolution_order(tmp_path, monkeypatch, vgg_path):
    env_dir = tmp_path / "env_weights"
    env_dir.mkdir()
    os.symlink(vgg_path, env_dir / VGG_FILE)
    shared = Path(__import__("vpr_localizer").__file__).resolve().parents[2] / "shared" / "weights"
    monkeypatch.delenv(weights_path.WEIGHTS_DIR_ENV, raising=False)
    assert weights_path.shared_weights_dir() == shared
    assert default_backbone_weights("vgg16") == str(shared / VGG_FILE)  # the ../shared convention
    monkeypatch.setenv(weights_path.WEIGHTS_DIR_ENV, str(env_dir))
    assert default_backbone_weights("vgg16") == str(env_dir / VGG_FILE)  # the variable comes first
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(weights_path.WEIGHTS_DIR_ENV, str(empty))
    monkeypatch.setattr(weights_path, "shared_weights_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(WeightsError) as ei:
        default_backbone_weights("vgg16")
    msg = str(ei.value)
    assert str(empty / VGG_FILE) in msg and str(tmp_path / "nowhere" / VGG_FILE) in msg
    assert "--weights" in msg and weights_path.WEIGHTS_DIR_ENV in msg and "\n" not in msg


def test_build_map_without_weights_uses_the_environment(tmp_path, monkeypatch, pngs, vgg_path, capsys):
    env_dir = tmp_path / "w"
    env_dir.mkdir()
    os.symlink(vgg_path, env_dir / VGG_FILE)
    monkeypatch.setenv(weights_path.WEIGHTS_DIR_ENV, str(env_dir))
    monkeypatch.setattr(weights_path, "shared_weights_dir", lambda: tmp_path / "nowhere")
    imgs = pngs(tmp_path / "imgs", [f"frame{i:03d}.png" for i in range(1, 7)])
    rc, out, err = run(["build-map", "--images", imgs, "--gps", "none", "--out", tmp_path / "map"] + ENC, capsys)
    assert rc == 0, err
    assert "map written" in out
    # and without any weights: one line listing where it looked, before anything is encoded
    monkeypatch.setenv(weights_path.WEIGHTS_DIR_ENV, str(tmp_path / "none"))
    rc, _, err = run(["build-map", "--images", imgs, "--gps", "none", "--out", tmp_path / "map2"] + ENC, capsys)
    line = one_error_line(err, "build-map")
    assert rc == 2 and VGG_FILE in line and str(tmp_path / "none") in line
    assert not (tmp_path / "map2").exists()


# --------------------------------------------------------------------------------------------
# 16: ground truth checked first, help texts, --gt-file
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_encoding(monkeypatch):
    """Fail the test if evaluate() gets as far as building an encoder."""
    def refuse(*a, **k):
        raise AssertionError("the encoder was built before the ground truth was checked")
    monkeypatch.setattr(ev, "Encoder", refuse)


@pytest.mark.parametrize("gt, text", [("place", "place_id"), ("frame", "frame number"),
                                      ("position", "a position")])
def test_ground_truth_is_checked_before_encoding(tmp_path, pngs, vgg_path, capsys, no_encoding, gt, text):
    m = pngs(tmp_path / "map", ["north.png", "south.png"])
    q = pngs(tmp_path / "query", ["east.png"], first=3)
    rc, _, err = run(["evaluate", "--map-images", m, "--query-images", q, "--gt", gt, "--out", tmp_path / "out",
                      "--weights", vgg_path] + ENC, capsys)
    line = one_error_line(err, "evaluate")
    assert rc == 2 and text in line and "2 map images" in line


def test_evaluate_help_explains_ground_truth(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--gt ", "--gt-file", "--frame-tolerance", "--map-select", "--query-select"):
        assert flag in text
    assert "last integer in the file name" in text
    assert "median difference of its sorted frame numbers" in text
    assert "query,map" in text


def test_gt_file_relevance(tmp_path):
    gt_csv = tmp_path / "gt.csv"
    gt_csv.write_bytes("Query,Map\nq1.png,m2.png\nq1.png,sub/m3.png\nq2.png,m1.png\n".encode("utf-8-sig"))
    gt = ev.ground_truth_from_file(str(gt_csv))
    mk = lambda n: ev.ImageRecord(path=str(tmp_path / n), name=n)  # noqa: E731
    maps = [mk("m1.png"), mk("m2.png"), mk("sub/m3.png")]
    queries = [mk("q1.png"), mk("q2.png"), mk("q3.png")]
    ev.check_ground_truth(maps, queries, gt)
    rel = ev.relevance(maps, queries, gt)["gt-file"]
    assert rel.tolist() == [[False, True, True], [True, False, False], [False, False, False]]
    with pytest.raises(DatasetError, match="none of the 1 query images"):
        ev.check_ground_truth(maps, [mk("other.png")], gt)
    npy = tmp_path / "ground_truth_new.npy"
    np.save(npy, np.array([[0, 1]]))
    with pytest.raises(DatasetError, match="pickle"):
        ev.ground_truth_from_file(str(npy))
    bad = tmp_path / "bad.csv"
    bad.write_text("image,place\n")
    with pytest.raises(DatasetError, match="query,map"):
        ev.ground_truth_from_file(str(bad))


def test_evaluate_with_gt_file(tmp_path, pngs, vgg_path, capsys):
    m = pngs(tmp_path / "map", [f"m{i}.png" for i in range(1, 7)])
    q = pngs(tmp_path / "query", ["qa.png", "qb.png"], first=2)  # the same frames as m1, m2 (shifted)
    gt_csv = tmp_path / "gt.csv"
    with open(gt_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([("query", "map"), ("qa.png", "m2.png"), ("qa.png", "m3.png"), ("qb.png", "m3.png")])
    out = tmp_path / "out"
    rc, stdout, err = run(["evaluate", "--map-images", m, "--query-images", q, "--gt-file", gt_csv, "--out", out,
                           "--no-map", "--weights", vgg_path] + ENC, capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ground_truth"]["kind"] == "file"
    assert metrics["ground_truth"]["file"] == str(gt_csv)
    rec = metrics["methods"]["NetVLAD"]["recall"]["gt-file"]
    assert rec["queries_with_positives"] == 2 and rec["at"]["10"]["correct"] == 2
    rc, _, err = run(["evaluate", "--map-images", m, "--query-images", q, "--gt-file", gt_csv, "--gt", "place",
                      "--out", out, "--weights", vgg_path] + ENC, capsys)
    assert rc == 2 and "exclude each other" in one_error_line(err, "evaluate")


# --------------------------------------------------------------------------------------------
# 18: NetVLAD k-means sample large enough for FAISS
# --------------------------------------------------------------------------------------------

def test_kmeans_samples_39_features_per_cluster(tmp_path, pngs, vgg_path, caplog):
    from vpr_localizer.models.encoder import Encoder
    from vpr_localizer.models.fitting import KMEANS_MIN_POINTS_PER_CENTROID, kmeans_sample_target

    assert kmeans_sample_target(EncoderConfig(num_clusters=64, kmeans_max_features=100)) == 39 * 64
    assert kmeans_sample_target(EncoderConfig()) == 50000
    paths = [str(p) for p in sorted(pngs(tmp_path / "imgs", ["a1.png", "a2.png", "a3.png"]).iterdir())]
    # 64x48 input -> a 4x3 conv5 grid = 12 locations per image; kmeans_max_features alone would take 2
    cfg = EncoderConfig(weights=str(vgg_path), image_size=(64, 48), num_clusters=2, kmeans_max_features=6,
                        pca_dim=0, device="cpu")
    enc = Encoder(cfg)
    sample = enc.sample_local_features(paths)
    assert sample.shape == (36, 512)  # every location: 36 < 39 * 2
    with caplog.at_level(logging.INFO, logger="vpr_localizer.models.fitting"):
        enc.fit_aggregator(paths)
    notes = [r.getMessage() for r in caplog.records if "local features for K=2" in r.getMessage()]
    assert len(notes) == 1 and "only 36" in notes[0] and str(KMEANS_MIN_POINTS_PER_CENTROID * 2) in notes[0]
    assert enc.fingerprint()["num_clusters"] == 2  # K is kept: it fixes the descriptor and fingerprint


def test_load_records_of_bom_csv_end_to_end(tmp_path, pngs):
    imgs = pngs(tmp_path / "imgs", ["1.png", "2.png"])
    p = tmp_path / "poses.csv"
    p.write_bytes("image,lat,lon\n1.png,55.7,13.19\n2.png,55.7001,13.19\n".encode("utf-8-sig"))
    recs = load_records(str(imgs), str(p))
    assert [r.has_geodetic for r in recs] == [True, True]
