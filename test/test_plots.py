"""Tests of vpr_localizer.evaluation.plots: every figure is written as a readable PNG of plausible size."""
import gc
import os

import matplotlib
import numpy as np
import pytest
from PIL import Image

from vpr_localizer.evaluation import plots

RED = np.array([214, 39, 40])  # colour of wrong / unlabelled estimates and of wrong-match borders
GREEN = np.array([34, 160, 60])  # border of a correct match in the contact sheet


def _open_png(path, min_w=200, min_h=150):
    assert os.path.isfile(path)
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width >= min_w and im.height >= min_h
        assert im.width < 10000 and im.height < 20000
        return np.asarray(im.convert("RGB")).astype(int)


def _count_colour(rgb, colour, tol=12):
    return int(np.sum(np.all(np.abs(rgb - colour) <= tol, axis=-1)))


def _loop_map(n=120):
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.c_[100.0 * np.cos(t), 60.0 * np.sin(t)]


@pytest.fixture
def traj():
    rng = np.random.default_rng(3)
    map_xy = _loop_map()
    idx = rng.choice(map_xy.shape[0], 12, replace=False)
    gt = map_xy[idx] + rng.normal(0.0, 1.5, (12, 2))
    est = gt + rng.normal(0.0, 3.0, (12, 2))
    est[2] = map_xy[(idx[2] + 60) % map_xy.shape[0]]  # one gross mismatch
    return map_xy, gt, est


# ----------------------------------------------------------------- recall curve


def test_recall_curve_writes_png_in_new_directory(tmp_path):
    recalls = {
        "NetVLAD": {1: 11 / 12, 5: 1.0, 10: 1.0, 20: 1.0},
        "GeM": {1: 0.75, 5: 11 / 12, 10: 1.0, 20: 1.0},
        "GAP": {1: 0.5, 5: 0.75, 10: 10 / 12, 20: 11 / 12},
    }
    out = tmp_path / "a" / "b" / "recall.png"
    ret = plots.plot_recall_curve(recalls, str(out), "Recall@N",
                                  counts={"NetVLAD": (11, 12), "GeM": (9, 12), "GAP": (6, 12)})
    assert ret == str(out)
    _open_png(ret, 400, 250)


def test_recall_curve_content_depends_on_input(tmp_path):
    a = _open_png(plots.plot_recall_curve({"NetVLAD": {1: 0.2, 5: 0.4}}, str(tmp_path / "a.png")))
    b = _open_png(plots.plot_recall_curve({"NetVLAD": {1: 0.9, 5: 1.0}}, str(tmp_path / "b.png")))
    assert a.shape != b.shape or np.any(a != b)


def test_recall_curve_large_n_and_empty(tmp_path):
    rec = {"NetVLAD": {1: 0.5, 2: 0.6, 5: 0.7, 10: 0.8, 50: 0.9, 100: float("nan")}}
    _open_png(plots.plot_recall_curve(rec, str(tmp_path / "log.png")))
    _open_png(plots.plot_recall_curve({}, str(tmp_path / "empty.png"), "nothing"))


# ----------------------------------------------------------------- trajectory


def test_trajectory_basic_with_sigma_and_threshold(tmp_path, traj):
    map_xy, gt, est = traj
    sigma = np.tile(np.array([[9.0, 2.0], [2.0, 4.0]]), (12, 1, 1))
    sigma[5] = np.nan  # an invalid covariance is skipped
    sigma[6] = np.array([[1.0, 0.0], [0.0, -4.0]])  # not positive semi-definite: skipped
    out = plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "t" / "traj.png"), "Loop",
                                threshold_m=25.0, sigma_xy=sigma)
    rgb = _open_png(out, 400, 300)
    assert _count_colour(rgb, RED) > 0  # the gross mismatch is drawn as wrong


def test_trajectory_skips_nan_estimates(tmp_path, traj):
    map_xy, gt, est = traj
    est = est.copy()
    est[[0, 4, 7]] = np.nan
    est[9, 1] = np.nan  # half-NaN row counts as no estimate too
    out = plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "nan.png"),
                                correct=np.array([True] * 12))
    _open_png(out, 400, 300)


def test_trajectory_all_nan_draws_no_estimates(tmp_path, traj):
    map_xy, gt, _ = traj
    est = np.full_like(gt, np.nan)
    with_est = _open_png(plots.plot_trajectory(map_xy, gt, traj[2], str(tmp_path / "e.png")))
    no_est = _open_png(plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "n.png")))
    assert _count_colour(with_est, RED) > 20
    assert _count_colour(no_est, RED) == 0


def test_trajectory_rejects_mismatched_shapes(tmp_path, traj):
    map_xy, gt, est = traj
    with pytest.raises(ValueError):
        plots.plot_trajectory(map_xy, gt, est[:-1], str(tmp_path / "x.png"))
    with pytest.raises(ValueError):
        plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "x.png"), sigma_xy=np.zeros((3, 2, 2)))


# ----------------------------------------------------------------- error CDF


