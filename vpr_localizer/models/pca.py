"""PCA whitening of global descriptors (NetVLAD, Arandjelovic et al., CVPR 2016, Sec. 5.1;
Jegou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012).

``y = normalize( diag(lambda + eps)^-1/2 U^T (x - mu) )`` with the top ``dim`` eigenvectors U and
eigenvalues lambda of the descriptor covariance, fitted on the map's descriptors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np


#: Smallest whitening regulariser (fraction of the largest eigenvalue): every map of 500+ images.
EPS_MIN = 1e-3
#: The regulariser is at least this divided by the number of samples (:func:`regulariser_for`).
EPS_SAMPLES = 0.5


def regulariser_for(num_samples: int) -> float:
    """Whitening regulariser for a PCA fitted on ``num_samples`` descriptors:
    ``max(EPS_MIN, EPS_SAMPLES / num_samples)`` (a fraction of the largest eigenvalue).

    Whitening divides each principal direction by the square root of its variance; with N
    samples the trailing eigenvalues are estimation noise, and dividing by them gives that noise
    the weight of the dominant directions. On a 111-image map a fixed 1e-3 made whitening
    collapse recall (held-out Nordland window, positions 2600-2710, 128x64: recall@1 7/111 against
    12/111 without PCA; 13/111 with this rule, ``test/test_pca_default.py``). The rule damps every direction whose variance is
    below ~1/(2N) of the largest, and leaves maps of 500+ images exactly as before (1e-3).
    Measured by ``python benchmarks/study_pca.py`` on the Nordland *training* part (positions
    1000-1974, four windows each of 111 / 200 / 400 images and all 975) and, to report only, on
    the held-out part, where the summed recall@1 over the windows is 61 / 84 / 127 for N = 111 /
    200 / 400 with this rule against 53 / 82 / 120 without PCA and 39 / 69 / 128 with the fixed
    1e-3. Cf. the regularised whitening of Jegou & Chum, ECCV 2012.

    Raises:
        ValueError: ``num_samples`` < 1.
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return max(EPS_MIN, EPS_SAMPLES / int(num_samples))


@dataclass
class PCAWhitening:
    """Fitted PCA-whitening transform.

    Attributes:
        mean: ``(D_in,)`` float32 descriptor mean.
        components: ``(dim, D_in)`` float32 principal directions (rows), by decreasing variance.
        eigenvalues: ``(dim,)`` float32 variances along them.
        eps: regulariser added to the eigenvalues before whitening (relative to the largest).
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    eps: float = 1e-3

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @staticmethod
    def max_dim(num_samples: int, input_dim: int) -> int:
        """Largest meaningful output dimension: ``min(num_samples - 1, input_dim)``."""
        return max(0, min(int(num_samples) - 1, int(input_dim)))

    @classmethod
    def fit(cls, descriptors: np.ndarray, dim: int, eps: float = 1e-3) -> "PCAWhitening":
        """Fit on ``(N, D_in)`` float32 descriptors.

        Uses the N x N Gram matrix when N < D_in (the usual case for NetVLAD's 32,768 dims),
        the D_in x D_in covariance otherwise.

        Args:
            descriptors: ``(N, D_in)``, N >= 2.
            dim: output dimension; must be <= :meth:`max_dim`.
            eps: whitening regulariser, as a fraction of the largest eigenvalue.

        Raises:
            ValueError: too few samples for ``dim``.
        """
        x = np.asarray(descriptors, dtype=np.float64)
        n, d = x.shape
        if dim < 1 or dim > cls.max_dim(n, d):
            raise ValueError(f"PCA dim {dim} impossible with {n} samples of {d} dims "
                             f"(at most {cls.max_dim(n, d)})")
        mean = x.mean(axis=0)
        xc = x - mean
        if n < d:
            gram = xc @ xc.T  # (N, N)
            evals, evecs = np.linalg.eigh(gram)
            order = np.argsort(evals)[::-1][:dim]
            evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
            comps = (xc.T @ evecs) / np.sqrt(np.maximum(evals, 1e-12))  # (D, dim), unit columns
            comps = comps.T
        else:
            cov = xc.T @ xc
            evals, evecs = np.linalg.eigh(cov)
            order = np.argsort(evals)[::-1][:dim]
            evals, comps = np.clip(evals[order], 0, None), evecs[:, order].T
        variances = evals / max(n - 1, 1)
        return cls(mean.astype(np.float32), comps.astype(np.float32), variances.astype(np.float32), eps)

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """``(N, D_in)`` -> ``(N, dim)`` float32, whitened and L2-normalised."""
        x = np.asarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"PCA expects (N, {self.input_dim}) descriptors, got {x.shape}")
        y = (x - self.mean) @ self.components.T
        reg = self.eps * float(self.eigenvalues.max()) if self.eigenvalues.size else 0.0
        y = y / np.sqrt(self.eigenvalues + reg + 1e-12)
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return (y / np.maximum(norms, 1e-12)).astype(np.float32)

    def state(self) -> Dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components,
                "eigenvalues": self.eigenvalues, "eps": np.float64(self.eps)}

    @classmethod
    def from_state(cls, state: Dict) -> "PCAWhitening":
        return cls(np.asarray(state["mean"], np.float32), np.asarray(state["components"], np.float32),
                   np.asarray(state["eigenvalues"], np.float32), float(state["eps"]))
