"""Segmentation-guided NetVLAD (vpr_localizer.models.guided) and its encoder/map integration.

Checks, on random tensors where only algebra is tested and on real data where it matters
(Cityscapes frames with the authors' reference label maps, Gardens Point images with the
ESPNetv2 backend): a guided layer without guidance is plain NetVLAD; the two-stream fusion is a
normalised concatenation whose cosine is the mean of the streams' cosines; the static mask is the
area-averaged static weight of the labels (0 under cars/people/sky, 1 on static structure, ignore
neutral); untrained attention is neutral; the guided encoder's labels, checkpoints, fingerprint
and maps round-trip bit for bit.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vpr_localizer.models.aggregation import NetVLAD
from vpr_localizer.models.config import EncoderConfig
from vpr_localizer.models.encoder import Encoder
from vpr_localizer.errors import ConfigError, WeightsError
from vpr_localizer.files import sha256_file
from vpr_localizer.models.guided import MIN_STATIC_FRACTION, GuidedNetVLAD, StreamFeatures, static_feature_weights
from vpr_localizer.io.image_files import load_image, resize_image
from vpr_localizer.localization.localize import encoder_for_map
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.mapping.build import build_map
from vpr_localizer.io.records import records_from_csv
from vpr_localizer.segmentation.classes import SKY_TRAIN_ID, Coarse, coarse_labels, colorize, static_weight

K, D = 4, 16  # random-tensor tests
CITY_FRAME = "frankfurt_000000_000576"  # 82% static, 16% dynamic, 2% sky (reference labels)
CITY_SIZE = (320, 160)                  # (W, H): VGG16 conv5_3 grid 10 x 20, 16 x 16 px per cell
GP_SIZE = (320, 180)
GP_K = 4
ESPNETV2_SHA256 = "a72d59699801c7ce8e8b89a53af9097eaaa60dc12180ecde86fd700ba1222fe8"


@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """One faiss thread for the k-means of this module (see conftest.faiss_single_thread)."""


def _randomize(vlad: NetVLAD, seed: int) -> NetVLAD:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vlad.conv.weight.copy_(torch.randn(vlad.conv.weight.shape, generator=g) * 2.0)
        vlad.conv.bias.copy_(torch.randn(vlad.conv.bias.shape, generator=g))
        vlad.centroids.copy_(torch.randn(vlad.centroids.shape, generator=g) * 0.3)
    return vlad.eval()


def _feats(seed: int, b: int = 2, d: int = D, h: int = 5, w: int = 7) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# 1-2: the layer on random tensors
# --------------------------------------------------------------------------------------------

def test_unguided_layer_is_plain_netvlad():
    guided = GuidedNetVLAD(K, D).eval()
    _randomize(guided.image_vlad, 1)
    plain = NetVLAD(K, D).eval()
    plain.load_state_dict(guided.image_vlad.state_dict())
    x = _feats(2)
    with torch.no_grad():
        ref = plain(x)
        out = guided(StreamFeatures(x))
        # flags off: a static map and segmentation features that happen to be present are ignored
        ignored = guided(StreamFeatures(x, seg=_feats(3), static=torch.rand(2, 1, 5, 7)))
    assert guided.out_dim == K * D and out.shape == (2, K * D)
    assert guided.seg_vlad is None and guided.image_attention is None and guided.seg_attention is None
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(ignored, ref, rtol=0, atol=0)


def test_missing_stream_inputs_are_errors():
    x = _feats(4)
    with pytest.raises(ValueError, match="static"):
        GuidedNetVLAD(K, D, static_mask=True)(StreamFeatures(x))
    with pytest.raises(ValueError, match="seg"):
        GuidedNetVLAD(K, D, seg_stream=True)(StreamFeatures(x, static=torch.ones(2, 1, 5, 7)))


def test_two_stream_fusion_is_normalised_concatenation():
    layer = GuidedNetVLAD(K, D, seg_stream=True, static_mask=True).eval()
    _randomize(layer.image_vlad, 5)
    _randomize(layer.seg_vlad, 6)
    # the two streams have their own parameters (not shared / aliased)
    assert not torch.equal(layer.image_vlad.centroids, layer.seg_vlad.centroids)
    b = 3
    f_img, f_seg = _feats(7, b=b), _feats(8, b=b)
    w = torch.rand(b, 1, 5, 7, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = layer(StreamFeatures(f_img, f_seg, w))
        v_img, v_seg = layer.image_vlad(f_img, w), layer.seg_vlad(f_seg, w)
    assert layer.out_dim == 2 * K * D and out.shape == (b, 2 * K * D)
    torch.testing.assert_close(out, torch.cat([v_img, v_seg], dim=1) / math.sqrt(2.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(b), rtol=0, atol=1e-6)
    # the mask really is used by both streams (unweighted streams give another vector)
    with torch.no_grad():
        assert (layer.image_vlad(f_img) - v_img).abs().max() > 1e-3
        assert (layer.seg_vlad(f_seg) - v_seg).abs().max() > 1e-3
    # cosine of fused descriptors = mean of the per-stream cosines
    cos_fused = out @ out.T
    cos_mean = (v_img @ v_img.T + v_seg @ v_seg.T) / 2.0
    torch.testing.assert_close(cos_fused, cos_mean, rtol=0, atol=1e-6)
    assert (cos_fused - torch.eye(b)).abs().max() > 1e-2  # distinct inputs, non-trivial check


# --------------------------------------------------------------------------------------------
# 3: static_feature_weights on a real reference label map
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def city_labels(weights_dir, data_file) -> np.ndarray:
    """The authors' ESPNetv2 label map of a Cityscapes frame, uint8 (512, 1024)."""
    lab = np.asarray(Image.open(data_file(weights_dir / "reference" / f"espnetv2_{CITY_FRAME}_labels.png")))
    assert lab.shape == (512, 1024) and lab.dtype == np.uint8
    return lab


