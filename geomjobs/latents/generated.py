"""Generated latents (SPEC section 6): ``latents: {kind: sampled}`` and ``{kind: trajectory}``.

Both draw samples from the diffusion model ``latents.model`` (any model section whose generator
has a :class:`~geomjobs.generators.base.Denoiser`: zoo diffusion models, ``diffusers-unet``) with
:mod:`geomjobs.sampling`. Sample i starts from ``default_rng([seed, i])`` noise (and, for ddim with
eta > 0, draws its step noise from ``default_rng([seed, i, 1])``), so it depends only on the spec
and i, never on sharding, and jobs that differ only in guidance pair up sample by sample.

- ``sampled``: one record per sample, sample_id = i, latent = the generated z_0.
- ``trajectory``: one record per (sample, state) of the sampling run, steps + 1 states per sample
  (states 0..steps-1 are the inputs of the sampler's steps, noisiest first; state ``steps`` is the
  generated latent): sample_id = trajectory_id * (steps + 1) + step, count = latents.count *
  (steps + 1). :meth:`Trajectory.timesteps` gives each record's own timestep (the sampler's
  timesteps[step], 0 for the final state), at which the job evaluates the denoiser.

The sampler runs in a jitted, fixed-size batch (``batch_size``, default 16; the tail is padded),
compiled once per process on first use; the diffusion model is built when the spec is planned (to
refuse a model without noise prediction before any work) and again, lazily, in each worker (it is
not pickled with the source). The sampler runs in the model's dtype (float32 for the zoo models,
``model.dtype`` for diffusers), whatever the job's ``execution.dtype``.

Columns: ``noise_seed`` (= seed), ``guidance_scale`` (``latents.guidance.scale``, 0.0 without
guidance), ``prompt_id`` (a conditioned model's prompt), ``trajectory_id`` and ``step``
(trajectory) and ``z`` (the record's latent, flattened, with ``save_latent: true``).

``guidance`` ({reward, scale, window}): classifier guidance by a reward folder's r(z_t, t)
(:mod:`geomjobs.reward.guidance`, which loads and checks the folder when the spec is planned). The
reward's parameters travel with the source when it is pickled; at ``scale: 0`` no hook is
installed, so the samples are bitwise the unguided job's.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jsonschema
import numpy as np

from geomjobs import sampling
from geomjobs.latents.sources import LatentSource
from geomjobs.spec import SpecError

SAMPLER_DEFAULTS = {"kind": "ddim", "steps": 50, "eta": 0.0}
DEFAULT_BATCH = 16
# the placeholder timestep a diffusers-unet section needs to build; samplers evaluate the model's
# eps at their own timesteps, so its value does not enter
_UNET_PLACEHOLDER_T = 0


# --------------------------------------------------------------------------------------------
# the diffusion model and its sampler, built on demand
# --------------------------------------------------------------------------------------------

def _model_section(lat: dict) -> dict:
    """latents.model checked as the top-level model section is (errors name latents.model.*)."""
    from geomjobs.spec import explain_schema_error, job_schema

    model = copy.deepcopy(lat["model"])
    if model["kind"] == "diffusers-unet":
        model.setdefault("timestep", _UNET_PLACEHOLDER_T)
    validator = jsonschema.Draft202012Validator(job_schema()["properties"]["model"])
    errors = list(validator.iter_errors(model))
    if errors:
        raise _rekey(explain_schema_error(jsonschema.exceptions.best_match(errors)))
    return model


def _rekey(e: SpecError) -> SpecError:
    """A SpecError about a model section, named as latents.model."""
    key = e.key
    if key in ("", "<root>", "model"):
        key = "latents.model"
    elif key.startswith("model."):
        key = "latents." + key
    else:
        key = "latents.model." + key
    return SpecError(key, e.message)


def _build_model(model: dict):
    from geomjobs.generators import build_generator

    try:
        gen = build_generator(model, "float32")
    except SpecError as e:
        raise _rekey(e) from None
    if gen.denoiser is None:
        what = model.get("name", model["kind"])
        raise SpecError("latents.model", f"'{what}' has no noise prediction: sampling needs a diffusion model "
                                         "(a zoo diffusion model, or diffusers-unet with its scheduler config)")
    return gen


class _Run:
    """The generator and the jitted batch samplers of one source, built on first use in each
    process and dropped when pickled (workers rebuild them)."""

    def __init__(self, model: dict, sampler: sampling.Sampler, batch_size: int, gen=None, guide=None):
        self.model, self.sampler, self.batch_size = model, sampler, batch_size
        self.guide = guide           # geomjobs.reward.guidance.Guide or None (pickled with its reward)
        self._gen, self._fns = gen, {}

    def __getstate__(self):
        return {"model": self.model, "sampler": self.sampler, "batch_size": self.batch_size, "guide": self.guide}

    def __setstate__(self, state):
        self.__init__(state["model"], state["sampler"], state["batch_size"], guide=state.get("guide"))

    def compiled_count(self) -> int:
        """Programs compiled by this process's batch samplers (one per ``record`` flag used)."""
        return sum(f.jitted._cache_size() for f in self._fns.values())

    def _sampler_fn(self, record: bool):
        """(jitted batch sampler, its params): the model's alone, or with an active guide the
        guided denoiser and ``{"model": ..., "reward": ...}``."""
        from geomjobs.reward import guidance

        gen, g = self.gen, self.guide
        if g is None or not g.active:
            return sampling.batch_sampler(gen.denoiser, self.sampler, record=record), gen.params
        fn = sampling.batch_sampler(guidance.guided_denoiser(gen.denoiser), self.sampler, record=record, guidance=g.hook())
        return fn, {"model": gen.params, "reward": g.reward.params}

    @property
    def gen(self):
        if self._gen is None:
            self._gen = _build_model(self.model)
        return self._gen

    def generate(self, seed: int, indices: np.ndarray, record: bool) -> np.ndarray:
        """float64 (len(indices), *shape) generated latents, or (len(indices), steps + 1, *shape)
        states with ``record``: batches of ``batch_size`` (the tail padded with sample 0's inputs)."""
        import jax.numpy as jnp

        gen, s, B = self.gen, self.sampler, self.batch_size
        shape = tuple(gen.latent_shape)
        if record not in self._fns:
            self._fns[record], self._params = self._sampler_fn(record)
        fn, params = self._fns[record], self._params
        out = []
        for lo in range(0, len(indices), B):
            chunk = [int(i) for i in indices[lo:lo + B]]
            pad = chunk + [chunk[0]] * (B - len(chunk))
            # cast on the host, as the engine does: no device-side cast program to compile
            x_T = jnp.asarray(np.stack([sampling.initial_noise(seed, i, shape) for i in pad]).astype(gen.dtype))
            noise = (jnp.asarray(np.stack([sampling.step_noise(seed, i, s.steps, shape) for i in pad]).astype(gen.dtype))
                     if s.stochastic else None)
            res = fn(params, x_T, noise)
            out.append(np.asarray(res[1] if record else res, np.float64)[:len(chunk)])
        tail = (s.steps + 1, *shape) if record else shape
        return np.concatenate(out) if out else np.zeros((0, *tail))


