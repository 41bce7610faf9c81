"""Aggregation of a dense local-feature map into one global descriptor.

* :class:`NetVLAD` -- Arandjelovic, Gronat, Torii, Pajdla, Sivic, "NetVLAD: CNN architecture
  for weakly supervised place recognition", CVPR 2016, Sec. 3.1, Eq. (1)-(4).
* :class:`GeM` -- generalized-mean pooling, Radenovic, Tolias, Chum, "Fine-tuning CNN image
  retrieval with no human annotation", TPAMI 2019, Eq. (3).
* :class:`GlobalAvgPool` -- average pooling (GeM with p = 1), the plain baseline.

All aggregators take ``(B, D, H, W)`` float32 features (D local-feature dims) and an optional
``(B, 1, H, W)`` non-negative per-location weight (a static-structure mask or attention map;
``None`` = all ones), and return L2-normalised ``(B, out_dim)`` float32 descriptors.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class NetVLAD(nn.Module):
    """NetVLAD layer (Arandjelovic et al., CVPR 2016).

    For L2-normalised local features x_i (D dims) and K centroids c_k:

    * soft assignment (Eq. 3): ``a_k(x_i) = softmax_k(w_k . x_i + b_k)``, computed by a 1x1
      convolution with weights w (K x D) and biases b (K);
    * residual aggregation (Eq. 4): ``V(k) = sum_i m_i a_k(x_i) (x_i - c_k)``, with an optional
      per-location weight m_i (1 by default; used for static masks and attention);
    * intra-normalisation of each V(k) (Arandjelovic & Zisserman, CVPR 2013), flattening to
      K*D dims, then L2 normalisation.

    Args:
        num_clusters: K.
        dim: D, local-feature dimension.
        alpha: sharpness used when initialising from centroids (``w_k = 2 alpha c_k``,
            ``b_k = -alpha ||c_k||^2``); replaced by a data-derived value in
            :meth:`init_from_clusters`.
        normalize_input: L2-normalise each local feature across channels first (the
            ``preL2`` of the original NetVLAD models).

    Shapes: ``forward((B, D, H, W), weights=(B, 1, H, W) | None) -> (B, K*D)``.
    """

    def __init__(self, num_clusters: int = 64, dim: int = 512, alpha: float = 100.0,
                 normalize_input: bool = True):
        super().__init__()
        if num_clusters < 1 or dim < 1:
            raise ValueError(f"num_clusters and dim must be positive, got {num_clusters}, {dim}")
        self.num_clusters = int(num_clusters)
        self.dim = int(dim)
        self.alpha = float(alpha)
        self.normalize_input = bool(normalize_input)
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

    @property
    def out_dim(self) -> int:
        """Descriptor dimension K*D."""
        return self.num_clusters * self.dim

    @torch.no_grad()
    def init_from_clusters(self, centroids: np.ndarray, descriptors: np.ndarray) -> None:
        """Initialise centroids and soft-assignment weights from k-means, as NetVLAD does.

        The assignment sharpness alpha is chosen so that, on the sample ``descriptors``, the
        nearest centroid gets about 100x the weight of the second nearest (the rule of the
        authors' and of the common PyTorch re-implementation):
        ``alpha = -log(0.01) / mean(d2_2nd - d2_1st)``.

        Args:
            centroids: ``(K, D)`` float32, k-means centres of L2-normalised local features.
            descriptors: ``(N, D)`` float32 sample of L2-normalised local features, N >= 2.
        """
        c = np.asarray(centroids, dtype=np.float32)
        x = np.asarray(descriptors, dtype=np.float32)
        if c.shape != (self.num_clusters, self.dim):
            raise ValueError(f"centroids must be {(self.num_clusters, self.dim)}, got {c.shape}")
        ct = torch.from_numpy(c)
        xt = torch.from_numpy(x)
        d2 = torch.cdist(xt, ct).pow(2)
        if self.num_clusters >= 2:
            two = torch.topk(d2, 2, dim=1, largest=False).values
            gap = float((two[:, 1] - two[:, 0]).mean())
            self.alpha = float(-np.log(0.01) / max(gap, 1e-6))
        self.centroids.copy_(ct)
        self.conv.weight.copy_((2.0 * self.alpha * ct).unsqueeze(-1).unsqueeze(-1))
        self.conv.bias.copy_(-self.alpha * ct.pow(2).sum(dim=1))

    def kmeans_targets(self) -> List[Tuple[str, "NetVLAD"]]:
        """The NetVLAD layers to initialise by k-means, per stream: ``[("image", self)]``."""
        return [("image", self)]

    def extra_state(self) -> Dict[str, float]:
        """Checkpoint numbers beside the state dict: ``{"alpha": alpha}``."""
        return {"alpha": float(self.alpha)}

    def load_extra_state(self, extra: Dict[str, float]) -> None:
        """Inverse of :meth:`extra_state` (a missing key keeps the current value)."""
        self.alpha = float(extra.get("alpha", self.alpha))

    def soft_assignment(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` (already input-normalised) -> ``(B, K, H, W)`` soft assignment."""
        return F.softmax(self.conv(x), dim=1)

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, d, h, w = x.shape
        if d != self.dim:
            raise ValueError(f"NetVLAD expects {self.dim}-dim features, got {d}")
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        a = self.soft_assignment(x).reshape(b, self.num_clusters, h * w)  # (B, K, N)
        if weights is not None:
            a = a * weights.reshape(b, 1, h * w)
        xf = x.reshape(b, d, h * w)  # (B, D, N)
        vlad = torch.bmm(a, xf.transpose(1, 2))  # sum_i a_ik x_i  -> (B, K, D)
        vlad = vlad - a.sum(dim=2).unsqueeze(-1) * self.centroids.unsqueeze(0)
        vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalisation
        return F.normalize(vlad.reshape(b, -1), p=2, dim=1)


class GeM(nn.Module):
    """Generalized-mean pooling (Radenovic et al., TPAMI 2019, Eq. 3).

    ``f_d = (mean_i m_i x_id^p / mean_i m_i)^(1/p)`` over locations i, features clamped to
    ``eps`` first, then L2 normalisation. ``p = 3`` is the paper's untrained default.

    Shapes: ``(B, D, H, W) -> (B, D)``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        xp = x.clamp(min=self.eps).pow(self.p)
        if weights is None:
            pooled = xp.mean(dim=(2, 3))
        else:
            pooled = (xp * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=self.eps)
        return F.normalize(pooled.pow(1.0 / self.p), p=2, dim=1)


class GlobalAvgPool(nn.Module):
    """Global average pooling of the feature map, then L2 normalisation.

    Shapes: ``(B, D, H, W) -> (B, D)``.
    """

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if weights is None:
            pooled = x.mean(dim=(2, 3))
        else:
            pooled = (x * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1e-6)
        return F.normalize(pooled, p=2, dim=1)


def kmeans_centroids(descriptors: np.ndarray, k: int, niter: int = 25, seed: int = 0, nredo: int = 10) -> np.ndarray:
    """k-means (FAISS) on local descriptors, as NetVLAD initialises its centroids.

    Args:
        descriptors: ``(N, D)`` float32, L2-normalised local features, N >= k.
        k: number of clusters K.
        niter: Lloyd iterations.
        seed: random seed (deterministic result for a given input).
        nredo: independent k-means runs; the one with the lowest quantisation error is kept
            (one run with random initialisation often merges well-separated clusters).

    Returns:
        ``(K, D)`` float32 centroids.

    Raises:
        ValueError: fewer descriptors than clusters.
    """
    import faiss

    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least K={k} local features, got {x.shape[0]}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, nredo=nredo, verbose=False,
                      max_points_per_centroid=100000)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])
