"""The shipped trained encoder (``vpr_localizer/trained/vgg16_conv5_nordland.pt``).

It holds VGG16's conv5_1..conv5_3 fine-tuned with NetVLAD on Nordland and no aggregator (each
map fits NetVLAD by k-means). It loads strictly (format, backbone, conv5 tensors), is small
enough for the repository, and reproduces the recall@1 recorded when it was shipped
(``subset_check`` in its .json, ``scripts/ship_trained.py``) on a fixed subset of the training
set's validation places, top-1 for top-1. ``--checkpoint none`` is the untrained baseline.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vpr_localizer.errors import WeightsError
from vpr_localizer.evaluation.scenarios import ImageSetSpec
from vpr_localizer.io.image_files import load_image
from vpr_localizer.models.checkpoint import load_checkpoint
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.trained import SHIPPED, resolve_checkpoint, shipped_checkpoint_path

NAME = "vgg16_conv5_nordland"


@pytest.fixture(scope="module")
def shipped():
    path = shipped_checkpoint_path(NAME)
    with open(os.path.splitext(path)[0] + ".json") as fh:
        log = json.load(fh)
    return path, log


def test_shipped_checkpoint_files_and_size(shipped):
    path, log = shipped
    assert NAME in SHIPPED and resolve_checkpoint(NAME) == path
    assert resolve_checkpoint("none") is None and resolve_checkpoint(None) is None
    assert os.path.getsize(path) <= 30 * 2**20
    png = os.path.splitext(path)[0] + ".png"
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert log["command"].startswith("vpr-localizer train") and log["command"].count("vpr-localizer train") == 2
    assert log["stage1"]["config"]["seed"] == 0 and log["config"]["seed"] == 1  # the two runs (README)
    assert log["epochs"][log["best_epoch"]]["val_recall@1"] > log["epochs"][0]["val_recall@1"]
    with pytest.raises(WeightsError, match="unknown shipped checkpoint"):
        shipped_checkpoint_path("no_such_checkpoint")


def test_shipped_checkpoint_loads_strictly(shipped, vgg_path):
    path, _ = shipped
    ckpt = load_checkpoint(path)
    tail = ckpt["backbone"]["tail"]
    assert tail["start"] == 24 and all(v.dtype == torch.float16 for v in tail["state_dict"].values())
    assert ckpt["pca"] is None and ckpt["aggregator"] is None  # maps fit NetVLAD and PCA (README "Training": why)
    enc = Encoder(EncoderConfig(weights=str(vgg_path), image_size=(128, 64), checkpoint=NAME, device="cpu"))
    assert not enc.trained and enc.backbone.tail_tuned and enc.pca is None
    fp = enc.fingerprint()
    assert fp["backbone_tail"] == "conv5_1..conv5_3" and len(fp["backbone_tail_sha256"]) == 64
    # the conv5 it runs is the checkpoint's, not ImageNet's
    for k, v in tail["state_dict"].items():
        assert torch.equal(enc.backbone.body.state_dict()[k], v.float()), k
    base = Encoder(EncoderConfig(weights=str(vgg_path), image_size=(128, 64), checkpoint="none", device="cpu"))
    assert not base.trained and not base.backbone.tail_tuned
    assert not torch.equal(base.backbone.body.state_dict()["24.weight"], enc.backbone.body.state_dict()["24.weight"])


def test_shipped_checkpoint_reproduces_its_subset_recall(shipped, vgg_path, datasets_dir):
    path, log = shipped
    check = log["subset_check"]
    start, stop, step = check["positions"]
    enc = Encoder(EncoderConfig(weights=str(vgg_path), image_size=tuple(check["image_size"]), checkpoint=path,
                                device="cpu", batch_size=16))
    sets = [ImageSetSpec(f"nordland_thumbs/{s}", gps="none", index_range=(start, stop), index_step=step)
            .load(str(datasets_dir)) for s in ("summer", "winter")]
    enc.fit_aggregator([r.path for r in sets[0]])  # NetVLAD k-means on the summer "map", as a map does
    summer, winter = ([load_image(r.path) for r in t] for t in sets)
    top1 = (enc.encode_images(winter) @ enc.encode_images(summer).T).argmax(axis=1)
    hits = int((top1 == np.arange(len(top1))).sum())
    print(f"\n[shipped checkpoint] subset recall@1 {hits}/{len(top1)} (recorded {check['hits']}/{check['queries']})")
    assert len(top1) == check["queries"]
    assert abs(hits - check["hits"]) <= 1  # another CPU may sum in another order: a near-tie may flip
    assert (top1 == np.array(check["top1"])).mean() >= 0.97  # float rounding may flip a near-tie or two


def test_map_built_with_the_shipped_checkpoint_carries_its_conv5(tmp_path, datasets_dir, vgg_path):
    """``build-map --checkpoint vgg16_conv5_nordland`` at another input size (160x120, Lund):
    NetVLAD is fitted on the map, the map's encoder.pt carries it and the fine-tuned conv5, so
    ``localize`` rebuilds the same encoder from the map alone (fingerprint incl.
    backbone_tail_sha256) and localises every query; its ONNX export gives the same top-k."""
    import csv

    from vpr_localizer.cli.main import main
    from vpr_localizer.localization.localize import encoder_for_map
    from vpr_localizer.mapping.store import VprMap

    lund, out, res = datasets_dir / "lund_gps", tmp_path / "map", tmp_path / "poses.csv"
    assert main(["build-map", "--images", str(lund), "--select", "even", "--out", str(out), "--weights",
                 str(vgg_path), "--image-size", "160", "120", "--checkpoint", NAME, "--device", "cpu"]) == 0
    vmap = VprMap.load(str(out))
    assert vmap.fingerprint["backbone_tail"] == "conv5_1..conv5_3" and vmap.fingerprint["image_size"] == [160, 120]
    assert vmap.encoder_checkpoint["backbone"]["tail"]["start"] == 24
    enc = encoder_for_map(vmap, weights=str(vgg_path), device="cpu")
    assert enc.backbone.tail_tuned and enc.fingerprint() == vmap.fingerprint
    assert main(["localize", "--map", str(out), "--images", str(lund), "--select", "odd", "--out", str(res),
                 "--weights", str(vgg_path), "--device", "cpu"]) == 0
    with open(res, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 15
    # the ONNX export of that map's encoder runs the fine-tuned conv5 too: same top-k as torch
    onnx, res_ort = tmp_path / "lund.onnx", tmp_path / "poses_ort.csv"
    assert main(["export", "--map", str(out), "--out", str(onnx), "--weights", str(vgg_path)]) == 0
    assert main(["localize", "--map", str(out), "--images", str(lund), "--select", "odd", "--out", str(res_ort),
                 "--runtime", "onnxruntime", "--onnx", str(onnx)]) == 0
    with open(res_ort, newline="") as fh:
        rows_ort = list(csv.DictReader(fh))
    assert [r["top_ids"] for r in rows_ort] == [r["top_ids"] for r in rows]


def test_backbone_only_checkpoint_keeps_conv5_and_fits_netvlad_per_map(shipped, vgg_path, tmp_path):
    """A checkpoint with the fine-tuned conv5 and no aggregator (``aggregator: None``): the
    encoder runs that conv5 and is not trained yet, so a map fits its own NetVLAD vocabulary by
    k-means; one with an aggregator missing but PCA present is refused."""
    from vpr_localizer.models.checkpoint import save_checkpoint

    path, _ = shipped
    ckpt = load_checkpoint(path)
    assert ckpt["aggregator"] is None and ckpt["fingerprint"] is None
    conv5_only = str(tmp_path / "conv5.pt")
    save_checkpoint(ckpt, conv5_only)
    enc = Encoder(EncoderConfig(weights=str(vgg_path), image_size=(160, 120), checkpoint=conv5_only, device="cpu"))
    assert enc.backbone.tail_tuned and not enc.trained
    for k, v in ckpt["backbone"]["tail"]["state_dict"].items():
        assert torch.equal(enc.backbone.body.state_dict()[k], v.float()), k
    ckpt["pca"] = {"mean": torch.zeros(4)}
    save_checkpoint(ckpt, conv5_only)
    with pytest.raises(WeightsError, match="without an aggregator"):
        Encoder(EncoderConfig(weights=str(vgg_path), image_size=(128, 64), checkpoint=conv5_only, device="cpu"))


def test_the_shipped_checkpoint_is_the_default(vgg_path):
    """The command line, the default parameter file, the live-mapping profile and the demo use
    the shipped conv5 unless told otherwise; ``--checkpoint none`` (or ``checkpoint: ""``) is the
    untrained baseline; the default never lands on a backbone it does not fit; training starts
    from ImageNet, not from the shipped file."""
    import argparse

    import yaml

    from vpr_localizer.cli.common import encoder_config_from_args
    from vpr_localizer.trained import default_checkpoint
    from vpr_ros.demo import DEFAULT_CHECKPOINT

    def cfg(base=None, **flags):
        return encoder_config_from_args(argparse.Namespace(**flags), base)

    base = {"weights": str(vgg_path), "image_size": [128, 64]}
    assert cfg(base).checkpoint == NAME == DEFAULT_CHECKPOINT
    assert cfg(base, checkpoint="none").checkpoint == "none"
    assert Encoder(cfg(base, checkpoint="none", device="cpu")).backbone.tail_tuned is False
    assert cfg({**base, "checkpoint": None}).checkpoint is None  # the train command's base
    assert cfg({**base, "weights": "/x/vgg16_torchvision.pth"}).checkpoint is None
    assert cfg({**base, "preprocessing": "torchvision"}).checkpoint is None
    assert default_checkpoint("efficientnet_lite0") is None and default_checkpoint("dinov2_vits14") is None
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, node in (("vpr_localizer.yaml", "/**"), ("live_mapping.yaml", "map_builder")):
        with open(os.path.join(repo, "config", name)) as fh:
            assert yaml.safe_load(fh)[node]["ros__parameters"]["encoder"]["checkpoint"] == NAME, name
    params = os.path.join(repo, "config", "vpr_localizer.yaml")
    assert cfg(params=params, weights=str(vgg_path)).checkpoint == NAME
