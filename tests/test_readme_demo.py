"""The README's quick start and a reduced `make demo` run as users run them (subprocesses,
float32, no x64), and what they write is read back by pandas and DuckDB."""
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from geomjobs.generators.ddpm import ddpm_generator

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_spec_is_the_shipped_example():
    assert readme_blocks("yaml")[0] == (ROOT / "examples" / "quickstart.yaml").read_text()


# a README block that shows only a `latents` section is checked inside this job spec
FRAGMENT_BASE = {"model": {"kind": "zoo", "name": "vae-digits"}, "descriptors": {"local_scaling": {}}, "output": "out/x"}


def test_every_readme_spec_passes_the_schema():
    """The README's other specs (the Stable Diffusion recipe, guidance and prompt sections, fisher
    specs and families) name keys that exist: job specs through the job schema, `latents`-only
    fragments inside a minimal job spec, fisher specs through the fisher validator and a bare
    `family` through the family builder."""
    import yaml

    from geomjobs.fisher.families import build_family
    from geomjobs.fisher.job import validate_fisher_spec
    from geomjobs.spec import validate_spec

    docs = [d for block in readme_blocks("yaml") for d in yaml.safe_load_all(block)]
    kinds = []
    for doc in docs:
        if set(doc) == {"family"}:
            build_family(doc["family"])
            kinds.append("family")
        elif "family" in doc:
            validate_fisher_spec(doc)
            kinds.append("fisher")
        elif set(doc) == {"latents"}:
            validate_spec({**FRAGMENT_BASE, **doc})
            kinds.append("fragment")
        else:
            validate_spec(doc)
            kinds.append("job")
    assert kinds.count("job") >= 2 and {"family", "fisher", "fragment"} <= set(kinds), kinds


def test_readme_quick_start_runs(tmp_path):
    out = tmp_path / "out" / "quickstart"
    r = subprocess.run([sys.executable, "-m", "geomjobs.cli", "run", str(ROOT / "examples" / "quickstart.yaml"),
                        "--out", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "geomjobs.cli", "inspect", str(out)], capture_output=True, text=True)
    assert "rows           2000 of 2000 samples" in r.stdout
    code = readme_blocks("python")[0].replace("out/quickstart", str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "mean_psi" in r.stdout and "2000" in r.stdout


def test_reduced_demo_writes_what_it_says(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "geomjobs.demo", "--out", str(out), "--resolution", "12", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "144/144 rows, 0 errors" in r.stdout and "DuckDB" in r.stdout
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    df = pd.read_parquet(out).sort_values("sample_id")
    n = duckdb.sql(f"SELECT count(*) FROM '{out}/**/*.parquet' WHERE local_complexity IS NOT NULL").fetchall()[0][0]
    assert len(df) == n == 144
    # psi and nu at a few grid points against the float64 Jacobian and numpy SVD
    g = ddpm_generator("ddpm-gmm2d", timestep=10, prediction="x0").flat_fn()
    for i in (0, 50, 143):
        row = df.iloc[i]
        s = np.linalg.svd(np.asarray(jax.jacfwd(g)(jnp.array([row.u, row.v]))), compute_uv=False)
        np.testing.assert_allclose(row.local_scaling, np.log(s).sum(), rtol=1e-4, atol=1e-4)
        p = s / s.sum()
        np.testing.assert_allclose(row.local_rank, np.exp(-(p * np.log(p)).sum()), rtol=1e-4)
    # a rerun resumes: nothing is recomputed
    r = subprocess.run([sys.executable, "-m", "geomjobs.demo", "--out", str(out), "--resolution", "12", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "(0 computed" in r.stdout


def test_generated_digits_example_orders_decoded_samples_by_psi(tmp_path):
    """examples/generated_digits.py as a user runs it: a sampled job, its PNG grid and query."""
    out = tmp_path / "gd"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "generated_digits.py"), "--count", "16", "--steps", "5",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out)
    assert len(df) == 16 and (df.status == "ok").all() and df.z.map(len).eq(8).all()
    assert (tmp_path / "gd.png").stat().st_size > 10_000 and "psi_quartile" in r.stdout
