"""rclpy message <-> NumPy, through the ROS-free :mod:`vpr_localizer.io.image_msgs` (no cv_bridge)."""
from __future__ import annotations

import math

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from vpr_localizer.io import image_msgs
from vpr_localizer.errors import ImageLoadError


def stamp_to_sec(stamp: Time) -> float:
    """``builtin_interfaces/Time`` -> seconds (float)."""
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def sec_to_stamp(t: float) -> Time:
    """Seconds -> ``builtin_interfaces/Time``."""
    sec = math.floor(t)
    return Time(sec=int(sec), nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


def image_msg_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/Image`` or ``CompressedImage`` -> ``uint8 (H, W, 3)`` RGB.

    Raises:
        ImageLoadError: unsupported encoding, size not matching the data, zero size, corrupt
            compressed data.
    """
    if isinstance(msg, CompressedImage):
        return image_msgs.compressed_to_rgb(msg.format, bytes(msg.data))
    if isinstance(msg, Image):
        return image_msgs.image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    raise ImageLoadError(f"expected sensor_msgs/Image or CompressedImage, got {type(msg).__name__}")


def _fields_to_image(fields: dict, header: Header) -> Image:
    msg = Image()
    msg.header = header
    msg.height, msg.width = int(fields["height"]), int(fields["width"])
    msg.encoding, msg.is_bigendian, msg.step = fields["encoding"], int(fields["is_bigendian"]), int(fields["step"])
    msg.data = fields["data"]
    return msg


def rgb_to_image_msg(rgb: np.ndarray, header: Header, encoding: str = "rgb8") -> Image:
    """``uint8 (H, W, 3)`` RGB -> ``sensor_msgs/Image`` (rgb8, bgr8 or mono8) with ``header``."""
    return _fields_to_image(image_msgs.rgb_to_image_fields(rgb, encoding), header)


def labels_to_msg(labels: np.ndarray, header: Header) -> Image:
    """``uint8 (H, W)`` trainId labels -> mono8 ``sensor_msgs/Image``."""
    return _fields_to_image(image_msgs.labels_to_mono8_fields(labels), header)


def msg_to_labels(msg: Image) -> np.ndarray:
    """mono8 (or 8UC1) ``sensor_msgs/Image`` of trainIds -> ``uint8 (H, W)`` (inverse of :func:`labels_to_msg`).

    Raises:
        ImageLoadError: another encoding, or size not matching the data.
    """
    enc = str(msg.encoding).strip().lower()
    if enc not in ("mono8", "8uc1"):
        raise ImageLoadError(f"segmentation/labels must be mono8 (or 8UC1) trainIds, got encoding {msg.encoding!r}")
    # 8UC1 has mono8's memory layout
    rgb = image_msgs.image_to_rgb("mono8", msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    return np.ascontiguousarray(rgb[:, :, 0])


def descriptor_to_msg(desc: np.ndarray, header: Header) -> Image:
    """``float32 (1, D)`` (or ``(N, d)`` patch descriptors) -> 32FC1 ``sensor_msgs/Image``."""
    return _fields_to_image(image_msgs.descriptor_to_fields(desc), header)


def msg_to_descriptor(msg: Image) -> np.ndarray:
    """32FC1 ``sensor_msgs/Image`` -> ``float32 (H, W)``.

    Raises:
        ImageLoadError: not 32FC1 or size not matching the data.
    """
    return image_msgs.fields_to_descriptor(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian,
                                            msg.data)
