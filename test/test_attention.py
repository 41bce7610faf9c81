"""Unit tests of vpr_localizer.models.attention (CPU, tiny tensors, no data files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vpr_localizer.models.aggregation import GeM, GlobalAvgPool, NetVLAD
from vpr_localizer.models.attention import DEFAULT_INIT_BIAS, SpatialAttention, weights_to_feature_map
from vpr_localizer.segmentation.classes import static_weight


def _set_conv(att: SpatialAttention, weight: np.ndarray, bias: float) -> None:
    with torch.no_grad():
        att.conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)).reshape(1, 1, 3, 3))
        att.conv.bias.fill_(bias)


# --- hand-written numpy reference (the spec, not the implementation) ---------------------------

def _ref_maxpool_2x2_ceil(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    ho, wo = -(-h // 2), -(-w // 2)
    out = np.empty((ho, wo), np.float64)
    for i in range(ho):
        for j in range(wo):
            out[i, j] = a[2 * i:2 * i + 2, 2 * j:2 * j + 2].max()
    return out


def _ref_conv3x3(a: np.ndarray, k: np.ndarray, b: float) -> np.ndarray:
    """Cross-correlation with zero padding 1 (what nn.Conv2d computes)."""
    h, w = a.shape
    p = np.zeros((h + 2, w + 2))
    p[1:-1, 1:-1] = a
    out = np.full((h, w), b, np.float64)
    for i in range(h):
        for j in range(w):
            out[i, j] += (p[i:i + 3, j:j + 3] * k).sum()
    return out


def _ref_bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize, half-pixel centres (align_corners=False), source clamped at 0."""
    hi, wi = a.shape

    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, ly = taps(h, hi)
    x0, x1, lx = taps(w, wi)
    out = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            top = (1 - lx[j]) * a[y0[i], x0[j]] + lx[j] * a[y0[i], x1[j]]
            bot = (1 - lx[j]) * a[y1[i], x0[j]] + lx[j] * a[y1[i], x1[j]]
            out[i, j] = (1 - ly[i]) * top + ly[i] * bot
    return out


def _reference(features: np.ndarray, k: np.ndarray, b: float) -> np.ndarray:
    """(C, H, W) -> (H, W): channel mean -> 2x2 max pool -> 3x3 conv -> sigmoid -> upsample."""
    _, h, w = features.shape
    a = features.astype(np.float64).mean(axis=0)
    a = _ref_maxpool_2x2_ceil(a)
    a = 1.0 / (1.0 + np.exp(-_ref_conv3x3(a, k, b)))
    return _ref_bilinear(a, h, w)


K_SET = np.array([[0.5, -1.0, 0.25], [2.0, 1.5, -0.75], [-0.5, 0.3, 1.0]])


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 5, 3), (4, 7, 9), (1, 1, 1)])
def test_matches_hand_written_reference(shape):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2,) + shape).astype(np.float32)
    att = SpatialAttention()
    _set_conv(att, K_SET, -0.2)
    with torch.no_grad():
        out = att(torch.from_numpy(feats)).numpy()
    assert out.shape == (2, 1, shape[1], shape[2])
    for i in range(2):
        np.testing.assert_allclose(out[i, 0], _reference(feats[i], K_SET, -0.2), rtol=0, atol=1e-6)


def test_reference_is_not_trivially_flat():
    # Guard against a reference/implementation pair that agrees only because the map is constant.
    feats = np.random.default_rng(1).normal(size=(3, 4, 6)).astype(np.float32)
    ref = _reference(feats, K_SET, -0.2)
    assert ref.max() - ref.min() > 0.1


def test_output_shape_dtype_and_range():
    att = SpatialAttention()
    _set_conv(att, np.random.default_rng(2).normal(size=(3, 3)) * 3, 0.0)
    x = torch.randn(2, 16, 7, 10)
    with torch.no_grad():
        w = att(x)
        assert w.shape == (2, 1, 7, 10) and w.dtype == torch.float32
        assert float(w.min()) > 0.0 and float(w.max()) < 1.0
        assert float(w.max() - w.min()) > 0.05  # a spatial map, not a constant
        weighted, w2 = att.apply(x)
        # large logits saturate in float32 but never leave [0, 1]
        big = att(x * 1e4)
        assert float(big.min()) >= 0.0 and float(big.max()) <= 1.0
    assert weighted.shape == x.shape
    torch.testing.assert_close(w2, w)
    torch.testing.assert_close(weighted, x * w)


def test_parameter_count_is_tiny_and_channel_independent():
    att = SpatialAttention()
    assert att.num_parameters == 10
    assert sum(p.numel() for p in att.parameters()) == 10
    # the same module works on any channel count (image stream, segmentation stream)
    assert att(torch.randn(1, 512, 4, 4)).shape == (1, 1, 4, 4)
    assert att(torch.randn(1, 20, 4, 4)).shape == (1, 1, 4, 4)


