"""sensor_msgs/Image and CompressedImage fields <-> NumPy (vpr_localizer.io.image_msgs) on real photos."""
from __future__ import annotations

import array

import numpy as np
import pytest
from PIL import Image

from vpr_localizer.errors import ImageLoadError, VprError
from vpr_localizer.io.image_msgs import (
    SUPPORTED_DECODE_ENCODINGS,
    compressed_to_rgb,
    descriptor_to_fields,
    fields_to_descriptor,
    image_to_rgb,
    labels_to_mono8_fields,
    rgb_to_compressed,
    rgb_to_image_fields,
    rgb_to_luma,
)
from vpr_localizer.io.image_files import load_image


@pytest.fixture(scope="module")
def lund_path(datasets_dir, data_file):
    return data_file(datasets_dir / "lund_gps" / "01.jpg")


@pytest.fixture(scope="module")
def photo(lund_path):
    """The full 1024x768 real photo, uint8 RGB."""
    img = load_image(lund_path)
    assert img.shape == (768, 1024, 3) and img.std() > 10
    return img


@pytest.fixture(scope="module")
def crop(photo):
    """An odd-sized crop (odd sizes catch width/height mix-ups)."""
    return np.ascontiguousarray(photo[101:178, 203:334])  # 77 x 131


def _pack(rgb: np.ndarray, enc: str, pad: int = 0, bigendian: bool = False):
    """Test-side reference packer: raw message bytes for ``enc`` plus the expected decode."""
    h, w, _ = rgb.shape
    gray = rgb_to_luma(rgb)
    if enc == "rgb8":
        pix, expect = rgb, rgb
    elif enc == "bgr8":
        pix, expect = rgb[:, :, ::-1], rgb
    elif enc in ("rgba8", "bgra8"):
        alpha = (rgb[:, :, :1] ^ 0x5A)  # a non-constant alpha channel that must be dropped
        base = rgb if enc == "rgba8" else rgb[:, :, ::-1]
        pix, expect = np.concatenate([base, alpha], axis=2), rgb
    elif enc == "mono8":
        pix, expect = gray, np.repeat(gray[:, :, None], 3, axis=2)
    elif enc == "mono16":
        # high byte = gray, low byte = noise that the >> 8 scaling must discard
        v = (gray.astype(np.uint16) << 8) | rgb[:, :, 2].astype(np.uint16)
        pix = v.astype(">u2" if bigendian else "<u2").view(np.uint8).reshape(h, w, 2)
        expect = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        raise AssertionError(enc)
    rows = np.ascontiguousarray(pix).reshape(h, -1)
    if pad:
        rows = np.concatenate([rows, np.full((h, pad), 0xAB, dtype=np.uint8)], axis=1)
    return rows.shape[1], rows.tobytes(), expect


# --- image_to_rgb / rgb_to_image_fields -------------------------------------------------------

