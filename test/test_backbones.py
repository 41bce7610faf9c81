"""Backbones with the real weights from ../shared/weights and the packaged EfficientNet-Lite0."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from vpr_localizer.models.backbones import PREPROCESSING, feature_map_size
from vpr_localizer.models.registry import build_backbone
from vpr_localizer.errors import VprError, WeightsError

VGG_FILE = "vgg16_features_imagenet_caffe_bgr.pth"


@pytest.fixture(scope="module")
def vgg(vgg_path):
    return build_backbone("vgg16", weights=str(vgg_path))


@pytest.fixture(scope="module")
def vgg_state(vgg_path):
    return torch.load(vgg_path, map_location="cpu", weights_only=True)


def _readme_sha256(weights_dir, filename: str) -> str:
    text = (weights_dir / "README.md").read_text()
    m = re.search(r"^([0-9a-f]{64})\s+" + re.escape(filename) + r"\s*$", text, re.M)
    assert m, f"no SHA-256 for {filename} in {weights_dir / 'README.md'}"
    return m.group(1)


def test_vgg16_shape_channels_stride(vgg):
    assert vgg.name == "vgg16"
    assert vgg.out_channels == 512
    assert vgg.stride == 16
    assert vgg.preprocessing.name == "caffe_bgr"
    assert not vgg.training
    img = np.random.default_rng(0).integers(0, 256, size=(1, 240, 320, 3), dtype=np.uint8)
    with torch.no_grad():
        f = vgg(vgg.preprocessing(img))
    assert tuple(f.shape) == (1, 512, 15, 20)
    assert f.dtype == torch.float32
    assert feature_map_size((320, 240), vgg.stride) == (20, 15)
    # cut at conv5_3 without its ReLU: the raw conv output has negative values
    assert float(f.min()) < 0.0
    assert torch.isfinite(f).all()


def test_vgg16_loads_the_file_tensors(vgg, vgg_state):
    body_sd = vgg.body.state_dict()
    assert set(body_sd) == {k for k in vgg_state if int(k.split(".")[0]) <= 28}
    for k, v in vgg_state.items():
        torch.testing.assert_close(body_sd[k], v, rtol=0, atol=0)
    assert isinstance(vgg.body[-1], torch.nn.Conv2d)  # conv5_3 is the last layer


def test_vgg16_sha256_matches_readme(vgg, vgg_path, weights_dir):
    expected = _readme_sha256(weights_dir, VGG_FILE)
    h = hashlib.sha256(vgg_path.read_bytes()).hexdigest()
    assert h == expected
    assert vgg.weights_sha256 == expected
    assert vgg.weights_path == str(vgg_path)


def test_caffe_preprocessing_of_constant_image():
    r, g, b = 10, 200, 90
    img = np.empty((2, 4, 6, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = r, g, b
    x = PREPROCESSING["caffe_bgr"](img)
    assert x.shape == (2, 3, 4, 6) and x.dtype == torch.float32
    expected = [b - 103.939, g - 116.779, r - 123.68]  # B, G, R order
    for c in range(3):
        torch.testing.assert_close(x[:, c], torch.full((2, 4, 6), expected[c]), rtol=0, atol=1e-4)


def test_caffe_preprocessing_channel_order():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x = PREPROCESSING["caffe_bgr"](img)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-103.939, -116.779, 255 - 123.68]),
                               rtol=0, atol=1e-4)


def test_torchvision_preprocessing_of_constant_image():
    r, g, b = 10, 200, 90
    img = np.empty((1, 3, 5, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = r, g, b
    x = PREPROCESSING["torchvision"](torch.from_numpy(img))  # tensors are accepted too
    expected = [(r / 255 - 0.485) / 0.229, (g / 255 - 0.456) / 0.224, (b / 255 - 0.406) / 0.225]
    for c in range(3):
        torch.testing.assert_close(x[0, c], torch.full((3, 5), expected[c]), rtol=0, atol=1e-5)


def test_efficientnet_lite_preprocessing_of_constant_image():
    img = np.full((1, 2, 2, 3), 255, np.uint8)
    img[..., 1] = 0
    x = PREPROCESSING["efficientnet_lite"](img)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -127 / 128, 1.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 3), np.uint8),          # no batch dim
                                 np.zeros((1, 2, 2, 3), np.float32),     # float
                                 np.zeros((1, 2, 2, 4), np.uint8)])      # 4 channels
def test_preprocessing_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        PREPROCESSING["caffe_bgr"](bad)


def test_full_torchvision_state_dict_loads(tmp_path, vgg, vgg_state):
    full = {f"features.{k}": v.clone() for k, v in vgg_state.items()}
    # classifier tensors of a torchvision vgg16 (small stand-in sizes: the loader ignores them)
    g = torch.Generator().manual_seed(0)
    for name, shape in [("classifier.0.weight", (16, 32)), ("classifier.0.bias", (16,)),
                        ("classifier.3.weight", (16, 16)), ("classifier.3.bias", (16,)),
                        ("classifier.6.weight", (10, 16)), ("classifier.6.bias", (10,))]:
        full[name] = torch.randn(*shape, generator=g)
    path = tmp_path / "vgg16_torchvision_full.pth"
    torch.save(full, path)
    bb = build_backbone("vgg16", weights=str(path), preprocessing="torchvision")
    assert bb.preprocessing.name == "torchvision"
    assert bb.out_channels == 512 and bb.stride == 16
    assert bb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.weights_sha256 != vgg.weights_sha256
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), vgg(x), rtol=0, atol=0)


def test_missing_weight_file_raises_with_path(tmp_path):
    p = tmp_path / "nope" / "vgg16.pth"
    with pytest.raises(WeightsError) as info:
        build_backbone("vgg16", weights=str(p))
    assert str(p) in str(info.value)
    assert isinstance(info.value, VprError)


def test_vgg16_without_weights_raises():
    with pytest.raises(WeightsError):
        build_backbone("vgg16")


def test_wrong_tensor_shape_raises_with_path(tmp_path, vgg_state):
    bad = dict(vgg_state)
    bad["0.weight"] = torch.zeros(64, 4, 3, 3)  # 4 input channels instead of 3
    p = tmp_path / "bad_shape.pth"
    torch.save(bad, p)
    with pytest.raises(WeightsError) as info:
        build_backbone("vgg16", weights=str(p))
    assert str(p) in str(info.value)


def test_corrupt_weight_file_raises_with_path(tmp_path, vgg_path):
    p = tmp_path / "truncated.pth"
    p.write_bytes(vgg_path.read_bytes()[:100_000])
    with pytest.raises(WeightsError) as info:
        build_backbone("vgg16", weights=str(p))
    assert str(p) in str(info.value)


def test_non_numeric_keys_raise_weights_error(tmp_path, vgg_state):
    p = tmp_path / "dataparallel.pth"
    torch.save({f"module.{k}": v for k, v in vgg_state.items()}, p)
    with pytest.raises(WeightsError):
        build_backbone("vgg16", weights=str(p))


def test_unknown_backbone_and_preprocessing(vgg_path):
    with pytest.raises(WeightsError):
        build_backbone("resnet50", weights=str(vgg_path))
    with pytest.raises(WeightsError):
        build_backbone("vgg16", weights=str(vgg_path), preprocessing="bgr_please")


def test_efficientnet_lite0_packaged_weights():
    bb = build_backbone("efficientnet_lite0")
    assert bb.out_channels == 1280 and bb.stride == 32
    assert bb.preprocessing.name == "efficientnet_lite"
    assert re.fullmatch(r"[0-9a-f]{64}", bb.weights_sha256)
    with open(bb.weights_path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == bb.weights_sha256
    img = np.random.default_rng(1).integers(0, 256, size=(1, 64, 96, 3), dtype=np.uint8)
    with torch.no_grad():
        f = bb(bb.preprocessing(img))
    assert tuple(f.shape) == (1, 1280, 2, 3)
    assert torch.isfinite(f).all() and float(f.abs().max()) > 0
    # the packaged weights were really loaded (a random init would not equal them)
    packaged = torch.load(bb.weights_path, map_location="cpu", weights_only=True)
    loaded = bb.body.net.state_dict()
    for key in ("_conv_stem.weight", "_conv_head.weight", "_bn1.running_var"):
        torch.testing.assert_close(loaded[key], packaged[key], rtol=0, atol=0)
