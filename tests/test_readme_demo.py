"""The README's quick start and a reduced `make demo` run as users run them (subprocesses,
float32, no x64), and what they write is read back by pandas and DuckDB; their figures are
checked by what they draw (tests/figures.py), redrawn in process from the same records."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from figures import assert_figure_draws_data, figure_saved_as, panel_data, record_figures
from PIL import Image

from geomjobs.generators.ddpm import ddpm_generator

ROOT = Path(__file__).resolve().parents[1]


def check_png(path) -> None:
    """A complete PNG file (what it draws is checked on the figure, see tests/figures.py)."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 50, im.size


def readme_blocks(lang, pages=("README.md",)):
    """The ``lang`` code blocks of the README (or of other pages: ``docs/*.md``), in order."""
    return [b for page in pages for b in re.findall(rf"```{lang}\n(.*?)```", (ROOT / page).read_text(), re.S)]


DOC_PAGES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))


def test_readme_spec_is_the_shipped_example():
    assert readme_blocks("yaml")[0] == (ROOT / "examples" / "quickstart.yaml").read_text()


# a block that shows only a `latents` or `model` section is checked inside this job spec
FRAGMENT_BASE = {"model": {"kind": "zoo", "name": "vae-digits"}, "latents": {"kind": "gaussian", "count": 1, "shape": [8]},
                 "descriptors": {"local_scaling": {}}, "output": "out/x"}


def test_every_readme_spec_passes_the_schema():
    """The README's and docs' other specs (the Stable Diffusion recipe, guidance and prompt sections,
    fisher specs and families, your own models) name keys that exist: job specs through the job schema, `latents`-only
    fragments inside a minimal job spec, fisher specs through the fisher validator and a bare
    `family` through the family builder."""
    import yaml

    from geomjobs.fisher.families import build_family
    from geomjobs.fisher.job import validate_fisher_spec
    from geomjobs.spec import validate_spec

    docs = [d for block in readme_blocks("yaml", DOC_PAGES) for d in yaml.safe_load_all(block)]
    kinds = []
    for doc in docs:
        if set(doc) == {"family"}:
            build_family(doc["family"])
            kinds.append("family")
        elif "family" in doc:
            validate_fisher_spec(doc)
            kinds.append("fisher")
        elif set(doc) <= {"latents", "model"}:
            validate_spec({**FRAGMENT_BASE, **doc})
            kinds.append("fragment")
        else:
            validate_spec(doc)
            kinds.append("job")
    assert kinds.count("job") >= 2 and {"family", "fisher", "fragment"} <= set(kinds), kinds


