"""Training VGG16 conv5 + NetVLAD (+ attention) (vpr_localizer.training.train) and ``vpr-localizer train``.

Checks: the place split (no place in both halves, the d_neg gap before the validation places,
night copies only of the first traversal, unusable data rejected); hard-negative mining on
hand-made descriptors whose answers are worked out by hand; a small real training run on
Nordland thumbnails (128x64) with night augmentation -- outputs, report, kept epoch, trained
conv5 / NetVLAD / attention, checkpoint round trip bit for bit (float16 conv5 in it);
determinism under a fixed seed; a small run with all three guidance switches (ESPNetv2 labels);
that it learns (a tiny set is overfitted: loss near zero, recall@1 100%, stopping as converged) and that a gradient
reaches every trained tensor; errors for untrainable configurations and in the CLI.
Everything runs on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from vpr_localizer.models.registry import build_backbone
from vpr_localizer.cli.main import main
from vpr_localizer.models.checkpoint import load_checkpoint
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import DatasetError, WeightsError
from vpr_localizer.models.guided import GuidedNetVLAD
from vpr_localizer.io.image_files import load_image
from vpr_localizer.io.records import ImageRecord
from vpr_localizer.evaluation.scenarios import ImageSetSpec, get_training_set
from vpr_localizer.training.train import TrainConfig, _Item, _mine, split_by_place, train_encoder

SIZE = (128, 64)  # Nordland thumbnails upscaled 2x, as the nordland_train training set
K = 8
LEARN_EPOCHS = 20        # measured: 14/14 by epoch 5, loss 0 (converged) in epoch 14
LEARN_LOSS_END = 0.02    # final / first-epoch loss, measured 0.0000 / 0.176
ESPNETV2 = "espnetv2_s_2.0_city_1024x512.pth"


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """One faiss thread for the k-means of this module (see conftest.faiss_single_thread)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _frame_traversals(n0: int, others=((0, 1),), step: int = 10):
    """Synthetic traversals with frame numbers only (no files are read by split_by_place).

    Traversal 0 has frames ``step * (i + 1)``, i < n0; each further traversal ``(offset, stride)``
    has frames ``step * (i + 1) + offset`` for every ``stride``-th i.
    """
    trav = [[ImageRecord(f"/none/t0/{i}.png", f"t0_{i}", frame=step * (i + 1)) for i in range(n0)]]
    for t, (offset, stride) in enumerate(others, start=1):
        trav.append([ImageRecord(f"/none/t{t}/{i}.png", f"t{t}_{i}", frame=step * (i + 1) + offset)
                     for i in range(0, n0, stride)])
    return trav


def _check_split(traversals, gt, cfg):
    """split_by_place + the properties every split must have; returns (train, val, gap)."""
    train, val = split_by_place(traversals, gt, cfg)
    assert train and val
    train_places = {it.anchor for it in train}
    val_places = {it.anchor for it in val}
    assert not train_places & val_places, "a place is in both the training and the validation half"
    # validation places are the end of the route, training places its beginning
    first_val = min(val_places)
    n = len(traversals[0])
    assert max(val_places) <= n - 1
    assert first_val == int(round(n * (1.0 - cfg.val_fraction)))
    return train, val, first_val


# --------------------------------------------------------------------------------------------
# 1: the place split
# --------------------------------------------------------------------------------------------

def test_split_by_place_frame_gt_gap_and_night_copies():
    # 40 places; the second traversal has every other place (positions in units of the frame
    # step 10 -> anchor spacing 1)
    trav = _frame_traversals(40, others=((0, 2),))
    cfg = TrainConfig(d_pos=1.0, d_neg=4.0, val_fraction=0.25, night_augmentation=True)
    train, val, first_val = _check_split(trav, "frame", cfg)
    spacing = 1.0
    gap = math.ceil(cfg.d_neg / spacing)
    assert first_val == 30
    for it in train:
        # at least the gap before the first validation place, and farther than d_neg from it
        assert first_val - it.anchor >= gap and (first_val - it.anchor) * spacing > cfg.d_neg, (it.anchor, gap)
    # the places of the gap (26..29) are in neither half; every other place is in one of them
    assert {it.anchor for it in train} == set(range(0, 30 - gap))
    assert {it.anchor for it in val} == set(range(30, 40))
    # anchors: second-traversal frame 10*(i+1) -> place i
    for it in train + val:
        if it.traversal == 1:
            assert it.anchor == int(it.record.name.split("_")[1])
            assert it.pos[0] == pytest.approx(it.record.frame / 10.0)
    # night copies: only of traversal 0 in the training places (validation asks real traversals
    # only), one per first-traversal image, traversal index 2 = len(traversals)
    assert not any(it.night for it in val)
    for items in (train,):
        night = [it for it in items if it.night]
        day0 = [it for it in items if it.traversal == 0]
        assert all(not it.night for it in items if it.traversal != 2)
        assert all(it.night for it in items if it.traversal == 2)
        assert night and all(it.traversal == len(trav) for it in night)
        assert sorted(id(it.record) for it in night) == sorted(id(it.record) for it in day0)
        assert all(it.record in trav[0] for it in night)
        for it in night:
            twin = next(d for d in day0 if d.record is it.record)
            assert it.anchor == twin.anchor and np.array_equal(it.pos, twin.pos)
    # sizes: training places 0..25 (26 summer + 26 night + 13 of the second traversal)
    assert len(train) == 26 + 26 + 13 and len(val) == 10 + 5

    # without night augmentation: the same split, no copies
    plain_train, plain_val = split_by_place(trav, "frame", TrainConfig(d_pos=1.0, d_neg=4.0, val_fraction=0.25,
                                                                       night_augmentation=False))
    assert not any(it.night for it in plain_train + plain_val)
    assert {it.traversal for it in plain_train + plain_val} == {0, 1}
    assert [(it.record.name, it.anchor) for it in plain_train] == \
        [(it.record.name, it.anchor) for it in train if not it.night]