def _config(lat: dict) -> tuple[dict, sampling.Sampler, Any, Any]:
    """(resolved section, Sampler, built generator, Guide or None) of a validated sampled /
    trajectory section, every check done before any work: the guidance window first, then the
    sampler, then the model, then the reward folder against the model."""
    g = lat.get("guidance")
    if g is not None and "window" in g and g["window"][0] > g["window"][1]:
        raise SpecError("latents.guidance.window", f"expected [lo, hi] with lo <= hi, got {g['window']}")
    cfg = {**SAMPLER_DEFAULTS, **lat.get("sampler", {})}
    try:
        sampler = sampling.Sampler(cfg["kind"], cfg["steps"], float(cfg["eta"]))
    except ValueError as e:
        key = "eta" if "eta" in str(e) else "steps" if "steps" in str(e) else "kind"
        raise SpecError(f"latents.sampler.{key}", str(e)) from None
    gen = _build_model(_model_section(lat))
    T = gen.denoiser.num_timesteps
    if sampler.steps > T:
        raise SpecError("latents.sampler.steps", f"expected at most T = {T} (the model's timesteps), got {sampler.steps}")
    from geomjobs.reward.guidance import resolve_guidance

    guide = resolve_guidance(g, gen, sampler)
    resolved = {**copy.deepcopy(lat), "sampler": cfg, "seed": lat.get("seed", 0),
                "save_latent": lat.get("save_latent", False), "batch_size": lat.get("batch_size", DEFAULT_BATCH)}
    return resolved, sampler, gen, guide


