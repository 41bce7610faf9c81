"""Unit tests of vpr_localizer.segmentation.classes: class table, coarse mapping, weights, palette, overlay,
backend registry (no ROS, no data files)."""
from __future__ import annotations

import numpy as np
import pytest

from vpr_localizer.segmentation import classes as sem
from vpr_localizer.errors import VprError, WeightsError

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
    labels = sem.make_backend("none")(rgb)
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
    with pytest.raises(ValueError):
        sem.overlay(rgb.astype(np.float32), np.zeros((2, 3), np.uint8))


def test_none_backend():
    backend = sem.make_backend("none", weights=None, device="auto")
    assert backend.name == "none"
    assert isinstance(backend, sem.SegmentationBackend)
    rgb = np.full((5, 7, 3), 128, np.uint8)
    labels = backend(rgb)
    assert labels.dtype == np.uint8 and labels.shape == (5, 7)
    assert (labels == 19).all()
    assert sem.make_backend(" NONE ").name == "none"
    with pytest.raises(ValueError):
        backend(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        backend(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("name", ["espnetv2", "espnet", "panoptic_deeplab"])
def test_espnet_backends_need_a_weight_file(name, tmp_path):
    with pytest.raises(WeightsError, match="needs"):
        sem.make_backend(name, device="cpu")
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="missing.pth"):
        sem.make_backend(name, weights=missing, device="cpu")


def test_unknown_backend_raises_weights_error_listing_known_ones():
    with pytest.raises(WeightsError, match="'deeplabv9'") as info:
        sem.make_backend("deeplabv9")
    assert "none" in str(info.value) and "espnetv2" in str(info.value)
    assert isinstance(info.value, VprError)


def test_register_backend():
    class Constant:
        name = "constant_test"

        def __call__(self, rgb):
            return np.full(rgb.shape[:2], 2, np.uint8)

    sem.register_backend("constant_test", lambda **kw: Constant())
    try:
        b = sem.make_backend("constant_test")
        assert isinstance(b, sem.SegmentationBackend)
        assert (b(np.zeros((2, 2, 3), np.uint8)) == 2).all()
    finally:
        sem._REGISTRY.pop("constant_test", None)
