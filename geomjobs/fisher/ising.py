"""2-D Ising model on an L x L periodic lattice at natural parameters theta = (beta, h):

    p(s | beta, h) = exp(beta * B(s) + h * M(s)) / Z(beta, h),
    B(s) = sum_i (s_i s_{i+x} + s_i s_{i+y})   (each nearest-neighbour bond once, periodic),
    M(s) = sum_i s_i.

(B, M) are the sufficient statistics, so F = log Z, grad F = E[(B, M)] and the Fisher metric is
Hess F = Cov(B, M). For L = 2 the periodic neighbours coincide, so each pair is counted twice in B;
the sampler and the exact references use the same B for every L, so they agree there too.

Samplers (JAX, many chains batched on one device):

* ``checkerboard`` (alias ``metropolis``): single-spin updates, one sublattice of the even-L
  periodic lattice at a time (its spins are independent given the other sublattice), each spin
  drawn by heat bath (Glauber): +1 with probability sigmoid(2 (beta * sum of neighbours + h)).
  One *step* = both sublattices = one sweep. Not the Metropolis rule min(1, e^dlogp): updating a
  whole sublattice at once, it accepts dlogp = 0 with probability 1, so at h = 0 stripe states
  (every neighbour sum 0) cycle deterministically and a chain that reaches one never leaves (the
  chain is reducible; the L = 4 chi-square test caught it). The heat bath flips with probability
  strictly inside (0, 1), so one sweep reaches every configuration. Its uniforms are counter-based
  words (:func:`site_uniforms`: a 32-bit mixer of the site and two threefry key words per chain
  per half-sweep) compared with integer thresholds, so the sweep is one fused pass over the
  chains without a threefry call per spin.
* ``cluster`` (default): a Swendsen-Wang update followed by one checkerboard sweep. The bonds of
  equal neighbours are opened with probability 1 - exp(-2 beta); given the bonds, the field term
  exp(h * M) factorises over clusters, so each cluster's common spin is drawn by heat bath,
  +1 with probability 1 / (1 + exp(-2 h |C|)). This is an exact Gibbs step of the joint
  (spins, bonds) law, valid for beta >= 0 and any h. Clusters are labelled by min-label
  propagation in a ``lax.while_loop``.

Exact references (NumPy, float64):

* enumeration (L <= 4): the density of states g(B, M) over all 2^(L^2) configurations, then
  log Z, the means and the covariance of (B, M) at any theta by a log-sum-exp over (B, M);
  also the exact law of B and of M (for the samplers' chi-square tests).
* transfer matrix (any L up to ~10-12): the symmetric row-to-row matrix
  T_ab = exp(beta (R(a) + R(b)) / 2 + beta a.b + h (M(a) + M(b)) / 2) over 2^L row states
  (R = periodic bond sum within a row), Z = tr T^L. Its log-entries are linear in theta, so
  dT/dtheta_i = T * phi_i, and the first and second derivatives of tr T^L are *exact* in the
  eigenbasis T = U diag(lam) U^T:
      d_i tr T^L      = L sum_k lam_k^(L-1) A_i[k,k],                       A_i = U^T (T*phi_i) U
      d_i d_j tr T^L  = L sum_k lam_k^(L-1) A_ij[k,k] + L sum_kl A_i[k,l] A_j[l,k] G[k,l],
      G[k,l] = sum_{m=0}^{L-2} lam_l^m lam_k^(L-2-m)   (summed term by term: no divided differences)
  (powers scaled by lam_max). No finite differences: they are only a test of this.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from geomjobs.fisher.chains import chain_keys, layout  # noqa: F401 - chain_keys: benchmarks/bench_fisher.py

# statistics ---------------------------------------------------------------------------------------


def bond_sum(s) -> np.ndarray:
    """B(s) = sum_i s_i (s_{i+x} + s_{i+y}) (periodic) over the last two axes."""
    s = np.asarray(s, np.int64)
    return (s * np.roll(s, -1, axis=-1)).sum(axis=(-2, -1)) + (s * np.roll(s, -1, axis=-2)).sum(axis=(-2, -1))


def magnetisation(s) -> np.ndarray:
    return np.asarray(s, np.int64).sum(axis=(-2, -1))


def sufficient_statistics(s) -> np.ndarray:
    """(..., 2) float64: (B(s), M(s)) of spin arrays (..., L, L) in {-1, +1}."""
    return np.stack([bond_sum(s), magnetisation(s)], axis=-1).astype(np.float64)


# exact: enumeration -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def density_of_states(L: int):
    """(B values, M values, log g) with log g[b, m] = log #{s : B(s)=B_b, M(s)=M_m} (-inf if none);
    all 2^(L*L) configurations enumerated in blocks (L <= 4)."""
    if not 2 <= L <= 4:
        raise ValueError(f"enumeration needs 2 <= L <= 4 (2^(L*L) states), got L={L}")
    n = L * L
    counts: dict[tuple[int, int], int] = {}
    block = 1 << min(n, 16)
    bits = np.arange(n, dtype=np.int64)
    for start in range(0, 1 << n, block):
        idx = np.arange(start, start + block, dtype=np.int64)
        s = (((idx[:, None] >> bits) & 1) * 2 - 1).reshape(-1, L, L)
        b, m = bond_sum(s), magnetisation(s)
        key, c = np.unique(np.stack([b, m], 1), axis=0, return_counts=True)
        for (bb, mm), cc in zip(key.tolist(), c.tolist()):
            counts[(bb, mm)] = counts.get((bb, mm), 0) + cc
    bvals = np.array(sorted({k[0] for k in counts}))
    mvals = np.array(sorted({k[1] for k in counts}))
    logg = np.full((len(bvals), len(mvals)), -np.inf)
    bi = {v: i for i, v in enumerate(bvals)}
    mi = {v: i for i, v in enumerate(mvals)}
    for (bb, mm), cc in counts.items():
        logg[bi[bb], mi[mm]] = np.log(cc)
    return bvals, mvals, logg


def _joint_logp(L: int, thetas):
    """(P, nB, nM) exact log P(B, M | theta) and log Z (P,), by enumeration."""
    bvals, mvals, logg = density_of_states(L)
    th = np.atleast_2d(np.asarray(thetas, np.float64))
    w = logg[None] + th[:, 0, None, None] * bvals[None, :, None] + th[:, 1, None, None] * mvals[None, None, :]
    logz = logsumexp(w.reshape(len(th), -1), axis=1)
    return w - logz[:, None, None], logz


def exact_enumeration(L: int, thetas) -> dict:
    """{"F": log Z (P,), "dF": E[(B, M)] (P, 2), "g": Cov(B, M) (P, 2, 2)} by enumeration (L <= 4)."""
    bvals, mvals, _ = density_of_states(L)
    logp, logz = _joint_logp(L, thetas)
    p = np.exp(logp)
    bb, mm = np.meshgrid(bvals, mvals, indexing="ij")
    t = np.stack([bb, mm], -1).astype(np.float64)  # (nB, nM, 2)
    mean = np.einsum("pbm,bmi->pi", p, t)
    d = t[None] - mean[:, None, None, :]
    cov = np.einsum("pbm,pbmi,pbmj->pij", p, d, d)
    return {"F": logz, "dF": mean, "g": cov}


def exact_marginals(L: int, theta) -> dict:
    """Exact laws of B and of M at one theta (L <= 4): {"B": (values, probs), "M": (values, probs)}."""
    bvals, mvals, _ = density_of_states(L)
    logp, _ = _joint_logp(L, np.asarray(theta, np.float64)[None])
    p = np.exp(logp[0])
    return {"B": (bvals, p.sum(1)), "M": (mvals, p.sum(0))}


def log_partition_enumeration(L: int, thetas) -> np.ndarray:
    return _joint_logp(L, thetas)[1]


# exact: transfer matrix ---------------------------------------------------------------------------

TRANSFER_MAX_L = 12


@functools.lru_cache(maxsize=8)
def _rows(L: int):
    a = ((np.arange(1 << L)[:, None] >> np.arange(L)) & 1) * 2 - 1  # (2^L, L) row spins
    r = (a * np.roll(a, -1, axis=1)).sum(1).astype(np.float64)  # bonds within a row
    m = a.sum(1).astype(np.float64)
    phi_b = (r[:, None] + r[None, :]) / 2 + (a @ a.T).astype(np.float64)  # d log T / d beta
    phi_h = (m[:, None] + m[None, :]) / 2  # d log T / d h
    return phi_b, phi_h


def exact_transfer(L: int, thetas, derivatives: bool = True) -> dict:
    """{"F": log Z, "dF", "g"} by the row-to-row transfer matrix (2 <= L <= TRANSFER_MAX_L), derivatives
    exact in the eigenbasis (module docstring)."""
    if not 2 <= L <= TRANSFER_MAX_L:
        raise ValueError(f"transfer matrix needs 2 <= L <= {TRANSFER_MAX_L} (2^L row states), got L={L}")
    phi_b, phi_h = _rows(L)
    phis = (phi_b, phi_h)
    th = np.atleast_2d(np.asarray(thetas, np.float64))
    F = np.empty(len(th))
    dF = np.empty((len(th), 2))
    g = np.empty((len(th), 2, 2))
    for p, (beta, h) in enumerate(th):
        logt = beta * phi_b + h * phi_h
        shift = logt.max()
        T = np.exp(logt - shift)  # T = e^shift * T_scaled
        lam, U = np.linalg.eigh(T)
        lmax = np.abs(lam).max()
        x = lam / lmax  # |x| <= 1
        z = (x ** L).sum()  # tr T^L = (e^shift lmax)^L z
        F[p] = L * (shift + np.log(lmax)) + np.log(z)
        if not derivatives:
            continue
        # derivatives of tr(T_s^L) / (lmax^L) with T_s = T / lmax; the e^shift factor is linear in
        # theta only through shift = max(logt), whose change is exactly compensated (T's entries
        # are exp(logt)), so work with the unscaled derivative structure dT = T * phi.
        Ts = T / lmax
        A = [U.T @ (Ts * ph) @ U for ph in phis]
        xl1 = x ** (L - 1)
        G = np.zeros((len(x), len(x)))
        for m in range(L - 1):
            G += np.outer(x ** (L - 2 - m), x ** m)  # G[k, l] = sum_m x_k^(L-2-m) x_l^m
        zi = np.array([L * (xl1 * np.diag(a)).sum() for a in A])
        zij = np.empty((2, 2))
        for i, j in itertools.product(range(2), range(2)):
            aij = U.T @ (Ts * phis[i] * phis[j]) @ U
            zij[i, j] = L * (xl1 * np.diag(aij)).sum() + L * (A[i] * A[j].T * G).sum()
        dF[p] = zi / z
        g[p] = zij / z - np.outer(zi, zi) / z**2
    out = {"F": F}
    if derivatives:
        out.update(dF=dF, g=(g + g.transpose(0, 2, 1)) / 2)
    return out


def exact(L: int, thetas) -> dict | None:
    """The best exact reference at size L: enumeration for L <= 4, transfer matrix up to
    TRANSFER_MAX_L, None beyond."""
    if L <= 4:
        return exact_enumeration(L, thetas)
    if L <= TRANSFER_MAX_L:
        return exact_transfer(L, thetas)
    return None


def log_partition(L: int, thetas) -> np.ndarray | None:
    if L <= 4:
        return log_partition_enumeration(L, thetas)
    if L <= TRANSFER_MAX_L:
        return exact_transfer(L, thetas, derivatives=False)["F"]
    return None


# samplers (JAX) -----------------------------------------------------------------------------------

UPDATES = ("cluster", "checkerboard")
ALIASES = {"metropolis": "checkerboard"}  # the word for the single-spin checkerboard update

# Layout. Inside the jitted loop the chains' lattices are held as their two checkerboard
# sublattices, each (L, L/2, C) int8 with the chain axis minor: sublattice c, row i, column k is
# site (i, 2k + (i + c) % 2). A sweep then touches only the spins it updates (half the work of
# masking a full lattice), neighbour sums are shifts of the other sublattice, and every
# elementwise op runs over C contiguous chains (vector lanes). Periodic shifts are built from a
# one-row / one-column halo materialised behind an optimization barrier: XLA fuses jnp.roll's
# slice-and-concatenate into the consumer as branchy per-element code, measured ~5x slower on
# CPU. See benchmarks/bench_fisher.py.


def mix32(x):
    """A 32-bit integer mixer (xorshift-multiply, the "lowbias32" constants of C. Wellons' hash
    prospector): a bijection of uint32 with strong avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def site_uniforms(site, k0, k1):
    """uint32 random words for a sublattice: site (L, L/2, 1) Weyl-spaced site constants, k0/k1 (C,)
    the chain's two key words for this half-sweep (from JAX's threefry, one draw per chain per
    half-sweep). A counter-based stream: mix32(mix32(site + k0) ^ k1); within one half-sweep the
    words of different sites are distinct (mix32 is a bijection), across half-sweeps and chains
    they use independent threefry keys. Compared with an integer threshold round(p * 2^32), so
    P(word < T) = T / 2^32 exactly: tests/test_fisher_families.py checks the words' uniformity and
    the sampler's exact histograms."""
    return mix32(mix32(site + k0) ^ k1)


