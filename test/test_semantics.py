"""Unit tests of vpr_localizer.segmentation.classes (class table, coarse mapping, weights, palette,
overlay), .registry (backends by name, option checking, ``none``) and .base (the network-backend
base class: one pipeline, one RGB validator, one label resize). No ROS, no data files: the
network backends are built from "shape-only" checkpoints (right names and shapes, no values)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vpr_localizer.errors import ConfigError, ImageLoadError, VprError, WeightsError
from vpr_localizer.segmentation import classes as sem
from vpr_localizer.segmentation import registry
from vpr_localizer.segmentation.base import SegmentationBackend, backend_input_size, resize_labels

ALL_IDS = np.arange(256, dtype=np.uint8).reshape(16, 16)

# trainId -> expected coarse class, written out by hand (the spec, not the implementation).
EXPECTED_COARSE = {
    0: "STATIC", 1: "STATIC", 2: "STATIC", 3: "STATIC", 4: "STATIC", 5: "STATIC", 6: "STATIC",
    7: "STATIC", 8: "STATIC", 9: "STATIC", 10: "SKY", 11: "DYNAMIC", 12: "DYNAMIC", 13: "DYNAMIC",
    14: "DYNAMIC", 15: "DYNAMIC", 16: "DYNAMIC", 17: "DYNAMIC", 18: "DYNAMIC", 19: "IGNORE", 255: "IGNORE",
}


def test_train_id_names_match_weights_readme():
    assert len(sem.TRAIN_ID_NAMES) == 20
    assert sem.TRAIN_ID_NAMES[0] == "road"
    assert sem.TRAIN_ID_NAMES[2] == "building"
    assert sem.TRAIN_ID_NAMES[10] == "sky"
    assert sem.TRAIN_ID_NAMES[11] == "person"
    assert sem.TRAIN_ID_NAMES[13] == "car"
    assert sem.TRAIN_ID_NAMES[18] == "bicycle"
    assert sem.TRAIN_ID_NAMES[19] == "background/ignore"
    assert sem.NUM_CLASSES == 19 and sem.IGNORE_ID == 19


@pytest.mark.parametrize("train_id,coarse", sorted(EXPECTED_COARSE.items()))
def test_coarse_class_of_every_train_id(train_id, coarse):
    assert sem.coarse_class(train_id) is sem.Coarse[coarse]
    labels = np.full((2, 3), train_id, np.uint8)
    assert (sem.coarse_labels(labels) == sem.Coarse[coarse]).all()


def test_values_outside_the_table_are_ignore():
    out = sem.coarse_labels(ALL_IDS)
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    assert (out.ravel()[19:] == sem.Coarse.IGNORE).all()
    assert sem.coarse_class(-1) is sem.Coarse.IGNORE and sem.coarse_class(1000) is sem.Coarse.IGNORE
    wide = np.array([[-5, 0, 300, 13]], dtype=np.int32)
    np.testing.assert_array_equal(sem.coarse_labels(wide), [[3, 0, 3, 1]])


def test_coarse_fractions():
    labels = np.array([[0, 13, 10, 19], [2, 2, 11, 255]], np.uint8)
    f = sem.coarse_fractions(labels)
    assert f == {"static": 3 / 8, "dynamic": 2 / 8, "sky": 1 / 8, "ignore": 2 / 8}
    assert all(type(v) is float for v in f.values())


def test_static_weight_defaults():
    w = sem.static_weight(ALL_IDS)
    assert w.dtype == np.float32 and w.shape == ALL_IDS.shape
    flat = w.ravel()
    np.testing.assert_array_equal(flat[:10], 1.0)   # static structure
    assert flat[10] == sem.DEFAULT_SKY_WEIGHT == 0.0  # sky (documented choice)
    np.testing.assert_array_equal(flat[11:19], 0.0)  # dynamic
    np.testing.assert_array_equal(flat[19:], 1.0)    # ignore (19, 255, ...)


def test_static_weight_custom_values():
    labels = np.array([[0, 10, 13, 19, 255]], np.uint8)
    w = sem.static_weight(labels, dynamic_weight=0.25, sky_weight=0.5, ignore_weight=0.75)
    np.testing.assert_array_equal(w, np.array([[1.0, 0.5, 0.25, 0.75, 0.75]], np.float32))


def test_none_backend_labels_give_uniform_weight():
    rgb = np.zeros((4, 6, 3), np.uint8)
    labels = registry.make_backend("none")(rgb)
    np.testing.assert_array_equal(sem.static_weight(labels), np.ones((4, 6), np.float32))


@pytest.mark.parametrize("kwargs", [{"dynamic_weight": -0.1}, {"sky_weight": float("nan")},
                                    {"ignore_weight": float("inf")}])
def test_static_weight_rejects_bad_weights(kwargs):
    with pytest.raises(ValueError):
        sem.static_weight(np.zeros((2, 2), np.uint8), **kwargs)


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 1), np.uint8), np.zeros((2, 2), np.float32), [[0, 1]]])
def test_label_validation(bad):
    with pytest.raises(ValueError):
        sem.static_weight(bad)
    with pytest.raises(ValueError):
        sem.colorize(bad)


# Official cityscapesScripts colours (helpers/labels.py), independent of the module's table.
OFFICIAL = {0: (128, 64, 128), 1: (244, 35, 232), 2: (70, 70, 70), 8: (107, 142, 35), 10: (70, 130, 180),
            11: (220, 20, 60), 13: (0, 0, 142), 18: (119, 11, 32)}


def test_colorize_official_palette():
    labels = np.array([list(OFFICIAL)], np.uint8)
    rgb = sem.colorize(labels)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(OFFICIAL), 3)
    for i, tid in enumerate(OFFICIAL):
        assert tuple(int(v) for v in rgb[0, i]) == OFFICIAL[tid], sem.TRAIN_ID_NAMES[tid]


def test_colorize_ignore_is_black_and_palette_distinct():
    rgb = sem.colorize(ALL_IDS).reshape(-1, 3)
    np.testing.assert_array_equal(rgb[19:], 0)
    assert len({tuple(c) for c in rgb[:19].tolist()}) == 19
    assert len(sem.CITYSCAPES_COLORS) == 19


def test_overlay_blend_arithmetic():
    rgb = np.array([[[10, 200, 30], [100, 100, 100], [0, 0, 0], [255, 255, 255]]], np.uint8)
    labels = np.array([[0, 13, 19, 255]], np.uint8)  # road, car, ignore, ignore
    out = sem.overlay(rgb, labels, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    # 0.5 * (10, 200, 30) + 0.5 * (128, 64, 128) = (69, 132, 79)
    np.testing.assert_array_equal(out[0, 0], [69, 132, 79])
    # 0.5 * (100, 100, 100) + 0.5 * (0, 0, 142) = (50, 50, 121)
    np.testing.assert_array_equal(out[0, 1], [50, 50, 121])
    # ignore pixels keep the camera pixel
    np.testing.assert_array_equal(out[0, 2:], rgb[0, 2:])


def test_overlay_alpha_extremes_and_general_formula():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    labels = rng.integers(0, 19, (8, 9), dtype=np.uint8)
    np.testing.assert_array_equal(sem.overlay(rgb, labels, 0.0), rgb)
    np.testing.assert_array_equal(sem.overlay(rgb, labels, 1.0), sem.colorize(labels))
    ref = 0.3 * sem.colorize(labels).astype(np.float64) + 0.7 * rgb.astype(np.float64)
    assert np.abs(sem.overlay(rgb, labels, 0.3).astype(np.float64) - ref).max() <= 0.5 + 1e-4


def test_overlay_rejects_bad_input():
    rgb = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="differ"):
        sem.overlay(rgb, np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        sem.overlay(rgb, np.zeros((2, 3), np.uint8), alpha=1.5)
    with pytest.raises(ImageLoadError):  # the same RGB check as the backends
        sem.overlay(rgb.astype(np.float32), np.zeros((2, 3), np.uint8))
    with pytest.raises(ImageLoadError):
        sem.overlay(np.zeros((0, 3, 3), np.uint8), np.zeros((0, 3), np.uint8))


def test_none_backend():
    backend = registry.make_backend("none", weights=None, device="auto", input_size=(512, 256))
    assert backend.name == "none"
    assert isinstance(backend, registry.NoSegmentation)
    rgb = np.full((5, 7, 3), 128, np.uint8)
    labels = backend(rgb)
    assert labels.dtype == np.uint8 and labels.shape == (5, 7)
    assert (labels == 19).all()
    assert registry.make_backend(" NONE ").name == "none"


def test_registry_imports_no_network_module():
    """``none`` needs neither torch nor the networks: the registry imports them lazily."""
    import subprocess
    import sys

    code = ("import sys; from vpr_localizer.segmentation.registry import make_backend; "
            "import numpy as np; make_backend('none')(np.zeros((2, 2, 3), np.uint8)); "
            "bad = [m for m in ('torch', 'vpr_localizer.segmentation.base', 'vpr_localizer.segmentation.espnet', "
            "'vpr_localizer.segmentation.espnetv2', 'vpr_localizer.segmentation.panoptic') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["espnetv2", "espnet", "panoptic_deeplab"])
def test_network_backends_need_a_weight_file(name, tmp_path):
    with pytest.raises(WeightsError, match=f"{name} needs weights"):
        registry.make_backend(name, device="cpu")
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="missing.pth"):
        registry.make_backend(name, weights=missing, device="cpu")


def test_unknown_backend_raises_weights_error_listing_known_ones():
    with pytest.raises(WeightsError, match="'deeplabv9'") as info:
        registry.make_backend("deeplabv9")
    assert "none" in str(info.value) and "espnetv2" in str(info.value)
    assert isinstance(info.value, VprError)
    assert registry.backend_names() == ("none", "espnetv2", "espnet", "panoptic_deeplab")


@pytest.mark.parametrize("name,typo", [("none", "input_sise"), ("espnetv2", "weigths"), ("espnet", "decodr"),
                                       ("panoptic_deeplab", "resize")])
def test_unknown_option_raises_config_error_naming_it(name, typo, tmp_path):
    """A typo is an error, not silently dropped (checked before any weights are read)."""
    with pytest.raises(ConfigError) as info:
        registry.make_backend(name, weights=str(tmp_path / "never_read.pth"), device="cpu", **{typo: 1})
    msg = str(info.value)
    assert repr(typo) in msg and name in msg
    accepted = registry.backend_options(name)
    assert set(accepted) >= {"weights", "device", "input_size"}
    assert all(opt in msg for opt in accepted)  # the accepted ones are listed
    assert isinstance(info.value, ValueError) and isinstance(info.value, VprError)


def test_espnet_only_options():
    assert registry.backend_options("espnet") == ("weights", "device", "input_size", "decoder", "resize")
    assert registry.backend_options("espnetv2") == ("weights", "device", "input_size")


def test_register_backend():
    class Constant:
        name = "constant_test"

        def __call__(self, rgb):
            return np.full(rgb.shape[:2], 2, np.uint8)

    registry.register_backend("constant_test", lambda **kw: Constant())
    try:
        b = registry.make_backend("Constant_Test", anything=1)  # **kw factory: it checks its options
        assert b.name == "constant_test"
        assert (b(np.zeros((2, 2, 3), np.uint8)) == 2).all()
        assert registry.backend_options("constant_test") is None
    finally:
        registry._REGISTRY.pop("constant_test", None)

    def strict_factory(weights=None, level=1):
        return Constant()

    registry.register_backend("strict_test", strict_factory)
    try:
        with pytest.raises(ConfigError, match="'levle'.*accepted: weights, level"):
            registry.make_backend("strict_test", levle=2)
    finally:
        registry._REGISTRY.pop("strict_test", None)


# --- one RGB validator for every backend ---------------------------------------------------------

def _shape_only_checkpoint(model: torch.nn.Module, path):
    """Save ``model``'s tensor names and shapes with no data (each a broadcast 0-d zero): the
    strict loaders accept it, the backends build, nothing meaningful can be computed."""
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def every_backend(tmp_path_factory):
    from vpr_localizer.segmentation.espnet import ESPNetSegmentation
    from vpr_localizer.segmentation.espnetv2 import ESPNetv2Segmentation
    from vpr_localizer.segmentation.panoptic.model import PanopticDeepLab

    tmp = tmp_path_factory.mktemp("shape_only")
    with torch.device("meta"):  # no memory, no init: only names and shapes are needed
        pdl = PanopticDeepLab()
    files = {"espnetv2": _shape_only_checkpoint(ESPNetv2Segmentation(), tmp / "espnetv2.pth"),
             "espnet": _shape_only_checkpoint(ESPNetSegmentation(), tmp / "espnet.pth"),
             "panoptic_deeplab": _shape_only_checkpoint(pdl, tmp / "pdl.pth")}
    backends = {"none": registry.make_backend("none")}
    for name, path in files.items():
        backends[name] = registry.make_backend(name, weights=path, device="cpu", input_size=(64, 32))
    return backends


INVALID_IMAGES = {
    "float32": np.zeros((8, 8, 3), np.float32),
    "2-D": np.zeros((8, 8), np.uint8),
    "empty": np.zeros((0, 8, 3), np.uint8),
    "4 channels": np.zeros((8, 8, 4), np.uint8),
    "list": [[[0, 0, 0]]],
}


@pytest.mark.parametrize("bad", sorted(INVALID_IMAGES))
@pytest.mark.parametrize("name", ["none", "espnetv2", "espnet", "panoptic_deeplab"])
def test_invalid_image_raises_image_load_error_from_every_backend(every_backend, name, bad):
    backend = every_backend[name]
    assert backend.name == name
    with pytest.raises(ImageLoadError):
        backend(INVALID_IMAGES[bad])


def test_network_backends_share_the_base_class(every_backend):
    for name in ("espnetv2", "espnet", "panoptic_deeplab"):
        b = every_backend[name]
        assert isinstance(b, SegmentationBackend)
        assert b.input_size == (64, 32) and b.device == torch.device("cpu") and b.weights_path.endswith(".pth")
        assert name in repr(b) or type(b).__name__ in repr(b)
    assert not isinstance(every_backend["none"], SegmentationBackend)


@pytest.mark.parametrize("name,size,match", [("espnetv2", (8, 8), "at least 16x16"),
                                             ("espnet", (100, 64), "multiples of 8"),
                                             ("panoptic_deeplab", ("a", 3), "width, height"),
                                             ("espnetv2", (512,), "width, height")])
def test_bad_input_size_raises_config_error(name, size, match):
    with pytest.raises(ConfigError, match=match):
        registry.make_backend(name, weights="never_read.pth", device="cpu", input_size=size)


def test_backend_input_size():
    assert backend_input_size("x", (512.0, 256)) == (512, 256)
    assert backend_input_size("x", [8, 16], minimum=8, multiple=8) == (8, 16)
    with pytest.raises(ConfigError, match="x input_size"):
        backend_input_size("x", (12, 16), multiple=8)


# --- the base class: a subclass implements two hooks ---------------------------------------------

#: 3-class label map the fake network "predicts" at its 16x16 input size.
FAKE_SMALL = ((np.arange(16)[:, None] // 4 + np.arange(16)[None, :] // 8) % 3).astype(np.uint8)


class _FakeBackend(SegmentationBackend):
    """Only a name and the two hooks: logits are one-hot scores of FAKE_SMALL."""

    name = "fake"

    def preprocess(self, rgb):
        self.seen_shapes.append(rgb.shape)
        return self.image_tensor(self.resize_input(rgb))

    def logits(self, x):
        self.inference_mode.append(torch.is_inference_mode_enabled())
        assert tuple(x.shape) == (1, 3, 16, 16) and x.dtype == torch.float32
        return torch.nn.functional.one_hot(torch.from_numpy(FAKE_SMALL).long(), 3).permute(2, 0, 1)[None].float()


def _fake(**kw):
    b = _FakeBackend("unused.pth", device="cpu", input_size=(16, 16), **kw)
    b.seen_shapes, b.inference_mode = [], []
    return b


def test_subclass_with_two_hooks_gives_argmax_resized_back():
    b = _fake()
    labels = b(np.zeros((32, 48, 3), np.uint8))  # x2 rows, x3 columns
    assert labels.dtype == np.uint8 and labels.shape == (32, 48)
    np.testing.assert_array_equal(labels, FAKE_SMALL.repeat(2, 0).repeat(3, 1))
    assert b.inference_mode == [True]
    same = b(np.zeros((16, 16, 3), np.uint8))  # already the network size: no resize
    np.testing.assert_array_equal(same, FAKE_SMALL)
    odd = b(np.zeros((7, 23, 3), np.uint8))  # non-integer factors: PIL's nearest neighbour
    expected = np.asarray(Image.fromarray(FAKE_SMALL).resize((23, 7), Image.NEAREST))
    np.testing.assert_array_equal(odd, expected)
    assert b.seen_shapes == [(32, 48, 3), (16, 16, 3), (7, 23, 3)]
    assert repr(b) == "_FakeBackend(weights='unused.pth', device='cpu', input_size=(16, 16))"


def test_subclass_constructor_checks():
    with pytest.raises(WeightsError, match="fake needs weights"):
        _FakeBackend(None)
    with pytest.raises(ConfigError, match="at least 16x16"):
        _FakeBackend("unused.pth", device="cpu", input_size=(4, 4))
    with pytest.raises(ConfigError, match="device"):
        _FakeBackend("unused.pth", device="gpu7")
    assert _FakeBackend("unused.pth", device="cpu").input_size == (1024, 512)  # the default


def test_subclass_must_implement_both_hooks():
    class NoLogits(SegmentationBackend):
        name = "half"

        def preprocess(self, rgb):
            return torch.zeros(1, 3, 16, 16)

    with pytest.raises(TypeError, match="logits"):
        NoLogits("unused.pth", device="cpu")


def test_bad_logits_shape_is_reported():
    b = _fake()
    b.logits = lambda x: torch.zeros(3, 16, 16)  # batch dimension missing
    with pytest.raises(ValueError, match=r"\(1, C, h, w\)"):
        b(np.zeros((16, 16, 3), np.uint8))


@pytest.mark.parametrize("n_in,n_out", [(2, 7), (512, 640), (256, 480), (1024, 2048), (37, 53), (640, 512), (5, 1)])
def test_resize_labels_is_pil_nearest(n_in, n_out):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    labels = rng.integers(0, 20, (n_in, max(1, n_in // 2 + 1)), dtype=np.uint8)
    h, w = n_out, max(1, n_out // 3 + 1)
    expected = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
    np.testing.assert_array_equal(resize_labels(labels, h, w), expected)
    wide = labels.astype(np.int64) * 1000 - 1  # any dtype: the same pixels are picked
    np.testing.assert_array_equal(resize_labels(wide, h, w), expected.astype(np.int64) * 1000 - 1)


def test_resize_labels_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_labels(np.zeros((0, 3), np.uint8), 2, 2)
    with pytest.raises(ValueError):
        resize_labels(np.zeros((2, 3), np.uint8), 0, 2)
