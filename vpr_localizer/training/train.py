"""Training the guided NetVLAD head (NetVLAD layers + attention modules) on cached backbone features.

Method (NetVLAD, Arandjelovic et al., CVPR 2016, Sec. 4): weakly supervised triplet ranking.
For a query q, the positives are database images within ``d_pos`` of it (of which the one the
current model finds most similar is used: "best potential positive"), the negatives are database
images farther than ``d_neg``; the loss is the triplet margin loss
``sum_n max(0, m + ||q - p|| - ||q - n_j||)`` (:class:`torch.nn.TripletMarginLoss`, margin
``sqrt(0.1)`` as in the public PyTorch NetVLAD) over the ``negatives`` *hardest* negatives
(highest current similarity), mined again at the start of every epoch.

What is trained: the NetVLAD layers (centroids, soft-assignment convolution) of every stream,
initialised by k-means on the training images, and the attention modules. The backbone is
frozen: its features (and the segmentation labels, static mask and segmentation-stream
features) are computed once and cached in memory as float16, so each epoch is only the tiny
head -- it runs on a CPU.

Data: one or more traversals of the same route under different conditions (e.g. Nordland
summer and winter). Queries come from every traversal, the database of a query is every other
traversal. With ``night_augmentation`` each image of the first traversal also gets a copy
darkened by :func:`vpr_localizer.training.augment.simulate_night` -- a *photometric night simulation*,
not the seed's GAN -- which is one more query "traversal" against the others.

Split by place, never by frame: positions along the route are cut at the
``1 - val_fraction`` quantile of the first traversal; places before the cut (minus a gap of
``d_neg``) train, places after it validate. Validation reports recall@1 of the other traversals
against the first one, every epoch; the best epoch's parameters are kept.

Distances: ``frame`` ground truth measures in frame steps (the median spacing of the frame
indices), ``position`` ground truth in metres (ENU x, y).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from vpr_localizer.training.augment import simulate_night
from vpr_localizer.io.image_files import iter_image_batches
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import DatasetError
from vpr_localizer.evaluation.evaluate import frame_step
from vpr_localizer.models.guided import GuidedNetVLAD, StreamFeatures
from vpr_localizer.io.records import ImageRecord

LOG = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training hyper-parameters (units in the field comments).

    Attributes:
        epochs: passes over the training queries.
        lr: Adam learning rate of the NetVLAD layers (public PyTorch NetVLAD: 1e-4).
        attention_lr: Adam learning rate of the attention modules (10 parameters each).
        margin: triplet margin on L2 distances of unit descriptors.
        negatives: hardest negatives per query.
        queries_per_step: queries per optimiser step.
        d_pos: positive radius (frame steps or metres).
        d_neg: negatives lie farther than this (frame steps or metres).
        val_fraction: fraction of the route (from its end) used for validation.
        night_augmentation: add simulated-night copies of the first traversal as queries.
        night_strength: :func:`simulate_night` strength.
        seed: random seed (query order, night simulation).
    """

    epochs: int = 8
    lr: float = 1e-4
    attention_lr: float = 1e-2
    margin: float = math.sqrt(0.1)
    negatives: int = 10
    queries_per_step: int = 16
    d_pos: float = 1.0
    d_neg: float = 10.0
    val_fraction: float = 0.15
    night_augmentation: bool = True
    night_strength: float = 1.0
    seed: int = 0


@dataclass
class TrainReport:
    """What training did: per-epoch loss and validation recall@1, the kept epoch, sizes, times."""

    checkpoint: str
    epochs: List[Dict] = field(default_factory=list)
    best_epoch: int = 0
    train_items: int = 0
    val_items: int = 0
    cache_seconds: float = 0.0
    train_seconds: float = 0.0
    config: Dict = field(default_factory=dict)


@dataclass
class _Item:
    record: ImageRecord
    traversal: int          # index into the traversal list; night copies get len(traversals)
    night: bool
    pos: np.ndarray         # (1,) frame steps or (2,) metres
    anchor: int = 0         # index of the nearest first-traversal place (route order)


