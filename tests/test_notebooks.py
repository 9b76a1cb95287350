"""The analysis notebooks (notebooks/*.py, jupytext py:percent) at their small defaults: each one
runs as a plain script into its own folder and writes PNGs that open as images; the cheapest one
also runs cell by cell through jupytext + nbclient on a real IPython kernel; the runner reports a
failing notebook with exit status 1. No xdist: kernels and ZMQ ports do not mix with it."""
import os
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from geomjobs.analysis import run_notebooks as rn

NOTEBOOKS = rn.notebook_paths()
KERNEL_NOTEBOOK = "06_corruptions"       # the cheapest at its defaults


def check_pngs(out_dir) -> list[Path]:
    pngs = sorted(Path(out_dir).glob("*.png"))
    assert pngs, f"no PNG written in {out_dir}"
    for p in pngs:
        assert p.stat().st_size > 0, p
        with Image.open(p) as im:
            im.verify()                     # a complete, valid PNG
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 50 and im.size[1] > 50, (p, im.size)
    return pngs


def test_the_notebooks_folder_holds_the_analyses():
    stems = {p.stem for p in NOTEBOOKS}
    assert {"01_toy_ddpm", "02_vae_digits", "06_corruptions", "07_reward_guidance"} <= stems, stems
    assert not list(rn.NOTEBOOKS_DIR.glob("*.ipynb")), "no .ipynb is committed: notebooks are py:percent sources"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_as_a_script_at_its_defaults(path, tmp_path):
    proc = rn.run_script(path, str(tmp_path), full=False, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_pngs(tmp_path)


def test_the_cheapest_notebook_runs_through_nbclient_on_a_kernel(tmp_path):
    path = next(p for p in NOTEBOOKS if p.stem == KERNEL_NOTEBOOK)
    # fewer images than its defaults (which the script test runs): the injected cell must win
    nb = rn.run_kernel(path, str(tmp_path), full=False, timeout=600, parameters={"n_images": 60})
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = tags.index(["parameters"])
    assert tags[at + 1] == ["injected-parameters"]
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "n_images=60" in printed and "60 held-out digits" in printed
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() and not c.source.startswith("# ruff")]
    assert all(c.get("execution_count") for c in code)
    assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    check_pngs(tmp_path)


def test_runner_runs_selected_notebooks_and_reports_failures(tmp_path, capsys):
    d = tmp_path / "nbs"
    d.mkdir()
    (d / "a_ok.py").write_text(textwrap.dedent('''
        # %% tags=["parameters"]
        # the environment the runner hands a notebook (what notebook_env reads), with no heavy imports
        import os
        import zlib, struct
        out_dir, full = os.environ["GEOMJOBS_NB_OUT"], os.environ["GEOMJOBS_NB_FULL"] == "1"
        # %%
        def png(w, h):   # a valid grey PNG written by hand
            chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
            raw = b"".join(b"\\x00" + bytes([(x * 4) % 256 for x in range(w)]) for _ in range(h))
            return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        with open(os.path.join(out_dir, "full.png" if full else "small.png"), "wb") as f:
            f.write(png(64, 64))
        print("finished")
    '''))
    (d / "b_fails.py").write_text("raise RuntimeError('broken notebook')\n")
    out = tmp_path / "out"
    assert rn.main(["--dir", str(d), "--out", str(out), "--full", "a"]) == 0
    assert [p.name for p in check_pngs(out / "a_ok")] == ["full.png"]
    assert "finished" in capsys.readouterr().out
    assert rn.main(["--dir", str(d), "--out", str(out), "b"]) == 1
    assert "broken notebook" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no notebook matches"):
        rn.main(["--dir", str(d), "--out", str(out), "zzz"])
    assert os.environ.get("GEOMJOBS_NB_FULL") in (None, "0")   # the runner sets it for the child only
    import nbformat

    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        rn.inject_parameters(nbformat.v4.new_notebook(), {"a": 1})
