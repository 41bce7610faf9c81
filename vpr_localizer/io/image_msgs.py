"""Conversion between ROS image message fields and NumPy arrays, without ROS.

``cv_bridge`` is not available from the package registries, so the project converts
``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` itself. The functions here work on
plain field values (``encoding``, ``height``, ``width``, ``step``, ``is_bigendian``, ``data``)
so that rclpy messages (``data`` is an ``array.array('B')``) and ``rosbags`` messages
(``data`` is a ``numpy`` ``uint8`` array) use the same code::

    rgb = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    fields = rgb_to_image_fields(rgb, "rgb8")   # -> dict for Image(**fields) (after header)

Conventions:
- RGB images are ``numpy.ndarray`` ``uint8`` ``(H, W, 3)`` in RGB order, H and W in pixels.
- ``step`` is the length of one row in bytes (>= width * bytes per pixel; extra bytes are
  row padding and ignored on read).
- Descriptors travel as ``32FC1`` images: ``(rows, cols)`` float32, ``step = 4 * cols``.

Every invalid input raises :class:`vpr_localizer.errors.ImageLoadError` with a message that
names the problem (and the numbers involved).
"""
from __future__ import annotations

import array
import io
from typing import Dict, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from vpr_localizer.errors import ImageLoadError
from vpr_localizer.io.image_files import pil_to_rgb, validate_rgb

__all__ = [
    "SUPPORTED_DECODE_ENCODINGS", "SUPPORTED_ENCODE_ENCODINGS", "DESCRIPTOR_ENCODING",
    "image_to_rgb", "rgb_to_image_fields", "rgb_to_luma", "labels_to_mono8_fields",
    "descriptor_to_fields", "fields_to_descriptor", "compressed_to_rgb", "rgb_to_compressed",
]

BufferLike = Union[bytes, bytearray, memoryview, np.ndarray, array.array]

# encoding -> (channels, bytes per channel)
_DECODE_ENCODINGS: Dict[str, Tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "mono16": (1, 2),
}
#: Encodings :func:`image_to_rgb` reads.
SUPPORTED_DECODE_ENCODINGS = tuple(_DECODE_ENCODINGS)
#: Encodings :func:`rgb_to_image_fields` writes.
SUPPORTED_ENCODE_ENCODINGS = ("rgb8", "bgr8", "mono8")
#: Encoding of descriptor images.
DESCRIPTOR_ENCODING = "32FC1"

_COMPRESSED_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}


def _as_bytes_array(data: BufferLike, what: str = "data") -> np.ndarray:
    """View any buffer-like message payload as a flat ``uint8`` array (no copy when possible)."""
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)
        return arr.reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        try:
            return np.frombuffer(data, dtype=np.uint8)
        except (ValueError, TypeError):  # e.g. a non-contiguous memoryview
            return np.frombuffer(bytes(data), dtype=np.uint8)
    if isinstance(data, (list, tuple)):
        try:
            return np.asarray(data, dtype=np.uint8).reshape(-1)
        except (ValueError, OverflowError) as exc:
            raise ImageLoadError(f"image {what} is not a sequence of bytes ({exc})") from exc
    raise ImageLoadError(f"image {what} has unsupported type {type(data).__name__}; "
                         "expected bytes, bytearray, memoryview, array.array or numpy array")


def _check_geometry(encoding: str, height: int, width: int, step: int, bytes_per_pixel: int,
                    nbytes: int) -> int:
    """Validate height/width/step against the payload size; return the used bytes per row."""
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageLoadError(f"{encoding} image has zero size: height={height}, width={width} "
                             "(both must be > 0)")
    row = width * bytes_per_pixel
    if step < row:
        raise ImageLoadError(f"{encoding} image step {step} is smaller than width * bytes per pixel "
                             f"= {width} * {bytes_per_pixel} = {row}")
    if nbytes != step * height:
        raise ImageLoadError(f"{encoding} image data length {nbytes} bytes does not match "
                             f"step * height = {step} * {height} = {step * height} bytes "
                             f"(width {width} x height {height})")
    return row


