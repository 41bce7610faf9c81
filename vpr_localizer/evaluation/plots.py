"""Evaluation figures: recall@N curves, trajectories, error CDFs, PR curves, contact sheets.

Pure drawing: every function takes already computed numbers (or image paths) and writes one
PNG file, creating its parent directories, and returns the path it wrote as ``str``.

Matplotlib is used through the object API only (:class:`matplotlib.figure.Figure` with an
explicit Agg canvas), never through ``pyplot``: no global figure registry, no backend switch,
so calling these functions many times (or from a ROS node with another backend loaded) does
not leak figures or change anyone else's plotting. The contact sheet is drawn with Pillow.

Units: positions and errors in metres (local ENU frame: x east, y north), covariances in
square metres, recall and precision as fractions in [0, 1] (shown as percent).
"""
from __future__ import annotations

import math
import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from matplotlib.ticker import (FixedLocator, FuncFormatter, MaxNLocator, NullLocator,
                               PercentFormatter, ScalarFormatter)
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = [
    "plot_recall_curve",
    "plot_trajectory",
    "plot_error_cdf",
    "contact_sheet",
    "plot_pr_curve",
]

_DPI = 120
# Qualitative colours (matplotlib "tab10"), assigned to methods in the order they are given.
_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


# --------------------------------------------------------------------------- helpers


