"""Image and EXIF input: decoding with clear errors, resizing, EXIF GPS.

Images are handled as ``numpy.ndarray`` of dtype ``uint8`` and shape ``(H, W, 3)`` in RGB
order, H and W in pixels.
"""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import piexif
from PIL import Image, UnidentifiedImageError

from vpr_localizer.errors import ImageLoadError

LOG = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

#: Largest image decoded, in pixels (width * height): 50 megapixels, about 150 MB as RGB.
#: Larger images (e.g. a decompression-bomb PNG that compresses a 30000 x 30000 image into
#: 1 MB) raise :class:`ImageLoadError` before any pixel is decoded; larger JPEGs are first
#: downscaled on decode by up to 8.
MAX_IMAGE_PIXELS = 50_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def pil_to_rgb(im: Image.Image, what: str = "image") -> np.ndarray:
    """Decode an opened (not yet loaded) Pillow image into RGB, refusing oversized images.

    A JPEG larger than :data:`MAX_IMAGE_PIXELS` is downscaled by 2, 4 or 8 while decoding
    (Pillow ``draft``, cheap); any other image (or a JPEG still too large) is refused before
    its pixels are decoded. 16-bit greyscale (Pillow modes ``I;16``, ``I;16B``, ...) is scaled
    to 8 bit by ``v >> 8``, 32-bit integer greyscale (mode ``I``, how some Pillow versions and
    formats give 16-bit data) by clipping to 0..65535 and ``v >> 8``; 16-bit RGB(A) and
    greyscale+alpha PNGs are already reduced to 8 bit by Pillow. Alpha is dropped.

    Args:
        im: an image from ``Image.open``.
        what: the file or message named in errors.

    Returns:
        ``uint8`` array ``(H, W, 3)``, RGB, H and W in pixels.

    Raises:
        ImageLoadError: more than :data:`MAX_IMAGE_PIXELS` pixels.
        OSError, SyntaxError, ValueError: from Pillow, for truncated or corrupt data (the
            callers turn them into :class:`ImageLoadError`).
    """
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS and im.format == "JPEG":
        for s in (2, 4, 8):
            if -(-w // s) * -(-h // s) <= MAX_IMAGE_PIXELS:
                im.draft(None, (max(1, w // s), max(1, h // s)))
                break
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageLoadError(f"{what}: image too large ({w} x {h} = {w * h / 1e6:.1f} megapixels; "
                             f"limit {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels)")
    im.load()  # forces a full decode: truncated data raises here
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
        grey = np.asarray(im)
        if im.mode == "I":
            grey = np.clip(grey, 0, 65535)
        grey = (grey.astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file fully into RGB.

    Args:
        path: image file (any format Pillow reads).

    Returns:
        ``uint8`` array ``(H, W, 3)``, RGB.

    Large JPEGs are downscaled by 2, 4 or 8 while decoding (Pillow ``draft``) to fit
    :data:`MAX_IMAGE_PIXELS`; 16-bit greyscale is scaled to 8 bit (see :func:`pil_to_rgb`).

    Raises:
        ImageLoadError: the file is missing, zero bytes, truncated or not an image, or has more
            than :data:`MAX_IMAGE_PIXELS` pixels (decompression bomb). The message names the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            arr = pil_to_rgb(im, path)  # full decode: a truncated file raises here
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not a decodable image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{path}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({exc})") from exc
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"{path}: image has zero size")
    return arr


def resize_image(image: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to exactly ``size_wh`` = (width, height) pixels (bilinear, Pillow).

    Args:
        image: ``uint8`` ``(H, W, 3)``.
        size_wh: target (width, height) in pixels.

    Returns:
        ``uint8`` ``(height, width, 3)``.

    Raises:
        ImageLoadError: the array is not a non-empty ``(H, W, 3)`` uint8 image.
    """
    validate_rgb(image)
    w, h = int(size_wh[0]), int(size_wh[1])
    if image.shape[1] == w and image.shape[0] == h:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def validate_rgb(image: np.ndarray) -> None:
    """Check that ``image`` is a non-empty ``uint8`` ``(H, W, 3)`` array.

    Raises:
        ImageLoadError: with the offending shape or dtype in the message.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ImageLoadError(f"expected a uint8 RGB array, got {type(image).__name__} "
                             f"{getattr(image, 'dtype', '')}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageLoadError(f"expected an image of shape (H, W, 3) with H, W > 0, got {image.shape}")


def _rational_to_float(value) -> float:
    num, den = value
    if den == 0:
        raise ValueError("zero denominator")
    return float(Fraction(num, den))


def _dms_to_degrees(dms) -> float:
    d, m, s = (_rational_to_float(v) for v in dms)
    return d + m / 60.0 + s / 3600.0


def read_exif_gps(path: str | os.PathLike) -> Optional[Tuple[float, float, Optional[float]]]:
    """Read the GPS position stored in an image's EXIF (via piexif).

    Args:
        path: JPEG or TIFF file.

    Returns:
        ``(latitude_deg, longitude_deg, altitude_m or None)`` in WGS84 degrees and metres,
        or ``None`` when the file has no usable GPS tags (or no EXIF at all).
    """
    try:
        exif = piexif.load(os.fspath(path))
    except Exception:  # piexif raises several types on non-EXIF files
        return None
    gps = exif.get("GPS") or {}
    try:
        lat = _dms_to_degrees(gps[piexif.GPSIFD.GPSLatitude])
        lon = _dms_to_degrees(gps[piexif.GPSIFD.GPSLongitude])
    except (KeyError, ValueError, TypeError):
        return None
    if gps.get(piexif.GPSIFD.GPSLatitudeRef, b"N") in (b"S", "S"):
        lat = -lat
    if gps.get(piexif.GPSIFD.GPSLongitudeRef, b"E") in (b"W", "W"):
        lon = -lon
    alt = None
    if piexif.GPSIFD.GPSAltitude in gps:
        try:
            alt = _rational_to_float(gps[piexif.GPSIFD.GPSAltitude])
            if gps.get(piexif.GPSIFD.GPSAltitudeRef, 0) in (1, b"\x01"):
                alt = -alt
        except (ValueError, TypeError):
            alt = None
    return lat, lon, alt


def iter_image_batches(paths: Sequence[str], size_wh: Tuple[int, int], batch_size: int,
                       on_skip: Optional[Callable[[str, str], None]] = None
                       ) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Decode and resize images in batches, skipping unreadable ones.

    A background thread decodes the next batch while the caller runs the network.

    Args:
        paths: image files.
        size_wh: output (width, height), pixels.
        batch_size: images per batch.
        on_skip: called with (path, reason) for each unreadable image; it is also logged
            as a warning naming the file.

    Yields:
        ``(indices, images)``: indices into ``paths``; ``uint8`` ``(B, H, W, 3)`` RGB.
    """

    def load_batch(start: int):
        idx, imgs = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                imgs.append(resize_image(load_image(paths[i]), size_wh))
                idx.append(i)
            except ImageLoadError as exc:
                LOG.warning("skipping image: %s", exc)
                if on_skip is not None:
                    on_skip(paths[i], str(exc))
        return idx, imgs

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load_batch, starts[0]) if starts else None
        for n, _ in enumerate(starts):
            idx, imgs = future.result()
            future = pool.submit(load_batch, starts[n + 1]) if n + 1 < len(starts) else None
            if idx:
                yield idx, np.stack(imgs)