def thresholds(p):
    """round(p * 2^32) as uint32 (p in [0, 1], float32), with p = 1 mapped to 2^32 - 256 (the
    largest float32 below 2^32: acceptance 1 - 6e-8)."""
    return jnp.clip(jnp.round(p * 4294967296.0), 0.0, 4294967040.0).astype(jnp.uint32)


def _odd_rows(L: int):
    return jnp.asarray(np.arange(L) % 2 == 1)[:, None, None]


def pack(s):
    """(C, L, L) spins -> the two sublattices (L, L/2, C) of the layout above."""
    t = jnp.moveaxis(s, 0, -1)                   # (L, L, C)
    even, odd = t[:, 0::2], t[:, 1::2]           # columns 2k and 2k + 1
    o = _odd_rows(s.shape[-1])
    return jnp.where(o, odd, even), jnp.where(o, even, odd)


def unpack(a0, a1):
    """The inverse of :func:`pack`: (C, L, L)."""
    L = a0.shape[0]
    o = _odd_rows(L)
    even, odd = jnp.where(o, a1, a0), jnp.where(o, a0, a1)
    t = jnp.stack([even, odd], axis=2).reshape(L, L, -1)
    return jnp.moveaxis(t, -1, 0)


def _neighbour_sum(b, right_first):
    """Sum of the 4 neighbours, on the other sublattice b (L, L/2, C), of each site of this one:
    rows i +- 1 same column, and in row i columns k and k + 1 (rows where this sublattice sits at
    odd columns, ``right_first``) or k - 1 (the others)."""
    bar = jax.lax.optimization_barrier
    rows = bar(jnp.concatenate([b[-1:], b, b[:1]], 0))
    cols = bar(jnp.concatenate([b[:, -1:], b, b[:, :1]], 1))
    return rows[:-2] + rows[2:] + b + jnp.where(right_first, cols[:, 2:], cols[:, :-2])


