"""Sampling a diffusion model: the samplers (:mod:`~geomjobs.sampling.samplers`, pure JAX), reward
guidance of their noise prediction (:mod:`~geomjobs.sampling.guidance`) and the reward network
r(z_t, t) that guides them (:mod:`~geomjobs.sampling.reward_net`, with its folder format).

Floor 4 of the layout (README: Layout): it imports the mathematics, the errors, storage paths
(a reward folder may be on gs://) and the generators' :class:`~geomjobs.generators.base.Denoiser`,
never latents, runner or the reward application (:mod:`geomjobs.reward`: training data, training,
evaluation), which import it.
"""
from geomjobs.sampling.guidance import Guide, guided_denoiser, resolve_guidance, reward_guidance
from geomjobs.sampling.samplers import (
    SAMPLER_KINDS,
    BatchSampler,
    Guidance,
    Sampler,
    batch_sampler,
    dpmpp2m_coefficients,
    initial_noise,
    sample_loop,
    schedule,
    step_noise,
    timesteps,
)

__all__ = ["SAMPLER_KINDS", "BatchSampler", "Guidance", "Guide", "Sampler", "batch_sampler", "dpmpp2m_coefficients", "guided_denoiser",
           "initial_noise", "resolve_guidance", "reward_guidance", "sample_loop", "schedule", "step_noise", "timesteps"]
