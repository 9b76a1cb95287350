"""``geomjobs fisher SPEC.yaml [--out URI] [--address ADDR]``: the Fisher metric of a 2-D family
on a theta grid (SPEC section 8; Lobashev et al.).

Stages (:func:`run_fisher`):
1. validation (:func:`load_fisher_spec` / :func:`validate_fisher_spec`): the JSON schema
   ``geomjobs/schemas/fisher.schema.json``, then the family's own keys, the grid (>= 3 points per
   axis, inside the family's domain), the posterior kind (``oracle`` only where the exact
   likelihood is computable) and the bundle sizes -- every problem a SpecError naming the key,
   before any work;
2. sampling, a sharded job: shards of ``execution.shard_size`` grid points, each written to
   ``OUT/samples/shard-KKKKK.npz`` (the samples and the exact references of its points) when it
   is complete, so a rerun computes only the missing shards. In process, or as Ray tasks with
   ``--address`` (an address, or ``local`` for an embedded Ray). A point's samples depend only on
   (seed, its grid index) (the family's contract), never on the sharding;
3. the posterior (learned network or oracle), the fit of F, the metric (``jax.hessian`` of F),
   geodesics, then ``metric.parquet``, ``fisher.json`` (settings, losses, the error table against
   the exact references), the fitted networks (``potential.msgpack``, ``posterior.msgpack``,
   flax serialisation) and PNGs (``fisher.png``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import yaml

from geomjobs.errors import SpecError
from geomjobs.fisher.geodesic import GeodesicConfig
from geomjobs.fisher.posterior import PosteriorConfig
from geomjobs.fisher.potential import PotentialConfig
from geomjobs.sink.fs import filesystem, join, normalize_uri

# the section defaults are the field defaults of their configs (PosteriorConfig, PotentialConfig, GeodesicConfig)
POSTERIOR_DEFAULTS = {k: v for k, v in dataclasses.asdict(PosteriorConfig()).items() if k != "kind"}
POTENTIAL_DEFAULTS = dataclasses.asdict(PotentialConfig())


def fisher_schema() -> dict:
    return json.loads(resources.files("geomjobs.schemas").joinpath("fisher.schema.json").read_text())


def _families(kind=None):
    from geomjobs.fisher import families

    if kind == "diffusion-slice" and kind not in families.FAMILIES:
        from geomjobs.fisher import diffusion_slice  # noqa: F401 - registers the kind (imported lazily: it loads JAX models)
    return families


def grid_axes(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    g = spec["grid"]
    return tuple(np.linspace(g["low"][i], g["high"][i], g["resolution"][i]) for i in range(2))


def grid_thetas(spec: dict) -> np.ndarray:
    """(P, 2) grid points, theta_1 index major: point p = i1 * R2 + i2."""
    a1, a2 = grid_axes(spec)
    return np.stack(np.meshgrid(a1, a2, indexing="ij"), -1).reshape(-1, 2)


def validate_fisher_spec(raw, base: str | Path = ".") -> tuple[dict, object]:
    """(spec with defaults filled, family). SpecError naming the key on any bad input."""
    if not isinstance(raw, dict):
        raise SpecError("", f"a fisher spec must be a mapping, got {type(raw).__name__}")
    from geomjobs.spec import explain_schema_error

    errors = list(jsonschema.Draft202012Validator(fisher_schema()).iter_errors(raw))
    if errors:
        raise explain_schema_error(jsonschema.exceptions.best_match(errors))
    spec = copy.deepcopy(raw)
    spec.setdefault("seed", 0)
    spec["posterior"] = {**POSTERIOR_DEFAULTS, **{"kind": "learned"}, **spec.get("posterior", {})}
    spec["potential"] = {**POTENTIAL_DEFAULTS, **spec.get("potential", {})}
    spec["execution"] = {"shard_size": 16, **spec.get("execution", {})}
    spec["geodesics"] = {"points": GeodesicConfig.points, **spec.get("geodesics", {})}
    spec.setdefault("figures", True)
    fam_mod = _families(spec["family"].get("kind"))
    family = fam_mod.build_family(_resolve_family_paths(spec["family"], base))
    spec["family"] = {**spec["family"], **getattr(family, "spec_extra", {})}
    if family.kind == "diffusion-slice" and "posterior" not in raw:
        spec["posterior"]["kind"] = "features"
    grid = spec["grid"]
    if "low" not in grid or "high" not in grid:
        box = getattr(family, "default_box", None)
        if box is None:
            raise SpecError("grid.low" if "low" not in grid else "grid.high", "is required for this family (the theta box)")
        grid.setdefault("low", [float(v) for v in box[0]])
        grid.setdefault("high", [float(v) for v in box[1]])
    for i in range(2):
        if grid["resolution"][i] < 3:
            raise SpecError(f"grid.resolution.{i}", f"expected at least 3 points per axis (the Hessian of F needs interior "
                                                    f"points), got {grid['resolution'][i]}")
        if not grid["low"][i] < grid["high"][i]:
            raise SpecError("grid.high", f"expected high > low on axis {i + 1}, got low={grid['low']} high={grid['high']}")
    family.check_thetas(grid_thetas(spec), key="grid")
    if spec["potential"]["coords"] == "log" and not (grid_thetas(spec) > 0).all():
        raise SpecError("potential.coords", f"'log' fitting coordinates need every grid theta > 0, got low = {grid['low']}")
    post, n = spec["posterior"], spec["samples_per_point"]
    if post["kind"] == "oracle" and not getattr(family, "has_oracle", False):
        why = (f"the exact Ising likelihood needs log Z by enumeration of 2^(L*L) states, done for L <= "
               f"{fam_mod.ORACLE_MAX_L}; got L = {spec['family'].get('L')}") if family.kind == "ising" else \
            f"family kind '{family.kind}' has no exact likelihood"
        raise SpecError("posterior.kind", f"'oracle' is not computable here: {why}; use kind: learned")
    if post["kind"] == "features" and family.kind != "diffusion-slice":
        raise SpecError("posterior.kind", "'features' (classifier-feature distances) is for family kind diffusion-slice")
    if post["kind"] == "learned" and family.kind == "diffusion-slice":
        raise SpecError("posterior.kind", "diffusion-slice uses kind: features (feature distances, as the paper does with CLIP)")
    if post["kind"] == "features" and n < 2:
        raise SpecError("samples_per_point", f"the feature posterior needs at least 2 samples per point (the first half are "
                                             f"the point's references, the rest bundle samples), got {n}")
    if n < post["bundle"]:
        raise SpecError("samples_per_point", f"expected at least posterior.bundle = {post['bundle']} samples per point "
                                             f"(one bundle), got {n}")
    if post["kind"] == "learned":
        n_hold = int(round(n * post["holdout"]))
        if n - n_hold < post["bundle"] or n_hold < 1:
            raise SpecError("samples_per_point", f"{n} samples per point leave {n - n_hold} for training bundles of "
                                                 f"{post['bundle']} and {n_hold} held out (posterior.holdout = {post['holdout']}); "
                                                 "more samples are needed")
    for k, (a, b) in enumerate(spec["geodesics"].get("pairs", [])):
        for end in (a, b):
            if not all(grid["low"][i] <= end[i] <= grid["high"][i] for i in range(2)):
                raise SpecError(f"geodesics.pairs.{k}", f"end point {end} is outside the grid box {grid['low']}..{grid['high']}")
    return spec, family


def _resolve_family_paths(fam: dict, base) -> dict:
    return fam


def load_fisher_spec(path) -> tuple[dict, object]:
    p = Path(path)
    if not p.is_file():
        raise SpecError("", f"spec file '{path}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError("", f"spec file '{path}' is not valid YAML: {e}") from None
    return validate_fisher_spec(raw, p.parent)


def spec_hash(spec: dict) -> str:
    """Hash of what the sampling stage computes (family, grid, samples, seed, sharding)."""
    keys = {k: spec[k] for k in ("family", "grid", "samples_per_point", "seed")}
    keys["shard_size"] = spec["execution"]["shard_size"]
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- sampling: a sharded job

def num_shards(spec: dict) -> int:
    P = int(np.prod(spec["grid"]["resolution"]))
    return -(-P // spec["execution"]["shard_size"])


def shard_points(spec: dict, k: int) -> np.ndarray:
    P = int(np.prod(spec["grid"]["resolution"]))
    s = spec["execution"]["shard_size"]
    return np.arange(k * s, min(P, (k + 1) * s))


def shard_path(out: str, k: int) -> str:
    return join(out, "samples", f"shard-{k:05d}.npz")


def compute_shard(spec: dict, k: int, out: str, family=None) -> int:
    """Sample shard k's grid points (and their exact references) and write its file; returns k."""
    if family is None:
        family = _families(spec["family"].get("kind")).build_family(spec["family"])
    idx = shard_points(spec, k)
    # every shard is sampled at shard_size points (the last one padded with copies of its last
    # point, dropped after) so the jitted samplers compile once; a point's samples depend only on
    # (seed, its index), so the copies change nothing
    size = spec["execution"]["shard_size"]
    pad = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
    th_all = grid_thetas(spec)
    th = th_all[idx]
    x = np.asarray(family.sample(th_all[pad], spec["samples_per_point"], spec["seed"], index=pad))[:len(idx)]
    arrays = {"index": idx, "x": x}
    ex = family.exact(th)
    if ex is not None:
        arrays.update({f"exact_{k2}": np.asarray(ex[k2], np.float64) for k2 in ("F", "dF", "g")})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fs, path = filesystem(shard_path(out, k))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, path)
    return k