def box_rows(text: str) -> list[list[str]]:
    """The data rows of the tables DuckDB prints (box drawing), as cells; header and type rows left out."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("\u2502")[1:-1]]
        if cells and re.fullmatch(r"-?\d+", cells[0]):
            rows.append(cells)
    return rows


def test_readme_quick_start_runs(tmp_path):
    out = tmp_path / "out" / "quickstart"
    r = subprocess.run([sys.executable, "-m", "geomjobs.cli", "run", str(ROOT / "examples" / "quickstart.yaml"),
                        "--out", str(out), "-q"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "geomjobs.cli", "inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert "rows           2000 of 2000 samples" in r.stdout
    code = readme_blocks("python")[0].replace("out/quickstart", str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    # the README's query printed what pandas computes from the same files: per delta, the ok rows and their mean psi
    df = pd.read_parquet(out)
    ref = df[df.status == "ok"].groupby("local_complexity").agg(n=("sample_id", "size"), mean_psi=("local_scaling", "mean"))
    got = box_rows(r.stdout)
    assert [int(c[0]) for c in got] == ref.index.tolist() and len(got) > 1
    assert [int(c[1]) for c in got] == ref.n.tolist() and sum(int(c[1]) for c in got) == 2000
    np.testing.assert_allclose([float(c[2]) for c in got], ref.mean_psi, rtol=1e-12)   # float64 sums in another order
    assert re.search(r"count\s+2000\.0+\s+2000\.0+\s+2000\.0+", r.stdout)        # describe() of the three columns


def test_reduced_demo_writes_what_it_says(tmp_path, monkeypatch):
    from geomjobs.demo import heatmap

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "geomjobs.demo", "--out", str(out), "--resolution", "12", "--quiet"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "144/144 rows, 0 errors" in r.stdout and "DuckDB" in r.stdout
    check_png(tmp_path / "demo.png")
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
    # the heatmap draws the dataset: each panel's image is its column on the 12 x 12 grid (x_1 across), the
    # colour bars name their quantity
    saved = record_figures(monkeypatch)
    heatmap(df, str(tmp_path / "again.png"), "title")
    fig = figure_saved_as(saved, "again.png")
    assert_figure_draws_data(fig, "demo heatmap")
    panels = panel_data(fig)
    assert len(panels) == 3
    for (_, arrays), col in zip(panels, ["local_scaling", "local_rank", "local_complexity"]):
        np.testing.assert_array_equal(arrays[0], np.asarray(df[col], float).reshape(12, 12).T.ravel())
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3 and all(ax.get_ylabel() for ax in bars), [ax.get_ylabel() for ax in bars]
    # a rerun resumes: nothing is recomputed
    r = subprocess.run([sys.executable, "-m", "geomjobs.demo", "--out", str(out), "--resolution", "12", "--quiet"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "(0 computed" in r.stdout


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_digits_example_orders_decoded_samples_by_psi(tmp_path, monkeypatch):
    """examples/generated_digits.py as a user runs it: a sampled job, its PNG grid and query. The grid
    (redrawn here from the same records) holds the decoded digits in increasing psi, each titled
    with its psi; the printed quartile table is pandas' on the same rows."""
    from geomjobs.generators import build_generator

    out = tmp_path / "gd"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "generated_digits.py"), "--count", "16", "--steps", "5",
                        "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_png(tmp_path / "gd.png")
    df = pd.read_parquet(out)
    assert len(df) == 16 and (df.status == "ok").all() and df.z.map(len).eq(8).all()
    # the query: ntile(4) over psi -> 4 rows of 4 samples, mean psi (2 decimals) as pandas has it
    ranked = df.sort_values(["local_scaling", "sample_id"]).reset_index(drop=True)
    ref = ranked.groupby(ranked.index // 4).local_scaling.mean()
    got = box_rows(r.stdout)
    assert "psi_quartile" in r.stdout and [c[0] for c in got] == ["1", "2", "3", "4"] and all(c[1] == "4" for c in got)
    np.testing.assert_allclose([float(c[2]) for c in got], ref.to_numpy(), atol=0.005 + 1e-9)
    # the grid: tile k is the k-th lowest psi's decoded z, titled with that psi
    saved = record_figures(monkeypatch)
    load_example("generated_digits").grid_png(df, tmp_path / "again.png")
    fig = figure_saved_as(saved, "again.png")
    assert_figure_draws_data(fig, "generated digits grid")
    tiles = [(ax, arrays) for ax, arrays in panel_data(fig) if arrays]
    assert len(tiles) == 16
    order = df.sort_values("local_scaling")
    assert [ax.get_title() for ax, _ in tiles] == [f"{v:.1f}" for v in order.local_scaling]
    assert np.all(np.diff(order.local_scaling.to_numpy()) >= 0)
    dec = build_generator({"kind": "zoo", "name": "vae-digits"})
    want = np.asarray(jax.vmap(lambda v: dec.apply(dec.params, v))(np.stack(order.z.to_numpy()).astype(np.float32)))
    np.testing.assert_allclose(np.stack([a[0] for _, a in tiles]), want.reshape(16, 64), rtol=1e-5, atol=1e-6)
    assert "above each digit" in fig.get_suptitle()
