"""Training NetVLAD (and the guided variant's attention) together with the backbone's last block.

Method (NetVLAD, Arandjelovic et al., CVPR 2016, Sec. 4 and 5.1): weakly supervised triplet
ranking. For a query q, the positives are images of other traversals within ``d_pos`` of it (of
which the one the current model finds most similar is used: "best potential positive"), the
negatives are images of other traversals farther than ``d_neg``; the ``negatives`` *hardest*
(most similar) are mined again at the start of every epoch. The loss is the paper's Eq. 7 on
squared Euclidean distances of the unit descriptors,
``L = sum_j max(0, ||q - p||^2 + m - ||q - n_j||^2)`` with margin ``m = 0.1`` (``loss="squared"``),
or the public PyTorch NetVLAD's :class:`torch.nn.TripletMarginLoss` on plain distances with
margin ``sqrt(0.1)`` (``loss="l2"``). Each query's term is averaged over its negatives.

What is trained: the backbone's last block (VGG16 conv5_1..conv5_3, as in the paper, which
trains "down to conv5") when ``train_tail``, the NetVLAD layers of every stream (initialised by
k-means on the training images) and the attention modules. Everything before the tail is
frozen: its features are computed once and cached on disk as float16
(:mod:`vpr_localizer.training.feature_cache`), so an epoch runs only conv5 + NetVLAD on the
(at Nordland's 128x64 input, 8x4) feature grid -- feasible on a CPU.

Why the first version did not learn (measured, README "Training"): it trained only the NetVLAD
layers with Adam at 1e-4 for 4 epochs; conv5 features stayed ImageNet's, the NetVLAD layer alone
barely moves the descriptor (validation recall@1 15 -> 17 of 120), and the margin was applied
to plain rather than squared distances.

After training, PCA whitening (:mod:`vpr_localizer.models.pca`) is fitted on the training
images' descriptors and stored in the checkpoint (``fit_pca``), so a small map (Gardens, Lund)
gets a whitened descriptor without fitting PCA on its own few images.

Data: one or more traversals of the same route under different conditions (e.g. Nordland
summer and winter). Queries come from every traversal, the database of a query is every other
traversal. With ``night_augmentation`` each image of the first traversal also gets a copy
darkened by :func:`vpr_localizer.training.augment.simulate_night` -- a *photometric night simulation*,
not the seed's GAN -- which is one more query "traversal" against the others.

Split by place, never by frame: positions along the route are cut at the
``1 - val_fraction`` quantile of the first traversal; places before the cut (minus a gap of
``d_neg``) train, places after it validate. Validation reports recall@1 and @5 of the other
traversals against the first one, every epoch; the best epoch's parameters are kept.

Distances: ``frame`` ground truth measures in frame steps (the median spacing of the frame
indices), ``position`` ground truth in metres (ENU x, y).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpr_localizer.errors import DatasetError, WeightsError
from vpr_localizer.evaluation.evaluate import frame_step
from vpr_localizer.io.records import ImageRecord
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.models.guided import StreamFeatures
from vpr_localizer.training.feature_cache import CacheItem, FeatureCache, build_feature_cache

LOG = logging.getLogger(__name__)

LOSSES = ("squared", "l2")
#: a mean gradient norm below this in every trained group means training stopped moving
#: (measured: ~1e-7 once collapsed, 0.02-3 while learning) ...
COLLAPSE_GRAD_NORM = 1e-4
#: ... and with at least this fraction of the triplet terms still active it is a collapse (most
#: images share one descriptor, every active term equals the margin); with fewer it has converged:
#: the loss is 0, or the only active terms have identical images on both sides (Nordland's
#: stationary stretches, e.g. positions 0-12, give pixel-identical frames at different places).
COLLAPSE_MIN_ACTIVE = 0.25


@dataclass
class TrainConfig:
    """Training hyper-parameters (units in the field comments).

    Attributes:
        epochs: passes of mining + training.
        lr: Adam learning rate of the NetVLAD layers.
        tail_lr: Adam learning rate of the backbone tail (conv5; pretrained, so lower).
        attention_lr: Adam learning rate of the attention modules (10 parameters each).
        lr_gamma: every learning rate is multiplied by this after each epoch (decay).
        train_tail: train the backbone's last block (VGG16 conv5) with NetVLAD; False trains
            the aggregator only on cached full-backbone features.
        tail_block: where the trained tail starts, one of the backbone's ``tail_blocks``
            (VGG16 ``conv5`` or ``conv4``: conv4_1..conv5_3 on cached pool3 features, the
            end-to-end run of ``scripts/train_gpu.sh``); "" = the backbone's default (conv5).
        loss: ``squared`` (NetVLAD Eq. 7, margin on squared distances) or ``l2``
            (:class:`torch.nn.TripletMarginLoss` on distances).
        margin: triplet margin (0.1 for ``squared``; ``sqrt(0.1)`` is the ``l2`` equivalent).
        negatives: hardest negatives per query.
        queries_per_step: queries per optimiser step.
        queries_per_epoch: queries drawn (without replacement) per epoch; 0 = every training image.
        d_pos: positive radius (frame steps or metres).
        d_neg: negatives lie farther than this (frame steps or metres).
        val_fraction: fraction of the route (from its end) used for validation.
        night_augmentation: add simulated-night copies of the first traversal as queries.
        night_strength: :func:`simulate_night` strength.
        fit_pca: fit PCA whitening on the training descriptors after training and store it in
            the checkpoint (``pca_dim`` of the encoder config; needs ``pca_min_images`` images).
        max_grad_norm: clip the gradient of all trained parameters to this L2 norm before each
            step (:func:`torch.nn.utils.clip_grad_norm_`); 0 = no clipping. A large first step
            can kill conv5's ReLUs: every image then gets the same descriptor, a stationary point
            of the triplet loss (loss = margin x active fraction, gradient ~1e-8).
        seed: random seed (query order, night simulation).
    """

    epochs: int = 8
    lr: float = 1e-4
    tail_lr: float = 1e-5
    attention_lr: float = 1e-2
    lr_gamma: float = 1.0
    train_tail: bool = True
    tail_block: str = ""
    loss: str = "squared"
    margin: float = 0.1
    negatives: int = 10
    queries_per_step: int = 16
    queries_per_epoch: int = 0
    d_pos: float = 1.0
    d_neg: float = 10.0
    val_fraction: float = 0.15
    night_augmentation: bool = True
    night_strength: float = 1.0
    fit_pca: bool = True
    max_grad_norm: float = 0.0
    seed: int = 0


@dataclass
class TrainReport:
    """What training did: per-epoch loss, active-triplet fraction, gradient norms and validation
    recall@1/@5, the kept epoch, sizes, times."""

    checkpoint: str
    epochs: List[Dict] = field(default_factory=list)
    best_epoch: int = 0
    train_items: int = 0
    val_items: int = 0
    cache_seconds: float = 0.0
    cache_bytes: int = 0
    train_seconds: float = 0.0
    trained_parameters: Dict[str, int] = field(default_factory=dict)
    collapsed_epoch: Optional[int] = None
    converged_epoch: Optional[int] = None
    pca: Optional[Dict] = None
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


class TrainHead(nn.Module):
    """What training runs on cached features: the backbone tail (optional) then the aggregator.

    Args:
        encoder: the encoder being trained (its backbone tail and aggregator are used in place,
            so training changes the encoder).
        train_tail: apply (and train) the backbone's tail; the cache then holds pre-tail features.

    ``forward(StreamFeatures) -> (B, raw_dim)`` float32 unit descriptors (before PCA).
    """

    def __init__(self, encoder: Encoder, train_tail: bool):
        super().__init__()
        self.tail = encoder.backbone.tail_modules() if train_tail else None
        self.aggregator = encoder.aggregator
        self.takes_streams = bool(encoder.aggregator_spec.takes_streams(encoder.config))

    def forward(self, feats: StreamFeatures) -> torch.Tensor:  # noqa: D401
        if self.tail is not None:
            feats = StreamFeatures(self.tail(feats.image), None if feats.seg is None else self.tail(feats.seg),
                                   feats.static)
        if self.takes_streams:
            return self.aggregator(feats)
        return self.aggregator(feats.image)

    def groups(self) -> Dict[str, List[nn.Parameter]]:
        """Trained parameters by group: ``tail``, ``netvlad``, ``attention``."""
        out: Dict[str, List[nn.Parameter]] = {"tail": [], "netvlad": [], "attention": []}
        if self.tail is not None:
            out["tail"] = [p for p in self.tail.parameters()]
        for n, p in self.aggregator.named_parameters():
            out["attention" if "attention" in n else "netvlad"].append(p)
        return {k: v for k, v in out.items() if v}


@torch.no_grad()
def _describe(head: nn.Module, cache: FeatureCache, device, batch: int = 256) -> torch.Tensor:
    """``(N, raw_dim)`` float32 descriptors of every cached row, on CPU."""
    head.eval()
    return torch.cat([head(cache.get(slice(s, s + batch), device)).float().cpu()
                      for s in range(0, len(cache), batch)])


def _mine(desc: torch.Tensor, items: Sequence[_Item], cfg: TrainConfig, rng: np.random.Generator,
          queries: Optional[Sequence[int]] = None) -> List[Tuple[int, int, List[int]]]:
    """(query, best positive, hardest negatives) index triplets for every query that has both.

    Args:
        desc: ``(N, D)`` float32 descriptors of ``items``.
        items: the training items (positions, traversals).
        cfg: ``d_pos``, ``d_neg``, ``negatives``.
        rng: shuffles the output order.
        queries: item indices to mine for; None = all.
    """
    pos = np.stack([it.pos for it in items]).astype(np.float64)
    trav = np.array([it.traversal for it in items])
    qs = np.arange(len(items)) if queries is None else np.asarray(queries, np.int64)
    out = []
    for s in range(0, len(qs), 512):  # (512, N) similarity / distance blocks
        blk = qs[s:s + 512]
        sim = (desc[torch.as_tensor(blk)] @ desc.T).numpy()
        dist = np.linalg.norm(pos[blk][:, None, :] - pos[None, :, :], axis=2)
        for r, q in enumerate(blk):
            other = trav != trav[q]
            p_mask = other & (dist[r] <= cfg.d_pos)
            n_mask = other & (dist[r] > cfg.d_neg)
            if not p_mask.any() or not n_mask.any():
                continue
            p_idx = np.flatnonzero(p_mask)
            best_p = int(p_idx[np.argmax(sim[r, p_idx])])
            n_idx = np.flatnonzero(n_mask)
            hard = n_idx[np.argsort(-sim[r, n_idx], kind="stable")[:cfg.negatives]]
            out.append((int(q), best_p, [int(v) for v in hard]))
    rng.shuffle(out)
    return out


def _val_recall(desc: torch.Tensor, items: Sequence[_Item], cfg: TrainConfig) -> Dict:
    """Recall@1 and @5 of the validation queries of the real other traversals (not the simulated
    night copies, whose originals are in the database) against the first traversal.

    Args:
        desc: ``(N, D)`` descriptors of the validation ``items``.

    Returns:
        ``{"r1", "r5", "hits1", "hits5", "queries"}``.
    """
    trav = np.array([it.traversal for it in items])
    night = np.array([it.night for it in items])
    pos = np.stack([it.pos for it in items])
    db = np.flatnonzero(trav == 0)
    qs = np.flatnonzero((trav != 0) & ~night)
    if len(db) == 0 or len(qs) == 0:
        return {"r1": 0.0, "r5": 0.0, "hits1": 0, "hits5": 0, "queries": 0}
    k = min(5, len(db))
    top = db[torch.topk(desc[qs] @ desc[db].T, k, dim=1).indices.numpy()]  # (Q, k)
    ok = np.linalg.norm(pos[qs][:, None, :] - pos[top], axis=2) <= cfg.d_pos
    h1, h5 = int(ok[:, 0].sum()), int(ok.any(axis=1).sum())
    return {"r1": h1 / len(qs), "r5": h5 / len(qs), "hits1": h1, "hits5": h5, "queries": int(len(qs))}


def triplet_loss(d: torch.Tensor, triplets: Sequence[Tuple[int, int, List[int]]], cfg: TrainConfig
                 ) -> Tuple[torch.Tensor, int, int]:
    """Mean over queries of each query's mean triplet term (module docstring).

    Args:
        d: ``(B, D)`` unit descriptors; triplets index its rows.
        triplets: ``(query, positive, [negatives])`` row indices.
        cfg: ``loss`` and ``margin``.

    Returns:
        ``(loss, active, total)``: the scalar loss, and how many (query, negative) terms were
        non-zero out of how many.

    Raises:
        ValueError: unknown ``cfg.loss``.
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    total = d.new_zeros(())
    active = count = 0
    for q, p, ns in triplets:
        dq, dp, dn = d[q], d[p], d[list(ns)]
        if cfg.loss == "squared":
            terms = F.relu((dq - dp).pow(2).sum() + cfg.margin - (dn - dq).pow(2).sum(dim=1))
        else:
            terms = F.relu((dq - dp).norm() + cfg.margin - (dn - dq).norm(dim=1))
        active += int((terms.detach() > 0).sum())
        count += len(ns)
        total = total + terms.mean()
    return total / max(len(triplets), 1), active, count