def _z_column(z: np.ndarray) -> list:
    return [row.reshape(-1).tolist() for row in z]


# --------------------------------------------------------------------------------------------
# the sources
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sampled(LatentSource):
    """One record per generated sample (module doc)."""
    run: _Run = None
    seed: int = 0
    save_latent: bool = False
    guidance_scale: float = 0.0

    def __post_init__(self):
        self._last = (None, None)    # (ids bytes, latents): columns() reads what latents() made

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_last"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._last = (None, None)

    def _generated(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        key = ids.tobytes()
        if self._last[0] != key:
            self._last = (key, self.run.generate(self.seed, ids, record=False))
        return self._last[1]

    def latents(self, ids):
        return self._generated(ids)

    def columns(self, ids):
        n = len(ids)
        cols = {"noise_seed": np.full(n, self.seed, np.int64), "guidance_scale": np.full(n, self.guidance_scale)}
        if self.run.gen.prompt_id is not None:
            cols["prompt_id"] = np.full(n, self.run.gen.prompt_id, np.int64)
        if self.save_latent:
            cols["z"] = _z_column(self._generated(ids))
        return cols


@dataclasses.dataclass
class Trajectory(Sampled):
    """One record per (sample, state) of the sampling run (module doc)."""

    @property
    def states_per_trajectory(self) -> int:
        return self.run.sampler.steps + 1

    def split(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(trajectory_id, step) of each sample id."""
        ids = np.asarray(ids, np.int64)
        return ids // self.states_per_trajectory, ids % self.states_per_trajectory

    def _generated(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        key = ids.tobytes()
        if self._last[0] != key:
            traj, step = self.split(ids)
            runs, where = np.unique(traj, return_inverse=True)
            states = self.run.generate(self.seed, runs, record=True)
            self._last = (key, states[where, step])
        return self._last[1]

    def denoiser_timesteps(self, ids):
        _, step = self.split(ids)
        ts = np.append(sampling.timesteps(self.run.gen.denoiser.num_timesteps, self.run.sampler.steps), 0)
        return ts[step].astype(np.int64)

    def columns(self, ids):
        traj, step = self.split(ids)
        return {**super().columns(ids), "trajectory_id": traj, "step": step}


def _build(cls, lat: dict, count_of) -> Sampled:
    resolved, sampler, gen, guide = _config(lat)
    run = _Run(_model_section(lat), sampler, resolved["batch_size"], gen, guide)
    scale = 0.0 if guide is None else guide.scale
    return cls(count_of(resolved["count"], sampler), tuple(gen.latent_shape), run=run, seed=resolved["seed"],
               save_latent=resolved["save_latent"], guidance_scale=scale, resolved=resolved)


def build_sampled(lat: dict) -> Sampled:
    return _build(Sampled, lat, lambda n, s: n)


def build_trajectory(lat: dict) -> Trajectory:
    return _build(Trajectory, lat, lambda n, s: n * (s.steps + 1))
