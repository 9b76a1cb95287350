"""2-D families p(x | theta) for the Fisher-metric job (docs/fisher.md): samplers and exact
references.

The interface (stable; the method and the ``geomjobs fisher`` job build on it)::

    family = build_family(spec["family"])          # SpecError("family.<key>", ...) on bad keys
    family.kind                 # "ising" | "tasep" | "diffusion-slice" (geomjobs.fisher.diffusion_slice)
    family.theta_names          # ("beta", "h") | ("alpha", "beta") | ("u", "v")
    family.sample_shape         # (L, L) spins in {-1, +1} int8 | (L,) occupations in {0, 1} int8 |
                                # (8, 8) float32 images
    family.check_thetas(thetas, key="grid")   # SpecError(key, ...) if a theta is outside the
                                # family's domain (TASEP rates outside (0, 1], beta < 0 with
                                # the cluster update); call it on the grid before any work
    family.sample(thetas, n, seed, index=None) -> (P, n, *sample_shape) int8
                                # thetas (P, 2); index (P,) ints = the points' *global* grid
                                # indices (default 0..P-1). Point p's samples depend only on
                                # (seed, index[p], the family's settings), never on which other
                                # points share the call, so a sharded job gives the same samples
                                # as one call over the whole grid.
    family.exact(thetas) -> {"F": (P,), "dF": (P, 2), "g": (P, 2, 2)} | None
                                # Ising: F = log Z, dF = E[T], g = Cov(T) = Hess F (enumeration
                                #   L <= 4, transfer matrix L <= 12, None beyond).
                                # TASEP: g = the Fisher metric of the stationary law in (alpha,
                                #   beta) (exact, L <= TASEP_EXACT_MAX_L). TASEP is not an
                                #   exponential family in (alpha, beta): g is NOT the Hessian of
                                #   its "F", which is log Z_L of the matrix-product solution
                                #   (Z_L = <W|(D+E)^L|V>, -log of the current ~ F / L), and "dF"
                                #   its gradient; also "current" (P,) = Z_{L-1} / Z_L.
    family.has_oracle           # True where log_likelihood is exact
    family.log_likelihood(x, thetas) -> (n, P) float64 | None
                                # exact log p(x_k | theta_p) (the oracle posterior's input);
                                # None where not computable (Ising L > ORACLE_MAX_L).
    family.sufficient_statistics(x) -> (..., 2) float64 | None
                                # T(x) of an exponential family (Ising: (sum_<ij> s_i s_j,
                                # sum_i s_i)); None for TASEP.
    family.describe() -> dict   # the resolved settings (update, burn-in, thinning) for records
    family.resolved() -> dict   # the spec mapping with every default filled (build_family of it
                                # gives the same family): what the samples job's spec holds

What the ``geomjobs fisher`` job needs of a family, declared here instead of probed::

    family.sample_dtype         # "int8" | "float32": the samples' dtype
    family.sites                # F and dF are reported per site: L * L | L | 1
    family.default_box          # (low, high) of the theta grid when the spec gives none, or None
    family.posterior_kinds      # the posterior kinds it takes, the job's default first
    family.no_oracle_reason     # why the exact likelihood is not computable (where has_oracle is False)
    family.outputs(spec, out, thetas, g, interior, progress) -> dict
                                # outputs of its own after the fit, merged into the summary
                                # (diffusion-slice: {"slice": ...}; the others: {})

    FAMILIES: dict[str, Callable[[dict], Family]]   # kind -> builder from the spec mapping (static;
                                                    # diffusion-slice's imports its module when used)

Spec keys: ``{kind: ising, L: 8, update: cluster|checkerboard (alias metropolis), burn_in: steps, thin: steps,
chains: per point}`` and ``{kind: tasep, L: 8, burn_in: sweeps, thin: sweeps, chains: per point}``;
the defaults (below) are checked against integrated autocorrelation times by the tests.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from geomjobs.errors import SpecError
from geomjobs.fisher import ising, tasep

ORACLE_MAX_L = 4  # Ising: exact likelihoods by enumeration (the oracle size)


class Family(Protocol):
    kind: str
    theta_names: tuple[str, str]
    sample_shape: tuple[int, ...]
    sample_dtype: str
    has_oracle: bool
    posterior_kinds: tuple[str, ...]
    default_box: tuple | None

    @property
    def sites(self) -> int: ...
    @property
    def no_oracle_reason(self) -> str: ...

    def resolved(self) -> dict: ...
    def outputs(self, spec: dict, out: str, thetas, g, interior, progress: bool = False) -> dict: ...
    def check_thetas(self, thetas, key: str = "grid") -> None: ...
    def sample(self, thetas, n: int, seed: int, index=None) -> np.ndarray: ...
    def exact(self, thetas) -> dict | None: ...
    def log_likelihood(self, x, thetas) -> np.ndarray | None: ...
    def sufficient_statistics(self, x) -> np.ndarray | None: ...
    def describe(self) -> dict: ...


def _int(cfg: dict, key: str, default: int, lo: int, hi: int | None = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SpecError(f"family.{key}", f"expected an integer {rng}, got {v!r}")
    return int(v)


def _keys(cfg: dict, allowed: set[str]) -> None:
    extra = sorted(set(cfg) - allowed)
    if extra:
        raise SpecError(f"family.{extra[0]}", f"unknown key for family kind '{cfg.get('kind')}' (expected one of {sorted(allowed)})")


def _thetas(thetas) -> np.ndarray:
    th = np.asarray(thetas, np.float64)
    if th.ndim == 1:
        th = th[None]
    if th.ndim != 2 or th.shape[1] != 2:
        raise ValueError(f"thetas must be (P, 2), got shape {th.shape}")
    return th


class _Lattice:
    """What Ising and TASEP share as families of the job: int8 samples, F per site, the learned or
    exact posterior, no default box, no outputs of their own."""
    sample_dtype = "int8"
    posterior_kinds = ("learned", "oracle")
    default_box = None
    sample_shape: tuple[int, ...]

    @property
    def sites(self) -> int:
        return int(np.prod(self.sample_shape))

    def resolved(self) -> dict:
        return self.describe()

    def outputs(self, spec: dict, out: str, thetas, g, interior, progress: bool = False) -> dict:
        return {}


class IsingFamily(_Lattice):
    kind = "ising"
    theta_names = ("beta", "h")

    def __init__(self, L: int, update: str = "cluster", burn_in: int | None = None, thin: int | None = None, chains: int = 16):
        self.L = L
        self.update = update
        # defaults (hot start). Measured integrated autocorrelation times at beta = 0.44, h = 0 (the
        # worst case on the grids used): cluster tau(B) = 1.7 / 2.7 / 3.7 steps and tau(|M|) = 1.7 /
        # 2.9 / 4.3 at L = 4 / 8 / 16 (tau(M) ~ 1); checkerboard tau(M) ~ 30 / 85 sweeps at L = 4 / 8
        # (slow sign flips, ~L^2). Thinning is about twice the worst tau; the tests check it.
        self.burn_in = burn_in if burn_in is not None else (100 if update == "cluster" else 10 * L * L + 500)
        self.thin = thin if thin is not None else (max(5, L // 2 + 2) if update == "cluster" else 6 * L * L + 20)
        self.chains = chains
        self.sample_shape = (L, L)
        self.has_oracle = L <= ORACLE_MAX_L

    @classmethod
    def from_spec(cls, cfg: dict) -> IsingFamily:
        _keys(cfg, {"kind", "L", "update", "burn_in", "thin", "chains"})
        if "L" not in cfg:
            raise SpecError("family.L", "ising needs the lattice size L (an even integer >= 2)")
        L = _int(cfg, "L", 0, 2, 64)
        if L % 2:
            raise SpecError("family.L", f"the checkerboard sampler needs an even L, got {L}")
        update = cfg.get("update", "cluster")
        if update not in ising.UPDATES and update not in ising.ALIASES:
            raise SpecError("family.update", f"expected one of {list(ising.UPDATES) + list(ising.ALIASES)}, got {update!r}")
        update = ising.ALIASES.get(update, update)
        burn = _int(cfg, "burn_in", 0, 0) if "burn_in" in cfg else None
        thin = _int(cfg, "thin", 1, 1) if "thin" in cfg else None
        return cls(L, update, burn, thin, _int(cfg, "chains", 16, 1))

    @property
    def no_oracle_reason(self) -> str:
        return (f"the exact Ising likelihood needs log Z by enumeration of 2^(L*L) states, done for L <= {ORACLE_MAX_L}; "
                f"got L = {self.L}")

    def check_thetas(self, thetas, key: str = "grid") -> None:
        th = _thetas(thetas)
        if not np.isfinite(th).all():
            raise SpecError(key, "theta values must be finite")
        if self.update == "cluster" and (th[:, 0] < 0).any():
            raise SpecError(key, f"beta must be >= 0 for the cluster update (got min {th[:, 0].min()}); use family.update: checkerboard")

    def sample(self, thetas, n: int, seed: int, index=None) -> np.ndarray:
        return ising.sample(self.L, _thetas(thetas), n, seed, index, chains=self.chains, burn_in=self.burn_in, thin=self.thin,
                            update=self.update)

    def exact(self, thetas) -> dict | None:
        return ising.exact(self.L, _thetas(thetas))

    def log_likelihood(self, x, thetas) -> np.ndarray | None:
        if not self.has_oracle:
            return None
        th = _thetas(thetas)
        t = self.sufficient_statistics(np.asarray(x).reshape(-1, self.L, self.L))  # (n, 2)
        return t @ th.T - ising.log_partition(self.L, th)[None, :]

    def sufficient_statistics(self, x) -> np.ndarray:
        return ising.sufficient_statistics(x)

    def describe(self) -> dict:
        return {"kind": self.kind, "L": self.L, "update": self.update, "burn_in": self.burn_in, "thin": self.thin, "chains": self.chains}


class TasepFamily(_Lattice):
    kind = "tasep"
    theta_names = ("alpha", "beta")
    has_oracle = True

    def __init__(self, L: int, burn_in: int | None = None, thin: int | None = None, chains: int = 16):
        self.L = L
        self.burn_in = burn_in if burn_in is not None else tasep.default_burn_in(L)
        self.thin = thin if thin is not None else tasep.default_thin(L)
        self.chains = chains
        self.sample_shape = (L,)

    @classmethod
    def from_spec(cls, cfg: dict) -> TasepFamily:
        _keys(cfg, {"kind", "L", "burn_in", "thin", "chains"})
        if "L" not in cfg:
            raise SpecError("family.L", "tasep needs the chain length L (an integer >= 1)")
        L = _int(cfg, "L", 0, 1, tasep.MAX_L)
        burn = _int(cfg, "burn_in", 0, 0) if "burn_in" in cfg else None
        thin = _int(cfg, "thin", 1, 1) if "thin" in cfg else None
        return cls(L, burn, thin, _int(cfg, "chains", 16, 1))

    no_oracle_reason = ""

    def check_thetas(self, thetas, key: str = "grid") -> None:
        th = _thetas(thetas)
        if not (np.isfinite(th).all() and (th > 0).all() and (th <= 1).all()):
            raise SpecError(key, f"TASEP rates (alpha, beta) must lie in (0, 1], got range [{th.min()}, {th.max()}]")

    def sample(self, thetas, n: int, seed: int, index=None) -> np.ndarray:
        return tasep.sample(self.L, _thetas(thetas), n, seed, index, chains=self.chains, burn_in=self.burn_in, thin=self.thin)

    def exact(self, thetas) -> dict | None:
        return tasep.exact(self.L, _thetas(thetas))

    def log_likelihood(self, x, thetas) -> np.ndarray:
        return tasep.log_prob(np.asarray(x).reshape(-1, self.L), _thetas(thetas))

    def sufficient_statistics(self, x) -> None:
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "L": self.L, "burn_in": self.burn_in, "thin": self.thin, "chains": self.chains}


def _diffusion_slice(cfg: dict) -> Family:
    from geomjobs.fisher.diffusion_slice import DiffusionSliceFamily  # its module loads JAX models: imported when used

    return DiffusionSliceFamily.from_spec(cfg)


FAMILIES: dict[str, Callable[[dict], Family]] = {"ising": IsingFamily.from_spec, "tasep": TasepFamily.from_spec,
                                                 "diffusion-slice": _diffusion_slice}


def build_family(cfg) -> Family:
    """The family of a spec's ``family`` mapping; SpecError naming the key on bad input."""
    if not isinstance(cfg, dict):
        raise SpecError("family", f"expected a mapping with 'kind', got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if kind not in FAMILIES:
        raise SpecError("family.kind", f"expected one of {sorted(FAMILIES)}, got {kind!r}")
    return FAMILIES[kind](cfg)
