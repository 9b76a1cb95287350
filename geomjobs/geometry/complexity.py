"""Local complexity delta (docs/geometry.md): sign flips of neuron inputs on a cross-polytope.

At a latent ``z`` the caller supplies ``B`` (P x d, orthonormal rows, d = z.size). The 2P
vertices ``z +- radius * b_i`` span a small cross-polytope around ``z``; a *neuron* (one scalar
input of an element-wise nonlinearity) *flips* iff its input is neither > 0 at all vertices nor
<= 0 at all vertices. delta is the number of flipping neurons, summed over nonlinearity *sites*
(one site = one call of a nonlinearity on an array). For smooth activations (tanh, GELU, ...)
this counts zero crossings of their inputs, i.e. neurons whose "soft kink" lies near ``z``.

Why a jaxpr interpreter: counting must work on ANY JAX function (flax linen, nnx, hand-written)
without editing the model. We trace ``fn`` once to a jaxpr and re-evaluate it equation by
equation (after ``jax.core.eval_jaxpr``), recording ("tapping") the input of every recognised
nonlinearity. The interpreter only binds primitives, so it composes with ``jit`` and ``vmap``.

What is recognised (see the module constants):

* a named call (``jit`` / ``custom_jvp_call`` / ``custom_vjp_call``) whose name is in
  :data:`NONLINEARITY_CALL_NAMES` (``jax.nn.relu``, ``silu``, ``softplus``, ...) is ONE site: its
  first input is tapped and its body is not searched (so softplus's inner max/abs count once);
* calls named in :data:`OPAQUE_CALL_NAMES` (e.g. ``logaddexp``) are evaluated without searching;
* other calls (``jit``, ``remat``, custom derivatives, ...) are searched recursively;
* primitives in :data:`NONLINEARITY_PRIMITIVES` (``tanh``, ``logistic``, ``erf``, ``erfc``, ``abs``)
  and ``max``/``min`` with a constant-zero operand (``jnp.maximum(x, 0)``) are sites.

Not supported: nonlinearities inside ``scan`` / ``while`` / ``cond`` (and any other primitive
carrying sub-jaxprs) are evaluated opaquely and NOT counted (a warning is emitted, once per
primitive and call site under Python's default filter); ``jnp.where(x > 0, x, 0)``-style relus and ``max(x, y)`` of two variables are not
sites; only the zero crossing is counted for activations with other kinks (relu6, hard_tanh).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal

__all__ = [
    "NONLINEARITY_CALL_NAMES",
    "NONLINEARITY_PRIMITIVES",
    "OPAQUE_CALL_NAMES",
    "Site",
    "local_complexity",
    "select_sites",
    "trace_sites",
]

#: Names of calls (``jit`` / custom-derivative wrappers) that are one nonlinearity site each.
NONLINEARITY_CALL_NAMES = frozenset({
    "relu", "relu6", "leaky_relu", "silu", "swish", "gelu", "elu", "celu", "selu", "softplus",
    "sigmoid", "log_sigmoid", "hard_tanh", "hard_sigmoid", "hard_silu", "hard_swish", "mish",
    "soft_sign", "squareplus", "sparse_plus", "sparse_sigmoid",
})
#: Names of calls evaluated as a whole and never searched (their kinks are not neurons).
OPAQUE_CALL_NAMES = frozenset({"logaddexp", "logsumexp", "log_softmax", "softmax"})
#: Element-wise primitives whose input is a site (``gelu`` inlines ``tanh`` or ``erfc``).
NONLINEARITY_PRIMITIVES = frozenset({"tanh", "logistic", "erf", "erfc", "abs"})
#: Binary primitives that are a site when one operand is a constant zero (tap the other one).
ZERO_CLAMP_PRIMITIVES = frozenset({"max", "min"})
#: Call-like primitives whose body is inlined and searched.
_CALL_PRIMITIVES = frozenset({
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
})
#: Shape-only primitives that keep a constant zero a constant zero (``jnp.zeros_like``).
_ZERO_PRESERVING = frozenset({
    "convert_element_type", "broadcast_in_dim", "reshape", "copy", "squeeze", "expand_dims",
})


@dataclass(frozen=True)
class Site:
    """One nonlinearity call. ``shape`` is the per-vertex shape of its input (neurons =
    its size); ``label`` is the name-scope / call path, e.g. ``"M/jit:block/tanh#3"``."""

    index: int
    name: str
    shape: tuple[int, ...]
    label: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _call_body(eqn) -> tuple[Jaxpr, list, str] | None:
    """(jaxpr, consts, name) of a call-like eqn whose invars map 1:1 onto the body's invars."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))
    if isinstance(body, ClosedJaxpr):
        jaxpr, consts = body.jaxpr, list(body.consts)
    elif isinstance(body, Jaxpr):
        jaxpr, consts = body, []
    else:
        return None
    name = eqn.params.get("name")
    if not isinstance(name, str):  # custom_jvp_call keeps its name in the debug info
        name = getattr(getattr(jaxpr, "debug_info", None), "func_name", None) or ""
    name = name.split(" ")[0]  # debug func_name may read "relu at file.py:71"
    if len(jaxpr.invars) != len(eqn.invars):
        return None
    return jaxpr, consts, name


