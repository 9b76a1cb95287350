# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
# ruff: noqa: E402

# %% [markdown]
# # 04 - psi / nu / delta along denoising trajectories
#
# A `trajectory` job follows each sample of a diffusion model along its DDIM path: one record per
# (sample, state), the descriptors of the model's own denoiser x_t -> x0_hat at that state's
# timestep (step 0 = the initial noise, the last step = the generated sample at t = 0). The paper
# follows descriptor trajectories in its memorization analysis (Fig. 8, notebook 05); here we ask
# the general question: where along the path do the descriptors separate the samples that end as
# good digits from those that end as poor ones?
#
# Models: `ldm-digits` (latent diffusion on the `vae-digits` latents; a trajectory's generated
# latent is decoded by `vae-digits`) and `dit-digits` (a DiT in pixel space; the generated sample is
# the image). Final quality of a trajectory: the `classifier-digits` confidence (max class
# probability) of its generated image. Groups: the top and the bottom quartile of that confidence.
# Per step a Welch t-test (and Mann-Whitney) between the groups, Bonferroni over the steps. Each
# model is analysed on its own; its verdicts carry its name.

# %% tags=["parameters"]
count = 200                # trajectories per latent diffusion model
count_dit = 100            # dit-digits trajectories (its exact psi costs ~7 ms a state on 2 cores: 64 JVPs)
steps = 20                 # DDIM steps
models = ["ldm-digits", "dit-digits"]   # zoo diffusion models: latent ones (ldm-digits, memo-digits) are decoded by vae-digits
alpha = 0.05
full = None                # None: from GEOMJOBS_NB_FULL
out_dir = None             # None: from GEOMJOBS_NB_OUT (default out/notebooks/04_trajectories)

# %%
import matplotlib

if matplotlib.get_backend().lower() != "module://matplotlib_inline.backend_inline":
    matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from geomjobs import run_job
from geomjobs.analysis import findings, image_grid, notebook_env, read_ok, save_figure
from geomjobs.analysis.trajectories import attach_labels, final_rows, first_separation, separation, step_summary
from geomjobs.generators import build_generator
from geomjobs.generators.classifier import from_signed, load_classifier

full, out_dir = notebook_env("04_trajectories", full, out_dir)
if full:
    count, count_dit, steps = 1000, 1000, 50
print(f"full={full} models={models} count={count} count_dit={count_dit} steps={steps} out_dir={out_dir}")
DESCRIPTORS = ["local_scaling", "local_rank", "local_complexity"]
LABEL = {"local_scaling": "psi", "local_rank": "nu", "local_complexity": "delta"}
UNIT = {"local_scaling": "psi (nats)", "local_rank": "nu (directions)", "local_complexity": "delta (neurons)"}
PIXEL_SPACE = {"dit-digits"}            # generated samples are images in [-1, 1]; the others are vae-digits latents
COUNT = {m: count_dit if m == "dit-digits" else count for m in models}
decoder = build_generator({"kind": "zoo", "name": "vae-digits"})
decode = jax.jit(jax.vmap(lambda z: decoder.apply(decoder.params, z)))
classifier = load_classifier()

# %% [markdown]
# ## The trajectory jobs

# %%
trajs = {}
for model in models:
    spec = {"job_id": f"nb04-{model}-trajectory-{COUNT[model]}-{steps}",
            "model": {"kind": "zoo", "name": model, "prediction": "x0"},
            "latents": {"kind": "trajectory", "model": {"kind": "zoo", "name": model},
                        "sampler": {"kind": "ddim", "steps": steps, "eta": 0.0}, "count": COUNT[model], "seed": 0, "save_latent": True},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {},
                            "local_complexity": {"directions": 4, "radius": 0.05, "seed": 0}},
            "execution": {"shard_size": 40 * (steps + 1), "batch_size": 8 * (steps + 1)}}
    res = run_job(spec, f"{out_dir}/data/{model}-trajectory", resume=True)
    assert res.errors == 0, f"{model}: {res.errors} error rows"
    trajs[model] = read_ok(res.uri, columns=["trajectory_id", "step", "timestep", "z", *DESCRIPTORS])
    print(f"{model}: {len(trajs[model])} records ({COUNT[model]} trajectories x {steps + 1} states) in {res.seconds:.1f} s")

# %% [markdown]
# ## Final quality of each trajectory

# %%
conf, cuts = {}, {}
fig, axes = plt.subplots(len(models), 2, figsize=(8, 3 * len(models)), constrained_layout=True, squeeze=False)
for row, model in enumerate(models):
    last = final_rows(trajs[model])
    z = np.stack(last.z.to_numpy()).astype(np.float32)
    if model in PIXEL_SPACE:
        imgs = np.asarray(from_signed(z.reshape(-1, 8, 8)))
    else:
        imgs = np.clip(np.asarray(decode(z)).reshape(-1, 8, 8), 0, 1)
    c = conf[model] = classifier.probs(imgs).max(-1)
    q_lo, q_hi = cuts[model] = np.quantile(c, [0.25, 0.75])
    group = np.where(c >= q_hi, "high", np.where(c <= q_lo, "low", "middle"))
    trajs[model] = attach_labels(trajs[model], pd.Series(group, index=last.trajectory_id.to_numpy()), name="quality")
    print(f"{model} final confidence: mean {c.mean():.4f}, quartiles {q_lo:.5f} / {q_hi:.5f}; "
          f"{(group == 'high').sum()} high, {(group == 'low').sum()} low")
    for ax, g in zip(axes[row], ["high", "low"]):
        sel = np.flatnonzero(group == g)
        sel = sel[np.argsort(-c[sel] if g == "high" else c[sel])][:32]
        image_grid(imgs[sel], rows=4, cols=8, ax=ax, title=f"{model}: {g} final confidence ({len(np.flatnonzero(group == g))})")
