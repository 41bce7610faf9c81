"""Building a map from image records: encode, fit, index, write.

``build-map`` (map_builder CLI), ``evaluate`` and the live map_builder node all go through
:func:`build_map`, so every map has the same format and fingerprint rules.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from vpr_localizer.models.encoder import Encoder, EncodeResult
from vpr_localizer.errors import DatasetError
from vpr_localizer.geodesy import EnuDatum
from vpr_localizer.mapping.index import build_index
from vpr_localizer.mapping.patches import MapPatches, PatchLayout, PatchSpool
from vpr_localizer.mapping.store import Keyframe, write_map
from vpr_localizer.models.patch_encoder import PatchEncoder, PatchSettings, check_encoder_grid, fit_patch_pca_on_images
from vpr_localizer.io.records import ImageRecord

LOG = logging.getLogger(__name__)


def datum_for(records: Sequence[ImageRecord]) -> Optional[EnuDatum]:
    """ENU origin for a set of records: the first geotagged one (altitude 0 when unknown)."""
    for r in records:
        if r.has_geodetic:
            return EnuDatum(r.lat, r.lon, r.alt if r.alt is not None else 0.0)
    return None


def localize_records(records: Sequence[ImageRecord], datum: Optional[EnuDatum]) -> List[ImageRecord]:
    """Fill x/y/z of geotagged records in the datum's ENU frame (records with x/y keep theirs).

    Returns new records; inputs are not modified.
    """
    from dataclasses import replace

    out = []
    for r in records:
        if datum is not None and r.has_geodetic and not r.has_position:
            e, n, u = datum.to_enu(r.lat, r.lon, r.alt)
            r = replace(r, x=float(e), y=float(n), z=float(u) if r.alt is not None else 0.0)
        out.append(r)
    return out


def _yaw_quaternion(yaw: Optional[float]) -> Tuple[float, float, float, float]:
    if yaw is None or not math.isfinite(yaw):
        return 0.0, 0.0, 0.0, 1.0
    return 0.0, 0.0, math.sin(yaw / 2.0), math.cos(yaw / 2.0)


def keyframes_from_records(records: Sequence[ImageRecord]) -> List[Keyframe]:
    """Keyframes (ids 0..N-1) from records that already carry map-frame positions."""
    def num(v):
        return math.nan if v is None else float(v)

    out = []
    for i, r in enumerate(records):
        qx, qy, qz, qw = _yaw_quaternion(r.yaw)
        out.append(Keyframe(id=i, stamp=num(r.stamp), x=num(r.x), y=num(r.y), z=num(r.z) if r.has_position else math.nan,
                            qx=qx, qy=qy, qz=qz, qw=qw, lat=num(r.lat), lon=num(r.lon), alt=num(r.alt),
                            frame=-1 if r.frame is None else int(r.frame), image_path=r.path,
                            place_id=r.place_id or "", sequence=r.sequence or "", condition=r.condition or ""))
    return out


@dataclass
class MapEncoding:
    """The encoded map images.

    Attributes:
        records: the records that were encoded (unreadable images removed), with ENU positions.
        result: :class:`EncodeResult` (descriptors after PCA, raw, extras).
        datum: ENU origin or None.
        pca_fitted: whether PCA whitening was fitted on these images.
        seconds: wall time of fitting + encoding, s.
        patches: the records' Patch-NetVLAD descriptors (same order), or None when not asked for.
        patch_seconds: wall time of the patch PCA sample pass + patch extraction, s.
    """

    records: List[ImageRecord]
    result: EncodeResult
    datum: Optional[EnuDatum]
    pca_fitted: bool
    seconds: float
    patches: Optional[MapPatches] = None
    patch_seconds: float = 0.0


def start_patch_spool(encoder: Encoder, paths: Sequence[str], settings: PatchSettings,
                      progress: bool = True) -> Tuple[PatchSpool, PatchEncoder]:
    """Fit the patch PCA on a sample of ``paths`` (:func:`fit_patch_pca_on_images`) and open a
    :class:`PatchSpool` plus the :class:`PatchEncoder` that fills it (one keyframe at a time).

    Raises:
        ConfigError: a patch size larger than the encoder's feature grid, a non-NetVLAD encoder,
            or too few sampled patches for the patch PCA.
    """
    grid = check_encoder_grid(encoder, settings.patch_sizes)
    pca, info = fit_patch_pca_on_images(encoder, paths, settings, progress="patch PCA sample" if progress else None)
    layout = PatchLayout(settings.patch_sizes, settings.strides, settings.dim, grid)
    spool = PatchSpool(layout, pca, {"weights": "image_stream" if encoder.config.guided else "uniform",
                                     "pca_images": info["images"], "pca_samples": info["samples"],
                                     "pca_seconds": info["seconds"]})
    return spool, PatchEncoder(encoder, settings.patch_sizes, settings.strides, pca)


def encode_map(records: Sequence[ImageRecord], encoder: Encoder, extra_heads=None,
               progress: bool = True, patches: Optional[PatchSettings] = None) -> MapEncoding:
    """Fit the encoder on the map images (k-means, PCA) when untrained, and encode them.

    Unreadable images are skipped with a warning naming the file.

    With ``patches``, also the Patch-NetVLAD descriptors of every image (Hausler et al., CVPR
    2021): after the NetVLAD k-means, a sample pass over ``patches.pca_images`` map images fits
    the patch PCA, then the one encoding pass makes the global and the patch descriptors from
    the same feature maps (:mod:`vpr_localizer.models.patch_encoder`); the patches go to a
    temporary float16 file (:class:`PatchSpool`), not memory.

    Raises:
        DatasetError: no image could be read.
        ConfigError: patch sizes that do not fit the encoder's feature grid (the message names the
            input size needed), a non-NetVLAD encoder with ``patches``.
    """
    t0 = time.perf_counter()
    paths = [r.path for r in records]
    if patches is not None:
        check_encoder_grid(encoder, patches.patch_sizes)  # fail before minutes of k-means / encoding
    encoder.fit_aggregator(paths, progress="NetVLAD k-means sample" if progress else None)
    spool, on_batch, t_patch = None, None, 0.0
    if patches is not None:
        tp = time.perf_counter()
        spool, penc = start_patch_spool(encoder, paths, patches, progress)
        t_patch = time.perf_counter() - tp

        def append_patches(idx, enc):
            for scales in penc.extract(enc.features):
                spool.append(scales)
        on_batch = append_patches
    try:
        res = encoder.encode_paths(paths, extra_heads=extra_heads, progress="encoding map" if progress else None,
                                   on_batch=on_batch)
    except BaseException:
        if spool is not None:
            spool.discard()
        raise
    map_patches = spool.finish() if spool is not None else None
    if map_patches is not None:
        t_patch += res.callback_seconds
        map_patches.info["extract_ms_per_image"] = 1e3 * res.callback_seconds / max(len(res.ok), 1)
    if not res.ok:
        raise DatasetError(f"none of the {len(paths)} map images could be read")
    pca = encoder.fit_pca(res.raw)
    if pca:
        res.descriptors = encoder.apply_pca(res.raw)
    kept = [records[i] for i in res.ok]
    datum = datum_for(kept)
    return MapEncoding(localize_records(kept, datum), res, datum, pca, time.perf_counter() - t0, map_patches, t_patch)


@dataclass
class BuildReport:
    """What :func:`build_map` did: path, keyframe count, skipped images, timing."""

    path: str
    keyframes: int
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    descriptor_dim: int = 0
    pca_fitted: bool = False
    geotagged: bool = False
    patch_bytes_per_keyframe: int = 0
    patch_layout: Optional[Dict] = None
    patch_seconds: float = 0.0


def save_map(encoding: MapEncoding, encoder: Encoder, out_path: str, index_kind: str = "flat",
             overwrite: bool = False, extra: Optional[Dict] = None) -> str:
    """Index the encoded map and write it atomically (see :func:`map_store.write_map`), with its
    patch descriptors when ``encoding.patches`` holds them."""
    index = build_index(encoding.result.descriptors, index_kind)
    meta = {"build": {"weights": os.path.abspath(encoder.backbone.weights_path),
                      "index": index_kind, "images": len(encoding.records),
                      "skipped": len(encoding.result.skipped)}}
    if encoder.config.needs_labels and encoder.config.segmentation_weights:
        meta["build"]["segmentation_weights"] = os.path.abspath(encoder.config.segmentation_weights)
    if encoding.patches is not None:
        meta["build"]["patches_seconds"] = round(float(encoding.patch_seconds), 2)
    if extra:
        meta["build"].update(extra)
    return write_map(out_path, keyframes_from_records(encoding.records), index, encoder.checkpoint_state(),
                     encoder.fingerprint(), encoding.datum, extra=meta, overwrite=overwrite,
                     patches=encoding.patches)


def build_map(records: Sequence[ImageRecord], encoder: Encoder, out_path: str, index_kind: str = "flat",
              overwrite: bool = False, progress: bool = True, patches: Optional[PatchSettings] = None) -> BuildReport:
    """Encode ``records`` and write the map to ``out_path`` (with Patch-NetVLAD descriptors when
    ``patches`` is given, see :func:`encode_map`).

    Raises:
        DatasetError: no readable image.
        MapError: ``out_path`` exists and not ``overwrite``.
        ConfigError: patch sizes that do not fit the feature grid (see :func:`encode_map`).
    """
    enc = encode_map(records, encoder, progress=progress, patches=patches)
    try:
        path = save_map(enc, encoder, out_path, index_kind, overwrite)
    finally:
        if enc.patches is not None:
            enc.patches.close()
    rep = BuildReport(path, len(enc.records), enc.result.skipped, enc.seconds, encoder.dim, enc.pca_fitted,
                      enc.datum is not None)
    if enc.patches is not None:
        rep.patch_bytes_per_keyframe = enc.patches.bytes_per_keyframe
        rep.patch_layout = enc.patches.layout.config()
        rep.patch_seconds = enc.patch_seconds
    return rep
