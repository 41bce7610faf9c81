"""Patch-NetVLAD descriptors: NetVLAD aggregated over dense square windows of the feature map.

Hausler, Garg, Xu, Milford, Fischer, "Patch-NetVLAD: Multi-Scale Fusion of Locally-Global
Descriptors for Place Recognition", CVPR 2021, Sec. 3.2-3.4.

The patch descriptors come from the SAME conv feature map and the SAME :class:`NetVLAD` layer as
the global descriptor. For a p x p window W of the ``(h, w)`` feature grid (stride s between
windows, s = 1 in the paper) the patch descriptor is exactly NetVLAD's Eq. (4) restricted to W::

    V_W(k) = sum_{i in W} m_i a_k(x_i) (x_i - c_k)        (x_i L2-normalised local features,
                                                          a_k the soft assignment, Eq. 3,
                                                          m_i an optional per-location weight)
    f_W = L2( [ L2(V_W(1)), ..., L2(V_W(K)) ] )           (intra-normalisation, then L2)

then optionally PCA-whitened with the map's global PCA (truncated to ``pca_dim`` components) and
L2-normalised again.

Efficiency (the paper's "IntegralVLAD", Sec. 3.4): the weighted residuals
``r_i(k) = m_i a_k(x_i) (x_i - c_k)`` are computed ONCE per location (``(h, w, K, C)``), then
summed over every window of every patch size without recomputing the assignment. Two box-sum
methods, both O(1) or O(log p) full-map passes per patch size:

* ``box_sum="doubling"`` (default): separable sliding-window sums built by doubling
  (``S_2 = S_1 + shift(S_1, 1)``, ``S_4 = S_2 + shift(S_2, 2)``, ..., ``S_5 = S_4 + shift(S_1, 4)``),
  rows first, then columns, in float32. Each window sum only adds values from inside the window,
  so it carries the same rounding as NetVLAD on the cropped window.
* ``box_sum="integral"``: the paper's integral feature map (2-D cumulative sums ``I``, float64 by
  default) and 4 look-ups per window: ``S = I[y+p, x+p] - I[y, x+p] - I[y+p, x] + I[y, x]``.
  The difference cancels sums over the whole image, leaving a rounding noise of about
  ``eps * |I|``. Intra-normalisation (``F.normalize``, eps 1e-12) amplifies that noise by up to
  1e12 for a cluster with (almost) no assignment mass inside the window, so with sharp
  (k-means-initialised) assignments the descriptor differs from NetVLAD-on-the-window by up to
  ~1e-4 in float64 (6e-5 in the unit test's K = 8, C = 16 case) and by up to 2e-2 in float32
  (the authors' code; measured on a 40x30 grid, C = 512, K = 64, where float64 stays ~3e-7).
  Kept for reference and for comparison with the authors' code.
* ``box_sum="gemm"``: no per-location residual table at all. Eq. (4) over a window is
  ``V_W(k) = sum_{i in W} a'_k(x_i) x_i - (sum_{i in W} a'_k(x_i)) c_k`` (a' = m a), i.e. one
  ``(K x p^2) @ (p^2 x C)`` product per window: the windows' assignments and features are
  gathered with ``unfold`` and multiplied by one batched GEMM. Only in-window values are added
  (same rounding class as ``doubling``); ``P p^2 K C`` multiply-adds per size (e.g. 336 windows
  of 5x5 on a 32x16 grid: 2.8e8) run at BLAS speed instead of the memory-bound passes over the
  ``K*C*h*w`` table, about 5-10x faster on CPU. Used by the map builder
  (:class:`~vpr_localizer.models.patch_encoder.PatchEncoder`).

The per-location residuals need ``K*C*h*w`` float32 (157 MB for K = 64, C = 512, 40x30), and the
doubling tables about three times that; images are processed one at a time.

Coordinates: the feature grid has ``h`` rows and ``w`` columns; feature cell (row i, col j) has
its centre at (x, y) = (j, i) "feature-grid cells". A p x p patch with top-left cell (row r*s,
col c*s) has centre ``(c*s + (p-1)/2, r*s + (p-1)/2)``. Patches are ordered row-major (patch
index = r * cols + c). For VGG16 conv5_3 (stride 16 px, receptive field 196 px, padding 90 px)
a grid coordinate u maps to the pixel ``16 u + 7.5`` in the network input image (the official
code's receptive-box centres).

Grid size: a p x p patch needs ``p <= min(h, w)``. With VGG16 (16 px per cell) Nordland's
128x64 px input gives an 8x4 grid (too small for p = 5, 8); 512x256 px gives 32x16; the
paper's 640x480 px gives 40x30.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from vpr_localizer.models.aggregation import NetVLAD
from vpr_localizer.models.pca import PCAWhitening

#: The paper's patch sizes (feature-grid cells) for performance mode; speed mode uses (5,).
DEFAULT_PATCH_SIZES: Tuple[int, ...] = (2, 5, 8)

IntOrSeq = Union[int, Sequence[int]]
BOX_SUMS = ("doubling", "integral", "gemm")


# --------------------------------------------------------------------------------------------
# Patch grid geometry
# --------------------------------------------------------------------------------------------

def _strides_for(patch_sizes: Sequence[int], strides: IntOrSeq) -> Tuple[int, ...]:
    """Broadcast ``strides`` (one int or one per patch size) to a tuple; ValueError otherwise."""
    if isinstance(strides, (int, np.integer)):
        out = (int(strides),) * len(patch_sizes)
    else:
        out = tuple(int(s) for s in strides)
    if len(out) != len(patch_sizes):
        raise ValueError(f"need one stride per patch size: patch sizes {tuple(patch_sizes)}, strides {out}")
    if any(s < 1 for s in out):
        raise ValueError(f"patch strides must be >= 1, got {out}")
    return out


def patch_grid_problem(grid_hw: Tuple[int, int], patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES) -> Optional[str]:
    """Why a feature grid cannot hold the patch sizes, or None when it can.

    Args:
        grid_hw: feature-map size ``(h, w)`` in feature-grid cells (rows, columns).
        patch_sizes: square patch sizes p in cells; each needs ``1 <= p <= min(h, w)``.

    Returns:
        None if every patch size fits, else a one-line explanation naming the offending sizes,
        the grid and the input size that would be needed with a 16 px/cell backbone (VGG16).
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    sizes = [int(p) for p in patch_sizes]
    if not sizes:
        return "no patch sizes given"
    bad_nonpos = [p for p in sizes if p < 1]
    if bad_nonpos:
        return f"patch sizes must be >= 1, got {bad_nonpos}"
    if h < 1 or w < 1:
        return f"empty feature grid h={h} x w={w}"
    bad = [p for p in sizes if p > min(h, w)]
    if not bad:
        return None
    need = max(bad)
    return (f"feature grid h={h} x w={w} cells is too small for patch size(s) {bad}: a p x p patch "
            f"needs p <= min(h, w) = {min(h, w)}. Use a larger network input (VGG16 conv5_3 has "
            f"16 px per cell, so p={need} needs at least {16 * need} px on the shorter side; "
            f"e.g. 128x64 px gives 8x4 cells, 512x256 px gives 32x16) or smaller patch sizes.")


