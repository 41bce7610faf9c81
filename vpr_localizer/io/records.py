"""Image records: which images, where they were taken, and how they are compared.

An :class:`ImageRecord` is one image of a traversal with whatever ground truth is known:
a WGS84 fix (EXIF or CSV), a local metric position (CSV x/y), a frame index (parsed from the
file name) and/or a place label (CSV ``place_id``).

Loaders build record lists from the three layouts ``build-map`` accepts:

(a) a folder of images with GPS in EXIF;
(b) a folder plus a CSV with ``image, lat, lon[, alt, heading]`` or ``image, x, y[, z, yaw]``
    (optional extra columns: ``place_id``, ``condition``, ``sequence``, ``frame``, ``stamp``);
(c) a folder whose file names carry a frame index only.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from vpr_localizer.errors import DatasetError
from vpr_localizer.io.image_files import IMAGE_EXTENSIONS, read_exif_gps

LOG = logging.getLogger(__name__)

_NUM_RE = re.compile(r"(\d+)")

#: Largest accepted |altitude|, metres (WGS84 ellipsoid height; beyond 100 km is not a camera).
MAX_ABS_ALT_M = 1e5
#: Largest accepted |x|, |y|, |z| of a local metric position, metres (10,000 km).
MAX_ABS_LOCAL_M = 1e7


@dataclass
class ImageRecord:
    """One image and its ground truth.

    Attributes:
        path: absolute image path.
        name: path relative to the folder it was listed from (stable id in outputs).
        frame: frame index parsed from the file name (last integer), or CSV ``frame``.
        lat, lon: WGS84 degrees; alt: metres (None when unknown).
        x, y, z: local metric position, metres (CSV x/y/z, or ENU after :func:`to_enu`).
        yaw: heading in the map frame, radians, counter-clockwise from east (REP-103).
        stamp: time stamp, seconds.
        place_id: place label (images with equal labels show the same place).
        condition: e.g. ``day``, ``night``, ``snow``.
        sequence: traversal name.
    """

    path: str
    name: str
    frame: Optional[int] = None
    lat: Optional[float] = None
    lon: Optional[float] = None
    alt: Optional[float] = None
    x: Optional[float] = None
    y: Optional[float] = None
    z: Optional[float] = None
    yaw: Optional[float] = None
    stamp: Optional[float] = None
    place_id: Optional[str] = None
    condition: Optional[str] = None
    sequence: Optional[str] = None

    @property
    def has_geodetic(self) -> bool:
        return self.lat is not None and self.lon is not None

    @property
    def has_position(self) -> bool:
        return self.x is not None and self.y is not None


def record_problem(rec: ImageRecord) -> Optional[str]:
    """Why a record's ground truth cannot be used, or None when it is sane.

    A record is refused when lat (degrees) is non-finite or ``|lat| > 90``, lon (degrees)
    non-finite or ``|lon| > 180``, alt (metres) non-finite or ``|alt| >`` :data:`MAX_ABS_ALT_M`,
    x/y/z (metres) non-finite or ``|v| >`` :data:`MAX_ABS_LOCAL_M`, or yaw (radians) / stamp
    (seconds) non-finite. Missing (None) values are fine.
    """
    def bad(v, limit):
        return v is not None and (not math.isfinite(v) or (limit is not None and abs(v) > limit))

    checks = (("lat", rec.lat, 90.0, "degrees"), ("lon", rec.lon, 180.0, "degrees"),
              ("alt", rec.alt, MAX_ABS_ALT_M, "m"), ("x", rec.x, MAX_ABS_LOCAL_M, "m"),
              ("y", rec.y, MAX_ABS_LOCAL_M, "m"), ("z", rec.z, MAX_ABS_LOCAL_M, "m"),
              ("yaw", rec.yaw, None, "rad"), ("stamp", rec.stamp, None, "s"))
    for key, v, limit, unit in checks:
        if bad(v, limit):
            rng = "finite" if limit is None else f"finite with |{key}| <= {limit:g} {unit}"
            return f"{key} = {v!r} is not {rng}"
    return None


def natural_key(name: str):
    """Sort key that orders ``2.jpg`` before ``10.jpg``."""
    return [int(t) if t.isdigit() else t.lower() for t in _NUM_RE.split(name)]


def frame_from_name(name: str) -> Optional[int]:
    """Last integer in the file stem (``images-00010.png`` -> 10, ``p3_v1_day`` -> 1)."""
    nums = _NUM_RE.findall(os.path.splitext(os.path.basename(name))[0])
    return int(nums[-1]) if nums else None


def list_images(folder: str) -> List[str]:
    """Image files directly in ``folder`` (by extension), naturally sorted.

    Raises:
        DatasetError: the folder does not exist or holds no images.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder not found: {folder}")
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
    if not names:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return names


