"""rosbag2 input/output with the pure-Python ``rosbags`` package (no ROS installation needed).

:func:`make_bag` packs real images and their ground truth into a rosbag2 (sqlite3 or MCAP
storage): one ``sensor_msgs/msg/Image`` (``rgb8``) or ``sensor_msgs/msg/CompressedImage``
(JPEG) per image at a fixed rate, plus a ``sensor_msgs/msg/NavSatFix`` (records with a WGS84
fix) or a ``nav_msgs/msg/Odometry`` in frame ``map`` (records with a local x/y only) at the
same stamp. :func:`read_bag` and :func:`bag_info` read any rosbag2 back (for replay and tests).

Units: times in seconds (``*_s``) or nanoseconds since the Unix epoch (``*_ns``), rates in Hz,
positions in metres, angles in radians, latitude/longitude in degrees (REP-103).

Messages are built and (de)serialised with the ``rosbags`` type store of ROS 2 Humble; the
standard message types used here have the same definitions and type hashes (RIHS01) in Humble,
Jazzy and Kilted.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.errors import DatasetError, ImageLoadError
from vpr_localizer.io.image_msgs import rgb_to_compressed, rgb_to_image_fields
from vpr_localizer.io.image_files import load_image, resize_image
from vpr_localizer.io.records import ImageRecord

LOG = logging.getLogger(__name__)

STORAGES = ("sqlite3", "mcap")

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
FIX_TYPE = "sensor_msgs/msg/NavSatFix"
ODOM_TYPE = "nav_msgs/msg/Odometry"

_TYPESTORE = None


def typestore():
    """The ``rosbags`` type store used to build and decode messages (ROS 2 Humble, cached)."""
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_typestore
        _TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
    return _TYPESTORE


def _stamp(ts, t_ns: int):
    """``builtin_interfaces/msg/Time`` for ``t_ns`` nanoseconds since the epoch."""
    Time = ts.types["builtin_interfaces/msg/Time"]
    return Time(sec=int(t_ns // 1_000_000_000), nanosec=int(t_ns % 1_000_000_000))


def _header(ts, t_ns: int, frame_id: str):
    Header = ts.types["std_msgs/msg/Header"]
    return Header(stamp=_stamp(ts, t_ns), frame_id=frame_id)


def _seconds_to_ns(t_s: float) -> int:
    """Seconds (float) to integer nanoseconds without losing the sub-microsecond part to float
    rounding of the full ``t_s * 1e9`` product."""
    whole = math.floor(t_s)
    return int(whole) * 1_000_000_000 + int(round((t_s - whole) * 1e9))


def _image_msg(ts, rgb: np.ndarray, t_ns: int, frame_id: str, compressed: bool, jpeg_quality: int):
    if compressed:
        fmt, data = rgb_to_compressed(rgb, "jpeg", jpeg_quality)
        Msg = ts.types[COMPRESSED_TYPE]
        return Msg(header=_header(ts, t_ns, frame_id), format=fmt,
                   data=np.frombuffer(data, dtype=np.uint8))
    f = rgb_to_image_fields(rgb, "rgb8")
    Msg = ts.types[IMAGE_TYPE]
    return Msg(header=_header(ts, t_ns, frame_id), height=f["height"], width=f["width"],
               encoding=f["encoding"], is_bigendian=f["is_bigendian"], step=f["step"],
               data=np.frombuffer(f["data"], dtype=np.uint8))


def _fix_msg(ts, rec: ImageRecord, t_ns: int, fix_sigma_m: Optional[float]):
    NavSatFix = ts.types[FIX_TYPE]
    NavSatStatus = ts.types["sensor_msgs/msg/NavSatStatus"]
    cov = np.zeros(9, dtype=np.float64)
    cov_type = NavSatFix.COVARIANCE_TYPE_UNKNOWN
    if fix_sigma_m is not None:
        var = float(fix_sigma_m) ** 2
        cov[0] = cov[4] = var
        cov[8] = 4.0 * var  # GNSS altitude is typically about twice as uncertain
        cov_type = NavSatFix.COVARIANCE_TYPE_APPROXIMATED
    return NavSatFix(
        header=_header(ts, t_ns, "gps"),
        status=NavSatStatus(status=NavSatStatus.STATUS_FIX, service=NavSatStatus.SERVICE_GPS),
        latitude=float(rec.lat), longitude=float(rec.lon),
        altitude=float(rec.alt) if rec.alt is not None else float("nan"),  # NaN: unknown (REP)
        position_covariance=cov, position_covariance_type=cov_type)


def _odom_msg(ts, rec: ImageRecord, t_ns: int, child_frame_id: str):
    t = ts.types
    yaw = rec.yaw
    q = t["geometry_msgs/msg/Quaternion"](
        x=0.0, y=0.0, z=math.sin(yaw / 2.0) if yaw is not None else 0.0,
        w=math.cos(yaw / 2.0) if yaw is not None else 1.0)
    pose = t["geometry_msgs/msg/Pose"](
        position=t["geometry_msgs/msg/Point"](x=float(rec.x), y=float(rec.y),
                                             z=float(rec.z) if rec.z is not None else 0.0),
        orientation=q)
    pose_cov = np.zeros(36, dtype=np.float64)
    if yaw is None:
        # orientation unknown: huge variance on roll, pitch, yaw
        pose_cov[21] = pose_cov[28] = pose_cov[35] = 1e9
    zero3 = t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
    twist = t["geometry_msgs/msg/TwistWithCovariance"](
        twist=t["geometry_msgs/msg/Twist"](linear=zero3, angular=zero3),
        covariance=np.zeros(36, dtype=np.float64))
    return t[ODOM_TYPE](header=_header(ts, t_ns, "map"), child_frame_id=child_frame_id,
                        pose=t["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=pose_cov),
                        twist=twist)


def make_bag(records: Sequence[ImageRecord], out_path: str, rate_hz: float = 2.0,
             storage: str = "sqlite3", image_topic: str = "/camera/image_raw",
             fix_topic: str = "/gps/fix", frame_id: str = "camera", compressed: bool = False,
             start_time_s: float = 1_700_000_000.0, progress: bool = True,
             odom_topic: str = "/odom", jpeg_quality: int = 90,
             size_wh: Optional[Tuple[int, int]] = None, fix_sigma_m: Optional[float] = None,
             version: int = 8) -> dict:
    """Pack images and their ground truth into a new rosbag2 directory.

    For the k-th readable image (k = 0, 1, ...) the bag time and every ``header.stamp`` is
    ``start_time_s + k / rate_hz``. Per image:

    - ``image_topic``: ``sensor_msgs/msg/Image`` ``rgb8`` (or, with ``compressed``,
      ``sensor_msgs/msg/CompressedImage`` with ``format="jpeg"``), ``header.frame_id=frame_id``;
    - records with lat/lon: ``fix_topic``: ``sensor_msgs/msg/NavSatFix`` in frame ``gps``,
      status ``STATUS_FIX`` / ``SERVICE_GPS``, altitude NaN when unknown, covariance type
      ``UNKNOWN`` (or ``APPROXIMATED`` with ``fix_sigma_m``);
    - records with x/y but no lat/lon: ``odom_topic``: ``nav_msgs/msg/Odometry`` in frame ``map``
      with ``child_frame_id=frame_id``, orientation from ``yaw`` (identity and a 1e9 rad^2
      orientation variance when unknown), zero twist.

    Unreadable images (:func:`vpr_localizer.io.image_files.load_image` raises ImageLoadError) are
    skipped with a logged warning naming the file, and listed in the summary; the remaining
    images keep the uniform spacing. The bag is written into a temporary sibling directory and
    renamed to ``out_path`` only when complete, so ``out_path`` never holds a partial bag.

    Args:
        records: images in playback order.
        out_path: bag directory to create (must not exist). The storage file inside is
            ``<name>.db3`` or ``<name>.mcap`` after the directory name.
        rate_hz: image rate (Hz, > 0).
        storage: ``sqlite3`` or ``mcap``.
        image_topic, fix_topic, odom_topic: topic names.
        frame_id: camera frame of the image headers.
        compressed: write JPEG ``CompressedImage`` (quality ``jpeg_quality``) instead of raw.
        start_time_s: time of the first message, seconds since the Unix epoch.
        progress: show a tqdm progress bar (stderr).
        size_wh: optional (width, height) in pixels to resize every image to.
        fix_sigma_m: optional horizontal GNSS standard deviation (m) for the fix covariance.
        version: rosbag2 metadata version, 8 (Jazzy and later read it) or 9 (Kilted).

    Returns:
        Summary dict: ``path`` (absolute), ``storage``, ``messages`` (topic -> count),
        ``msgtypes`` (topic -> type), ``images_written``, ``skipped`` (list of
        ``{"path", "name", "reason"}``), ``start_ns``, ``end_ns``, ``duration_s`` (first to last
        message), ``rate_hz``, ``compressed``.

    Raises:
        DatasetError: ``out_path`` exists, ``records`` is empty, no image is readable, or the
            bag cannot be written.
        ValueError: invalid ``rate_hz``, ``storage`` or ``version``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
    from vpr_localizer.progress import progress_bar

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a finite number > 0, got {rate_hz!r}")
    if version not in (8, 9):
        raise ValueError(f"rosbag2 version must be 8 or 9, got {version!r}")
    out = Path(out_path).absolute()
    if out.exists() or out.is_symlink():
        raise DatasetError(f"bag output path exists already, not overwriting: {out}")
    records = list(records)
    if not records:
        raise DatasetError("no image records to write into the bag")
    out.parent.mkdir(parents=True, exist_ok=True)

    ts = typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    start_ns = _seconds_to_ns(float(start_time_s))
    period_ns = 1e9 / float(rate_hz)
    img_type = COMPRESSED_TYPE if compressed else IMAGE_TYPE

    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp_bag = tmpdir / out.name  # same name inside, so the storage file is named after out_path
    counts: dict = {}
    msgtypes: dict = {}
    skipped: List[dict] = []
    stamps: List[int] = []
    try:
        writer = Writer(tmp_bag, version=version, storage_plugin=plugin)
        conns: dict = {}

        def write(topic: str, msgtype: str, msg, t_ns: int) -> None:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
                msgtypes[topic] = msgtype
                counts[topic] = 0
            writer.write(conns[topic], t_ns, bytes(ts.serialize_cdr(msg, msgtype)))
            counts[topic] += 1

        with writer:
            bar = progress_bar(records, desc="make-bag", unit="img", disable=not progress, leave=False)
            for rec in bar:
                try:
                    rgb = load_image(rec.path)
                    if size_wh is not None:
                        rgb = resize_image(rgb, size_wh)
                except ImageLoadError as exc:
                    LOG.warning("skipping unreadable image %s: %s", rec.path, exc)
                    skipped.append({"path": rec.path, "name": rec.name, "reason": str(exc)})
                    continue
                t_ns = start_ns + int(round(len(stamps) * period_ns))
                write(image_topic, img_type, _image_msg(ts, rgb, t_ns, frame_id, compressed, jpeg_quality), t_ns)
                if rec.has_geodetic:
                    write(fix_topic, FIX_TYPE, _fix_msg(ts, rec, t_ns, fix_sigma_m), t_ns)
                elif rec.has_position:
                    write(odom_topic, ODOM_TYPE, _odom_msg(ts, rec, t_ns, frame_id), t_ns)
                stamps.append(t_ns)
            bar.close()
            if not stamps:
                raise DatasetError(f"none of the {len(records)} images could be read; "
                                   f"first error: {skipped[0]['reason']}")
        if out.exists():
            raise DatasetError(f"bag output path appeared while writing, not overwriting: {out}")
        os.rename(tmp_bag, out)
    except WriterError as exc:
        raise DatasetError(f"cannot write bag {out}: {exc}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot write bag {out}: {exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    summary = {
        "path": str(out), "storage": storage, "messages": dict(counts), "msgtypes": dict(msgtypes),
        "images_written": len(stamps), "skipped": skipped, "start_ns": stamps[0], "end_ns": stamps[-1],
        "duration_s": (stamps[-1] - stamps[0]) / 1e9, "rate_hz": float(rate_hz), "compressed": bool(compressed),
    }
    LOG.info("wrote bag %s (%s): %s; %d image(s) skipped", out, storage,
             ", ".join(f"{k}: {v}" for k, v in counts.items()), len(skipped))
    return summary