save_figure(fig, out_dir, "final_samples_by_quality")

# %% [markdown]
# ## Mean and 95 % CI per step, all trajectories and by final quality

# %%
seps, where = {}, {}
for model in models:
    traj = trajs[model]
    summ_all = step_summary(traj, DESCRIPTORS)
    summ = step_summary(traj[traj.quality != "middle"], DESCRIPTORS, by="quality")
    print(model)
    print(summ_all.round(3).to_string())
    seps[model] = {col: separation(traj, col, "quality", "high", "low") for col in DESCRIPTORS}
    where[model] = {col: first_separation(seps[model][col], alpha) for col in DESCRIPTORS}

    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True, constrained_layout=True)
    for k, col in enumerate(DESCRIPTORS):
        ax = axes[0, k]
        for g, colour in (("high", "C2"), ("low", "C3")):
            s = summ[summ.quality == g]
            ax.plot(s.step, s[f"{col}_mean"], color=colour, label=f"{g} final quality")
            ax.fill_between(s.step, s[f"{col}_mean"] - s[f"{col}_ci95"], s[f"{col}_mean"] + s[f"{col}_ci95"], color=colour,
                            alpha=0.25, label=f"{g}: 95% CI")
        ax.plot(summ_all.step, summ_all[f"{col}_mean"], "k--", lw=0.8, label="all trajectories")
        ax.set_title(f"{LABEL[col]} of the {model} denoiser")
        ax.set_ylabel(f"mean {UNIT[col]}")
        ax.legend(fontsize=7)
        ax = axes[1, k]
        sep, w = seps[model][col], where[model][col]
        ax.semilogy(sep.step, np.maximum(sep.t_p, 1e-300), "k.-", label="Welch p at the step")
        ax.axhline(w["level"], color="r", ls="--", lw=0.8, label=f"alpha / {w['tested']}")
        ax.set_xlabel("DDIM step (0 = noise)")
        ax.set_ylabel("Welch p, high vs low")
        ax.legend(fontsize=8)
    save_figure(fig, out_dir, f"descriptors_along_trajectories_{model}")
    table = pd.concat({LABEL[c]: seps[model][c].set_index("step")[["timestep", "mean_a", "mean_b", "t_p", "cohens_d"]]
                       for c in DESCRIPTORS}, axis=1)
    table.to_csv(f"{out_dir}/separation_{model}.csv")
    print(table.round(4).to_string())

# %% [markdown]
# ## Conclusion (numbers from this run)

# %%
lines = []
for model in models:
    c, (q_lo, q_hi) = conf[model], cuts[model]
    lines.append(f"{model}, {COUNT[model]} DDIM-{steps} trajectories; top vs bottom quartile of final classifier confidence "
                 f"(cut-offs {q_hi:.5f} / {q_lo:.5f}; mean confidence high {c[c >= q_hi].mean():.5f}, low {c[c <= q_lo].mean():.4f}).")
    for col in DESCRIPTORS:
        s, w = seps[model][col], where[model][col]
        end, start = s.iloc[-1], s.iloc[0]
        best = s.loc[s.t_p.idxmin()]
        if w["from"] is not None:
            at = f"apart from step {w['from']} of {steps} (t = {int(s.set_index('step').loc[w['from'], 'timestep'])}) to the end"
        elif w["first"] is not None:
            at = f"apart only at steps {w['steps']}, not at the end"
        else:
            at = "never apart at the Bonferroni level"
        lines.append(f"  {LABEL[col]}: {at}; at the generated sample high {end.mean_a:.3f} vs low {end.mean_b:.3f} "
                     f"(p = {end.t_p:.2g}, d = {end.cohens_d:+.2f}); at the noise p = {start.t_p:.2g}; "
                     f"strongest at step {int(best.step)} (p = {best.t_p:.2g}, d = {best.cohens_d:+.2f}).")
conclusion = "\n".join(lines)
print(conclusion)
with open(f"{out_dir}/conclusion.txt", "w") as f:
    f.write(conclusion + "\n")

# %% [markdown]
# ## Verdicts (`verdicts.json`, asserted by the test suite at the small defaults)
# No paper claim here: each verdict is the sign of (top - bottom quartile) at the generated sample,
# per model (keys `<model>_<descriptor>_high_minus_low_at_end`).

# %%
verdicts = {}
for model in models:
    per = findings.trajectories({LABEL[c]: seps[model][c] for c in DESCRIPTORS}, {LABEL[c]: where[model][c] for c in DESCRIPTORS})
    verdicts.update({f"{model}_{k}": v for k, v in per.items()})
findings.write(out_dir, "04_trajectories", verdicts, full=full,
               size={"models": models, "count": count, "count_dit": count_dit, "steps": steps})
for k, v in verdicts.items():
    print(f"{k}: {v['verdict']} (z = {v['z']:+.1f})")
