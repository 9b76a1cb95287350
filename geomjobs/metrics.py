"""Sample-set metrics shared by the zoo model cards, the reward evaluation and the notebooks
(NumPy / SciPy only; one implementation for the whole project).

Vendi score (Friedman & Dieng 2023). For n items with a similarity kernel K (n x n, positive
semi-definite, K_ii = 1), let lambda_1..lambda_n be the eigenvalues of K / n (they are >= 0 and sum
to 1). The Vendi score of order q is the exponential of the Renyi entropy of lambda:

    q = 1      VS = exp(-sum_i lambda_i log lambda_i)          (Shannon; 0 log 0 = 0)
    q = inf    VS = 1 / max_i lambda_i
    q = 0      VS = #{i : lambda_i > 0}

where eigenvalues below lambda_max * n * eps(float64) (numpy's matrix_rank tolerance) count as 0.
    otherwise  VS = (sum_i lambda_i^q)^(1 / (1 - q))

n identical items give 1, n mutually orthogonal items give n. From features X (n x d) the default
kernel is the cosine similarity K_ij = <x_i, x_j> / (|x_i| |x_j|); its nonzero eigenvalues are
those of the d x d matrix Xn^T Xn / n (Xn: rows normalised to unit length), which is what is
diagonalised when d < n.

Frechet distance between two sets of features, each summarised by its mean and covariance
(``np.cov``, ddof = 1), as in FID (Heusel et al. 2017, the computation of pytorch-fid):

    FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})

with ``scipy.linalg.sqrtm`` of the product (its real part; when the product is singular and the
square root is not finite or does not square back to the product within 1e-6 relative, eps * I
is added to both covariances first).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg

__all__ = ["cosine_kernel", "frechet_distance", "frechet_distance_gaussians", "vendi_eigenvalues", "vendi_score"]


def _as_2d(x, what: str) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or a.shape[0] < 1:
        raise ValueError(f"{what} must be a 2-D array (items x features), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} must be finite")
    return a


def _normalised_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("cosine similarity is undefined for an all-zero feature vector")
    return x / norms


def cosine_kernel(features) -> np.ndarray:
    """K_ij = <x_i, x_j> / (|x_i| |x_j|) for the rows of ``features`` (n x d)."""
    xn = _normalised_rows(_as_2d(features, "features"))
    return xn @ xn.T


def vendi_eigenvalues(features_or_K, *, kernel: bool = False) -> np.ndarray:
    """The eigenvalues of K / n (descending, clipped at 0). ``kernel=True``: the argument is K
    itself (n x n, symmetric, unit diagonal); else it is features and K is their cosine kernel."""
    a = _as_2d(features_or_K, "K" if kernel else "features")
    n = a.shape[0]
    if kernel:
        if a.shape != (n, n):
            raise ValueError(f"K must be square, got shape {a.shape}")
        if not np.allclose(a, a.T, rtol=0, atol=1e-10 * max(1.0, np.abs(a).max())):
            raise ValueError("K must be symmetric")
        lam = np.linalg.eigvalsh(a / n)
    else:
        xn = _normalised_rows(a)
        m = xn.T @ xn if xn.shape[1] < n else xn @ xn.T   # same nonzero eigenvalues
        lam = np.linalg.eigvalsh(m / n)
    return np.clip(lam[::-1], 0.0, None)


def vendi_score(features_or_K, q: float = 1, *, kernel: bool = False) -> float:
    """Vendi score of order ``q`` (formulas: module doc); ``q`` may be 0, 1, ``math.inf`` or any
    other positive number. ``kernel``: as for :func:`vendi_eigenvalues`."""
    q = float(q)
    if not q >= 0:
        raise ValueError(f"q must be >= 0 (or inf), got {q}")
    lam = vendi_eigenvalues(features_or_K, kernel=kernel)
    # eigenvalues at rounding level are zeros (numpy.linalg.matrix_rank's tolerance); for q < 1
    # their powers would otherwise count: (1e-17)^0.5 ~ 3e-9 each
    nz = lam[lam > lam.max() * len(lam) * np.finfo(np.float64).eps]
    nz = nz / nz.sum()             # removes the rounding of trace(K) / n = 1
    if q == math.inf:
        return float(1.0 / nz.max())
    if q == 1.0:
        return float(np.exp(-np.sum(nz * np.log(nz))))    # 0 log 0 = 0: zeros were dropped
    if q == 0.0:
        return float(len(nz))
    return float(np.sum(nz ** q) ** (1.0 / (1.0 - q)))


def _sqrtm(m: np.ndarray, rtol: float = 1e-6):
    """scipy.linalg.sqrtm(m), or None when it is not finite or does not square back to m (a
    singular product: scipy then warns that the result may be inaccurate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        r = scipy.linalg.sqrtm(m)
    if not np.all(np.isfinite(r)):
        return None
    scale = max(np.abs(m).max(), np.finfo(np.float64).tiny)
    return r if np.abs(r @ r - m).max() <= rtol * scale else None


def frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)) (module doc)."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (len(mu_a), len(mu_a)):
        raise ValueError(f"mismatched shapes: mu {mu_a.shape} / {mu_b.shape}, cov {cov_a.shape} / {cov_b.shape}")
    diff = mu_a - mu_b
    covmean = _sqrtm(cov_a @ cov_b)
    if covmean is None:
        off = eps * np.eye(len(mu_a))
        covmean = _sqrtm((cov_a + off) @ (cov_b + off))
        if covmean is None:
            raise ValueError(f"sqrtm of the covariance product is not finite even with eps = {eps} added")
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def frechet_distance(feat_a, feat_b, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (n_a x d, n_b x d)."""
    a, b = _as_2d(feat_a, "feat_a"), _as_2d(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError("each feature set needs at least 2 items for a covariance")
    return frechet_distance_gaussians(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps)
