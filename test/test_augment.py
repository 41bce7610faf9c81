"""Unit tests of vpr_localizer.training.augment: photometric day-to-night simulation and day jitter."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vpr_localizer.errors import ImageLoadError
from vpr_localizer.training import augment as aug

from conftest import require_file


@pytest.fixture(scope="module")
def day_image(datasets_dir) -> np.ndarray:
    path = require_file(datasets_dir / "gardens_point_mini" / "images" / "p0_v0_day.jpg")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _rb_ratio(img: np.ndarray) -> float:
    img = np.asarray(img, np.float64)
    return float(img[..., 0].mean() / img[..., 2].mean())


def test_simulate_night_dtype_shape_and_darkness(day_image):
    assert day_image.mean() > 80  # a real day image (guards the comparison below)
    for seed in (0, 1, 2):
        night = aug.simulate_night(day_image, np.random.default_rng(seed))
        assert night.dtype == np.uint8 and night.shape == day_image.shape
        assert night.mean() < 0.5 * day_image.mean(), seed


def test_simulate_night_is_deterministic_per_seed(day_image):
    a = aug.simulate_night(day_image, np.random.default_rng(7))
    b = aug.simulate_night(day_image, np.random.default_rng(7))
    c = aug.simulate_night(day_image, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_strength_zero_is_identity_and_strength_scales(day_image):
    zero = aug.simulate_night(day_image, np.random.default_rng(0), strength=0.0)
    assert np.abs(zero.astype(int) - day_image.astype(int)).max() <= 1
    half = aug.simulate_night(day_image, np.random.default_rng(0), strength=0.5, light="sodium")
    full = aug.simulate_night(day_image, np.random.default_rng(0), strength=1.0, light="sodium")
    assert full.mean() < half.mean() < day_image.mean()


def test_color_temperature_moves_rb_ratio_in_documented_direction(day_image):
    lin = aug.to_linear(aug.to_float(day_image))
    before = _rb_ratio(lin)
    for seed in range(3):
        sodium, used = aug.color_temperature(lin, np.random.default_rng(seed), light="sodium")
        blue, used_b = aug.color_temperature(lin, np.random.default_rng(seed), light="blue")
        assert used == "sodium" and used_b == "blue"
        assert _rb_ratio(sodium) > 1.3 * before
        assert _rb_ratio(blue) < 0.8 * before
    # the random choice is one of the two, and both occur
    picks = {aug.color_temperature(lin[:4, :4], np.random.default_rng(s))[1] for s in range(20)}
    assert picks == {"sodium", "blue"}


def test_simulate_night_light_choice_shows_in_output(day_image):
    before = _rb_ratio(day_image)
    sodium = aug.simulate_night(day_image, np.random.default_rng(3), light="sodium")
    blue = aug.simulate_night(day_image, np.random.default_rng(3), light="blue")
    assert _rb_ratio(sodium) > 1.2 * before
    assert _rb_ratio(blue) < before / 1.1


def test_noise_is_stronger_in_dark_regions():
    h, w = 64, 128
    enc = np.empty((h, w, 3), np.float32)
    enc[:, : w // 2] = 0.05   # dark half
    enc[:, w // 2:] = 0.6     # bright half
    lin = aug.to_linear(enc)
    for seed in range(3):
        out = aug.to_uint8(aug.to_encoded(aug.sensor_noise(lin, np.random.default_rng(seed)))).astype(float)
        var_dark = out[:, : w // 2].var()
        var_bright = out[:, w // 2:].var()
        assert var_bright > 1.0            # there is noise in the bright half too
        assert var_dark > 2.0 * var_bright, (seed, var_dark, var_bright)
    # the noise pattern itself comes from the given generator
    r1 = aug.sensor_noise(lin, np.random.default_rng(1)) - lin
    r2 = aug.sensor_noise(lin, np.random.default_rng(2)) - lin
    assert abs(np.corrcoef(r1.ravel(), r2.ravel())[0, 1]) < 0.2
    none = aug.sensor_noise(lin, np.random.default_rng(0), strength=0.0)
    np.testing.assert_array_equal(none, lin)


def test_glare_adds_bright_pixels(day_image):
    rng = np.random.default_rng(5)
    dark = aug.to_linear(aug.darken(aug.to_float(day_image), rng))
    before = aug.to_uint8(aug.to_encoded(dark))
    assert (before >= 250).all(axis=-1).sum() == 0   # darkening leaves no near-white pixel
    glared = aug.to_uint8(aug.to_encoded(aug.add_glare(dark, rng, light="sodium")))
    assert (glared >= 250).all(axis=-1).sum() > 10
    assert glared.astype(float).mean() > before.astype(float).mean()


def test_bloom_spreads_light_around_bright_pixels():
    lin = np.zeros((256, 256, 3), np.float32)
    lin[126:130, 126:130] = 5.0                # a saturated light, no blobs added
    for seed in range(3):
        out = aug.add_glare(lin, np.random.default_rng(seed), num_lights=0)
        assert out[128, 136].min() > 1e-3      # 8 px from the light, was black
        assert out[5, 5].max() < 0.1 * out[128, 136].min()  # falls off with distance
    np.testing.assert_array_equal(aug.add_glare(np.zeros((8, 8, 3), np.float32),
                                                np.random.default_rng(0), num_lights=0),
                                  np.zeros((8, 8, 3), np.float32))


def test_blur_smooths_edges():
    lin = np.zeros((480, 480, 3), np.float32)
    lin[:, 240:] = 1.0
    for seed in range(3):
        out = aug.blur(lin, np.random.default_rng(seed), strength=1.0)
        assert out.shape == lin.shape and out.dtype == np.float32
        row = out[240, :, 0]
        assert 0.02 < row[239] < 0.98 or 0.02 < row[240] < 0.98, seed  # the step is softened
        assert row[0] == 0.0 and abs(row[-1] - 1.0) < 1e-5          # far from it, untouched
    assert abs(float(out.mean()) - float(lin.mean())) < 0.02  # blur preserves brightness
    np.testing.assert_array_equal(aug.blur(lin, np.random.default_rng(0), strength=0.0), lin)


def test_darken_lowers_every_pixel_and_keeps_order():
    x = np.linspace(0.0, 1.0, 30, dtype=np.float32).reshape(1, 10, 3)
    y = aug.darken(x, np.random.default_rng(0))
    assert (y <= x + 1e-7).all()
    assert (np.diff(y.ravel()) >= 0).all()
    assert float(y.max()) < 0.5


def test_random_photometric_is_mild_and_deterministic(day_image):
    a = aug.random_photometric(day_image, np.random.default_rng(1))
    b = aug.random_photometric(day_image, np.random.default_rng(1))
    c = aug.random_photometric(day_image, np.random.default_rng(2))
    assert a.dtype == np.uint8 and a.shape == day_image.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 0.5
    diff = np.abs(a.astype(float) - day_image.astype(float)).mean()
    assert 0.5 < diff < 40.0
    assert abs(a.mean() - day_image.mean()) < 0.35 * day_image.mean()


def test_rejects_bad_arguments(day_image):
    rng = np.random.default_rng(0)
    with pytest.raises(ImageLoadError):
        aug.simulate_night(day_image.astype(np.float32), rng)
    with pytest.raises(ImageLoadError):
        aug.simulate_night(day_image[..., :2], rng)
    with pytest.raises(TypeError):
        aug.simulate_night(day_image, np.random.RandomState(0))
    with pytest.raises(ValueError):
        aug.simulate_night(day_image, rng, strength=-1.0)
    with pytest.raises(ValueError):
        aug.simulate_night(day_image, rng, light="green")
