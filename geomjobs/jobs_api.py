"""Submit a job to a Ray cluster through the Ray Jobs API, and follow it.

``geomjobs submit SPEC --address http://HOST:8265`` packs a runtime env with

* ``working_dir``: the spec (as ``spec.yaml``) and the local files it names (MLP weights,
  Parquet latents) under ``inputs/``; the spec's paths are rewritten to those copies, which
  ``load_spec`` resolves on the cluster against the spec's folder. Folders (e.g. a diffusers
  model) and remote URIs (gs://) are left as they are: the cluster must reach them itself.
* ``py_modules``: this geomjobs package (with its schemas and zoo files), so the cluster runs
  the client's geomjobs; its dependencies (jax, ray, gcsfs, ...) must be installed there (see
  ``cluster/``).

and submits ``python -m geomjobs.cli run spec.yaml --address auto [--out URI] [--resume]``.
The output should be a gs:// URI (or a path on storage every node shares): a local path is a
path on the cluster's machines. A relative local output is made absolute on the client, as
``geomjobs run`` would.

Clusters with token authentication (Ray's default from 2.52): the token is found through
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, as Ray's own clients do.
"""
from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path

import yaml

from geomjobs.spec import SpecError, load_spec, path_places

MAX_BUNDLED_BYTES = 100 * 1024 * 1024   # Ray's package limit is larger; beyond this use gs://
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: str | None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SpecError("", "no Ray cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    return address


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    from geomjobs.runner.ray_connect import enable_token_auth_if_available

    enable_token_auth_if_available()
    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except ConnectionError as e:   # Ray's dashboard SDK raises the builtin ConnectionError
        raise SpecError("", f"--address: cannot reach the Ray Jobs API at {url} ({e}); check the head's dashboard "
                                     "address (http://HOST:8265) and that the cluster is up") from None


def stage_package(dest: Path) -> Path:
    """A self-contained copy of the geomjobs package (schemas and zoo files included) for ``py_modules``."""
    import geomjobs

    pkg = dest / "geomjobs"
    shutil.copytree(Path(geomjobs.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return pkg


def bundle_spec(spec: dict, workdir: Path) -> dict:
    """Copy the local files a spec names into ``workdir/inputs`` and point the spec at them."""
    total = 0
    for label, holder, key in path_places(spec):
        value = holder.get(key)
        if not isinstance(value, str) or "://" in value or not Path(value).is_file():
            continue
        size = Path(value).stat().st_size
        if total + size > MAX_BUNDLED_BYTES:
            continue   # left as an absolute path: the cluster must see it
        total += size
        (workdir / "inputs").mkdir(exist_ok=True)
        name = f"{label.replace('.', '-')}-{Path(value).name}"
        shutil.copy2(value, workdir / "inputs" / name)
        holder[key] = f"inputs/{name}"
    return spec


def build_submission(spec_path: str, *, out: str | None = None, resume: bool = False, stage_dir: Path) -> dict:
    """Validate the spec (bad specs fail here, before anything is sent) and build the
    submission: entrypoint, runtime env, metadata."""
    spec = load_spec(spec_path)
    output = out or spec.get("output")
    if not output:
        raise SpecError("output", "no output location: set 'output' in the spec or pass --out")
    if "://" not in output and not Path(output).is_absolute():
        output = str(Path(output).resolve())
    workdir = stage_dir / "job"
    workdir.mkdir(parents=True)
    spec = bundle_spec(spec, workdir)
    spec["output"] = output
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    pkg = stage_package(stage_dir / "modules")
    from geomjobs.runner.ray_connect import worker_env

    entry = ["python", "-m", "geomjobs.cli", "run", "spec.yaml", "--address", "auto", "--quiet"]
    if resume:
        entry.append("--resume")
    return {"entrypoint": " ".join(shlex.quote(a) for a in entry),
            "runtime_env": {"working_dir": str(workdir), "py_modules": [str(pkg)], "env_vars": worker_env()},
            "metadata": {"geomjobs_output": output, "geomjobs_spec": Path(spec_path).name,
                         "geomjobs_job_id": str(spec.get("job_id", ""))}}


def submit(spec_path: str, address: str | None = None, *, out: str | None = None, resume: bool = False,
           submission_id: str | None = None) -> str:
    """Submit a job spec through the Ray Jobs API; returns the submission (job) id."""
    with tempfile.TemporaryDirectory(prefix="geomjobs-submit-") as tmp:
        sub = build_submission(spec_path, out=out, resume=resume, stage_dir=Path(tmp))
        return client(address).submit_job(submission_id=submission_id, **sub)


def status(job_id: str, address: str | None = None) -> dict:
    """The job's Ray status and message, and its dataset's progress when readable from here."""
    info = client(address).get_job_info(job_id)
    out = {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)), "message": info.message,
           "entrypoint": info.entrypoint, "output": (info.metadata or {}).get("geomjobs_output")}
    if out["output"]:
        out["progress"] = dataset_progress(out["output"])
    return out


def dataset_progress(uri: str) -> dict | None:
    """Committed and failed shards from the dataset's manifest (None if not readable here)."""
    try:
        from geomjobs.sink.dataset import Dataset

        ds = Dataset(uri)
        if not ds.exists():
            return None
        s = ds.summary()
        return {"shards": s.job["num_shards"], "committed": len(s.committed), "failed": len(s.failures),
                "rows": s.rows, "samples": s.job["count"]}
    except Exception:  # noqa: BLE001 - progress is best effort (output on storage we cannot see)
        return None


def wait(job_id: str, address: str | None = None, *, timeout: float | None = None, poll: float = 2.0) -> dict:
    import time

    t0 = time.time()
    while True:
        st = status(job_id, address)
        if st["status"] in TERMINAL or (timeout is not None and time.time() - t0 > timeout):
            return st
        time.sleep(poll)


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def follow_logs(job_id: str, address: str | None = None, write=print) -> None:
    import asyncio

    async def tail():
        async for chunk in client(address).tail_job_logs(job_id):
            write(chunk, end="")

    asyncio.run(tail())