def _ray_shard(spec, k, out):
    return compute_shard(spec, k, out)


def sample_grid(spec: dict, family, out: str, address: str | None = None, progress: bool = True) -> dict:
    """Compute the missing sample shards (in process, or as Ray tasks at ``address``); returns
    {"computed": n, "shards": total}."""
    fs, root = filesystem(out)
    todo = [k for k in range(num_shards(spec)) if not fs.exists(filesystem(shard_path(out, k))[1])]
    t0 = time.time()
    if address is None:
        for i, k in enumerate(todo):
            compute_shard(spec, k, out, family)
            if progress:
                print(f"  sampled shard {k} ({i + 1}/{len(todo)}, {time.time() - t0:.0f} s)", file=sys.stderr)
    elif todo:
        import ray

        from geomjobs.runner.ray_connect import ray_connection, worker_env

        with ray_connection(address):
            task = ray.remote(num_cpus=1, max_retries=2, runtime_env={"env_vars": worker_env()})(_ray_shard)
            pending = [task.remote(spec, k, out) for k in todo]
            n = 0
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                k = ray.get(ready[0])
                n += 1
                if progress:
                    print(f"  sampled shard {k} ({n}/{len(todo)}, {time.time() - t0:.0f} s)", file=sys.stderr)
    return {"computed": len(todo), "shards": num_shards(spec)}


