"""The mlp and python generator kinds load through their real loaders."""
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.generators.mlp import load_mlp_weights

from jobs import write_mlp

USER_MODULE = '''
import jax.numpy as jnp

def make(scale=1.0):
    params = {"a": jnp.arange(6.0).reshape(2, 3) * scale}
    def apply(p, z):  # z: (2,) -> (3,)
        return jnp.tanh(z @ p["a"])
    return apply, params
'''


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "gelu", "silu", "tanh"])
def test_mlp_generator_computes_the_documented_forward_pass(tmp_path, act):
    w = write_mlp(tmp_path, sizes=(3, 5, 2))
    gen = build_generator({"kind": "mlp", "weights": w, "activation": act}, "float64")
    layers = load_mlp_weights(w)
    z = np.array([0.3, -1.2, 0.7])
    pre = z @ layers[0][0] + layers[0][1]
    acts = {"relu": lambda x: np.maximum(x, 0), "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
            "tanh": np.tanh, "silu": lambda x: x / (1 + np.exp(-x)),
            "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))}
    ref = acts[act](pre) @ layers[1][0] + layers[1][1]
    np.testing.assert_allclose(gen.flat_fn()(jnp.asarray(z)), ref, rtol=1e-12)
    assert gen.latent_shape == (3,) and gen.output_shape == (2,)


def test_python_generator_from_an_entrypoint(tmp_path, monkeypatch):
    (tmp_path / "user_model.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    gen = build_generator({"kind": "python", "entrypoint": "user_model:make", "kwargs": {"scale": 2.0},
                           "latent_shape": [2]})
    assert gen.output_shape == (3,) and gen.model_id == "python:user_model:make"
    np.testing.assert_allclose(gen.flat_fn()(jnp.ones(2)), np.tanh(np.ones(2) @ (np.arange(6.0).reshape(2, 3) * 2)))
    with pytest.raises(SpecError, match="model.latent_shape"):
        build_generator({"kind": "python", "entrypoint": "user_model:make", "latent_shape": [5]})
    with pytest.raises(SpecError, match="model.kwargs"):
        build_generator({"kind": "python", "entrypoint": "user_model:make", "kwargs": {"nope": 1}, "latent_shape": [2]})
    with pytest.raises(SpecError, match="has no callable 'missing'"):
        build_generator({"kind": "python", "entrypoint": "user_model:missing", "latent_shape": [2]})
    with pytest.raises(SpecError, match="cannot import module 'no_such_mod'"):
        build_generator({"kind": "python", "entrypoint": "no_such_mod:make", "latent_shape": [2]})
    sys.modules.pop("user_model", None)


def test_builders_never_write_into_the_model_section_and_resolve_their_defaults(tmp_path):
    """The contract with the planner: ``Generator.resolved`` is the model section with every
    default the builder applied; the section itself is left as it is."""
    zoo = {"kind": "zoo", "name": "ddpm-gmm2d"}
    gen = build_generator(zoo)
    assert zoo == {"kind": "zoo", "name": "ddpm-gmm2d"}
    assert gen.resolved == {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": 10, "prediction": "eps"} and gen.timestep == 10
    given = {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": 3, "prediction": "x0"}
    assert build_generator(given).resolved == given
    mlp = {"kind": "mlp", "weights": write_mlp(tmp_path, sizes=(3, 5, 2))}
    gen = build_generator(mlp)
    assert gen.resolved == mlp and gen.resolved is not mlp