def test_error_cdf(tmp_path):
    rng = np.random.default_rng(0)
    errors = {
        "NetVLAD": np.r_[rng.gamma(2.0, 2.0, 30), [250.0, np.nan]],
        "GeM": np.r_[rng.gamma(2.0, 5.0, 30), [np.inf, 400.0]],
        "GAP": np.full(5, np.nan),  # no estimates at all
    }
    out = plots.plot_error_cdf(errors, str(tmp_path / "c" / "cdf.png"), "Error CDF")
    _open_png(out, 400, 250)
    small = {"NetVLAD": rng.uniform(0.0, 10.0, 20)}  # narrow range: linear axis
    _open_png(plots.plot_error_cdf(small, str(tmp_path / "lin.png"), thresholds_m=(3.0,)))
    _open_png(plots.plot_error_cdf({}, str(tmp_path / "empty.png")))


# ----------------------------------------------------------------- PR curve


def test_pr_curve(tmp_path):
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(0.8, 0.1, 50), rng.normal(0.4, 0.1, 150)]
    labels = np.r_[np.ones(50), np.zeros(150)]
    order = np.argsort(-scores)
    tp = np.cumsum(labels[order])
    precision = tp / np.arange(1, scores.size + 1)
    recall = tp / labels.sum()
    out = plots.plot_pr_curve(precision, recall, str(tmp_path / "p" / "pr.png"), "PR", auc=0.91)
    _open_png(out, 300, 250)
    with pytest.raises(ValueError):
        plots.plot_pr_curve(precision, recall[:-1], str(tmp_path / "bad.png"))


# ----------------------------------------------------------------- contact sheet


def _make_images(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (120, 30)]):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (w, h), (40 * i + 50, 120, 200 - 40 * i)).save(p)
        paths.append(str(p))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    return paths, str(broken)


def test_contact_sheet_with_unreadable_file(tmp_path):
    imgs, broken = _make_images(tmp_path)
    rows = [
        {"query": imgs[0], "match": imgs[1], "caption": "q0 -> kf 12, 2.1 m", "correct": True},
        {"query": broken, "match": imgs[2], "caption": "unreadable query", "correct": False},
        {"query": imgs[1], "match": broken, "caption": "unreadable match", "correct": None},
        {"query": imgs[2], "match": None, "caption": "no match", "correct": None},
        {"query": str(tmp_path / "missing.png"), "match": imgs[0], "caption": "", "correct": True},
    ]
    out = plots.contact_sheet(rows, str(tmp_path / "s" / "sheet.png"), "Sheet", thumb_height=60)
    rgb = _open_png(out, 200, 5 * 60)
    assert _count_colour(rgb, GREEN, tol=4) > 100  # border of the correct matches
    assert _count_colour(rgb, RED, tol=4) > 100  # border of the wrong match


def test_contact_sheet_height_grows_one_row_per_input(tmp_path):
    imgs, broken = _make_images(tmp_path)
    pool = [imgs[0], broken, imgs[1], imgs[2]]
    heights = []
    for n in range(1, 5):
        rows = [{"query": pool[i], "match": pool[(i + 1) % 4], "caption": f"row {i}",
                 "correct": bool(i % 2)} for i in range(n)]
        out = plots.contact_sheet(rows, str(tmp_path / f"sheet{n}.png"), thumb_height=50)
        heights.append(_open_png(out, 100, 50).shape[0])
    steps = np.diff(heights)
    assert np.all(steps >= 50), heights  # every input row adds at least one thumbnail height
    assert len(set(steps.tolist())) == 1, heights  # and every (one-line) row the same


def test_contact_sheet_truncates_to_max_rows(tmp_path):
    imgs, _ = _make_images(tmp_path)
    rows = [{"query": imgs[i % 3], "match": imgs[(i + 1) % 3], "caption": "x", "correct": True}
            for i in range(10)]
    full = _open_png(plots.contact_sheet(rows, str(tmp_path / "full.png"), thumb_height=40), 100, 40)
    cut = _open_png(plots.contact_sheet(rows, str(tmp_path / "cut.png"), thumb_height=40,
                                        max_rows=3), 100, 40)
    assert cut.shape[0] < full.shape[0] * 0.6
    _open_png(plots.contact_sheet([], str(tmp_path / "none.png"), "empty"), 100, 20)


# ----------------------------------------------------------------- no global state / no leaks


def test_no_backend_change_and_no_leaked_figures(tmp_path, traj):
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    gc.collect()
    before = sum(isinstance(o, Figure) for o in gc.get_objects())
    map_xy, gt, est = traj
    for i in range(5):
        plots.plot_trajectory(map_xy, gt, est, str(tmp_path / f"t{i}.png"))
        plots.plot_recall_curve({"GeM": {1: 0.5, 5: 0.8}}, str(tmp_path / f"r{i}.png"))
    gc.collect()
    after = sum(isinstance(o, Figure) for o in gc.get_objects())
    assert after <= before
    assert matplotlib.get_backend() == backend