def test_supported_encodings_listed():
    assert set(SUPPORTED_DECODE_ENCODINGS) == {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"}


def test_rgb8_round_trip_exact_on_full_photo(photo):
    f = rgb_to_image_fields(photo, "rgb8")
    assert (f["height"], f["width"], f["encoding"], f["is_bigendian"]) == (768, 1024, "rgb8", 0)
    assert f["step"] == 1024 * 3
    assert isinstance(f["data"], bytes) and len(f["data"]) == f["step"] * f["height"]
    out = image_to_rgb(f["encoding"], f["height"], f["width"], f["step"], f["is_bigendian"], f["data"])
    assert out.dtype == np.uint8 and out.shape == photo.shape
    np.testing.assert_array_equal(out, photo)
    assert out.flags.writeable


def test_bgr8_round_trip_exact_and_really_swapped(photo):
    f = rgb_to_image_fields(photo, "bgr8")
    assert f["encoding"] == "bgr8" and f["step"] == 1024 * 3
    raw = np.frombuffer(f["data"], np.uint8).reshape(768, 1024, 3)
    np.testing.assert_array_equal(raw[:, :, 0], photo[:, :, 2])  # first byte is blue
    np.testing.assert_array_equal(raw[:, :, 2], photo[:, :, 0])
    out = image_to_rgb("bgr8", f["height"], f["width"], f["step"], 0, f["data"])
    np.testing.assert_array_equal(out, photo)


def test_mono8_uses_itu601_luma_bit_identical_to_pillow(photo):
    f = rgb_to_image_fields(photo, "mono8")
    assert f["encoding"] == "mono8" and f["step"] == 1024
    gray = np.frombuffer(f["data"], np.uint8).reshape(768, 1024)
    ref = np.asarray(Image.fromarray(photo).convert("L"))
    np.testing.assert_array_equal(gray, ref)
    out = image_to_rgb("mono8", 768, 1024, 1024, 0, f["data"])
    np.testing.assert_array_equal(out, np.repeat(ref[:, :, None], 3, axis=2))
    # mono8 round trip is exact: re-encoding the decoded gray image gives the same bytes
    assert rgb_to_image_fields(out, "mono8")["data"] == f["data"]


@pytest.mark.parametrize("enc", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
@pytest.mark.parametrize("pad", [0, 13])
def test_every_encoding_with_and_without_row_padding(crop, enc, pad):
    h, w, _ = crop.shape
    step, data, expect = _pack(crop, enc, pad)
    out = image_to_rgb(enc, h, w, step, 0, data)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expect)


def test_row_padding_is_ignored_not_read_as_pixels(crop):
    h, w, _ = crop.shape
    step, data, _ = _pack(crop, "rgb8", pad=5)
    assert step == w * 3 + 5
    out = image_to_rgb("rgb8", h, w, step, 0, data)
    np.testing.assert_array_equal(out, crop)
    # reading the same bytes as if unpadded must not give the image (the padding shifts rows)
    with pytest.raises(ImageLoadError):
        image_to_rgb("rgb8", h, w, w * 3, 0, data)


def test_mono16_big_endian_honoured(crop):
    h, w, _ = crop.shape
    step, data, expect = _pack(crop, "mono16", pad=3, bigendian=True)
    out = image_to_rgb("mono16", h, w, step, 1, data)
    np.testing.assert_array_equal(out, expect)
    # the flag matters: the same bytes read as little-endian give the noise byte instead
    wrong = image_to_rgb("mono16", h, w, step, 0, data)
    assert not np.array_equal(wrong, expect)
    np.testing.assert_array_equal(wrong[:, :, 0], crop[:, :, 2])
    out_bool = image_to_rgb("mono16", h, w, step, True, data)
    np.testing.assert_array_equal(out_bool, expect)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "array", "ndarray", "ndarray3d"])
def test_data_container_types(crop, kind):
    """rclpy hands array.array('B'), rosbags a numpy array; both (and plain buffers) work."""
    h, w, _ = crop.shape
    raw = rgb_to_image_fields(crop)["data"]
    data = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "array": array.array("B", raw),
        "ndarray": np.frombuffer(raw, np.uint8),
        "ndarray3d": crop.copy(),
    }[kind]
    out = image_to_rgb("rgb8", h, w, w * 3, 0, data)
    np.testing.assert_array_equal(out, crop)


def test_decoded_image_does_not_alias_message_buffer(crop):
    h, w, _ = crop.shape
    buf = bytearray(rgb_to_image_fields(crop)["data"])
    out = image_to_rgb("rgb8", h, w, w * 3, 0, buf)
    buf[:] = b"\x00" * len(buf)
    np.testing.assert_array_equal(out, crop)


def test_encoding_name_is_case_insensitive(crop):
    h, w, _ = crop.shape
    data = rgb_to_image_fields(crop, "bgr8")["data"]
    np.testing.assert_array_equal(image_to_rgb("BGR8", h, w, w * 3, 0, data), crop)


# --- errors ------------------------------------------------------------------------------------

def test_unsupported_encoding_lists_supported(crop):
    h, w, _ = crop.shape
    with pytest.raises(ImageLoadError) as info:
        image_to_rgb("yuv422", h, w, w * 2, 0, b"\x00" * (w * 2 * h))
    msg = str(info.value)
    assert "yuv422" in msg
    for enc in SUPPORTED_DECODE_ENCODINGS:
        assert enc in msg
    assert isinstance(info.value, VprError)