def _f(value: Optional[str]) -> Optional[float]:
    if value is None or str(value).strip() == "":
        return None
    return float(value)


def records_from_folder(folder: str, gps: str = "auto") -> List[ImageRecord]:
    """Records for every image in a folder: layouts (a) and (c).

    Args:
        folder: image folder.
        gps: ``exif`` (every image must have EXIF GPS), ``none`` (frame index only), or
            ``auto`` (read EXIF GPS where present).

    An image whose EXIF GPS is out of range (``|lat| > 90``, ``|lon| > 180`` degrees,
    ``|alt| >`` :data:`MAX_ABS_ALT_M` metres; see :func:`record_problem`) is skipped with a
    warning naming the image file.

    Raises:
        DatasetError: missing folder, no images, ``exif`` requested and an image lacks GPS, or
            every image skipped for bad GPS.
    """
    folder = os.path.abspath(folder)
    out = []
    skipped = 0
    for name in list_images(folder):
        path = os.path.join(folder, name)
        rec = ImageRecord(path=path, name=name, frame=frame_from_name(name))
        if gps in ("exif", "auto"):
            fix = read_exif_gps(path)
            if fix is None and gps == "exif":
                raise DatasetError(f"{path}: no GPS position in EXIF")
            if fix is not None:
                rec.lat, rec.lon, rec.alt = fix
                problem = record_problem(rec)
                if problem is not None:
                    LOG.warning("skipping image %s: EXIF GPS %s", path, problem)
                    skipped += 1
                    continue
        out.append(rec)
    if not out:
        raise DatasetError(f"{folder}: all {skipped} images skipped (EXIF GPS out of range)")
    return out


_IMAGE_COLS = ("image", "file", "filename", "name", "path")


def records_from_csv(csv_path: str, folder: Optional[str] = None) -> List[ImageRecord]:
    """Records from a CSV: layout (b).

    Columns (header required, case-insensitive): an image column (``image``/``file``/
    ``filename``/``name``/``path``), then either ``lat, lon[, alt][, heading]`` (degrees,
    metres; heading clockwise from north, degrees) or ``x, y[, z][, yaw]`` (metres; yaw
    radians counter-clockwise from x), and optionally ``place_id``, ``condition``,
    ``sequence``, ``frame``, ``stamp``. Image paths are relative to ``folder`` (default: the
    CSV's directory).

    A row with a non-finite or out-of-range value (``|lat| > 90``, ``|lon| > 180`` degrees,
    ``|alt| >`` :data:`MAX_ABS_ALT_M` metres, ``|x|``, ``|y|``, ``|z| >``
    :data:`MAX_ABS_LOCAL_M` metres, non-finite heading/yaw/stamp/frame; see
    :func:`record_problem`) is skipped with a warning naming the CSV file and line.

    The file must be UTF-8; a byte-order mark (as Excel writes) is accepted. An image listed
    on several usable rows is kept once, from the first of them; one warning names the CSV file
    and the repeated lines.

    Raises:
        DatasetError: missing file, not UTF-8 text, no image column, a row with a missing image
            file, a non-numeric coordinate (the message gives the CSV line), or no usable row.
    """
    if not os.path.isfile(csv_path):
        raise DatasetError(f"CSV not found: {csv_path}")
    base = os.path.abspath(folder or os.path.dirname(os.path.abspath(csv_path)))
    try:
        return _read_records_csv(csv_path, base)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                           f"{exc.start}); save the CSV as UTF-8") from exc


