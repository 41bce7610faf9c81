"""Panoptic-DeepLab (vpr_localizer.segmentation.panoptic; Cheng et al., CVPR 2020): post-processing on hand-built tensors with known
answers, the network on random weights (shapes, checkpoint layout, strict loading) and the
segmentation backend. No real Panoptic-DeepLab weights exist here, so nothing checks accuracy."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from vpr_localizer.errors import ImageLoadError, WeightsError
from vpr_localizer.segmentation.base import SegmentationBackend
from vpr_localizer.segmentation.panoptic.backend import PanopticDeepLabBackend
from vpr_localizer.segmentation.panoptic.checkpoint import load_panoptic_deeplab
from vpr_localizer.segmentation.panoptic.model import PanopticDeepLab
from vpr_localizer.segmentation.panoptic.postprocess import (
    CITYSCAPES_THING_IDS,
    find_instance_center,
    get_instance_segmentation,
    group_pixels,
    merge_semantic_and_instance,
    panoptic_segmentation,
)

ROAD, SIDEWALK, CAR, TRUCK = 0, 1, 13, 14


def _blob(h, w, cy, cx, peak=1.0, sigma=2.0):
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    return peak * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))


def _offsets_to(h, w, assign):
    """(2, H, W) offsets that point every pixel exactly at the centre ``assign(y, x) -> (cy, cx)``."""
    off = torch.zeros(2, h, w)
    for y in range(h):
        for x in range(w):
            cy, cx = assign(y, x)
            off[0, y, x] = cy - y
            off[1, y, x] = cx - x
    return off


def _as_list(yx):
    return [tuple(int(v) for v in p) for p in yx]


# --- centres -------------------------------------------------------------------------------------

def test_two_gaussian_blobs_give_two_centres():
    heat = (_blob(40, 60, 10, 12) + _blob(40, 60, 30, 45, peak=0.8)).unsqueeze(0)
    centres = find_instance_center(heat)
    assert centres.dtype == torch.int64
    assert _as_list(centres) == [(10, 12), (30, 45)]


def test_nms_suppresses_a_neighbouring_peak():
    heat = torch.zeros(1, 30, 30)
    heat[0, 15, 15] = 0.9
    heat[0, 15, 17] = 0.6  # 2 px away: inside a 7x7 window, outside a 3x3 one
    assert _as_list(find_instance_center(heat, nms_kernel=7)) == [(15, 15)]
    assert _as_list(find_instance_center(heat, nms_kernel=3)) == [(15, 15), (15, 17)]


def test_threshold_drops_a_weak_peak():
    heat = torch.zeros(1, 30, 30)
    heat[0, 5, 5] = 0.9
    heat[0, 20, 25] = 0.05
    assert _as_list(find_instance_center(heat, threshold=0.1)) == [(5, 5)]
    assert _as_list(find_instance_center(heat, threshold=0.01)) == [(5, 5), (20, 25)]


def test_sub_threshold_pixels_do_not_suppress_a_peak():
    heat = torch.zeros(1, 20, 20)
    heat[0, 10, 10] = 0.5
    heat[0, 10, 11] = 0.05  # below the threshold but > 0: must not matter
    heat[0, 10, 12] = 0.4   # above, but suppressed by 0.5 with a 7x7 window
    assert _as_list(find_instance_center(heat, threshold=0.1, nms_kernel=7)) == [(10, 10)]


def test_top_k_keeps_the_highest_peaks_in_raster_order():
    heat = torch.zeros(1, 40, 40)
    scores = {(2, 2): 0.3, (2, 30): 0.9, (20, 10): 0.5, (35, 5): 0.8, (35, 35): 0.2}
    for (y, x), s in scores.items():
        heat[0, y, x] = s
    assert _as_list(find_instance_center(heat, top_k=3)) == [(2, 30), (20, 10), (35, 5)]
    assert _as_list(find_instance_center(heat, top_k=None)) == sorted(scores)
    assert find_instance_center(heat, top_k=0).shape == (0, 2)


# --- grouping ------------------------------------------------------------------------------------

def test_group_pixels_follows_the_offsets():
    h, w = 9, 30
    a, b = (4, 5), (4, 24)
    # columns < 10 point at A, the rest at B: column 12 is nearer A by position but joins B
    off = _offsets_to(h, w, lambda y, x: a if x < 10 else b)
    ids = group_pixels(torch.tensor([a, b]), off)
    assert ids.shape == (1, h, w) and ids.dtype == torch.int64
    expected = torch.where(torch.arange(w) < 10, 1, 2).expand(h, w)
    assert torch.equal(ids[0], expected)


def test_group_pixels_without_offsets_uses_the_nearest_centre():
    h, w = 5, 30
    ids = group_pixels(torch.tensor([[2, 5], [2, 24]]), torch.zeros(2, h, w))
    # midpoint 14.5: column 14 -> first centre, column 15 -> second
    expected = torch.where(torch.arange(w) <= 14, 1, 2).expand(h, w)
    assert torch.equal(ids[0], expected)


def test_group_pixels_chunking_gives_the_same_answer():
    torch.manual_seed(1)
    centres = torch.randint(0, 20, (7, 2))
    off = torch.randn(2, 20, 20) * 5
    assert torch.equal(group_pixels(centres, off), group_pixels(centres, off, chunk_elems=7 * 13))


def test_group_pixels_without_centres_is_all_zero():
    ids = group_pixels(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(2, 4, 6))
    assert ids.shape == (1, 4, 6) and int(ids.abs().sum()) == 0


def test_instance_segmentation_only_inside_the_thing_mask():
    h, w = 10, 20
    heat = _blob(h, w, 5, 10).unsqueeze(0)
    sem = torch.zeros(1, h, w, dtype=torch.int64)
    thing = torch.zeros(1, h, w, dtype=torch.bool)
    thing[0, 3:8, 7:14] = True
    ins, centres = get_instance_segmentation(sem, heat, torch.zeros(2, h, w), thing)
    assert _as_list(centres[0]) == [(5, 10)]
    assert torch.equal(ins, thing.long())  # one instance (id 1) exactly on the mask
    ins, centres = get_instance_segmentation(sem, torch.zeros(1, h, w), torch.zeros(2, h, w), thing)
    assert centres.shape == (1, 0, 2) and int(ins.abs().sum()) == 0


# --- merging -------------------------------------------------------------------------------------

def test_majority_vote_picks_the_class_with_most_pixels():
    sem = torch.full((1, 10, 10), CAR, dtype=torch.int64)
    ins = torch.zeros(1, 10, 10, dtype=torch.int64)
    ins[0, :, :5] = 1                    # instance 1: 30 car + 20 truck pixels -> car
    sem[0, :2, :5] = TRUCK
    sem[0, 8:, :5] = TRUCK
    ins[0, :, 5:8] = 2                   # instance 2: all car -> second car
    ins[0, :, 8:] = 3                    # instance 3: 14 truck + 6 car -> truck
    sem[0, :7, 8:] = TRUCK
    pan = merge_semantic_and_instance(sem, ins, ins > 0, label_divisor=1000, thing_ids=CITYSCAPES_THING_IDS,
                                      stuff_area=1, void_label=-1)
    assert pan.dtype == torch.int64
    assert torch.all(pan[0, :, :5] == CAR * 1000 + 1)
    assert torch.all(pan[0, :, 5:8] == CAR * 1000 + 2)
    assert torch.all(pan[0, :, 8:] == TRUCK * 1000 + 1)


def test_small_stuff_region_becomes_void():
    sem = torch.full((1, 20, 20), ROAD, dtype=torch.int64)
    sem[0, :3, :4] = SIDEWALK            # 12 px of sidewalk
    ins = torch.zeros_like(sem)
    no_thing = torch.zeros_like(sem)
    pan = merge_semantic_and_instance(sem, ins, no_thing, stuff_area=50, void_label=-1)
    assert torch.all(pan[0, :3, :4] == -1)
    assert torch.all(pan[sem != SIDEWALK] == ROAD * 1000)
    pan = merge_semantic_and_instance(sem, ins, no_thing, stuff_area=12, void_label=-1)
    assert torch.all(pan[0, :3, :4] == SIDEWALK * 1000)  # exactly stuff_area is kept


def test_thing_pixels_outside_any_instance_are_void():
    h, w = 20, 30
    sem = torch.full((1, h, w), ROAD, dtype=torch.int64)
    sem[0, 5:15, 5:15] = CAR
    # no centre at all: the car pixels are neither an instance nor stuff -> void
    pan, centres = panoptic_segmentation(sem, torch.zeros(1, h, w), torch.zeros(2, h, w), stuff_area=10)
    assert centres.shape == (1, 0, 2)
    assert torch.all(pan[sem == CAR] == -1)
    assert torch.all(pan[sem == ROAD] == 0)
    # a centre exists but the foreground mask leaves out part of the car: that part is void
    heat = _blob(h, w, 10, 10).unsqueeze(0)
    fg = (sem == CAR).clone()
    fg[0, 5:15, 12:15] = False
    pan, _ = panoptic_segmentation(sem, heat, torch.zeros(2, h, w), stuff_area=10, foreground_mask=fg)
    assert torch.all(pan[0, 5:15, 5:12] == CAR * 1000 + 1)
    assert torch.all(pan[0, 5:15, 12:15] == -1)


def test_panoptic_segmentation_end_to_end():
    h, w = 24, 40
    sem = torch.full((1, h, w), ROAD, dtype=torch.int64)
    sem[0, 8:16, 4:14] = CAR
    sem[0, 8:16, 24:36] = CAR
    a, b = (12, 9), (12, 30)
    heat = (_blob(h, w, *a) + _blob(h, w, *b, peak=0.7)).unsqueeze(0)
    off = _offsets_to(h, w, lambda y, x: a if x < 19 else b)
    pan, centres = panoptic_segmentation(sem, heat, off, stuff_area=100)
    assert _as_list(centres[0]) == [a, b]
    expected = torch.zeros(1, h, w, dtype=torch.int64)
    expected[0, 8:16, 4:14] = CAR * 1000 + 1
    expected[0, 8:16, 24:36] = CAR * 1000 + 2
    assert torch.equal(pan, expected)


def test_post_processing_rejects_bad_shapes():
    with pytest.raises(ValueError):
        find_instance_center(torch.zeros(2, 5, 5))
    with pytest.raises(ValueError):
        find_instance_center(torch.zeros(1, 5, 5), nms_kernel=4)
    with pytest.raises(ValueError):
        group_pixels(torch.zeros(3, 3), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError):
        panoptic_segmentation(torch.zeros(1, 5, 5, dtype=torch.int64), torch.zeros(1, 5, 6), torch.zeros(2, 5, 5))


# --- model and loader -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model = PanopticDeepLab().eval()
    with torch.no_grad():  # non-trivial BN statistics, so the round trip checks them too
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def weights_file(random_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("pdl") / "random_pdl.pth"
    torch.save(random_model.state_dict(), path)
    yield path
    path.unlink(missing_ok=True)


def _shape_only(sd):
    """Same names and shapes, (almost) no bytes: every tensor is a broadcast 0-d zero."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in sd.items()}


