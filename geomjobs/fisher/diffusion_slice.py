"""``family: {kind: diffusion-slice}``: the Fisher metric of a 2-D slice of a zoo latent diffusion
model's noise space (issue 12 item 4; Lobashev et al.'s Stable Diffusion slices, at digits scale).

theta = (u, v), the plane coordinates of :class:`geomjobs.latents.sources.Plane3` through three
anchor noises a0, a1, a2 (its Gram-Schmidt basis, reused, not re-derived): the noise at theta is
a0 + u e1 + v e2, exactly the latent a ``latents: {kind: plane3, anchors, resolution}`` job gives
at the same (u, v); the default grid box is plane3's (anchors' bounding box widened by
``margin``), so with the same resolution grid point p IS plane3's sample p. (The paper divides
the plane point by its std; plane3 does not, and we follow plane3.)

Spec keys::

    family: {kind: diffusion-slice,
             model: ldm-digits,            # ldm-digits | memo-digits (latent models decoded by vae-digits)
             anchors: [0, 1, 2],           # 3 noise ids: default_rng([anchor_seed, i]) noises, or 3 explicit
                                           #   latents (lists of 8 numbers)
             anchor_seed: 0, margin: 0.25,
             sampler: {steps: 25, eta: 0.5},   # DDIM; eta > 0 is required (see below)
             batch: 256,                   # the sampler's fixed batch (padded): compiled once
             psi: true,                    # the psi map and slice.png
             class_map: 256}               # optional: the eta = 0 class map at 256 x 256 over the same box
                                           #   (slice/classes_fine.parquet) for the box counting

Samples: point p's sample j starts from the plane noise at theta_p and runs DDIM with eta > 0
(:func:`geomjobs.sampling.batch_sampler`), its step noise ``default_rng([seed, index_p, j])
.standard_normal((steps, 8))``, so it depends only on (seed, grid index, j), never on the
sharding (the sampler's batch is a fixed size, and vmapped rows do not depend on their
companions). z_0 is decoded by vae-digits and clipped to [0, 1]: samples are (8, 8) images.
eta = 0 is refused: every sample of a point would be the same image, the per-point law a point
mass and the feature posterior degenerate (no within-point spread to scale the distances by).

The posterior (``posterior: {kind: features}``, :func:`geomjobs.fisher.posterior.feature_loglik`), the paper's CLIP rule
with classifier-digits' penultimate features phi (128-d): of the m samples of each point, the
first m_ref = m // 2 are its *references*, mu_q = their mean feature; the other m - m_ref are
bundle samples. Per-sample log-likelihood of sample x under grid point q:
``l(x | q) = -|phi(x) - mu_q|^2 / (2 tau^2)``, tau^2 = the pooled within-point variance of the
reference features (mean over points and feature dims): a unit-variance Gaussian feature model
after scaling by tau, whose KL is half the squared mean distance, as the paper justifies its
rule. The job's tempered bundle posterior (the mean of l over a bundle B, normalised over the
grid) is then exp(-|phibar_B - mu_q|^2 / (2 tau^2)) / Z (the bundle's spread does not depend on
q and cancels) -- the paper's exp(-(N/2)|E(x(t)) - E(x')|^2) to the power 1/N, with tau^2 = 1.

The psi map (:func:`slice_outputs`): psi of the vae-digits decoder at the DDIM eta = 0 z_0 of
each grid point, computed by an ordinary descriptor job (``model: vae-digits``, ``latents:
{kind: parquet}`` on ``OUT/slice/z0.parquet``, exact psi) written to ``OUT/psi``. Why the decoder
at the eta = 0 sample rather than the denoiser at the plane noise: the denoiser's x0 map at t = 0
applied to pure noise is not how an image is made, while the eta = 0 sample is the image the slice
point deterministically produces and the decoder is the last (and, in ldm-digits, the only
image-space) map of that generation; psi there is the local scaling of the image manifold at the
very point whose class the figure shows. (psi of the whole noise -> image map would need the
Jacobian through 25 DDIM steps: not an existing model kind.)
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from geomjobs.errors import SpecError
from geomjobs.fisher.families import _int, _keys, _thetas

LATENT_MODELS = ("ldm-digits", "memo-digits")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """The slice's sampler (``family.sampler``): DDIM with ``steps`` steps and noise ``eta`` > 0."""
    steps: int = 25
    eta: float = 0.5