def test_split_by_place_position_gt_metres():
    # a curved route in metres, 2 m between places; the second traversal 0.4 m to the side
    n = 50
    s = np.arange(n) * 2.0
    xy = np.stack([s, 0.002 * s ** 2], axis=1)
    t0 = [ImageRecord(f"/none/a{i}.png", f"a{i}", x=float(x), y=float(y)) for i, (x, y) in enumerate(xy)]
    t1 = [ImageRecord(f"/none/b{i}.png", f"b{i}", x=float(x), y=float(y) + 0.4) for i, (x, y) in enumerate(xy)]
    t2 = [ImageRecord(f"/none/c{i}.png", f"c{i}", x=float(x) + 0.3, y=float(y)) for i, (x, y) in enumerate(xy)]
    cfg = TrainConfig(d_pos=3.0, d_neg=9.0, val_fraction=0.2, night_augmentation=True)
    train, val, first_val = _check_split([t0, t1, t2], "position", cfg)
    spacing = float(np.median(np.linalg.norm(np.diff(xy, axis=0), axis=1)))
    gap = math.ceil(cfg.d_neg / spacing)
    assert gap == 5  # spacing just above 2 m
    assert first_val == 40
    assert all(first_val - it.anchor >= gap and (first_val - it.anchor) * spacing > cfg.d_neg for it in train)
    # every training image is more than d_neg (metres) from every validation image
    d = np.linalg.norm(np.stack([it.pos for it in train])[:, None] - np.stack([it.pos for it in val])[None], axis=2)
    assert d.min() > cfg.d_neg
    assert {it.traversal for it in train} == {0, 1, 2, 3}
    assert all(it.night == (it.traversal == 3) for it in train + val)
    assert sum(it.night for it in train) == sum(it.traversal == 0 for it in train) == first_val - gap


def test_split_by_place_errors():
    cfg = TrainConfig(d_pos=1.0, d_neg=4.0, val_fraction=0.25)
    trav = _frame_traversals(40)
    with pytest.raises(DatasetError, match="two traversals"):
        split_by_place(trav[:1], "frame", cfg)
    with pytest.raises(DatasetError, match="two traversals"):
        split_by_place([], "frame", cfg)
    # validation takes the whole route but the gap: no training places
    with pytest.raises(DatasetError, match="0 training"):
        split_by_place(trav, "frame", TrainConfig(d_neg=4.0, val_fraction=0.9))
    # exactly at the edge: cut 5, gap 4 -> place 0 trains; cut 4 -> none
    train, _ = split_by_place(trav, "frame", TrainConfig(d_neg=4.0, val_fraction=35 / 40, night_augmentation=False))
    assert {it.anchor for it in train} == {0}
    with pytest.raises(DatasetError, match="0 training"):
        split_by_place(trav, "frame", TrainConfig(d_neg=4.0, val_fraction=36 / 40))
    # no validation places
    with pytest.raises(DatasetError, match="0 validation"):
        split_by_place(trav, "frame", TrainConfig(d_neg=4.0, val_fraction=0.0))
    # position ground truth without x/y (frames only)
    with pytest.raises(DatasetError, match="x, y"):
        split_by_place(trav, "position", cfg)
    # ... or with x/y on one traversal only
    located = [[ImageRecord(r.path, r.name, frame=r.frame, x=float(i), y=0.0) for i, r in enumerate(trav[0])],
               trav[1]]
    with pytest.raises(DatasetError, match="x, y"):
        split_by_place(located, "position", cfg)
    # frame ground truth without frame numbers
    located[0][3] = ImageRecord(located[0][3].path, located[0][3].name, frame=None, x=3.0, y=0.0)
    with pytest.raises(DatasetError, match="frame"):
        split_by_place(located, "frame", cfg)


# --------------------------------------------------------------------------------------------
# 2: hard-negative mining with known answers
# --------------------------------------------------------------------------------------------

# (traversal, position, descriptor angle in degrees); traversal 2 is a night copy of item 0.
# With d_pos 1 and d_neg 3 (and 2 negatives) every answer below was worked out by hand from
# cos(angle difference); item 8 sits exactly d_neg from item 1 (neither positive nor negative)
# although it is item 1's most similar image.
_MINE_ITEMS = [
    (0, 0.0, 0), (0, 1.0, 100), (0, 5.0, 30), (0, 10.0, 60),
    (1, 0.5, 90), (1, 5.0, 20), (1, 20.0, 200), (2, 0.0, 10), (1, 4.0, 95),
]
_MINE_EXPECTED = {  # query -> (best positive, hardest negatives, most similar first)
    0: (7, [5, 8]),   # positives 4 (cos 90) and 7 (cos 10); same-traversal item 2 (cos 30) is no negative
    1: (4, [5, 6]),   # 7 is exactly d_pos away (a positive); 8 is exactly d_neg away (not a negative)
    2: (5, [7, 4]),   # positives 5 and 8
    4: (1, [3, 2]),   # positives 0, 1, 7; same-traversal item 5 (cos 70) is no negative
    5: (2, [7, 0]),   # negatives 0, 1, 3, 7: the two most similar
    7: (0, [5, 2]),   # the night copy's positives include its own original (other traversal)
    8: (2, [3, 7]),   # item 1 (cos 5) is exactly d_neg away
    # 3 (nearest other-traversal image 5 m away) and 6 (20 m) have no positive: skipped
}