def _prepare_path(path) -> str:
    """Return ``path`` as ``str`` after creating its parent directory if missing."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return path


def _new_figure(figsize: Tuple[float, float]) -> Tuple[Figure, object]:
    """A stand-alone figure with an Agg canvas and one axes (no pyplot state)."""
    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _save(fig: Figure, path: str) -> str:
    """Write ``fig`` as PNG to ``path`` and release its artists."""
    try:
        fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    finally:
        fig.clf()
    return path


def _set_titles(fig: Figure, ax, title: str, subtitle: str = "") -> None:
    """Main title above the axes and an optional smaller subtitle line under it."""
    if title and subtitle:
        ax.set_title(title + "\n", fontsize=12, fontweight="bold")
        ax.text(0.5, 1.02, subtitle, transform=ax.transAxes, ha="center", va="bottom",
                fontsize=9, color="0.25")
    elif title:
        ax.set_title(title, fontsize=12, fontweight="bold")
    elif subtitle:
        ax.set_title(subtitle, fontsize=9, color="0.25")


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            fontsize=14, color="0.5")


def _fmt_pct(x: float) -> str:
    return f"{100.0 * x:.0f}%" if np.isfinite(x) else "n/a"


# --------------------------------------------------------------------------- recall@N


def plot_recall_curve(
    recalls: Dict[str, Dict[int, float]],
    path: str,
    title: str = "",
    counts: Optional[Dict[str, Tuple[int, int]]] = None,
) -> str:
    """Plot recall@N curves, one line per method.

    Args:
        recalls: ``{method name: {N: recall@N}}``; N are ints >= 1 (e.g. 1, 5, 10, 20),
            recall@N a float fraction in [0, 1] (plotted as percent). Methods may use
            different sets of N. NaN values are skipped.
        path: PNG file to write (parent directories are created).
        title: figure title.
        counts: optional ``{method name: (correct@1, total)}`` (ints, number of queries);
            shown in the legend as ``"NetVLAD (R@1 11/12)"``.

    Returns:
        ``path`` as ``str``.

    The x axis is linear with integer ticks when the largest N is at most 30, logarithmic
    (ticks at the given N) otherwise.
    """
    path = _prepare_path(path)
    fig, ax = _new_figure((7.0, 4.6))
    all_n: set = set()
    drawn = 0
    for i, (method, curve) in enumerate(recalls.items()):
        pts = sorted((int(n), float(r)) for n, r in dict(curve).items()
                     if int(n) >= 1 and r is not None and np.isfinite(float(r)))
        if not pts:
            continue
        ns = np.array([p[0] for p in pts])
        rs = np.array([p[1] for p in pts])
        all_n.update(ns.tolist())
        label = str(method)
        if counts and method in counts and counts[method] is not None:
            c, t = counts[method]
            label += f" (R@1 {int(c)}/{int(t)})"
        elif 1 in dict(curve):
            label += f" (R@1 {_fmt_pct(float(dict(curve)[1]))})"
        ax.plot(ns, rs, marker=_MARKERS[i % len(_MARKERS)], markersize=5, linewidth=1.8,
                color=_COLOURS[i % len(_COLOURS)], label=label, clip_on=False, zorder=3)
        drawn += 1

    ax.set_xlabel("N (number of top-ranked map candidates)")
    ax.set_ylabel("recall@N")
    ax.set_ylim(0.0, 1.03)  # headroom so curves at 100 % do not hide in the frame
    ax.yaxis.set_major_locator(FixedLocator([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.grid(True, which="major", alpha=0.35)
    if drawn:
        n_max = max(all_n)
        n_sorted = sorted(all_n)
        if n_max <= 30:
            ax.set_xlim(0.5, n_max + 0.5)
            if len(n_sorted) <= 12:
                ax.xaxis.set_major_locator(FixedLocator(n_sorted))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xscale("log")
            ax.set_xlim(0.85, n_max * 1.15)
            ticks = n_sorted if len(n_sorted) <= 12 else [n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if n <= n_max]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
    else:
        ax.set_xlim(0.5, 1.5)
        _no_data(ax)
    _set_titles(fig, ax, title)
    return _save(fig, path)


# --------------------------------------------------------------------------- trajectory


def _as_xy(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"{name} must have shape (K, 2), got {arr.shape}")
    return arr[:, :2]


def _cov_ellipse(center: np.ndarray, cov: np.ndarray, **kw) -> Optional[Ellipse]:
    """1-sigma ellipse of a 2x2 covariance (m^2) centred on ``center`` (m), or None if invalid."""
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (2, 2) or not np.all(np.isfinite(cov)):
        return None
    cov = 0.5 * (cov + cov.T)
    vals, vecs = np.linalg.eigh(cov)
    if vals[0] < 0.0 and vals[0] < -1e-9 * max(abs(vals[1]), 1e-12):
        return None
    vals = np.clip(vals, 0.0, None)
    if vals[1] <= 0.0:
        return None
    angle = math.degrees(math.atan2(vecs[1, 1], vecs[0, 1]))  # direction of the largest axis
    return Ellipse(tuple(center), width=2.0 * math.sqrt(vals[1]), height=2.0 * math.sqrt(vals[0]),
                   angle=angle, **kw)


def plot_trajectory(
    map_xy: np.ndarray,
    gt_xy: np.ndarray,
    est_xy: np.ndarray,
    path: str,
    title: str = "",
    correct: Optional[np.ndarray] = None,
    threshold_m: Optional[float] = None,
    sigma_xy: Optional[np.ndarray] = None,
) -> str:
    """Top-down map of keyframes, ground-truth query positions and estimates, in metres.

    Args:
        map_xy: ``(M, 2)`` float64, map keyframe positions (x east, y north), m. Grey dots.
        gt_xy: ``(Q, 2)`` float64, ground-truth query positions, m. Green circles.
        est_xy: ``(Q, 2)`` float64, estimated query positions, m; a row containing NaN means
            "no estimate" and is skipped (also rows whose ground truth is NaN).
        path: PNG file to write (parent directories are created).
        title: figure title.
        correct: optional ``(Q,)`` bool, whether each estimate counts as correct; correct
            estimates are drawn blue, wrong ones red. If None but ``threshold_m`` is given,
            it is computed as ``error <= threshold_m``; if both are None all estimates are red.
        threshold_m: optional correctness threshold, m (shown in the legend and subtitle).
        sigma_xy: optional ``(Q, 2, 2)`` float64 position covariances of the estimates, m^2;
            drawn as 1-sigma ellipses around the estimates (invalid ones are skipped).

    Returns:
        ``path`` as ``str``.

    Each ground truth is joined to its estimate by a thin line (the error vector). The
    subtitle gives how many queries have an estimate and their mean / median error in m.
    """
    path = _prepare_path(path)
    map_xy = _as_xy(map_xy, "map_xy")
    gt_xy = _as_xy(gt_xy, "gt_xy")
    est_xy = _as_xy(est_xy, "est_xy")
    q = gt_xy.shape[0]
    if est_xy.shape[0] != q:
        raise ValueError(f"gt_xy has {q} rows but est_xy has {est_xy.shape[0]}")
    if correct is not None:
        correct = np.asarray(correct).reshape(-1)
        if correct.shape[0] != q:
            raise ValueError(f"correct has {correct.shape[0]} entries, expected {q}")
    if sigma_xy is not None:
        sigma_xy = np.asarray(sigma_xy, dtype=np.float64)
        if sigma_xy.shape != (q, 2, 2):
            raise ValueError(f"sigma_xy must have shape ({q}, 2, 2), got {sigma_xy.shape}")

    gt_ok = np.all(np.isfinite(gt_xy), axis=1)
    est_ok = np.all(np.isfinite(est_xy), axis=1)
    pair_ok = gt_ok & est_ok
    err = np.full(q, np.nan)
    err[pair_ok] = np.linalg.norm(est_xy[pair_ok] - gt_xy[pair_ok], axis=1)
    if correct is None and threshold_m is not None:
        correct = np.where(pair_ok, err <= float(threshold_m), False)
    good = None if correct is None else np.asarray(correct, dtype=bool)

    fig, ax = _new_figure((8.0, 7.0))
    handles: List = []
    if map_xy.shape[0]:
        m_ok = np.all(np.isfinite(map_xy), axis=1)
        h = ax.scatter(map_xy[m_ok, 0], map_xy[m_ok, 1], s=6, c="0.6", linewidths=0,
                       zorder=1, label=f"map keyframes ({int(m_ok.sum())})")
        handles.append(h)

    # Error vectors, coloured like the estimate they end in.
    for i in np.flatnonzero(pair_ok):
        colour = "#d62728" if good is None or not good[i] else "#1f77b4"
        ax.plot([gt_xy[i, 0], est_xy[i, 0]], [gt_xy[i, 1], est_xy[i, 1]], color=colour,
                linewidth=0.8, alpha=0.6, zorder=2)

    if sigma_xy is not None:
        n_ell = 0
        for i in np.flatnonzero(est_ok):
            e = _cov_ellipse(est_xy[i], sigma_xy[i], facecolor="#ff7f0e", alpha=0.12,
                             edgecolor="#ff7f0e", linewidth=0.8, zorder=2)
            if e is not None:
                ax.add_patch(e)
                n_ell += 1
        if n_ell:
            handles.append(Line2D([], [], color="#ff7f0e", linewidth=6, alpha=0.35,
                                  label="estimate 1-sigma ellipse"))

    if gt_ok.any():
        h = ax.scatter(gt_xy[gt_ok, 0], gt_xy[gt_ok, 1], s=28, facecolors="none",
                       edgecolors="#2ca02c", linewidths=1.4, zorder=4,
                       label=f"ground truth ({int(gt_ok.sum())})")
        handles.append(h)
    thr = f" (\u2264 {threshold_m:g} m)" if threshold_m is not None else ""
    if good is None:
        if est_ok.any():
            handles.append(ax.scatter(est_xy[est_ok, 0], est_xy[est_ok, 1], s=30, marker="x",
                                      c="#d62728", linewidths=1.5, zorder=5,
                                      label=f"estimate ({int(est_ok.sum())})"))
    else:
        ok_c = est_ok & good
        ok_w = est_ok & ~good
        if ok_c.any():
            handles.append(ax.scatter(est_xy[ok_c, 0], est_xy[ok_c, 1], s=30, marker="x",
                                      c="#1f77b4", linewidths=1.5, zorder=5,
                                      label=f"estimate, correct{thr} ({int(ok_c.sum())})"))
        if ok_w.any():
            handles.append(ax.scatter(est_xy[ok_w, 0], est_xy[ok_w, 1], s=30, marker="x",
                                      c="#d62728", linewidths=1.5, zorder=5,
                                      label=f"estimate, wrong ({int(ok_w.sum())})"))
    if pair_ok.any():
        handles.append(Line2D([], [], color="0.3", linewidth=0.8, label="error (truth to estimate)"))

    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x east [m]")
    ax.set_ylabel("y north [m]")
    ax.grid(True, alpha=0.3)
    if not (map_xy.shape[0] or gt_ok.any() or est_ok.any()):
        _no_data(ax)

    parts = [f"{int(est_ok.sum())}/{q} queries with estimate"]
    if pair_ok.any():
        e = err[pair_ok]
        parts.append(f"error mean {np.mean(e):.1f} m, median {np.median(e):.1f} m")
    if good is not None and q:
        parts.append(f"correct{thr} {int(np.sum(good & est_ok))}/{q}")
    _set_titles(fig, ax, title, " | ".join(parts))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5,
                  framealpha=0.9, borderaxespad=0.0)
    return _save(fig, path)


# --------------------------------------------------------------------------- error CDF


def plot_error_cdf(
    errors_m: Dict[str, np.ndarray],
    path: str,
    title: str = "",
    thresholds_m: Sequence[float] = (3.0, 25.0),
    log_x: Optional[bool] = None,
) -> str:
    """Cumulative fraction of queries whose localisation error is <= x metres.

    Args:
        errors_m: ``{method name: (Q,) float64 errors in m}``; NaN or inf means the query got
            no estimate: it counts in the denominator but never reaches the curve, so the curve
            ends below 100 %.
        path: PNG file to write (parent directories are created).
        title: figure title.
        thresholds_m: error thresholds in m, drawn as vertical dashed lines; the fraction
            within each is given in the legend.
        log_x: logarithmic x axis; None (default) chooses it when the finite errors span more
            than two decades. On a log axis errors below 0.1 m are drawn at 0.1 m.

    Returns:
        ``path`` as ``str``.
    """
    path = _prepare_path(path)
    thresholds = [float(t) for t in (thresholds_m or ())]
    fig, ax = _new_figure((7.0, 4.6))
    data = {}
    for method, e in errors_m.items():
        e = np.asarray(e, dtype=np.float64).reshape(-1)
        data[method] = e
    finite_all = np.concatenate([e[np.isfinite(e)] for e in data.values()] or [np.zeros(0)])
    finite_all = np.abs(finite_all)
    floor = 0.1
    if log_x is None:
        pos = finite_all[finite_all > 0]
        log_x = bool(pos.size and pos.max() / max(pos.min(), floor) > 100.0)

    hi = max([finite_all.max() if finite_all.size else 1.0] + thresholds) * 1.05
    x_right = max(hi, floor * 10) if log_x else hi
    drawn = 0
    for i, (method, e) in enumerate(data.items()):
        n = e.size
        if n == 0:
            continue
        fin = np.sort(np.abs(e[np.isfinite(e)]))
        label = f"{method} (n={n}"
        for t in thresholds:
            label += f", \u2264{t:g} m: {_fmt_pct(np.sum(fin <= t) / n)}"
        label += ")"
        colour = _COLOURS[i % len(_COLOURS)]
        if fin.size:
            xs = np.maximum(fin, floor) if log_x else fin
            ys = np.arange(1, fin.size + 1) / n
            # Step function starting at 0 on the left edge.
            x0 = floor if log_x else 0.0
            # Extended flat to the right edge: the plateau below 100 % is the share of
            # queries with larger (or no) error.
            ax.step(np.concatenate([[x0], xs, [x_right]]), np.concatenate([[0.0], ys, ys[-1:]]),
                    where="post", color=colour, linewidth=1.8, label=label)
        else:
            ax.plot([], [], color=colour, linewidth=1.8, label=label + " - no estimates")
        drawn += 1

    if log_x:
        ax.set_xscale("log")
    for t in thresholds:
        ax.axvline(t, color="0.35", linestyle="--", linewidth=1.0, zorder=0)
        ax.text(t, 1.005, f" {t:g} m", transform=ax.get_xaxis_transform(), ha="left",
                va="bottom", fontsize=8, color="0.3")
    ax.set_ylim(0.0, 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_xlabel("localisation error x [m]" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("fraction of queries with error \u2264 x")
    ax.grid(True, which="major", alpha=0.35)
    ax.set_xlim((floor, x_right) if log_x else (0.0, x_right))
    if log_x:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    if drawn:
        # Below the axes: CDF curves fill every corner of the plot area.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8.5,
                  framealpha=0.9, ncol=1)
    else:
        _no_data(ax)
    if title:
        ax.set_title(title, fontsize=12, fontweight="bold", pad=16 if thresholds else 6)
    return _save(fig, path)


# --------------------------------------------------------------------------- PR curve


def plot_pr_curve(
    precision: np.ndarray,
    recall: np.ndarray,
    path: str,
    title: str = "",
    auc: Optional[float] = None,
) -> str:
    """Precision-recall curve (e.g. for loop-closure detection).

    Args:
        precision: ``(K,)`` float64 precision values in [0, 1], one per decision threshold.
        recall: ``(K,)`` float64 recall values in [0, 1], same thresholds and order (e.g. as
            returned by ``sklearn.metrics.precision_recall_curve``). Pairs with NaN are dropped;
            points are drawn in order of increasing recall.
        path: PNG file to write (parent directories are created).
        title: figure title.
        auc: optional area under the curve (average precision), shown in the legend.

    Returns:
        ``path`` as ``str``.

    The largest recall reached at 100 % precision is marked, a common loop-closure figure of
    merit.
    """
    path = _prepare_path(path)
    p = np.asarray(precision, dtype=np.float64).reshape(-1)
    r = np.asarray(recall, dtype=np.float64).reshape(-1)
    if p.shape != r.shape:
        raise ValueError(f"precision {p.shape} and recall {r.shape} differ in length")
    ok = np.isfinite(p) & np.isfinite(r)
    p, r = p[ok], r[ok]
    order = np.argsort(r, kind="stable")
    p, r = p[order], r[order]

    fig, ax = _new_figure((6.0, 5.0))
    if p.size:
        label = "PR curve" + (f" (AUC {auc:.3f})" if auc is not None and np.isfinite(auc) else "")
        ax.plot(r, p, color=_COLOURS[0], linewidth=1.8, label=label, clip_on=False)
        full = p >= 1.0 - 1e-12
        if full.any():
            r100 = float(r[full].max())
            ax.plot([r100], [1.0], marker="o", color=_COLOURS[3], linestyle="none",
                    markersize=6, clip_on=False, zorder=5,
                    label=f"max recall at 100% precision: {_fmt_pct(r100)}")
        ax.legend(loc="lower left", fontsize=9, framealpha=0.9)
    else:
        _no_data(ax)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.35)
    _set_titles(fig, ax, title)
    return _save(fig, path)


# --------------------------------------------------------------------------- contact sheet


def _font(size: int):
    """Pillow's built-in font (scalable when Pillow has FreeType, bitmap otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    l, t, r, b = draw.multiline_textbbox((0, 0), text, font=font, spacing=3)
    return int(math.ceil(r - min(l, 0))), int(math.ceil(b - min(t, 0)))