def check_patch_grid(grid_hw: Tuple[int, int], patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES) -> None:
    """Raise ValueError (message of :func:`patch_grid_problem`) unless every patch size fits the grid."""
    problem = patch_grid_problem(grid_hw, patch_sizes)
    if problem is not None:
        raise ValueError(problem)


def patch_grid_shape(grid_hw: Tuple[int, int], patch_size: int, stride: int = 1) -> Tuple[int, int]:
    """``(rows, cols)`` of p x p patches at stride s on an ``(h, w)`` grid:
    ``((h - p) // s + 1, (w - p) // s + 1)``. Raises ValueError when the patch does not fit."""
    check_patch_grid(grid_hw, (patch_size,))
    _strides_for((patch_size,), stride)
    h, w = int(grid_hw[0]), int(grid_hw[1])
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def patch_centres(grid_hw: Tuple[int, int], patch_size: int, stride: int = 1) -> np.ndarray:
    """Centres of the p x p patches, row-major, as ``(P, 2)`` float32 (x, y) in feature-grid cells
    (cell (row i, col j) is centred at (j, i)); P = rows * cols of :func:`patch_grid_shape`."""
    rows, cols = patch_grid_shape(grid_hw, patch_size, stride)
    off = (patch_size - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(rows) * stride + off, np.arange(cols) * stride + off, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def num_patches(grid_hw: Tuple[int, int], patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES,
                strides: IntOrSeq = 1) -> List[int]:
    """Patches per scale, ``[rows_s * cols_s]`` (ValueError if a size does not fit)."""
    st = _strides_for(patch_sizes, strides)
    out = []
    for p, s in zip(patch_sizes, st):
        r, c = patch_grid_shape(grid_hw, int(p), s)
        out.append(r * c)
    return out


def bytes_per_keyframe(grid_hw: Tuple[int, int], patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES,
                       dim: int = 4096, strides: IntOrSeq = 1, bytes_per_value: int = 2) -> int:
    """Storage of one keyframe's patch descriptors: ``sum_s P_s * dim * bytes_per_value``.

    Defaults to float16 (2 bytes). Patch centres of a regular grid are not stored (they follow
    from the grid size, see :func:`to_storage`), so they add nothing; the few bytes of metadata
    are ignored.

    Example: a 40x30 grid (640x480 px through VGG16), sizes (2, 5, 8), 4096 dims ->
    (1131 + 936 + 759) patches * 4096 * 2 B = 23.2 MB per keyframe.
    """
    return int(sum(num_patches(grid_hw, patch_sizes, strides)) * int(dim) * int(bytes_per_value))


# --------------------------------------------------------------------------------------------
# Patch descriptors
# --------------------------------------------------------------------------------------------

@dataclass
class PatchDescriptors:
    """One image's patch descriptors at one patch size.

    Attributes:
        patch_size: p, the square patch side in feature-grid cells.
        descriptors: ``(P, D)`` L2-normalised descriptors, float32 (float16 only in storage).
        centres: ``(P, 2)`` float32 patch centres (x, y) in feature-grid cells.
        stride: step between neighbouring patches, cells (1 in the paper).
        grid_hw: the feature map's ``(h, w)`` in cells, or None for hand-built sets.
    """

    patch_size: int
    descriptors: np.ndarray
    centres: np.ndarray
    stride: int = 1
    grid_hw: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        d = np.asarray(self.descriptors)
        c = np.asarray(self.centres, dtype=np.float32)
        if d.ndim != 2:
            raise ValueError(f"patch descriptors must be (P, D), got shape {d.shape}")
        if c.shape != (d.shape[0], 2):
            raise ValueError(f"patch centres must be (P, 2) = ({d.shape[0]}, 2), got {c.shape}")
        self.descriptors, self.centres = d, c
        self.patch_size, self.stride = int(self.patch_size), int(self.stride)
        if self.grid_hw is not None:
            self.grid_hw = (int(self.grid_hw[0]), int(self.grid_hw[1]))

    @property
    def num_patches(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])


