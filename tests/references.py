"""Exact references the tests compare against, in NumPy, written from the definitions (SPEC
section 2) and never from the code under test: known spectra, hand-written Jacobians, SVDs with
numpy.linalg.matrix_rank's tolerance, brute-force sign counts."""
from __future__ import annotations

import numpy as np


def matrix_with_singular_values(s, rows, cols, seed=0):
    """rows x cols matrix U diag(s) V^T with Haar-random U, V: a known spectrum."""
    r = np.random.default_rng(seed)
    u, _ = np.linalg.qr(r.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(r.standard_normal((cols, cols)))
    m = np.zeros((rows, cols))
    m[: len(s), : len(s)] = np.diag(s)
    return u @ m @ v.T


def psi_nu_of_spectrum(s, rows, cols, factor=None):
    """SPEC psi, nu and the kept count of a spectrum; tolerance s_1 * max(rows, cols) * eps
    (numpy's matrix_rank), or s_1 * factor * eps where an estimator documents another factor."""
    s = np.asarray(s, np.float64)
    keep = s[s > s.max() * (factor or max(rows, cols)) * np.finfo(np.float64).eps]
    if len(keep) == 0:
        return 0.0, 1.0, 0
    p = keep / keep.sum()
    return float(np.log(keep).sum()), float(np.exp(-(p * np.log(p)).sum())), len(keep)


def psi_nu(a):
    """SPEC psi, nu and rank of a dense matrix, by numpy's SVD."""
    a = np.asarray(a, np.float64)
    return psi_nu_of_spectrum(np.linalg.svd(a, compute_uv=False), *a.shape)


def numpy_mlp_jacobian(layers, z, act="relu"):
    """Dense Jacobian of a ReLU/tanh MLP (row-vector convention h <- act(h W + b), last layer
    affine) by the chain rule, by hand in NumPy."""
    h, jac = z, np.eye(len(z))
    for i, (w, b) in enumerate(layers):
        pre = h @ w + b
        jac = w.T @ jac
        if i < len(layers) - 1:
            if act == "relu":
                dact, h = (pre > 0).astype(float), np.maximum(pre, 0)
            else:
                dact, h = 1 - np.tanh(pre) ** 2, np.tanh(pre)
            jac = dact[:, None] * jac
        else:
            h = pre
    return jac


def gram_log(a):
    """F = 0.5 log(M^T M) on the smaller side (pseudo-log: zero singular values map to 0)."""
    m = a if a.shape[1] <= a.shape[0] else a.T
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    keep = s > s.max() * max(a.shape) * np.finfo(np.float64).eps
    logs = np.where(keep, np.log(np.where(keep, s, 1.0)), 0.0)
    return (vt.T * logs) @ vt


def hutchinson_sigma(f, num):
    """Standard deviation of Hutchinson's trace estimator of f with ``num`` Rademacher probes."""
    return np.sqrt(2 * (np.sum(f * f) - np.sum(np.diag(f) ** 2)) / num)


def vertices(z, B, r):
    """The 2P cross-polytope vertices z + r b_i, then z - r b_i (B: P x d, z any shape of size d)."""
    dirs = B.reshape((-1, *z.shape))
    return np.concatenate([z + r * dirs, z - r * dirs])


def flips(pre):
    """pre: (2P, ...) pre-activations at the vertices -> number of mixed-sign neurons."""
    same = np.all(pre > 0, axis=0) | np.all(pre <= 0, axis=0)
    return int(np.sum(~same))


def mlp_flip_counts(layers, z, B, r, act=lambda x: np.maximum(x, 0)):
    """Per-hidden-layer brute-force flip counts of an MLP (last layer affine, not counted)."""
    h = vertices(z, B, r)
    counts = []
    for W, b in layers[:-1]:
        pre = h @ W + b
        counts.append(flips(pre))
        h = act(pre)
    return counts