def _positions(traversals: Sequence[Sequence[ImageRecord]], gt: str) -> List[np.ndarray]:
    if gt == "frame":
        frames = [r.frame for t in traversals for r in t]
        if any(f is None for f in frames):
            raise DatasetError("frame ground truth needs a frame index for every training image")
        step = float(frame_step(sorted({int(r.frame) for r in traversals[0]})))  # the reference's spacing
        return [np.array([[r.frame / step] for r in t], np.float64) for t in traversals]
    if gt == "position":
        out = []
        for t in traversals:
            if any(r.x is None or r.y is None for r in t):
                raise DatasetError("position ground truth needs x, y (ENU metres) for every training image")
            out.append(np.array([[r.x, r.y] for r in t], np.float64))
        return out
    raise ValueError(f"gt must be 'frame' or 'position', got {gt!r}")


def split_by_place(traversals: Sequence[Sequence[ImageRecord]], gt: str, cfg: TrainConfig
                   ) -> Tuple[List[_Item], List[_Item]]:
    """Items of the training and validation places (module docstring), night copies included.

    Raises:
        DatasetError: fewer than two traversals, or a split without training or validation places.
    """
    if len(traversals) < 2:
        raise DatasetError("training needs at least two traversals of the route (e.g. summer and winter)")
    pos = _positions(traversals, gt)
    anchors = pos[0]
    # route order = order of the first traversal's records as given (sorted by frame/stamp by the caller)
    n = len(anchors)
    cut = int(round(n * (1.0 - cfg.val_fraction)))
    spacing = float(np.median(np.linalg.norm(np.diff(anchors, axis=0), axis=1))) if n > 1 else 1.0
    gap = int(math.ceil(cfg.d_neg / max(spacing, 1e-9)))
    train, val = [], []
    for t, recs in enumerate(traversals):
        d = np.linalg.norm(pos[t][:, None, :] - anchors[None, :, :], axis=2)
        nearest = d.argmin(axis=1)
        for i, rec in enumerate(recs):
            a = int(nearest[i])
            copies = [False, True] if (t == 0 and cfg.night_augmentation) else [False]
            for night in copies:
                item = _Item(rec, len(traversals) if night else t, night, pos[t][i], a)
                if a >= cut:
                    if not night:  # validation asks real traversals against the reference only
                        val.append(item)
                elif a < cut - gap:
                    train.append(item)
    if not train or not val:
        raise DatasetError(f"place split left {len(train)} training and {len(val)} validation images; "
                           "use more images or another val_fraction")
    return train, val


def cache_features(encoder: Encoder, items: Sequence[_Item], seed: int, progress: Optional[str] = None
                   ) -> Tuple[StreamFeatures, List[int]]:
    """Backbone (and segmentation) features of the items, float16 on CPU.

    Images are decoded and resized by :func:`~vpr_localizer.models.encoder.iter_image_batches`
    (unreadable ones skipped with a warning); night items are then darkened by
    :func:`simulate_night`, seeded by ``seed`` and the image name.

    Returns:
        (features with batch axis N_ok, indices of the items that could be read).
    """
    from vpr_localizer.progress import progress_bar

    cfg = encoder.config
    parts: Dict[str, List[torch.Tensor]] = {"image": [], "seg": [], "static": []}
    ok: List[int] = []
    bar = progress_bar(total=len(items), desc=progress, unit="img", disable=progress is None, leave=False)
    for idx, batch in iter_image_batches([it.record.path for it in items], cfg.image_size, cfg.batch_size,
                                         on_skip=lambda p, r: bar.update(1)):
        for j, i in enumerate(idx):
            if items[i].night:
                rng = np.random.default_rng([seed, zlib.crc32(items[i].record.name.encode())])
                batch[j] = simulate_night(batch[j], rng)
        f = encoder.stream_features(batch)
        for k in parts:
            t = getattr(f, k)
            if t is not None:
                parts[k].append(t.to("cpu", torch.float16))
        ok.extend(idx)
        bar.update(len(idx))
    bar.close()
    cat = {k: (torch.cat(v) if v else None) for k, v in parts.items()}
    return StreamFeatures(cat["image"], cat["seg"], cat["static"]), ok


