"""Loop-closure detection: age filter and threshold logic, and precision/recall on real data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vpr_localizer.models.encoder import Encoder, EncoderConfig
from vpr_localizer.mapping.loop_closure import (LoopClosureConfig, LoopClosureDetector, best_matches,
                                        evaluate_candidates)
from vpr_localizer.io.records import records_from_folder

# measured on rtabmap_loop with VGG16 at 160x120, K=64: average precision 0.910, best F1 0.918
AP_MIN = 0.85
F1_MIN = 0.85


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_detector_respects_min_age_and_threshold():
    det = LoopClosureDetector(3, LoopClosureConfig(min_age_s=10.0, score_threshold=0.9))
    a, b = unit([1, 0, 0]), unit([0, 1, 0])
    assert det.add(a, 0.0) is None          # empty map
    assert det.add(a, 5.0) is None          # identical but only 5 s older
    assert det.add(b, 12.0) is None         # old enough but dissimilar (score 0)
    cand = det.add(unit([1, 0.1, 0]), 15.0)  # revisits keyframe 0 (15 s old); keyframe 1 is 10 s old too
    assert cand is not None and cand.match_id in (0, 1) and cand.query_id == 3
    assert cand.score == pytest.approx(float(unit([1, 0.1, 0]) @ a), abs=1e-6)
    assert cand.as_array() == [15.0, cand.match_stamp, cand.score, float(cand.match_id)]
    assert cand.query_stamp - cand.match_stamp >= 10.0
    assert len(det) == 4


def test_old_match_found_when_recent_frames_crowd_the_top_k():
    det = LoopClosureDetector(2, LoopClosureConfig(min_age_s=100.0, score_threshold=0.0, top_k=2))
    det.add(unit([1, 0.5]), 0.0)  # the only old-enough keyframe, less similar than the recent ones
    for t in range(150, 160):
        det.add(unit([1, 0.01 * (t - 150)]), float(t))
    cand = det.best_match(unit([1, 0]), 160.0)
    assert cand is not None and cand.match_id == 0


def test_evaluate_candidates_hand_computed():
    gt = np.zeros((4, 4), bool)
    gt[2, 0] = gt[3, 1] = True
    from vpr_localizer.mapping.loop_closure import LoopCandidate
    cands = [None, None, LoopCandidate(2, 0, 0.9, 0, 2), LoopCandidate(3, 0, 0.95, 0, 3)]
    m = evaluate_candidates(cands, gt)
    assert m["positives"] == 2
    # ranked: (0.95, wrong), (0.9, right) -> precision [0, 0.5], recall [0, 0.5]
    assert m["precision"] == [0.0, 0.5] and m["recall"] == [0.0, 0.5]
    assert m["recall_at_100_precision"] == 0.0
    assert m["average_precision"] == pytest.approx(0.25)


@pytest.mark.integration
def test_rtabmap_loop_precision_recall(datasets_dir, weights_dir, tmp_path):
    folder = datasets_dir / "rtabmap_loop"
    recs = [r for r in records_from_folder(str(folder), "none") if r.name.endswith(".jpg")]
    assert len(recs) == 84 and [r.frame for r in recs] == list(range(1, 85))
    gt = np.array(Image.open(folder / "samples_GT.bmp")) == 255
    enc = Encoder(EncoderConfig(weights=str(weights_dir / "vgg16_features_imagenet_caffe_bgr.pth"),
                                image_size=(160, 120), pca_dim=0, device="cpu"))
    paths = [r.path for r in recs]
    enc.fit_aggregator(paths)
    desc = enc.encode_paths(paths).descriptors
    stamps = np.arange(84, dtype=float)  # one frame per second
    cands = best_matches(desc, stamps, min_age_s=10.0)
    assert all(c is None or c.query_stamp - c.match_stamp >= 10.0 for c in cands)
    m = evaluate_candidates(cands, gt)
    assert m["positives"] == 44  # frames 41..84 revisit the start
    assert m["average_precision"] >= AP_MIN, m["average_precision"]
    assert m["best_f1"] >= F1_MIN, m["best_f1"]
    assert m["recall_at_100_precision"] > 0.0
