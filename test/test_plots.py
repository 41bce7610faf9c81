"""Tests of vpr_localizer.evaluation.plots: every figure is written as a readable PNG of plausible
size, and draws what it claims (the matplotlib artists' data, axis scale and labels, captured by
the ``drawn`` fixture just before the figure is saved and cleared)."""
import gc
import math
import os
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.patches import Ellipse
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


def _snapshot(ax) -> SimpleNamespace:
    """What an axes shows: its lines, scatters (by label), ellipses, scales, limits, ticks, labels
    and texts, copied out of the artists (``plots._save`` clears the figure after writing it)."""
    legend = ax.get_legend()
    return SimpleNamespace(
        lines=[SimpleNamespace(x=np.asarray(ln.get_xdata(), float), y=np.asarray(ln.get_ydata(), float),
                               label=ln.get_label(), colour=to_hex(ln.get_color()), marker=ln.get_marker(),
                               drawstyle=ln.get_drawstyle()) for ln in ax.get_lines()],
        scatters={c.get_label(): np.asarray(c.get_offsets(), float) for c in ax.collections},
        ellipses=[SimpleNamespace(center=np.asarray(e.center, float), width=e.width, height=e.height)
                  for e in ax.patches if isinstance(e, Ellipse)],
        xscale=ax.get_xscale(), xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(),
        xlim=ax.get_xlim(), ylim=ax.get_ylim(), xticks=[float(t) for t in ax.get_xticks()],
        texts=[t.get_text() for t in ax.texts], title=ax.get_title(),
        legend=[t.get_text() for t in legend.get_texts()] if legend is not None else [])


@pytest.fixture
def drawn(monkeypatch):
    """List that receives a :func:`_snapshot` of the axes of every figure a plot function saves."""
    shots = []
    real_save = plots._save

    def save(fig, path):
        assert len(fig.axes) == 1
        shots.append(_snapshot(fig.axes[0]))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return shots


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


def test_recall_curve_writes_png_in_new_directory(tmp_path, drawn):
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
    [fig] = drawn
    # one line per method, points at the given N, legend with the R@1 counts
    assert [ln.label for ln in fig.lines] == ["NetVLAD (R@1 11/12)", "GeM (R@1 9/12)", "GAP (R@1 6/12)"]
    for ln, curve in zip(fig.lines, recalls.values()):
        np.testing.assert_array_equal(ln.x, [1, 5, 10, 20])
        np.testing.assert_allclose(ln.y, [curve[n] for n in (1, 5, 10, 20)])
    assert len({ln.colour for ln in fig.lines}) == 3 and len({ln.marker for ln in fig.lines}) == 3
    # largest N 20 <= 30: linear axis, ticks at the given N
    assert fig.xscale == "linear" and fig.xticks == [1, 5, 10, 20] and fig.xlim == (0.5, 20.5)
    assert fig.xlabel.startswith("N ") and fig.ylabel == "recall@N" and fig.title == "Recall@N"


def test_recall_curve_content_depends_on_input(tmp_path, drawn):
    a = _open_png(plots.plot_recall_curve({"NetVLAD": {1: 0.2, 5: 0.4}}, str(tmp_path / "a.png")))
    b = _open_png(plots.plot_recall_curve({"NetVLAD": {1: 0.9, 5: 1.0}}, str(tmp_path / "b.png")))
    assert a.shape != b.shape or np.any(a != b)
    np.testing.assert_allclose(drawn[0].lines[0].y, [0.2, 0.4])
    np.testing.assert_allclose(drawn[1].lines[0].y, [0.9, 1.0])
    # no counts: the legend gives R@1 as a percentage
    assert [ln.label for fig in drawn for ln in fig.lines] == ["NetVLAD (R@1 20%)", "NetVLAD (R@1 90%)"]


def test_recall_curve_large_n_and_empty(tmp_path, drawn):
    rec = {"NetVLAD": {1: 0.5, 2: 0.6, 5: 0.7, 10: 0.8, 50: 0.9, 100: float("nan")}}
    _open_png(plots.plot_recall_curve(rec, str(tmp_path / "log.png")))
    _open_png(plots.plot_recall_curve({}, str(tmp_path / "empty.png"), "nothing"))
    log, empty = drawn
    # the NaN at N=100 is skipped: the line ends at N=50, which sets the axis
    [ln] = log.lines
    np.testing.assert_array_equal(ln.x, [1, 2, 5, 10, 50])
    np.testing.assert_allclose(ln.y, [0.5, 0.6, 0.7, 0.8, 0.9])
    # largest N 50 > 30: logarithmic axis with ticks at the given N
    assert log.xscale == "log" and log.xticks == [1, 2, 5, 10, 50]
    assert log.xlim == pytest.approx((0.85, 50 * 1.15))
    # no method: nothing drawn, a "no data" note, the title kept
    assert empty.lines == [] and empty.legend == [] and "no data" in empty.texts and empty.title == "nothing"