def test_state_dict_follows_the_detectron2_layout(random_model):
    sd = random_model.state_dict()
    expected = {
        "backbone.stem.conv1.weight": (64, 3, 3, 3),
        "backbone.stem.conv3.norm.weight": (128,),
        "backbone.res2.0.conv1.weight": (64, 128, 1, 1),
        "backbone.res2.0.conv1.norm.running_var": (64,),
        "backbone.res2.0.shortcut.weight": (256, 128, 1, 1),
        "backbone.res4.5.conv3.weight": (1024, 256, 1, 1),
        "backbone.res5.2.conv2.weight": (512, 512, 3, 3),
        "sem_seg_head.decoder.res5.project_conv.convs.4.1.bias": (256,),
        "sem_seg_head.decoder.res5.project_conv.project.weight": (256, 1280, 1, 1),
        "sem_seg_head.decoder.res3.fuse_conv.0.weight": (256, 320, 3, 3),
        "sem_seg_head.predictor.weight": (19, 256, 1, 1),
        "ins_embed_head.decoder.res2.fuse_conv.1.weight": (128, 128, 3, 3),
        "ins_embed_head.center_predictor.weight": (1, 32, 1, 1),
        "ins_embed_head.offset_predictor.bias": (2,),
        "pixel_mean": (3, 1, 1),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert "backbone.res4.6.conv1.weight" not in sd  # ResNet-50: 6 blocks in res4
    assert not any(k.startswith("backbone.fc") or k.startswith("backbone.res5.3") for k in sd)
    res5 = random_model.backbone.res5
    assert [blk.conv2.dilation for blk in res5] == [(2, 2), (4, 4), (8, 8)]
    assert res5[0].conv2.stride == (1, 1)


@torch.no_grad()
def test_forward_shapes_batch_and_odd_size(random_model):
    out = random_model(torch.rand(2, 3, 36, 52) * 255)  # not multiples of 16: padded and cropped
    assert set(out) == {"sem_logits", "center", "offset"}
    assert out["sem_logits"].shape == (2, 19, 36, 52)
    assert out["center"].shape == (2, 1, 36, 52)
    assert out["offset"].shape == (2, 2, 36, 52)
    assert all(torch.isfinite(t).all() for t in out.values())
    with pytest.raises(ValueError):
        random_model(torch.rand(1, 1, 32, 32))


@torch.no_grad()
def test_forward_constant_predictors_give_known_maps(random_model):
    """With zero predictor weights the outputs are the biases, up-sampled; offsets are scaled by
    the decoder stride (4) into input pixels."""
    sem_p = random_model.sem_seg_head.predictor
    ctr_p = random_model.ins_embed_head.center_predictor
    off_p = random_model.ins_embed_head.offset_predictor
    saved = [p.detach().clone() for p in (sem_p.weight, sem_p.bias, ctr_p.weight, ctr_p.bias,
                                          off_p.weight, off_p.bias)]
    try:
        for p in (sem_p.weight, ctr_p.weight, off_p.weight):
            p.zero_()
        sem_p.bias.copy_(torch.arange(19.0) * -0.1)
        sem_p.bias[7] = 1.0
        ctr_p.bias.fill_(0.25)
        off_p.bias.copy_(torch.tensor([1.5, -2.0]))
        out = random_model(torch.rand(1, 3, 20, 24) * 255)
    finally:
        for p, v in zip((sem_p.weight, sem_p.bias, ctr_p.weight, ctr_p.bias, off_p.weight, off_p.bias), saved):
            p.copy_(v)
    assert torch.all(out["sem_logits"].argmax(1) == 7)
    assert torch.allclose(out["sem_logits"][0, 7], torch.ones(20, 24))
    assert torch.allclose(out["center"], torch.full((1, 1, 20, 24), 0.25))
    assert torch.allclose(out["offset"][0, 0], torch.full((20, 24), 6.0))
    assert torch.allclose(out["offset"][0, 1], torch.full((20, 24), -8.0))


def test_round_trip_through_the_strict_loader(random_model, weights_file):
    loaded = load_panoptic_deeplab(weights_file)
    assert not loaded.training
    assert loaded.config["stem"] == "deeplab" and loaded.config["dsconv"] is False
    ref = random_model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_model_wrapper_and_optional_buffers(random_model, tmp_path):
    sd = _shape_only(random_model.state_dict())
    for k in [k for k in sd if k.endswith("num_batches_tracked")] + ["pixel_mean", "pixel_std"]:
        del sd[k]
    path = tmp_path / "wrapped.pth"
    torch.save({"model": sd, "iteration": 5}, path)
    loaded = load_panoptic_deeplab(path)
    assert float(loaded.sem_seg_head.predictor.weight.detach().abs().sum()) == 0.0  # the file's zeros were loaded
    assert torch.allclose(loaded.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))