def _bag_errors():
    from rosbags.highlevel import AnyReaderError
    from rosbags.rosbag1 import ReaderError as Reader1Error
    from rosbags.rosbag2 import ReaderError as Reader2Error
    from rosbags.serde import SerdeError
    return (AnyReaderError, Reader1Error, Reader2Error, SerdeError, OSError, sqlite3.Error,
            KeyError, ValueError, TypeError, EOFError)


def _open_reader(path: str | os.PathLike):
    from rosbags.highlevel import AnyReader

    p = Path(path)
    if not p.exists():
        raise DatasetError(f"bag not found: {p}")
    if p.is_dir() and not (p / "metadata.yaml").is_file():
        raise DatasetError(f"{p} is not a rosbag2 directory: metadata.yaml is missing")
    try:
        reader = AnyReader([p], default_typestore=typestore())
        reader.open()
    except _bag_errors() as exc:
        raise DatasetError(f"cannot open bag {p}: {exc}") from exc
    return reader


def read_bag(path: str | os.PathLike, topics: Optional[Sequence[str]] = None
             ) -> Iterator[Tuple[str, str, int, object]]:
    """Iterate over the messages of a rosbag2 (directory, ``.db3`` or ``.mcap`` file).

    The bag is opened when this function is called (so a missing or unreadable bag raises
    at once); the returned iterator closes it when exhausted or closed.

    Args:
        path: bag directory (with ``metadata.yaml``) or a single storage file.
        topics: only these topics (default: all).

    Returns:
        Iterator of ``(topic, msgtype, timestamp_ns, msg)`` in bag-time order; ``timestamp_ns``
        is the bag (receive) time in nanoseconds since the epoch; ``msg`` is the deserialised
        ``rosbags`` message object (e.g. ``msg.header.stamp.sec``, ``msg.data`` as a numpy
        array). Types come from the definitions stored in the bag (Humble type store as
        fallback).

    Raises:
        DatasetError: the bag is missing or corrupt (at call time), or a message cannot be read
            or decoded (when iteration reaches it).
    """
    reader = _open_reader(path)
    wanted = None if topics is None else set(topics)
    conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
    return _iter_messages(reader, conns, path, wanted is not None and not conns)