def train_encoder(encoder: Encoder, traversals: Sequence[Sequence[ImageRecord]], gt: str, cfg: TrainConfig,
                  out_path: str, progress: bool = True, cache_dir: Optional[str] = None,
                  on_epoch: Optional[Callable[[int, nn.Module, Dict], None]] = None) -> TrainReport:
    """Train an encoder's backbone tail + NetVLAD (+ attention) on cached features and write its
    checkpoint (module docstring).

    Args:
        encoder: a NetVLAD :class:`Encoder` (plain or guided); untrained (k-means is run on the
            training places) or initialised from a checkpoint. With ``cfg.train_tail`` it gets its
            own copy of the backbone first (a backbone shared with other encoders is not changed).
        traversals: two or more traversals of one route, each in route order; the first is the
            reference (validation database, night-simulation source).
        gt: ``frame`` or ``position`` (ENU x, y on the records).
        cfg: :class:`TrainConfig`.
        out_path: checkpoint file to write (atomically); a ``.json`` log and a ``.png`` curve
            are written beside it.
        progress: progress bars.
        cache_dir: where the float16 feature cache is kept (reused by a later run on the same
            images); None = a temporary directory removed afterwards.
        on_epoch: called after every validation (epoch 0 = the initialisation) with the epoch,
            the :class:`TrainHead` (its parameters as validated) and that epoch's report entry.

    Returns:
        :class:`TrainReport`.

    Raises:
        ValueError: the encoder has nothing to train, ``train_tail`` on a backbone without a
            trainable tail, an unknown ``tail_block``, or an unknown loss.
        DatasetError: unusable training data (see :func:`split_by_place`).
    """
    from vpr_localizer.progress import progress_bar

    if not encoder.aggregator_spec.needs_fitting:
        raise ValueError(f"training needs a NetVLAD encoder (got aggregator {encoder.config.aggregator!r})")
    if cfg.train_tail and not encoder.backbone.has_tail:
        raise ValueError(f"backbone {encoder.backbone.name} has no trainable tail; use train_tail=False")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if encoder.pca is not None:
        LOG.info("training drops the encoder's PCA (it belongs to the old parameters)")
        encoder.pca = None
    if cfg.tail_block and not cfg.train_tail:
        raise ValueError(f"tail_block {cfg.tail_block!r} needs train_tail")
    if cfg.train_tail:
        encoder.own_backbone()  # never change a backbone shared with other encoders
        if cfg.tail_block:
            try:
                encoder.backbone.set_tail(cfg.tail_block)
            except WeightsError as exc:
                raise ValueError(str(exc)) from exc
    torch.manual_seed(cfg.seed)
    train_items, val_items = split_by_place(traversals, gt, cfg)
    LOG.info("training on %d images (%d validation) of %d traversal(s)%s", len(train_items), len(val_items),
             len(traversals), " + simulated night" if cfg.night_augmentation else "")
    t0 = time.perf_counter()
    if not encoder.trained:
        encoder.fit_aggregator([it.record.path for it in train_items if not it.night],
                               progress="NetVLAD k-means sample" if progress else None)
    tmp = None
    if cache_dir is None:
        tmp = cache_dir = tempfile.mkdtemp(prefix="vpr_train_cache_")
    try:
        caches = {}
        for split, items in (("train", train_items), ("val", val_items)):
            caches[split] = build_feature_cache(
                encoder, [CacheItem(it.record.path, it.record.name, it.night) for it in items],
                os.path.join(cache_dir, split), cfg.train_tail, cfg.seed,
                f"caching {split} features" if progress else None, cfg.night_strength)
        train_items = [train_items[i] for i in caches["train"].ok]
        val_items = [val_items[i] for i in caches["val"].ok]
        cache_s = time.perf_counter() - t0
        report = _train_loop(encoder, caches["train"], caches["val"], train_items, val_items, cfg, out_path,
                             progress, progress_bar, on_epoch)
        report.cache_seconds = cache_s
        report.cache_bytes = caches["train"].nbytes() + caches["val"].nbytes()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    encoder.save_checkpoint(out_path)
    stem = os.path.splitext(out_path)[0]
    with open(stem + ".json", "w") as fh:
        json.dump(asdict(report), fh, indent=2)
    _plot(report, stem + ".png")
    return report