def test_static_feature_weights_on_reference_labels(city_labels):
    h, w = 32, 64  # 16 x 16 pixel blocks
    grid = static_feature_weights(city_labels[None], (h, w))
    assert grid.shape == (1, 1, h, w) and grid.dtype == torch.float32
    g = grid[0, 0].numpy()
    assert g.min() >= 0.0 and g.max() <= 1.0

    coarse = coarse_labels(city_labels).reshape(h, 16, w, 16).transpose(0, 2, 1, 3).reshape(h, w, 256)
    moving_or_sky = np.isin(coarse, (Coarse.DYNAMIC, Coarse.SKY)).all(axis=2)
    static = (coarse == Coarse.STATIC).all(axis=2)
    assert moving_or_sky.sum() >= 10 and static.sum() >= 100, (moving_or_sky.sum(), static.sum())
    assert (g[moving_or_sky] == 0.0).all()
    assert (g[static] == 1.0).all()
    mixed = ~moving_or_sky & ~static
    assert mixed.any() and ((g[mixed] > 0.0) & (g[mixed] < 1.0)).all()
    # every cell is the fraction of static pixels it covers (exact 16 x 16 blocks here)
    frac = (coarse == Coarse.STATIC).mean(axis=2)
    np.testing.assert_allclose(g, frac, rtol=0, atol=1e-6)

    # a grid that does not divide the image: overlapping windows, still in [0, 1]
    odd = static_feature_weights(city_labels[None], (11, 23))[0, 0].numpy()
    assert odd.shape == (11, 23) and odd.min() >= 0.0 and odd.max() <= 1.0
    assert odd.min() == 0.0 and odd.max() == 1.0


def test_static_feature_weights_fallback_and_batch(city_labels):
    sky = np.full((1,) + city_labels.shape, SKY_TRAIN_ID, np.uint8)
    ones = static_feature_weights(sky, (32, 64))
    assert torch.equal(ones, torch.ones(1, 1, 32, 64))
    # 1% static (below MIN_STATIC_FRACTION) falls back to uniform; 5% static does not
    few = np.full((2, 100, 100), 13, np.uint8)  # all car
    few[0, :1] = 2   # 1 of 100 rows building
    few[1, :5] = 2   # 5 of 100 rows building
    assert 0.01 < MIN_STATIC_FRACTION < 0.05
    grid = static_feature_weights(few, (10, 10))
    assert torch.equal(grid[0], torch.ones(1, 10, 10))
    assert float(grid[1].sum()) == pytest.approx(5.0) and float(grid[1].min()) == 0.0
    # a batch of the real map and the all-sky map: each frame handled on its own
    both = static_feature_weights(np.stack([city_labels, sky[0]]), (32, 64))
    torch.testing.assert_close(both[0], static_feature_weights(city_labels[None], (32, 64))[0])
    assert torch.equal(both[1], torch.ones(1, 32, 64))
    with pytest.raises(ValueError):
        static_feature_weights(city_labels, (32, 64))  # 2-D, not a batch