@torch.no_grad()
def _describe(head: nn.Module, feats: StreamFeatures, device, batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, feats.image.shape[0], batch):
        out.append(head(feats[s:s + batch].to(device)).float().cpu())
    return torch.cat(out)


def _mine(desc: torch.Tensor, items: Sequence[_Item], cfg: TrainConfig, rng: np.random.Generator
          ) -> List[Tuple[int, int, List[int]]]:
    """(query, best positive, hardest negatives) index triplets for every query that has both."""
    pos = np.stack([it.pos for it in items])
    trav = np.array([it.traversal for it in items])
    sim = (desc @ desc.T).numpy()
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=2)
    out = []
    for q in range(len(items)):
        other = trav != trav[q]
        p_mask = other & (dist[q] <= cfg.d_pos)
        n_mask = other & (dist[q] > cfg.d_neg)
        if not p_mask.any() or n_mask.sum() < 1:
            continue
        p_idx = np.flatnonzero(p_mask)
        best_p = int(p_idx[np.argmax(sim[q, p_idx])])
        n_idx = np.flatnonzero(n_mask)
        hard = n_idx[np.argsort(-sim[q, n_idx])[:cfg.negatives]]
        out.append((q, best_p, [int(v) for v in hard]))
    rng.shuffle(out)
    return out


@torch.no_grad()
def _val_recall(head: nn.Module, feats: StreamFeatures, items: Sequence[_Item], cfg: TrainConfig, device
                ) -> Tuple[float, int, int]:
    """Recall@1 of the validation queries of the real other traversals (not the simulated night
    copies, whose originals are in the database) against the first traversal."""
    desc = _describe(head, feats, device)
    trav = np.array([it.traversal for it in items])
    night = np.array([it.night for it in items])
    pos = np.stack([it.pos for it in items])
    db = np.flatnonzero(trav == 0)
    qs = np.flatnonzero((trav != 0) & ~night)
    if len(db) == 0 or len(qs) == 0:
        return 0.0, 0, 0
    best = db[(desc[qs] @ desc[db].T).argmax(dim=1).numpy()]
    hits = int((np.linalg.norm(pos[qs] - pos[best], axis=1) <= cfg.d_pos).sum())
    return hits / len(qs), hits, len(qs)


