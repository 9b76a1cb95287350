"""``geomjobs fisher SPEC.yaml [--out URI] [--address ADDR]``: the Fisher metric of a 2-D family
on a theta grid (docs/fisher.md; Lobashev et al.). :func:`run_fisher` runs the stages:

1. the spec (:mod:`geomjobs.fisher.spec`): every problem a SpecError naming the key, before any work;
2. sampling (:mod:`geomjobs.fisher.sampling`): an ordinary geomjobs job at ``OUT/samples``, one
   row per grid point, resumed by its commit markers when it is there; in process, or on Ray with
   ``address``;
3. the method (:mod:`geomjobs.fisher.method`): the posterior (learned network, oracle or
   features), the fit of F, the metric (``jax.hessian`` of F), geodesics;
4. outputs (:mod:`geomjobs.fisher.outputs`, :mod:`geomjobs.fisher.figures`): ``metric.parquet``,
   ``fisher.json`` (settings, losses, the error table against the exact references), the fitted
   networks, ``fisher.png``, and the family's own (diffusion-slice: ``slice/``, ``psi/``, ``slice.png``).

:func:`summary_lines` is what the command prints of the summary :func:`run_fisher` returns.
"""
from __future__ import annotations

import time

from geomjobs.errors import SpecError
from geomjobs.fisher.spec import grid_thetas, interior_mask, validate_fisher_spec
from geomjobs.sink.fs import filesystem, join, normalize_uri


def run_fisher(spec: dict, out: str | None = None, *, address: str | None = None, progress: bool = True,
               family=None) -> dict:
    """Run a fisher spec: validated (:func:`~geomjobs.fisher.spec.validate_fisher_spec`, with its
    ``family``), or a raw mapping, validated here. ``out`` overrides the spec's ``output``;
    ``address``: a Ray cluster for the sampling job ("local": an embedded Ray; None: in process).
    Returns the summary written to ``OUT/fisher.json``. Raises SpecError before any work, and
    :class:`~geomjobs.fisher.sampling.SamplingError` (nothing fitted) when sample shards failed."""
    from geomjobs.fisher.figures import fisher_figure
    from geomjobs.fisher.method import fit_method, geodesics
    from geomjobs.fisher.outputs import write_metric, write_networks, write_summary
    from geomjobs.fisher.sampling import load_samples, sample_grid

    if family is None:
        spec, family = validate_fisher_spec(spec)
    out = out or spec.get("output")
    if not out:
        raise SpecError("output", "no output location: give 'output' in the spec or --out")
    out = normalize_uri(out)
    t_start = time.time()
    fs, root = filesystem(out)
    fs.makedirs(root, exist_ok=True)
    sampled = sample_grid(spec, family, out, address=address, progress=progress)
    sample_seconds = time.time() - t_start
    data = load_samples(out)
    thetas = grid_thetas(spec)
    fit = fit_method(spec, family, data["x"], thetas)
    pot = fit["potential"]
    t_metric = time.time()
    F, dF, g = pot.F(thetas), pot.grad(thetas), pot.hessian(thetas)
    metric_seconds = time.time() - t_metric
    exact = data["exact"]
    interior = interior_mask(spec)
    summary: dict = {"uri": out, "family": family.describe(), "grid": spec["grid"], "samples_per_point": spec["samples_per_point"],
                     "posterior": spec["posterior"], "potential": spec["potential"], "sampled_shards": sampled,
                     "sample_seconds": sample_seconds, "metric_seconds": metric_seconds, **fit["info"]}
    if exact is not None:
        summary["errors"] = error_table(thetas, F, dF, g, exact, family.sites, interior, pot.coords)
    geo = geodesics(spec, pot, exact)
    summary["geodesics"] = [{k: v for k, v in gd.items() if k not in ("path", "exact_path")} for gd in geo]
    write_metric(out, thetas, F, dF, g, exact)
    write_networks(out, fit)
    if spec["figures"]:
        fisher_figure(join(out, "fisher.png"), spec, family, thetas, F, g, exact, geo)
    t_out = time.time()
    summary.update(family.outputs(spec, out, thetas, g, interior, progress))
    summary["family_outputs_seconds"] = time.time() - t_out
    summary["seconds"] = time.time() - t_start
    write_summary(out, summary, geo)
    return summary


def error_table(thetas, F, dF, g, exact: dict, sites: int, interior, coords: str) -> dict:
    """:func:`geomjobs.fisher.potential.error_table` with its normalisation spelled out."""
    from geomjobs.fisher.potential import error_table as table

    e = table(thetas, F, dF, g, exact, sites, interior, coords=coords)
    e["normalisation"] = (f"F and dF per site ({sites} sites), best affine term in the fitting coordinates ({coords}) "
                          "removed over the grid interior (F) / its gradient (dF); metric: relative Frobenius error over "
                          "the interior, and its median per point")
    return e


def summary_lines(s: dict) -> list[str]:
    """What ``geomjobs fisher`` prints of a run's summary."""
    points = s["grid"]["resolution"][0] * s["grid"]["resolution"][1]
    sh = s["sampled_shards"]
    fit = s["potential"].get("fit", "js")
    loss = "JS" if fit == "js" else "weighted RMS log-posterior residual"
    lines = [f"fisher: {points} grid points, {sh['computed']}/{sh['shards']} sample shards computed, F fitted "
             f"({fit}; {loss} {s['potential_loss']:.4f}); {s['seconds']:.0f} s -> {s['uri']}"]
    if sh.get("worker_deaths"):
        lines.append(f"  {sh['worker_deaths']} sampling workers died and were replaced")
    if "slice" in s:
        sl = s["slice"]
        ratio = sl.get("trace_g_median_ratio")
        head = (f"  slice: {sl['boundary_points']}/{sl['interior_points']} interior points next to an eta=0 class change; "
                f"median tr g there / elsewhere {ratio:.3g}") if ratio is not None else "  slice: no class change inside the grid"
        lines.append(f"{head} ; ridge points on a boundary {sl['ridge_on_boundary_fraction']} "
                     f"(boundary share {sl['boundary_fraction_interior']})")
    if "errors" in s:
        e = s["errors"]
        lines.append(f"  vs exact: RMSE F/site {e['rmse_F']:.4g}, dF/site {e['rmse_dF_1']:.4g} / {e['rmse_dF_2']:.4g}, "
                     f"metric relative error {e['metric_rel_error']:.3g} (interior; median per point "
                     f"{e['metric_median_rel_error']:.3g})")
    return lines