def _grad_norms(groups: Dict[str, List[nn.Parameter]]) -> Dict[str, float]:
    out = {}
    for name, params in groups.items():
        sq = sum(float(p.grad.detach().pow(2).sum()) for p in params if p.grad is not None)
        out[name] = math.sqrt(sq)
    return out


def _train_loop(encoder: Encoder, train_c: FeatureCache, val_c: FeatureCache, train_items, val_items,
                cfg: TrainConfig, out_path: str, progress: bool, progress_bar, on_epoch=None) -> TrainReport:
    device = encoder.device
    head = TrainHead(encoder, cfg.train_tail).to(device)
    groups = head.groups()
    lrs = {"tail": cfg.tail_lr, "netvlad": cfg.lr, "attention": cfg.attention_lr}
    opt = torch.optim.Adam([{"params": groups[g], "lr": lrs[g]} for g in groups])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_gamma)
    report = TrainReport(checkpoint=out_path, train_items=len(train_items), val_items=len(val_items),
                         trained_parameters={g: int(sum(p.numel() for p in ps)) for g, ps in groups.items()},
                         config=asdict(cfg))

    def state():
        return {k: v.detach().clone() for k, v in head.state_dict().items()}

    v = _val_recall(_describe(head, val_c, device), val_items, cfg)
    report.epochs.append({"epoch": 0, "loss": None, "triplets": 0, "active_fraction": None, "grad_norm": None,
                          "val_recall@1": v["r1"], "val_recall@5": v["r5"], "val_hits": v["hits1"],
                          "val_hits@5": v["hits5"], "val_queries": v["queries"]})
    LOG.info("epoch 0 (initialisation): validation recall@1 %.3f (%d/%d), @5 %.3f", v["r1"], v["hits1"],
             v["queries"], v["r5"])
    if on_epoch is not None:
        on_epoch(0, head, report.epochs[0])
    best_state, best = state(), (v["r1"], v["r5"], 0)
    t1 = time.perf_counter()
    n = len(train_items)
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        queries = None
        if 0 < cfg.queries_per_epoch < n:
            queries = np.sort(rng_choice(cfg.seed, epoch, n, cfg.queries_per_epoch))
        triplets = _mine(_describe(head, train_c, device), train_items, cfg, np.random.default_rng([cfg.seed, epoch]),
                         queries)
        head.train()
        total, steps, active, count = 0.0, 0, 0, 0
        norms: Dict[str, float] = {g: 0.0 for g in groups}
        bar = progress_bar(total=len(triplets), desc=f"epoch {epoch}/{cfg.epochs}", unit="q", disable=not progress,
                           leave=False)
        for s in range(0, len(triplets), cfg.queries_per_step):
            chunk = triplets[s:s + cfg.queries_per_step]
            idx = sorted({i for q, p, ns in chunk for i in (q, p, *ns)})
            where = {v_: j for j, v_ in enumerate(idx)}
            d = head(train_c.get(idx, device))
            loss, a, c = triplet_loss(d, [(where[q], where[p], [where[x] for x in ns]) for q, p, ns in chunk], cfg)
            opt.zero_grad()
            loss.backward()
            for g, val in _grad_norms(groups).items():
                norms[g] += val
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], cfg.max_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(chunk)
            steps += 1
            active += a
            count += c
            bar.update(len(chunk))
        bar.close()
        sched.step()
        v = _val_recall(_describe(head, val_c, device), val_items, cfg)
        mean_loss = total / max(len(triplets), 1)
        rec = {"epoch": epoch, "loss": mean_loss, "triplets": len(triplets),
               "active_fraction": active / max(count, 1),
               "grad_norm": {g: val / max(steps, 1) for g, val in norms.items()},
               "val_recall@1": v["r1"], "val_recall@5": v["r5"], "val_hits": v["hits1"], "val_hits@5": v["hits5"],
               "val_queries": v["queries"], "seconds": time.perf_counter() - te}
        report.epochs.append(rec)
        LOG.info("epoch %d: loss %.4f on %d triplets (%.0f%% of terms active); validation recall@1 %.3f (%d/%d), "
                 "@5 %.3f; mean gradient norm %s; %.0f s", epoch, mean_loss, len(triplets),
                 100 * rec["active_fraction"], v["r1"], v["hits1"], v["queries"], v["r5"],
                 ", ".join(f"{g} {x:.2e}" for g, x in rec["grad_norm"].items()), rec["seconds"])
        if on_epoch is not None:
            on_epoch(epoch, head, rec)
        if (v["r1"], v["r5"]) > best[:2]:
            best = (v["r1"], v["r5"], epoch)
            best_state = state()
        if max(rec["grad_norm"].values()) < COLLAPSE_GRAD_NORM and rec["active_fraction"] < COLLAPSE_MIN_ACTIVE:
            report.converged_epoch = epoch
            LOG.info("training converged in epoch %d: the mean gradient norm fell below %g with %.1f%% of the triplet "
                     "terms active (a loss of 0, or identical images as positive and negative); stopping and keeping "
                     "epoch %d", epoch, COLLAPSE_GRAD_NORM, 100 * rec["active_fraction"], best[2])
            break
        if max(rec["grad_norm"].values()) < COLLAPSE_GRAD_NORM:
            report.collapsed_epoch = epoch
            LOG.warning("training collapsed in epoch %d: the mean gradient norm fell below %g (most training images "
                        "now get one and the same descriptor, a stationary point of the triplet loss); stopping and "
                        "keeping epoch %d. Lower the learning rates (--lr, --tail-lr) or use --loss l2.", epoch,
                        COLLAPSE_GRAD_NORM, best[2])
            break
    head.load_state_dict(best_state)
    head.eval()
    if cfg.train_tail:  # what the checkpoint stores (float16) is what runs from now on
        encoder.backbone.load_tail_state({k: t.half() for k, t in encoder.backbone.tail_state().items()})
    encoder.trained = True
    report.best_epoch = best[2]
    if cfg.fit_pca:
        raw = _describe(head, train_c, device).numpy()
        real = np.array([not it.night for it in train_items])
        if encoder.fit_pca(raw[real]):
            # float16 projection (what the checkpoint stores, half the bytes) is what runs from now on
            encoder.pca.components = encoder.pca.components.astype(np.float16).astype(np.float32)
            v = _val_recall(torch.from_numpy(encoder.apply_pca(_describe(head, val_c, device).numpy())),
                            val_items, cfg)
            report.pca = {"dim": int(encoder.pca.dim), "fitted_on": int(real.sum()), "val_recall@1": v["r1"],
                          "val_recall@5": v["r5"], "val_hits": v["hits1"], "val_queries": v["queries"]}
            LOG.info("PCA whitening %d -> %d fitted on %d training images: validation recall@1 %.3f (%d/%d)",
                     encoder.raw_dim, encoder.pca.dim, int(real.sum()), v["r1"], v["hits1"], v["queries"])
        else:
            LOG.info("no PCA fitted (pca_dim 0 or fewer than pca_min_images training images)")
    report.train_seconds = time.perf_counter() - t1
    return report


