"""Patch-NetVLAD descriptors of a map's keyframes, on disk and while a map is being built.

Hausler, Garg, Xu, Milford, Fischer, "Patch-NetVLAD: Multi-Scale Fusion of Locally-Global
Descriptors for Place Recognition", CVPR 2021 (patch descriptors: :mod:`vpr_localizer.models.patch_netvlad`;
how an encoder makes them and the patch PCA: :mod:`vpr_localizer.models.patch_encoder`).

Files in the map directory (only in maps built with ``--patches``; each listed in ``map.yaml``
``files`` with its size and SHA-256 like the other map files)::

    patches.npy        (R, D) float16, every keyframe's patch descriptors, memory-mapped on load:
                       keyframe i owns rows offsets[i]:offsets[i+1], ordered by patch size (the
                       order of patch_sizes), then row-major over the patch grid
    patch_offsets.npy  (N+1,) int64 row offsets (offsets[0] = 0, offsets[N] = R)
    patch_pca.npz      the patch PCA whitening (mean (K*C,), components (D, K*C),
                       eigenvalues (D,) float32, eps)

and a ``patches`` section in ``map.yaml``: ``patch_sizes`` and ``strides`` (feature-grid cells),
``dim`` (D), ``grid_hw`` (the conv feature grid, cells), ``counts`` (patches per keyframe per
size), ``dtype``, ``bytes_per_keyframe``, ``weights`` (``image_stream`` for a guided encoder's
weighted NetVLAD, else ``uniform``), ``encoder_params_sha256`` (the map encoder's
``params_sha256``), ``pca`` (input_dim, dim, images, samples, eps). :meth:`MapPatches.load`
checks all of it against the files and the map's fingerprint; any inconsistency is a
:class:`~vpr_localizer.errors.MapError`. Patch centres are not stored: they follow from the grid.

Every keyframe of a map has the same grid (the encoder's fixed input size), hence
``rows_per_keyframe = sum(counts)`` rows: ``bytes_per_keyframe = sum(counts) * D * 2``
(e.g. 1,026 patches x 512 dims x 2 B = 1.05 MB at 32x16 cells with sizes 2, 5, 8).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vpr_localizer.errors import FingerprintMismatchError, MapError
from vpr_localizer.models.patch_netvlad import PatchDescriptors, num_patches, patch_centres
from vpr_localizer.models.pca import PCAWhitening

LOG = logging.getLogger(__name__)

PATCHES_FILE = "patches.npy"
PATCH_OFFSETS_FILE = "patch_offsets.npy"
PATCH_PCA_FILE = "patch_pca.npz"
PATCH_FILES = (PATCHES_FILE, PATCH_OFFSETS_FILE, PATCH_PCA_FILE)
#: The text of the error raised when re-ranking is asked of a map without patches.
NO_PATCHES_MESSAGE = "this map has no patch descriptors; rebuild it with --patches"
_DTYPE = np.dtype("<f2")
_COPY_ROWS = 1 << 14


@functools.lru_cache(maxsize=64)
def _centres(grid_hw: Tuple[int, int], patch_size: int, stride: int) -> np.ndarray:
    """:func:`patch_centres`, cached (one read-only array per layout and size)."""
    c = patch_centres(grid_hw, patch_size, stride)
    c.flags.writeable = False
    return c


@dataclass(frozen=True)
class PatchLayout:
    """Shape of every keyframe's patch set.

    Attributes:
        patch_sizes: square patch sizes, feature-grid cells.
        strides: one stride per size, cells.
        dim: descriptor dimension D.
        grid_hw: the conv feature grid ``(h, w)``, cells.
    """

    patch_sizes: Tuple[int, ...]
    strides: Tuple[int, ...]
    dim: int
    grid_hw: Tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "patch_sizes", tuple(int(p) for p in self.patch_sizes))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "grid_hw", (int(self.grid_hw[0]), int(self.grid_hw[1])))
        if len(self.strides) != len(self.patch_sizes):
            raise ValueError(f"need one stride per patch size: {self.patch_sizes} vs {self.strides}")

    @property
    def counts(self) -> Tuple[int, ...]:
        """Patches per keyframe at each size (ValueError when a size does not fit the grid)."""
        return tuple(num_patches(self.grid_hw, self.patch_sizes, self.strides))

    @property
    def rows_per_keyframe(self) -> int:
        return int(sum(self.counts))

    @property
    def bytes_per_keyframe(self) -> int:
        """float16 storage of one keyframe's patches, bytes."""
        return self.rows_per_keyframe * self.dim * _DTYPE.itemsize

    def stack(self, scales: Sequence[PatchDescriptors]) -> np.ndarray:
        """One image's patch sets -> ``(rows_per_keyframe, dim)`` float32 rows: the sizes in the
        layout's order, each row-major over its patch grid (the ``vpr/patch_netvlad`` message and
        a keyframe's rows in ``patches.npy``). Inverse: :meth:`split`.

        Raises:
            ValueError: the sets' sizes, strides, counts or dimension differ from the layout's.
        """
        by_size = {int(pd.patch_size): pd for pd in scales}
        rows = []
        for p, s, n in zip(self.patch_sizes, self.strides, self.counts):
            pd = by_size.get(p)
            if pd is None or pd.stride != s or pd.num_patches != n or pd.dim != self.dim:
                have = None if pd is None else (pd.stride, pd.num_patches, pd.dim)
                raise ValueError(f"patch set of size {p} does not fit the layout: (stride, patches, dim) "
                                 f"{have} vs {(s, n, self.dim)}")
            rows.append(np.asarray(pd.descriptors, dtype=np.float32))
        return np.concatenate(rows, axis=0)

    def split(self, rows: np.ndarray, patch_sizes: Optional[Sequence[int]] = None) -> List[PatchDescriptors]:
        """Inverse of :meth:`stack`: ``(rows_per_keyframe, dim)`` rows -> the patch sets at
        ``patch_sizes`` (every size when None), in that order, with the grid's centres. The
        descriptors are views of ``rows`` (same dtype).

        Raises:
            ValueError: ``rows`` is not ``(rows_per_keyframe, dim)``, or a size the layout lacks.
        """
        rows = rows if isinstance(rows, np.ndarray) else np.asarray(rows)
        if rows.ndim != 2 or rows.shape != (self.rows_per_keyframe, self.dim):
            raise ValueError(f"patch rows are {tuple(rows.shape)}, this map's layout needs "
                             f"({self.rows_per_keyframe}, {self.dim}) (sizes {list(self.patch_sizes)} on a "
                             f"{self.grid_hw[0]}x{self.grid_hw[1]} grid)")
        starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        out = []
        for p in (self.patch_sizes if patch_sizes is None else patch_sizes):
            p = int(p)
            if p not in self.patch_sizes:
                raise ValueError(f"patch size {p} is not in the layout (sizes {list(self.patch_sizes)})")
            i = self.patch_sizes.index(p)
            out.append(PatchDescriptors(p, rows[starts[i]:starts[i + 1]], _centres(self.grid_hw, p, self.strides[i]),
                                        self.strides[i], self.grid_hw))
        return out

    def config(self) -> Dict:
        """The comparable part: ``{"patch_sizes", "strides", "dim", "grid_hw"}`` as lists / ints."""
        return {"patch_sizes": list(self.patch_sizes), "strides": list(self.strides), "dim": self.dim,
                "grid_hw": list(self.grid_hw)}


