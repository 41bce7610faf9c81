"""Evaluation: recall@N, localisation error, baselines, metrics JSON and plots.

Metrics: recall@N (N = 1, 5, 10) at a distance threshold (25 m as in NetVLAD, Arandjelovic et
al., CVPR 2016; 3 m as in the segmentation + attention Patch-NetVLAD method this project builds on) or at a frame tolerance; mean and median
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
from dataclasses import dataclass, field, replace
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder, baseline_heads
from vpr_localizer.errors import DatasetError
from vpr_localizer.mapping.index import build_index, search
from vpr_localizer.localization.localize import Localizer, LocalizerConfig
from vpr_localizer.localization.rerank import RerankConfig, merge_ranking
from vpr_localizer.localization.sequence import SequenceConfig
from vpr_localizer.localization.tracking import TrackingConfig
from vpr_localizer.evaluation.online import filter_entry
from vpr_localizer.mapping.patches import MapPatches, PatchSpool
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.mapping.build import encode_map, keyframes_from_records, localize_records, save_map
from vpr_localizer.models.patch_encoder import PatchEncoder, PatchSettings
from vpr_localizer.io.records import ImageRecord

LOG = logging.getLogger(__name__)

RECALL_NS = (1, 5, 10)


@dataclass
class GroundTruth:
    """How a retrieved map image is judged correct for a query.

    Attributes:
        kind: ``position`` (metric distance), ``frame`` (frame index), ``place`` (place_id), or
            ``file`` (explicit query -> correct map images pairs, :func:`ground_truth_from_file`).
        thresholds_m: distance thresholds for ``position`` (metres); the first is the primary.
        frame_tolerance: for ``frame``: |frame_q - frame_m| <= tolerance * step, where step is
            the map's frame spacing (median difference of its sorted frame indices; Nordland
            thumbnails are every 10th source frame, so +-1 frame = +-10 source frames).
        pairs: for ``file``: query image name -> the names of its correct map images.
        source: for ``file``: the ground-truth file (named in messages and the metrics).
    """

    kind: str = "position"
    thresholds_m: Tuple[float, ...] = (25.0, 3.0)
    frame_tolerance: int = 1
    pairs: Optional[Dict[str, FrozenSet[str]]] = None
    source: Optional[str] = None

    def labels(self) -> List[str]:
        if self.kind == "position":
            return [f"{t:g}m" for t in self.thresholds_m]
        if self.kind == "frame":
            return [f"frame+-{self.frame_tolerance}"]
        if self.kind == "file":
            return ["gt-file"]
        return ["place"]


def ground_truth_from_file(path: str) -> GroundTruth:
    """An explicit ground truth: a CSV with the columns ``query,map`` (image file names, header
    required, case-insensitive, UTF-8 with or without a byte-order mark); several rows per query
    give several correct map images. Names match an image's name as listed (its path relative to
    the image folder or CSV) or its base name.

    VPR-Bench's ``ground_truth_new.npy`` is a NumPy *object* array (query index, list of map
    indices), which ``np.load`` reads only with ``allow_pickle=True``; it is refused (pickles
    can run code) and must be converted to this CSV first.

    Raises:
        DatasetError: missing or unreadable file, a ``.npy`` file, no ``query``/``map`` column,
            an empty name (the message gives the line), or no rows.
    """
    import csv

    if not os.path.isfile(path):
        raise DatasetError(f"ground-truth file not found: {path}")
    if path.lower().endswith((".npy", ".npz")):
        raise DatasetError(f"{path}: NumPy ground truth (VPR-Bench's .npy is a pickled object array) is not "
                           "read, as loading it needs pickle; convert it to a CSV with columns query,map")
    pairs: Dict[str, set] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            if "query" not in cols or "map" not in cols:
                raise DatasetError(f"{path}: a ground-truth CSV needs the columns query,map "
                                   f"(found: {', '.join(reader.fieldnames or []) or 'none'})")
            for line, row in enumerate(reader, start=2):
                q, m = (row.get(cols["query"]) or "").strip(), (row.get(cols["map"]) or "").strip()
                if not q or not m:
                    raise DatasetError(f"{path}:{line}: empty query or map image name")
                pairs.setdefault(_gt_name(q), set()).add(_gt_name(m))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (offset {exc.start}); save it as UTF-8") from exc
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from exc
    if not pairs:
        raise DatasetError(f"{path}: no query,map rows")
    return GroundTruth("file", pairs={q: frozenset(ms) for q, ms in pairs.items()}, source=path)


def _gt_name(name: str) -> str:
    return os.path.normpath(name.replace("\\", "/")).replace(os.sep, "/")


def _gt_lookup(records: Sequence[ImageRecord]) -> Dict[str, List[int]]:
    """name and base name of each record -> record indices (for ``file`` ground truth)."""
    out: Dict[str, List[int]] = {}
    for i, r in enumerate(records):
        name = _gt_name(r.name)
        for key in {name, name.rsplit("/", 1)[-1]}:
            out.setdefault(key, []).append(i)
    return out


def _query_pairs(gt: GroundTruth, record: ImageRecord) -> Optional[FrozenSet[str]]:
    name = _gt_name(record.name)
    hit = gt.pairs.get(name)
    return hit if hit is not None else gt.pairs.get(name.rsplit("/", 1)[-1])


def check_ground_truth(map_records: Sequence[ImageRecord], query_records: Sequence[ImageRecord],
                       gt: GroundTruth) -> None:
    """Fail before any image is encoded when the records cannot carry ground truth ``gt``.

    ``position``: every map and query image needs a position (x/y, or lat/lon: EXIF GPS or CSV),
    and queries with lat/lon only need a geotagged map; ``frame``: a frame number (the last
    integer in the file name, or the CSV ``frame`` column); ``place``: a CSV ``place_id``;
    ``file``: the ground-truth file must list some of the queries and map images.

    Raises:
        DatasetError: one line saying what is missing, how many images lack it and one example.
        ValueError: unknown kind.
    """
    def lacking(side, recs, ok, what):
        bad = [r for r in recs if not ok(r)]
        if bad:
            raise DatasetError(f"{gt.kind} ground truth needs {what} for every image: {len(bad)} of the "
                               f"{len(recs)} {side} images have none (e.g. {bad[0].path})")

    if gt.kind == "position":
        what = "a position (GPS in EXIF, or lat/lon or x/y in a CSV)"
        for side, recs in (("map", map_records), ("query", query_records)):
            lacking(side, recs, lambda r: r.has_position or r.has_geodetic, what)
        if (any(r.has_geodetic and not r.has_position for r in query_records)
                and not any(r.has_geodetic for r in map_records)):
            raise DatasetError("position ground truth: the queries have lat/lon only but no map image is "
                               "geotagged, so their positions cannot be put in the map frame")
    elif gt.kind == "frame":
        what = "a frame number (the last integer in the file name, or a CSV 'frame' column)"
        for side, recs in (("map", map_records), ("query", query_records)):
            lacking(side, recs, lambda r: r.frame is not None, what)
    elif gt.kind == "place":
        for side, recs in (("map", map_records), ("query", query_records)):
            lacking(side, recs, lambda r: r.place_id is not None, "a place_id (CSV column)")
    elif gt.kind == "file":
        if not gt.pairs:
            raise DatasetError("file ground truth without query,map pairs")
        listed = [r for r in query_records if _query_pairs(gt, r) is not None]
        if not listed:
            raise DatasetError(f"{gt.source}: none of the {len(query_records)} query images is in its 'query' "
                               f"column (e.g. {query_records[0].name if query_records else '-'})")
        known = _gt_lookup(map_records)
        wanted = set().union(*gt.pairs.values())
        missing = sorted(m for m in wanted if m not in known)
        if len(missing) == len(wanted):
            raise DatasetError(f"{gt.source}: none of its {len(wanted)} map image names is among the "
                               f"{len(map_records)} map images (e.g. {missing[0]})")
        if missing:
            LOG.warning("%s: %d map image name(s) not among the map images, ignored (e.g. %s)",
                        gt.source, len(missing), missing[0])
        if len(listed) < len(query_records):
            LOG.warning("%s lists %d of the %d query images; the others count as queries without positives",
                        gt.source, len(listed), len(query_records))
    else:
        raise ValueError(f"unknown ground-truth kind {gt.kind!r}")


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
    if gt.kind == "file":
        known = _gt_lookup(map_records)
        rel = np.zeros((len(query_records), len(map_records)), dtype=bool)
        for qi, r in enumerate(query_records):
            for m in _query_pairs(gt, r) or ():
                rel[qi, known.get(m, [])] = True
        return {"gt-file": rel}
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


def _in_memory_map(records: Sequence[ImageRecord], descriptors: np.ndarray, datum,
                   patches: Optional[MapPatches] = None) -> VprMap:
    index = build_index(np.ascontiguousarray(descriptors, dtype=np.float32), "flat")
    meta = {"datum": None if datum is None else datum.as_dict(), "encoder": {}}
    return VprMap("<memory>", meta, keyframes_from_records(records), index, {}, patches)


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
             max_n: int = 25, progress: bool = True, description: str = "",
             sequence_lengths: Sequence[int] = (), sequence_config: Optional[SequenceConfig] = None,
             rerank: Sequence[RerankConfig] = (), patch_settings: Optional[PatchSettings] = None,
             query_step: int = 1, online_filter: Optional[TrackingConfig] = None) -> EvaluationResult:
    """Build a map from ``map_records``, query it with ``query_records`` and score everything.

    Methods scored: ``NetVLAD`` (the encoder's final descriptor, with PCA whitening when the map
    is large enough), ``NetVLAD (no PCA)`` when PCA was applied, and the baselines ``GeM`` and
    ``GAP`` on the same backbone features. With ``sequence_lengths``, also
    ``NetVLAD + SeqSLAM L=<n>`` per length: SeqSLAM sequence matching (Milford & Wyeth, ICRA
    2012; :mod:`vpr_localizer.localization.sequence`) over the NetVLAD query-vs-map similarity
    matrix, the queries taken in their given (temporal) order, so single-frame and sequence
    results come from the same descriptors in the same run. With ``rerank``, also
    ``NetVLAD + Patch-NetVLAD (performance)`` (``ransac``) and/or ``(speed)`` (``spatial``):
    the NetVLAD top-k re-ranked by Patch-NetVLAD (Hausler et al., CVPR 2021;
    :mod:`vpr_localizer.localization.rerank`) with the map's patch descriptors (made in the map
    pass, ``patch_settings``) and the queries' (made in the query pass from the same feature
    maps); its entry has a ``rerank`` block with ms/query and bytes/keyframe.

    Args:
        sequence_lengths: SeqSLAM sequence lengths L in query frames (empty: none).
        sequence_config: the other SeqSLAM parameters (velocity range, contrast window); its
            ``seq_len`` and ``top_k`` are replaced per run.
        rerank: Patch-NetVLAD re-ranking configurations, one row each (empty: none).
        patch_settings: the patch descriptors (sizes, dim, PCA sample); default
            :class:`PatchSettings` (sizes 2, 5, 8; 512-D). The input must give a feature grid
            of at least the largest patch size (else ConfigError, e.g. Nordland needs
            ``image_size`` 512x256 rather than 128x64).
        query_step: keep every ``query_step``-th query (1 = all), for every method alike.
        online_filter: also ``NetVLAD + HMM filter (online)``: the ``vpr_localizer`` node's
            sequence filter (:mod:`vpr_localizer.evaluation.online`) run frame by frame over the
            queries in order; its entry adds recall over the frames after convergence and the
            frame at which it converged.

    Writes into ``out_dir``: ``metrics.json``, ``recall.png``, ``poses.csv`` and, for metric
    ground truth, ``trajectory.png`` and ``error_cdf.png``; for at most 40 queries
    ``contact_sheet.png``; and the map itself under ``out_dir/map`` (``save_map_dir``).

    Returns:
        :class:`EvaluationResult`.

    Raises:
        DatasetError: unreadable sets or missing ground truth (the ground truth is checked by
            :func:`check_ground_truth` before anything is encoded).
        ConfigError: patch sizes that do not fit the feature grid.
    """
    from vpr_localizer.evaluation import plots

    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    if int(query_step) < 1:
        raise ValueError(f"query_step must be >= 1, got {query_step}")
    query_records = list(query_records)[::int(query_step)]
    check_ground_truth(map_records, query_records, gt)  # before minutes of encoding
    rerank = [c for c in rerank if c.enabled]
    encoder = Encoder(encoder_config)
    heads = baseline_heads()
    menc = encode_map(map_records, encoder, extra_heads=heads, progress=progress,
                      patches=(patch_settings or PatchSettings()) if rerank else None)
    mrecs = menc.records
    qspool, q_on_batch = None, None
    if menc.patches is not None:
        lay = menc.patches.layout
        penc = PatchEncoder(encoder, lay.patch_sizes, lay.strides, menc.patches.pca)
        qspool = PatchSpool(lay, menc.patches.pca)

        def append_query_patches(idx, enc):
            for scales in penc.extract(enc.features):
                qspool.append(scales)
        q_on_batch = append_query_patches
    try:
        qres = encoder.encode_paths([r.path for r in query_records], extra_heads=heads,
                                    progress="encoding queries" if progress else None, on_batch=q_on_batch)
    except BaseException:
        if qspool is not None:
            qspool.discard()
        raise
    qpatches = qspool.finish() if qspool is not None else None
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
            entry["localization"] = _localization_metrics(ests, ids[:, 0], mrecs, qrecs, gt)
            if mname == "NetVLAD":
                estimates_main = (ests, est_xy, gt_xy, err)
        if mname == "NetVLAD":
            main_ids, main_scores = ids, scores
        results[mname] = entry

    for seq_len in sequence_lengths:
        mdesc, qdesc = methods["NetVLAD"]
        entry, ests = _sequence_entry(mdesc, qdesc, mrecs, qrecs, rel, gt, lcfg, int(seq_len), k_all,
                                      sequence_config or SequenceConfig(), menc.datum)
        results[f"NetVLAD + SeqSLAM L={int(seq_len)}"] = entry

    if online_filter is not None:
        mdesc, qdesc = methods["NetVLAD"]
        out = filter_entry(Localizer(_in_memory_map(mrecs, mdesc, menc.datum), lcfg), qdesc, rel, recall_at_n,
                           RECALL_NS, online_filter)
        results["NetVLAD + HMM filter (online)"] = {"descriptor_dim": int(mdesc.shape[1]), **out}

    for rc in rerank:
        mdesc, qdesc = methods["NetVLAD"]
        entry = _rerank_entry(mdesc, qdesc, mrecs, qrecs, rel, gt, lcfg, rc, k_all, menc, qpatches,
                              1e3 * qres.callback_seconds / max(len(qrecs), 1), progress)
        results[f"NetVLAD + Patch-NetVLAD ({rc.paper_name})"] = entry

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
        {m: {n + 1: v for n, v in enumerate(e["recall_curve"][primary])} for m, e in results.items()
         if "recall_curve" in e},
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
                         "frame_step": frame_step([r.frame for r in mrecs]) if gt.kind == "frame" else None,
                         **({"file": os.path.abspath(gt.source)} if gt.kind == "file" and gt.source else {})},
        "map": {"images": len(map_records), "encoded": len(mrecs), "skipped": menc.result.skipped,
                "geotagged": menc.datum is not None, "pca_fitted": menc.pca_fitted},
        "queries": {"images": len(query_records), "encoded": len(qrecs), "skipped": qres.skipped,
                    "step": int(query_step)},
        "encoder": {"config": encoder_config.to_dict(), "fingerprint": encoder.fingerprint(),
                    "device": str(encoder.device),
                    "encode_ms_per_image": 1000.0 * qres.seconds_per_image,
                    "map_encode_ms_per_image": 1000.0 * menc.result.seconds_per_image},
        "methods": results,
        **({"patches": _patch_summary(menc, qres, len(qrecs))} if menc.patches is not None else {}),
        "seconds_total": time.perf_counter() - t_start,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_jsonable(metrics), f, indent=2)
    files["metrics"] = os.path.join(out_dir, "metrics.json")
    return EvaluationResult(metrics, files)


def _localization_metrics(ests, top1_ids: np.ndarray, mrecs, qrecs, gt: GroundTruth) -> Dict:
    """Pose errors (metres) of one method against the queries' positions: mean, median and
    within each threshold of the estimates (``ests``) and of the top-1 keyframe position alone
    (``top1_ids (Q,)``), with counts, and every error."""
    gt_xy = np.array([[r.x, r.y] for r in qrecs])
    err = np.linalg.norm(np.array([[e.x, e.y] for e in ests]) - gt_xy, axis=1)
    top1_err = np.linalg.norm(np.array([[mrecs[i].x, mrecs[i].y] for i in top1_ids]) - gt_xy, axis=1)

    def within(e: np.ndarray) -> Dict:
        return {f"{t:g}": {"correct": int((e <= t).sum()), "total": int(len(e))} for t in gt.thresholds_m}

    return {"mean_error_m": float(err.mean()), "median_error_m": float(np.median(err)), "within_m": within(err),
            "top1_mean_error_m": float(top1_err.mean()), "top1_median_error_m": float(np.median(top1_err)),
            "top1_within_m": within(top1_err), "errors_m": [round(float(e), 3) for e in err]}


def _sequence_entry(mdesc: np.ndarray, qdesc: np.ndarray, mrecs, qrecs, rel: Dict[str, np.ndarray],
                    gt: GroundTruth, lcfg: LocalizerConfig, seq_len: int, k_all: int, base: SequenceConfig,
                    datum) -> Tuple[Dict, Optional[list]]:
    """Metrics of SeqSLAM (:meth:`Localizer.sequence_candidates`) on one descriptor set, in the
    same layout as the single-frame entries (recall, curve, localisation) plus its timing."""
    loc = Localizer(_in_memory_map(mrecs, mdesc, datum), lcfg)
    cfg = replace(base, seq_len=seq_len, top_k=k_all)
    t0 = time.perf_counter()
    scores, ids = loc.sequence_candidates(np.ascontiguousarray(qdesc, np.float32), cfg)
    ms_per_query = 1e3 * (time.perf_counter() - t0) / max(len(qrecs), 1)
    entry = {"descriptor_dim": int(mdesc.shape[1]), "sequence": {
                 "seq_len": seq_len, "v_min": cfg.v_min, "v_max": cfg.v_max, "v_steps": cfg.v_steps,
                 "r_window": cfg.r_window, "ms_per_query": ms_per_query},
             "recall": {lab: recall_at_n(ids, r, RECALL_NS) for lab, r in rel.items()},
             "recall_curve": {lab: [float(np.mean(np.take_along_axis(r, ids[:, :n], 1).any(1)[r.any(1)]))
                                    if r.any() else math.nan for n in range(1, ids.shape[1] + 1)]
                              for lab, r in rel.items()}}
    ests = None
    if gt.kind == "position":
        ests = [loc.estimate(i, s) for i, s in zip(ids[:, :lcfg.top_k], scores[:, :lcfg.top_k])]
        entry["localization"] = _localization_metrics(ests, ids[:, 0], mrecs, qrecs, gt)
    return entry, ests


def _patch_summary(menc, qres, n_queries: int) -> Dict:
    """The ``patches`` block of metrics.json: layout, storage and extraction times."""
    mp = menc.patches
    return {**mp.layout.config(), "counts": list(mp.layout.counts), "dtype": "float16",
            "bytes_per_keyframe": int(mp.bytes_per_keyframe),
            "map_bytes": int(mp.bytes_per_keyframe) * len(mp),
            "pca": {"input_dim": int(mp.pca.input_dim), "dim": int(mp.pca.dim),
                    "images": mp.info.get("pca_images"), "samples": mp.info.get("pca_samples"),
                    "seconds": mp.info.get("pca_seconds")},
            "map_extract_ms_per_image": mp.info.get("extract_ms_per_image"),
            "query_extract_ms_per_image": 1e3 * qres.callback_seconds / max(n_queries, 1),
            "map_patch_seconds_total": float(menc.patch_seconds)}


def _rerank_entry(mdesc: np.ndarray, qdesc: np.ndarray, mrecs, qrecs, rel: Dict[str, np.ndarray],
                  gt: GroundTruth, lcfg: LocalizerConfig, rc: RerankConfig, k_all: int, menc,
                  qpatches: MapPatches, query_patch_ms: float, progress: bool) -> Dict:
    """Metrics of NetVLAD + Patch-NetVLAD re-ranking (:class:`~vpr_localizer.localization.rerank.PatchReranker`)
    in the layout of the single-frame entries, plus a ``rerank`` block (mode, k, patch sizes,
    ms/query of the re-ranking alone, query patch extraction ms/image, bytes/keyframe)."""
    from vpr_localizer.progress import progress_bar

    loc = Localizer(_in_memory_map(mrecs, mdesc, menc.datum, menc.patches), lcfg)
    rr = loc.reranker(rc)
    n_map = len(mrecs)
    scores, ids = loc.retrieve(np.ascontiguousarray(qdesc, np.float32), min(max(rc.k, k_all), n_map))
    q = len(qrecs)
    ranked_ids = np.zeros((q, ids.shape[1]), np.int64)
    ranked_scores = np.zeros((q, ids.shape[1]), np.float32)
    seconds = 0.0
    for qi in progress_bar(range(q), desc=f"re-ranking ({rc.paper_name})", unit="query", disable=not progress, leave=False):
        res = rr.rerank(qpatches.keyframe(qi, rr.sizes), ids[qi], scores[qi])
        seconds += res.seconds
        fi, fs = merge_ranking(res, ids[qi], scores[qi])
        ranked_ids[qi], ranked_scores[qi] = fi, fs
    lay = menc.patches.layout
    entry = {"descriptor_dim": int(mdesc.shape[1]), "rerank": {
                 "mode": rc.mode, "paper_mode": rc.paper_name, "k": int(rc.k), "k_effective": int(min(rc.k, n_map)),
                 "patch_sizes_scored": list(rr.sizes), "patch_sizes_stored": list(lay.patch_sizes),
                 "strides": list(lay.strides), "dim": int(lay.dim), "grid_hw": list(lay.grid_hw),
                 "ms_per_query": 1e3 * seconds / max(q, 1), "query_patch_extract_ms_per_image": query_patch_ms,
                 "bytes_per_keyframe": int(lay.bytes_per_keyframe),
                 "bytes_read_per_query": int(min(rc.k, n_map)) * int(sum(
                     c for p, c in zip(lay.patch_sizes, lay.counts) if p in rr.sizes)) * int(lay.dim) * 2,
                 "query_patches_dtype": "float16"},
             "recall": {lab: recall_at_n(ranked_ids, r, RECALL_NS) for lab, r in rel.items()},
             "recall_curve": {lab: [float(np.mean(np.take_along_axis(r, ranked_ids[:, :n], 1).any(1)[r.any(1)]))
                                    if r.any() else math.nan for n in range(1, min(k_all, ranked_ids.shape[1]) + 1)]
                              for lab, r in rel.items()}}
    if gt.kind == "position":
        ests = [loc.estimate(i, s) for i, s in zip(ranked_ids[:, :lcfg.top_k], ranked_scores[:, :lcfg.top_k])]
        entry["localization"] = _localization_metrics(ests, ranked_ids[:, 0], mrecs, qrecs, gt)
    return entry


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
        for lab, r in e.get("recall_converged", {}).items():
            lines.append(f"{mname:18s} [{lab}] after convergence (frame {e['converged_after_frames']}): "
                         f"R@1 {_fmt_recall(r, 1)} ({100 * r['at'][1]['recall']:.1f}%)")
        if "localization" in e:
            loc = e["localization"]
            within = "  ".join(f"<= {t} m {v['correct']}/{v['total']}" for t, v in loc["within_m"].items())
            lines.append(f"{mname:18s} error mean {loc['mean_error_m']:.1f} m, median "
                         f"{loc['median_error_m']:.1f} m; {within}")
    return lines
