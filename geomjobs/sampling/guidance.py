"""Reward guidance of a sampler (docs/reward.md, docs/generation.md): ``latents.guidance: {reward: DIR, scale:
s, window: [lo, hi]}`` in ``sampled`` and ``trajectory`` jobs.

Classifier guidance on the noise-aware reward r(z_t, t) of a reward folder
(:mod:`geomjobs.sampling.reward_net`): at every sampler step whose timestep t satisfies lo <= t <= hi
(every step without a window)

    eps'(z_t, t) = eps_theta(z_t, t) - sqrt(1 - abar_t) * s * grad_{z_t} r(z_t, t)

and the sampler's update uses eps' in place of eps. grad r is one VJP of the small reward network
per step; nothing is differentiated through the diffusion model. With DDIM (eta = 0) the step
from t to t' (abar a -> a') moves by

    dz_{t'} = s * sqrt(1 - a) * (sqrt(a') sqrt(1 - a) / sqrt(a) - sqrt(1 - a')) * grad r(z_t, t)

relative to the unguided step from the same z_t; the bracket is > 0 whenever a' > a (every
denoising step), so s > 0 moves along grad r (towards a higher reward, i.e. higher psi for a
psi reward) and s < 0 against it (tests/test_reward_guidance.py checks this update).

``scale: 0`` installs no hook at all, so its samples are bitwise those of the unguided job.

Checks at plan time (:func:`resolve_guidance`, each a SpecError naming its key, before any work):
the folder must be a reward folder (``latents.guidance.reward``), its latent shape must be the
sampler's model's, its ``num_train_timesteps`` the model's T, and every guided timestep must lie in
the reward's training range ``t_range`` widened by 1 % of T (a reward trained at t = 400 only
cannot steer at t = 900: set ``latents.guidance.window``).

The loaded reward travels with the latent source: :class:`Guide` pickles the folder's metadata and
parameters (numpy), not the URI, so Ray workers on other machines need no access to the folder.
Inside the jitted sampler the reward parameters are arguments (``params = {"model": ...,
"reward": ...}``), so one compile serves every batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.errors import SpecError
from geomjobs.generators.base import Denoiser
from geomjobs.sampling import samplers
from geomjobs.sampling.reward_net import Reward, build_network, load_reward

KEY = "latents.guidance"
T_RANGE_SLACK = 0.01          # guided timesteps may lie this fraction of T outside the reward's t_range


def reward_guidance(grad_r: Callable[..., jax.Array], scale: float, window: tuple[int, int] | None = None,
                    with_params: bool = False) -> samplers.Guidance:
    """the docs/reward.md classifier guidance as a sampler hook (:mod:`geomjobs.sampling.samplers`):
    eps' = eps - sqrt(1 - abar_t) * scale * grad_r(x_t, t), applied where lo <= t <= hi for
    ``window = (lo, hi)`` (every step when None). ``grad_r(x_t, t)`` is the gradient of the reward
    in x_t (one latent); with ``with_params`` it is ``grad_r(params, x_t, t)`` with the sampler's
    params."""
    scale = float(scale)

    def hook(eps, x, t, ab, *params):
        g = eps - jnp.sqrt(1.0 - ab) * scale * grad_r(*params, x, t).astype(eps.dtype)
        if window is None:
            return g
        lo, hi = window
        return jnp.where((t >= lo) & (t <= hi), g, eps)

    return samplers.Guidance(hook, bool(with_params))


@dataclasses.dataclass
class Guide:
    """A resolved ``latents.guidance`` section: the loaded reward, the scale and the window."""
    uri: str
    scale: float
    window: tuple[int, int] | None
    reward: Reward

    def __getstate__(self):
        return {"uri": self.uri, "scale": self.scale, "window": self.window, "meta": self.reward.meta,
                "params": jax.tree_util.tree_map(np.asarray, jax.device_get(self.reward.params))}

    def __setstate__(self, state):
        meta = state["meta"]
        shape = tuple(int(x) for x in meta["latent_shape"])
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), state["params"])
        reward = Reward(shape, int(meta["num_train_timesteps"]), (float(meta["t_range"][0]), float(meta["t_range"][1])),
                        str(meta["target"]), meta, params, build_network(shape, meta["network"]))
        self.__init__(state["uri"], state["scale"], state["window"], reward)

    @property
    def active(self) -> bool:
        """False at scale 0: no hook is installed (bitwise the unguided sampler)."""
        return self.scale != 0.0

    def r(self, params, z, t) -> jax.Array:
        """r(z, t) for ONE latent z (the reward's latent shape) and a scalar t: a scalar."""
        return self.reward.apply(params, z[None], jnp.reshape(t, (1,)))[0]

    def grad(self, params, z, t) -> jax.Array:
        """grad_z r(z, t) (one VJP of the reward network)."""
        return jax.grad(lambda v: self.r(params, v, t))(z)

    def hook(self) -> samplers.Guidance:
        """The sampler hook: params are the sampler's ``{"model": ..., "reward": ...}``."""
        return reward_guidance(lambda p, x, t: self.grad(p["reward"], x, t), self.scale, self.window,
                                        with_params=True)


def guided_denoiser(denoiser: Denoiser) -> Denoiser:
    """The model's Denoiser on the combined params ``{"model": ..., "reward": ...}``."""
    return Denoiser(eps=lambda p, x, t: denoiser.eps(p["model"], x, t), abar=denoiser.abar)


def resolve_guidance(section: dict | None, gen, sampler: samplers.Sampler) -> Guide | None:
    """The Guide of a validated ``latents.guidance`` section for the model ``gen`` (a generator with
    a Denoiser) and its sampler, or None without a section. Every check of the module doc."""
    if section is None:
        return None
    window = section.get("window")
    if window is not None:
        lo, hi = int(window[0]), int(window[1])
        if lo > hi:
            raise SpecError(f"{KEY}.window", f"expected [lo, hi] with lo <= hi, got {list(window)}")
        window = (lo, hi)
    reward = load_reward(section["reward"], key=f"{KEY}.reward")
    uri = section["reward"]
    shape = tuple(gen.latent_shape)
    if tuple(reward.latent_shape) != shape:
        raise SpecError(f"{KEY}.reward", f"the reward '{uri}' takes latents of shape {list(reward.latent_shape)}, but "
                                         f"latents.model samples {list(shape)}")
    T = gen.denoiser.num_timesteps
    if reward.num_train_timesteps != T:
        raise SpecError(f"{KEY}.reward", f"the reward '{uri}' was trained for a diffusion model with {reward.num_train_timesteps} "
                                         f"timesteps, but latents.model has T = {T}")
    ts = samplers.timesteps(T, sampler.steps)
    guided = ts if window is None else ts[(ts >= window[0]) & (ts <= window[1])]
    lo_r, hi_r = reward.t_range
    slack = T_RANGE_SLACK * T
    outside = guided[(guided < lo_r - slack) | (guided > hi_r + slack)]
    if len(outside):
        key = f"{KEY}.window" if window is not None else f"{KEY}.reward"
        raise SpecError(key, f"the reward '{uri}' was trained on t in [{lo_r:g}, {hi_r:g}], but guidance would apply at "
                             f"t = {sorted(outside.tolist())[:6]}{' ...' if len(outside) > 6 else ''}; set "
                             f"latents.guidance.window to [lo, hi] within the reward's range")
    return Guide(str(uri), float(section["scale"]), window, reward)


__all__ = ["Guide", "guided_denoiser", "resolve_guidance", "reward_guidance"]