def test_32fc1_is_not_an_rgb_encoding():
    with pytest.raises(ImageLoadError, match="32FC1"):
        image_to_rgb("32FC1", 1, 4, 16, 0, b"\x00" * 16)


def test_width_height_not_matching_data_length_gives_both_numbers(crop):
    h, w, _ = crop.shape
    data = rgb_to_image_fields(crop)["data"]
    with pytest.raises(ImageLoadError) as info:
        image_to_rgb("rgb8", h, w + 1, (w + 1) * 3, 0, data)  # claims one column more
    msg = str(info.value)
    assert str(len(data)) in msg and str((w + 1) * 3 * h) in msg
    with pytest.raises(ImageLoadError, match=str(len(data) - 1)):
        image_to_rgb("rgb8", h, w, w * 3, 0, data[:-1])  # one byte short


@pytest.mark.parametrize("h,w", [(0, 10), (10, 0), (0, 0)])
def test_zero_size_image_raises(h, w):
    with pytest.raises(ImageLoadError, match="zero size"):
        image_to_rgb("rgb8", h, w, w * 3, 0, b"")


def test_step_smaller_than_row_raises(crop):
    h, w, _ = crop.shape
    with pytest.raises(ImageLoadError) as info:
        image_to_rgb("rgb8", h, w, w * 3 - 1, 0, b"\x00" * ((w * 3 - 1) * h))
    assert "step" in str(info.value) and str(w * 3 - 1) in str(info.value) and str(w * 3) in str(info.value)
    with pytest.raises(ImageLoadError, match="step"):
        image_to_rgb("mono16", h, w, w, 0, b"\x00" * (w * h))  # mono16 needs 2 bytes a pixel


def test_rgb_to_image_fields_rejects_bad_input(crop):
    with pytest.raises(ImageLoadError, match="rgba8"):
        rgb_to_image_fields(crop, "rgba8")
    with pytest.raises(ImageLoadError, match="uint8"):
        rgb_to_image_fields(crop.astype(np.float32))
    with pytest.raises(ImageLoadError, match=r"\(H, W, 3\)"):
        rgb_to_image_fields(crop[:, :, 0])
    with pytest.raises(ImageLoadError, match=r"\(H, W, 3\)"):
        rgb_to_image_fields(crop[:0])


# --- labels ----------------------------------------------------------------------------------------

def test_labels_to_mono8_round_trip(crop):
    labels = (rgb_to_luma(crop) // 13).astype(np.uint8)  # 0..19 like Cityscapes trainIds
    assert labels.max() > labels.min()
    f = labels_to_mono8_fields(labels)
    h, w = labels.shape
    assert (f["height"], f["width"], f["encoding"], f["step"], f["is_bigendian"]) == (h, w, "mono8", w, 0)
    out = image_to_rgb(f["encoding"], f["height"], f["width"], f["step"], 0, f["data"])
    np.testing.assert_array_equal(out[:, :, 0], labels)
    # other integer dtypes in range are accepted
    assert labels_to_mono8_fields(labels.astype(np.int64))["data"] == f["data"]


def test_labels_errors(crop):
    with pytest.raises(ImageLoadError, match="0..255"):
        labels_to_mono8_fields(np.full((4, 4), 256, dtype=np.int32))
    with pytest.raises(ImageLoadError, match=r"\(H, W\)"):
        labels_to_mono8_fields(crop)
    with pytest.raises(ImageLoadError, match="integer"):
        labels_to_mono8_fields(np.zeros((4, 4), np.float32))


# --- 32FC1 descriptors ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4096), (37, 128)])
def test_descriptor_round_trip_carries_nan_and_inf(shape):
    rng = np.random.default_rng(0)
    desc = rng.standard_normal(shape).astype(np.float32)
    desc[0, 1] = np.nan
    desc[-1, -1] = np.inf
    f = descriptor_to_fields(desc)
    assert (f["height"], f["width"], f["encoding"], f["is_bigendian"]) == (shape[0], shape[1], "32FC1", 0)
    assert f["step"] == 4 * shape[1] and len(f["data"]) == 4 * desc.size
    assert f["data"][:4] == np.float32(desc[0, 0]).astype("<f4").tobytes()  # little endian
    out = fields_to_descriptor(**f)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, desc)  # NaN positions must match too
    assert np.isnan(out[0, 1]) and np.isposinf(out[-1, -1])