def layout_differences(map_config: Dict, expected: Dict) -> List[str]:
    """``key: map A vs running B`` for every key of ``expected`` whose value differs (lists and
    tuples compare equal element-wise)."""
    norm = lambda v: [int(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    out = []
    for key, want in expected.items():
        have = map_config.get(key)
        if norm(have) != norm(want):
            out.append(f"{key}: map {norm(have)} vs running {norm(want)}")
    return out


class MapPatches:
    """The patch descriptors of N keyframes (read-only; rows read lazily from a memory map).

    Args:
        layout: :class:`PatchLayout`.
        pca: the patch PCA whitening (input K*C dims, output ``layout.dim``).
        descriptors: ``(R, dim)`` float16 array or memory map.
        offsets: ``(N+1,)`` int64 row offsets.
        info: extra metadata for the ``patches`` section (``weights``, PCA sample ``images``,
            ``samples``...).
        cleanup: called once when the object is closed or garbage-collected (e.g. removes a
            temporary spool directory).
    """

    def __init__(self, layout: PatchLayout, pca: PCAWhitening, descriptors, offsets: np.ndarray,
                 info: Optional[Dict] = None, cleanup=None):
        self.layout = layout
        self.pca = pca
        self.descriptors = descriptors
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.info = dict(info or {})
        self._finalizer = weakref.finalize(self, cleanup) if cleanup is not None else None

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def bytes_per_keyframe(self) -> int:
        return self.layout.bytes_per_keyframe

    def close(self) -> None:
        """Drop the memory map and run the cleanup (idempotent)."""
        self.descriptors = None
        if self._finalizer is not None:
            self._finalizer()

    def keyframe(self, i: int, patch_sizes: Optional[Sequence[int]] = None) -> List[PatchDescriptors]:
        """Keyframe ``i``'s patch sets at ``patch_sizes`` (all stored sizes when None), in that order:
        :class:`PatchDescriptors` with ``(P_s, dim)`` float16 descriptors (a view of the memory map:
        only these rows are read) and ``(P_s, 2)`` float32 centres (x, y) in feature-grid cells.

        Raises:
            IndexError: ``i`` out of range; KeyError: a size the map does not store.
        """
        if not 0 <= int(i) < len(self):
            raise IndexError(f"keyframe {i} out of range (map has {len(self)} keyframes with patches)")
        if self.descriptors is None:
            raise MapError("patch descriptors are closed")
        base = int(self.offsets[int(i)])
        for p in (patch_sizes or ()):
            if int(p) not in self.layout.patch_sizes:
                raise KeyError(f"patch size {p} is not stored in this map (sizes {list(self.layout.patch_sizes)})")
        return self.layout.split(self.descriptors[base:base + self.layout.rows_per_keyframe], patch_sizes)

    def keyframes(self, ids: Sequence[int], patch_sizes: Optional[Sequence[int]] = None) -> List[List[PatchDescriptors]]:
        """:meth:`keyframe` of each id (lazily: only these keyframes' rows are read)."""
        return [self.keyframe(int(i), patch_sizes) for i in ids]

    # --- on disk -------------------------------------------------------------------------------

    def section(self, encoder_params_sha256: Optional[str] = None) -> Dict:
        """The ``patches`` section of ``map.yaml`` (module doc)."""
        lay = self.layout
        return {
            "method": "Patch-NetVLAD (Hausler et al., CVPR 2021)",
            **lay.config(),
            "counts": list(lay.counts),
            "dtype": "float16",
            "bytes_per_keyframe": int(lay.bytes_per_keyframe),
            "weights": str(self.info.get("weights", "uniform")),
            "encoder_params_sha256": encoder_params_sha256,
            "pca": {"input_dim": int(self.pca.input_dim), "dim": int(self.pca.dim),
                    "images": int(self.info.get("pca_images", 0)), "samples": int(self.info.get("pca_samples", 0)),
                    "eps": float(self.pca.eps)},
            "files": list(PATCH_FILES),
        }

    def write_files(self, directory: str) -> List[str]:
        """Write :data:`PATCH_FILES` into ``directory`` (the map writer's temporary directory).

        ``patches.npy`` is streamed in blocks of rows from the (memory-mapped) source, so a map
        larger than memory can be written.

        Returns:
            The file names written.
        """
        rows, dim = int(self.offsets[-1]), self.layout.dim
        with open(os.path.join(directory, PATCHES_FILE), "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(_DTYPE), "fortran_order": False, "shape": (rows, dim)})
            for a in range(0, rows, _COPY_ROWS):
                f.write(np.ascontiguousarray(self.descriptors[a:min(a + _COPY_ROWS, rows)], dtype=_DTYPE).tobytes())
        np.save(os.path.join(directory, PATCH_OFFSETS_FILE), self.offsets.astype(np.int64), allow_pickle=False)
        st = self.pca.state()
        np.savez(os.path.join(directory, PATCH_PCA_FILE), mean=st["mean"], components=st["components"],
                 eigenvalues=st["eigenvalues"], eps=np.float64(st["eps"]))
        return list(PATCH_FILES)

    @classmethod
    def load(cls, directory: str, section: Dict, num_keyframes: int, fingerprint: Dict,
             listed_files: Sequence[str]) -> "MapPatches":
        """Open and check a map's patch files (the SHA-256 checks are the map loader's).

        Args:
            directory: map directory.
            section: the ``patches`` section of ``map.yaml``.
            num_keyframes: N of the map.
            fingerprint: the map's encoder fingerprint (``num_clusters``, ``local_dim``,
                ``params_sha256``).
            listed_files: the names in ``map.yaml`` ``files``.

        Raises:
            MapError: a missing or unlisted patch file, a malformed section, or files that
                disagree with it, with N or with the fingerprint.
        """
        where = f"map {directory}"
        if not isinstance(section, dict):
            raise MapError(f"{where}: corrupt 'patches' section in map.yaml")
        for name in PATCH_FILES:
            if name not in listed_files:
                raise MapError(f"{where} is incomplete: map.yaml has a 'patches' section but lists no {name}")
        try:
            layout = PatchLayout(section["patch_sizes"], section["strides"], section["dim"], section["grid_hw"])
            counts = list(layout.counts)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MapError(f"{where}: corrupt 'patches' section in map.yaml ({exc})") from None
        if [int(c) for c in section.get("counts", [])] != counts:
            raise MapError(f"{where}: 'patches' counts {section.get('counts')} do not match the patch grid "
                           f"({counts} patches for sizes {list(layout.patch_sizes)} on {list(layout.grid_hw)} cells)")
        if section.get("dtype") != "float16":
            raise MapError(f"{where}: patch dtype {section.get('dtype')!r} is not supported (float16)")
        if section.get("encoder_params_sha256") != fingerprint.get("params_sha256"):
            raise MapError(f"{where} is inconsistent: its patch descriptors were made by another encoder "
                           f"(patches params_sha256 {str(section.get('encoder_params_sha256'))[:12]} vs "
                           f"map encoder {str(fingerprint.get('params_sha256'))[:12]})")
        try:
            offsets = np.load(os.path.join(directory, PATCH_OFFSETS_FILE), allow_pickle=False)
            desc = np.load(os.path.join(directory, PATCHES_FILE), mmap_mode="r", allow_pickle=False)
            with np.load(os.path.join(directory, PATCH_PCA_FILE), allow_pickle=False) as z:
                pca = PCAWhitening(np.asarray(z["mean"], np.float32), np.asarray(z["components"], np.float32),
                                   np.asarray(z["eigenvalues"], np.float32), float(z["eps"]))
        except (OSError, ValueError, KeyError) as exc:
            raise MapError(f"{where}: cannot read its patch files ({exc})") from exc
        rpk = layout.rows_per_keyframe
        if offsets.shape != (num_keyframes + 1,) or offsets.dtype != np.int64 or (
                num_keyframes and not np.array_equal(np.diff(offsets), np.full(num_keyframes, rpk))) or offsets[0] != 0:
            raise MapError(f"{where} is inconsistent: {PATCH_OFFSETS_FILE} does not hold {num_keyframes} keyframes "
                           f"of {rpk} patches")
        if desc.dtype != _DTYPE or desc.shape != (int(offsets[-1]), layout.dim):
            raise MapError(f"{where} is inconsistent: {PATCHES_FILE} is {desc.dtype} {desc.shape}, expected float16 "
                           f"({int(offsets[-1])}, {layout.dim})")
        k_c = int(fingerprint.get("num_clusters", 0)) * int(fingerprint.get("local_dim", 0))
        if pca.input_dim != k_c or pca.dim != layout.dim or pca.mean.shape != (k_c,) or pca.eigenvalues.shape != (layout.dim,):
            raise MapError(f"{where} is inconsistent: {PATCH_PCA_FILE} maps {pca.input_dim} -> {pca.dim} dims, "
                           f"expected K*C = {k_c} -> {layout.dim}")
        pinfo = section.get("pca") or {}
        info = {"weights": section.get("weights", "uniform"), "pca_images": pinfo.get("images", 0),
                "pca_samples": pinfo.get("samples", 0)}
        return cls(layout, pca, desc, offsets, info)


def check_patch_config(vmap_path: str, patches: Optional["MapPatches"], expected: Dict) -> None:
    """Refuse a map whose patch configuration differs from the running one.

    Args:
        vmap_path: the map directory (for the message).
        patches: the map's :class:`MapPatches` (None: the map has none).
        expected: any of ``patch_sizes``, ``strides``, ``dim``, ``grid_hw`` (the running
            encoder's / node's values).

    Raises:
        MapError: the map has no patches (:data:`NO_PATCHES_MESSAGE`).
        FingerprintMismatchError: a value differs (each listed, ``key: map A vs running B``).
    """
    if patches is None:
        raise MapError(f"map {vmap_path}: {NO_PATCHES_MESSAGE}")
    diffs = layout_differences(patches.layout.config(), expected)
    if diffs:
        raise FingerprintMismatchError(f"map {vmap_path} has patch descriptors of another configuration ("
                                       + "; ".join(diffs) + ")")


class PatchSpool:
    """Collects keyframes' patch descriptors in a temporary float16 file while a map is encoded.

    Memory stays at one keyframe's patches however large the map (the map writer later streams
    the file into ``patches.npy``).

    Args:
        layout: :class:`PatchLayout` every keyframe must have.
        pca: the patch PCA used to make them (stored with them).
        info: metadata for the ``patches`` section (:meth:`MapPatches.section`).
        directory: parent of the temporary directory (default: the system's).
    """

    def __init__(self, layout: PatchLayout, pca: PCAWhitening, info: Optional[Dict] = None,
                 directory: Optional[str] = None):
        self.layout, self.pca, self.info = layout, pca, dict(info or {})
        self._dir = tempfile.mkdtemp(prefix="vpr_patches_", dir=directory)
        self._path = os.path.join(self._dir, "patches.f16")
        self._file = open(self._path, "wb")
        self._count = 0
        self._counts = layout.counts

    def __len__(self) -> int:
        return self._count

    def append(self, scales: Sequence[PatchDescriptors]) -> None:
        """Add the next keyframe's patch sets (one per patch size, in the layout's order).

        Raises:
            ValueError: sizes, strides, grid, counts or dimension differ from the layout.
        """
        lay = self.layout
        if ([p.patch_size for p in scales] != list(lay.patch_sizes) or [p.stride for p in scales] != list(lay.strides)
                or any(p.grid_hw != lay.grid_hw or p.dim != lay.dim for p in scales)
                or [p.num_patches for p in scales] != list(self._counts)):
            raise ValueError(f"patch sets {[(p.patch_size, p.stride, p.grid_hw, p.num_patches, p.dim) for p in scales]} "
                             f"do not match the map's patch layout {lay.config()} (counts {list(self._counts)})")
        for p in scales:
            self._file.write(np.ascontiguousarray(p.descriptors, dtype=_DTYPE).tobytes())
        self._count += 1

    def finish(self) -> MapPatches:
        """Close the spool: a :class:`MapPatches` over the file (removed with that object)."""
        self._file.close()
        rows = self._count * self.layout.rows_per_keyframe
        desc = (np.memmap(self._path, dtype=_DTYPE, mode="r", shape=(rows, self.layout.dim)) if rows
                else np.zeros((0, self.layout.dim), _DTYPE))
        offsets = np.arange(self._count + 1, dtype=np.int64) * self.layout.rows_per_keyframe
        return MapPatches(self.layout, self.pca, desc, offsets, self.info,
                          cleanup=lambda d=self._dir: shutil.rmtree(d, ignore_errors=True))

    def discard(self) -> None:
        """Abandon the spool and remove its file."""
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self._dir, ignore_errors=True)