def _iter_messages(reader, conns, path, empty: bool):
    errors = _bag_errors()
    try:
        if empty:
            return
        try:
            for conn, t_ns, raw in reader.messages(connections=conns):
                yield conn.topic, conn.msgtype, int(t_ns), reader.deserialize(raw, conn.msgtype)
        except errors as exc:
            raise DatasetError(f"cannot read bag {path}: {exc}") from exc
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001 - closing a broken reader must not mask the real error
            pass


def bag_info(path: str | os.PathLike) -> dict:
    """Summarise a rosbag2 from its metadata (no message is decoded).

    Args:
        path: bag directory or storage file.

    Returns:
        ``{"topics": {topic: {"msgtype": str, "count": int}}, "message_count": int,
        "start_ns": int, "end_ns": int, "duration_s": float}``; ``end_ns`` is the time of the
        last message and ``duration_s = (end_ns - start_ns) / 1e9`` (0 for a single message).

    Raises:
        DatasetError: the bag is missing or corrupt.
    """
    reader = _open_reader(path)
    try:
        topics = {name: {"msgtype": info.msgtype, "count": int(info.msgcount)}
                  for name, info in reader.topics.items()}
        count = int(reader.message_count)
        if count:
            start = int(reader.start_time)
            end = int(reader.end_time) - 1  # rosbags' end_time is one ns after the last message
        else:
            start = end = 0
    except _bag_errors() as exc:
        raise DatasetError(f"cannot read bag {path}: {exc}") from exc
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001
            pass
    return {"topics": topics, "message_count": count, "start_ns": start, "end_ns": end,
            "duration_s": max(0, end - start) / 1e9}