def _pca_tensors(pca: PCAWhitening, dim: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(components^T (D_in, dim), offset (dim,), scale (dim,)) for ``y = (x @ C^T - mu @ C^T) * scale``.

    Same transform as :meth:`PCAWhitening.transform` (``diag(lambda + eps*lambda_max)^-1/2
    U^T (x - mu)``, then L2), truncated to the first ``dim`` components. The regulariser uses the
    largest eigenvalue, which the truncation keeps, so truncating a fitted PCA equals fitting
    it with fewer dimensions.
    """
    comps = np.ascontiguousarray(pca.components[:dim], dtype=np.float32)  # (dim, D_in); no float64 copy (512 MB at 4096 x 32768)
    evals = np.asarray(pca.eigenvalues[:dim], dtype=np.float64)
    reg = pca.eps * float(np.asarray(pca.eigenvalues).max()) if pca.eigenvalues.size else 0.0
    scale = 1.0 / np.sqrt(evals + reg + 1e-12)
    offset = comps @ np.asarray(pca.mean, dtype=np.float32)
    ct = torch.from_numpy(comps).to(device).T  # (D_in, dim) view: desc @ ct is a plain GEMM
    return ct, torch.from_numpy(offset.astype(np.float32)).to(device), torch.from_numpy(scale.astype(np.float32)).to(device)


class PatchNetVLAD:
    """Patch-NetVLAD extractor bound to a NetVLAD layer (and optionally the map's PCA).

    Args:
        netvlad: the :class:`NetVLAD` layer that makes the global descriptor (K clusters, C dims).
        patch_sizes: square patch sizes in feature-grid cells (paper: 2, 5, 8; speed mode: 5).
        strides: one stride for all sizes or one per size, cells (paper: 1).
        pca: fitted :class:`PCAWhitening` of the global descriptors (input dim must be K*C), or
            None for raw K*C-dim patch descriptors.
        pca_dim: output dimension; None = all of ``pca``'s components; must be
            ``1 <= pca_dim <= pca.dim`` (paper: 4096 performance, 512 speed).
        box_sum: ``doubling`` (exact window sums, float32; default) | ``integral`` (the paper's
            integral feature map; module doc for its rounding) | ``gemm`` (per-window GEMM of
            assignments and features, no residual table; module doc).
        integral_dtype: accumulation dtype of ``integral`` (float64 default).

    Raises:
        ValueError: bad patch sizes / strides, PCA input dimension != K*C (e.g. a PCA fitted on
            the concatenated image + segmentation streams), pca_dim out of range.
    """

    def __init__(self, netvlad: NetVLAD, patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES,
                 strides: IntOrSeq = 1, pca: Optional[PCAWhitening] = None,
                 pca_dim: Optional[int] = None, box_sum: str = "doubling",
                 integral_dtype: torch.dtype = torch.float64):
        self.netvlad = netvlad
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        if not self.patch_sizes or any(p < 1 for p in self.patch_sizes):
            raise ValueError(f"patch sizes must be a non-empty list of ints >= 1, got {tuple(patch_sizes)}")
        self.strides = _strides_for(self.patch_sizes, strides)
        self.pca = pca
        raw_dim = netvlad.num_clusters * netvlad.dim
        if pca is not None:
            if pca.input_dim != raw_dim:
                raise ValueError(f"PCA expects {pca.input_dim}-dim input but patch descriptors have "
                                 f"K*C = {netvlad.num_clusters}*{netvlad.dim} = {raw_dim} dims (a PCA fitted "
                                 f"on concatenated streams cannot project single-stream patches)")
            self.pca_dim = pca.dim if pca_dim is None else int(pca_dim)
            if not 1 <= self.pca_dim <= pca.dim:
                raise ValueError(f"pca_dim must be in [1, {pca.dim}] (the fitted PCA's dimension), got {pca_dim}")
        else:
            if pca_dim is not None:
                raise ValueError("pca_dim given without a fitted PCA")
            self.pca_dim = None
        if box_sum not in BOX_SUMS:
            raise ValueError(f"box_sum must be one of {BOX_SUMS}, got {box_sum!r}")
        self.box_sum = box_sum
        self.integral_dtype = integral_dtype
        self._pca_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def out_dim(self) -> int:
        """Patch descriptor dimension: ``pca_dim`` or K*C."""
        return self.pca_dim if self.pca_dim is not None else self.netvlad.num_clusters * self.netvlad.dim

    # ---- building blocks ---------------------------------------------------------------------

    @torch.no_grad()
    def location_residuals(self, features: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-location weighted residuals ``r_i(k) = m_i a_k(x_i) (x_i - c_k)`` (NetVLAD Eq. 4 terms).

        Args:
            features: ``(B, C, h, w)`` float32 conv features (not yet normalised; NetVLAD's input
                normalisation is applied here when the layer has it).
            weights: ``(B, 1, h, w)`` non-negative per-location weights m_i (static mask /
                attention, as given to ``NetVLAD.forward``), or None = 1.

        Returns:
            ``(B, h, w, K, C)`` float32 (channels last, so that each location's K*C vector is
            contiguous for the box sums). Summing over (h, w) and normalising gives
            exactly ``NetVLAD.forward``.
        """
        nv = self.netvlad
        if features.ndim != 4 or features.shape[1] != nv.dim:
            raise ValueError(f"features must be (B, {nv.dim}, h, w), got {tuple(features.shape)}")
        x = F.normalize(features, p=2, dim=1) if nv.normalize_input else features
        a = nv.soft_assignment(x)  # (B, K, h, w)
        if weights is not None:
            if weights.shape != (features.shape[0], 1) + tuple(features.shape[2:]):
                raise ValueError(f"weights must be (B, 1, h, w) = {(features.shape[0], 1) + tuple(features.shape[2:])}, "
                                 f"got {tuple(weights.shape)}")
            a = a * weights
        xl = x.permute(0, 2, 3, 1).unsqueeze(3)  # (B, h, w, 1, C)
        al = a.permute(0, 2, 3, 1).unsqueeze(4)  # (B, h, w, K, 1)
        return (xl - nv.centroids.to(x.dtype)).mul_(al)  # (B, h, w, K, C)

    @staticmethod
    def integral(residuals: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Integral image of one image's residuals: ``(h, w, KC)`` -> ``(h+1, w+1, KC)`` in ``dtype``
        with ``I[y, x] = sum_{i<y, j<x} r[i, j]`` (a zero first row and column)."""
        h, w, kc = residuals.shape
        out = torch.zeros((h + 1, w + 1, kc), dtype=dtype, device=residuals.device)
        inner = out[1:, 1:]
        inner.copy_(residuals)  # in place: one (h+1, w+1, KC) buffer, no temporaries
        inner.cumsum_(0)
        inner.cumsum_(1)
        return out

    @staticmethod
    def window_sums(integral: torch.Tensor, patch_size: int, stride: int = 1) -> torch.Tensor:
        """Box sums of all p x p windows at stride s from an integral image:
        ``(h+1, w+1, KC)`` -> ``(rows, cols, KC)`` (same dtype), rows = (h - p) // s + 1."""
        p, st = int(patch_size), int(stride)
        i = integral
        n0, n1 = i.shape[0] - p, i.shape[1] - p  # h - p + 1, w - p + 1 windows at stride 1
        lo0, hi0 = slice(0, n0, st), slice(p, p + n0, st)
        lo1, hi1 = slice(0, n1, st), slice(p, p + n1, st)
        s = i[hi0, hi1] - i[lo0, hi1]
        s -= i[hi0, lo1]
        s += i[lo0, lo1]
        return s

    @staticmethod
    def sliding_sums(x: torch.Tensor, sizes: Sequence[int], dim: int) -> Dict[int, torch.Tensor]:
        """Sums of ``p`` consecutive slices along ``dim`` for each p in ``sizes`` (stride 1), by
        doubling: ``{p: (..., n - p + 1, ...)}``. Only in-window values are added (no cancellation).
        The result for a p that is a power of two may be a view of an intermediate table."""
        n = x.shape[dim]
        pow2 = {1: x}
        q = 1
        while 2 * q <= max(sizes):
            prev = pow2[q]
            m = prev.shape[dim] - q
            pow2[2 * q] = prev.narrow(dim, 0, m) + prev.narrow(dim, q, m)
            q *= 2
        out = {}
        for p in sizes:
            length = n - p + 1
            parts, off = [], 0
            for bit in reversed(range(int(p).bit_length())):  # p = sum of powers of two, largest first
                q = 1 << bit
                if p & q:
                    parts.append(pow2[q].narrow(dim, off, length))
                    off += q
            acc = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            for part in parts[2:]:
                acc += part
            out[int(p)] = acc
        return out

    def box_sums(self, residuals: torch.Tensor) -> List[torch.Tensor]:
        """Window sums of one image's residuals for every (patch size, stride):
        ``(h, w, KC)`` float32 -> ``[(rows_s, cols_s, KC)]`` float32, by ``self.box_sum``."""
        if self.box_sum == "integral":
            integ = self.integral(residuals, self.integral_dtype)
            return [self.window_sums(integ, p, s).to(torch.float32) for p, s in zip(self.patch_sizes, self.strides)]
        sizes = sorted(set(self.patch_sizes))
        rows = self.sliding_sums(residuals, sizes, 0)  # (h - p + 1, w, KC)
        out = {}
        for p in sizes:
            out[p] = self.sliding_sums(rows.pop(p), (p,), 1)[p]  # (h - p + 1, w - p + 1, KC)
        return [out[p][::s, ::s] if s > 1 else out[p] for p, s in zip(self.patch_sizes, self.strides)]

    @torch.no_grad()
    def gemm_window_sums(self, features: torch.Tensor, weights: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Window sums of NetVLAD Eq. (4) for every (patch size, stride) without the residual table.

        ``V_W(k) = A_W[:, k]^T X_W - (sum_i A_W[i, k]) c_k`` with ``A_W`` the ``(p^2, K)`` weighted
        soft assignments and ``X_W`` the ``(p^2, C)`` (input-normalised) features of window W.

        Args:
            features: ``(1, C, h, w)`` float32 conv features of ONE image.
            weights: ``(1, 1, h, w)`` per-location weights or None.

        Returns:
            ``[(rows_s, cols_s, K*C)]`` float32, as :meth:`box_sums` of the residuals.
        """
        nv = self.netvlad
        _, c, h, w = features.shape
        x = F.normalize(features, p=2, dim=1) if nv.normalize_input else features
        a = nv.soft_assignment(x)  # (1, K, h, w)
        if weights is not None:
            a = a * weights
        k = nv.num_clusters
        cent = nv.centroids.to(x.dtype)
        out = []
        for p, st in zip(self.patch_sizes, self.strides):
            rows, cols = (h - p) // st + 1, (w - p) // st + 1
            au = F.unfold(a, p, stride=st)[0].reshape(k, p * p, rows * cols).permute(2, 0, 1)  # (L, K, p^2)
            xu = F.unfold(x, p, stride=st)[0].reshape(c, p * p, rows * cols).permute(2, 1, 0)  # (L, p^2, C)
            v = torch.bmm(au, xu)  # (L, K, C): sum_i a_ik x_i
            v -= au.sum(dim=2).unsqueeze(2) * cent.unsqueeze(0)
            out.append(v.reshape(rows, cols, k * c))
        return out

    def _project(self, desc: torch.Tensor) -> torch.Tensor:
        if self.pca is None:
            return desc
        key = str(desc.device)
        if key not in self._pca_cache:
            self._pca_cache[key] = _pca_tensors(self.pca, self.pca_dim, desc.device)
        ct, offset, scale = self._pca_cache[key]
        y = (desc @ ct - offset) * scale
        return F.normalize(y, p=2, dim=1)

    # ---- extraction -------------------------------------------------------------------------

    @torch.no_grad()
    def extract(self, features: torch.Tensor, weights: Optional[torch.Tensor] = None) -> List[List[PatchDescriptors]]:
        """Patch descriptors of every image of a batch, at every patch size.

        Args:
            features: ``(B, C, h, w)`` float32 conv features (``StreamFeatures.image``), on the
                NetVLAD layer's device.
            weights: optional ``(B, 1, h, w)`` per-location weights (see :meth:`location_residuals`).

        Returns:
            ``out[b][s]``: :class:`PatchDescriptors` of image b at ``patch_sizes[s]``, with
            ``(P_s, out_dim)`` float32 L2-normalised descriptors (numpy, CPU) and ``(P_s, 2)``
            float32 centres (x, y) in feature-grid cells, row-major.

        Raises:
            ValueError: wrong feature shape, or a patch size larger than the grid
                (:func:`patch_grid_problem`).
        """
        if features.ndim != 4:
            raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
        b, _, h, w = features.shape
        check_patch_grid((h, w), self.patch_sizes)
        k, c = self.netvlad.num_clusters, self.netvlad.dim
        centres = [patch_centres((h, w), p, s) for p, s in zip(self.patch_sizes, self.strides)]
        out: List[List[PatchDescriptors]] = []
        for bi in range(b):  # one image at a time: the residuals are K*C*h*w floats (157 MB at 64*512*40*30)
            wb = None if weights is None else weights[bi:bi + 1]
            if self.box_sum == "gemm":
                if wb is not None and wb.shape != (1, 1, h, w):
                    raise ValueError(f"weights must be (B, 1, h, w) = {(b, 1, h, w)}, got {tuple(weights.shape)}")
                sums = self.gemm_window_sums(features[bi:bi + 1], wb)
            else:
                res = self.location_residuals(features[bi:bi + 1], wb)[0].reshape(h, w, k * c)
                sums = self.box_sums(res)
                del res
            scales = []
            for p, s, cen, v in zip(self.patch_sizes, self.strides, centres, sums):
                v = v.reshape(-1, k, c)
                v = F.normalize(v, p=2, dim=2).reshape(-1, k * c)  # intra-normalisation
                v = F.normalize(v, p=2, dim=1)
                v = self._project(v)
                scales.append(PatchDescriptors(p, v.cpu().numpy().astype(np.float32, copy=False), cen, s, (h, w)))
            del sums
            out.append(scales)
        return out


def extract_patch_descriptors(netvlad: NetVLAD, features: torch.Tensor,
                              patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES, strides: IntOrSeq = 1,
                              weights: Optional[torch.Tensor] = None, pca: Optional[PCAWhitening] = None,
                              pca_dim: Optional[int] = None, box_sum: str = "doubling") -> List[List[PatchDescriptors]]:
    """One-shot form of :meth:`PatchNetVLAD.extract` (builds the extractor each call; keep a
    :class:`PatchNetVLAD` around to reuse its on-device PCA matrices)."""
    return PatchNetVLAD(netvlad, patch_sizes, strides, pca, pca_dim, box_sum).extract(features, weights)


# --------------------------------------------------------------------------------------------
# Storage (float16)
# --------------------------------------------------------------------------------------------

def to_storage(patches: Sequence[PatchDescriptors], prefix: str = "") -> Dict[str, np.ndarray]:
    """One keyframe's patch sets as a flat dict of arrays (for ``np.savez`` or the map store).

    Keys (all prefixed by ``prefix``): ``patch_sizes`` (S,) int32, ``strides`` (S,) int32,
    ``grid_hw`` (2,) int32 (-1, -1 when unknown), ``desc_<s>`` (P_s, D) float16 and, only when
    the centres are not those of the regular grid, ``centres_<s>`` (P_s, 2) float32.

    float16 keeps ~3 significant digits; descriptors are unit vectors with components in [-1, 1],
    so the round trip changes inner products by about 1e-3 at most.
    """
    sizes = np.array([p.patch_size for p in patches], dtype=np.int32)
    grids = {p.grid_hw for p in patches}
    grid = next(iter(grids)) if len(grids) == 1 else None
    if len(grids) > 1:
        raise ValueError(f"patch sets of one keyframe must share the feature grid, got {sorted(map(str, grids))}")
    out = {prefix + "patch_sizes": sizes,
           prefix + "strides": np.array([p.stride for p in patches], dtype=np.int32),
           prefix + "grid_hw": np.array(grid if grid is not None else (-1, -1), dtype=np.int32)}
    for i, p in enumerate(patches):
        out[f"{prefix}desc_{i}"] = np.asarray(p.descriptors, dtype=np.float16)
        regular = False
        if grid is not None:
            try:
                ref = patch_centres(grid, p.patch_size, p.stride)
                regular = ref.shape == p.centres.shape and np.array_equal(ref, p.centres)
            except ValueError:
                regular = False
        if not regular:
            out[f"{prefix}centres_{i}"] = np.asarray(p.centres, dtype=np.float32)
    return out


def from_storage(arrays: Dict[str, np.ndarray], prefix: str = "") -> List[PatchDescriptors]:
    """Inverse of :func:`to_storage`: float32 descriptors, centres from the grid when not stored.

    Raises:
        ValueError: a missing key (names it).
    """
    try:
        sizes = np.asarray(arrays[prefix + "patch_sizes"]).astype(int)
        strides = np.asarray(arrays[prefix + "strides"]).astype(int)
        grid_arr = np.asarray(arrays[prefix + "grid_hw"]).astype(int)
    except KeyError as e:
        raise ValueError(f"patch storage lacks key {e.args[0]!r}") from None
    grid = None if grid_arr[0] < 0 else (int(grid_arr[0]), int(grid_arr[1]))
    out = []
    for i, (p, s) in enumerate(zip(sizes, strides)):
        key = f"{prefix}desc_{i}"
        if key not in arrays:
            raise ValueError(f"patch storage lacks key {key!r}")
        desc = np.asarray(arrays[key], dtype=np.float32)
        ckey = f"{prefix}centres_{i}"
        if ckey in arrays:
            cen = np.asarray(arrays[ckey], dtype=np.float32)
        elif grid is not None:
            cen = patch_centres(grid, int(p), int(s))
        else:
            raise ValueError(f"patch storage lacks {ckey!r} and has no grid to recompute it")
        out.append(PatchDescriptors(int(p), desc, cen, int(s), grid))
    return out
