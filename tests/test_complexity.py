"""Local complexity delta against brute-force NumPy sign counts (never golden numbers).

The reference evaluates the same network at every vertex z +- r b_i in float64 NumPy, records
the pre-activations and counts neurons that are neither > 0 everywhere nor <= 0 everywhere.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

from geomjobs.geometry.complexity import local_complexity, select_sites, trace_sites  # noqa: E402

from references import flips, mlp_flip_counts, vertices  # noqa: E402


def basis(seed, P, d):
    """Orthonormal rows from the QR of a Gaussian matrix, as a caller would build B."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:, :P].T


def make_mlp(seed, d, widths, out=3):
    rng = np.random.default_rng(seed)
    dims = [d, *widths, out]
    return [(rng.normal(size=(a, b)) / math.sqrt(a), rng.normal(size=b) * 0.3)
            for a, b in zip(dims[:-1], dims[1:])]


def jax_mlp(params, act):
    def fn(x):
        h = x
        for W, b in params[:-1]:
            h = act(h @ W + b)
        W, b = params[-1]
        return h @ W + b
    return fn


NP_ACTS = {
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "silu": lambda x: x / (1 + np.exp(-x)),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "softplus": lambda x: np.logaddexp(x, 0),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "gelu_erf": lambda x: x * 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
}
# activation -> (jax function, site name the interpreter must report, one per layer)
JAX_ACTS = {
    "relu": (jax.nn.relu, "relu"),
    "tanh": (jnp.tanh, "tanh"),
    "silu": (jax.nn.silu, "silu"),
    "leaky_relu": (jax.nn.leaky_relu, "leaky_relu"),
    "elu": (jax.nn.elu, "elu"),
    "softplus": (jax.nn.softplus, "softplus"),
    "gelu_tanh": (lambda x: jax.nn.gelu(x, approximate=True), "tanh"),
    "gelu_erf": (lambda x: jax.nn.gelu(x, approximate=False), "erfc"),
}


@pytest.mark.parametrize("seed,d,P,widths,r", [
    (0, 4, 4, (16, 16), 0.3),
    (1, 6, 4, (24, 32, 16), 0.2),
    (2, 8, 6, (32, 32), 0.5),
    (3, 5, 5, (16, 24, 24), 0.3),
])
def test_relu_mlp_matches_bruteforce(seed, d, P, widths, r):
    params = make_mlp(seed, d, widths)
    z = np.random.default_rng(100 + seed).normal(size=d)
    B = basis(seed, P, d)
    ref = mlp_flip_counts(params, z, B, r, NP_ACTS["relu"])
    assert sum(ref) > 0  # otherwise the test could not fail
    fn = jax_mlp(params, jax.nn.relu)
    sites = trace_sites(fn, z)
    assert [s.name for s in sites] == ["relu"] * len(widths)
    assert [s.shape for s in sites] == [(w,) for w in widths]
    delta, per_site = local_complexity(fn, z, B, r)
    assert per_site.tolist() == ref
    assert int(delta) == sum(ref)


def test_linear_map_has_no_sites():
    W = np.random.default_rng(0).normal(size=(5, 3))
    fn = lambda x: x @ W + 1.0  # noqa: E731
    z = np.ones(5)
    assert trace_sites(fn, z) == []
    delta, per_site = local_complexity(fn, z, basis(0, 3, 5), 0.4)
    assert int(delta) == 0 and per_site.shape == (0,)


@pytest.mark.parametrize("act", sorted(JAX_ACTS))
def test_smooth_and_piecewise_activations(act):
    d, widths, r = 6, (16, 24), 0.8
    params = make_mlp(7, d, widths)
    z = np.random.default_rng(8).normal(size=d)
    B = basis(9, 5, d)
    ref = mlp_flip_counts(params, z, B, r, NP_ACTS[act])
    assert all(c > 0 for c in ref)
    jact, site_name = JAX_ACTS[act]
    fn = jax_mlp(params, jact)
    assert [s.name for s in trace_sites(fn, z)] == [site_name] * len(widths)  # one per layer
    delta, per_site = local_complexity(fn, z, B, r)
    assert per_site.tolist() == ref and int(delta) == sum(ref)
    # the network itself is reproduced, so the references describe the same function
    np.testing.assert_allclose(fn(z), _np_forward(params, NP_ACTS[act], z), rtol=1e-9, atol=1e-12)


def _np_forward(params, act, x):
    for W, b in params[:-1]:
        x = act(x @ W + b)
    return x @ params[-1][0] + params[-1][1]


def test_flax_linen_module():
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            kw = dict(param_dtype=jnp.float64)
            x = nn.relu(nn.Dense(16, **kw)(x))
            x = nn.gelu(nn.Dense(16, **kw)(x))
            return nn.Dense(2, **kw)(x)

    d = 5
    z = np.random.default_rng(1).normal(size=d)
    m = M()
    variables = m.init(jax.random.key(0), z)
    fn = lambda x: m.apply(variables, x)  # noqa: E731
    p = variables["params"]
    params = [(np.asarray(p[f"Dense_{i}"]["kernel"]), np.asarray(p[f"Dense_{i}"]["bias"]))
              for i in range(3)]
    B, r = basis(2, 4, d), 0.5
    h = vertices(z, B, r)
    pre1 = h @ params[0][0] + params[0][1]
    pre2 = np.maximum(pre1, 0) @ params[1][0] + params[1][1]
    ref = [flips(pre1), flips(pre2)]
    assert sum(ref) > 0
    sites = trace_sites(fn, z)
    assert [s.name for s in sites] == ["relu", "tanh"]  # flax gelu is tanh-approximate
    delta, per_site = local_complexity(fn, z, B, r)
    assert per_site.tolist() == ref and int(delta) == sum(ref)
    # flax module names appear as scopes, so a job can select by module
    assert select_sites(sites, names=["M"]) == [0, 1]


