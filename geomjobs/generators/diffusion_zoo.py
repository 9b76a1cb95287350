"""What the zoo's digit models share (``dit-digits``, ``ldm-digits``, ``classifier-digits``):
loading a flax module and its params from a shipped .npz/.json pair, and a diffusion model's
denoiser at a fixed timestep as a :class:`Generator` carrying its :class:`Denoiser`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.generators.base import Denoiser, Generator, output_shape_of
from geomjobs.generators.checkpoint import read_meta, read_params, resolve_pair

PREDICTIONS = ("eps", "x0")
SCHEDULE_KEYS = ("kind", "T", "beta_start", "beta_end")


def load_flax_pair(path_or_name, zoo_files: dict, required: dict, from_config: Callable, init: Callable,
                   *, what: str, script: str) -> tuple[Any, Any, dict]:
    """(module, params, meta): the card checked for ``required`` sections, the module built by
    ``from_config(meta["architecture"])``, the weights checked against ``init(module, key)``'s shapes."""
    npz_path, json_path = resolve_pair(path_or_name, zoo_files, what=what, script=script)
    meta = read_meta(json_path, required, what=what, script=script)
    try:
        module = from_config(meta["architecture"])
    except Exception as e:
        raise ValueError(f"{what} metadata file '{json_path}': bad architecture {meta['architecture']} ({e})") from None
    shapes = jax.eval_shape(lambda: init(module, jax.random.PRNGKey(0)))
    return module, read_params(npz_path, shapes, what=what, script=script), meta


def check_timestep(timestep, T: int, name: str) -> int:
    """``timestep`` as an int in [0, T - 1], else ValueError naming the model."""
    if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
        raise ValueError(f"timestep must be an integer in [0, {T - 1}] (T = {T}), got {timestep!r}")
    if not 0 <= int(timestep) <= T - 1:
        raise ValueError(f"timestep {timestep} is outside the valid range [0, {T - 1}] for '{name}' (T = {T})")
    return int(timestep)


def denoiser_generator(model_id: str, eps_fn, params, abar: np.ndarray, latent_shape, timestep, prediction: str) -> Generator:
    """A Generator whose ``apply`` is eps_fn(params, x_t, timestep) (``prediction="eps"``) or the
    x0_hat it implies (``"x0"``), and whose ``denoiser`` is eps_fn with the float64 schedule ``abar``
    (eps_fn maps ONE latent and an int32 timestep, traced or not, to eps_theta)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
    t = check_timestep(timestep, len(abar), model_id)
    ab, t_arr = float(abar[t]), np.int32(t)

    if prediction == "eps":
        def apply(p, x):
            return eps_fn(p, x, t_arr)
    else:
        def apply(p, x):
            return diffusion.x0_from_eps(x, eps_fn(p, x, t_arr), ab)

    latent_shape = tuple(latent_shape)
    return Generator(model_id=model_id, apply=apply, params=params, latent_shape=latent_shape,
                     output_shape=output_shape_of(apply, params, latent_shape), timestep=t, dtype=jnp.float32,
                     denoiser=Denoiser(eps=eps_fn, abar=np.asarray(abar, np.float64)))