def load_samples(spec: dict, out: str) -> dict:
    """All shards merged: {"x": (P, n, *shape), "exact": {F, dF, g} | None}."""
    xs, ex = [], {"F": [], "dF": [], "g": []}
    has_exact = True
    for k in range(num_shards(spec)):
        fs, path = filesystem(shard_path(out, k))
        with fs.open(path, "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            xs.append(z["x"])
            if "exact_F" in z:
                for key in ex:
                    ex[key].append(z[f"exact_{key}"])
            else:
                has_exact = False
    return {"x": np.concatenate(xs), "exact": {k: np.concatenate(v) for k, v in ex.items()} if has_exact else None}


# ---------------------------------------------------------------- the method

def interior_mask(spec: dict) -> np.ndarray:
    """Grid points not on the box's edge. At an edge the posteriors and q_F are cut off by the
    grid on one side, so F's curvature there is pinned by one side only and the net extrapolates."""
    R1, R2 = spec["grid"]["resolution"]
    m = np.zeros((R1, R2), bool)
    m[1:-1, 1:-1] = True
    return m.ravel()


def sites(family) -> int:
    return int(np.prod(family.sample_shape)) if family.kind in ("ising", "tasep") else 1


def fit_method(spec: dict, family, x: np.ndarray, thetas: np.ndarray, progress: bool = False) -> dict:
    """Posterior -> tempered bundle posteriors -> F. Returns the pieces and their losses."""
    from geomjobs.fisher import posterior as post_mod
    from geomjobs.fisher.potential import fit_potential, to_coords

    post = spec["posterior"]
    info: dict = {}
    net = params = None
    t0 = time.time()
    if post["kind"] == "oracle":
        loglik = post_mod.oracle_loglik(family, x, thetas)
    elif post["kind"] == "features":
        from geomjobs.fisher.diffusion_slice import feature_loglik

        loglik = feature_loglik(family, x)
    else:
        n = x.shape[1]
        n_hold = int(round(n * post["holdout"]))
        net, params, tinfo = post_mod.train_posterior(x[:, :n - n_hold], PosteriorConfig(**post),
                                                      grid=to_coords(spec["potential"]["coords"], thetas))
        info["posterior_loss"] = tinfo["loss"]
        info["posterior_loss_history"] = tinfo["loss_history"]
        loglik = post_mod.learned_loglik(net, params, x[:, n - n_hold:])
    info["posterior_seconds"] = time.time() - t0
    lp, pts = post_mod.bundle_posteriors(loglik, post["fit_bundle"], post["bundles_per_point"], seed=post["seed"])
    info["fit_bundle"] = min(post["fit_bundle"], loglik.shape[1])
    t0 = time.time()
    ps = spec["potential"]
    pot, pinfo = fit_potential(thetas, lp, pts, PotentialConfig(**ps))
    info["potential_loss"] = pinfo["loss"]
    info["potential_loss_history"] = pinfo["loss_history"]
    info["potential_seconds"] = time.time() - t0
    return {"potential": pot, "posterior_net": net, "posterior_params": params, "info": info}


def default_pairs(spec: dict) -> list:
    lo, hi = np.asarray(spec["grid"]["low"], float), np.asarray(spec["grid"]["high"], float)
    a = lo + 0.1 * (hi - lo)
    b = hi - 0.1 * (hi - lo)
    return [[a.tolist(), b.tolist()], [[a[0], b[1]], [b[0], a[1]]]]


def run_fisher(spec: dict, out: str | None = None, address: str | None = None, progress: bool = True, family=None) -> dict:
    """Run a validated fisher spec (from :func:`validate_fisher_spec`, or a raw mapping, validated
    here). Returns the summary written to ``OUT/fisher.json``."""
    if family is None:
        spec, family = validate_fisher_spec(spec)
    out = out or spec.get("output")
    if not out:
        raise SpecError("output", "no output location: give 'output' in the spec or --out")
    out = normalize_uri(out)
    t_start = time.time()
    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)
    h = spec_hash(spec)
    marker = join(out, "fisher-spec.json")
    mfs, mpath = filesystem(marker)
    if mfs.exists(mpath):
        old = json.loads(mfs.cat_file(mpath))
        if old.get("hash") != h:
            raise SpecError("output", f"'{out}' holds samples of a different fisher job (family, grid, samples_per_point, "
                                      "seed or shard_size differ); use a new output folder")
    else:
        with mfs.open(mpath, "w") as f:
            json.dump({"hash": h, "spec": spec}, f, indent=1, default=str)
    t0 = time.time()
    sampled = sample_grid(spec, family, out, address, progress)
    sample_seconds = time.time() - t0
    data = load_samples(spec, out)
    thetas = grid_thetas(spec)
    fit = fit_method(spec, family, data["x"], thetas, progress)
    pot = fit["potential"]
    F, dF, g = pot.F(thetas), pot.grad(thetas), pot.hessian(thetas)
    exact = data["exact"]
    interior = interior_mask(spec)
    summary: dict = {"uri": out, "family": family.describe() if hasattr(family, "describe") else spec["family"],
                     "grid": spec["grid"], "samples_per_point": spec["samples_per_point"], "posterior": spec["posterior"],
                     "potential": spec["potential"], "sampled_shards": sampled, "sample_seconds": sample_seconds,
                     **fit["info"]}
    if exact is not None:
        from geomjobs.fisher.potential import error_table

        summary["errors"] = error_table(thetas, F, dF, g, exact, sites(family), interior, coords=pot.coords)
        summary["errors"]["normalisation"] = (f"F and dF per site ({sites(family)} sites), best affine term in the fitting "
                                              f"coordinates ({pot.coords}) removed over the grid interior (F) / its gradient "
                                              "(dF); metric: relative Frobenius error over the interior")
    geo = geodesics(spec, pot, exact)
    summary["geodesics"] = [{k: v for k, v in gd.items() if k not in ("path", "exact_path")} for gd in geo]
    _write_metric(out, thetas, F, dF, g, exact)
    _write_networks(out, fit)
    if spec.get("figures", True):
        fisher_figure(join(out, "fisher.png"), spec, family, thetas, F, g, exact, geo)
    if family.kind == "diffusion-slice":
        from geomjobs.fisher.diffusion_slice import slice_outputs

        summary["slice"] = slice_outputs(family, spec, out, thetas, g, interior, progress)
    summary["seconds"] = time.time() - t_start
    ffs, fpath = filesystem(join(out, "fisher.json"))
    with ffs.open(fpath, "w") as f:
        json.dump({**summary, "geodesic_paths": [{"path": np.asarray(gd["path"]).tolist(),
                                                   "exact_path": None if gd.get("exact_path") is None else
                                                   np.asarray(gd["exact_path"]).tolist()} for gd in geo]},
                  f, indent=1, default=_json_default)
    return summary