def _has_subjaxprs(eqn) -> bool:
    def is_jaxpr(v):
        if isinstance(v, (tuple, list)):
            return any(is_jaxpr(x) for x in v)
        return isinstance(v, (Jaxpr, ClosedJaxpr))
    return any(is_jaxpr(v) for v in eqn.params.values())


def _is_zero_literal(atom) -> bool:
    if not isinstance(atom, Literal) or np.size(atom.val) == 0:
        return False
    return bool(np.all(np.asarray(atom.val) == 0))


class _Interpreter:
    """Evaluates a jaxpr by binding its primitives, appending each site's input to ``taps``."""

    def __init__(self):
        self.taps: list[jax.Array] = []
        self.sites: list[Site] = []

    def _tap(self, name: str, value, scope: list[str]) -> None:
        index = len(self.sites)
        label = "/".join([*scope, f"{name}#{index}"])
        self.sites.append(Site(index, name, tuple(np.shape(value)), label))
        self.taps.append(value)

    def run(self, jaxpr: Jaxpr, consts, args, scope: list[str], zero_args=()) -> list:
        env: dict[Any, Any] = {}
        zeros: set = {v for v, z in zip(jaxpr.invars, zero_args) if z}

        def read(a):
            return a.val if isinstance(a, Literal) else env[a]

        def is_zero(a):
            return _is_zero_literal(a) or (not isinstance(a, Literal) and a in zeros)

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            invals = [read(a) for a in eqn.invars]
            prim = eqn.primitive.name
            stack = str(eqn.source_info.name_stack)
            here = [*scope, stack] if stack else list(scope)
            body = _call_body(eqn)
            if body is not None and body[2] not in OPAQUE_CALL_NAMES:
                jaxpr_b, consts_b, name = body
                if name in NONLINEARITY_CALL_NAMES:
                    n_consts = eqn.params.get("num_consts", 0)
                    self._tap(name, invals[n_consts], here)
                    outs = self._bind(eqn, invals)
                else:
                    tag = "jit" if prim in ("jit", "pjit") else prim
                    sub = [*here, f"{tag}:{name}" if name else tag]
                    outs = self.run(jaxpr_b, consts_b, invals, sub,
                                    [is_zero(a) for a in eqn.invars])
            else:
                if prim in NONLINEARITY_PRIMITIVES:
                    self._tap(prim, invals[0], here)
                elif prim in ZERO_CLAMP_PRIMITIVES and len(invals) == 2:
                    z0, z1 = is_zero(eqn.invars[0]), is_zero(eqn.invars[1])
                    if z0 != z1:
                        self._tap(prim, invals[0] if z1 else invals[1], here)
                elif body is None and _has_subjaxprs(eqn):
                    # Python's default filter shows this once per message and call site
                    warnings.warn(f"local_complexity: nonlinearities inside '{prim}' are "
                                  "evaluated opaquely and not counted", stacklevel=3)
                if prim in _ZERO_PRESERVING and eqn.invars and is_zero(eqn.invars[0]):
                    zeros.update(eqn.outvars)
                outs = self._bind(eqn, invals)
            for v, val in zip(eqn.outvars, outs):
                if not isinstance(v, DropVar):
                    env[v] = val
        return [read(a) for a in jaxpr.outvars]

    @staticmethod
    def _bind(eqn, invals) -> list:
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            ans = eqn.primitive.bind(*invals, **params)
        return list(ans) if eqn.primitive.multiple_results else [ans]


