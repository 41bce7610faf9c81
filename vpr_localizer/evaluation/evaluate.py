"""Evaluation: recall@N, localisation error, baselines, metrics JSON and plots.

Metrics follow ``../shared/docs/RESEARCH.md`` section 8: recall@N (N = 1, 5, 10) at a distance
threshold (25 m standard, 3 m as in the seed paper) or at a frame tolerance; mean and median
localisation error in metres; accuracy within 3 m; always with counts.

Every evaluation also reports global average pooling (GAP) and GeM (p=3) on the same backbone
feature maps, computed in the same pass, so the gain of NetVLAD is measured, not assumed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.models.encoder import Encoder, EncoderConfig, baseline_heads
from vpr_localizer.errors import DatasetError
from vpr_localizer.mapping.index import build_index, search
from vpr_localizer.localization.localize import Localizer, LocalizerConfig
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.mapping.build import encode_map, keyframes_from_records, localize_records, save_map
from vpr_localizer.io.records import ImageRecord

LOG = logging.getLogger(__name__)

RECALL_NS = (1, 5, 10)


@dataclass
class GroundTruth:
    """How a retrieved map image is judged correct for a query.

    Attributes:
        kind: ``position`` (metric distance), ``frame`` (frame index), or ``place`` (place_id).
        thresholds_m: distance thresholds for ``position`` (metres); the first is the primary.
        frame_tolerance: for ``frame``: |frame_q - frame_m| <= tolerance * step, where step is
            the map's frame spacing (median difference of its sorted frame indices; Nordland
            thumbnails are every 10th source frame, so +-1 frame = +-10 source frames).
    """

    kind: str = "position"
    thresholds_m: Tuple[float, ...] = (25.0, 3.0)
    frame_tolerance: int = 1

    def labels(self) -> List[str]:
        if self.kind == "position":
            return [f"{t:g}m" for t in self.thresholds_m]
        if self.kind == "frame":
            return [f"frame+-{self.frame_tolerance}"]
        return ["place"]


def frame_step(frames: Sequence[int]) -> int:
    """Typical spacing of frame indices (median positive difference; 1 if undefined)."""
    f = np.unique(np.asarray([x for x in frames if x is not None and x >= 0], dtype=np.int64))
    if f.size < 2:
        return 1
    return max(1, int(np.median(np.diff(f))))


def relevance(map_records: Sequence[ImageRecord], query_records: Sequence[ImageRecord],
              gt: GroundTruth) -> Dict[str, np.ndarray]:
    """Ground-truth relevance matrices.

    Returns:
        label -> ``(Q, M)`` bool, True where map image m shows the query's place.

    Raises:
        DatasetError: the records lack the ground truth the kind needs.
    """
    if gt.kind == "position":
        if not all(r.has_position for r in list(map_records) + list(query_records)):
            raise DatasetError("position ground truth needs a position for every map and query image")
        m = np.array([[r.x, r.y] for r in map_records])
        q = np.array([[r.x, r.y] for r in query_records])
        d = np.linalg.norm(q[:, None, :] - m[None, :, :], axis=2)
        return {f"{t:g}m": d <= t for t in gt.thresholds_m}
    if gt.kind == "frame":
        if any(r.frame is None for r in list(map_records) + list(query_records)):
            raise DatasetError("frame ground truth needs a frame index in every file name")
        step = frame_step([r.frame for r in map_records])
        m = np.array([r.frame for r in map_records])
        q = np.array([r.frame for r in query_records])
        return {f"frame+-{gt.frame_tolerance}": np.abs(q[:, None] - m[None, :]) <= gt.frame_tolerance * step}
    if gt.kind == "place":
        if any(r.place_id is None for r in list(map_records) + list(query_records)):
            raise DatasetError("place ground truth needs a place_id for every image")
        m = np.array([r.place_id for r in map_records])
        q = np.array([r.place_id for r in query_records])
        return {"place": q[:, None] == m[None, :]}
    raise ValueError(f"unknown ground-truth kind {gt.kind!r}")


def recall_at_n(ranked_ids: np.ndarray, relevant: np.ndarray, ns: Sequence[int] = RECALL_NS) -> Dict:
    """Recall@N with counts.

    A query is correct at N when one of its top-N retrieved map images is relevant. Only
    queries with at least one relevant map image are counted (the others are reported).

    Args:
        ranked_ids: ``(Q, K)`` int64 map ids, best first (K >= max N, or all the map).
        relevant: ``(Q, M)`` bool.

    Returns:
        ``{"queries_with_positives": P, "queries_without": Q - P,
        "at": {N: {"correct": c, "total": P, "recall": c / P}}}``.
    """
    has_pos = relevant.any(axis=1)
    total = int(has_pos.sum())
    out = {"queries_with_positives": total, "queries_without": int((~has_pos).sum()), "at": {}}
    for n in ns:
        top = ranked_ids[:, :n]
        hit = np.take_along_axis(relevant, np.clip(top, 0, None), axis=1) & (top >= 0)
        correct = int((hit.any(axis=1) & has_pos).sum())
        out["at"][int(n)] = {"correct": correct, "total": total,
                             "recall": correct / total if total else math.nan}
    return out


def _in_memory_map(records: Sequence[ImageRecord], descriptors: np.ndarray, datum) -> VprMap:
    index = build_index(np.ascontiguousarray(descriptors, dtype=np.float32), "flat")
    meta = {"datum": None if datum is None else datum.as_dict(), "encoder": {}}
    return VprMap("<memory>", meta, keyframes_from_records(records), index, {})


def _fmt_recall(r: Dict, n: int) -> str:
    a = r["at"][n]
    return f"{a['correct']}/{a['total']}"


@dataclass
class EvaluationResult:
    """Everything one evaluation produced: the metrics dict and the files written."""

    metrics: Dict
    files: Dict[str, str] = field(default_factory=dict)


def evaluate(map_records: Sequence[ImageRecord], query_records: Sequence[ImageRecord],
             encoder_config: EncoderConfig, gt: GroundTruth, out_dir: str, name: str = "evaluation",
             localizer_config: Optional[LocalizerConfig] = None, save_map_dir: bool = True,
             max_n: int = 25, progress: bool = True, description: str = "") -> EvaluationResult:
    """Build a map from ``map_records``, query it with ``query_records`` and score everything.

    Methods scored: ``NetVLAD`` (the encoder's final descriptor, with PCA whitening when the map
    is large enough), ``NetVLAD (no PCA)`` when PCA was applied, and the baselines ``GeM`` and
    ``GAP`` on the same backbone features.

    Writes into ``out_dir``: ``metrics.json``, ``recall.png``, ``poses.csv`` and, for metric
    ground truth, ``trajectory.png`` and ``error_cdf.png``; for at most 40 queries
    ``contact_sheet.png``; and the map itself under ``out_dir/map`` (``save_map_dir``).

    Returns:
        :class:`EvaluationResult`.

    Raises:
        DatasetError: unreadable sets or missing ground truth.
    """
    from vpr_localizer.evaluation import plots

    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    encoder = Encoder(encoder_config)
    heads = baseline_heads()
    menc = encode_map(map_records, encoder, extra_heads=heads, progress=progress)
    mrecs = menc.records
    qres = encoder.encode_paths([r.path for r in query_records], extra_heads=heads,
                                progress="encoding queries" if progress else None)
    qrecs = localize_records([query_records[i] for i in qres.ok], menc.datum)
    if not qrecs:
        raise DatasetError("none of the query images could be read")
    files: Dict[str, str] = {}
    if save_map_dir:
        files["map"] = save_map(menc, encoder, os.path.join(out_dir, "map"), overwrite=True)

    rel = relevance(mrecs, qrecs, gt)
    methods = {"NetVLAD": (menc.result.descriptors, qres.descriptors)}
    if menc.pca_fitted:
        methods["NetVLAD (no PCA)"] = (menc.result.raw, qres.raw)
    for k in heads:
        methods[k] = (menc.result.extras[k], qres.extras[k])

    k_all = min(max(max_n, max(RECALL_NS)), len(mrecs))
    lcfg = localizer_config or LocalizerConfig()
    metric = gt.kind == "position"
    results: Dict[str, Dict] = {}
    estimates_main = None
    for mname, (mdesc, qdesc) in methods.items():
        vmap = _in_memory_map(mrecs, mdesc, menc.datum)
        scores, ids = search(vmap.index, np.ascontiguousarray(qdesc, np.float32), k_all)
        entry = {"descriptor_dim": int(mdesc.shape[1]),
                 "recall": {lab: recall_at_n(ids, r, RECALL_NS) for lab, r in rel.items()},
                 "recall_curve": {lab: [float(np.mean(np.take_along_axis(r, ids[:, :n], 1).any(1)[r.any(1)]))
                                        if r.any() else math.nan for n in range(1, k_all + 1)]
                                  for lab, r in rel.items()}}
        if metric:
            loc = Localizer(vmap, lcfg)
            ests = [loc.estimate(i, s) for i, s in zip(ids[:, :lcfg.top_k], scores[:, :lcfg.top_k])]
            gt_xy = np.array([[r.x, r.y] for r in qrecs])
            est_xy = np.array([[e.x, e.y] for e in ests])
            err = np.linalg.norm(est_xy - gt_xy, axis=1)
            top1_xy = np.array([[mrecs[i].x, mrecs[i].y] for i in ids[:, 0]])
            top1_err = np.linalg.norm(top1_xy - gt_xy, axis=1)
            entry["localization"] = {
                "mean_error_m": float(err.mean()), "median_error_m": float(np.median(err)),
                "within_m": {f"{t:g}": {"correct": int((err <= t).sum()), "total": int(len(err))}
                             for t in gt.thresholds_m},
                "top1_mean_error_m": float(top1_err.mean()), "top1_median_error_m": float(np.median(top1_err)),
                "top1_within_m": {f"{t:g}": {"correct": int((top1_err <= t).sum()), "total": int(len(err))}
                                  for t in gt.thresholds_m},
                "errors_m": [round(float(e), 3) for e in err],
            }
            if mname == "NetVLAD":
                estimates_main = (ests, est_xy, gt_xy, err)
        if mname == "NetVLAD":
            main_ids, main_scores = ids, scores
        results[mname] = entry

    # per-query output of the main method
    rows = []
    for qi, r in enumerate(qrecs):
        row = {"query": r.name, "top_ids": [int(i) for i in main_ids[qi, :10]],
               "top_images": [mrecs[i].name for i in main_ids[qi, :3]],
               "top_scores": [round(float(s), 4) for s in main_scores[qi, :10]],
               "correct_at_1": {lab: bool(rel[lab][qi, main_ids[qi, 0]]) for lab in rel}}
        if estimates_main is not None:
            e = estimates_main[0][qi]
            row.update({"x": e.x, "y": e.y, "gt_x": r.x, "gt_y": r.y, "error_m": float(estimates_main[3][qi]),
                        "lat": e.lat, "lon": e.lon, "cov_xx": float(e.covariance_xy[0, 0]),
                        "cov_xy": float(e.covariance_xy[0, 1]), "cov_yy": float(e.covariance_xy[1, 1])})
        rows.append(row)
    files["poses"] = _write_rows_csv(os.path.join(out_dir, "poses.csv"), rows)

    primary = gt.labels()[0]
    files["recall_plot"] = plots.plot_recall_curve(
        {m: {n + 1: v for n, v in enumerate(e["recall_curve"][primary])} for m, e in results.items()},
        os.path.join(out_dir, "recall.png"), title=f"{name}: recall@N ({primary})",
        counts={m: (e["recall"][primary]["at"][1]["correct"], e["recall"][primary]["at"][1]["total"])
                for m, e in results.items()})
    if estimates_main is not None:
        ests, est_xy, gt_xy, err = estimates_main
        files["trajectory_plot"] = plots.plot_trajectory(
            np.array([[r.x, r.y] for r in mrecs]), gt_xy, est_xy, os.path.join(out_dir, "trajectory.png"),
            title=f"{name}: NetVLAD pose estimates", correct=err <= gt.thresholds_m[-1],
            threshold_m=gt.thresholds_m[-1], sigma_xy=np.stack([e.covariance_xy for e in ests]))
        files["error_cdf_plot"] = plots.plot_error_cdf(
            {m: np.asarray(e["localization"]["errors_m"]) for m, e in results.items()},
            os.path.join(out_dir, "error_cdf.png"), title=f"{name}: localisation error",
            thresholds_m=tuple(sorted(gt.thresholds_m)))
    if len(qrecs) <= 40:
        sheet = [{"query": r.path, "match": mrecs[main_ids[qi, 0]].path,
                  "caption": f"{r.name} -> {mrecs[main_ids[qi, 0]].name} ({main_scores[qi, 0]:.3f})",
                  "correct": bool(rel[primary][qi, main_ids[qi, 0]])} for qi, r in enumerate(qrecs)]
        files["contact_sheet"] = plots.contact_sheet(sheet, os.path.join(out_dir, "contact_sheet.png"),
                                                     title=f"{name}: query | NetVLAD top-1")

    metrics = {
        "name": name,
        "description": description,
        "ground_truth": {"kind": gt.kind, "labels": gt.labels(), "thresholds_m": list(gt.thresholds_m),
                         "frame_tolerance": gt.frame_tolerance,
                         "frame_step": frame_step([r.frame for r in mrecs]) if gt.kind == "frame" else None},
        "map": {"images": len(map_records), "encoded": len(mrecs), "skipped": menc.result.skipped,
                "geotagged": menc.datum is not None, "pca_fitted": menc.pca_fitted},
        "queries": {"images": len(query_records), "encoded": len(qrecs), "skipped": qres.skipped},
        "encoder": {"config": encoder_config.to_dict(), "fingerprint": encoder.fingerprint(),
                    "device": str(encoder.device),
                    "encode_ms_per_image": 1000.0 * qres.seconds_per_image,
                    "map_encode_ms_per_image": 1000.0 * menc.result.seconds_per_image},
        "methods": results,
        "seconds_total": time.perf_counter() - t_start,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_jsonable(metrics), f, indent=2)
    files["metrics"] = os.path.join(out_dir, "metrics.json")
    return EvaluationResult(metrics, files)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_rows_csv(path: str, rows: List[Dict]) -> str:
    import csv

    if not rows:
        open(path, "w").close()
        return path
    keys = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return path


def summary_lines(metrics: Dict) -> List[str]:
    """Human-readable lines: recall@1/5/10 with counts per method and label, errors in metres."""
    lines = []
    for mname, e in metrics["methods"].items():
        for lab, r in e["recall"].items():
            parts = [f"R@{n} {_fmt_recall(r, n)} ({100 * r['at'][n]['recall']:.1f}%)" for n in RECALL_NS
                     if n in r["at"]]
            lines.append(f"{mname:18s} [{lab}] " + "  ".join(parts))
        if "localization" in e:
            loc = e["localization"]
            within = "  ".join(f"<= {t} m {v['correct']}/{v['total']}" for t, v in loc["within_m"].items())
            lines.append(f"{mname:18s} error mean {loc['mean_error_m']:.1f} m, median "
                         f"{loc['median_error_m']:.1f} m; {within}")
    return lines
