"""``execution.dtype: bfloat16`` (issue 22 item 3): G and the local-scaling sweep (k VJP rows or
d JVP columns) in bfloat16, the SVD in float32 (runner/engine.py, geometry/spectrum.py).

The bf16 psi is compared with a float64 NumPy reference (tests/references.py, the chain rule by
hand) under a bound derived from bf16's rounding (:func:`rounding_bound`), which is checked to be
tight enough to mean something, and the job is checked to have really run in bf16 (its error is
far above float32's, its step's matmuls are bf16). float32 jobs compile the program they always
did (no bf16 and no extra converts), and what has no bf16 path is refused by name."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs import run_job
from geomjobs.errors import SpecError
from geomjobs.generators.mlp import load_mlp_weights, mlp_apply, random_mlp, save_mlp
from geomjobs.geometry.projections import orthonormal_rows
from geomjobs.geometry.spectrum import SIDES, projected_singular_values
from geomjobs.latents import build_latents
from geomjobs.runner.engine import Engine
from geomjobs.runner.plan import plan_job
from geomjobs.sink.dataset import Dataset
from geomjobs.spec import validate_spec

from jobs import read_sorted
from references import numpy_mlp_jacobian

SIZES = (6, 32, 32, 40)     # d = 6, n = 40: tanh, so psi moves smoothly with the rounding
K = 20
U = 2.0 ** -9               # bf16 keeps 8 significant bits: round to nearest moves a value by at most 2^-9 of it
EMULATIONS = 16


def emulated_psi(layers, w, z, side, rng):
    """psi of W A(z) for the tanh MLP computed in float64 with bf16's rounding emulated: every
    weight, the latent, W and the result of every operation the sweep performs (each product,
    bias add, tanh and tanh' of the forward pass; each partial product of the VJP rows or the JVP
    columns) is multiplied by (1 + delta), delta uniform in [-U, U] and independent: the standard
    model of rounding to nearest (Higham, ch. 2) with the errors drawn instead of bounded, the
    dots accumulated in float32 (one rounding of the result). The product with W on the JVP side
    and the SVD are float32 (no rounding drawn)."""
    r = lambda a: a * (1 + U * rng.uniform(-1, 1, np.shape(a)))  # noqa: E731
    ls = [(r(wl), r(b)) for wl, b in layers]
    h, derivs = r(np.asarray(z, np.float64)), []
    for wl, b in ls[:-1]:
        h = r(np.tanh(r(r(h @ wl) + b)))
        derivs.append(r(1 - r(h * h)))
    if side == "vjp":
        m = r(r(w) @ ls[-1][0].T)
        for (wl, _), dl in zip(reversed(ls[:-1]), reversed(derivs)):
            m = r(r(m * dl) @ wl.T)
    else:
        t = np.eye(len(z))
        for (wl, _), dl in zip(ls[:-1], derivs):
            t = r(r(t @ wl) * dl)
        m = r(w) @ r(t @ ls[-1][0]).T
    return float(np.log(np.linalg.svd(m, compute_uv=False)).sum())


def rounding_bound(layers, w, z, side, psi, seed=0):
    """A tolerance on |psi_bf16 - psi| at z: 4 x the largest deviation of :func:`emulated_psi`
    from the exact psi over EMULATIONS draws (the maximum of 16 draws is not the maximum; 4x
    leaves room for the rounding errors' being bounded by U rather than spread over [-U, U])."""
    rng = np.random.default_rng(seed)
    return 4 * max(abs(emulated_psi(layers, w, z, side, rng) - psi) for _ in range(EMULATIONS))


def reference(layers, w, z):
    """psi of W A(z) in float64, the Jacobian by hand."""
    s = np.linalg.svd(w @ numpy_mlp_jacobian(layers, np.asarray(z, np.float64), act="tanh"), compute_uv=False)
    return float(np.log(s).sum())


def spec(weights, dtype, count=24, **descriptors):
    return {"model": {"kind": "mlp", "weights": weights, "activation": "tanh"},
            "latents": {"kind": "gaussian", "count": count, "shape": [SIZES[0]], "seed": 5},
            "descriptors": descriptors or {"local_scaling": {"mode": "projection", "k": K}, "local_rank": {}},
            "execution": {"shard_size": 12, "batch_size": 8, "dtype": dtype}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "mlp.npz"
    save_mlp(path, random_mlp(list(SIZES), seed=4))
    return str(path)


def test_the_schema_takes_bfloat16_and_float32_stays_the_default(weights):
    assert validate_spec(spec(weights, "bfloat16"))["execution"]["dtype"] == "bfloat16"
    raw = spec(weights, "float32")
    del raw["execution"]["dtype"]
    assert validate_spec(raw)["execution"]["dtype"] == "float32"
    with pytest.raises(Exception, match="float16"):
        validate_spec(spec(weights, "float16"))


@pytest.mark.parametrize("side", sorted(SIDES))
def test_either_side_in_bf16_is_the_float64_reference_within_the_rounding_bound(weights, side):
    layers = load_mlp_weights(weights)
    l16 = [(jnp.asarray(w, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)) for w, b in layers]
    g = lambda z: mlp_apply(l16, z, "tanh")  # noqa: E731
    w = orthonormal_rows(K, SIZES[-1], 0, stream="W")
    psi_of = jax.jit(lambda z: jnp.log(projected_singular_values(g, z, jnp.asarray(w, jnp.float32), side=side)).sum())
    errs, bounds = [], []
    for z in np.random.default_rng(0).standard_normal((12, SIZES[0])):
        psi = reference(layers, w, z)
        errs.append(abs(float(psi_of(jnp.asarray(z, jnp.bfloat16))) - psi))
        bounds.append(rounding_bound(layers, w, z, side, psi))
    errs, bounds = np.array(errs), np.array(bounds)
    assert np.all(errs <= bounds), (errs, bounds)
    assert np.median(bounds) < 0.2                # the bound means something: psi spreads over several units here
    assert np.median(errs) > 1e-4                 # and this ran in bf16: float32 rounding alone is ~1e-6


def test_a_bfloat16_job_runs_its_step_in_bf16_and_keeps_to_the_bound(weights, tmp_path):
    raw = spec(weights, "bfloat16")
    res = run_job(raw, str(tmp_path / "out"))
    assert res.ok
    (engine,) = Dataset(res.uri).summary().engines()
    assert "G and the sweep in bfloat16 (3 of 3 matmuls/convolutions in bf16), SVD in float32" in engine["display"]
    df = read_sorted(res.uri)
    layers = load_mlp_weights(weights)
    z = build_latents(raw["latents"]).latents(np.arange(24))
    w = Dataset(res.uri).artifacts()["W"]
    errs = []
    for i in range(24):
        psi = reference(layers, w, z[i])
        errs.append(abs(df.local_scaling[i] - psi))
        assert errs[-1] <= rounding_bound(layers, w, z[i], engine["side"], psi), i
        assert 1 <= df.local_rank[i] <= min(K, SIZES[0])
    assert np.median(errs) > 1e-4


@pytest.mark.parametrize("side", sorted(SIDES))
def test_float32_jobs_compile_the_program_they_did(weights, side, monkeypatch):
    """A float32 job's step is the program it was before the bf16 path: the same optimized HLO
    with the SVD's input cast taken out (so the same records bit for bit), and no bf16 in it."""
    from geomjobs.geometry import spectrum
    from geomjobs.runner.plan import Plan

    def hlo():
        plan = plan_job(spec(weights, "float32"))
        plan = Plan(**{**{f: getattr(plan, f) for f in plan.__dataclass_fields__},
                       "descriptors": tuple(type(b)(b[0], {**b[1], "side": side}) for b in plan.descriptors)})
        ops = [ln for ln in Engine(plan)._step.as_text().splitlines() if re.match(r"\s*(ROOT )?%", ln)]
        return "\n".join(re.sub(r", metadata=\{[^}]*\}", "", ln) for ln in ops)   # the instructions, no source lines

    now = hlo()
    monkeypatch.setattr(spectrum, "svd_input", lambda m: m)
    assert now == hlo()
    assert not re.search(r"\bbf16\[", now)


@pytest.mark.parametrize("descriptors", [{"local_complexity": {}},
                                         {"local_scaling": {"mode": "lanczos", "k": 4}}])
def test_what_has_no_bf16_path_is_refused_by_name(weights, descriptors):
    with pytest.raises(SpecError, match="execution.dtype") as e:
        Engine(plan_job(spec(weights, "bfloat16", **descriptors)))
    assert "no bfloat16 path" in str(e.value)


def f32_model(seed: int = 0):
    """``kind: python``: a model whose code computes in float32 whatever it is given."""
    (w0, b0), (w1, b1) = random_mlp([4, 8, 12], seed=seed)

    def apply(p, z):
        h = jnp.tanh(z.astype(jnp.float32) @ p["w0"].astype(jnp.float32) + p["b0"])
        return h @ p["w1"].astype(jnp.float32) + p["b1"]

    return apply, {k: jnp.asarray(v, jnp.float32) for k, v in dict(w0=w0, b0=b0, w1=w1, b1=b1).items()}


def test_a_model_that_computes_in_float32_is_named(caplog):
    raw = {"model": {"kind": "python", "entrypoint": "test_bf16_rows:f32_model", "latent_shape": [4]},
           "latents": {"kind": "gaussian", "count": 4, "shape": [4]},
           "descriptors": {"local_scaling": {"mode": "projection", "k": 6}},
           "execution": {"batch_size": 4, "dtype": "bfloat16"}}
    with caplog.at_level(logging.WARNING, logger="geomjobs.runner.engine"):
        engine = Engine(plan_job(raw))
    assert engine.bf16_matmuls == (0, 2)
    assert "(0 of 2 matmuls/convolutions in bf16)" in engine.describe()["display"]
    assert "none of" in caplog.text and "runs in bfloat16" in caplog.text