# ----------------------------------------------------------------- trajectory


def test_trajectory_basic_with_sigma_and_threshold(tmp_path, traj, drawn):
    map_xy, gt, est = traj
    sigma = np.tile(np.array([[9.0, 2.0], [2.0, 4.0]]), (12, 1, 1))
    sigma[5] = np.nan  # an invalid covariance is skipped
    sigma[6] = np.array([[1.0, 0.0], [0.0, -4.0]])  # not positive semi-definite: skipped
    out = plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "t" / "traj.png"), "Loop",
                                threshold_m=25.0, sigma_xy=sigma)
    rgb = _open_png(out, 400, 300)
    assert _count_colour(rgb, RED) > 0  # the gross mismatch is drawn as wrong
    [fig] = drawn
    # errors of the fixture: ~3 m noise, and the gross mismatch of query 2 (the loop's far side)
    err = np.linalg.norm(est - gt, axis=1)
    assert np.flatnonzero(err > 25.0).tolist() == [2]
    ok = np.arange(12) != 2
    np.testing.assert_array_equal(fig.scatters["map keyframes (120)"], map_xy)
    np.testing.assert_array_equal(fig.scatters["ground truth (12)"], gt)
    np.testing.assert_array_equal(fig.scatters["estimate, correct (\u2264 25 m) (11)"], est[ok])
    np.testing.assert_array_equal(fig.scatters["estimate, wrong (1)"], est[[2]])
    # one error vector per query, truth -> estimate, red for the wrong one
    assert len(fig.lines) == 12
    for i, ln in enumerate(fig.lines):
        np.testing.assert_array_equal(np.c_[ln.x, ln.y], [gt[i], est[i]])
        assert ln.colour == ("#d62728" if i == 2 else "#1f77b4")
    # 1-sigma ellipses of the 10 valid covariances: axes 2 sqrt(eigenvalue) of [[9, 2], [2, 4]],
    # eigenvalues (13 +- sqrt(41)) / 2
    assert len(fig.ellipses) == 10
    np.testing.assert_array_equal([e.center for e in fig.ellipses], est[[i for i in range(12) if i not in (5, 6)]])
    for e in fig.ellipses:
        assert e.width == pytest.approx(2.0 * math.sqrt((13.0 + math.sqrt(41.0)) / 2.0))
        assert e.height == pytest.approx(2.0 * math.sqrt((13.0 - math.sqrt(41.0)) / 2.0))
    assert "estimate 1-sigma ellipse" in fig.legend
    assert fig.xlabel == "x east [m]" and fig.ylabel == "y north [m]"
    assert fig.title.startswith("Loop") and "correct (\u2264 25 m) 11/12" in fig.texts[0]


def test_trajectory_skips_nan_estimates(tmp_path, traj, drawn):
    map_xy, gt, est = traj
    est = est.copy()
    est[[0, 4, 7]] = np.nan
    est[9, 1] = np.nan  # half-NaN row counts as no estimate too
    out = plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "nan.png"),
                                correct=np.array([True] * 12))
    _open_png(out, 400, 300)
    [fig] = drawn
    kept = [i for i in range(12) if i not in (0, 4, 7, 9)]
    # estimates and error vectors only for the 8 complete rows; every ground truth is drawn
    np.testing.assert_array_equal(fig.scatters["estimate, correct (8)"], est[kept])
    assert "estimate, wrong (0)" not in fig.scatters
    np.testing.assert_array_equal(fig.scatters["ground truth (12)"], gt)
    assert len(fig.lines) == 8
    for i, ln in zip(kept, fig.lines):
        np.testing.assert_array_equal(np.c_[ln.x, ln.y], [gt[i], est[i]])
    assert fig.title.startswith("8/12 queries with estimate") and "correct 8/12" in fig.title


def test_trajectory_all_nan_draws_no_estimates(tmp_path, traj, drawn):
    map_xy, gt, _ = traj
    est = np.full_like(gt, np.nan)
    with_est = _open_png(plots.plot_trajectory(map_xy, gt, traj[2], str(tmp_path / "e.png")))
    no_est = _open_png(plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "n.png")))
    assert _count_colour(with_est, RED) > 20
    assert _count_colour(no_est, RED) == 0
    shown, empty = drawn
    # without correctness every estimate is red; with no estimate none and no error vector
    np.testing.assert_array_equal(shown.scatters["estimate (12)"], traj[2])
    assert len(shown.lines) == 12
    assert set(empty.scatters) == {"map keyframes (120)", "ground truth (12)"} and empty.lines == []
    assert empty.title == "0/12 queries with estimate"