def _sweep(a0, a1, thr, words, site, odd):
    """One checkerboard heat-bath sweep of packed chains. thr (5, C) uint32: the threshold of
    p_up = sigmoid(2 (beta * nb + h)) for neighbour sums nb = -4, -2, 0, 2, 4; words (4, C) uint32
    key words (two per half-sweep)."""
    for c in (0, 1):
        nb = _neighbour_sum(a1 if c == 0 else a0, odd if c == 0 else ~odd)
        t = jnp.where(nb > 3, thr[4], jnp.where(nb > 1, thr[3], jnp.where(nb > -1, thr[2],
                      jnp.where(nb > -3, thr[1], thr[0]))))
        new = jnp.where(site_uniforms(site, words[2 * c], words[2 * c + 1]) < t, jnp.int8(1), jnp.int8(-1))
        a0, a1 = (new, a1) if c == 0 else (a0, new)
    return a0, a1


def _labels(open_r, open_d):
    """Connected-component labels (the smallest site index of the cluster) of a batch of L x L
    lattices (C, L, L) with open right/down bonds: min-label propagation to a fixed point (a
    batch-wide while loop; pointer jumping measured slower on CPU)."""
    L = open_r.shape[-1]
    open_l = jnp.roll(open_r, 1, -1)  # bond to the left neighbour = right bond of that neighbour
    open_u = jnp.roll(open_d, 1, -2)
    big = L * L

    def body(state):
        lab, _ = state
        cand = jnp.minimum(
            jnp.minimum(jnp.where(open_r, jnp.roll(lab, -1, -1), big), jnp.where(open_l, jnp.roll(lab, 1, -1), big)),
            jnp.minimum(jnp.where(open_d, jnp.roll(lab, -1, -2), big), jnp.where(open_u, jnp.roll(lab, 1, -2), big)),
        )
        new = jnp.minimum(lab, cand)
        return new, jnp.any(new != lab)

    lab0 = jnp.broadcast_to(jnp.arange(big, dtype=jnp.int32).reshape(L, L), open_r.shape)
    lab, _ = jax.lax.while_loop(lambda st: st[1], body, (lab0, jnp.array(True)))
    return lab