def rng_choice(seed: int, epoch: int, n: int, k: int) -> np.ndarray:
    """The ``k`` of ``n`` training queries of ``epoch`` (without replacement, seeded)."""
    return np.random.default_rng([seed, epoch, 1]).choice(n, size=k, replace=False)


def _plot(report: TrainReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = [e["epoch"] for e in report.epochs]
    fig, (ax, ax3) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot(ep, [e["val_recall@1"] for e in report.epochs], "o-", color="tab:blue", label="recall@1")
    ax.plot(ep, [e.get("val_recall@5", float("nan")) for e in report.epochs], "^:", color="tab:cyan",
            label="recall@5")
    ax.set_xlabel("epoch (0 = initialisation)")
    ax.set_ylabel("validation recall", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(ep[1:], [e["loss"] for e in report.epochs[1:]], "s--", color="tab:red", label="triplet loss")
    ax2.set_ylabel("mean triplet loss", color="tab:red")
    ax.set_title(f"best epoch {report.best_epoch} ({report.train_items} train / {report.val_items} val images)",
                 fontsize=9)
    ax3.plot(ep[1:], [e.get("active_fraction") for e in report.epochs[1:]], "o-", color="tab:green")
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("fraction of triplet terms active (loss > 0)")
    ax3.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