def test_trajectory_rejects_mismatched_shapes(tmp_path, traj):
    map_xy, gt, est = traj
    with pytest.raises(ValueError):
        plots.plot_trajectory(map_xy, gt, est[:-1], str(tmp_path / "x.png"))
    with pytest.raises(ValueError):
        plots.plot_trajectory(map_xy, gt, est, str(tmp_path / "x.png"), sigma_xy=np.zeros((3, 2, 2)))


# ----------------------------------------------------------------- error CDF


def test_error_cdf(tmp_path, drawn):
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
    wide, lin, empty = drawn

    # finite errors span more than two decades (up to 400 m): log axis from the 0.1 m floor to
    # 1.05 x the largest error; thresholds 3 and 25 m as vertical lines
    finite = np.concatenate([e[np.isfinite(e)] for e in errors.values()])
    assert finite.max() / finite.min() > 100.0
    assert wide.xscale == "log" and wide.xlabel == "localisation error x [m] (log scale)"
    assert wide.xlim == pytest.approx((0.1, 420.0)) and wide.ylim == (0.0, 1.0)
    net, gem, gap, t3, t25 = wide.lines
    for ln, e in ((net, errors["NetVLAD"]), (gem, errors["GeM"])):
        # a step from 0 up by 1/32 per finite error; NaN / inf count in n but are never reached
        fin = np.sort(e[np.isfinite(e)])
        assert ln.drawstyle == "steps-post" and fin.size == 31
        np.testing.assert_allclose(ln.x, np.r_[0.1, np.maximum(fin, 0.1), 420.0])
        np.testing.assert_allclose(ln.y, np.r_[0.0, np.arange(1, 32) / 32, 31 / 32])
        assert ln.label.startswith(f"{'NetVLAD' if ln is net else 'GeM'} (n=32, \u22643 m: "
                                   f"{100 * np.sum(fin <= 3) / 32:.0f}%, \u226425 m: {100 * np.sum(fin <= 25) / 32:.0f}%")
    assert gap.x.size == 0 and gap.label.endswith("- no estimates")
    assert (t3.x.tolist(), t25.x.tolist()) == ([3.0, 3.0], [25.0, 25.0])
    assert wide.title == "Error CDF"

    # narrow range: linear axis from 0, the curve reaches 100 % (every query has an estimate)
    e = np.sort(small["NetVLAD"])
    right = max(e.max(), 3.0) * 1.05
    assert lin.xscale == "linear" and lin.xlim == pytest.approx((0.0, right))
    curve, t = lin.lines
    np.testing.assert_allclose(curve.x, np.r_[0.0, e, right])
    np.testing.assert_allclose(curve.y, np.r_[0.0, np.arange(1, 21) / 20, 1.0])
    assert t.x.tolist() == [3.0, 3.0]

    # no method: only the threshold lines and a "no data" note
    assert [ln.x.tolist() for ln in empty.lines] == [[3.0, 3.0], [25.0, 25.0]] and "no data" in empty.texts


# ----------------------------------------------------------------- PR curve


def test_pr_curve(tmp_path, drawn):
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
    [fig] = drawn
    curve, marker = fig.lines
    # recall is already non-decreasing along the ranking: the points are drawn as given
    np.testing.assert_array_equal(curve.x, recall)
    np.testing.assert_array_equal(curve.y, precision)
    assert curve.label == "PR curve (AUC 0.910)"
    r100 = recall[precision == 1.0].max()  # the last recall before the first false positive
    assert 0.0 < r100 < 1.0
    np.testing.assert_array_equal(np.c_[marker.x, marker.y], [[r100, 1.0]])
    assert marker.label == f"max recall at 100% precision: {100 * r100:.0f}%"
    assert (fig.xlabel, fig.ylabel, fig.title) == ("recall", "precision", "PR")


def test_pr_curve_drops_nan_pairs_and_sorts_by_recall(tmp_path, drawn):
    precision = [1.0, np.nan, 0.5, 1.0, 2 / 3]
    recall = [0.5, 0.2, 0.75, 0.25, 1.0]
    plots.plot_pr_curve(precision, recall, str(tmp_path / "pr.png"))
    curve, marker = drawn[0].lines
    # pair 1 (precision NaN) dropped; the others in order of recall 0.25, 0.5, 0.75, 1.0
    np.testing.assert_array_equal(curve.x, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.y, [1.0, 1.0, 0.5, 2 / 3])
    assert curve.label == "PR curve"  # no AUC given
    # 100 % precision up to recall 0.5
    np.testing.assert_array_equal(np.c_[marker.x, marker.y], [[0.5, 1.0]])
    assert marker.label == "max recall at 100% precision: 50%"
    # all pairs NaN: nothing drawn, a "no data" note
    plots.plot_pr_curve([np.nan], [0.5], str(tmp_path / "none.png"))
    assert drawn[1].lines == [] and "no data" in drawn[1].texts


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