def _mine_setup():
    items = [_Item(ImageRecord(f"/none/{i}.png", f"{i}"), t, t == 2, np.array([x]), 0)
             for i, (t, x, _) in enumerate(_MINE_ITEMS)]
    ang = np.deg2rad([a for _, _, a in _MINE_ITEMS])
    desc = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], axis=1), dtype=torch.float32)
    return items, desc


def test_mine_known_answers():
    items, desc = _mine_setup()
    cfg = TrainConfig(d_pos=1.0, d_neg=3.0, negatives=2)
    out = _mine(desc, items, cfg, np.random.default_rng(0))
    got = {q: (p, ns) for q, p, ns in out}
    assert len(got) == len(out), "a query was mined twice"
    assert got == _MINE_EXPECTED
    # more negatives than there are: all of them, most similar first
    many = {q: (p, ns) for q, p, ns in _mine(desc, items, TrainConfig(d_pos=1.0, d_neg=3.0, negatives=10),
                                              np.random.default_rng(0))}
    assert many[5] == (2, [7, 0, 3, 1])
    assert many[0] == (7, [5, 8, 6])
    assert set(many) == set(_MINE_EXPECTED)
    # the output order is shuffled by the generator, the triplets are not
    orders = {tuple(q for q, _, _ in _mine(desc, items, cfg, np.random.default_rng(s))) for s in range(8)}
    assert len(orders) > 1
    assert all(sorted(o) == sorted(_MINE_EXPECTED) for o in orders)


def test_mine_properties_on_random_descriptors():
    rng = np.random.default_rng(3)
    n = 60
    trav = rng.integers(0, 3, n)
    pos = rng.uniform(0, 30, (n, 2))
    items = [_Item(ImageRecord(f"/none/{i}.png", f"{i}"), int(trav[i]), False, pos[i], 0) for i in range(n)]
    desc = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((n, 16)).astype(np.float32)), dim=1)
    cfg = TrainConfig(d_pos=4.0, d_neg=8.0, negatives=5)
    out = _mine(desc, items, cfg, np.random.default_rng(0))
    sim = (desc @ desc.T).numpy()
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=2)
    mined = set()
    for q, p, ns in out:
        mined.add(q)
        other = trav != trav[q]
        cand_p = np.flatnonzero(other & (dist[q] <= cfg.d_pos))
        cand_n = np.flatnonzero(other & (dist[q] > cfg.d_neg))
        assert p in cand_p and sim[q, p] == sim[q, cand_p].max()
        assert len(ns) == min(cfg.negatives, len(cand_n)) and len(set(ns)) == len(ns)
        assert set(ns) <= set(cand_n.tolist())
        rest = np.setdiff1d(cand_n, ns)
        if len(rest):
            assert sim[q, ns].min() >= sim[q, rest].max()
        assert list(sim[q, ns]) == sorted(sim[q, ns], reverse=True)
    for q in range(n):
        has_p = ((trav != trav[q]) & (dist[q] <= cfg.d_pos)).any()
        has_n = ((trav != trav[q]) & (dist[q] > cfg.d_neg)).any()
        assert (q in mined) == (has_p and has_n)
    assert 10 < len(mined) < n  # the random layout has queries with and without positives


# --------------------------------------------------------------------------------------------
# 3-5: real training on Nordland thumbnails
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone(vgg_path):
    return build_backbone("vgg16", str(vgg_path))


def _config(vgg_path, **kw) -> EncoderConfig:
    d = dict(weights=str(vgg_path), image_size=SIZE, num_clusters=K, pca_dim=0, device="cpu", batch_size=16,
             attention=True)
    d.update(kw)
    return EncoderConfig(**d)


def _nordland(datasets_dir, index_range, step):
    return [ImageSetSpec(f"nordland_thumbs/{season}", gps="none", index_range=index_range, index_step=step)
            .load(str(datasets_dir)) for season in ("summer", "winter")]


# 60 places (every 2nd of the first 120 Nordland positions), 1 place = 1 position unit
# the l2 loss: NetVLAD's squared margin with hardest negatives can collapse on sets this small
# (test_descriptor_collapse_is_detected_and_training_stops)
RUN_CFG = TrainConfig(epochs=3, negatives=5, d_pos=1.0, d_neg=5.0, val_fraction=0.3, night_augmentation=True,
                      loss="l2", margin=0.1 ** 0.5,
                      seed=0)