def test_detectron2_pkl_dsconv_basic_stem(tmp_path):
    torch.manual_seed(1)
    model = PanopticDeepLab(dsconv=True, stem="basic")
    sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": sd, "__author__": "test"}, fh)
    try:
        loaded = load_panoptic_deeplab(path)
        assert loaded.config["dsconv"] is True and loaded.config["stem"] == "basic"
        assert "sem_seg_head.head.pointwise.weight" in sd and "ins_embed_head.center_head.1.weight" in sd
        got = loaded.state_dict()
        for k, v in sd.items():
            assert np.array_equal(got[k].numpy(), v), k
    finally:
        path.unlink()


def test_missing_key_raises_naming_the_file(random_model, tmp_path):
    sd = _shape_only(random_model.state_dict())
    del sd["sem_seg_head.predictor.bias"]
    path = tmp_path / "missing_key.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        load_panoptic_deeplab(path)
    assert str(path) in str(err.value)
    assert "1 missing" in str(err.value) and "sem_seg_head.predictor.bias" in str(err.value)


def test_wrong_shape_raises_naming_the_file(random_model, tmp_path):
    sd = _shape_only(random_model.state_dict())
    sd["sem_seg_head.predictor.weight"] = torch.zeros(20, 256, 1, 1)  # a 20-class predictor
    sd["sem_seg_head.predictor.bias"] = torch.zeros(20)
    path = tmp_path / "wrong_shape.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(WeightsError) as err:
        load_panoptic_deeplab(path)
    msg = str(err.value)
    assert str(path) in msg and "2 with the wrong shape" in msg
    assert "sem_seg_head.predictor.weight: file (20, 256, 1, 1) != model (19, 256, 1, 1)" in msg


