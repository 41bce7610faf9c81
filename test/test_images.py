"""Image decoding, resizing and EXIF GPS on the real lund_gps photos."""
from __future__ import annotations

import json

import numpy as np
import piexif
import pytest
from PIL import Image

from conftest import exif_gps_pillow
from vpr_localizer.errors import ImageLoadError, VprError
from vpr_localizer.io.image_files import load_image, read_exif_gps, resize_image, validate_rgb


@pytest.fixture(scope="module")
def lund_jpg(datasets_dir, data_file):
    return data_file(datasets_dir / "lund_gps" / "01.jpg")


def test_load_real_jpeg(lund_jpg):
    img = load_image(lund_jpg)
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8
    assert img.shape == (768, 1024, 3)
    # same pixels as a plain Pillow decode (RGB order, not BGR)
    with Image.open(lund_jpg) as im:
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(img, ref)
    assert img.std() > 10  # a real photo, not a blank


def test_load_image_accepts_str_path(lund_jpg):
    assert load_image(str(lund_jpg)).shape == (768, 1024, 3)


def test_zero_byte_jpeg_raises_naming_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, VprError)


def test_truncated_jpeg_raises_naming_file(tmp_path, lund_jpg):
    data = lund_jpg.read_bytes()
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_text_file_named_png_raises_naming_file(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a PNG image\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_missing_file_raises_naming_file(tmp_path):
    p = tmp_path / "does_not_exist.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_image(p)
    assert str(p) in str(info.value)


def _mapillary_position(path):
    """Latitude/longitude from the Mapillary JSON in the EXIF ImageDescription tag (a record
    independent of the EXIF GPS IFD)."""
    exif = piexif.load(str(path))
    desc = exif["0th"][piexif.ImageIFD.ImageDescription]
    meta = json.loads(desc.decode("utf-8") if isinstance(desc, bytes) else desc)
    return float(meta["MAPLatitude"]), float(meta["MAPLongitude"])


def test_read_exif_gps_matches_image_description(lund_jpg):
    gps = read_exif_gps(lund_jpg)
    assert gps is not None
    lat, lon, alt = gps
    assert lat == pytest.approx(55.698, abs=1e-3)
    assert lon == pytest.approx(13.19, abs=1e-2)
    ref_lat, ref_lon = _mapillary_position(lund_jpg)
    assert lat == pytest.approx(ref_lat, abs=1e-4)
    assert lon == pytest.approx(ref_lon, abs=1e-4)
    # the altitude (metres, above sea level) as an independent EXIF reader (Pillow) gives it
    assert alt == pytest.approx(exif_gps_pillow(lund_jpg)[2], abs=1e-9) and alt == pytest.approx(37.0)


def test_read_exif_gps_all_lund_images_agree_with_description(datasets_dir):
    files = sorted((datasets_dir / "lund_gps").glob("*.jpg"))
    assert len(files) >= 20, f"expected the lund_gps photos in {datasets_dir / 'lund_gps'}"
    for f in files:
        lat, lon, _ = read_exif_gps(f)
        ref_lat, ref_lon = _mapillary_position(f)
        assert abs(lat - ref_lat) < 1e-4 and abs(lon - ref_lon) < 1e-4, f


def test_read_exif_gps_southern_western_refs(tmp_path, lund_jpg):
    """S/W references flip the sign (GPS tags rewritten on a copy of a real photo)."""
    exif = piexif.load(str(lund_jpg))
    exif["GPS"][piexif.GPSIFD.GPSLatitudeRef] = b"S"
    exif["GPS"][piexif.GPSIFD.GPSLongitudeRef] = b"W"
    exif["GPS"][piexif.GPSIFD.GPSAltitude] = (125, 10)
    exif["GPS"][piexif.GPSIFD.GPSAltitudeRef] = 1  # below sea level
    exif.pop("thumbnail", None)
    exif["1st"] = {}
    out = tmp_path / "sw.jpg"
    piexif.insert(piexif.dump(exif), str(lund_jpg), str(out))
    ref_lat, ref_lon = _mapillary_position(lund_jpg)
    lat, lon, alt = read_exif_gps(out)
    assert lat == pytest.approx(-ref_lat, abs=1e-4)
    assert lon == pytest.approx(-ref_lon, abs=1e-4)
    assert alt == pytest.approx(-12.5)


def test_read_exif_gps_png_without_exif_is_none(tmp_path):
    p = tmp_path / "plain.png"
    Image.fromarray(np.full((8, 12, 3), 77, np.uint8)).save(p)
    assert read_exif_gps(p) is None


def test_read_exif_gps_jpeg_without_gps_is_none(tmp_path):
    p = tmp_path / "nogps.jpg"
    Image.fromarray(np.full((8, 12, 3), 77, np.uint8)).save(p, quality=90)
    assert read_exif_gps(p) is None


def test_resize_to_requested_width_height(lund_jpg):
    img = load_image(lund_jpg)
    out = resize_image(img, (320, 240))
    assert out.shape == (240, 320, 3) and out.dtype == np.uint8
    # bilinear downscale keeps the mean colour close
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), img.reshape(-1, 3).mean(0), atol=3.0)
    tall = resize_image(img, (100, 300))  # (W, H) not (H, W)
    assert tall.shape == (300, 100, 3)
    same = resize_image(img, (1024, 768))
    np.testing.assert_array_equal(same, img)


@pytest.mark.parametrize("bad", [
    np.zeros((10, 10, 3), np.float32),   # float image
    np.zeros((10, 10), np.uint8),        # 2-D
    np.zeros((10, 0, 3), np.uint8),      # zero width
    np.zeros((0, 10, 3), np.uint8),      # zero height
    np.zeros((10, 10, 4), np.uint8),     # RGBA
    [[[0, 0, 0]]],                       # not an ndarray
], ids=["float", "2d", "zero_width", "zero_height", "rgba", "list"])
def test_resize_rejects_bad_arrays(bad):
    with pytest.raises(ImageLoadError):
        resize_image(bad, (4, 4))
    with pytest.raises(ImageLoadError):
        validate_rgb(bad)


def test_validate_rgb_accepts_good_image():
    validate_rgb(np.zeros((2, 3, 3), np.uint8))  # does not raise
