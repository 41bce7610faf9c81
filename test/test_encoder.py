"""Encoder: fitting on real images, checkpoints, fingerprints, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_localizer.models.checkpoint import load_checkpoint
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import ImageLoadError, WeightsError
from vpr_localizer.io.image_files import load_image

SIZE = (128, 96)


@pytest.fixture(scope="module")
def lund_paths(datasets_dir):
    paths = sorted(str(p) for p in (datasets_dir / "lund_gps").glob("*.jpg"))
    if len(paths) < 8:
        pytest.fail(f"expected the 29 lund_gps images in {datasets_dir / 'lund_gps'}")
    return paths[:8]


@pytest.fixture(scope="module")
def vgg_weights(vgg_path):
    return str(vgg_path)


@pytest.fixture(scope="module")
def fitted(vgg_weights, lund_paths):
    enc = Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, num_clusters=8, pca_dim=4,
                                pca_min_images=4, device="cpu"))
    enc.fit_aggregator(lund_paths)
    res = enc.encode_paths(lund_paths)
    assert enc.fit_pca(res.raw)
    return enc, enc.apply_pca(res.raw)


def test_fit_and_encode_real_images(fitted, lund_paths):
    enc, desc = fitted
    assert desc.shape == (8, 4) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    # in-memory images give the same descriptors as files
    again = enc.encode_images([load_image(p) for p in lund_paths[:3]])
    np.testing.assert_allclose(again, desc[:3], atol=1e-5)
    # distinct places give distinct descriptors
    assert np.abs(desc[0] - desc[5]).max() > 1e-2
    fp = enc.fingerprint()
    assert fp["num_clusters"] == 8 and fp["raw_dim"] == 8 * 512 and fp["descriptor_dim"] == 4
    assert fp["image_size"] == list(SIZE) and fp["preprocessing"] == "caffe_bgr"


def test_checkpoint_round_trip(fitted, vgg_weights, lund_paths, tmp_path):
    enc, desc = fitted
    path = str(tmp_path / "enc.pt")
    enc.save_checkpoint(path)
    ckpt = load_checkpoint(path)  # weights_only=True
    assert ckpt["format"] == "vpr_localizer.encoder" and ckpt["fingerprint"] == enc.fingerprint()
    enc2 = Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, num_clusters=8, device="cpu",
                                 checkpoint=path))
    assert enc2.fingerprint() == enc.fingerprint()
    np.testing.assert_allclose(enc2.encode_paths(lund_paths).descriptors, desc, atol=1e-5)


def test_checkpoint_for_other_backbone_settings_is_rejected(fitted, vgg_weights, tmp_path):
    enc, _ = fitted
    path = str(tmp_path / "enc.pt")
    enc.save_checkpoint(path)
    with pytest.raises(WeightsError, match="image_size"):
        Encoder(EncoderConfig(weights=vgg_weights, image_size=(160, 120), num_clusters=8, device="cpu",
                              checkpoint=path))
    with pytest.raises(WeightsError, match="K=16|K=8"):
        Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, num_clusters=16, device="cpu",
                              checkpoint=path))
    bad = tmp_path / "not_ckpt.pt"
    torch.save({"hello": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="not a vpr_localizer encoder checkpoint"):
        Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, num_clusters=8, device="cpu",
                              checkpoint=str(bad)))
    with pytest.raises(WeightsError, match="not found"):
        Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, checkpoint=str(tmp_path / "nope.pt")))


def test_unfitted_netvlad_refuses_to_encode(vgg_weights, lund_paths):
    enc = Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, num_clusters=8, device="cpu"))
    with pytest.raises(RuntimeError, match="not initialised"):
        enc.encode_paths(lund_paths[:1])


def test_gem_and_gap_need_no_fitting(vgg_weights, lund_paths):
    for agg in ("gem", "gap"):
        enc = Encoder(EncoderConfig(weights=vgg_weights, image_size=SIZE, aggregator=agg, device="cpu"))
        d = enc.encode_paths(lund_paths[:2]).descriptors
        assert d.shape == (2, 512)
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_bad_images_and_config(fitted, vgg_weights, tmp_path, lund_paths):
    enc, _ = fitted
    with pytest.raises(ImageLoadError):
        enc.encode_images([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(ImageLoadError):
        enc.encode_images([np.zeros((10, 10), np.uint8)])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    res = enc.encode_paths([lund_paths[0], str(empty), lund_paths[1]])
    assert res.ok == [0, 2] and len(res.skipped) == 1 and str(empty) in res.skipped[0][1]
    with pytest.raises(ValueError, match="aggregator"):
        Encoder(EncoderConfig(weights=vgg_weights, aggregator="vlad"))
    with pytest.raises(ValueError, match="unknown encoder parameter"):
        EncoderConfig.from_dict({"backbone": "vgg16", "imagesize": [1, 2]})