def _trace(fn: Callable, z) -> ClosedJaxpr:
    return jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(np.shape(z), jnp.result_type(z)))


def _tapped(closed: ClosedJaxpr, x) -> tuple[list[jax.Array], list[Site]]:
    interp = _Interpreter()
    interp.run(closed.jaxpr, closed.consts, [x], [])
    return interp.taps, interp.sites


def trace_sites(fn: Callable, example_z) -> list[Site]:
    """List the nonlinearity sites of ``fn`` at a latent shaped like ``example_z``, in the order
    ``local_complexity`` indexes them. Abstract evaluation only: no FLOPs are spent."""
    closed = _trace(fn, example_z)
    found: list[list[Site]] = []

    def probe(x):
        taps, sites = _tapped(closed, x)
        found.append(sites)
        return taps

    jax.eval_shape(probe, jax.ShapeDtypeStruct(np.shape(example_z), jnp.result_type(example_z)))
    return found[0]


def select_sites(all_sites: Sequence[Site], names: str | Sequence[str] | None = None,
                 last: int | None = None) -> list[int]:
    """Resolve a job's layer selection to site indices.

    A name matches a site by its ``name`` (``"relu"``: every relu), its full ``label``, or any
    scope component of the label (a flax module or ``jax.named_scope`` name such as ``"M"``).
    ``last`` keeps the last L of the (name-filtered) sites. Raises ValueError when a name
    matches nothing or L is not in 1..number of sites, so a misspelt job fails loudly.
    """
    chosen = [s.index for s in all_sites]
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        picked: set[int] = set()
        for nm in names:
            hits = {s.index for s in all_sites
                    if nm in (s.name, s.label) or nm in s.label.split("/")[:-1]}
            if not hits:
                known = sorted({s.name for s in all_sites} | {s.label for s in all_sites})
                raise ValueError(f"unknown nonlinearity site name {nm!r}; known: {known}")
            picked |= hits
        chosen = [i for i in chosen if i in picked]
    if last is not None:
        if not 1 <= int(last) <= len(chosen):
            raise ValueError(
                f"last={last} but only {len(chosen)} nonlinearity sites are selectable")
        chosen = chosen[-int(last):]
    return chosen


def local_complexity(fn: Callable, z, B, radius, *, sites: Sequence[int] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """Count neurons whose input changes sign over the 2P vertices ``z +- radius * B[i]``.

    ``fn`` maps one latent (``z.shape``, no batch axis) to anything. Returns ``(delta,
    per_site)``: an int32 scalar and an int32 vector over the selected ``sites`` (indices into
    :func:`trace_sites`, in the given order; None = all). Pure JAX: wrap in ``jit``/``vmap``.
    """
    z = jnp.asarray(z)
    closed = _trace(fn, z)
    dirs = jnp.reshape(jnp.asarray(B), (-1, *z.shape)).astype(z.dtype)
    step = jnp.asarray(radius, z.dtype) * dirs
    vertices = jnp.concatenate([z[None] + step, z[None] - step], axis=0)
    n_sites: list[int] = []

    def taps_at(x):
        taps, found = _tapped(closed, x)
        n_sites.append(len(found))
        return taps

    taps = jax.vmap(taps_at)(vertices)
    index = list(range(n_sites[0])) if sites is None else [int(i) for i in sites]
    bad = [i for i in index if not 0 <= i < n_sites[0]]
    if bad:
        raise ValueError(f"site indices {bad} out of range; fn has {n_sites[0]} sites")
    counts = []
    for i in index:
        t = taps[i]
        same = jnp.all(t > 0, axis=0) | jnp.all(t <= 0, axis=0)
        counts.append(jnp.sum(~same, dtype=jnp.int32))
    per_site = jnp.stack(counts) if counts else jnp.zeros((0,), jnp.int32)
    return jnp.sum(per_site, dtype=jnp.int32), per_site