def test_descriptor_1d_and_float64_input():
    d = np.linspace(-1, 1, 8)  # float64, 1-D
    f = descriptor_to_fields(d)
    assert (f["height"], f["width"]) == (1, 8)
    np.testing.assert_array_equal(fields_to_descriptor(**f)[0], d.astype(np.float32))


def test_descriptor_big_endian_and_padding():
    desc = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    rows = desc.astype(">f4").view(np.uint8).reshape(3, 16)
    data = np.concatenate([rows, np.full((3, 4), 0xFF, np.uint8)], axis=1).tobytes()
    out = fields_to_descriptor("32FC1", 3, 4, 20, 1, data)
    np.testing.assert_array_equal(out, desc)
    assert out.dtype == np.dtype(np.float32) and out.dtype.isnative
    assert not np.array_equal(fields_to_descriptor("32FC1", 3, 4, 20, 0, data), desc)


def test_descriptor_errors():
    f = descriptor_to_fields(np.ones((2, 8), np.float32))
    with pytest.raises(ImageLoadError, match="32FC1"):
        fields_to_descriptor("mono8", f["height"], f["width"], f["step"], 0, f["data"])
    with pytest.raises(ImageLoadError, match="64"):
        fields_to_descriptor("32FC1", 2, 8, 32, 0, f["data"][:-4])
    with pytest.raises(ImageLoadError, match="zero size"):
        fields_to_descriptor("32FC1", 0, 8, 32, 0, b"")
    with pytest.raises(ImageLoadError, match="floating"):
        descriptor_to_fields(np.ones((2, 8), np.int32))
    with pytest.raises(ImageLoadError, match="shape"):
        descriptor_to_fields(np.ones((2, 0), np.float32))


# --- CompressedImage ----------------------------------------------------------------------------

def test_compressed_real_jpeg_file_bytes_decode_like_load_image(lund_path, photo):
    out = compressed_to_rgb("jpeg", lund_path.read_bytes())
    np.testing.assert_array_equal(out, photo)


def test_jpeg_round_trip_within_tolerance(photo):
    fmt, data = rgb_to_compressed(photo, "jpeg", quality=90)
    assert fmt == "jpeg" and data[:2] == b"\xff\xd8"
    out = compressed_to_rgb(fmt, np.frombuffer(data, np.uint8))  # rosbags hands a numpy array
    assert out.shape == photo.shape
    err = np.abs(out.astype(np.int16) - photo.astype(np.int16))
    assert err.mean() < 3.0
    assert not np.array_equal(out, photo)  # it really went through lossy JPEG
    # lower quality, smaller file, larger error
    _, small = rgb_to_compressed(photo, "jpeg", quality=20)
    assert len(small) < len(data)


def test_png_round_trip_exact(crop):
    fmt, data = rgb_to_compressed(crop, "png")
    assert fmt == "png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(compressed_to_rgb(fmt, data), crop)


def test_compressed_errors(lund_path, crop):
    with pytest.raises(ImageLoadError, match="empty"):
        compressed_to_rgb("jpeg", b"")
    with pytest.raises(ImageLoadError, match="not a decodable"):
        compressed_to_rgb("jpeg", b"this is not an image" * 10)
    raw = lund_path.read_bytes()
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        compressed_to_rgb("jpeg", raw[: len(raw) // 2])
    with pytest.raises(ImageLoadError, match="compressedDepth"):
        compressed_to_rgb("16UC1; compressedDepth", raw)
    with pytest.raises(ImageLoadError, match="webp"):
        rgb_to_compressed(crop, "webp")
    with pytest.raises(ImageLoadError, match="quality"):
        rgb_to_compressed(crop, "jpeg", quality=0)
