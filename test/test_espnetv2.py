"""ESPNetv2 (s = 2.0, Cityscapes, 20 classes; Mehta et al., CVPR 2019): strict loading of the
released checkpoint and exact pixel agreement with the authors' reference label maps in
../shared/weights/reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vpr_localizer.errors import ImageLoadError, VprError, WeightsError
from vpr_localizer.segmentation.base import SegmentationBackend
from vpr_localizer.segmentation.espnetv2 import ESPNetv2Backend, ESPNetv2Segmentation, load_espnetv2

WEIGHTS = "espnetv2_s_2.0_city_1024x512.pth"
KEYS = "espnetv2_s_2.0_city_1024x512.keys.txt"
FRAMES = ("frankfurt_000000_000294", "frankfurt_000000_000576", "frankfurt_000001_058914")


@pytest.fixture(scope="module")
def weights_path(weights_dir, data_file):
    return data_file(weights_dir / WEIGHTS)


@pytest.fixture(scope="module")
def state(weights_path):
    return torch.load(weights_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def backend(weights_path):
    return ESPNetv2Backend(str(weights_path), device="auto")


def _parse_keys(path):
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        out[name] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def test_model_matches_keys_txt(weights_dir, data_file):
    listed = _parse_keys(data_file(weights_dir / KEYS))
    model_sd = ESPNetv2Segmentation().state_dict()
    assert len(listed) == 526
    missing = [k for k in listed if k not in model_sd]
    extra = [k for k in model_sd if k not in listed]
    assert not missing and not extra, (missing[:5], extra[:5])
    for k, shape in listed.items():
        assert tuple(model_sd[k].shape) == shape, k


def test_strict_load(state, weights_path):
    model = ESPNetv2Segmentation()
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    loaded = load_espnetv2(weights_path)
    assert not loaded.training
    sd = loaded.state_dict()
    assert set(sd) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    n_params = sum(p.numel() for p in loaded.parameters())
    assert 780_000 < n_params < 800_000  # README: 0.79 M parameters


def test_wrong_shape_raises(state, tmp_path):
    bad = dict(state)
    bad["bu_dec_l4.merge_layer.3.weight"] = torch.zeros(21, 10, 1, 1)  # 21 classes instead of 20
    path = tmp_path / "wrong_shape.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as info:
        load_espnetv2(path)
    assert str(path) in str(info.value)
    assert "bu_dec_l4.merge_layer.3.weight" in str(info.value)


def test_missing_and_unexpected_keys_raise(state, tmp_path):
    bad = {k: v for k, v in state.items() if not k.startswith("bu_br_l4.")}
    bad["extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong_keys.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as info:
        load_espnetv2(path)
    msg = str(info.value)
    assert str(path) in msg and "missing" in msg and "unexpected" in msg


def test_missing_or_corrupt_file_raises(tmp_path):
    with pytest.raises(WeightsError, match="espnetv2 needs weights"):
        ESPNetv2Backend(None, device="cpu")
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError) as info:
        ESPNetv2Backend(str(path), device="cpu")
    assert str(path) in str(info.value)
    assert isinstance(info.value, VprError)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as info:
        load_espnetv2(junk)
    assert str(junk) in str(info.value)


def test_backend_contract_small_input(weights_path):
    be = ESPNetv2Backend(str(weights_path), device="cpu", input_size=(128, 64))
    assert be.name == "espnetv2"
    assert isinstance(be, SegmentationBackend)
    rgb = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    labels = be(rgb)
    assert labels.shape == (37, 53) and labels.dtype == np.uint8
    assert labels.max() <= 19
    with torch.no_grad():
        logits = be.model(torch.zeros(1, 3, 64, 128))
    assert tuple(logits.shape) == (1, 20, 64, 128)
    for bad in (rgb[..., 0], rgb.astype(np.float32), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageLoadError):
            be(bad)
    assert be.weights_path == str(weights_path) and be.input_size == (128, 64)
    # a non-contiguous view (e.g. a crop) of the right size is accepted and not modified
    big = np.random.default_rng(1).integers(0, 256, size=(64, 256, 3), dtype=np.uint8)
    view = big[:, ::2]
    before = view.copy()
    assert be(view).shape == (64, 128)
    np.testing.assert_array_equal(view, before)


@pytest.mark.integration
@pytest.mark.parametrize("frame", FRAMES)
def test_reference_agreement(backend, frame, datasets_dir, weights_dir, data_file):
    rgb = np.asarray(Image.open(data_file(datasets_dir / "cityscapes_frames" / f"{frame}_leftImg8bit.png"))
                     .convert("RGB"))
    ref = np.asarray(Image.open(data_file(weights_dir / "reference" / f"espnetv2_{frame}_labels.png")))
    assert ref.shape == (512, 1024) and rgb.shape == (1024, 2048, 3)

    labels = backend(rgb)  # network at 1024x512, labels resized back to 2048x1024 (nearest)
    assert labels.shape == rgb.shape[:2] and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= set(range(20))
    # nearest x2 upsampling: every 2x2 block repeats the 1024x512 network label
    low = labels[::2, ::2]
    assert np.array_equal(labels[1::2, 1::2], low) and np.array_equal(labels[::2, 1::2], low)

    mismatches = int(np.count_nonzero(low != ref))
    print(f"espnetv2 {frame}: {100.0 * (1 - mismatches / ref.size):.3f}% pixel agreement with the reference")
    assert mismatches == 0, f"{frame}: {mismatches} of {ref.size} pixels differ from the reference"
