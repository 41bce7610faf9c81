"""Integration: the main job's real-data scenarios, end to end (encode, map, retrieve, pose).

Each test runs one scenario of :mod:`vpr_localizer.evaluation.scenarios` on the real images of
``../shared/datasets`` with the real VGG16 weights, exactly as ``vpr-localizer evaluate
--scenario NAME`` does, and checks the counts the README reports. Lower bounds sit at or a
little below the measured values (recorded next to each), so a regression in the encoder,
NetVLAD, map or pose code fails here.
"""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.evaluation.evaluate import evaluate
from vpr_localizer.evaluation.scenarios import VGG16_WEIGHTS, get_scenario

pytestmark = pytest.mark.integration

# Lower bounds on NetVLAD recall@1 counts: one below the measured value on the tiny sets (a single
# borderline query may flip with floating-point differences between CPUs), ~10% below on Nordland.
GARDENS_NIGHT_MIN = 4   # measured 5/6
TRAIL_SNOW_MIN = 3      # measured 3/5 here (4/5 on an earlier machine: one borderline query)
TRAIL_DRY_MIN = 3       # measured 4/7
NORDLAND_R1_MIN = 280   # measured 310/3576


def run(name, shared_dir, tmp_path_factory, **overrides):
    sc = get_scenario(name)
    datasets = str(shared_dir / "datasets")
    weights = str(shared_dir / VGG16_WEIGHTS)
    if not os.path.isfile(weights):
        pytest.fail(f"missing weights {weights}")
    cfg = EncoderConfig(weights=weights, image_size=sc.image_size, **overrides)
    out = tmp_path_factory.mktemp(name)
    res = evaluate(sc.map.load(datasets), sc.queries.load(datasets), cfg, sc.gt, str(out), name=name,
                   progress=False)
    return res


def r_at(metrics, method, label, n):
    a = metrics["methods"][method]["recall"][label]["at"][n]
    return a["correct"], a["total"]


def check_outputs(res):
    m = res.metrics
    for key in ("metrics", "recall_plot", "poses"):
        assert os.path.getsize(res.files[key]) > 0, key
    with open(res.files["metrics"]) as f:
        on_disk = json.load(f)
    assert on_disk["methods"].keys() == m["methods"].keys()
    with Image.open(res.files["recall_plot"]) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    # every evaluation carries the two baselines computed on the same features
    assert {"NetVLAD", "GeM", "GAP"} <= set(m["methods"])


def test_gardens_day_queries_vs_night_map(shared_dir, tmp_path_factory):
    res = run("gardens_day_vs_night", shared_dir, tmp_path_factory)
    m = res.metrics
    check_outputs(res)
    assert m["map"]["encoded"] == 6 and m["queries"]["encoded"] == 12
    correct, total = r_at(m, "NetVLAD", "place", 1)
    assert total == 12
    assert correct >= 10, f"NetVLAD R@1 {correct}/12 (measured 11/12)"
    # what NetVLAD adds over plain average pooling in the seed's setting (measured 11 vs 6 of 12)
    assert correct > r_at(m, "GAP", "place", 1)[0]
    assert os.path.getsize(res.files["contact_sheet"]) > 0


def test_gardens_night_queries_vs_day_map(shared_dir, tmp_path_factory):
    m = run("gardens_night_vs_day", shared_dir, tmp_path_factory).metrics
    correct, total = r_at(m, "NetVLAD", "place", 1)
    assert total == 6
    assert correct >= GARDENS_NIGHT_MIN, f"NetVLAD R@1 {correct}/6"


def test_trail_snow_vs_dry_both_ways(shared_dir, tmp_path_factory):
    m = run("trail_snow_vs_dry", shared_dir, tmp_path_factory).metrics
    correct, total = r_at(m, "NetVLAD", "place", 1)
    assert total == 5
    assert correct >= TRAIL_SNOW_MIN, f"NetVLAD R@1 {correct}/5"
    m = run("trail_dry_vs_snow", shared_dir, tmp_path_factory).metrics
    correct, total = r_at(m, "NetVLAD", "place", 1)
    assert total == 7
    assert correct >= TRAIL_DRY_MIN, f"NetVLAD R@1 {correct}/7"


def test_lund_even_map_odd_queries_metres(shared_dir, tmp_path_factory):
    res = run("lund_odd_vs_even", shared_dir, tmp_path_factory)
    m = res.metrics
    check_outputs(res)
    assert m["map"]["geotagged"] and m["map"]["encoded"] == 14 and m["queries"]["encoded"] == 15
    loc = m["methods"]["NetVLAD"]["localization"]
    assert loc["within_m"]["25"]["correct"] == 15, loc["within_m"]
    # measured: median 4.23 m, the neighbouring errors in rank 3.97 and 4.66 m; one rank of slack
    assert loc["median_error_m"] < 4.7, f"median {loc['median_error_m']:.2f} m (measured 4.23 m)"
    assert loc["within_m"]["3"]["correct"] >= 3, loc["within_m"]  # measured 4/15
    # the pose refinement must not be worse than taking the best match's position
    assert loc["mean_error_m"] <= loc["top1_mean_error_m"] + 1e-6
    for key in ("trajectory_plot", "error_cdf_plot"):
        assert os.path.getsize(res.files[key]) > 0


@pytest.mark.slow
def test_nordland_winter_vs_summer_all_frames(shared_dir, tmp_path_factory):
    m = run("nordland_winter_vs_summer", shared_dir, tmp_path_factory).metrics
    assert m["map"]["encoded"] == 3576 and m["queries"]["encoded"] == 3576
    assert m["map"]["pca_fitted"]
    assert m["ground_truth"]["frame_step"] == 10  # thumbnails are every 10th source frame
    label = "frame+-1"
    c1, total = r_at(m, "NetVLAD", label, 1)
    assert total == 3576
    assert c1 >= NORDLAND_R1_MIN, f"NetVLAD R@1 {c1}/3576"
