"""Backbone features of the training images, computed once and memory-mapped from disk.

Training the last backbone block with NetVLAD (Arandjelovic et al., CVPR 2016, Sec. 5.1: conv5
and NetVLAD are trained, the earlier layers stay frozen) only needs the images' features at the
input of that block. They are computed once per image (and per simulated-night copy), stored
as float16 ``.npy`` files and read back through ``numpy.memmap``, so an epoch is the tail plus
the aggregator and the cache does not have to fit in memory.

A cache directory is reused when its ``meta.json`` names the same images, night copies, backbone
weights, input size and cut point (:func:`cache_key`); otherwise it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from vpr_localizer.errors import DatasetError
from vpr_localizer.io.image_files import iter_image_batches
from vpr_localizer.models.guided import StreamFeatures
from vpr_localizer.training.augment import simulate_night

STREAMS = ("image", "seg", "static")
CACHE_VERSION = 1


@dataclass
class CacheItem:
    """One image to cache: its file, whether it gets a simulated night, and its name (the night
    simulation's seed)."""

    path: str
    name: str
    night: bool = False


def cache_key(encoder, items: Sequence[CacheItem], pre_tail: bool, seed: int, night_strength: float = 1.0) -> str:
    """SHA-256 identifying a cache: images (paths, night flags), seed, backbone weights,
    preprocessing, input size, guidance, and either where the backbone tail starts (features
    stop before it) or the tail's parameters (features after it: a fine-tuned conv5 gives
    other features than ImageNet's)."""
    fp = encoder.fingerprint()
    h = hashlib.sha256()
    where = ({"pre_tail": True, "tail_start": int(encoder.backbone.tail_start)} if pre_tail else
             {"pre_tail": False, "tail_sha256": fp.get("backbone_tail_sha256")})
    h.update(json.dumps({"version": CACHE_VERSION, "backbone": fp["backbone"], "weights": fp["weights_sha256"],
                         "preprocessing": fp["preprocessing"], "image_size": fp["image_size"],
                         "guidance": fp.get("guidance"), **where, "seed": int(seed),
                         "night_strength": float(night_strength)},
                        sort_keys=True).encode())
    for it in items:
        h.update(f"{it.path}\0{int(it.night)}\0{it.name}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """Memory-mapped float16 features of ``N`` images, per stream.

    Attributes:
        directory: where the ``.npy`` files are.
        ok: indices (into the items given to :func:`build_feature_cache`) of the images that
            could be read, in cache row order.
        arrays: stream name -> ``(N_ok, C, h, w)`` float16 memmap (``image`` always; ``seg``,
            ``static`` for guided encoders).
    """

    def __init__(self, directory: str, ok: List[int], arrays: Dict[str, np.ndarray]):
        self.directory = directory
        self.ok = ok
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.ok)

    def get(self, rows, device="cpu") -> StreamFeatures:
        """Rows of the cache as float32 :class:`StreamFeatures` on ``device``.

        Args:
            rows: a slice, or a sequence / LongTensor of cache row indices.
        """
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        if not isinstance(rows, slice):
            rows = np.asarray(rows, np.int64)
        out = {k: torch.from_numpy(np.array(a[rows], dtype=np.float32)).to(device=device)  # a writable copy
               for k, a in self.arrays.items()}
        return StreamFeatures(out["image"], out.get("seg"), out.get("static"))

    def nbytes(self) -> int:
        """Bytes on disk."""
        return int(sum(a.nbytes for a in self.arrays.values()))


def _open(directory: str) -> Optional[FeatureCache]:
    try:
        with open(os.path.join(directory, "meta.json")) as fh:
            meta = json.load(fh)
        arrays = {k: np.load(os.path.join(directory, f"{k}.npy"), mmap_mode="r") for k in meta["streams"]}
    except (OSError, ValueError, KeyError):
        return None
    return FeatureCache(directory, [int(i) for i in meta["ok"]], arrays)


def build_feature_cache(encoder, items: Sequence[CacheItem], directory: str, pre_tail: bool, seed: int,
                        progress: Optional[str] = None, night_strength: float = 1.0) -> FeatureCache:
    """Compute (or reuse) the features of ``items`` in ``directory``.

    Images are decoded and resized by :func:`~vpr_localizer.io.image_files.iter_image_batches`
    (unreadable ones skipped with a warning); night items are darkened by
    :func:`~vpr_localizer.training.augment.simulate_night`, seeded by ``seed`` and the image name.
    Features are those of :meth:`Encoder.stream_features`, cut before the backbone's trainable
    tail when ``pre_tail`` (VGG16: pool4 output, 512 x H/16 x W/16).

    Args:
        encoder: the :class:`~vpr_localizer.models.encoder.Encoder` being trained.
        items: the images.
        directory: cache directory (created; an existing cache with another :func:`cache_key`
            is replaced).
        pre_tail: stop before the backbone tail (the tail is trained).
        seed: night-simulation seed.
        progress: progress-bar label, or None.
        night_strength: :func:`~vpr_localizer.training.augment.simulate_night` strength.

    Returns:
        The :class:`FeatureCache`.

    Raises:
        DatasetError: no image could be read.
        WeightsError: ``pre_tail`` on a backbone without a tail.
    """
    from vpr_localizer.progress import progress_bar

    key = cache_key(encoder, items, pre_tail, seed, night_strength)
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as fh:
                if json.load(fh).get("key") == key:
                    cached = _open(directory)
                    if cached is not None:
                        return cached
        except (OSError, ValueError):
            pass
        shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    cfg = encoder.config
    arrays: Dict[str, np.ndarray] = {}
    ok: List[int] = []
    row = 0
    bar = progress_bar(total=len(items), desc=progress, unit="img", disable=progress is None, leave=False)
    for idx, batch in iter_image_batches([it.path for it in items], cfg.image_size, cfg.batch_size,
                                         on_skip=lambda p, r: bar.update(1)):
        for j, i in enumerate(idx):
            if items[i].night:
                rng = np.random.default_rng([seed, zlib.crc32(items[i].name.encode())])
                batch[j] = simulate_night(batch[j], rng, night_strength)
        f = encoder.stream_features(batch, pre_tail=pre_tail)
        for name in STREAMS:
            t = getattr(f, name)
            if t is None:
                continue
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy.tmp"), mode="w+",
                                                         dtype=np.float16, shape=(len(items),) + tuple(t.shape[1:]))
            arrays[name][row:row + len(idx)] = t.to("cpu", torch.float16).numpy()
        row += len(idx)
        ok.extend(int(i) for i in idx)
        bar.update(len(idx))
    bar.close()
    if not ok:
        raise DatasetError(f"none of the {len(items)} training images could be read")
    for name, a in arrays.items():
        a.flush()
        del a
        os.replace(os.path.join(directory, f"{name}.npy.tmp"), os.path.join(directory, f"{name}.npy"))
    arrays.clear()
    with open(meta_path + ".tmp", "w") as fh:
        json.dump({"key": key, "ok": ok, "rows": row,
                   "streams": [s for s in STREAMS if os.path.isfile(os.path.join(directory, f"{s}.npy"))]}, fh)
    os.replace(meta_path + ".tmp", meta_path)
    cache = _open(directory)
    assert cache is not None
    # rows beyond the readable images are never indexed (the arrays keep the full length)
    return cache
