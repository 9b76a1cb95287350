"""Geometry of generated digits, end to end: sample latents from the shipped latent diffusion
model (`ldm-digits`, DDIM), measure psi / nu / delta of the `vae-digits` decoder at each generated
latent (the miniature of SD's decoder at a generated latent), and save a PNG grid of the decoded
digits ordered by psi (lowest top left).

    .venv/bin/python examples/generated_digits.py --count 256 --out out/generated-digits
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np


def spec(count: int, steps: int, out: str) -> dict:
    return {
        "job_id": "generated-digits",
        "model": {"kind": "zoo", "name": "vae-digits"},
        "latents": {"kind": "sampled", "model": {"kind": "zoo", "name": "ldm-digits"},
                    "sampler": {"kind": "ddim", "steps": steps, "eta": 0.0},
                    "count": count, "seed": 0, "save_latent": True},
        "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {},
                        "local_complexity": {"directions": 4, "radius": 0.05}},
        "execution": {"shard_size": 64, "batch_size": 32, "workers": 1},
        "output": out,
    }


def grid_png(df, png: Path, cols: int = 16) -> None:
    """The decoded digits of ``df`` (rows with a ``z`` column), ordered by psi, as one PNG."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geomjobs.generators import build_generator

    dec = build_generator({"kind": "zoo", "name": "vae-digits"})
    df = df.sort_values("local_scaling")
    z = np.stack(df.z.to_numpy()).astype(np.float32)
    images = np.asarray(jax.vmap(lambda v: dec.apply(dec.params, v))(z)).reshape(len(z), 8, 8)
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, psi in zip(axes.flat, images, df.local_scaling):
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{psi:.1f}", fontsize=5)
    fig.suptitle("ldm-digits samples in increasing psi of the vae-digits decoder (row by row);\nthe number above each digit "
                 "is its psi, the log volume change of the decoder at its latent (nats)", fontsize=8)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    import duckdb
    import pandas as pd

    import geomjobs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="out/generated-digits")
    args = p.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    res = geomjobs.run_job(spec(args.count, args.steps, args.out))
    df = pd.read_parquet(args.out)
    png = Path(args.out).with_suffix(".png")
    grid_png(df, png)
    print(f"{res.rows} generated digits in {res.seconds:.1f} s -> {args.out}; grid ordered by psi: {png}")
    print(duckdb.sql(f"""
        SELECT q AS psi_quartile, count(*) AS n, round(avg(local_scaling), 2) AS mean_psi,
               round(avg(local_rank), 2) AS mean_nu, round(avg(local_complexity), 1) AS mean_delta
        FROM (SELECT ntile(4) OVER (ORDER BY local_scaling) AS q, *
              FROM '{args.out}/**/*.parquet' WHERE status = 'ok')
        GROUP BY q ORDER BY q"""))
    return res.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
