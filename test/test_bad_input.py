"""Issue 12: bad input that used to be accepted (poisoning the map) or to crash with a traceback.

- non-finite / out-of-range coordinates in a CSV or EXIF: the record is skipped with a warning
  naming the file and line (CSV) or image (EXIF);
- decompression-bomb images: ImageLoadError (skipped like other unreadable images), large JPEGs
  downscaled on decode;
- absurd network input sizes: ConfigError (one line, exit 2 on the command line);
- 16-bit PNGs (files and CompressedImage): decoded to the matching 8-bit image, not white.

Every test writes its own input files from the real Lund images (no network).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import piexif
import pytest
from PIL import Image

from vpr_localizer.cli.main import main
from vpr_localizer.errors import ConfigError, DatasetError, ImageLoadError
from vpr_localizer.io import image_files
from vpr_localizer.io.image_files import (MAX_IMAGE_PIXELS, iter_image_batches, load_image, read_exif_gps)
from vpr_localizer.io.image_msgs import compressed_to_rgb
from vpr_localizer.io.records import load_records, records_from_csv, records_from_folder
from vpr_localizer.mapping.store import VprMap
from vpr_localizer.models.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE, EncoderConfig

from conftest import exif_gps_pillow


@pytest.fixture(scope="module")
def lund(datasets_dir, data_file):
    d = datasets_dir / "lund_gps"
    return lambda i: data_file(d / f"{i:02d}.jpg")


def small_png(src, dst, size=(160, 120)) -> Path:
    with Image.open(src) as im:
        im.convert("RGB").resize(size, Image.BILINEAR).save(dst)
    return Path(dst)


def write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# item 4: coordinates
# --------------------------------------------------------------------------------------------

@pytest.fixture
def four_pngs(tmp_path, lund):
    images = tmp_path / "images"
    images.mkdir()
    names = []
    for i in (1, 2, 3, 4):
        small_png(lund(i), images / f"v{i}.png")
        names.append(f"v{i}.png")
    return images, names, [exif_gps_pillow(lund(i)) for i in (1, 2, 3, 4)]


@pytest.mark.parametrize("bad", [("95", None, None), (None, "400", None), ("nan", None, None),
                                 (None, "inf", None), (None, None, "1e6"), (None, None, "-inf")])
def test_csv_bad_lat_lon_alt_row_is_skipped_with_file_and_line(four_pngs, tmp_path, caplog, bad):
    images, names, gps = four_pngs
    rows = [[n, repr(lat), repr(lon), repr(alt)] for n, (lat, lon, alt) in zip(names, gps)]
    for col, v in enumerate(bad, start=1):
        if v is not None:
            rows[2][col] = v  # CSV line 4 (header is line 1)
    csv_path = write_rows(tmp_path / "gps.csv", ["image", "lat", "lon", "alt"], rows)
    with caplog.at_level(logging.WARNING, logger="vpr_localizer.io.records"):
        recs = records_from_csv(str(csv_path), str(images))
    assert [r.name for r in recs] == [names[0], names[1], names[3]]
    assert all(math.isfinite(r.lat) and math.isfinite(r.lon) and math.isfinite(r.alt) for r in recs)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and f"{csv_path}:4" in msgs[0] and names[2] in msgs[0]


@pytest.mark.parametrize("col,value", [("x", "1e308"), ("y", "nan"), ("z", "-1e8"), ("x", "1e400"),
                                       ("yaw", "inf"), ("frame", "nan"), ("frame", "inf")])
def test_csv_bad_local_position_row_is_skipped(four_pngs, tmp_path, caplog, col, value):
    images, names, _ = four_pngs
    header = ["image", "x", "y", "z", "yaw", "frame"]
    rows = [[n, 1.0 * i, 2.0 * i, 0.5, 0.1, i] for i, n in enumerate(names)]
    rows[1][header.index(col)] = value  # CSV line 3
    csv_path = write_rows(tmp_path / "xy.csv", header, rows)
    with caplog.at_level(logging.WARNING, logger="vpr_localizer.io.records"):
        recs = records_from_csv(str(csv_path), str(images))
    assert [r.name for r in recs] == [names[0], names[2], names[3]]
    assert [(r.x, r.y) for r in recs] == [(0.0, 0.0), (2.0, 4.0), (3.0, 6.0)]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and f"{csv_path}:3" in msgs[0] and col in msgs[0]


def test_csv_all_rows_bad_is_a_dataset_error(four_pngs, tmp_path):
    images, names, _ = four_pngs
    csv_path = write_rows(tmp_path / "xy.csv", ["image", "x", "y"], [[n, "nan", 0] for n in names])
    with pytest.raises(DatasetError, match="all 4 rows skipped"):
        records_from_csv(str(csv_path), str(images))


def test_csv_edge_values_are_accepted(four_pngs, tmp_path):
    images, names, _ = four_pngs
    rows = [[names[0], 90, 180, 1e5], [names[1], -90, -180, -1e5], [names[2], 0, 0, ""]]
    csv_path = write_rows(tmp_path / "gps.csv", ["image", "lat", "lon", "alt"], rows)
    recs = records_from_csv(str(csv_path), str(images))
    assert [(r.lat, r.lon, r.alt) for r in recs] == [(90, 180, 1e5), (-90, -180, -1e5), (0, 0, None)]


def _with_exif_gps(src, dst, lat_deg, lon_deg=13, alt_m=None):
    gps = {piexif.GPSIFD.GPSLatitudeRef: b"N", piexif.GPSIFD.GPSLatitude: ((lat_deg, 1), (0, 1), (0, 1)),
           piexif.GPSIFD.GPSLongitudeRef: b"E", piexif.GPSIFD.GPSLongitude: ((lon_deg, 1), (0, 1), (0, 1))}
    if alt_m is not None:
        gps[piexif.GPSIFD.GPSAltitudeRef] = 0
        gps[piexif.GPSIFD.GPSAltitude] = (alt_m, 1)
    with Image.open(src) as im:
        im.convert("RGB").resize((160, 120)).save(dst, "JPEG", exif=piexif.dump({"GPS": gps}))
    return Path(dst)


@pytest.mark.parametrize("kw", [dict(lat_deg=200), dict(lat_deg=55, lon_deg=400), dict(lat_deg=55, alt_m=10**6)])
def test_exif_absurd_gps_image_is_skipped_with_its_name(tmp_path, lund, caplog, kw):
    images = tmp_path / "images"
    images.mkdir()
    _with_exif_gps(lund(1), images / "01.jpg", 55)
    bad = _with_exif_gps(lund(2), images / "02.jpg", **kw)
    _with_exif_gps(lund(3), images / "03.jpg", 56, alt_m=80)
    assert read_exif_gps(bad) is not None  # the raw reader still reports what the file says
    for gps in ("auto", "exif"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vpr_localizer.io.records"):
            recs = records_from_folder(str(images), gps)
        assert [r.name for r in recs] == ["01.jpg", "03.jpg"]
        assert [(r.lat, r.lon) for r in recs] == [(55, 13), (56, 13)]
        msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(msgs) == 1 and str(bad) in msgs[0]


def test_exif_all_absurd_is_a_dataset_error(tmp_path, lund):
    images = tmp_path / "images"
    images.mkdir()
    _with_exif_gps(lund(1), images / "01.jpg", 200)
    with pytest.raises(DatasetError, match="EXIF GPS out of range"):
        load_records(str(images), None, "auto")


# --------------------------------------------------------------------------------------------
# item 5: decompression bombs, large JPEGs
# --------------------------------------------------------------------------------------------

def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(path, w: int, h: int) -> Path:
    """A valid 1-bit greyscale PNG of w x h pixels, all black: huge decoded, tiny on disk."""
    row = b"\x00" * (1 + (w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(h)]
    parts.append(comp.flush())
    data = b"".join(parts)
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
           + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    Path(path).write_bytes(png)
    return Path(path)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    return {"huge": bomb_png(d / "huge.png", 30000, 30000),      # beyond Pillow's own limit
            "over": bomb_png(d / "over.png", 8000, 7000)}        # 56 MP: over ours, under Pillow's


@pytest.mark.parametrize("which", ["huge", "over"])
def test_bomb_png_file_is_an_image_load_error(bombs, which):
    path = bombs[which]
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ImageLoadError, match="too large") as ei:
        load_image(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("which", ["huge", "over"])
def test_bomb_png_compressed_image_is_an_image_load_error(bombs, which):
    with pytest.raises(ImageLoadError, match="too large"):
        compressed_to_rgb("png", bombs[which].read_bytes())


def test_bomb_is_skipped_in_batches(bombs, tmp_path, lund):
    good = [small_png(lund(i), tmp_path / f"{i}.png") for i in (1, 2)]
    paths = [str(good[0]), str(bombs["huge"]), str(bombs["over"]), str(good[1])]
    skipped = []
    batches = list(iter_image_batches(paths, (64, 48), 2, on_skip=lambda p, r: skipped.append(p)))
    assert [i for idx, _ in batches for i in idx] == [0, 3]
    assert skipped == [str(bombs["huge"]), str(bombs["over"])]


def test_limit_is_explicit_and_just_below_limit_decodes(tmp_path, monkeypatch):
    assert MAX_IMAGE_PIXELS == 50_000_000
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 200 * 100)
    ok = bomb_png(tmp_path / "ok.png", 200, 100)
    assert load_image(ok).shape == (100, 200, 3)
    big = bomb_png(tmp_path / "big.png", 201, 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(big)


def test_large_jpeg_is_downscaled_on_decode(tmp_path, lund, monkeypatch):
    # a real photo as a 1600 x 1200 JPEG, with the limit lowered to 1 MP: drafted by 2 -> 800 x 600
    with Image.open(lund(1)) as im:
        im.convert("RGB").resize((1600, 1200), Image.BILINEAR).save(tmp_path / "big.jpg", quality=90)
    full = load_image(tmp_path / "big.jpg")
    assert full.shape == (1200, 1600, 3)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 1_000_000)
    small = load_image(tmp_path / "big.jpg")
    assert small.shape == (600, 800, 3)
    ref = np.asarray(Image.fromarray(full).resize((800, 600), Image.BOX), dtype=np.float32)
    assert np.abs(small.astype(np.float32) - ref).mean() < 6.0  # same picture, half size
    fmt_data = (tmp_path / "big.jpg").read_bytes()
    assert compressed_to_rgb("jpeg", fmt_data).shape == (600, 800, 3)
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 1600 * 1200 // 100)  # needs > 8x: refused
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(tmp_path / "big.jpg")


# --------------------------------------------------------------------------------------------
# item 6: network input size
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(100000, 100000), (MAX_INPUT_SIDE + 1, 480), (640, MIN_INPUT_SIDE - 1),
                                  (0, 0), (-640, 480), (640,), (640, 480, 3), ("w", 480)])
def test_encoder_config_rejects_bad_image_size(size):
    with pytest.raises(ConfigError, match="image_size"):
        EncoderConfig(image_size=size)
    with pytest.raises(ConfigError, match="segmentation_size"):
        EncoderConfig(segmentation_size=size)


def test_encoder_config_accepts_bounds():
    assert EncoderConfig(image_size=(MIN_INPUT_SIDE, MAX_INPUT_SIDE)).image_size == (MIN_INPUT_SIDE, MAX_INPUT_SIDE)
    assert EncoderConfig.from_dict({"image_size": [640, 480]}).image_size == (640, 480)
    with pytest.raises(ConfigError):
        EncoderConfig.from_dict({"image_size": [100000, 100000]})


def test_cli_huge_image_size_is_one_line_exit_2(tmp_path, lund, vgg_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    small_png(lund(1), images / "a.png")
    rc = main(["build-map", "--images", str(images), "--gps", "none", "--out", str(tmp_path / "map"),
               "--weights", str(vgg_path), "--image-size", "100000", "100000", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vpr-localizer build-map: error:") and "4096" in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "map").exists()


# --------------------------------------------------------------------------------------------
# item 7: 16-bit PNGs
# --------------------------------------------------------------------------------------------

def gradient16(w=256, h=8) -> np.ndarray:
    return np.tile((np.arange(w, dtype=np.uint32) * 65535 // (w - 1)).astype(np.uint16), (h, 1))


def test_16bit_gray_png_file_decodes_to_8bit_gradient(tmp_path):
    g = gradient16()
    path = tmp_path / "g16.png"
    Image.fromarray(g).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    rgb = load_image(path)
    expect = (g >> 8).astype(np.uint8)
    assert rgb.shape == (8, 256, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[:, :, 0], expect) and np.array_equal(rgb[:, :, 1], expect)
    assert np.array_equal(rgb[:, :, 2], expect)
    assert rgb.min() == 0 and rgb.max() == 255 and (rgb == 255).mean() < 0.05  # not all white


def test_16bit_gray_png_compressed_image_decodes_to_8bit_gradient():
    g = gradient16(300, 5)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")
    rgb = compressed_to_rgb("png", buf.getvalue())
    assert np.array_equal(rgb, np.repeat((g >> 8).astype(np.uint8)[:, :, None], 3, axis=2))


def test_16bit_big_endian_and_mode_i_are_scaled(tmp_path):
    g = gradient16()
    im_b = Image.frombytes("I;16B", (g.shape[1], g.shape[0]), g.astype(">u2").tobytes())
    arr = image_files.pil_to_rgb(im_b)
    assert np.array_equal(arr[:, :, 0], (g >> 8).astype(np.uint8))
    im_i = Image.fromarray(g.astype(np.int32))
    assert im_i.mode == "I"
    assert np.array_equal(image_files.pil_to_rgb(im_i)[:, :, 1], (g >> 8).astype(np.uint8))


def _png16(path, arr16: np.ndarray, color_type: int) -> Path:
    """Write a 16-bit PNG (colour type 2 = RGB, 4 = grey+alpha, 6 = RGBA) by hand."""
    h, w = arr16.shape[:2]
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    Path(path).write_bytes(png)
    return Path(path)


@pytest.mark.parametrize("color_type,channels", [(2, 3), (4, 2), (6, 4)])
def test_16bit_rgb_and_alpha_pngs_decode_to_8bit(tmp_path, color_type, channels):
    g = gradient16()
    arr = np.stack([g] * channels, axis=2)
    if channels in (2, 4):
        arr[:, :, -1] = 65535  # opaque
    path = _png16(tmp_path / f"c{color_type}.png", arr, color_type)
    rgb = load_image(path)
    expect = (g >> 8).astype(np.uint8)
    for c in range(3):
        assert np.abs(rgb[:, :, c].astype(int) - expect).max() <= 1
    assert np.array_equal(compressed_to_rgb("png", path.read_bytes()), rgb)


# --------------------------------------------------------------------------------------------
# end to end: build-map with a bad CSV row and a bomb among real images
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_faiss_thread(faiss_single_thread):
    """One faiss thread (see conftest.faiss_single_thread)."""


def test_build_map_skips_bad_rows_and_bombs(four_pngs, tmp_path, vgg_path, bombs, capsys, caplog):
    images, names, gps = four_pngs
    (images / "bomb.png").write_bytes(bombs["huge"].read_bytes())
    rows = [["v1.png", "95", "13", "0"]]  # a bad first row must not become the ENU datum
    rows += [[n, repr(lat), repr(lon), repr(alt)] for n, (lat, lon, alt) in zip(names[1:], gps[1:])]
    rows.insert(2, ["v1.png", "nan", "nan", "0"])
    rows.append(["bomb.png", repr(gps[0][0]), repr(gps[0][1]), "0"])
    csv_path = write_rows(tmp_path / "gps.csv", ["image", "lat", "lon", "alt"], rows)
    out = tmp_path / "map"
    with caplog.at_level(logging.WARNING):
        rc = main(["build-map", "--images", str(images), "--csv", str(csv_path), "--out", str(out),
                   "--weights", str(vgg_path), "--image-size", "128", "96", "--clusters", "4", "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err
    assert "3 keyframes" in cap.out and "1 image(s) skipped" in cap.out
    warn = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"{csv_path}:2" in warn and f"{csv_path}:4" in warn and "bomb.png" in warn
    vmap = VprMap.load(str(out))
    assert [Path(k.image_path).name for k in vmap.keyframes] == names[1:]
    assert (vmap.datum.lat, vmap.datum.lon) == pytest.approx(gps[1][:2], abs=1e-12)
    assert all(math.isfinite(v) for k in vmap.keyframes for v in (k.x, k.y, k.z, k.lat, k.lon))
    assert all(abs(k.x) < 1000 and abs(k.y) < 1000 for k in vmap.keyframes)