def _placeholder(height: int, text: str, font) -> Image.Image:
    width = max(int(round(height * 4 / 3)), 40)
    im = Image.new("RGB", (width, height), (200, 200, 200))
    d = ImageDraw.Draw(im)
    d.line([(0, 0), (width - 1, height - 1)], fill=(175, 175, 175), width=2)
    d.line([(0, height - 1), (width - 1, 0)], fill=(175, 175, 175), width=2)
    tw, th = _text_size(d, text, font)
    x, y = (width - tw) // 2, (height - th) // 2
    d.rectangle([x - 4, y - 3, x + tw + 4, y + th + 3], fill=(200, 200, 200))
    d.multiline_text((x, y), text, fill=(60, 60, 60), font=font, spacing=3)
    return im


def _thumb(path, height: int, max_width: int, font, missing: str) -> Image.Image:
    """Load ``path`` scaled to ``height`` px keeping aspect; grey placeholder on any failure."""
    if path is None or (isinstance(path, str) and not path):
        return _placeholder(height, missing, font)
    try:
        with Image.open(os.fspath(path)) as im:
            if hasattr(im, "draft"):
                im.draft("RGB", (max_width * 2, height * 2))  # fast JPEG downscale on decode
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ValueError("empty image")
            new_w = max(1, min(max_width, int(round(w * height / h))))
            return im.resize((new_w, height), Image.Resampling.LANCZOS)
    except Exception:  # noqa: BLE001 - any undecodable / missing file becomes a placeholder
        return _placeholder(height, "unreadable", font)