class DiffusionSliceFamily:
    kind = "diffusion-slice"
    theta_names = ("u", "v")
    sample_shape = (8, 8)
    sample_dtype = "float32"
    sites = 1
    has_oracle = False
    no_oracle_reason = "family kind 'diffusion-slice' has no exact likelihood"
    posterior_kinds = ("features",)

    def __init__(self, model: str, anchors: np.ndarray, margin: float, sampler: DDIMConfig, batch: int, psi: bool,
                 anchor_ids=None, anchor_seed: int = 0, class_map: int | None = None):
        from geomjobs.latents.sources import Plane3

        self.model, self.sampler, self.batch, self.psi = model, sampler, batch, psi
        self.class_map = class_map
        self.steps, self.eta = sampler.steps, sampler.eta
        self.anchors = np.asarray(anchors, np.float64)
        self.margin = margin
        try:
            self.plane = Plane3(1, (self.anchors.shape[1],), self.anchors, (1, 1), margin)
        except SpecError as e:
            raise SpecError("family.anchors", e.message if hasattr(e, "message") else str(e)) from None
        self.default_box = (self.plane.low, self.plane.high)
        self._anchor_ids, self._anchor_seed = anchor_ids, anchor_seed

    @classmethod
    def from_spec(cls, cfg: dict) -> DiffusionSliceFamily:
        _keys(cfg, {"kind", "model", "anchors", "anchor_seed", "margin", "sampler", "batch", "psi", "class_map"})
        model = cfg.get("model", "ldm-digits")
        if model not in LATENT_MODELS:
            raise SpecError("family.model", f"expected one of {list(LATENT_MODELS)} (zoo latent diffusion models decoded by "
                                            f"vae-digits), got {model!r}")
        samp = cfg.get("sampler", {})
        if not isinstance(samp, dict) or set(samp) - {"steps", "eta", "kind"}:
            raise SpecError("family.sampler", f"expected a mapping with steps and eta (DDIM), got {samp!r}")
        if samp.get("kind", "ddim") != "ddim":
            raise SpecError("family.sampler.kind", f"only ddim is stochastic (eta > 0); got {samp.get('kind')!r}")
        steps = _int({"sampler.steps": samp.get("steps", DDIMConfig.steps)}, "sampler.steps", 0, 1, 1000)
        eta = samp.get("eta", DDIMConfig.eta)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise SpecError("family.sampler.eta", f"expected a number in (0, 1], got {eta!r}")
        if eta == 0:
            raise SpecError("family.sampler.eta", "eta = 0 makes DDIM deterministic: every sample of a grid point is the same "
                                                  "image, so a point has no distribution to tell apart from its neighbours' "
                                                  "(the Fisher metric needs stochastic samples); use eta > 0, e.g. 0.5")
        seed = _int(cfg, "anchor_seed", 0, 0)
        margin = cfg.get("margin", 0.25)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise SpecError("family.margin", f"expected a number >= 0, got {margin!r}")
        anchors = cfg.get("anchors", [0, 1, 2])
        ids = None
        if isinstance(anchors, list) and len(anchors) == 3 and all(isinstance(a, int) and not isinstance(a, bool) for a in anchors):
            from geomjobs.sampling import initial_noise

            ids = list(anchors)
            anchors = np.stack([initial_noise(seed, i, (8,)) for i in ids])
        else:
            try:
                anchors = np.asarray(anchors, np.float64)
            except (TypeError, ValueError):
                anchors = np.zeros(0)
            if anchors.shape != (3, 8) or not np.isfinite(anchors).all():
                raise SpecError("family.anchors", f"expected 3 noise ids (integers) or 3 latents of 8 numbers each for {model}, "
                                                  f"got {cfg.get('anchors')!r}")
        cm = cfg.get("class_map")
        if cm is not None and (isinstance(cm, bool) or not isinstance(cm, int) or cm < 64 or cm & (cm - 1)):
            raise SpecError("family.class_map", f"expected a power of two >= 64 (the side of the eta = 0 class map used for "
                                                f"box counting), got {cm!r}")
        return cls(model, anchors, float(margin), DDIMConfig(steps, float(eta)), _int(cfg, "batch", 256, 1),
                   bool(cfg.get("psi", True)), ids, seed, cm)

    # ------------------------------------------------------------------ the plane
    def latents(self, thetas) -> np.ndarray:
        """(P, 8) float64 noises at plane coordinates thetas (P, 2): origin + u e1 + v e2 (plane3's)."""
        th = _thetas(thetas)
        return self.plane.origin[None] + th[:, :1] * self.plane.basis[0][None] + th[:, 1:] * self.plane.basis[1][None]

    def check_thetas(self, thetas, key: str = "grid") -> None:
        if not np.isfinite(_thetas(thetas)).all():
            raise SpecError(key, "theta values must be finite")

    # ------------------------------------------------------------------ models, built lazily (not pickled)
    @functools.cached_property
    def _models(self):
        import jax
        import jax.numpy as jnp

        from geomjobs import sampling
        from geomjobs.generators.classifier import load_classifier
        from geomjobs.generators.ldm import ldm_generator
        from geomjobs.generators.vae import BetaVAE, decoder_params, load_vae

        gen = ldm_generator(self.model)
        vae, vparams, _ = load_vae("vae-digits")
        dparams = decoder_params(vparams)
        decode = jax.jit(lambda z: vae.apply(dparams, z, method=BetaVAE.decode))
        stoch = sampling.batch_sampler(gen.denoiser, sampling.Sampler("ddim", self.steps, self.eta))
        det = sampling.batch_sampler(gen.denoiser, sampling.Sampler("ddim", self.steps, 0.0))
        return {"params": gen.params, "stoch": stoch, "det": det, "decode": decode, "clf": load_classifier(), "jnp": jnp}

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_models", None)
        return d

    def _run(self, x_T, noise=None) -> np.ndarray:
        """z_0 (N, 8) float32 in fixed batches of self.batch (the tail padded)."""
        m = self._models
        jnp = m["jnp"]
        out = []
        for lo in range(0, len(x_T), self.batch):
            xb = x_T[lo:lo + self.batch]
            k = len(xb)
            pad = self.batch - k
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            if noise is None:
                z = m["det"](m["params"], jnp.asarray(xb, jnp.float32))
            else:
                nb = noise[lo:lo + self.batch]
                nb = np.concatenate([nb, np.repeat(nb[-1:], pad, 0)])
                z = m["stoch"](m["params"], jnp.asarray(xb, jnp.float32), jnp.asarray(nb, jnp.float32))
            out.append(np.asarray(z)[:k])
        return np.concatenate(out)

    def decode(self, z) -> np.ndarray:
        """Images (N, 8, 8) in [0, 1]: the vae-digits decoder's mean, clipped (as the zoo card does)."""
        jnp = self._models["jnp"]
        return np.clip(np.asarray(self._models["decode"](jnp.asarray(np.asarray(z, np.float32)))), 0.0, 1.0).reshape(-1, 8, 8)

    def sample(self, thetas, n: int, seed: int, index=None) -> np.ndarray:
        th = _thetas(thetas)
        index = np.arange(len(th)) if index is None else np.asarray(index)
        x_T = np.repeat(self.latents(th), n, axis=0)
        noise = np.stack([np.random.default_rng([int(seed), int(i), j]).standard_normal((self.steps, 8))
                          for i in index for j in range(n)])
        z0 = self._run(x_T, noise)
        return self.decode(z0).reshape(len(th), n, 8, 8).astype(np.float32)

    def deterministic(self, thetas) -> tuple[np.ndarray, np.ndarray]:
        """(z_0 (P, 8), images (P, 8, 8)) of DDIM with eta = 0 from each plane point."""
        z0 = self._run(self.latents(thetas))
        return z0, self.decode(z0)

    def features(self, images) -> np.ndarray:
        return np.asarray(self._models["clf"].features(np.asarray(images, np.float32).reshape(-1, 8, 8)), np.float64)

    def classes(self, images) -> np.ndarray:
        return np.asarray(self._models["clf"].probs(np.asarray(images, np.float32).reshape(-1, 8, 8))).argmax(-1)

    def exact(self, thetas):
        return None

    def log_likelihood(self, x, thetas):
        return None

    def sufficient_statistics(self, x):
        return None

    def describe(self) -> dict:
        d = {"kind": self.kind, "model": self.model, "anchors": self.anchors.tolist(), "margin": self.margin,
             "sampler": {"kind": "ddim", "steps": self.steps, "eta": self.eta}, "batch": self.batch, "psi": self.psi,
             "class_map": self.class_map}
        if self._anchor_ids is not None:
            d["anchor_noise"] = {"seed": self._anchor_seed, "ids": self._anchor_ids}
        return d

    def resolved(self) -> dict:
        return {"kind": self.kind, "model": self.model, "anchors": self.anchors.tolist(), "margin": self.margin,
                "sampler": dataclasses.asdict(self.sampler), "batch": self.batch, "psi": self.psi, "class_map": self.class_map}

    def outputs(self, spec: dict, out: str, thetas, g, interior, progress: bool = False) -> dict:
        return {"slice": slice_outputs(self, spec, out, thetas, g, interior, progress)}


