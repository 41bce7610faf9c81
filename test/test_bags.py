"""rosbag2 writing and reading with rosbags (vpr_localizer.io.bags) on the real lund_gps photos."""
from __future__ import annotations

import logging
import math
import os
import shutil

import numpy as np
import pytest

from vpr_localizer.io import bags
from vpr_localizer.errors import DatasetError
from vpr_localizer.io.image_msgs import compressed_to_rgb, image_to_rgb
from vpr_localizer.io.image_files import load_image, read_exif_gps
from vpr_localizer.io.records import ImageRecord, load_records

RATE_HZ = 4.0
START_S = 1_700_000_000.0
START_NS = 1_700_000_000 * 10**9
PERIOD_NS = 250_000_000


@pytest.fixture(scope="module")
def lund5(datasets_dir):
    recs = load_records(str(datasets_dir / "lund_gps"), gps="exif")[:5]
    assert len(recs) == 5 and all(r.has_geodetic for r in recs)
    return recs


@pytest.fixture(scope="module")
def broken_jpg(tmp_path_factory):
    p = tmp_path_factory.mktemp("broken") / "broken.jpg"
    p.write_bytes(b"")
    return p


@pytest.fixture(scope="module", params=["sqlite3", "mcap"])
def lund_bag(request, lund5, broken_jpg, tmp_path_factory):
    """5 real images + a zero-byte JPEG (third) -> bag at 4 Hz; returns (path, summary, records)."""
    broken = ImageRecord(path=str(broken_jpg), name="broken.jpg", lat=55.7, lon=13.19)
    recs = lund5[:2] + [broken] + lund5[2:]
    out = tmp_path_factory.mktemp(f"bag_{request.param}") / "lund"
    summary = bags.make_bag(recs, str(out), rate_hz=RATE_HZ, storage=request.param,
                            start_time_s=START_S, progress=False)
    return out, summary, request.param


@pytest.fixture(scope="module")
def lund_msgs(lund_bag):
    return list(bags.read_bag(lund_bag[0]))


def test_bag_info_counts_images_and_fixes(lund_bag):
    path, _, _ = lund_bag
    info = bags.bag_info(path)
    assert info["topics"] == {
        "/camera/image_raw": {"msgtype": "sensor_msgs/msg/Image", "count": 5},
        "/gps/fix": {"msgtype": "sensor_msgs/msg/NavSatFix", "count": 5},
    }
    assert info["message_count"] == 10
    assert info["start_ns"] == START_NS
    assert info["end_ns"] == START_NS + 4 * PERIOD_NS
    assert info["duration_s"] == pytest.approx(1.0)


def test_storage_file_and_atomic_write(lund_bag):
    path, summary, storage = lund_bag
    ext = ".db3" if storage == "sqlite3" else ".mcap"
    assert sorted(os.listdir(path)) == sorted(["metadata.yaml", "lund" + ext])
    assert os.listdir(path.parent) == ["lund"]  # no temporary sibling left behind
    assert summary["storage"] == storage and summary["path"] == str(path)


def test_summary_reports_skipped_zero_byte_image(lund_bag, broken_jpg):
    _, summary, _ = lund_bag
    assert summary["messages"] == {"/camera/image_raw": 5, "/gps/fix": 5}
    assert summary["images_written"] == 5
    assert [s["name"] for s in summary["skipped"]] == ["broken.jpg"]
    assert summary["skipped"][0]["path"] == str(broken_jpg)
    assert "empty" in summary["skipped"][0]["reason"]
    assert summary["duration_s"] == pytest.approx(1.0)


def test_timestamps_spaced_by_one_over_rate(lund_msgs):
    img = [(t, m) for topic, _, t, m in lund_msgs if topic == "/camera/image_raw"]
    fix = [(t, m) for topic, _, t, m in lund_msgs if topic == "/gps/fix"]
    times = [t for t, _ in img]
    assert times == [START_NS + k * PERIOD_NS for k in range(5)]
    assert np.all(np.diff(times) == int(1e9 / RATE_HZ))
    for t, m in img + fix:  # header stamp == bag time
        assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == t
    assert [t for t, _ in fix] == times  # a fix at the same stamp as each image
    ordered = [t for _, _, t, _ in lund_msgs]
    assert ordered == sorted(ordered)


def test_image_messages_decode_to_original_pixels(lund_msgs, lund5):
    imgs = [m for topic, mt, _, m in lund_msgs if topic == "/camera/image_raw"]
    assert len(imgs) == 5
    for msg, rec in zip(imgs, lund5):
        assert msg.header.frame_id == "camera"
        assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", 768, 1024, 3072)
        out = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
        np.testing.assert_array_equal(out, load_image(rec.path))


def test_navsatfix_equals_exif(lund_msgs, lund5):
    fixes = [m for topic, _, _, m in lund_msgs if topic == "/gps/fix"]
    assert len(fixes) == 5
    for msg, rec in zip(fixes, lund5):
        lat, lon, alt = read_exif_gps(rec.path)
        assert msg.latitude == lat and msg.longitude == lon
        assert (msg.latitude, msg.longitude) == (rec.lat, rec.lon)
        if alt is None:
            assert math.isnan(msg.altitude)
        else:
            assert msg.altitude == alt
        assert msg.header.frame_id == "gps"
        assert msg.status.status == 0  # STATUS_FIX
        assert msg.position_covariance_type == 0  # COVARIANCE_TYPE_UNKNOWN
    assert len({(m.latitude, m.longitude) for m in fixes}) == 5  # a walk: distinct positions