def test_untrained_module_is_near_neutral():
    torch.manual_seed(0)
    att = SpatialAttention()
    x = torch.rand(2, 32, 6, 8) * 4
    with torch.no_grad():
        w = att(x)
        weighted, _ = att.apply(x)
    expected = 1.0 / (1.0 + np.exp(-DEFAULT_INIT_BIAS))
    assert expected > 0.95
    torch.testing.assert_close(w, torch.full_like(w, expected))
    assert float(((weighted - x).abs() / x.abs().clamp(min=1e-6)).max()) < 0.05
    # a constant map changes no aggregator's descriptor, used as weights or by feature scaling
    vlad = NetVLAD(num_clusters=4, dim=32)
    for agg in (vlad, GeM(), GlobalAvgPool()):
        with torch.no_grad():
            plain = agg(x)
            torch.testing.assert_close(agg(x, weights=w), plain, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(agg(weighted), plain, atol=1e-6, rtol=1e-5)


def test_trained_map_changes_weighted_netvlad_but_feature_scaling_does_not():
    # Documents why the map must go to NetVLAD as `weights`: input L2 normalisation cancels a
    # per-location scale of the features.
    torch.manual_seed(0)
    att = SpatialAttention()
    centre_only = np.zeros((3, 3))
    centre_only[1, 1] = 2.0
    _set_conv(att, centre_only, 0.0)
    ramp = torch.linspace(-2.0, 2.0, 8).reshape(1, 1, 1, 8)  # channel mean varies along x
    x = torch.rand(1, 32, 6, 8) + ramp
    vlad = NetVLAD(num_clusters=4, dim=32)
    with torch.no_grad():
        weighted, w = att.apply(x)
        assert float(w.min()) < 0.2 and float(w.max()) > 0.8
        plain = vlad(x)
        torch.testing.assert_close(vlad(weighted), plain, atol=1e-6, rtol=1e-5)
        assert float((vlad(x, weights=w) - plain).abs().max()) > 1e-3


def test_gradient_reaches_conv_parameters():
    torch.manual_seed(0)
    att = SpatialAttention()
    x = torch.rand(2, 8, 6, 8)
    target = torch.rand(2, 1, 6, 8)
    loss = ((att(x) - target) ** 2).mean()
    loss.backward()
    assert att.conv.weight.grad is not None and float(att.conv.weight.grad.abs().sum()) > 0
    assert att.conv.bias.grad is not None and float(att.conv.bias.grad.abs()) > 0
    # one SGD step makes the map depend on the input (it starts constant)
    with torch.no_grad():
        for p in att.parameters():
            p -= 10.0 * p.grad
        w = att(x)
    assert float(w.max() - w.min()) > 1e-4


def test_gradient_through_weighted_netvlad():
    torch.manual_seed(0)
    att = SpatialAttention()
    x = torch.rand(1, 16, 6, 8)
    vlad = NetVLAD(num_clusters=4, dim=16)
    ref = torch.randn(1, vlad.out_dim)
    loss = -(vlad(x, weights=att(x)) * ref).sum()
    loss.backward()
    assert float(att.conv.weight.grad.abs().sum()) > 0


def test_module_apply_with_a_function_still_works():
    seen = []
    model = nn.Sequential(SpatialAttention(), nn.Identity())
    out = model.apply(lambda m: seen.append(type(m).__name__))
    assert out is model
    assert "SpatialAttention" in seen and "Conv2d" in seen


def test_rejects_bad_input():
    att = SpatialAttention()
    with pytest.raises(ValueError):
        att(torch.randn(4, 4, 4))
    with pytest.raises(ValueError):
        att(torch.ones(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        SpatialAttention(init_bias=float("nan"))


# --- weights_to_feature_map ------------------------------------------------------------------------

def test_mask_resize_is_block_mean():
    m = np.random.default_rng(3).random((8, 12)).astype(np.float32)
    out = weights_to_feature_map(m, (2, 3))
    assert out.shape == (1, 1, 2, 3) and out.dtype == torch.float32
    manual = m.reshape(2, 4, 3, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(out[0, 0].numpy(), manual, rtol=0, atol=1e-6)


def test_mask_resize_batch_tensor():
    m = torch.rand(3, 1, 6, 4)
    out = weights_to_feature_map(m, (3, 2))
    manual = m.reshape(3, 1, 3, 2, 2, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out, manual)


def test_static_weight_to_feature_map_keeps_the_static_fraction():
    labels = np.full((32, 32), 2, np.uint8)       # building (static)
    labels[0:16, 0:8] = 13                        # a car over half of the top-left 16x16 cell
    labels[16:32, 16:32] = 10                     # sky over the bottom-right cell
    out = weights_to_feature_map(static_weight(labels), (2, 2))[0, 0].numpy()
    np.testing.assert_allclose(out, [[0.5, 1.0], [1.0, 0.0]], atol=1e-6)


def test_mask_resize_rejects_bad_input():
    with pytest.raises(ValueError):
        weights_to_feature_map(-np.ones((4, 4), np.float32), (2, 2))
    with pytest.raises(ValueError):
        weights_to_feature_map(np.full((4, 4), np.nan, np.float32), (2, 2))
    with pytest.raises(ValueError):
        weights_to_feature_map(np.ones((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError):
        weights_to_feature_map(np.ones((4, 4), np.float32), (0, 2))