def train_encoder(encoder: Encoder, traversals: Sequence[Sequence[ImageRecord]], gt: str, cfg: TrainConfig,
                  out_path: str, progress: bool = True) -> TrainReport:
    """Train a guided encoder's NetVLAD + attention on cached features and write its checkpoint.

    Args:
        encoder: a guided NetVLAD :class:`Encoder` (``config.guided``); untrained (k-means is run
            on the training places) or initialised from a checkpoint.
        traversals: two or more traversals of one route, each in route order; the first is the
            reference (validation database, night-simulation source).
        gt: ``frame`` or ``position`` (ENU x, y on the records).
        cfg: :class:`TrainConfig`.
        out_path: checkpoint file to write (atomically); a ``.json`` log and a ``.png`` curve
            are written beside it.
        progress: tqdm bars.

    Returns:
        :class:`TrainReport`.

    Raises:
        ValueError: the encoder is not a guided NetVLAD encoder.
        DatasetError: unusable training data (see :func:`split_by_place`).
    """
    if not encoder.config.guided:
        raise ValueError("training needs a guided NetVLAD encoder (static_mask, seg_stream and/or attention)")
    if encoder.pca is not None:
        LOG.info("training drops the encoder's PCA (it belongs to the old NetVLAD parameters); maps fit a new one")
        encoder.pca = None
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_items, val_items = split_by_place(traversals, gt, cfg)
    LOG.info("training on %d images (%d validation) of %d traversal(s)%s", len(train_items), len(val_items),
             len(traversals), " + simulated night" if cfg.night_augmentation else "")
    t0 = time.perf_counter()
    if not encoder.trained:
        encoder.fit_aggregator([it.record.path for it in train_items if not it.night],
                               progress="NetVLAD k-means sample" if progress else None)
    train_f, ok = cache_features(encoder, train_items, cfg.seed, "caching training features" if progress else None)
    train_items = [train_items[i] for i in ok]
    val_f, ok = cache_features(encoder, val_items, cfg.seed, "caching validation features" if progress else None)
    val_items = [val_items[i] for i in ok]
    cache_s = time.perf_counter() - t0

    head: GuidedNetVLAD = encoder.aggregator
    device = encoder.device
    att = [p for n, p in head.named_parameters() if "attention" in n]
    vlad = [p for n, p in head.named_parameters() if "attention" not in n]
    groups = [{"params": vlad, "lr": cfg.lr}] + ([{"params": att, "lr": cfg.attention_lr}] if att else [])
    opt = torch.optim.Adam(groups)
    loss_fn = nn.TripletMarginLoss(margin=cfg.margin, p=2, reduction="sum")
    report = TrainReport(checkpoint=out_path, train_items=len(train_items), val_items=len(val_items),
                         cache_seconds=cache_s, config=asdict(cfg))
    r1, hits, nq = _val_recall(head.eval(), val_f, val_items, cfg, device)
    report.epochs.append({"epoch": 0, "loss": None, "triplets": 0, "val_recall@1": r1, "val_hits": hits,
                          "val_queries": nq})
    LOG.info("epoch 0 (k-means init): validation recall@1 %.3f (%d/%d)", r1, hits, nq)
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    best = (r1, 0)
    t1 = time.perf_counter()
    from vpr_localizer.progress import progress_bar

    for epoch in range(1, cfg.epochs + 1):
        head.eval()
        triplets = _mine(_describe(head, train_f, device), train_items, cfg, rng)
        head.train()
        total, steps = 0.0, 0
        bar = progress_bar(total=len(triplets), desc=f"epoch {epoch}/{cfg.epochs}", unit="q", disable=not progress,
                   leave=False)
        for s in range(0, len(triplets), cfg.queries_per_step):
            chunk = triplets[s:s + cfg.queries_per_step]
            idx = sorted({i for q, p, ns in chunk for i in (q, p, *ns)})
            where = {v: j for j, v in enumerate(idx)}
            d = head(train_f[torch.tensor(idx)].to(device))
            loss = 0.0
            for q, p, ns in chunk:
                nq_ = len(ns)
                loss = loss + loss_fn(d[where[q]].expand(nq_, -1), d[where[p]].expand(nq_, -1),
                                      d[[where[n] for n in ns]]) / nq_
            loss = loss / len(chunk)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chunk)
            steps += len(chunk)
            bar.update(len(chunk))
        bar.close()
        head.eval()
        r1, hits, nq = _val_recall(head, val_f, val_items, cfg, device)
        mean_loss = total / max(steps, 1)
        report.epochs.append({"epoch": epoch, "loss": mean_loss, "triplets": len(triplets), "val_recall@1": r1,
                              "val_hits": hits, "val_queries": nq})
        LOG.info("epoch %d: loss %.4f on %d triplets; validation recall@1 %.3f (%d/%d)", epoch, mean_loss,
                 len(triplets), r1, hits, nq)
        if r1 > best[0]:
            best = (r1, epoch)
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()
    encoder.trained = True
    report.best_epoch = best[1]
    report.train_seconds = time.perf_counter() - t1
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    encoder.save_checkpoint(out_path)
    stem = os.path.splitext(out_path)[0]
    with open(stem + ".json", "w") as fh:
        json.dump(asdict(report), fh, indent=2)
    _plot(report, stem + ".png")
    return report


def _plot(report: TrainReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = [e["epoch"] for e in report.epochs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep, [e["val_recall@1"] for e in report.epochs], "o-", color="tab:blue", label="validation recall@1")
    ax.set_xlabel("epoch (0 = k-means initialisation)")
    ax.set_ylabel("validation recall@1", color="tab:blue")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(ep[1:], [e["loss"] for e in report.epochs[1:]], "s--", color="tab:red", label="triplet loss")
    ax2.set_ylabel("mean triplet loss", color="tab:red")
    ax.set_title(f"training: best epoch {report.best_epoch} ({report.train_items} train / "
                 f"{report.val_items} val images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
