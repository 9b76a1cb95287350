"""TASEP with open boundaries at theta = (alpha, beta): particles enter site 1 at rate alpha (if
empty), hop right at rate 1 (onto an empty site), leave site L at rate beta; configurations
tau in {0, 1}^L (site 1 first).

Sampler (JAX, many chains batched): the uniformised chain of this continuous-time process. Each
micro-step picks one of the L + 1 bonds (injection, the L - 1 hops, extraction) uniformly and fires
it with probability (its rate) x (whether it is allowed); since every rate is <= 1 this is
P = I + Q / (L + 1), which has exactly the stationary law of the generator Q ("random-sequential
update"). A *sweep* is L + 1 micro-steps = one unit of physical time. Chains start empty, run
``burn_in`` sweeps, then keep a state every ``thin`` sweeps.

Exact references (float64):

* matrix product (Derrida, Evans, Hakim, Pasquier 1993): P(tau) = <W| prod_i (tau_i D + (1 - tau_i) E)
  |V> / Z_L with DE = D + E, alpha <W|E = <W|, beta D|V> = |V>, <W|V> = 1. Representation used:
  D = 1/beta at (0, 0), 1 on the diagonal below it and on the superdiagonal; E its transpose pattern
  with E[1, 0] = a^2 = (alpha + beta - 1) / (alpha beta) (the similarity-scaled form of DEHP's
  representation, real for every alpha, beta); <W| = |V> = e_0. Words of length L never leave the
  first L + 1 basis states, so (L+1) x (L+1) matrices are exact. Differentiable in JAX, so the
  Fisher metric g_ij = sum_tau P d_i log P d_j log P comes by autodiff of log P over all 2^L
  configurations.
* generator null vector: the 2^L x 2^L rate matrix Q, pi Q = 0 with sum pi = 1 (one equation
  replaced by the normalisation), solved densely in JAX (differentiable too).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.fisher.chains import layout

MAX_L = 256
EXACT_MAX_L = 14  # 2^L configurations enumerated for the exact metric
NULL_MAX_L = 10  # dense 2^L x 2^L generator


def default_burn_in(L: int) -> int:
    return 4 * L * L + 100


def default_thin(L: int) -> int:
    return 6 * L + 20


# --------------------------------------------------------------------------------------------
# matrix product solution


def mpa_matrices(alpha, beta, L: int, xp=jnp):
    """(D, E) of size (L+1, L+1) for words of length <= L."""
    n = L + 1
    a2 = (alpha + beta - 1.0) / (alpha * beta)
    eye, sup = xp.eye(n), xp.eye(n, k=1)
    e00 = xp.zeros((n, n)).at[0, 0].set(1.0) if xp is jnp else np.eye(n) * (np.arange(n) == 0)
    e10 = xp.zeros((n, n)).at[1, 0].set(1.0) if xp is jnp else np.eye(n, k=-1) * (np.arange(n) == 1)[:, None]
    base = eye - e00
    D = base + sup + e00 / beta
    E = base + xp.eye(n, k=-1) - e10 + e10 * a2 + e00 / alpha
    return D, E


def _log_weight(tau, D, E):
    """log <W| prod X_tau_i |V> for configurations tau (..., L), normalising as it goes."""
    L = tau.shape[-1]
    v = jnp.zeros(tau.shape[:-1] + (L + 1,)).at[..., 0].set(1.0)

    def site(carry, t):
        v, logs = carry
        v = jnp.where(t[..., None] == 1, v @ D, v @ E)
        m = jnp.max(jnp.abs(v), axis=-1)
        return (v / m[..., None], logs + jnp.log(m)), None

    (v, logs), _ = jax.lax.scan(site, (v, jnp.zeros(tau.shape[:-1])), jnp.moveaxis(tau, -1, 0))
    return logs + jnp.log(v[..., 0])


def _log_z(alpha, beta, L: int):
    """log Z_L = log <W|(D + E)^L|V>."""
    D, E = mpa_matrices(alpha, beta, L)
    C = D + E
    v = jnp.zeros(L + 1).at[0].set(1.0)
    logs = 0.0
    for _ in range(L):
        v = v @ C
        m = jnp.max(jnp.abs(v))
        v, logs = v / m, logs + jnp.log(m)
    return logs + jnp.log(v[0])


@functools.partial(jax.jit, static_argnums=1)
def _log_z_jit(th, L: int):
    return jax.vmap(lambda t: _log_z(t[0], t[1], L))(th)


def log_z(L: int, thetas) -> np.ndarray:
    """log Z_L(alpha, beta) of the matrix-product solution (P,)."""
    with jax.enable_x64(True):
        return np.asarray(_log_z_jit(jnp.asarray(np.atleast_2d(thetas), jnp.float64), L))


def log_z_closed_form(L: int, alpha: float, beta: float) -> float:
    """DEHP's closed form Z_L = sum_p p (2L-1-p)! / (L! (L-p)!) (b^(p+1) - a^(p+1)) / (b - a), a = 1/alpha,
    b = 1/beta (the limit (p+1) a^p where a = b)."""
    from math import factorial

    a, b = 1.0 / alpha, 1.0 / beta
    z = 0.0
    for p in range(1, L + 1):
        c = p * factorial(2 * L - 1 - p) / (factorial(L) * factorial(L - p))
        r = (p + 1) * a**p if np.isclose(a, b) else (b ** (p + 1) - a ** (p + 1)) / (b - a)
        z += c * r
    return float(np.log(z))


@functools.lru_cache(maxsize=16)
def all_configurations(L: int) -> np.ndarray:
    """(2^L, L) int8: configuration k has tau_i = bit i of k."""
    return ((np.arange(1 << L)[:, None] >> np.arange(L)) & 1).astype(np.int8)


def _logp_all(theta, L: int):
    D, E = mpa_matrices(theta[0], theta[1], L)
    return _log_weight(jnp.asarray(all_configurations(L), jnp.int32), D, E) - _log_z(theta[0], theta[1], L)


@jax.jit
def _log_prob_jit(tau, th):
    L = tau.shape[-1]

    def one(t):
        D, E = mpa_matrices(t[0], t[1], L)
        return _log_weight(tau, D, E) - _log_z(t[0], t[1], L)

    return jax.lax.map(one, th).T


def log_prob(x, thetas) -> np.ndarray:
    """(n, P) exact log P(x_k | theta_p) by the matrix product, any L <= MAX_L."""
    with jax.enable_x64(True):
        return np.asarray(_log_prob_jit(jnp.asarray(np.asarray(x), jnp.int32), jnp.asarray(np.atleast_2d(thetas), jnp.float64)))


def stationary_mpa(L: int, theta) -> np.ndarray:
    """(2^L,) exact stationary law by the matrix product (configurations as all_configurations)."""
    with jax.enable_x64(True):
        return np.exp(np.asarray(_logp_all_jit(jnp.asarray(theta, jnp.float64), L)))


_logp_all_jit = jax.jit(_logp_all, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def _exact_jit(th, L: int):
    def metric(t):
        lp = _logp_all(t, L)
        s = jax.jacfwd(_logp_all)(t, L)  # (2^L, 2) scores
        return jnp.einsum("k,ki,kj->ij", jnp.exp(lp), s, s)

    def lz(t):
        return _log_z(t[0], t[1], L)

    g = jax.lax.map(metric, th)
    F = jax.vmap(lz)(th)
    dF = jax.vmap(jax.grad(lz))(th)
    prev = jax.vmap(lambda t: _log_z(t[0], t[1], L - 1))(th) if L > 1 else jnp.zeros_like(F)  # Z_0 = 1
    return g, F, dF, jnp.exp(prev - F)


def exact(L: int, thetas) -> dict | None:
    """{"g": Fisher metric of the stationary law (P, 2, 2), "F": log Z_L (P,), "dF": its gradient (P, 2),
    "current": J_L = Z_{L-1} / Z_L (P,)}; None for L > EXACT_MAX_L."""
    if L > EXACT_MAX_L:
        return None
    with jax.enable_x64(True):
        g, F, dF, cur = _exact_jit(jnp.asarray(np.atleast_2d(thetas), jnp.float64), L)
        return {"F": np.asarray(F), "dF": np.asarray(dF), "g": np.asarray(g), "current": np.asarray(cur)}


# --------------------------------------------------------------------------------------------
# generator null vector


@functools.lru_cache(maxsize=8)
def _transitions(L: int):
    """(src, dst, kind) of every allowed transition; kind 0 = injection (rate alpha), 1 = hop (rate 1),
    2 = extraction (rate beta). Configuration k has tau_i = bit i of k."""
    src, dst, kind = [], [], []
    for k in range(1 << L):
        if not k & 1:
            src.append(k), dst.append(k | 1), kind.append(0)
        for i in range(L - 1):
            if (k >> i) & 1 and not (k >> (i + 1)) & 1:
                src.append(k), dst.append(k ^ (1 << i) ^ (1 << (i + 1))), kind.append(1)
        if (k >> (L - 1)) & 1:
            src.append(k), dst.append(k ^ (1 << (L - 1))), kind.append(2)
    return np.array(src), np.array(dst), np.array(kind)


def generator(L: int, alpha, beta, xp=jnp):
    """Dense rate matrix Q (2^L, 2^L): Q[x, y] = rate x -> y, rows summing to 0."""
    src, dst, kind = _transitions(L)
    rates = xp.where(kind == 0, alpha, xp.where(kind == 2, beta, 1.0))
    n = 1 << L
    if xp is jnp:
        Q = jnp.zeros((n, n)).at[src, dst].add(rates)
    else:
        Q = np.zeros((n, n))
        np.add.at(Q, (src, dst), rates)
    return Q - xp.diag(Q.sum(1))


def _null_vector(theta, L: int):
    Q = generator(L, theta[0], theta[1])
    A = Q.T.at[0].set(1.0)  # replace one balance equation by sum pi = 1
    b = jnp.zeros(1 << L).at[0].set(1.0)
    return jnp.linalg.solve(A, b)


_null_vector_jit = jax.jit(_null_vector, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def _metric_null_jit(t, L: int):
    p = _null_vector(t, L)
    dp = jax.jacfwd(_null_vector)(t, L)
    return jnp.einsum("ki,kj->ij", dp / p[:, None], dp)


def stationary_null_vector(L: int, theta) -> np.ndarray:
    """(2^L,) stationary law as the null vector of the generator (L <= NULL_MAX_L)."""
    if L > NULL_MAX_L:
        raise ValueError(f"the dense generator needs L <= {NULL_MAX_L}, got {L}")
    with jax.enable_x64(True):
        return np.asarray(_null_vector_jit(jnp.asarray(theta, jnp.float64), L))


def metric_null_vector(L: int, theta) -> np.ndarray:
    """(2, 2) Fisher metric sum_x d_i pi d_j pi / pi from the null vector, derivatives by autodiff."""
    with jax.enable_x64(True):
        return np.asarray(_metric_null_jit(jnp.asarray(theta, jnp.float64), L))


# --------------------------------------------------------------------------------------------
# sampler (JAX)


def _micro(tau, b, u, alpha, beta):
    """One micro-step of one chain: tau (L,) int32, bond b in [0, L], u uniform."""
    L = tau.shape[0]
    j = jnp.arange(L)
    inj = (b == 0) & (tau[0] == 0) & (u < alpha)
    ext = (b == L) & (tau[L - 1] == 1) & (u < beta)
    left, right = jnp.clip(b - 1, 0, L - 1), jnp.clip(b, 0, L - 1)
    hop = (b >= 1) & (b <= L - 1) & (tau[left] == 1) & (tau[right] == 0)
    tau = tau + jnp.where((j == 0) & inj, 1, 0) - jnp.where((j == L - 1) & ext, 1, 0)
    tau = tau + jnp.where(hop & (j == right), 1, 0) - jnp.where(hop & (j == left), 1, 0)
    return tau, ext


def _sweep(tau, alpha, beta, key):
    """L + 1 micro-steps of one chain; returns (tau, number of extractions)."""
    L = tau.shape[0]
    kb, ku = jax.random.split(key)
    bs = jax.random.randint(kb, (L + 1,), 0, L + 1)
    us = jax.random.uniform(ku, (L + 1,), jnp.float32)

    def body(carry, bu):
        t, c = carry
        t, e = _micro(t, bu[0].astype(jnp.int32), bu[1], alpha, beta)
        return (t, c + e.astype(jnp.int32)), None

    (tau, count), _ = jax.lax.scan(body, (tau, jnp.int32(0)), (bs.astype(jnp.float32), us))
    return tau, count


@functools.partial(jax.jit, static_argnames=("L", "n_keep"))
def _run_chains(keys, alpha, beta, burn_in, thin, *, L, n_keep):
    """keys (C, 2), alpha/beta (C,) float32: (states (n_keep, C, L) int8, extractions (C,) during the
    kept part)."""
    split = jax.vmap(jax.random.split)
    sweep = jax.vmap(_sweep)

    def step(_, carry):
        tau, ks, cnt = carry
        both = split(ks)
        tau, c = sweep(tau, alpha, beta, both[:, 1])
        return tau, both[:, 0], cnt + c

    C = keys.shape[0]
    tau0 = jnp.zeros((C, L), jnp.int32)
    zero = jnp.zeros(C, jnp.int32)
    tau, keys, _ = jax.lax.fori_loop(0, burn_in, step, (tau0, keys, zero))

    def keep(carry, _):
        carry = jax.lax.fori_loop(0, thin, step, carry)
        return carry, carry[0].astype(jnp.int8)

    (_, _, cnt), out = jax.lax.scan(keep, (tau, keys, zero), None, length=n_keep)
    return out, cnt


def _chains(L, thetas, n, seed, index, chains, burn_in, thin):
    """(layout, states (n_keep, padded batch, L), extractions per chain (P * chains,))."""
    lay, keys, (a, b) = layout(thetas, n, seed, index, chains)
    out, cnt = _run_chains(keys, a, b, jnp.int32(burn_in), jnp.int32(thin), L=L, n_keep=lay.n_keep)
    return lay, out, np.asarray(cnt)[:lay.real]


def sample(L: int, thetas, n: int, seed: int, index=None, *, chains: int, burn_in: int, thin: int) -> np.ndarray:
    """(P, n, L) int8 stationary configurations; layout and seeding as geomjobs.fisher.ising.sample."""
    lay, out, _ = _chains(L, thetas, n, seed, index, chains, burn_in, thin)
    return lay.gather(out)


def measured_current(L: int, theta, sweeps: int, chains: int, seed: int, burn_in: int | None = None) -> tuple[float, float]:
    """(J, standard error) from counting extraction events per unit time over ``sweeps`` sweeps of
    ``chains`` chains after burn-in (the dynamics, not the stationary law's formula)."""
    burn = default_burn_in(L) if burn_in is None else burn_in
    _, _, cnt = _chains(L, np.asarray(theta)[None], chains, seed, None, chains, burn, sweeps)
    per_chain = cnt / sweeps
    return float(per_chain.mean()), float(per_chain.std(ddof=1) / np.sqrt(len(per_chain)))