def fisher_figure(uri: str, spec: dict, family, thetas, F, g, exact, geo) -> None:
    """F and the trace of g over the grid, estimate beside the exact reference where one exists
    (the estimate's F shifted by the affine term that best matches the exact F), geodesics drawn
    on the trace panels (estimated: white; exact metric: red dashes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geomjobs.fisher.potential import remove_affine

    R1, R2 = spec["grid"]["resolution"]
    lo, hi = spec["grid"]["low"], spec["grid"]["high"]
    ext = [lo[0], hi[0], lo[1], hi[1]]
    names = getattr(family, "theta_names", ("theta_1", "theta_2"))
    tr = np.trace(g, axis1=1, axis2=2)
    panels = []
    if exact is not None:
        Fa = remove_affine(F, exact["F"], thetas, spec["potential"].get("coords", "identity"))
        panels += [("F (fitted, affine-aligned)", Fa, None), ("F exact", exact["F"], None),
                   ("tr g (fitted)", tr, "est"), ("tr g exact", np.trace(exact["g"], axis1=1, axis2=2), "exact")]
    else:
        panels += [("F (fitted)", F, None), ("tr g (fitted)", tr, "est"),
                   ("det g (fitted)", np.linalg.det(g), "est")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    tr_max = np.percentile(np.concatenate([p[1] for p in panels if p[2]]), 99)
    for ax, (title, v, kind) in zip(axes, panels):
        kw = {"vmin": 0, "vmax": tr_max} if kind and title.startswith("tr") else {}
        im = ax.imshow(np.asarray(v).reshape(R1, R2).T, origin="lower", extent=ext, aspect="auto", cmap="viridis", **kw)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        if kind:
            for gd in geo:
                ax.plot(*np.asarray(gd["path"]).T, "w-", lw=1.5)
                if gd.get("exact_path") is not None:
                    ax.plot(*np.asarray(gd["exact_path"]).T, "r--", lw=1.2)
    fig.suptitle(f"Fisher metric: {spec['family'].get('kind')} ({spec['posterior']['kind']} posterior)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    fs, path = filesystem(uri)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def geodesics(spec: dict, pot, exact) -> list[dict]:
    """Each pair's geodesic under the fitted metric, its metric length and the straight line's;
    with the exact metric (bilinear between grid points) beside it where one exists."""
    from geomjobs.fisher.geodesic import geodesics as solve
    from geomjobs.fisher.geodesic import grid_metric, path_length, psd

    pairs = spec["geodesics"].get("pairs") or default_pairs(spec)
    # interior points stay one grid cell inside the box: on the edge row F's curvature is pinned
    # from one side only (see interior_mask) and a noisy, flat edge would be a shortcut
    lo, hi = np.asarray(spec["grid"]["low"], float), np.asarray(spec["grid"]["high"], float)
    cell = (hi - lo) / (np.asarray(spec["grid"]["resolution"]) - 1)
    box = (lo + cell, hi - cell)
    n = spec["geodesics"]["points"]
    met = pot.metric_fn()
    R1, R2 = spec["grid"]["resolution"]
    est = solve(met, pairs, n_points=n, bounds=box)
    ex = None
    if exact is not None:
        ex_met = grid_metric(grid_axes(spec), exact["g"].reshape(R1, R2, 2, 2))
        ex = solve(ex_met, pairs, n_points=n, bounds=box)
    res = []
    for k, (a, b) in enumerate(pairs):
        path, length = est[k]
        line = np.linspace(0, 1, n)[:, None] * (np.asarray(b) - np.asarray(a)) + np.asarray(a)
        d = {"a": list(a), "b": list(b), "path": path, "length": length,
             "straight_length": path_length(lambda t: psd(met(t)), line)}
        if ex is not None:
            ep, el = ex[k]
            d.update({"exact_path": ep, "exact_length": el, "exact_straight_length": path_length(ex_met, line),
                      "estimated_path_exact_length": path_length(ex_met, path)})
        res.append(d)
    return res


def _write_metric(out, thetas, F, dF, g, exact) -> None:
    import pandas as pd

    P = len(thetas)
    nul = [None] * P
    df = pd.DataFrame({
        "theta_1": thetas[:, 0], "theta_2": thetas[:, 1], "F": F, "dF_1": dF[:, 0], "dF_2": dF[:, 1],
        "g_11": g[:, 0, 0], "g_12": g[:, 0, 1], "g_22": g[:, 1, 1],
        "exact_F": exact["F"] if exact is not None else nul,
        "exact_g_11": exact["g"][:, 0, 0] if exact is not None else nul,
        "exact_g_12": exact["g"][:, 0, 1] if exact is not None else nul,
        "exact_g_22": exact["g"][:, 1, 1] if exact is not None else nul,
    })
    for c in ("exact_F", "exact_g_11", "exact_g_12", "exact_g_22"):
        df[c] = df[c].astype("float64")
    fs, path = filesystem(join(out, "metric.parquet"))
    with fs.open(path, "wb") as f:
        df.to_parquet(f, index=False)


def _write_networks(out, fit) -> None:
    from flax import serialization

    pot = fit["potential"]
    cfg = {"potential": {"width": pot.cfg.width, "depth": pot.cfg.depth, "centre": np.asarray(pot.centre).tolist(),
                         "half_width": np.asarray(pot.half_width).tolist(), "coords": pot.cfg.coords,
                         "convex": pot.cfg.convex,
                         "note": "F(t) = FNet(width, depth, convex).apply(params, (u(t) - centre) / half_width), per sample; "
                                 "u = the fitting coordinates (identity: u = t; log: u = log t)"}}
    files = {"potential.msgpack": serialization.to_bytes(pot.params)}
    if fit["posterior_params"] is not None:
        net = fit["posterior_net"]
        files["posterior.msgpack"] = serialization.to_bytes(fit["posterior_params"])
        cfg["posterior"] = {"n_points": net.n_points, "lattice": net.lattice, "hidden": net.hidden,
                            "grid": None if net.grid is None else [list(r) for r in net.grid], "rank": net.rank,
                            "note": "per-sample grid logits; a bundle's log-posterior is the sum over its samples"}
    files["networks.json"] = json.dumps(cfg, indent=1).encode()
    for name, blob in files.items():
        fs, path = filesystem(join(out, name))
        with fs.open(path, "wb") as f:
            f.write(blob)


def load_potential(out: str):
    """The fitted F of a finished fisher output folder (a :class:`~geomjobs.fisher.potential.Potential`)."""
    import jax
    import jax.numpy as jnp
    from flax import serialization

    from geomjobs.fisher.potential import Potential

    fs, path = filesystem(join(normalize_uri(out), "networks.json"))
    saved = json.loads(fs.cat_file(path))["potential"]
    cfg = PotentialConfig(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(PotentialConfig)}})
    template = cfg.net().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    fs, path = filesystem(join(normalize_uri(out), "potential.msgpack"))
    params = serialization.from_bytes(template, fs.cat_file(path))
    return Potential(params, np.asarray(saved["centre"], np.float32), np.asarray(saved["half_width"], np.float32), cfg)


def fisher_cli(args) -> int:
    spec, family = load_fisher_spec(args.spec)
    s = run_fisher(spec, args.out, address=args.address, progress=not args.quiet, family=family)
    line = (f"fisher: {len(grid_thetas(spec))} grid points, {s['sampled_shards']['computed']}/{s['sampled_shards']['shards']} "
            f"sample shards computed, F fitted (JS {s['potential_loss']:.4f}); {s['seconds']:.0f} s -> {s['uri']}")
    print(line)
    if "slice" in s:
        sl = s["slice"]
        ratio = sl.get("trace_g_median_ratio")
        print(f"  slice: {sl['boundary_points']}/{sl['interior_points']} interior points next to an eta=0 class change; median tr g "
              f"there / elsewhere {ratio:.3g}" if ratio is not None else "  slice: no class change inside the grid",
              f"; ridge points on a boundary {sl['ridge_on_boundary_fraction']} (boundary share {sl['boundary_fraction_interior']})")
    if "errors" in s:
        e = s["errors"]
        print(f"  vs exact: RMSE F/site {e['rmse_F']:.4g}, dF/site {e['rmse_dF_1']:.4g} / {e['rmse_dF_2']:.4g}, "
              f"metric relative error {e['metric_rel_error']:.3g} (interior)")
    return 0