def contact_sheet(
    rows: List[dict],
    path: str,
    title: str = "",
    thumb_height: int = 160,
    max_rows: int = 40,
) -> str:
    """One PNG showing, per query, its image next to its top-1 match and a caption.

    Args:
        rows: list of dicts with keys ``query`` (image path), ``match`` (image path or None),
            ``caption`` (str, may contain newlines; long lines are wrapped) and ``correct``
            (bool or None). The match gets a green (True), red (False) or grey (None) border.
            Missing or undecodable image files are drawn as grey "unreadable" placeholders; a
            None match as a "no match" placeholder.
        path: PNG file to write (parent directories are created).
        title: text in the header line.
        thumb_height: height of each thumbnail in pixels; widths follow the image aspect ratio
            (capped at 2.5 x the height).
        max_rows: at most this many rows (the first ones) are drawn; the header and a footer
            line say how many were left out.

    Returns:
        ``path`` as ``str``. The sheet is an RGB PNG whose height grows linearly with the
        number of rows drawn (each row is at least ``thumb_height`` + 20 px).
    """
    path = _prepare_path(path)
    thumb_height = max(16, int(thumb_height))
    max_rows = max(0, int(max_rows))
    rows = list(rows)
    total = len(rows)
    shown = rows[:max_rows]
    pad, border = 10, 5
    max_w = int(round(thumb_height * 2.5))
    font = _font(14)
    small = _font(12)
    big = _font(18)

    thumbs = []
    for row in shown:
        qi = _thumb(row.get("query"), thumb_height, max_w, small, "no query")
        mi = _thumb(row.get("match"), thumb_height, max_w, small, "no match")
        thumbs.append((qi, mi))
    col_q = max([t[0].width for t in thumbs] + [thumb_height])
    col_m = max([t[1].width for t in thumbs] + [thumb_height]) + 2 * border
    caption_w = 460
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, char_h = _text_size(measure, "Ag", font)
    char_w = max(1, _text_size(measure, "abcdefghijklmnopqrstuvwxyz0123456789", font)[0] / 36.0)
    wrap_cols = max(10, int(caption_w / char_w))

    captions = []
    for i, row in enumerate(shown):
        raw = str(row.get("caption") or "")
        lines = []
        for para in raw.splitlines() or [""]:
            lines.extend(textwrap.wrap(para, wrap_cols) or [""])
        verdict = {True: "correct", False: "WRONG", None: "unknown"}.get(row.get("correct"), "unknown")
        captions.append((f"#{i + 1}  [{verdict}]", "\n".join(lines)))

    row_heights = []
    for (_, text) in captions:
        th = _text_size(measure, text, font)[1] if text else 0
        row_heights.append(max(thumb_height + 2 * border, char_h + 8 + th) + 2 * pad)

    width = pad + col_q + pad + col_m + pad + caption_w + pad
    header_lines = [title] if title else []
    note = f"{len(shown)} of {total} rows shown" if total > len(shown) else f"{total} rows"
    header_lines.append(note + "   |   left: query, right: top-1 match "
                               "(border green = correct, red = wrong, grey = unknown)")
    head_h = pad
    head_sizes = []
    for j, line in enumerate(header_lines):
        f = big if (title and j == 0) else small
        head_sizes.append((line, f, _text_size(measure, line, f)[1]))
        head_h += head_sizes[-1][2] + 6
    head_h += pad
    width = max(width, max(_text_size(measure, l, f)[0] for l, f, _ in head_sizes) + 2 * pad)
    footer = ""
    if total > len(shown):
        left = total - len(shown)
        footer = f"... {left} more row{'s' if left != 1 else ''} not shown (max_rows={max_rows})"
    foot_h = (_text_size(measure, footer, font)[1] + 2 * pad) if footer else 0
    height = head_h + sum(row_heights) + (0 if shown else thumb_height // 2) + foot_h

    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    y = pad
    for line, f, h in head_sizes:
        d.text((pad, y), line, fill=(0, 0, 0) if f is big else (80, 80, 80), font=f)
        y += h + 6
    y = head_h
    if not shown:
        d.text((pad, y), "(no rows)", fill=(120, 120, 120), font=font)
    colour_of = {True: (34, 160, 60), False: (214, 39, 40)}
    for (qi, mi), row, (verdict, text), rh in zip(thumbs, shown, captions, row_heights):
        d.line([(0, y), (width, y)], fill=(220, 220, 220), width=1)
        ty = y + pad + border
        sheet.paste(qi, (pad + (col_q - qi.width) // 2, ty))
        bc = colour_of.get(row.get("correct"), (150, 150, 150))
        mx = pad + col_q + pad + (col_m - mi.width - 2 * border) // 2
        d.rectangle([mx, ty - border, mx + mi.width + 2 * border - 1, ty + thumb_height + border - 1],
                    fill=bc)
        sheet.paste(mi, (mx + border, ty))
        cx = pad + col_q + pad + col_m + pad
        d.text((cx, y + pad), verdict, fill=bc, font=font)
        if text:
            d.multiline_text((cx, y + pad + char_h + 8), text, fill=(20, 20, 20), font=font,
                             spacing=3)
        y += rh
    if footer:
        d.line([(0, y), (width, y)], fill=(220, 220, 220), width=1)
        d.text((pad, y + pad), footer, fill=(120, 120, 120), font=font)
    sheet.save(path, format="PNG", optimize=False)
    sheet.close()
    return path
