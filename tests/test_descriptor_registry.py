"""Every registered descriptor, through the real engine (plan -> compiled step -> shard table),
against its dense reference, as test_modes.py runs every estimator. A descriptor added to
geomjobs/descriptors/ joins the table by itself and fails it until REFERENCES has its entry: the
sections it runs with and a check of its columns against a reference written from the
definition (tests/references.py), never from the code under test.

Tolerances. psi/nu (mode exact): float64 throughout, the step's SVD of its own Jacobian against
numpy's SVD of jax.jacfwd's; psi is a sum of <= 6 logs of O(0.1..10) singular values and nu an
exp of an entropy over them, so both agree to O(10 eps cond) ~ 1e-14; 1e-10 relative leaves
four orders of room (as test_step.py). Singular values: the same, with 1e-12 s_1 absolute for
values near zero. delta: exact integers (a neuron within float64 rounding of its kink at a vertex
is a measure-zero event for random latents, the same argument test_step.py makes).
"""
import ast
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

from geomjobs import descriptors
from geomjobs.descriptors import DESCRIPTORS, Dims
from geomjobs.errors import SpecError
from geomjobs.generators.mlp import load_mlp_weights
from geomjobs.runner.plan import plan_job
from geomjobs.runner.precision import precision

from jobs import mlp_spec, write_mlp
from references import mlp_flip_counts, psi_nu

COUNT = 5
MODELS = {  # name: (layer sizes, activation, numpy activation for the sign-count reference)
    "relu, tall (6 -> 10)": ((6, 24, 24, 10), "relu", lambda x: np.maximum(x, 0)),
    "tanh, wide (6 -> 4)": ((6, 16, 4), "tanh", np.tanh),
}


class Case(NamedTuple):
    plan: object
    layers: list       # the MLP's (W, b) as NumPy, for references that need its pre-activations
    act: object
    z: np.ndarray      # (COUNT, d) the shard's latents


def check_local_scaling(case: Case, table) -> None:
    gen = case.plan.generator
    with precision("float64"):
        jac = jax.jacfwd(lambda z: gen.apply(gen.params, z))
        for i, z in enumerate(case.z):
            a = np.asarray(jac(z), np.float64)
            psi, nu, _ = psi_nu(a)
            np.testing.assert_allclose([table["local_scaling"][i].as_py(), table["local_rank"][i].as_py()], [psi, nu], rtol=1e-10)
            s = np.linalg.svd(a, compute_uv=False)
            np.testing.assert_allclose(table["singular_values"][i].as_py(), s, rtol=1e-10, atol=1e-12 * s[0])


def check_local_complexity(case: Case, table) -> None:
    cfg = next(cfg for d, cfg in case.plan.descriptors if d.name == "local_complexity")
    for i, z in enumerate(case.z):
        ref = mlp_flip_counts(case.layers, z, case.plan.arrays["B"], cfg["radius"], act=case.act)
        assert table["local_complexity_per_layer"][i].as_py() == ref
        assert table["local_complexity"][i].as_py() == sum(ref)


class Reference(NamedTuple):
    sections: dict     # the spec sections the descriptor runs with (every flag and optional column on)
    check: object      # (case, shard table) -> None


REFERENCES = {
    "local_scaling": Reference({"local_scaling": {"mode": "exact", "save_singular_values": True}, "local_rank": {}},
                               check_local_scaling),
    "local_complexity": Reference({"local_complexity": {"directions": 3, "radius": 0.3, "per_layer": True}},
                                  check_local_complexity),
}


def test_every_registered_descriptor_has_a_reference():
    assert set(REFERENCES) == set(DESCRIPTORS)
    assert {"local_scaling", "local_complexity"} <= set(DESCRIPTORS)
    for name, ref in REFERENCES.items():
        assert set(ref.sections) == DESCRIPTORS[name].keys   # every flag of it is exercised


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(DESCRIPTORS))
def test_every_descriptor_matches_its_dense_reference_through_the_engine(tmp_path, name, model):
    if name not in REFERENCES:
        pytest.fail(f"descriptor {name!r} has no entry in REFERENCES")
    sizes, activation, act = MODELS[model]
    w = write_mlp(tmp_path, sizes=sizes, seed=3)
    spec = mlp_spec(w, count=COUNT, shard_size=COUNT, batch_size=COUNT, **REFERENCES[name].sections)
    spec["model"]["activation"] = activation
    spec["execution"]["dtype"] = "float64"
    plan = plan_job(spec)
    assert [d.name for d, _ in plan.descriptors] == [name]
    engine = plan.make_engine()
    table = engine.compute_shard(0)
    assert table.column("status").to_pylist() == ["ok"] * COUNT
    z = plan.latents.latents(plan.shard_ids(0)).reshape(COUNT, -1)
    REFERENCES[name].check(Case(plan, load_mlp_weights(w), act, z), {c: table.column(c) for c in table.column_names})
    info = engine.describe()
    assert {"mode", "chunk", "xla_memory_bytes", "devices"} <= set(info) and name in info["display"]


def test_registry_resolve_keeps_the_spec_and_refuses_an_unknown_section():
    section = {"local_rank": {}, "local_complexity": {"radius": 0.1}}
    resolved, bound = descriptors.resolve(section, Dims(n=10, d=6))
    assert section == {"local_rank": {}, "local_complexity": {"radius": 0.1}}        # not written to
    assert list(resolved) == ["local_rank", "local_complexity", "local_scaling"]     # a flag brings its section, appended
    assert {d.name: cfg.get("local_rank") for d, cfg in bound} == {"local_complexity": None, "local_scaling": True}
    with pytest.raises(SpecError, match="descriptors.curvature"):
        descriptors.resolve({"curvature": {}}, Dims(n=10, d=6))


FORBIDDEN = ("runner", "cli", "fisher", "reward", "analysis", "sink", "records", "jobs_api", "demo")


def test_descriptors_sit_below_the_runner():
    """descriptors/ imports geometry, generators, latents and errors, never a floor above it
    (runner, cli, fisher, reward, analysis, the sink) nor the package face's names."""
    root = Path(descriptors.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "geomjobs":
                raise AssertionError(f"{path.name} imports the package face: {[a.name for a in node.names]}")
            for mod in names:
                parts = mod.split(".")
                assert not (parts[0] == "geomjobs" and len(parts) > 1 and parts[1] in FORBIDDEN), f"{path.name} imports {mod}"
    code = ("import sys, geomjobs.descriptors; "
            f"bad = [m for m in sys.modules if m.split('.')[:2][-1] in {FORBIDDEN!r} and m.startswith('geomjobs.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