def _read_records_csv(csv_path: str, base: str) -> List[ImageRecord]:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is dropped instead of becoming part of
    # the first column name
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DatasetError(f"{csv_path}: empty CSV")
        cols = {c.strip().lower(): c for c in reader.fieldnames}
        img_col = next((cols[c] for c in _IMAGE_COLS if c in cols), None)
        if img_col is None:
            raise DatasetError(f"{csv_path}: no image column (one of {', '.join(_IMAGE_COLS)})")

        def get(row, key):
            return row.get(cols[key]) if key in cols else None

        out = []
        skipped = 0
        first_line: Dict[str, int] = {}
        duplicates: List[Tuple[int, int]] = []
        for line, row in enumerate(reader, start=2):
            name = (row.get(img_col) or "").strip()
            if not name:
                raise DatasetError(f"{csv_path}:{line}: empty image name")
            path = os.path.join(base, name)
            try:
                rec = ImageRecord(path=path, name=name, frame=frame_from_name(name))
                rec.lat, rec.lon, rec.alt = _f(get(row, "lat")), _f(get(row, "lon")), _f(get(row, "alt"))
                rec.x, rec.y, rec.z = _f(get(row, "x")), _f(get(row, "y")), _f(get(row, "z"))
                heading = _f(get(row, "heading"))
                yaw = _f(get(row, "yaw"))
                rec.yaw = yaw if yaw is not None else (
                    None if heading is None else math.radians(90.0 - heading))
                frame = _f(get(row, "frame"))
                rec.stamp = _f(get(row, "stamp"))
            except ValueError as exc:
                raise DatasetError(f"{csv_path}:{line}: {exc}") from exc
            problem = record_problem(rec)
            if problem is None and frame is not None and not math.isfinite(frame):
                problem = f"frame = {frame!r} is not finite"
            if problem is not None:
                LOG.warning("skipping %s:%d (%s): %s", csv_path, line, name, problem)
                skipped += 1
                continue
            same = os.path.normpath(name)
            if same in first_line:
                duplicates.append((line, first_line[same]))
                continue
            first_line[same] = line
            rec.frame = int(frame) if frame is not None else rec.frame
            for key in ("place_id", "condition", "sequence"):
                v = get(row, key)
                setattr(rec, key, v.strip() if v is not None and v.strip() != "" else None)
            out.append(rec)
    if duplicates:
        shown = ", ".join(f"line {d} repeats line {f}" for d, f in duplicates[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        LOG.warning("%s: %d duplicate image row(s) ignored, the first listing of each image kept (%s%s)",
                    csv_path, len(duplicates), shown, more)
    if not out:
        raise DatasetError(f"{csv_path}: no rows" if not skipped else
                           f"{csv_path}: all {skipped} rows skipped (non-finite or out-of-range coordinates)")
    return out


def select(records: Sequence[ImageRecord], parity: str = "all", condition: Optional[Iterable[str]] = None,
           sequence: Optional[Iterable[str]] = None, place_ids: Optional[Iterable[str]] = None) -> List[ImageRecord]:
    """Filter records.

    Args:
        parity: ``all`` | ``even`` | ``odd``: by frame index (records without a frame index use
            their position in the list, counting from 1).
        condition / sequence / place_ids: keep only records whose field is in the given set.
    """
    if parity not in ("all", "even", "odd"):
        raise ValueError(f"parity must be all|even|odd, got {parity!r}")
    cond = set(condition) if condition else None
    seq = set(sequence) if sequence else None
    places = {str(p) for p in place_ids} if place_ids else None
    out = []
    for i, r in enumerate(records, start=1):
        n = r.frame if r.frame is not None else i
        if parity == "even" and n % 2 != 0 or parity == "odd" and n % 2 != 1:
            continue
        if cond is not None and r.condition not in cond:
            continue
        if seq is not None and r.sequence not in seq:
            continue
        if places is not None and r.place_id not in places:
            continue
        out.append(r)
    return out


def check_exists(records: Sequence[ImageRecord]) -> None:
    """Raise DatasetError naming the first record whose image file does not exist."""
    for r in records:
        if not os.path.exists(r.path):
            raise DatasetError(f"image listed but not found: {r.path}")


def load_records(images: str, csv_path: Optional[str] = None, gps: str = "auto", parity: str = "all",
                 condition: Optional[Iterable[str]] = None) -> List[ImageRecord]:
    """One call for the three layouts: CSV when given, else the folder (EXIF GPS or frame index)."""
    recs = records_from_csv(csv_path, images) if csv_path else records_from_folder(images, gps)
    recs = select(recs, parity, condition)
    if not recs:
        raise DatasetError(f"no images left in {images} after selecting parity={parity} condition={condition}")
    check_exists(recs)
    return recs
