"""Matrix-free spectral estimators of the Jacobian A(z) = dG/dz (n x d), from JVPs and VJPs only.

Two spec modes of ``descriptors.local_scaling`` (docs/geometry.md defines psi and nu):

``mode: lanczos`` -- the top-k singular values of A by Golub-Kahan-Lanczos bidiagonalisation
    (``steps`` >= k Krylov steps from one start vector, full reorthogonalisation). psi and nu
    are then the documented formulas on those k values, with the rank tolerance of an n x d matrix.
    Ritz values interlace from below (s_i(B) <= s_i(A)), so an unconverged run under-estimates
    psi; with ``steps = min(n, d)`` the values are the exact top-k (up to roundoff).

``mode: slq`` -- the full-spectrum log-volume psi_full = sum_i log s_i over ALL min(n, d)
    singular values, i.e. 0.5 log det(A^T A) (d <= n) or 0.5 log det(A A^T) (d > n; the Gram
    matrix on the smaller side is the one that is not singular by construction), by stochastic
    Lanczos quadrature (Ubaru, Chen & Saad 2017): for each probe v,
        v^T f(M^T M) v ~= ||v||^2 sum_j tau_j f(theta_j^2),
    where theta_j are the singular values of the steps x steps bidiagonal B of a Golub-Kahan run
    on M started at v and tau_j = (first component of B's j-th right singular vector)^2 are the
    Gauss quadrature weights. f is the documented masked log: values below the rank tolerance
    theta_max * max(n, d, 256) * eps (:func:`krylov_dim`) count zero, so psi is the pseudo-log-determinant the exact mode
    computes, not -inf, when A is rank deficient. The same runs give nu, by the ratio
        nu = exp(H),  H = log S - T / S,  S = tr (M^T M)^{1/2} = sum s_i,  T = sum s_i log s_i,
    with S and T estimated by the same quadrature (a ratio of two unbiased estimates: consistent,
    slightly biased for few probes). Probes are Rademacher vectors drawn ONCE per job from the
    spec's ``seed`` (like W), so the estimate is a deterministic function of z and all samples
    share the probes (common random numbers: errors are correlated across samples, which helps
    ranking). Hutchinson's variance for Rademacher probes is
    2 (||F||_F^2 - sum_i F_ii^2) / num_probes with F = 0.5 log(M^T M) (Hutchinson 1990).

Bidiagonalisation rather than Lanczos on the Gram operator M^T M: it needs the same products
per step (one JVP, one VJP) but resolves singular values down to ~eps * s_1 instead of
~sqrt(eps) * s_1 (Golub & Kahan 1965), which matters in float32, where sqrt(eps) ~ 3e-4.

Cost per sample: ONE linearisation of G (``jax.linearize``: a forward pass whose residuals are
kept) and its transpose (``jax.linear_transpose``); then ``steps`` JVPs and ``steps - 1`` VJPs
per Krylov run (lanczos: one run; slq: ``num_probes`` runs, ``chunk`` of them vmapped at a
time). Memory per run: the Krylov bases, steps x (n + d) values, besides the residuals. Full
reorthogonalisation costs ~4 steps^2 (n + d) flops per run, memory-bound: it dominates on
small MLPs on a CPU (see benchmarks/estimators.py) and is negligible once one JVP costs much
more than steps x (n + d) flops, as in image generators.
Only JVP/VJP products of G are used, never the dense Jacobian. Forward mode is needed (a
generator with a ``jax.custom_vjp`` inside cannot be linearised; use ``mode: projection``).

Why not ``matfree`` (0.6.3; its ``decomp.bidiag``, ``eig.svd_partial``,
``funm.monte_carlo_funm_product_logdet`` and ``stochtrace.estimator_monte_carlo`` implement
exactly these two algorithms, and this module follows their design: double reorthogonalisation
against all stored Krylov vectors, Gauss weights from the first row of B's right singular
vectors): checked here, (1) an exact Krylov breakdown divides 0 by 0 -- ``svd_partial`` of
2 * I returns NaN, and a probe that spans an invariant subspace does the same; (2) its Krylov
buffers take the default float dtype, so a float32 generator under ``jax_enable_x64`` (how the
test-suite runs float32 jobs) fails inside the VJP with a dtype mismatch; (3) the log-det
integrand has no rank tolerance: a rank-deficient A gives sum log(~1e-16) terms instead of the
the documented psi; (4) no nu. The bidiagonalisation below restarts with a fresh vector orthogonal to
the basis on breakdown (setting that coefficient to 0, which keeps A V = U B exact and finds
repeated singular values), keeps the generator's dtype, and masks by the documented tolerance.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.geometry.descriptors import local_rank, local_scaling
from geomjobs.geometry.projections import seeded_rng

DEFAULT_PROBES = 16
DEFAULT_SLQ_STEPS = 30


# ---------------------------------------------------------------- fixed random vectors (NumPy)
def rademacher_probes(num: int, dim: int, seed: int) -> np.ndarray:
    """(num, dim) float64 matrix of independent +-1 entries, drawn once per job from ``seed``.

    NumPy's PCG64 (like W and B in :mod:`.projections`), so the probes do not depend on the
    JAX version, backend or device count.
    """
    if num < 1 or dim < 1:
        raise ValueError(f"need num >= 1 and dim >= 1, got {num}, {dim}")
    return seeded_rng(seed, "slq").choice(np.array([-1.0, 1.0]), size=(num, dim))


def start_vector(dim: int, seed: int) -> np.ndarray:
    """Unit-norm Gaussian start vector of the Lanczos run, drawn once per job from ``seed``."""
    v = seeded_rng(seed, "lanczos").standard_normal(dim)
    return v / np.linalg.norm(v)


KRYLOV_TOL_FLOOR = 256


def krylov_dim(n: int, d: int) -> int:
    """The size factor of the rank tolerance in the Krylov modes: max(n, d, 256).

    The definition keeps s_i > s_1 * max(n, d) * eps (numpy's matrix_rank, right for a backward-stable
    dense SVD). A singular value that is 0 in exact arithmetic comes out of a Krylov run at up
    to ~100 eps s_1 on small operators (measured: 32 eps s_1 on a 5 x 5 rank-3 map, 217 eps s_1
    on a 12 x 5 one with a repeated value), above 5 or 12 eps s_1, and log(1e-14) would count.
    So these modes floor the factor at 256; for max(n, d) >= 256 the tolerance is the documented.
    """
    return max(n, d, KRYLOV_TOL_FLOOR)


def krylov_rtol(n: int, d: int, dtype) -> float:
    """The relative rank tolerance of the Krylov modes: :func:`krylov_dim` (n, d) * eps(dtype)."""
    return krylov_dim(n, d) * float(np.finfo(dtype).eps)


def gram_side(n: int, d: int) -> int:
    """Dimension of the non-singular-by-construction Gram matrix: min(n, d)."""
    return min(n, d)


# ---------------------------------------------------------------- linear operators of A(z)
def linear_operator(g: Callable, z):
    """(n, d, mv, rmv) for M = A(z) if d <= n else A(z)^T, from one linearisation of g at z.

    M is tall (rows >= cols = min(n, d)); mv(v) = M v, rmv(u) = M^T u. Each is one JVP or one
    VJP of the linearised generator; the forward pass runs once, in ``jax.linearize``.
    """
    out, jvp = jax.linearize(g, z)
    n, d = out.shape[0], z.shape[0]
    vjp = jax.linear_transpose(jvp, z)
    pull = lambda u: vjp(u)[0]  # noqa: E731
    if d <= n:
        return n, d, jvp, pull
    return n, d, pull, jvp


# ---------------------------------------------------------------- Golub-Kahan bidiagonalisation
class Bidiag(NamedTuple):
    alphas: jax.Array   # (steps,) diagonal of B
    betas: jax.Array    # (steps,) betas[i] = B[i-1, i] (betas[0] = 0)


def _reorth(x, basis):
    """x minus its projection on the rows of basis (unfilled rows are 0); twice is enough."""
    x = x - basis.T @ (basis @ x)
    return x - basis.T @ (basis @ x)


def _restart_vector(dim: int, salt, dtype):
    """A generic (quasi-random, Weyl-sequence) vector for restarts; different for each salt.

    Any vector with a component outside the current basis will do; a cosine of a Weyl sequence
    costs nothing to compile, unlike a PRNG inside the Krylov loop.
    """
    j = jnp.arange(1, dim + 1, dtype=dtype)
    return jnp.cos(j * (0.7548776662466927 * (salt + 1)) + 0.5698402909980532 * j * j / dim + salt)


def golub_kahan(mv: Callable, rmv: Callable, v0, steps: int, rows: int) -> Bidiag:
    """``steps`` steps of Golub-Kahan bidiagonalisation of a rows x cols operator M from v0.

    Returns the bidiagonal B (steps x steps) with M V = U B, V^T V = I, U^T U = I, all Krylov
    vectors fully reorthogonalised. ``steps`` products M v and ``steps - 1`` products M^T u.
    A breakdown (a new vector with norm <= :func:`krylov_dim` * eps * (largest coefficient so
    far): an invariant subspace was found) restarts with a generic vector orthogonal to the
    basis and stores the coefficient as 0; B is then block diagonal and the relation stays
    exact, so repeated singular values are found and nothing divides by zero. Zeroing a
    coefficient c perturbs M by at most c in norm (singular values move by <= c, Weyl).
    """
    cols = v0.shape[0]
    dtype = v0.dtype
    if not 1 <= steps <= min(rows, cols):
        raise ValueError(f"need 1 <= steps <= min(rows, cols) = {min(rows, cols)}, got {steps}")
    eps = jnp.finfo(dtype).eps
    big = krylov_dim(rows, cols) * eps

    def fresh(x, basis, scale, salt):
        """Normalise x, or restart with a generic vector orthogonal to basis on breakdown."""
        norm = jnp.linalg.norm(x)
        scale = jnp.maximum(scale, norm)
        broke = norm <= big * scale
        r = _restart_vector(x.shape[0], salt, dtype)
        r = _reorth(r, basis)
        r = r / jnp.linalg.norm(r)
        x = jnp.where(broke, r, x / jnp.where(broke, 1.0, norm))
        return x, jnp.where(broke, 0.0, norm).astype(dtype), scale

    U = jnp.zeros((steps, rows), dtype)
    V = jnp.zeros((steps, cols), dtype)
    alphas = jnp.zeros((steps,), dtype)
    betas = jnp.zeros((steps,), dtype)
    scale = jnp.zeros((), dtype)

    v, _, _ = fresh(v0.astype(dtype), V, jnp.linalg.norm(v0).astype(dtype), 0)
    V = V.at[0].set(v)
    u, alpha, scale = fresh(mv(v), U, scale, 1)
    U = U.at[0].set(u)
    alphas = alphas.at[0].set(alpha)

    def body(i, state):
        U, V, alphas, betas, u, v, alpha, scale = state
        w = _reorth(rmv(u) - alpha * v, V)
        v, beta, scale = fresh(w, V, scale, 2 * i)
        V = V.at[i].set(v)
        x = _reorth(mv(v) - beta * u, U)
        u, alpha, scale = fresh(x, U, scale, 2 * i + 1)
        U = U.at[i].set(u)
        return U, V, alphas.at[i].set(alpha), betas.at[i].set(beta), u, v, alpha, scale

    state = (U, V, alphas, betas, u, v, alpha, scale)
    state = jax.lax.fori_loop(1, steps, body, state)
    return Bidiag(state[2], state[3])


def bidiagonal_matrix(b: Bidiag):
    return jnp.diag(b.alphas) + jnp.diag(b.betas[1:], 1)


# ---------------------------------------------------------------- mode: lanczos
def lanczos_singular_values(g: Callable, z, v0, *, k: int, steps: int):
    """Top-k singular values of A(z) (descending) from one Golub-Kahan-Lanczos run.

    v0: start vector in R^{min(n, d)} (see :func:`start_vector`); 1 <= k <= steps <= min(n, d).
    Cost: one linearisation, ``steps`` JVPs/VJPs each way (minus one).
    """
    n, d, mv, rmv = linear_operator(g, z)
    if not 1 <= k <= steps:
        raise ValueError(f"need 1 <= k <= steps, got k={k}, steps={steps}")
    b = golub_kahan(mv, rmv, jnp.asarray(v0, z.dtype), steps, max(n, d))
    return jnp.linalg.svd(bidiagonal_matrix(b), compute_uv=False)[:k]


def lanczos_descriptors(g: Callable, z, v0, *, k: int, steps: int):
    """(top-k singular values, psi, nu): the documented formulas on the k values, rank tolerance
    s_1 * :func:`krylov_dim` (n, d) * eps."""
    n = jax.eval_shape(g, z).shape[0]
    s = lanczos_singular_values(g, z, v0, k=k, steps=steps)
    rtol = krylov_rtol(n, z.shape[0], s.dtype)
    return s, local_scaling(s, rtol), local_rank(s, rtol)


# ---------------------------------------------------------------- mode: slq
class SLQ(NamedTuple):
    local_scaling: jax.Array       # psi_full estimate: sum over all min(n, d) kept log s_i
    local_rank: jax.Array          # nu estimate (ratio of two SLQ traces, see module doc)
    local_scaling_sem: jax.Array   # standard error of psi over the probes: std / sqrt(num)
    probe_values: jax.Array        # (num_probes,) per-probe estimates of psi
    ritz: jax.Array                # (num_probes, steps) Ritz singular values theta_j
    weights: jax.Array             # (num_probes, steps) Gauss weights tau_j (sum to 1 per probe)


def _quadrature_nodes(mv, rmv, rows, steps, p):
    b = golub_kahan(mv, rmv, p, steps, rows)
    _, theta, vt = jnp.linalg.svd(bidiagonal_matrix(b))
    return theta, vt[:, 0] ** 2


def slq_log_volume(g: Callable, z, probes, *, steps: int, chunk: int | None = None) -> SLQ:
    """Stochastic Lanczos quadrature of psi_full = 0.5 log det(M^T M) and of nu (module doc).

    probes: (num_probes, min(n, d)), e.g. :func:`rademacher_probes`. ``chunk`` probes run side
    by side (vmap), chunks one after another (``lax.map``); None = all at once.
    """
    n, d, mv, rmv = linear_operator(g, z)
    probes = jnp.asarray(probes, z.dtype)
    num = probes.shape[0]
    rows = max(n, d)
    node = lambda p: _quadrature_nodes(mv, rmv, rows, steps, p)  # noqa: E731
    if chunk is None or chunk >= num:
        theta, tau = jax.vmap(node)(probes)
    else:
        theta, tau = jax.lax.map(node, probes, batch_size=chunk)
    length2 = jnp.sum(probes * probes, axis=1)           # ||v||^2 (= min(n, d) for +-1 probes)
    # one threshold for every probe's Ritz values: the largest of them all stands for s_1
    keep = theta > jnp.max(theta) * krylov_rtol(n, d, theta.dtype)
    safe = jnp.where(keep, theta, 1.0)
    log_t = jnp.where(keep, jnp.log(safe), 0.0)
    s_t = jnp.where(keep, theta, 0.0)
    per_probe = length2 * jnp.sum(tau * log_t, axis=1)   # v^T (0.5 log M^T M) v per probe
    psi = jnp.mean(per_probe)
    sem = jnp.std(per_probe) / jnp.sqrt(num)
    tr_s = jnp.mean(length2 * jnp.sum(tau * s_t, axis=1))            # ~ sum_i s_i
    tr_slog = jnp.mean(length2 * jnp.sum(tau * s_t * log_t, axis=1))  # ~ sum_i s_i log s_i
    pos = tr_s > 0
    ts = jnp.where(pos, tr_s, 1.0)
    nu = jnp.where(pos, jnp.exp(jnp.log(ts) - tr_slog / ts), 1.0)
    return SLQ(psi, nu, sem, per_probe, theta, tau)
