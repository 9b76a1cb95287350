"""`make demo`: the local geometry of the shipped DDPM over a grid of its 2-D input space.

Runs the job below in local mode (psi and nu from the exact 2 x 2 Jacobian of the denoiser's
x_0 prediction at one timestep, delta from a cross-polytope of 2 directions), then prints a
summary, runs a DuckDB query over the Parquet files and saves a PNG heatmap of the three
descriptors. Rerunning resumes: committed shards are not recomputed.

    python -m geomjobs.demo --out out/demo [--resolution 64] [--timestep 10]
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml


def demo_spec(resolution: int = 64, timestep: int = 10) -> dict:
    return {
        "job_id": f"demo-ddpm-gmm2d-t{timestep}-r{resolution}",
        "model": {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": timestep, "prediction": "x0"},
        "latents": {"kind": "grid2d", "low": [-6.0, -6.0], "high": [6.0, 6.0], "resolution": [resolution, resolution]},
        "descriptors": {
            "local_scaling": {"mode": "exact"},
            "local_rank": {},
            "local_complexity": {"directions": 2, "radius": 0.05, "seed": 0},
        },
        "execution": {"shard_size": 512, "batch_size": 256},
    }


QUERY = """
SELECT local_complexity AS delta,
       count(*)                       AS samples,
       round(avg(local_scaling), 3)   AS mean_psi,
       round(avg(local_rank), 3)      AS mean_nu
FROM '{uri}/**/*.parquet'
WHERE status = 'ok'
GROUP BY delta ORDER BY delta LIMIT 12
"""


def heatmap(df, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from geomjobs.analysis.plots import save_png

    res = int(round(len(df) ** 0.5))
    df = df.sort_values("sample_id")
    extent = [df.v.min(), df.v.max(), df.u.min(), df.u.max()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    for ax, col, label, unit in zip(axes, ["local_scaling", "local_rank", "local_complexity"],
                                    ["local scaling psi", "local rank nu", "local complexity delta"],
                                    ["psi: log volume change (nats)", "nu: effective number of directions",
                                     "delta: neurons changing sign (count)"]):
        img = np.asarray(df[col], float).reshape(res, res)   # rows: u (x_1), columns: v (x_2)
        im = ax.imshow(img.T, origin="lower", extent=[extent[2], extent[3], extent[0], extent[1]], cmap="viridis")
        ax.set_title(label)
        ax.set_xlabel("x_1")
        ax.set_ylabel("x_2")
        fig.colorbar(im, ax=ax, shrink=0.85, label=unit)
    fig.suptitle(title)
    save_png(fig, path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--timestep", type=int, default=10)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import duckdb
    import pandas as pd

    from geomjobs import run_job

    spec = demo_spec(args.resolution, args.timestep)
    print("job spec:\n  " + yaml.safe_dump(spec, sort_keys=False).replace("\n", "\n  ").rstrip())
    res = run_job(spec, args.out, progress=not args.quiet)
    print(f"\n{res.job_id}: {res.rows}/{res.count} rows, {res.errors} errors, {res.committed_shards}/{res.num_shards} "
          f"shards at {res.uri} ({res.computed_shards} computed in {res.seconds:.1f} s)")

    df = pd.read_parquet(res.uri)
    print("\nsummary (pandas.read_parquet):")
    print(df[["local_scaling", "local_rank", "local_complexity"]].describe().round(3).to_string())
    q = QUERY.format(uri=res.uri)
    print("\nDuckDB:" + q.rstrip())
    print(duckdb.sql(q))
    png = os.path.join(os.path.dirname(res.uri.rstrip("/")) or ".", f"{os.path.basename(res.uri.rstrip('/'))}.png")
    heatmap(df, png, f"DDPM on a 2-D Gaussian mixture: x_0 prediction at t = {args.timestep}")
    print(f"heatmap: {png}")
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