def test_unexpected_key_raises(random_model, tmp_path):
    sd = _shape_only(random_model.state_dict())
    sd["sem_seg_head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "unexpected.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="1 unexpected.*sem_seg_head.extra.weight"):
        load_panoptic_deeplab(path)


def test_unreadable_files_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_panoptic_deeplab(tmp_path / "nope.pkl")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pkl"):
        load_panoptic_deeplab(junk)
    marker = tmp_path / "pwned"

    class Evil:  # unpickling this would call os.mkdir(marker)
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"a": Evil()}}))
    with pytest.raises(WeightsError, match="evil.pkl"):
        load_panoptic_deeplab(evil)
    assert not marker.exists()  # the global was refused, not called


# --- backend -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend(weights_file):
    return PanopticDeepLabBackend(str(weights_file), device="cpu", input_size=(64, 48))


def test_backend_labels_are_the_semantic_argmax(backend):
    assert isinstance(backend, SegmentationBackend) and backend.name == "panoptic_deeplab"
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # already input_size
    labels = backend(rgb)
    assert labels.dtype == np.uint8 and labels.shape == (48, 64)
    expected = backend.outputs(rgb)["sem_logits"][0].argmax(0).numpy()
    assert np.array_equal(labels, expected.astype(np.uint8))
    with pytest.raises(ImageLoadError):
        backend(rgb.astype(np.float32))
    with pytest.raises(ImageLoadError):
        backend.segment_panoptic(rgb[..., 0])