# ---------------------------------------------------------------- the slice figure and psi map

def boundary_mask(classes: np.ndarray) -> np.ndarray:
    """(R1, R2) bool: points with a 4-neighbour of a different class."""
    c = classes
    m = np.zeros(c.shape, bool)
    du = c[1:] != c[:-1]
    dv = c[:, 1:] != c[:, :-1]
    m[1:] |= du
    m[:-1] |= du
    m[:, 1:] |= dv
    m[:, :-1] |= dv
    return m


def ridge_mask(s: np.ndarray) -> np.ndarray:
    """(R1, R2) bool: interior points where the scalar s is a strict local maximum along u or along v
    and above its interior median (the metric's ridge lines, drawn as points)."""
    r = np.zeros(s.shape, bool)
    c = s[1:-1, 1:-1]
    along_u = (c > s[:-2, 1:-1]) & (c > s[2:, 1:-1])
    along_v = (c > s[1:-1, :-2]) & (c > s[1:-1, 2:])
    r[1:-1, 1:-1] = (along_u | along_v) & (c > np.median(c))
    return r


def psi_job(out: str, z0: np.ndarray, progress: bool = False) -> np.ndarray:
    """psi of the vae-digits decoder at each grid point's eta = 0 z_0, by an ordinary descriptor job
    (``OUT/psi``, latents from ``OUT/slice/z0.parquet``). Returns psi in grid order.

    A rerun resumes that job (computes only the shards without a commit marker) when the stored
    z_0 equal this run's bit for bit (the eta = 0 sampler is deterministic, so they do on the same
    software and hardware); otherwise the stored latents and psi are replaced."""
    import pandas as pd

    from geomjobs.runner import run_default
    from geomjobs.sink.fs import filesystem, join

    z0 = np.asarray(z0, np.float64)
    zuri = join(out, "slice", "z0.parquet")
    puri = join(out, "psi")
    fs, path = filesystem(zuri)
    pfs, ppath = filesystem(puri)
    same = False
    if fs.exists(path) and pfs.exists(ppath):
        with fs.open(path, "rb") as f:
            old = pd.read_parquet(f)
        same = len(old) == len(z0) and np.array_equal(np.stack(old.z.to_numpy()).astype(np.float64), z0)
    if not same:
        if pfs.exists(ppath):
            pfs.rm(ppath, recursive=True)     # a psi job of other latents would not match them
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            pd.DataFrame({"z": list(z0)}).to_parquet(f, index=False)
    P = len(z0)
    job = {"job_id": "fisher-slice-psi", "model": {"kind": "zoo", "name": "vae-digits"},
           "latents": {"kind": "parquet", "uri": zuri, "column": "z"},
           "descriptors": {"local_scaling": {"mode": "exact"}},
           "execution": {"shard_size": max(1, min(P, 512)), "batch_size": max(1, min(P, 128))}}
    run_default(job, puri, progress=progress)
    df = pd.read_parquet(puri, columns=["sample_id", "local_scaling", "status"]).sort_values("sample_id")
    psi = np.full(P, np.nan)
    ok = df.status == "ok"
    psi[df.sample_id[ok].to_numpy()] = df.local_scaling[ok].to_numpy()
    return psi