def test_flax_nnx_module():
    from flax import nnx

    class N(nnx.Module):
        def __init__(self, rngs):
            kw = dict(param_dtype=jnp.float64, rngs=rngs)
            self.l1 = nnx.Linear(6, 24, **kw)
            self.l2 = nnx.Linear(24, 16, **kw)
            self.l3 = nnx.Linear(16, 2, **kw)

        def __call__(self, x):
            return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    net = N(nnx.Rngs(0))
    params = [(np.asarray(lin.kernel[...]), np.asarray(lin.bias[...]))
              for lin in (net.l1, net.l2, net.l3)]
    z = np.random.default_rng(3).normal(size=6)
    B, r = basis(4, 6, 6), 0.3
    ref = mlp_flip_counts(params, z, B, r, NP_ACTS["relu"])
    assert sum(ref) > 0
    delta, per_site = local_complexity(lambda x: net(x), z, B, r)
    assert per_site.tolist() == ref and int(delta) == sum(ref)


def test_select_sites_last_and_names():
    d = 6
    params = make_mlp(11, d, (16, 16, 16))

    def fn(x):
        h = jax.nn.relu(x @ params[0][0] + params[0][1])
        h = jnp.tanh(h @ params[1][0] + params[1][1])
        h = jax.nn.relu(h @ params[2][0] + params[2][1])
        return h @ params[3][0] + params[3][1]

    z = np.random.default_rng(12).normal(size=d)
    B, r = basis(13, 6, d), 0.4
    acts = [NP_ACTS["relu"], np.tanh, NP_ACTS["relu"]]
    h, ref = vertices(z, B, r), []
    for (W, b), a in zip(params[:-1], acts):
        pre = h @ W + b
        ref.append(flips(pre))
        h = a(pre)
    sites = trace_sites(fn, z)
    assert select_sites(sites) == [0, 1, 2]
    assert select_sites(sites, last=1) == [2]
    assert select_sites(sites, names=["relu"]) == [0, 2]
    assert select_sites(sites, names="tanh") == [1]
    assert select_sites(sites, names=["relu"], last=1) == [2]
    assert select_sites(sites, names=[sites[1].label]) == [1]
    delta, per_site = local_complexity(fn, z, B, r, sites=select_sites(sites, last=1))
    assert per_site.tolist() == [ref[2]] and int(delta) == ref[2]
    delta, per_site = local_complexity(fn, z, B, r, sites=[0, 2])
    assert per_site.tolist() == [ref[0], ref[2]]
    with pytest.raises(ValueError, match="conv7"):
        select_sites(sites, names=["relu", "conv7"])
    with pytest.raises(ValueError, match="last=4"):
        select_sites(sites, last=4)
    with pytest.raises(ValueError):
        local_complexity(fn, z, B, r, sites=[3])


def test_jit_vmap_batch_and_nonflat_latent():
    # z has shape (2, 3): rows are pushed through the same layers, columns are features
    params = make_mlp(21, 3, (16, 16), out=2)
    fn = jax_mlp(params, jax.nn.relu)
    zs = np.random.default_rng(22).normal(size=(4, 2, 3))
    B, r = basis(23, 5, 6), 0.3
    refs = [mlp_flip_counts(params, z, B, r, NP_ACTS["relu"]) for z in zs]
    assert sum(map(sum, refs)) > 0
    batched = jax.jit(jax.vmap(lambda z: local_complexity(fn, z, B, r)))
    deltas, per_sites = batched(jnp.asarray(zs))
    assert per_sites.shape == (4, 2)
    for i, z in enumerate(zs):
        d1, p1 = local_complexity(fn, z, B, r)
        assert per_sites[i].tolist() == p1.tolist() == refs[i]
        assert int(deltas[i]) == int(d1) == sum(refs[i])


def test_traced_params_radius_and_basis_under_jit():
    # weights, radius and B arrive as jit arguments (tracers closed over by fn)
    params = make_mlp(31, 4, (16,))
    z = np.random.default_rng(32).normal(size=4)
    B, r = basis(33, 4, 4), 0.5
    ref = mlp_flip_counts(params, z, B, r, NP_ACTS["relu"])
    assert sum(ref) > 0

    @jax.jit
    def run(params, z, B, r):
        return local_complexity(jax_mlp(params, jax.nn.relu), z, B, r)

    delta, per_site = run(params, z, B, r)
    assert per_site.tolist() == ref


def test_max_with_zero_is_a_site_and_scan_is_opaque():
    W = np.random.default_rng(41).normal(size=(4, 8))
    z = np.random.default_rng(42).normal(size=4)
    B, r = basis(43, 4, 4), 0.5
    ref = flips(vertices(z, B, r) @ W)
    assert ref > 0
    fn = lambda x: jnp.maximum(x @ W, jnp.zeros(8)).sum()  # noqa: E731
    assert [s.name for s in trace_sites(fn, z)] == ["max"]
    assert int(local_complexity(fn, z, B, r)[0]) == ref

    def looped(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c), None), x @ W, None, length=2)[0]

    with pytest.warns(UserWarning, match="scan"):
        assert trace_sites(looped, z) == []