def _swendsen_wang(s, beta, h, keys):
    """Swendsen-Wang with the field by cluster heat bath, a batch (C, L, L); keys (C, 2)."""
    C, L = s.shape[0], s.shape[-1]
    u = jax.vmap(lambda k: jax.random.uniform(k, (3, L, L), jnp.float32))(keys)
    p_open = (1.0 - jnp.exp(-2.0 * beta))[:, None, None]
    open_r = (s == jnp.roll(s, -1, -1)) & (u[:, 0] < p_open)
    open_d = (s == jnp.roll(s, -1, -2)) & (u[:, 1] < p_open)
    lab = _labels(open_r, open_d).reshape(C, L * L)
    seg = (lab + (jnp.arange(C, dtype=jnp.int32) * (L * L))[:, None]).reshape(-1)
    size = jax.ops.segment_sum(jnp.ones(C * L * L, jnp.float32), seg, num_segments=C * L * L).reshape(C, L * L)
    # the root site's uniform decides its cluster: +1 with probability sigmoid(2 h |C|)
    up = u[:, 2].reshape(C, L * L) < jax.nn.sigmoid(2.0 * h[:, None] * size)
    sigma = jnp.where(up, 1, -1).astype(s.dtype)
    return jnp.take_along_axis(sigma, lab, axis=1).reshape(C, L, L)