def image_to_rgb(encoding: str, height: int, width: int, step: int, is_bigendian: Union[int, bool],
                 data: BufferLike) -> np.ndarray:
    """Decode the fields of a ``sensor_msgs/Image`` into an RGB array.

    Args:
        encoding: one of ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8``, ``mono16``
            (case-insensitive). Alpha is dropped; mono is replicated to three channels;
            ``mono16`` is scaled to 8 bit by ``value >> 8``.
        height, width: image size in pixels (> 0).
        step: bytes per row, ``>= width * bytes_per_pixel``; padding bytes are ignored.
        is_bigendian: byte order of 16-bit samples (``mono16``); ignored for 8-bit encodings.
        data: ``step * height`` bytes (bytes, bytearray, memoryview, ``array.array('B')`` as in
            rclpy, or a ``numpy`` array as in rosbags).

    Returns:
        A new, writable ``uint8`` array ``(height, width, 3)``, RGB (never a view of ``data``).

    Raises:
        ImageLoadError: unsupported encoding (the message lists the supported ones), zero
            height or width, ``step`` smaller than one row of pixels, or a data length other
            than ``step * height`` (the message gives both numbers).
    """
    enc = str(encoding).strip().lower()
    if enc not in _DECODE_ENCODINGS:
        raise ImageLoadError(f"unsupported image encoding {encoding!r}; supported: "
                             f"{', '.join(SUPPORTED_DECODE_ENCODINGS)}")
    channels, depth = _DECODE_ENCODINGS[enc]
    buf = _as_bytes_array(data)
    row = _check_geometry(enc, height, width, step, channels * depth, buf.size)
    height, width, step = int(height), int(width), int(step)
    rows = buf.reshape(height, step)[:, :row]
    if depth == 2:
        dtype = np.dtype(">u2" if bool(is_bigendian) else "<u2")
        samples = np.ascontiguousarray(rows).view(dtype).reshape(height, width)
        gray = (samples >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    pix = rows.reshape(height, width, channels)
    if enc == "rgb8":
        return pix.copy()
    if enc == "rgba8":
        return np.ascontiguousarray(pix[:, :, :3])
    if enc == "bgr8":
        return np.ascontiguousarray(pix[:, :, ::-1])
    if enc == "bgra8":
        return np.ascontiguousarray(pix[:, :, 2::-1])
    # mono8
    return np.repeat(pix, 3, axis=2)


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` of an RGB image.

    Uses the same fixed-point rounding as Pillow's ``convert("L")``, so the result is
    bit-identical to Pillow and a gray image (R = G = B) maps to itself.

    Args:
        rgb: ``uint8`` ``(H, W, 3)``.

    Returns:
        ``uint8`` ``(H, W)``.
    """
    c = rgb.astype(np.uint32)
    y = (c[:, :, 0] * 19595 + c[:, :, 1] * 38470 + c[:, :, 2] * 7471 + 0x8000) >> 16
    return y.astype(np.uint8)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> dict:
    """Encode an RGB array as the fields of a ``sensor_msgs/Image`` (header excluded).

    Args:
        rgb: ``uint8`` ``(H, W, 3)``, RGB.
        encoding: ``rgb8``, ``bgr8`` or ``mono8`` (mono via ITU-R 601 luma, see
            :func:`rgb_to_luma`).

    Returns:
        ``dict(height, width, encoding, is_bigendian=0, step, data)``; ``data`` is ``bytes`` of
        length ``step * height`` without row padding (``step = width * channels``).

    Raises:
        ImageLoadError: ``rgb`` is not a non-empty ``uint8`` ``(H, W, 3)`` array, or the
            encoding is not one of the supported ones.
    """
    validate_rgb(rgb)
    enc = str(encoding).strip().lower()
    if enc == "rgb8":
        pix = rgb
    elif enc == "bgr8":
        pix = rgb[:, :, ::-1]
    elif enc == "mono8":
        pix = rgb_to_luma(rgb)
    else:
        raise ImageLoadError(f"cannot encode an image as {encoding!r}; supported: "
                             f"{', '.join(SUPPORTED_ENCODE_ENCODINGS)}")
    height, width = rgb.shape[:2]
    channels = 1 if pix.ndim == 2 else pix.shape[2]
    return {"height": int(height), "width": int(width), "encoding": enc, "is_bigendian": 0,
            "step": int(width * channels), "data": np.ascontiguousarray(pix).tobytes()}


def labels_to_mono8_fields(labels: np.ndarray) -> dict:
    """Encode a segmentation label map (one class id per pixel) as ``mono8`` image fields.

    Args:
        labels: ``(H, W)`` ``uint8`` class ids (any integer dtype whose values all lie in
            0..255 is accepted and converted).

    Returns:
        ``dict(height, width, encoding="mono8", is_bigendian=0, step=W, data: bytes)``.

    Raises:
        ImageLoadError: not a non-empty 2-D integer array, or values outside 0..255.
    """
    if not isinstance(labels, np.ndarray):
        raise ImageLoadError(f"expected a (H, W) uint8 label array, got {type(labels).__name__}")
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ImageLoadError(f"expected a label array of shape (H, W) with H, W > 0, got {labels.shape}")
    if labels.dtype != np.uint8:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ImageLoadError(f"label array must have an integer dtype, got {labels.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > 255:
            raise ImageLoadError(f"label values must lie in 0..255 for mono8, got {lo}..{hi}")
        labels = labels.astype(np.uint8)
    h, w = labels.shape
    return {"height": int(h), "width": int(w), "encoding": "mono8", "is_bigendian": 0,
            "step": int(w), "data": np.ascontiguousarray(labels).tobytes()}


def descriptor_to_fields(desc: np.ndarray) -> dict:
    """Encode a descriptor matrix as ``32FC1`` image fields.

    Args:
        desc: float array ``(1, D)`` (global descriptor), ``(N, d)`` (patch descriptors) or
            ``(D,)`` (treated as ``(1, D)``); cast to float32. NaN and inf are carried as is.

    Returns:
        ``dict(height=rows, width=cols, encoding="32FC1", is_bigendian=0, step=4*cols,
        data: bytes)`` with little-endian float32 samples.

    Raises:
        ImageLoadError: not a non-empty 1-D/2-D floating-point array.
    """
    if not isinstance(desc, np.ndarray) or not np.issubdtype(desc.dtype, np.floating):
        raise ImageLoadError(f"descriptor must be a floating-point numpy array, got "
                             f"{type(desc).__name__} {getattr(desc, 'dtype', '')}")
    if desc.ndim == 1:
        desc = desc[None, :]
    if desc.ndim != 2 or desc.shape[0] == 0 or desc.shape[1] == 0:
        raise ImageLoadError(f"descriptor must have shape (1, D) or (N, d) with sizes > 0, got {desc.shape}")
    rows, cols = desc.shape
    data = np.ascontiguousarray(desc, dtype="<f4").tobytes()
    return {"height": int(rows), "width": int(cols), "encoding": DESCRIPTOR_ENCODING,
            "is_bigendian": 0, "step": int(4 * cols), "data": data}


def fields_to_descriptor(encoding: str, height: int, width: int, step: int,
                         is_bigendian: Union[int, bool], data: BufferLike) -> np.ndarray:
    """Decode ``32FC1`` image fields into a descriptor matrix.

    Args:
        encoding: must be ``32FC1``.
        height, width: rows and columns (> 0).
        step: bytes per row, ``>= 4 * width`` (padding ignored).
        is_bigendian: byte order of the float32 samples.
        data: ``step * height`` bytes.

    Returns:
        A new ``float32`` (native byte order) array ``(height, width)``.

    Raises:
        ImageLoadError: wrong encoding, zero size, ``step`` too small or a data length other
            than ``step * height``.
    """
    if str(encoding).strip().upper() != DESCRIPTOR_ENCODING:
        raise ImageLoadError(f"descriptor image must have encoding {DESCRIPTOR_ENCODING}, got {encoding!r}")
    buf = _as_bytes_array(data)
    row = _check_geometry(DESCRIPTOR_ENCODING, height, width, step, 4, buf.size)
    height, width, step = int(height), int(width), int(step)
    rows = np.ascontiguousarray(buf.reshape(height, step)[:, :row])
    dtype = np.dtype(">f4" if bool(is_bigendian) else "<f4")
    return rows.view(dtype).reshape(height, width).astype(np.float32)


def compressed_to_rgb(format: str, data: BufferLike) -> np.ndarray:  # noqa: A002 (ROS field name)
    """Decode the fields of a ``sensor_msgs/CompressedImage`` (JPEG or PNG) into RGB.

    The image format is detected from the data (Pillow); ``format`` (``jpeg``, ``png``, or
    image_transport's ``"rgb8; jpeg compressed bgr8"``) is only used in error messages, except
    that ``compressedDepth`` payloads are refused.

    Args:
        format: the message's ``format`` string.
        data: the compressed bytes.

    Returns:
        ``uint8`` ``(H, W, 3)``, RGB.

    Large JPEGs are downscaled on decode and 16-bit greyscale PNGs are scaled to 8 bit
    (:func:`vpr_localizer.io.image_files.pil_to_rgb`).

    Raises:
        ImageLoadError: empty data, ``compressedDepth`` format, data that is not a
            decodable (complete) image, or an image of more than
            :data:`vpr_localizer.io.image_files.MAX_IMAGE_PIXELS` pixels (decompression bomb).
    """
    fmt = str(format)
    if "compresseddepth" in fmt.lower():
        raise ImageLoadError(f"compressed image format {fmt!r} (compressedDepth) is not supported")
    raw = _as_bytes_array(data, "data").tobytes()
    if not raw:
        raise ImageLoadError(f"compressed image ({fmt or 'no format'}) has empty data (0 bytes)")
    what = f"compressed image ({fmt or 'no format'}, {len(raw)} bytes)"
    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = pil_to_rgb(im, what)  # full decode: truncated data raises here
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{what} is not a decodable image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{what}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{what} is corrupt or truncated ({exc})") from exc
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"compressed image ({fmt or 'no format'}) has zero size")
    return arr


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> Tuple[str, bytes]:
    """Compress an RGB array for a ``sensor_msgs/CompressedImage``.

    Args:
        rgb: ``uint8`` ``(H, W, 3)``, RGB.
        fmt: ``jpeg`` (``jpg``) or ``png``.
        quality: JPEG quality 1..100 (ignored for PNG).

    Returns:
        ``(format, data)``: the message's ``format`` string (``"jpeg"`` or ``"png"``) and the
        compressed bytes.

    Raises:
        ImageLoadError: invalid array, unknown format or quality out of range.
    """
    validate_rgb(rgb)
    key = str(fmt).strip().lower()
    if key not in _COMPRESSED_FORMATS:
        raise ImageLoadError(f"unsupported compressed format {fmt!r}; supported: jpeg, png")
    pil_fmt = _COMPRESSED_FORMATS[key]
    out = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if pil_fmt == "JPEG":
        q = int(quality)
        if not 1 <= q <= 100:
            raise ImageLoadError(f"JPEG quality must lie in 1..100, got {quality}")
        im.save(out, format="JPEG", quality=q)
        return "jpeg", out.getvalue()
    im.save(out, format="PNG")
    return "png", out.getvalue()