# --------------------------------------------------------------------------------------------
# 4-5: static mask and attention on a real image
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def city(vgg_path, datasets_dir, data_file, city_labels):
    """VGG16 conv5_3 features of a real Cityscapes frame at 320x160, NetVLAD centroids from k-means
    on the three Cityscapes frames, and the reference labels at the input size."""
    paths = [str(data_file(p)) for p in sorted((datasets_dir / "cityscapes_frames").glob("*.png"))]
    assert len(paths) == 3
    enc = Encoder(EncoderConfig(weights=str(vgg_path), image_size=CITY_SIZE, num_clusters=8, pca_dim=0,
                                device="cpu"))
    enc.fit_aggregator(paths)
    rgb = resize_image(load_image(datasets_dir / "cityscapes_frames" / f"{CITY_FRAME}_leftImg8bit.png"), CITY_SIZE)
    feats = enc.feature_maps(rgb[None])
    assert tuple(feats.shape) == (1, 512, 10, 20)
    labels = enc.prepare_labels([city_labels])  # nearest neighbour to 160 x 320
    return enc, feats, labels


def _guided_from(plain: NetVLAD, **flags) -> GuidedNetVLAD:
    layer = GuidedNetVLAD(plain.num_clusters, plain.dim, **flags).eval()
    layer.image_vlad.load_state_dict(plain.state_dict())
    return layer


@torch.no_grad()
def test_static_mask_changes_real_descriptor(city):
    enc, feats, labels = city
    plain = enc.aggregator
    layer = _guided_from(plain, static_mask=True)
    grid = tuple(feats.shape[-2:])

    def describe(lab):
        return layer(StreamFeatures(feats, static=static_feature_weights(lab, grid))).numpy()

    unguided = plain(feats).numpy()
    masked = describe(labels)
    np.testing.assert_allclose(np.linalg.norm(masked), 1.0, atol=1e-5)
    coarse = coarse_labels(labels[0])
    assert (coarse == Coarse.DYNAMIC).mean() > 0.05 and (coarse == Coarse.SKY).any()
    # the mask matters on this frame
    assert np.abs(masked - unguided).max() > 1e-2
    # it is exactly NetVLAD weighted by the per-cell fraction of static pixels
    frac = (coarse == Coarse.STATIC).reshape(10, 16, 20, 16).mean(axis=(1, 3)).astype(np.float32)
    by_hand = plain(feats, torch.from_numpy(frac)[None, None]).numpy()
    np.testing.assert_allclose(masked, by_hand, rtol=0, atol=1e-6)

    # cars/people relabelled as building: another descriptor (sky still masked) ...
    no_dynamic = labels.copy()
    no_dynamic[0][coarse == Coarse.DYNAMIC] = 2
    d_no_dynamic = describe(no_dynamic)
    assert np.abs(d_no_dynamic - masked).max() > 1e-2
    assert np.abs(d_no_dynamic - unguided).max() > 1e-4
    # ... and with sky relabelled too every pixel is static: the unguided descriptor
    all_static = no_dynamic.copy()
    all_static[all_static == SKY_TRAIN_ID] = 8
    np.testing.assert_allclose(describe(all_static), unguided, rtol=0, atol=1e-6)

    # uniform ignore labels (the "none" backend): exactly unguided NetVLAD
    ignore = np.full_like(labels, 19)
    assert (static_weight(ignore[0]) == 1.0).all()
    np.testing.assert_allclose(describe(ignore), unguided, rtol=0, atol=1e-6)


