"""The command line a new user meets first: --version, help on every argument, one-line
errors (exit 2) for an output under a file and for submit's local checks, before any work."""
import argparse
import subprocess
import sys

import yaml

from geomjobs import __version__
from geomjobs.cli import build_parser
from geomjobs.runner.job import open_job
from geomjobs.runner.plan import plan_job

from jobs import mlp_spec, write_mlp


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "geomjobs.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def parsers(p: argparse.ArgumentParser, path=("geomjobs",)):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, child in a.choices.items():
                yield from parsers(child, (*path, name))


def test_version_and_help_on_every_argument(tmp_path):
    r = run_cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"geomjobs {__version__}"
    missing = [(" ".join(path), a.dest) for path, p in parsers(build_parser()) for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and a.help is None]
    assert missing == []
    verbs = {" ".join(path) for path, _ in parsers(build_parser())}
    assert {"geomjobs run", "geomjobs inspect", "geomjobs submit", "geomjobs status", "geomjobs logs", "geomjobs fisher",
            "geomjobs reward train", "geomjobs reward evaluate"} <= verbs


def test_an_output_under_a_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(mlp_spec(write_mlp(tmp_path))))
    (tmp_path / "results").write_text("a file, not a folder")
    r = run_cli("run", "job.yaml", "--out", str(tmp_path / "results" / "out"), "-q", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"'{tmp_path / 'results'}' is a file" in r.stderr


def test_submit_runs_the_local_checks_before_contacting_the_cluster(tmp_path):
    """Nothing listens at 127.0.0.1:1: each refusal below comes from the local check, before
    any cluster is contacted (else the error would name the address)."""
    spec = mlp_spec(write_mlp(tmp_path))
    spec["model"]["weights"] = str(tmp_path / "gone.npz")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli("submit", "bad.yaml", "--out", str(tmp_path / "out"), "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 2 and "model.weights" in r.stderr and "127.0.0.1:1" not in r.stderr, r.stderr

    good = mlp_spec(write_mlp(tmp_path))
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    other = {**good, "latents": {**good["latents"], "seed": 9}}
    open_job(plan_job(other), str(tmp_path / "taken"))          # the folder holds another job
    r = run_cli("submit", "good.yaml", "--out", str(tmp_path / "taken"), "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 2 and "holds a different job" in r.stderr and "latents.seed" in r.stderr, r.stderr

    assert run_cli("run", "good.yaml", "--out", str(tmp_path / "done"), "-q", cwd=tmp_path).returncode == 0
    r = run_cli("submit", "good.yaml", "--out", str(tmp_path / "done"), "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "" and "nothing submitted" in r.stderr, r.stderr
    # the local check can be skipped for paths only the cluster reads: then the cluster is contacted
    r = run_cli("submit", "bad.yaml", "--out", str(tmp_path / "out2"), "--address", "http://127.0.0.1:1",
                "--no-local-check", cwd=tmp_path)
    assert r.returncode == 2 and "127.0.0.1:1" in r.stderr, r.stderr