def slice_outputs(family, spec: dict, out: str, thetas: np.ndarray, g: np.ndarray, interior: np.ndarray,
                  progress: bool = False) -> dict:
    """eta = 0 classes, the psi map (when ``family.psi``), ``OUT/slice/points.parquet`` and
    ``slice.png``; returns the summary's ``slice`` entry (the ridge-vs-boundary figure)."""
    import pandas as pd

    from geomjobs.sink.fs import filesystem, join

    R1, R2 = spec["grid"]["resolution"]
    z0, imgs = family.deterministic(thetas)
    cls = family.classes(imgs)
    tr = np.trace(g, axis1=1, axis2=2)
    psi = psi_job(out, z0, progress) if family.psi else np.full(len(thetas), np.nan)
    bnd = boundary_mask(cls.reshape(R1, R2)).ravel()
    ridge = ridge_mask(tr.reshape(R1, R2)).ravel()
    inner = interior.astype(bool)
    on, off = inner & bnd, inner & ~bnd
    res = {"classes": np.bincount(cls, minlength=10).tolist(), "boundary_points": int(on.sum()), "interior_points": int(inner.sum()),
           "trace_g_boundary_mean": float(tr[on].mean()) if on.any() else None,
           "trace_g_nonboundary_mean": float(tr[off].mean()) if off.any() else None,
           "ridge_points": int(ridge.sum()), "ridge_on_boundary_fraction": float(bnd[ridge].mean()) if ridge.any() else None,
           "boundary_fraction_interior": float(bnd[inner].mean()) if inner.any() else None}
    if on.any() and off.any():
        # the mean ratio is dominated by a few very large tr g; the medians and the mean of log10 tr g
        # are the robust figures
        res["trace_g_ratio_boundary_over_nonboundary"] = res["trace_g_boundary_mean"] / res["trace_g_nonboundary_mean"]
        res["trace_g_median_ratio"] = float(np.median(tr[on]) / np.median(tr[off]))
        pos = tr > 0
        if (on & pos).any() and (off & pos).any():
            lt = np.log10(np.where(pos, tr, 1.0))
            res["log10_trace_g_boundary_minus_nonboundary"] = float(lt[on & pos].mean() - lt[off & pos].mean())
    # F is an unconstrained MLP: where its fit is not convex, tr g <= 0 (shown grey in slice.png)
    res["nonpositive_trace_fraction_interior"] = float((tr[inner] <= 0).mean()) if inner.any() else None
    if family.psi:
        ok = np.isfinite(psi)
        res["psi_boundary_mean"] = float(psi[on & ok].mean()) if (on & ok).any() else None
        res["psi_nonboundary_mean"] = float(psi[off & ok].mean()) if (off & ok).any() else None
    df = pd.DataFrame({"theta_1": thetas[:, 0], "theta_2": thetas[:, 1], "eta0_class": cls.astype(np.int64), "trace_g": tr,
                       "psi": psi, "class_boundary": bnd, "ridge": ridge, "z0": [np.asarray(r, np.float64) for r in z0]})
    fs, path = filesystem(join(out, "slice", "points.parquet"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        df.to_parquet(f, index=False)
    fine = fine_class_map(family, spec, out) if family.class_map else None
    from geomjobs.fisher.slice_stats import slice_statistics

    res["stats"] = slice_statistics(tr.reshape(R1, R2), psi.reshape(R1, R2) if family.psi else None, cls.reshape(R1, R2), fine,
                                    seed=spec.get("seed", 0))
    if spec.get("figures", True):
        from geomjobs.fisher.figures import slice_figure, stats_figure

        slice_figure(join(out, "slice.png"), spec, thetas, tr, psi, cls, ridge, family)
        stats_figure(join(out, "slice_stats.png"), spec, tr, psi if family.psi else None, cls, fine, res["stats"], family)
    return res


def fine_class_map(family, spec: dict, out: str) -> np.ndarray:
    """The eta = 0 classes on a family.class_map x family.class_map grid over the slice's box
    (``OUT/slice/classes_fine.parquet``: theta_1, theta_2, eta0_class, theta_1 index major)."""
    import pandas as pd

    from geomjobs.sink.fs import filesystem, join

    n = family.class_map
    lo, hi = spec["grid"]["low"], spec["grid"]["high"]
    th = np.stack(np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n), indexing="ij"), -1).reshape(-1, 2)
    cls = family.classes(family.deterministic(th)[1])
    fs, path = filesystem(join(out, "slice", "classes_fine.parquet"))
    with fs.open(path, "wb") as f:
        pd.DataFrame({"theta_1": th[:, 0], "theta_2": th[:, 1], "eta0_class": cls.astype(np.int64)}).to_parquet(f, index=False)
    return cls.reshape(n, n)