def test_backend_labels_at_another_size(backend):
    rgb = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    labels = backend(rgb)
    assert labels.dtype == np.uint8 and labels.shape == (50, 70)
    assert int(labels.max()) <= 18


def test_backend_panoptic_with_known_network_outputs(backend, monkeypatch):
    """Replace the network by fixed outputs at input_size (48 x 64) to check the backend's own
    steps: argmax, post-processing, stuff_area scaling and the resize back (here exactly x2)."""
    h, w = 48, 64
    logits = torch.zeros(1, 19, h, w)
    logits[0, ROAD] = 1.0
    logits[0, CAR, :, 40:] = 2.0         # a car on the right
    logits[0, SIDEWALK, :4, :8] = 3.0    # 32 px of sidewalk (128 px in the 96 x 128 image)
    outputs = {"sem_logits": logits, "center": _blob(h, w, 24, 52).view(1, 1, h, w),
               "offset": torch.zeros(1, 2, h, w)}
    seen = []

    def fake_model(x):
        seen.append(tuple(x.shape))
        return outputs

    monkeypatch.setattr(backend, "model", fake_model)
    rgb = np.zeros((96, 128, 3), dtype=np.uint8)
    labels, pan = backend.segment_panoptic(rgb, stuff_area=100)   # 100 image px -> 25 network px
    assert seen == [(1, 3, 48, 64)]
    small = np.full((h, w), ROAD, dtype=np.int64)
    small[:, 40:] = CAR * 1000 + 1
    small[:4, :8] = SIDEWALK * 1000
    assert np.array_equal(pan, small.repeat(2, 0).repeat(2, 1))
    sem_small = logits[0].argmax(0).numpy().astype(np.uint8)
    assert np.array_equal(labels, sem_small.repeat(2, 0).repeat(2, 1))
    pan = backend.panoptic(rgb, stuff_area=200)                     # 50 network px > 32: void
    assert np.all(pan[:8, :16] == -1) and np.all(pan[8:, :80] == ROAD * 1000)
    # at a non-integer factor too, the panoptic path resizes exactly like backend(rgb)
    odd = np.zeros((61, 83, 3), dtype=np.uint8)
    labels_odd, pan_odd = backend.segment_panoptic(odd, stuff_area=100)
    assert np.array_equal(backend(odd), labels_odd) and labels_odd.shape == pan_odd.shape == (61, 83)
    assert np.array_equal(pan_odd // 1000, np.where(pan_odd < 0, -1, labels_odd.astype(np.int64)))