@pytest.fixture(scope="module")
def trained(vgg_path, backbone, datasets_dir, tmp_path_factory):
    """The real run, with a spy on the per-epoch validation that records the head's parameters
    (epoch 0 = initialisation, then after every epoch)."""
    traversals = _nordland(datasets_dir, (0, 120), 2)
    assert [len(t) for t in traversals] == [60, 60]
    assert [r.frame for r in traversals[0]] == [r.frame for r in traversals[1]]
    enc = Encoder(_config(vgg_path), backbone=backbone)
    out = str(tmp_path_factory.mktemp("train") / "sub" / "guided.pt")  # the folder is created
    seen = []

    def on_epoch(epoch, head, record):  # the aggregator's and conv5's parameters as validated
        seen.append(({k: v.detach().cpu().clone() for k, v in head.aggregator.state_dict().items()},
                     record["val_recall@1"],
                     {k: v.detach().cpu().clone() for k, v in head.tail.state_dict().items()}))

    report = train_encoder(enc, traversals, "frame", RUN_CFG, out, progress=False, on_epoch=on_epoch)
    return enc, report, out, traversals, seen


def test_training_run_outputs_and_report(trained):
    enc, report, out, traversals, _ = trained
    stem = os.path.splitext(out)[0]
    for path in (out, stem + ".json", stem + ".png"):
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]
    with open(stem + ".png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(stem + ".json") as fh:
        logged = json.load(fh)
    assert logged["epochs"] == report.epochs and logged["best_epoch"] == report.best_epoch
    assert logged["checkpoint"] == out and logged["config"]["night_augmentation"] is True

    train, val = split_by_place(traversals, "frame", RUN_CFG)
    # cut at place 42, gap 5: places 0..36 train (summer, night, winter), 42..59 validate
    assert len(train) == 37 * 3 and len(val) == 18 * 2
    assert report.train_items == len(train) and report.val_items == len(val)

    assert [e["epoch"] for e in report.epochs] == list(range(RUN_CFG.epochs + 1))
    assert report.epochs[0]["loss"] is None and report.epochs[0]["triplets"] == 0
    for e in report.epochs:
        assert e["val_queries"] == 18  # the winter validation images (not the night copies)
        assert e["val_recall@1"] == e["val_hits"] / 18
    for e in report.epochs[1:]:
        assert math.isfinite(e["loss"]) and e["loss"] > 0.0, e
        # every training query has positives (other traversals at its place) and negatives
        assert e["triplets"] == report.train_items
    recalls = [(e["val_recall@1"], e["val_recall@5"]) for e in report.epochs]
    best = report.best_epoch
    # the first epoch with the best validation recall@1 (ties: recall@5) is kept
    assert recalls[best] == max(recalls) and all(r < recalls[best] for r in recalls[:best])
    for e in report.epochs[1:]:
        assert 0.0 < e["active_fraction"] <= 1.0
        assert set(e["grad_norm"]) == {"tail", "netvlad", "attention"} and all(
            math.isfinite(g) and g > 0 for g in e["grad_norm"].values()), e["grad_norm"]
    assert report.trained_parameters == {"tail": 3 * (512 * 512 * 9 + 512), "netvlad": K * 512 * 2 + K,
                                         "attention": report.trained_parameters["attention"]}


def test_training_keeps_best_epoch_parameters(trained, vgg_path, backbone):
    enc, report, out, traversals, seen = trained
    ckpt = load_checkpoint(out)
    saved = ckpt["aggregator"]["state_dict"]
    assert ckpt["pca"] is None
    assert ckpt["aggregator"]["guidance"]["attention"] is True
    assert ckpt["fingerprint"] == enc.fingerprint()
    for k, v in enc.aggregator.state_dict().items():
        assert torch.equal(saved[k], v.cpu()), k
    assert set(saved) >= {"image_attention.conv.weight", "image_attention.conv.bias"}

    # the k-means initialisation on the training places' real (non-night) images, independently
    ref = Encoder(_config(vgg_path), backbone=backbone)
    train, _ = split_by_place(traversals, "frame", RUN_CFG)
    ref.fit_aggregator([it.record.path for it in train if not it.night])
    init = {k: v.cpu() for k, v in ref.aggregator.state_dict().items()}
    assert not init["image_attention.conv.weight"].any()
    same = all(torch.equal(saved[k], init[k]) for k in init)
    if report.best_epoch > 0:
        assert not same
        assert saved["image_attention.conv.weight"].abs().max() > 0, "attention weights never left zero"
        assert not torch.equal(saved["image_vlad.centroids"], init["image_vlad.centroids"])
    else:
        assert same, "the kept epoch is the k-means initialisation but the saved parameters differ from it"

    # what the spy saw at every validation: epoch 0 is that initialisation, every epoch moves the
    # NetVLAD layer and the attention module, and the saved parameters are those of the kept epoch
    assert len(seen) == RUN_CFG.epochs + 1
    assert [r for _, r, _ in seen] == [e["val_recall@1"] for e in report.epochs]
    assert all(torch.equal(seen[0][0][k], init[k]) for k in init)
    imagenet_conv5 = {k: v for k, v in backbone.body.state_dict().items() if int(k.split(".")[0]) >= 24}
    assert set(seen[0][2]) == set(imagenet_conv5)  # the tail keeps the body's layer numbers (24..28)
    assert all(torch.equal(seen[0][2][k], imagenet_conv5[k]) for k in imagenet_conv5)
    for e in range(1, len(seen)):
        state, prev = seen[e][0], seen[e - 1][0]
        assert state["image_attention.conv.weight"].abs().max() > 0, e
        for k in ("image_attention.conv.weight", "image_attention.conv.bias", "image_vlad.centroids",
                  "image_vlad.conv.weight"):
            assert not torch.equal(state[k], prev[k]), (e, k)
        for k in ("24.weight", "26.weight", "28.weight"):  # conv5_1, conv5_2, conv5_3 move too
            assert not torch.equal(seen[e][2][k], seen[e - 1][2][k]), (e, k)
    assert all(torch.equal(saved[k], seen[report.best_epoch][0][k]) for k in init)
    # the checkpoint's conv5 is the kept epoch's, in float16; the encoder runs exactly that
    tail = ckpt["backbone"]["tail"]
    assert tail["start"] == 24 and tail["name"] == "conv5_1..conv5_3"
    assert {k: v.dtype for k, v in tail["state_dict"].items()} == {k: torch.float16 for k in imagenet_conv5}
    for k, v in tail["state_dict"].items():
        kept = seen[report.best_epoch][2][k]
        assert torch.equal(v, kept.half()), k
        assert torch.equal(enc.backbone.body.state_dict()[k], v.float()), k
    assert ckpt["fingerprint"]["backbone_tail"] == "conv5_1..conv5_3"
    assert len(ckpt["fingerprint"]["backbone_tail_sha256"]) == 64
    # the triplet loss goes down over the epochs
    assert report.epochs[-1]["loss"] < report.epochs[1]["loss"]


def test_checkpoint_round_trip(trained, vgg_path, backbone, weights_dir, data_file):
    enc, report, out, traversals, _ = trained
    img = load_image(traversals[1][50].path)  # a winter validation image
    d1 = enc.encode_images([img])
    assert d1.shape == (1, K * 512)
    np.testing.assert_allclose(np.linalg.norm(d1), 1.0, atol=1e-5)

    enc2 = Encoder(_config(vgg_path, checkpoint=out), backbone=backbone)
    assert isinstance(enc2.aggregator, GuidedNetVLAD) and enc2.trained
    assert enc2.fingerprint() == enc.fingerprint()
    np.testing.assert_array_equal(enc2.encode_images([img]), d1)

    # no PCA in the checkpoint: it runs at another input size (another identity, same parameters)
    big = Encoder(_config(vgg_path, checkpoint=out, image_size=(256, 128)), backbone=backbone)
    fp = big.fingerprint()
    assert fp["params_sha256"] == enc.fingerprint()["params_sha256"] and fp["image_size"] == [256, 128]
    d_big = big.encode_images([img])
    assert d_big.shape == d1.shape and np.isfinite(d_big).all()
    assert np.abs(d_big - d1).max() > 1e-4

    # other guidance: refused
    with pytest.raises(WeightsError, match="guidance"):
        Encoder(_config(vgg_path, checkpoint=out, attention=False), backbone=backbone)  # plain NetVLAD
    esp = str(data_file(weights_dir / ESPNETV2))
    with pytest.raises(WeightsError, match="guidance"):
        Encoder(_config(vgg_path, checkpoint=out, static_mask=True, segmentation="espnetv2",
                        segmentation_weights=esp), backbone=backbone)
    with pytest.raises(WeightsError):
        Encoder(_config(vgg_path, checkpoint=out, num_clusters=K * 2), backbone=backbone)


def test_training_is_deterministic(vgg_path, backbone, datasets_dir, tmp_path):
    traversals = _nordland(datasets_dir, (0, 60), 2)  # 30 places
    cfg = TrainConfig(epochs=1, negatives=4, d_pos=1.0, d_neg=3.0, val_fraction=0.3, night_augmentation=False,
                      loss="l2", margin=0.1 ** 0.5, seed=7)
    # the trained parameters after every validation (epoch 0 and 1), whichever epoch is kept
    after = []

    def on_epoch(epoch, head, record):
        after.append({k[len("aggregator."):] if k.startswith("aggregator.") else k: v.detach().cpu().clone()
                      for k, v in head.state_dict().items()})

    runs = []
    for name in ("a", "b"):
        enc = Encoder(_config(vgg_path), backbone=backbone)
        rep = train_encoder(enc, traversals, "frame", cfg, str(tmp_path / f"{name}.pt"), progress=False,
                            on_epoch=on_epoch)
        runs.append((enc, rep))
    (ea, ra), (eb, rb) = runs
    assert len(after) == 4  # epoch 0 and epoch 1 of each run
    for k in after[1]:
        assert torch.equal(after[1][k], after[3][k]), k
    assert not torch.equal(after[1]["image_vlad.centroids"], after[0]["image_vlad.centroids"])
    assert after[1]["image_attention.conv.weight"].abs().max() > 0
    assert not torch.equal(after[1]["tail.28.weight"], after[0]["tail.28.weight"])  # conv5_3 trained too
    assert ra.train_items == rb.train_items == 18 * 2
    untimed = lambda rep: [{k: v for k, v in e.items() if k != "seconds"} for e in rep.epochs]  # noqa: E731
    assert untimed(ra) == untimed(rb)  # losses, triplet counts, gradient norms, validation recalls and hits
    assert [e["val_recall@1"] for e in ra.epochs] == [e["val_recall@1"] for e in rb.epochs]
    # every training query (both traversals) has a positive and negatives
    assert ra.epochs[1]["triplets"] == ra.train_items and math.isfinite(ra.epochs[1]["loss"])
    sa, sb = ea.aggregator.state_dict(), eb.aggregator.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert ea.fingerprint() == eb.fingerprint()


def test_training_all_guidance_switches(vgg_path, backbone, datasets_dir, weights_dir, data_file, tmp_path):
    """static mask + segmentation stream + attention, labels from ESPNetv2: a tiny run and its checkpoint."""
    esp = str(data_file(weights_dir / ESPNETV2))
    traversals = _nordland(datasets_dir, (0, 60), 3)  # 20 places
    cfg = TrainConfig(epochs=1, negatives=3, d_pos=1.0, d_neg=3.0, val_fraction=0.3, night_augmentation=True,
                      seed=0)
    conf = _config(vgg_path, static_mask=True, seg_stream=True, segmentation="espnetv2",
                   segmentation_weights=esp, segmentation_size=(256, 128))
    enc = Encoder(conf, backbone=backbone)
    out = str(tmp_path / "full.pt")
    rep = train_encoder(enc, traversals, "frame", cfg, out, progress=False)
    # cut at place 14, gap 3: places 0..10 train (summer, night, winter), 14..19 validate
    assert rep.train_items == 11 * 3 and rep.val_items == 6 * 2  # no night copies in validation
    assert len(rep.epochs) == 2 and rep.epochs[1]["triplets"] == rep.train_items
    assert math.isfinite(rep.epochs[1]["loss"]) and rep.epochs[1]["loss"] > 0
    assert all(e["val_queries"] == 6 and e["val_recall@1"] == e["val_hits"] / 6 for e in rep.epochs)
    head = enc.aggregator
    assert head.seg_vlad is not None and head.seg_attention is not None and head.static_mask

    ckpt = load_checkpoint(out)
    g = ckpt["aggregator"]["guidance"]
    assert g["static_mask"] and g["seg_stream"] and g["attention"] and g["segmentation"] == "espnetv2"
    assert {"seg_vlad.centroids", "seg_attention.conv.weight"} <= set(ckpt["aggregator"]["state_dict"])
    if rep.best_epoch == 1:  # both streams' attention trained
        for k in ("image_attention.conv.weight", "seg_attention.conv.weight"):
            assert ckpt["aggregator"]["state_dict"][k].abs().max() > 0, k

    img = load_image(traversals[1][-1].path)
    d1 = enc.encode_images([img])
    assert d1.shape == (1, 2 * K * 512)
    enc2 = Encoder(replace(conf, checkpoint=out), backbone=backbone)
    assert enc2.fingerprint() == enc.fingerprint()
    np.testing.assert_array_equal(enc2.encode_images([img]), d1)
    with pytest.raises(WeightsError, match="guidance"):
        Encoder(replace(conf, checkpoint=out, seg_stream=False), backbone=backbone)


def test_untrainable_configurations_are_rejected(vgg_path, backbone, tmp_path):
    trav = _frame_traversals(40)
    enc = Encoder(_config(vgg_path, attention=False, aggregator="gem"), backbone=backbone)
    with pytest.raises(ValueError, match="NetVLAD"):
        train_encoder(enc, trav, "frame", TrainConfig(epochs=1), str(tmp_path / "x.pt"), progress=False)
    lite = Encoder(_config(vgg_path, backbone="efficientnet_lite0", weights=None, attention=False))
    with pytest.raises(ValueError, match="no trainable tail"):
        train_encoder(lite, trav, "frame", TrainConfig(epochs=1), str(tmp_path / "x.pt"), progress=False)
    enc = Encoder(_config(vgg_path, attention=False), backbone=backbone)
    with pytest.raises(ValueError, match="loss"):
        train_encoder(enc, trav, "frame", TrainConfig(epochs=1, loss="hinge"), str(tmp_path / "x.pt"), progress=False)
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------------------------
# 6: the command line
# --------------------------------------------------------------------------------------------

def test_cli_train_gem_is_an_error(shared_dir, tmp_path, capsys):
    out = tmp_path / "never.pt"
    argv = ["train", "--shared", str(shared_dir), "--out", str(out), "--device", "cpu", "--epochs", "1",
            "--aggregator", "gem"]
    rc = main(argv)
    message = capsys.readouterr().err
    assert rc == 2 and "netvlad" in message and len(message.strip().splitlines()) == 1, message
    assert not out.exists()
    # as a process: a non-zero status and the one line on stderr, no traceback
    proc = subprocess.run([sys.executable, "-m", "vpr_localizer.cli.main", *argv], capture_output=True, text=True,
                          timeout=120, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "netvlad" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_train_unknown_training_set(shared_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--training-set", "no_such_set", "--shared", str(shared_dir), "--out",
              str(tmp_path / "x.pt"), "--attention"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_set" in err and "nordland_train" in err
    with pytest.raises(DatasetError, match="nordland_train"):
        get_training_set("no_such_set")
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------------------------
# 7: does it learn? overfitting a tiny set, gradient flow into every trained parameter
# --------------------------------------------------------------------------------------------

def _recall_at_1(enc, traversals, idx):
    """Recall@1 (exact place) of winter images against summer images at positions ``idx``."""
    summer = enc.encode_images([load_image(traversals[0][i].path) for i in idx])
    winter = enc.encode_images([load_image(traversals[1][i].path) for i in idx])
    return float(((winter @ summer.T).argmax(axis=1) == np.arange(len(idx))).mean())


def _tiny(datasets_dir):
    """28 Nordland places (summer + winter, every 4th of positions 18-129); with val_fraction
    0.45 the first 14 train. Positions 18-129 avoid the train's stationary stretches (0-12 are
    pixel-identical frames, 132-174 nearly so), where no descriptor can tell places apart."""
    return _nordland(datasets_dir, (18, 130), 4)


# every other place is a negative (d_neg 0.75 < 1 place), all of them mined (16 >= 13)
TINY = dict(negatives=16, queries_per_step=8, d_pos=0.5, d_neg=0.75, val_fraction=0.45, night_augmentation=False,
            fit_pca=False, seed=0)


def test_conv5_and_netvlad_overfit_a_tiny_set(vgg_path, backbone, datasets_dir, tmp_path):
    """The learning check on 14 Nordland places (128x64, K=8): conv5 + NetVLAD with the l2
    triplet loss overfit the training places -- recall@1 of winter against summer at exactly
    those places goes from the ImageNet + k-means start (measured 9/14) to 14/14 (measured by
    epoch 5), and the loss on freshly mined negatives falls to ~0 (measured 0.176 -> 0.0000);
    then no term is active, no gradient is left, and training stops as converged, not
    collapsed. The shared backbone is not changed."""
    traversals = _tiny(datasets_dir)
    cfg = TrainConfig(epochs=LEARN_EPOCHS, lr=1e-3, tail_lr=1e-5, loss="l2", margin=0.1 ** 0.5, **TINY)
    train, _ = split_by_place(traversals, "frame", cfg)
    places = sorted({it.anchor for it in train})
    assert len(places) == 14
    before_tail = {k: v.clone() for k, v in backbone.state_dict().items()}
    enc = Encoder(_config(vgg_path, attention=False), backbone=backbone)
    enc.fit_aggregator([it.record.path for it in train])
    r_before = _recall_at_1(enc, traversals, places)
    enc.trained = False  # train_encoder runs the same k-means itself
    rep = train_encoder(enc, traversals, "frame", cfg, str(tmp_path / "tiny.pt"), progress=False,
                        on_epoch=lambda e, head, rec: rec.update(train_recall=_recall_after(head, enc, traversals,
                                                                                            places)))
    losses = [e["loss"] for e in rep.epochs[1:]]
    recalls = [e["train_recall"] for e in rep.epochs]
    print(f"\n[overfit] training-place recall@1 per epoch {recalls}; loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"converged in epoch {rep.converged_epoch}")
    assert recalls[0] == pytest.approx(r_before) and r_before <= 10 / 14
    assert recalls[-1] == 1.0, recalls
    assert losses[-1] < LEARN_LOSS_END * losses[0], losses
    assert rep.collapsed_epoch is None
    assert rep.converged_epoch is not None and len(rep.epochs) == rep.converged_epoch + 1
    assert rep.epochs[-1]["active_fraction"] < 0.01
    assert enc.backbone is not backbone and enc.backbone.tail_tuned and not backbone.tail_tuned
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before_tail[k]), k


def _recall_after(head, enc, traversals, places):
    """Recall@1 at the training places with the head's current parameters (the encoder shares them)."""
    was = head.training
    r = _recall_at_1(enc, traversals, places)
    head.train(was)
    return r


def test_descriptor_collapse_is_detected_and_training_stops(vgg_path, backbone, datasets_dir, tmp_path):
    """What makes a tiny set hard to overfit: with NetVLAD's squared-distance margin and hardest
    negatives, a learning rate 10x the real run's drives most images to one descriptor (conv5
    stops responding), where every gradient vanishes (FaceNet, Schroff et al. 2015, Sec. 3.2
    reports the same with hardest negatives). The trainer detects it (mean gradient norm below
    COLLAPSE_GRAD_NORM), stops, and keeps the best epoch before it."""
    from vpr_localizer.training.train import COLLAPSE_GRAD_NORM

    traversals = _nordland(datasets_dir, (0, 64), 2)  # 32 places, every 2nd of the first 64 positions
    cfg = TrainConfig(epochs=10, lr=1e-3, tail_lr=1e-4, loss="squared", margin=0.1, negatives=4, queries_per_step=8,
                      d_pos=0.5, d_neg=1.5, val_fraction=0.45, night_augmentation=False, fit_pca=False, seed=0)
    enc = Encoder(_config(vgg_path, attention=False), backbone=backbone)
    rep = train_encoder(enc, traversals, "frame", cfg, str(tmp_path / "collapse.pt"), progress=False)
    print(f"\n[collapse] epochs {[(e['epoch'], e['loss'], e['grad_norm']) for e in rep.epochs[1:]]}")
    assert rep.collapsed_epoch is not None and rep.collapsed_epoch < cfg.epochs
    assert len(rep.epochs) == rep.collapsed_epoch + 1  # stopped there
    last = rep.epochs[-1]
    assert max(last["grad_norm"].values()) < COLLAPSE_GRAD_NORM
    assert last["loss"] == pytest.approx(cfg.margin * last["active_fraction"], rel=1e-3)  # every active term = margin
    assert rep.best_epoch < rep.collapsed_epoch


def test_gradient_reaches_every_trained_parameter(vgg_path, backbone, datasets_dir, tmp_path):
    """One step of the real loss on real features: every trained tensor (conv5_1..conv5_3,
    NetVLAD centroids and assignment, the attention module) gets a non-zero, finite gradient."""
    from vpr_localizer.training.feature_cache import CacheItem, build_feature_cache
    from vpr_localizer.training.train import TrainHead, triplet_loss

    traversals = _nordland(datasets_dir, (0, 24), 2)
    enc = Encoder(_config(vgg_path), backbone=build_backbone("vgg16", str(vgg_path)))
    enc.fit_aggregator([r.path for r in traversals[0]])
    items = [CacheItem(r.path, r.name) for t in traversals for r in t]
    cache = build_feature_cache(enc, items, str(tmp_path / "cache"), pre_tail=True, seed=0)
    assert cache.arrays["image"].dtype == np.float16 and cache.arrays["image"].shape == (24, 512, 4, 8)
    head = TrainHead(enc, train_tail=True)
    head.train()
    d = head(cache.get(range(24)))
    n = 12
    trip = [(n + i, i, [(i + 4) % n, (i + 6) % n]) for i in range(n)]  # winter i vs summer i, far places
    loss, active, total = triplet_loss(d, trip, TrainConfig())
    assert total == 2 * n and 0 < active <= total and float(loss.detach()) > 0
    loss.backward()
    named = dict(head.named_parameters())
    assert {"tail.24.weight", "tail.28.bias", "aggregator.image_vlad.centroids", "aggregator.image_vlad.conv.weight",
            "aggregator.image_attention.conv.weight"} <= set(named)
    for name, p in named.items():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    # the cached pre-tail features through the tail give the full backbone's features
    with torch.no_grad():
        from vpr_localizer.io.image_files import resize_image
        img = np.stack([resize_image(load_image(traversals[0][3].path), SIZE)])
        full = enc.feature_maps(img)
        via_tail = enc.backbone.tail(enc.feature_maps(img, pre_tail=True))
    torch.testing.assert_close(via_tail, full, rtol=0, atol=0)
    cached = head.tail(cache.get([3]).image)
    torch.testing.assert_close(cached, full, rtol=2e-2, atol=0.5)  # float16 cache


def test_training_from_conv4_trains_conv4_and_conv5_and_round_trips(vgg_path, backbone, datasets_dir, tmp_path):
    """``tail_block="conv4"`` (``train --train-from conv4``, the end-to-end run of
    scripts/train_gpu.sh): the cache holds pool3 features, conv4_1..conv5_3 train with NetVLAD,
    the checkpoint stores the longer tail (layer 17 on) and loads into a fresh encoder that
    then gives the trained encoder's descriptors; an unknown block is an error. The cache of a
    conv5 run is not reused for it (another key)."""
    from vpr_localizer.training.feature_cache import CacheItem, cache_key

    traversals = _tiny(datasets_dir)
    cfg = TrainConfig(epochs=1, lr=1e-3, tail_lr=1e-5, loss="l2", margin=0.1 ** 0.5, tail_block="conv4", **TINY)
    enc = Encoder(_config(vgg_path, attention=False), backbone=backbone)
    rep = train_encoder(enc, traversals, "frame", cfg, str(tmp_path / "conv4.pt"), progress=False)
    assert rep.trained_parameters["tail"] == sum(p.numel() for p in backbone.body[17:].parameters())
    assert enc.backbone.tail_start == 17 and enc.backbone.tail_name == "conv4_1..conv5_3"
    changed = {k.split(".")[0] for k, v in enc.backbone.body.state_dict().items()
               if not torch.equal(v, backbone.body.state_dict()[k].to(v.dtype))}
    assert {"17", "19", "21", "24", "26", "28"} <= changed and not changed & {"0", "10", "14"}, changed
    assert backbone.tail_start == 24 and not backbone.tail_tuned  # the shared backbone is untouched
    ckpt = load_checkpoint(str(tmp_path / "conv4.pt"))
    assert ckpt["backbone"]["tail"]["start"] == 17 and "17.weight" in ckpt["backbone"]["tail"]["state_dict"]
    fresh = Encoder(_config(vgg_path, attention=False, checkpoint=str(tmp_path / "conv4.pt")), backbone=backbone)
    assert fresh.backbone.tail_start == 17 and fresh.fingerprint()["backbone_tail"] == "conv4_1..conv5_3"
    imgs = [load_image(traversals[1][i].path) for i in range(3)]
    np.testing.assert_allclose(fresh.encode_images(imgs), enc.encode_images(imgs), atol=1e-5)
    items = [CacheItem(r.path, r.name) for r in traversals[0][:2]]
    conv5 = Encoder(_config(vgg_path, attention=False), backbone=backbone)
    assert cache_key(conv5, items, True, 0) != cache_key(fresh, items, True, 0)
    assert cache_key(conv5, items, False, 0) != cache_key(fresh, items, False, 0)
    with pytest.raises(ValueError, match="cannot train from 'conv9'"):
        train_encoder(Encoder(_config(vgg_path, attention=False), backbone=backbone), traversals, "frame",
                      replace(cfg, tail_block="conv9"), str(tmp_path / "x.pt"), progress=False)