def test_skipped_image_logs_warning_naming_file(lund5, broken_jpg, tmp_path, caplog):
    recs = [lund5[0], ImageRecord(path=str(broken_jpg), name="broken.jpg", lat=55.7, lon=13.19)]
    with caplog.at_level(logging.WARNING, logger="vpr_localizer.io.bags"):
        summary = bags.make_bag(recs, str(tmp_path / "b"), progress=False, size_wh=(64, 48))
    assert any(str(broken_jpg) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert summary["messages"] == {"/camera/image_raw": 1, "/gps/fix": 1}
    assert len(summary["skipped"]) == 1


def test_existing_out_path_raises_and_is_left_alone(lund5, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="exists"):
        bags.make_bag(lund5[:1], str(out), progress=False)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_all_images_unreadable_raises_and_leaves_nothing(broken_jpg, tmp_path):
    recs = [ImageRecord(path=str(broken_jpg), name="broken.jpg", lat=55.7, lon=13.19)]
    with pytest.raises(DatasetError, match="none of the 1 images"):
        bags.make_bag(recs, str(tmp_path / "b"), progress=False)
    assert os.listdir(tmp_path) == []


def test_compressed_mode_round_trip_within_jpeg_tolerance(lund5, tmp_path):
    out = tmp_path / "c"
    summary = bags.make_bag(lund5[:2], str(out), storage="mcap", compressed=True, progress=False)
    assert summary["msgtypes"]["/camera/image_raw"] == "sensor_msgs/msg/CompressedImage"
    info = bags.bag_info(out)
    assert info["topics"]["/camera/image_raw"] == {"msgtype": "sensor_msgs/msg/CompressedImage", "count": 2}
    imgs = [m for _, _, _, m in bags.read_bag(out, topics=["/camera/image_raw"])]
    assert len(imgs) == 2
    for msg, rec in zip(imgs, lund5):
        assert msg.format == "jpeg" and msg.header.frame_id == "camera"
        out_rgb = compressed_to_rgb(msg.format, msg.data)
        orig = load_image(rec.path)
        assert out_rgb.shape == orig.shape
        assert np.abs(out_rgb.astype(np.int16) - orig.astype(np.int16)).mean() < 3.0


def test_xy_only_records_write_odometry_in_map_frame(lund5, tmp_path):
    recs = [ImageRecord(path=r.path, name=r.name, x=10.0 * i, y=-2.5 * i, yaw=(0.5 if i else None))
            for i, r in enumerate(lund5[:2])]
    out = tmp_path / "odom"
    bags.make_bag(recs, str(out), size_wh=(64, 48), progress=False)
    info = bags.bag_info(out)
    assert set(info["topics"]) == {"/camera/image_raw", "/odom"}
    assert info["topics"]["/odom"] == {"msgtype": "nav_msgs/msg/Odometry", "count": 2}
    odo = [m for _, _, _, m in bags.read_bag(out, topics=["/odom"])]
    assert [m.header.frame_id for m in odo] == ["map", "map"]
    assert [(m.pose.pose.position.x, m.pose.pose.position.y) for m in odo] == [(0.0, 0.0), (10.0, -2.5)]
    q = odo[1].pose.pose.orientation
    assert 2 * math.atan2(q.z, q.w) == pytest.approx(0.5)
    assert odo[0].pose.covariance[35] > 1e6 and odo[1].pose.covariance[35] == 0.0
    imgs = [m for _, _, _, m in bags.read_bag(out, topics=["/camera/image_raw"])]
    assert (imgs[0].width, imgs[0].height) == (64, 48)


def test_read_bag_topic_filter(lund_bag):
    topics = {topic for topic, _, _, _ in bags.read_bag(lund_bag[0], topics=["/gps/fix"])}
    assert topics == {"/gps/fix"}
    assert list(bags.read_bag(lund_bag[0], topics=["/nope"])) == []


def test_missing_and_corrupt_bags_raise_dataset_error(lund_bag, tmp_path):
    path, _, storage = lund_bag
    with pytest.raises(DatasetError, match="not found"):
        bags.bag_info(tmp_path / "missing")
    with pytest.raises(DatasetError, match="not found"):
        bags.read_bag(tmp_path / "missing")  # raises at call time, not at first next()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="metadata.yaml"):
        bags.bag_info(tmp_path / "empty")
    bad = tmp_path / "trunc"
    shutil.copytree(path, bad)
    f = next(p for p in bad.iterdir() if p.name != "metadata.yaml")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DatasetError, match="cannot open bag"):
        bags.bag_info(bad)
    with pytest.raises(DatasetError, match="cannot open bag"):
        list(bags.read_bag(bad))


def test_invalid_parameters(lund5, tmp_path):
    with pytest.raises(ValueError, match="storage"):
        bags.make_bag(lund5[:1], str(tmp_path / "a"), storage="rosbag1", progress=False)
    with pytest.raises(ValueError, match="rate_hz"):
        bags.make_bag(lund5[:1], str(tmp_path / "b"), rate_hz=0, progress=False)
    with pytest.raises(DatasetError, match="no image records"):
        bags.make_bag([], str(tmp_path / "c"), progress=False)
    assert os.listdir(tmp_path) == []
