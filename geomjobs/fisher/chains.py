"""Many Markov chains of many grid points batched on one device: the layout the Ising and TASEP
samplers share, and the autocorrelation time their defaults are checked with.

A call samples P grid points with ``chains`` chains each (C = P * chains chains in one batch,
padded to a few sizes so shards of varying size reuse a few compiled programs). Chain c of grid
point index[p] draws from its own key, fold_in(fold_in(key(seed), index[p]), c), so a point's
samples depend only on (seed, its global grid index), never on which other points share the
call. Each chain keeps ceil(n / chains) states; sample k of a point is state k // chains of its
chain k % chains.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def padded(c: int) -> int:
    """Batch size for c chains: at least 8, rounded up to 2^k * (1, 1.25, 1.5 or 1.75), so shards of
    varying size reuse a few compiled programs (at most 25% padding)."""
    if c <= 8:
        return 8
    k = 1 << (c.bit_length() - 1)
    return next(m for m in (k, k + k // 4, k + k // 2, k + 3 * k // 4, 2 * k) if m >= c)


def pad_chains(*arrays, to: int):
    """Pad the leading (chain) axis of each array by repeating its first row (results discarded)."""
    return [jnp.concatenate([a, jnp.repeat(a[:1], to - a.shape[0], axis=0)]) if to > a.shape[0] else a for a in arrays]


def chain_keys(seed: int, index, chains: int) -> jax.Array:
    """(P * chains, 2) keys: chain c of grid point index[p] gets fold_in(fold_in(key(seed), index[p]), c)."""
    base = jax.random.PRNGKey(seed)
    idx = jnp.asarray(np.asarray(index, np.uint32))
    per_point = jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)
    return jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.arange(chains, dtype=jnp.uint32)))(per_point).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the n samples of each of P points sit among the batch's chains."""
    points: int        # P
    n: int             # samples per point
    chains: int        # chains per point (at most n)
    n_keep: int        # states kept per chain: ceil(n / chains)
    real: int          # P * chains: the batch's chains before padding

    def gather(self, out) -> np.ndarray:
        """(P, n, *shape) samples from the sampler's (n_keep, padded batch, *shape) states."""
        out = np.asarray(out)[:, :self.real]
        shape = out.shape[2:]
        out = out.reshape(self.n_keep, self.points, self.chains, *shape).swapaxes(0, 1)
        return out.reshape(self.points, self.n_keep * self.chains, *shape)[:, :self.n]


def layout(thetas, n: int, seed: int, index=None, chains: int = 16) -> tuple[Layout, jax.Array, list]:
    """The batch for n samples at each of thetas (P, 2) with ``chains`` chains per point: (layout,
    keys (padded, 2), [theta_1, theta_2] per chain as float32 (padded))."""
    th = np.atleast_2d(np.asarray(thetas, np.float64))
    P = len(th)
    index = np.arange(P) if index is None else np.asarray(index)
    chains = max(1, min(chains, n))
    keys = chain_keys(seed, index, chains)
    cols = [jnp.asarray(np.repeat(th[:, i], chains), jnp.float32) for i in range(2)]
    real = keys.shape[0]
    keys, *cols = pad_chains(keys, *cols, to=padded(real))
    return Layout(P, n, chains, -(-n // chains), real), keys, cols


def integrated_autocorr_time(x, c: float = 5.0) -> float:
    """Integrated autocorrelation time tau = 1 + 2 sum_t rho(t) of a series x (steps, chains),
    averaged over chains, with Sokal's automatic window (the smallest W with W >= c * tau(W))."""
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x - x.mean(0)
    n = x.shape[0]
    f = np.fft.rfft(x, n=2 * n, axis=0)
    acf = np.fft.irfft(f * np.conj(f), axis=0)[:n].mean(1)
    if acf[0] <= 0:
        return 1.0
    rho = acf / acf[0]
    taus = 2.0 * np.cumsum(rho) - 1.0
    for w in range(1, n):
        if w >= c * taus[w]:
            return float(taus[w])
    return float(taus[-1])
