"""Generated latents (docs/generation.md): ``latents: {kind: sampled}`` and ``{kind: trajectory}``.

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

Per-sample prompts (``latents.prompts: {seeds_per_prompt: k}``, ``diffusers-unet`` only): one job
sweeps prompts x seeds. Sample i is conditioned on row ``prompt_index + i // k`` of the model's
prompt embedding file and starts from noise ``(seed, i % k)`` (``default_rng([seed, i % k])``; eta
> 0 step noise ``[seed, i % k, 1]``), so ``count = n_prompts * k`` covers rows prompt_index ..
prompt_index + n_prompts - 1, every prompt sees the same k initial noises (sample i of the sweep
is sample i % k of the single-prompt job of its prompt), and guided / unguided sweeps pair up by
sample_id. The batch's contexts (B, 1 or 2, seq, dim) (and SDXL's pooled embeddings) (with classifier-free guidance the negative
stacked first) are an argument of the one jitted sampler, not constants in it; single-prompt jobs
run the shared-context program as before. Records carry their own prompt's ``prompt_id``; the
noise index is sample_id % k (trajectory_id % k for trajectories). A trajectory job whose
descriptor model is itself prompt-conditioned (diffusers-unet) refuses per-sample prompts (the
descriptor model has one prompt per job).

Trajectories cut by a shard boundary: a trajectory source keeps the states of the trajectories
its last call cut (at most two) and reuses them in the next call, so consecutive shards in one
process sample a shared trajectory once (records unchanged: the sampler's batches are bitwise
independent of their companions at a fixed batch size).

Columns: ``noise_seed`` (= seed), ``guidance_scale`` (``latents.guidance.scale``, 0.0 without
guidance: the *reward* guidance), ``cfg_scale`` (the classifier-free guidance scale the sampling
model ran at, ``latents.model.cfg_scale``; left to the job's model when it has none),
``prompt_id`` (a conditioned model's prompt: each record's own with per-sample prompts),
``trajectory_id`` and ``step`` (trajectory) and ``z`` (the record's latent, flattened, with
``save_latent: true``).

``guidance`` ({reward, scale, window}): classifier guidance by a reward folder's r(z_t, t)
(:mod:`geomjobs.sampling.guidance`, which loads and checks the folder when the spec is planned). The
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
from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.generators.diffusers.prompts import load_prompt_embeddings
from geomjobs.generators.diffusers.sdxl import load_pooled
from geomjobs.latents.sources import LatentSource
from geomjobs.spec import current_model_keys, explain_schema_error, job_schema

DEFAULT_BATCH = 16
# the placeholder timestep a diffusers-unet section needs to build; samplers evaluate the model's
# eps at their own timesteps, so its value does not enter
_UNET_PLACEHOLDER_T = 0


# --------------------------------------------------------------------------------------------
# the diffusion model and its sampler, built on demand
# --------------------------------------------------------------------------------------------

def _model_section(lat: dict) -> dict:
    """latents.model checked as the top-level model section is (errors name latents.model.*)."""
    model = copy.deepcopy(current_model_keys(lat["model"], "latents.model"))
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
    try:
        gen = build_generator(model, "float32")
    except SpecError as e:
        raise _rekey(e) from None
    if gen.denoiser is None:
        what = model.get("name", model["kind"])
        raise SpecError("latents.model", f"'{what}' has no noise prediction: sampling needs a diffusion model "
                                         "(a zoo diffusion model, or diffusers-unet with its scheduler config)")
    return gen


class _Prompts:
    """Per-sample prompts (module doc): sample i -> embedding row ``first + i // per_prompt`` and
    noise index ``i % per_prompt``. The embedding file is read on first use in each process and
    not pickled (SD's 1000 x 77 x 768 float32 is 236 MB); workers read it again."""

    def __init__(self, path: str, first: int, per_prompt: int, negative: int | None, table=None, pooled: str | None = None):
        self.path, self.first, self.per_prompt, self.negative = path, first, per_prompt, negative
        self.pooled = pooled         # SDXL: the pooled embedding file, in the same rows
        self._table, self._pooled = table, None

    def __getstate__(self):
        return {"path": self.path, "first": self.first, "per_prompt": self.per_prompt, "negative": self.negative,
                "pooled": self.pooled}

    def __setstate__(self, state):
        self.__init__(**state)

    @property
    def table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._table is None:
            self._table = load_prompt_embeddings(self.path, "latents.model.prompt_embeddings")
        return self._table

    def rows(self, ids) -> np.ndarray:
        return self.first + np.asarray(ids, np.int64) // self.per_prompt

    def noise_index(self, ids) -> np.ndarray:
        return np.asarray(ids, np.int64) % self.per_prompt

    def prompt_ids(self, ids) -> np.ndarray:
        return np.asarray(self.table[1], np.int64)[self.rows(ids)]

    def contexts(self, ids, pooled: bool = False) -> np.ndarray:
        """(len(ids), 1 or 2, seq, dim): each sample's context as the UNet generator stacks it
        (prompts.conditioning: (negative, prompt) with classifier-free guidance); with ``pooled``
        the (len(ids), 1 or 2, dim) SDXL pooled embeddings of the same rows."""
        if pooled and self._pooled is None:
            self._pooled = load_pooled(self.pooled, "latents.model.pooled_embeddings")
        emb, rows = self._pooled if pooled else self.table[0], self.rows(ids)
        if self.negative is None:
            return emb[rows][:, None]
        neg = np.broadcast_to(emb[self.negative], (len(rows), *emb.shape[1:]))
        return np.stack([neg, emb[rows]], axis=1)


class _Run:
    """The generator and the jitted batch samplers of one source, built on first use in each
    process and dropped when pickled (workers rebuild them)."""

    def __init__(self, model: dict, sampler: sampling.Sampler, batch_size: int, gen=None, guide=None,
                 prompts: _Prompts | None = None):
        self.model, self.sampler, self.batch_size = model, sampler, batch_size
        self.guide = guide           # geomjobs.sampling.Guide or None (pickled with its reward)
        self.prompts = prompts       # _Prompts or None (one prompt per job, closed into gen.params)
        self._gen, self._fns = gen, {}

    def __getstate__(self):
        return {"model": self.model, "sampler": self.sampler, "batch_size": self.batch_size, "guide": self.guide,
                "prompts": self.prompts}

    def __setstate__(self, state):
        self.__init__(state["model"], state["sampler"], state["batch_size"], guide=state.get("guide"),
                      prompts=state.get("prompts"))

    def compiled_count(self) -> int:
        """Programs compiled by this process's batch samplers (one per ``record`` flag used)."""
        return sum(f.jitted._cache_size() for f in self._fns.values())

    def _sampler_fn(self, record: bool):
        """(jitted batch sampler, its params): the model's alone, or with an active guide the
        guided denoiser and ``{"model": ..., "reward": ...}``."""
        gen, g = self.gen, self.guide
        # per-sample prompts: the context leaf gets a batch axis (in_axes 0), the weights stay shared
        model_axes = None if self.prompts is None else {k: (0 if k in ("context", "text_embeds") else None) for k in gen.params}
        if g is None or not g.active:
            return sampling.batch_sampler(gen.denoiser, self.sampler, record=record, param_axes=model_axes), gen.params
        axes = None if model_axes is None else {"model": model_axes, "reward": None}
        fn = sampling.batch_sampler(sampling.guided_denoiser(gen.denoiser), self.sampler, record=record, guidance=g.hook(),
                                    param_axes=axes)
        return fn, {"model": gen.params, "reward": g.reward.params}

    def _batch_params(self, params, pad: list[int]):
        """The sampler's params for one batch: as built, or with per-sample prompts the batch's
        contexts (B, 1 or 2, seq, dim) in place of the generator's one context."""
        import jax.numpy as jnp

        if self.prompts is None:
            return params
        guided = params is not self.gen.params        # {"model": gen.params, "reward": ...}
        model = params["model"] if guided else params
        model = {**model, "context": jnp.asarray(self.prompts.contexts(pad).astype(model["context"].dtype))}
        if "text_embeds" in model:   # SDXL: the batch's pooled embeddings too
            model["text_embeds"] = jnp.asarray(self.prompts.contexts(pad, pooled=True).astype(model["text_embeds"].dtype))
        return {**params, "model": model} if guided else model

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
            nid = pad if self.prompts is None else [int(i) for i in self.prompts.noise_index(pad)]
            # cast on the host, as the engine does: no device-side cast program to compile
            x_T = jnp.asarray(np.stack([sampling.initial_noise(seed, i, shape) for i in nid]).astype(gen.dtype))
            noise = (jnp.asarray(np.stack([sampling.step_noise(seed, i, s.steps, shape) for i in nid]).astype(gen.dtype))
                     if s.stochastic else None)
            res = fn(self._batch_params(params, pad), x_T, noise)
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
    cfg = {**{f.name: f.default for f in dataclasses.fields(sampling.Sampler)}, **lat.get("sampler", {})}   # its defaults
    try:
        sampler = sampling.Sampler(cfg["kind"], cfg["steps"], float(cfg["eta"]))
    except ValueError as e:
        key = "eta" if "eta" in str(e) else "steps" if "steps" in str(e) else "kind"
        raise SpecError(f"latents.sampler.{key}", str(e)) from None
    gen = _build_model(_model_section(lat))
    T = gen.denoiser.num_timesteps
    if sampler.steps > T:
        raise SpecError("latents.sampler.steps", f"expected at most T = {T} (the model's timesteps), got {sampler.steps}")
    guide = sampling.resolve_guidance(g, gen, sampler)
    resolved = {**copy.deepcopy(lat), "sampler": cfg, "seed": lat.get("seed", 0),
                "save_latent": lat.get("save_latent", False), "batch_size": lat.get("batch_size", DEFAULT_BATCH)}
    return resolved, sampler, gen, guide


def _prompts(lat: dict) -> _Prompts | None:
    """The per-sample prompts of a sampled / trajectory section (module doc), checked against the
    model section and its embedding file; None without ``latents.prompts``."""
    if "prompts" not in lat:
        return None
    model, k, count = lat["model"], lat["prompts"]["seeds_per_prompt"], lat["count"]
    if model["kind"] != "diffusers-unet":
        raise SpecError("latents.prompts", f"per-sample prompts condition a diffusers-unet sampler on rows of its "
                                           f"prompt_embeddings; latents.model is kind '{model['kind']}'")
    if count % k:
        raise SpecError("latents.count", f"with latents.prompts.seeds_per_prompt = {k}, count must be a multiple of {k} "
                                         f"(n_prompts x {k}), got {count}")
    table = load_prompt_embeddings(model["prompt_embeddings"], "latents.model.prompt_embeddings")
    first, n, neg = model.get("prompt_index", 0), count // k, model.get("negative_embedding_index")
    if first + n > len(table[0]):
        raise SpecError("latents.count", f"count {count} = {n} prompts x {k} seeds from latents.model.prompt_index {first} "
                                         f"needs rows {first}..{first + n - 1}; the file has {len(table[0])} prompts")
    if neg is not None and first <= neg < first + n:
        raise SpecError("latents.count", f"the prompts of the sweep (rows {first}..{first + n - 1}) include the negative "
                                         f"prompt (latents.model.negative_embedding_index {neg}); sweep fewer prompts or "
                                         "move the negative outside the range")
    return _Prompts(model["prompt_embeddings"], first, k, neg, table, model.get("pooled_embeddings"))


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
        self._edges = {}             # trajectories only: {trajectory_id: states} of the last call's cut ends

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_last", "_edges")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._last, self._edges = (None, None), {}

    @property
    def per_sample_prompts(self) -> bool:
        return self.run.prompts is not None

    def sample_ids(self, ids) -> np.ndarray:
        """The sampler's sample index of each record (the record's id; its trajectory's id for
        trajectories)."""
        return np.asarray(ids, np.int64)

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
        if self.run.prompts is not None:
            cols["prompt_id"] = self.run.prompts.prompt_ids(self.sample_ids(ids))
        elif self.run.gen.prompt_id is not None:
            cols["prompt_id"] = np.full(n, self.run.gen.prompt_id, np.int64)
        if self.run.gen.cfg_scale is not None:      # the samples were drawn at it, whatever the job's model
            cols["cfg_scale"] = np.full(n, self.run.gen.cfg_scale, np.float64)
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

    def sample_ids(self, ids) -> np.ndarray:
        return self.split(ids)[0]

    def _generated(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        key = ids.tobytes()
        if self._last[0] != key:
            traj, step = self.split(ids)
            runs, where = np.unique(traj, return_inverse=True)
            states = self._states(runs)
            # a trajectory that this call's ids cut (a shard boundary inside it) is kept for the
            # next call, the neighbouring shard's, instead of being sampled again; the sampler's
            # batches are bitwise independent of their companions, so the records are the same
            per_run = np.bincount(where, minlength=len(runs))
            self._edges = {int(runs[j]): states[j] for j in {0, len(runs) - 1}
                           if len(runs) and per_run[j] < self.states_per_trajectory}
            self._last = (key, states[where, step])
        return self._last[1]

    def _states(self, runs: np.ndarray) -> np.ndarray:
        """(len(runs), steps + 1, *shape) states of trajectories ``runs`` (sorted, unique): the
        previous call's cut ends reused, the others sampled."""
        cached = np.array([int(r) in self._edges for r in runs], bool)
        if not cached.any():
            return self.run.generate(self.seed, runs, record=True)
        out = np.empty((len(runs), self.states_per_trajectory, *self.shape))
        out[cached] = np.stack([self._edges[int(r)] for r in runs[cached]])
        if not cached.all():
            out[~cached] = self.run.generate(self.seed, runs[~cached], record=True)
        return out

    def denoiser_timesteps(self, ids):
        _, step = self.split(ids)
        ts = np.append(sampling.timesteps(self.run.gen.denoiser.num_timesteps, self.run.sampler.steps), 0)
        return ts[step].astype(np.int64)

    def columns(self, ids):
        traj, step = self.split(ids)
        return {**super().columns(ids), "trajectory_id": traj, "step": step}


def _build(cls, lat: dict, count_of) -> Sampled:
    resolved, sampler, gen, guide = _config(lat)
    run = _Run(_model_section(lat), sampler, resolved["batch_size"], gen, guide, _prompts(lat))
    scale = 0.0 if guide is None else guide.scale
    return cls(count_of(resolved["count"], sampler), tuple(gen.latent_shape), run=run, seed=resolved["seed"],
               save_latent=resolved["save_latent"], guidance_scale=scale, resolved=resolved)


def build_sampled(lat: dict) -> Sampled:
    return _build(Sampled, lat, lambda n, s: n)


def build_trajectory(lat: dict) -> Trajectory:
    return _build(Trajectory, lat, lambda n, s: n * (s.steps + 1))