@torch.no_grad()
def test_untrained_attention_is_neutral_and_trained_is_not(city):
    enc, feats, labels = city
    plain = enc.aggregator
    seg_feats = enc.feature_maps(colorize(labels[0])[None])
    base = _guided_from(plain, seg_stream=True)
    base.seg_vlad.load_state_dict(plain.state_dict())
    att = _guided_from(plain, seg_stream=True, attention=True)
    att.seg_vlad.load_state_dict(plain.state_dict())
    sf = StreamFeatures(feats, seg=seg_feats)

    maps = att.weight_maps(sf)
    expected = torch.full_like(maps["image"], torch.sigmoid(torch.tensor(3.0)).item())
    torch.testing.assert_close(maps["image"], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(maps["seg"], expected, rtol=0, atol=1e-7)
    ref = base(sf)
    torch.testing.assert_close(att(sf), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(att(sf)[:, :plain.out_dim] * math.sqrt(2.0), plain(feats), rtol=0, atol=1e-6)

    def centre_filter(module, x):
        # logit = (pooled channel mean - its median) / its std: a map that varies over the frame
        pooled = F.max_pool2d(x.mean(dim=1, keepdim=True), 2, 2, ceil_mode=True)
        module.conv.weight[0, 0, 1, 1] = 1.0 / float(pooled.std())
        module.conv.bias.fill_(-float(pooled.median()) / float(pooled.std()))

    # a non-zero attention filter on the image stream: the map varies, the descriptor changes
    centre_filter(att.image_attention, feats)
    m = att.weight_maps(sf)["image"]
    assert float(m.max() - m.min()) > 0.3
    out = att(sf)
    assert (out - ref)[:, :plain.out_dim].abs().max() > 1e-3
    torch.testing.assert_close(out[:, plain.out_dim:], ref[:, plain.out_dim:], rtol=0, atol=1e-6)
    # ... and on the segmentation stream
    centre_filter(att.seg_attention, seg_feats)
    m = att.weight_maps(sf)["seg"]
    assert float(m.max() - m.min()) > 0.3
    assert (att(sf) - out)[:, plain.out_dim:].abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# 6-7: the guided encoder on real images, checkpoints, fingerprint, maps
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def espnetv2_path(weights_dir, data_file) -> Path:
    return data_file(weights_dir / "espnetv2_s_2.0_city_1024x512.pth")


@pytest.fixture(scope="module")
def gp_records(datasets_dir, data_file):
    recs = records_from_csv(str(data_file(datasets_dir / "gardens_point_mini" / "manifest.csv")))
    by_name = {r.name: r for r in recs}
    # two Gardens Point places (day + night) and a forest-trail frame
    names = ["images/p0_v0_day.jpg", "images/p0_v2_night.jpg", "images/p1_v0_day.jpg", "images/p4_v0_dry.jpg"]
    missing = [n for n in names if n not in by_name]
    assert not missing, f"not in the gardens_point_mini manifest: {missing}"
    out = [by_name[n] for n in names]
    for r in out:
        data_file(r.path)
    return out


def guided_config(vgg_path, espnetv2_path, **kw) -> EncoderConfig:
    d = dict(weights=str(vgg_path), image_size=GP_SIZE, num_clusters=GP_K, pca_dim=0, device="cpu",
             batch_size=4, static_mask=True, seg_stream=True, attention=True, segmentation="espnetv2",
             segmentation_weights=str(espnetv2_path), segmentation_size=(256, 128))
    d.update(kw)
    return EncoderConfig(**d)


@pytest.fixture(scope="module")
def guided(vgg_path, espnetv2_path, gp_records):
    enc = Encoder(guided_config(vgg_path, espnetv2_path))
    paths = [r.path for r in gp_records]
    enc.fit_aggregator(paths)
    res = enc.encode_paths(paths)
    return enc, res


def test_guided_encoder_fits_and_encodes(guided, gp_records):
    enc, res = guided
    assert isinstance(enc.aggregator, GuidedNetVLAD)
    assert res.ok == list(range(len(gp_records))) and res.skipped == []
    assert enc.raw_dim == enc.dim == 2 * GP_K * 512
    assert res.descriptors.shape == (len(gp_records), 2 * GP_K * 512) and res.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.descriptors, axis=1), 1.0, atol=1e-5)
    # each stream's half is itself unit norm / sqrt(2)
    half = GP_K * 512
    np.testing.assert_allclose(np.linalg.norm(res.descriptors[:, :half], axis=1), 1 / math.sqrt(2), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(res.descriptors[:, half:], axis=1), 1 / math.sqrt(2), atol=1e-5)
    # the two streams got their own k-means vocabularies
    assert not torch.allclose(enc.aggregator.image_vlad.centroids, enc.aggregator.seg_vlad.centroids)
    # distinct images, distinct descriptors
    assert np.abs(res.descriptors[0] - res.descriptors[3]).max() > 1e-2


def test_guided_encoder_labels_path_equals_own_segmentation(guided, gp_records):
    enc, res = guided
    rgb = load_image(gp_records[0].path)
    resized = resize_image(rgb, enc.config.image_size)
    labels = np.asarray(enc.segmenter(resized))
    assert labels.shape == resized.shape[:2] and labels.dtype == np.uint8
    coarse = coarse_labels(labels)
    assert (coarse == Coarse.STATIC).mean() > 0.3  # a real segmentation of a campus scene
    own = enc.encode_images([rgb])
    given = enc.encode_images([rgb], labels=[labels])
    np.testing.assert_array_equal(own, given)
    np.testing.assert_allclose(own[0], res.descriptors[0], rtol=0, atol=1e-5)
    # the labels matter: uniform ignore labels give another descriptor
    assert np.abs(enc.encode_images([rgb], labels=[np.full_like(labels, 19)]) - own).max() > 1e-3
    with pytest.raises(ValueError, match="label maps"):
        enc.encode_images([rgb], labels=[labels, labels])


