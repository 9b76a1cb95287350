"""Geometry-guided generation on digits, end to end (issue 10; SPEC sections 3 and 7), in one command:

1. reward data: the 1797 scikit-learn digits encoded by `vae-digits`, forward-diffused to a random
   t (ldm-digits' schedule: linear, T = 1000) with `--draws` noise seeds (one dataset each), and
   psi of the vae-digits decoder measured at each z_t;
2. `geomjobs reward train` on those datasets -> a reward folder r(z_t, t) -> psi;
3. `ldm-digits` sampled jobs (DDIM, the same seed, so sample i starts from the same noise in
   every job) with `latents.guidance.scale` in `--scales` (0 is the baseline: no hook, bitwise
   the unguided job), psi of the vae-digits decoder recomputed at every generated latent;
4. `geomjobs reward evaluate` -> levelsets.parquet, datasets.parquet and the three-panel PNG.

Every step is a `geomjobs` command on a spec written under OUT/specs/ (the commands are printed).

    .venv/bin/python examples/reward_digits.py --out out/reward-demo
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

LDM = {"kind": "zoo", "name": "ldm-digits"}
DECODER = {"kind": "zoo", "name": "vae-digits"}
DESCRIPTORS = {"local_scaling": {"mode": "exact"}, "local_rank": {}}
SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}   # ldm-digits' own (its card)


def data_spec(draw: int, out: str) -> dict:
    """Reward-model training data: all digits, encoded, diffused to a random t with noise seed ``draw``."""
    return {"job_id": f"reward-data-{draw}", "model": DECODER,
            "latents": {"kind": "images", "source": "digits", "encoder": "vae-digits",
                        "diffuse": {"t": "random", "seed": draw, "schedule": SCHEDULE}},
            "descriptors": DESCRIPTORS, "execution": {"shard_size": 600, "batch_size": 64}, "output": out}


def sampled_spec(scale: float, reward: str, count: int, steps: int, seed: int, out: str) -> dict:
    return {"job_id": f"guided-{scale:g}", "model": DECODER,
            "latents": {"kind": "sampled", "model": LDM, "sampler": {"kind": "ddim", "steps": steps, "eta": 0.0},
                        "guidance": {"reward": reward, "scale": float(scale)}, "count": count, "seed": seed,
                        "save_latent": True, "batch_size": 100},
            "descriptors": DESCRIPTORS, "execution": {"shard_size": 250, "batch_size": 100}, "output": out}


def _cli(argv: list[str], log) -> None:
    from geomjobs.cli import main as geomjobs

    log("$ geomjobs " + " ".join(argv))
    rc = geomjobs(argv)
    if rc != 0:
        raise SystemExit(f"geomjobs {argv[0]} exited with {rc}")


def _write(spec: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def run(out: str, draws: int = 3, count: int = 1000, steps: int = 50, scales=(0, 1, 2, 4, -2), seed: int = 0,
        train_steps: int = 3000, log=print) -> dict:
    """The four steps (module doc) under ``out`` (emptied first); returns {"levelsets", "datasets",
    "reward", "seconds", "png"}."""
    import json

    import pandas as pd

    if 0 not in [float(s) for s in scales]:
        raise SystemExit("--scales must include 0 (the baseline)")
    root = Path(out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    (root / "specs").mkdir(parents=True)
    t0, times = time.time(), {}
    data = []
    for d in range(draws):
        uri = str(root / "data" / f"draw{d}")
        _cli(["run", _write(data_spec(d, uri), root / "specs" / f"data-{d}.yaml"), "--quiet"], log)
        data.append(uri)
    times["reward data"] = time.time() - t0
    reward = str(root / "reward")
    t = time.time()
    _cli(["reward", "train", *data, "--out", reward, "--steps", str(train_steps), "--quiet"], log)
    times["reward train"] = time.time() - t
    t = time.time()
    sampled = {}
    for s in sorted({float(x) for x in scales}, key=lambda v: (v != 0, v)):
        uri = str(root / "sampled" / f"scale{s:g}")
        _cli(["run", _write(sampled_spec(s, reward, count, steps, seed, uri), root / "specs" / f"sampled-{s:g}.yaml"),
              "--quiet"], log)
        sampled[s] = uri
    times["sampling + psi"] = time.time() - t
    t = time.time()
    ev = str(root / "evaluate")
    _cli(["reward", "evaluate", sampled[0.0], *[u for s, u in sampled.items() if s != 0.0], "--out", ev], log)
    times["evaluate"] = time.time() - t
    seconds = time.time() - t0
    meta = json.loads((root / "reward" / "reward.json").read_text())
    levels = pd.read_parquet(Path(ev) / "levelsets.parquet")
    summary = pd.read_parquet(Path(ev) / "datasets.parquet")
    log(f"reward: n_train {meta['n_train']}, n_val {meta['n_val']}, val R^2 {meta['val_r2']:.3f}, "
        f"val Spearman {meta['val_spearman']:.3f}")
    log(level_table(levels))
    log("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {seconds:.0f} s")
    return {"levelsets": levels, "datasets": summary, "reward": meta, "seconds": seconds, "times": times,
            "png": str(Path(ev) / "levelsets.png")}


def level_table(levels) -> str:
    """Mean psi per level set (rows) and scale (columns), and per scale the number of level sets
    (with samples) where it is above the baseline's."""
    piv = levels.pivot_table(index="level_set", columns="guidance_scale", values="psi_mean")
    cnt = levels[levels.guidance_scale == 0].set_index("level_set")["count"]
    lines = ["level set  n    " + "  ".join(f"scale {c:>5g}" for c in piv.columns)]
    for b, row in piv.iterrows():
        lines.append(f"{b:>9d} {int(cnt.get(b, 0)):>4d}  " + "  ".join(f"{v:>11.3f}" for v in row))
    base = piv[0.0]
    ups = "; ".join(f"scale {c:g}: above the baseline in {int((piv[c] > base).sum())} of {int(base.notna().sum())}"
                    for c in piv.columns if c != 0)
    return "\n".join(lines + [ups])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/reward-demo")
    p.add_argument("--draws", type=int, default=3, help="noise draws of the 1797 digits for the reward data (default 3)")
    p.add_argument("--count", type=int, default=1000, help="samples per guidance scale (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 4, -2], help="guidance scales; 0 is the baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=3000)
    a = p.parse_args(argv)
    res = run(a.out, a.draws, a.count, a.steps, a.scales, a.seed, a.train_steps)
    print(f"-> {res['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