@functools.partial(jax.jit, static_argnames=("L", "n_keep", "update"))
def _run_chains(keys, beta, h, burn_in, thin, *, L, n_keep, update):
    """Chains batched on one device: keys (C, 2) (one stream per chain), beta/h (C,). A hot start,
    ``burn_in`` steps, then ``n_keep`` states ``thin`` steps apart: (n_keep, C, L, L) int8.
    One step = [Swendsen-Wang, then] one checkerboard sweep. burn_in and thin are traced (no
    recompile per value). Each chain's random numbers come from its own key alone, so a chain's
    path does not depend on which other chains share the batch."""
    split = jax.vmap(jax.random.split)
    odd = _odd_rows(L)
    site = (jnp.arange(L * (L // 2), dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)).reshape(L, L // 2, 1)
    nb = jnp.arange(-4, 5, 2, dtype=jnp.float32)
    thr = thresholds(jax.nn.sigmoid(2.0 * (nb[:, None] * beta[None] + h[None])))   # (5, C)

    def chain_step(_, carry):
        a0, a1, ks = carry
        both = split(ks)                         # (C, 2, 2): the next carry key, this step's key
        step = split(both[:, 1])                 # (C, 2, 2): the sweep's key, the cluster update's
        if update == "cluster":
            a0, a1 = pack(_swendsen_wang(unpack(a0, a1), beta, h, step[:, 1]))
        words = jax.vmap(lambda k: jax.random.bits(k, (4,), jnp.uint32))(step[:, 0]).T   # (4, C)
        a0, a1 = _sweep(a0, a1, thr, words, site, odd)
        return a0, a1, both[:, 0]

    k0 = split(keys)
    keys, kinit = k0[:, 0], k0[:, 1]
    s = jax.vmap(lambda k: jnp.where(jax.random.bernoulli(k, 0.5, (L, L)), 1, -1).astype(jnp.int8))(kinit)
    carry = jax.lax.fori_loop(0, burn_in, chain_step, (*pack(s), keys))

    def keep(carry, _):
        carry = jax.lax.fori_loop(0, thin, chain_step, carry)
        return carry, unpack(carry[0], carry[1])

    _, out = jax.lax.scan(keep, carry, None, length=n_keep)
    return out


def sample(L: int, thetas, n: int, seed: int, index=None, *, chains: int, burn_in: int, thin: int,
           update: str = "cluster") -> np.ndarray:
    """(P, n, L, L) int8 spins: at each theta, ``chains`` independent chains (hot start, ``burn_in``
    steps), each giving ceil(n / chains) states ``thin`` steps apart; sample k is state k // chains
    of chain k % chains. Grid point p's samples depend only on (seed, index[p]) (index defaults to
    0..P-1), never on the other points in the call."""
    if L % 2 or L < 2:
        raise ValueError(f"the checkerboard sampler needs an even L >= 2, got L={L}")
    update = ALIASES.get(update, update)
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    th = np.atleast_2d(np.asarray(thetas, np.float64))
    if update == "cluster" and (th[:, 0] < 0).any():
        raise ValueError("the cluster update needs beta >= 0 (ferromagnetic bonds)")
    lay, keys, (beta, h) = layout(th, n, seed, index, chains)
    return lay.gather(_run_chains(keys, beta, h, jnp.int32(burn_in), jnp.int32(thin), L=L, n_keep=lay.n_keep, update=update))


def chain_series(L: int, theta, steps: int, chains: int, seed: int, *, burn_in: int, update: str = "cluster"):
    """Per-step (B, M) of ``chains`` chains at one theta after ``burn_in``: (steps, chains, 2), for
    autocorrelation checks (thin = 1)."""
    s = sample(L, np.tile(np.asarray(theta, np.float64), (chains, 1)), steps, seed, chains=1, burn_in=burn_in, thin=1, update=update)
    return sufficient_statistics(s).transpose(1, 0, 2)  # (P=chains, steps, 2) -> (steps, chains, 2)