def test_guided_checkpoint_round_trip(guided, gp_records, vgg_path, espnetv2_path, weights_dir, data_file,
                                     tmp_path):
    espnet_path = data_file(weights_dir / "espnet_p2_q8_city_decoder.pth")
    enc, res = guided
    path = str(tmp_path / "guided.pt")
    enc.save_checkpoint(path)
    enc2 = Encoder(guided_config(vgg_path, espnetv2_path, checkpoint=path), backbone=enc.backbone)
    assert enc2.fingerprint() == enc.fingerprint()
    again = enc2.encode_paths([r.path for r in gp_records])
    np.testing.assert_array_equal(again.descriptors, res.descriptors)

    for flags in ({"attention": False}, {"seg_stream": False}, {"static_mask": False},
                  {"segmentation": "espnet", "segmentation_weights": str(espnet_path)}):
        with pytest.raises(WeightsError, match="guidance"):
            Encoder(guided_config(vgg_path, espnetv2_path, checkpoint=path, **flags), backbone=enc.backbone)
    # another segmentation input size changes the labels, not the parameters: the checkpoint
    # loads, but the encoder is another identity
    other = Encoder(guided_config(vgg_path, espnetv2_path, checkpoint=path, segmentation_size=(512, 256)),
                    backbone=enc.backbone)
    assert other.fingerprint()["params_sha256"] == enc.fingerprint()["params_sha256"]
    assert other.fingerprint() != enc.fingerprint()
    with pytest.raises(WeightsError, match="guidance"):  # unguided NetVLAD from a guided checkpoint
        Encoder(EncoderConfig(weights=str(vgg_path), image_size=GP_SIZE, num_clusters=GP_K, pca_dim=0,
                              device="cpu", checkpoint=path), backbone=enc.backbone)


def test_guided_fingerprint(guided, vgg_path, espnetv2_path):
    enc, _ = guided
    fp = enc.fingerprint()
    assert fp["guidance"] == {"static_mask": True, "seg_stream": True, "attention": True,
                              "segmentation": "espnetv2", "segmentation_weights_sha256": ESPNETV2_SHA256,
                              "segmentation_size": [256, 128]}
    assert sha256_file(str(espnetv2_path)) == ESPNETV2_SHA256
    plain = Encoder(EncoderConfig(weights=str(vgg_path), image_size=GP_SIZE, num_clusters=GP_K, pca_dim=0,
                                  device="cpu"), backbone=enc.backbone)
    pfp = plain.fingerprint()
    assert "guidance" not in pfp and pfp != fp
    assert pfp["raw_dim"] == GP_K * 512 and fp["raw_dim"] == 2 * GP_K * 512
    # the same parameters with other guidance flags: another identity
    other = Encoder(guided_config(vgg_path, espnetv2_path, attention=False), backbone=enc.backbone)
    assert other.fingerprint()["guidance"] != fp["guidance"]


def test_guidance_without_segmentation_is_config_error(vgg_path):
    for flags in ({"static_mask": True}, {"seg_stream": True}):
        with pytest.raises(ConfigError, match="segmentation"):
            Encoder(EncoderConfig(weights=str(vgg_path), image_size=GP_SIZE, num_clusters=GP_K, device="cpu",
                                  segmentation="none", **flags))


def test_guided_map_round_trip(guided, gp_records, datasets_dir, tmp_path):
    enc, res = guided
    out = tmp_path / "guided_map"
    report = build_map(gp_records, enc, str(out), progress=False)
    assert report.keyframes == len(gp_records) and report.descriptor_dim == 2 * GP_K * 512
    vmap = VprMap.load(str(out))
    assert vmap.fingerprint == enc.fingerprint()
    assert vmap.meta["build"]["segmentation_weights"] == os.path.abspath(enc.config.segmentation_weights)
    np.testing.assert_allclose(vmap.index.reconstruct_n(0, len(gp_records)), res.descriptors, rtol=0, atol=1e-6)

    enc2 = encoder_for_map(vmap, device="cpu")
    assert isinstance(enc2.aggregator, GuidedNetVLAD)
    assert enc2.config.static_mask and enc2.config.seg_stream and enc2.config.attention
    assert enc2.fingerprint() == enc.fingerprint()
    query = load_image(datasets_dir / "gardens_point_mini" / "images" / "p0_v1_day.jpg")
    q1, q2 = enc.encode_images([query]), enc2.encode_images([query])
    np.testing.assert_array_equal(q1, q2)
    # the query finds its place (place 0) among the map images
    scores = res.descriptors @ q1[0]
    assert gp_records[int(np.argmax(scores))].place_id == "0", scores
