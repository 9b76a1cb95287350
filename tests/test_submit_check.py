"""`geomjobs submit` checks, before submitting, that the cluster's job entrypoints can import
geomjobs and its dependencies (issue 13, item 7), on real Ray heads on 127.0.0.1.

The failing head is started as a new user would start it: with the project's own
``.venv/bin/ray start --head`` but a PATH whose first ``python`` is not the venv's. Here that
``python`` is the system Python (/usr/bin/python3) where it lacks pyarrow; where it has
pyarrow, a ``python`` that runs the venv's interpreter with ``-S`` (no site-packages: pyarrow,
jax, ray cannot be imported) stands in for it, the same condition built another way."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import ray_cluster
from jobs import assert_each_sample_once, mlp_spec, read_sorted, write_mlp
from ray_cluster import RayCluster, cli, shared_cluster, write_spec

SYSTEM_PYTHON = "/usr/bin/python3"


def foreign_python(bin_dir: Path) -> tuple[Path, str]:
    """A ``python`` in ``bin_dir`` that cannot import pyarrow; returns it and what it is."""
    python = bin_dir / "python"
    lacks = subprocess.run([SYSTEM_PYTHON, "-c", "import pyarrow"], capture_output=True).returncode != 0 \
        if os.path.exists(SYSTEM_PYTHON) else False
    if lacks:
        python.symlink_to(SYSTEM_PYTHON)
        return python, "the system python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    return python, "the venv's python without site-packages"


def listed_jobs(head: RayCluster) -> list[dict]:
    """The head's jobs, read over HTTP (no Ray client in this process: its token cache must keep
    the shared cluster's token for the other tests)."""
    req = urllib.request.Request(head.dashboard + "/api/jobs/",
                                 headers={"Authorization": f"Bearer {head.token_path.read_text()}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def head_with_foreign_python(tmp_path_factory):
    """``.venv/bin/ray start --head`` with a PATH whose first ``python`` lacks pyarrow."""
    bin_dir = tmp_path_factory.mktemp("foreign-bin")
    python, what = foreign_python(bin_dir)
    (bin_dir / "ray").symlink_to(ray_cluster.BIN / "ray")       # the project's own ray (its shebang: the venv)
    assert subprocess.run([str(python), "-c", "import pyarrow"], capture_output=True).returncode != 0
    saved = ray_cluster.BIN
    ray_cluster.BIN = bin_dir     # RayCluster runs BIN/ray and puts BIN first on the head's PATH
    try:
        head = RayCluster()
    finally:
        ray_cluster.BIN = saved
    yield head, python, what
    head.stop()


def test_submit_refuses_a_cluster_whose_python_lacks_the_dependencies(head_with_foreign_python, tmp_path):
    head, python, what = head_with_foreign_python
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=16, shard_size=8)
    spec["output"] = str(tmp_path / "out")
    path = write_spec(tmp_path, spec)
    p = cli("submit", path, "--address", head.dashboard, env=head.client_env, timeout=240)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2, f"{what}: {p.stdout}{p.stderr}"
    assert len(errors) == 1, p.stderr
    msg = errors[0]
    assert head.dashboard in msg and str(python) in msg                     # which cluster, which python
    assert "No module named 'pyarrow'" in msg and "Nothing was submitted" in msg   # why, and that nothing ran
    assert "ray start --head" in msg                                         # what to do
    assert p.stdout.strip() == ""                                            # no job id printed
    jobs = listed_jobs(head)
    assert all(j["submission_id"].startswith("geomjobs-check-") for j in jobs), jobs   # only the check ran there
    assert not (tmp_path / "out").exists()


@pytest.mark.slow   # ~30 s (a second head); a submitted job passing the check also runs in test_ray.py
def test_the_check_passes_on_a_head_started_from_the_venv_and_the_job_runs(tmp_path):
    head = shared_cluster()
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=24, shard_size=8)
    spec["output"] = str(tmp_path / "out")
    path = write_spec(tmp_path, spec)
    sub = cli("submit", path, "--address", head.dashboard, env=head.client_env, check=True, timeout=240)
    job_id = sub.stdout.strip().splitlines()[-1]
    st = cli("status", job_id, "--address", head.dashboard, "--wait", "--timeout", "240", env=head.client_env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout, st.stdout + st.stderr
    assert_each_sample_once(read_sorted(tmp_path / "out"), 24)
    from geomjobs import jobs_api

    assert "pyarrow.parquet" in jobs_api.CHECK_IMPORTS and "geomjobs.runner.ray_driver" in jobs_api.CHECK_IMPORTS
