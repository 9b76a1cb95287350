"""Submit a job to a Ray cluster through the Ray Jobs API, and follow it.

``geomjobs submit SPEC --address http://HOST:8265`` packs a runtime env with

* ``working_dir``: the spec (as ``spec.yaml``) and the local files it names (MLP weights,
  Parquet latents) under ``inputs/``; the spec's paths are rewritten to those copies, which
  ``load_spec`` resolves on the cluster against the spec's folder. Folders (e.g. a diffusers
  model) and remote URIs (gs://) are left as they are: the cluster must reach them itself.
* ``py_modules``: this geomjobs package (with its schemas and zoo files), so the cluster runs
  the client's geomjobs; its dependencies (jax, ray, gcsfs, ...) must be installed there (see
  ``cluster/``).

and submits ``python -m geomjobs.cli run spec.yaml --address auto``. Before that it plans the job
on this machine as ``geomjobs run`` would (:func:`check_locally`: the model and latents load, the
output does not hold another job), then checks the cluster (:func:`check_cluster`): a short job of its own runs
``python`` as the real entrypoint would (the first ``python`` on the head's PATH, with the same
package) and imports what a geomjobs job imports; if that fails, nothing is submitted and the
error (exit 2) names the interpreter, the failed import and the remedy.
The output should be a gs:// URI (or a path on storage every node shares): a local path is a
path on the cluster's machines. A relative local output is made absolute on the client, as
``geomjobs run`` would.

Clusters with token authentication (Ray's default from 2.52): the token is found through
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, as Ray's own clients do.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import yaml

from geomjobs.errors import SpecError
from geomjobs.spec import load_spec, path_places

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


@dataclasses.dataclass(frozen=True)
class Submitted:
    job_id: str | None     # None: the output already holds this job, complete (nothing submitted)
    output: str


def check_locally(spec: dict, output: str) -> bool:
    """Plan the job here as ``geomjobs run`` would (the model and latents load, every key is
    valid) and look at the output: True when it already holds this job complete; a SpecError or
    DatasetError (exit 2) when the spec is unusable or the output holds a different job."""
    from geomjobs.runner.job import check_output
    from geomjobs.runner.plan import plan_job

    return check_output(plan_job(spec), output)


def build_submission(spec_path: str, *, out: str | None = None, stage_dir: Path) -> dict:
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
    return {"entrypoint": " ".join(shlex.quote(a) for a in entry),
            "runtime_env": {"working_dir": str(workdir), "py_modules": [str(pkg)], "env_vars": worker_env()},
            "metadata": {"geomjobs_output": output, "geomjobs_spec": Path(spec_path).name,
                         "geomjobs_job_id": str(spec.get("job_id", ""))}}


def submit(spec_path: str, address: str | None = None, *, out: str | None = None, submission_id: str | None = None,
           check: bool | None = None, local_check: bool = True) -> Submitted:
    """Submit a job spec through the Ray Jobs API; returns the submission (job) id and output.

    First, unless ``local_check`` is False, the job is planned here (:func:`check_locally`): a spec
    that ``geomjobs run`` would refuse is refused before anything is sent, and an output that
    already holds this job complete submits nothing (``job_id`` None). Then (unless ``check`` is False, or None and
    ``GEOMJOBS_SUBMIT_CHECK=0``) the cluster is
    asked to run :data:`CHECK_ENTRYPOINT` with the job's runtime env (:func:`check_cluster`): a
    cluster whose job entrypoints cannot import geomjobs and its dependencies is refused with a
    SpecError (exit 2) saying what to do, before the job is submitted."""
    if check is None:
        check = os.environ.get("GEOMJOBS_SUBMIT_CHECK", "1") != "0"
    with tempfile.TemporaryDirectory(prefix="geomjobs-submit-") as tmp:
        sub = build_submission(spec_path, out=out, stage_dir=Path(tmp))
        output = sub["metadata"]["geomjobs_output"]
        if local_check and check_locally(load_spec(spec_path), output):
            return Submitted(None, output)
        jobs = client(address)
        if check:
            check_cluster(jobs, sub["runtime_env"], resolve_address(address))
        return Submitted(jobs.submit_job(submission_id=submission_id, **sub), output)


# What a submitted job's driver imports (its dependencies first, then the CLI's run path on Ray),
# run the way the job's entrypoint will be: ``python`` as the head's PATH has it, with the job's
# py_modules. Every import that fails is reported, on one line.
CHECK_IMPORTS = ("pyarrow.parquet", "numpy", "jax", "ray", "yaml", "jsonschema", "fsspec", "gcsfs", "tqdm",
                 "geomjobs.cli", "geomjobs.runner.ray_driver", "geomjobs.runner.local", "geomjobs.sink.dataset")
_CHECK_SCRIPT = f"""
import importlib, sys
bad = []
for name in {CHECK_IMPORTS!r}:
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{{name}} ({{type(e).__name__}}: {{e}})")
if bad:
    print("geomjobs-check: cannot import " + ", ".join(bad))
    sys.exit(1)
import geomjobs
print("geomjobs-check: ok", sys.executable, geomjobs.__version__)
"""
CHECK_ENTRYPOINT = ('echo "geomjobs-check: python is $(command -v python || echo missing)"; '
                    "python -c " + shlex.quote(_CHECK_SCRIPT))
CHECK_TIMEOUT_S = 300.0   # the first check on a cluster also uploads the package (py_modules) and sets it up


def check_cluster(jobs, runtime_env: dict, url: str, *, timeout: float = CHECK_TIMEOUT_S, poll: float = 0.5) -> str:
    """Run :data:`CHECK_ENTRYPOINT` on the cluster as a job of its own (same py_modules and env
    vars as the real job; the package upload is reused by the job) and wait for it. Returns the
    interpreter the cluster runs entrypoints with. Raises SpecError naming the interpreter, the
    import that failed and the remedy when it fails: nothing else is submitted."""
    import time
    import uuid

    env = {k: v for k, v in runtime_env.items() if k != "working_dir"}
    probe = f"geomjobs-check-{uuid.uuid4().hex[:12]}"
    jobs.submit_job(submission_id=probe, entrypoint=CHECK_ENTRYPOINT, runtime_env=env,
                    metadata={"geomjobs_check": "1"})
    t0 = time.time()
    try:
        while True:
            info = jobs.get_job_info(probe)
            state = str(getattr(info.status, "value", info.status))
            if state in TERMINAL:
                break
            if time.time() - t0 > timeout:
                raise SpecError("", f"--address: the check job {probe} on {url} did not finish in {timeout:.0f} s "
                                    f"(status {state}: {info.message}); see `geomjobs logs {probe}`, or set "
                                    "GEOMJOBS_SUBMIT_CHECK=0 to submit without the check")
            time.sleep(poll)
        text = jobs.get_job_logs(probe)
    finally:
        import contextlib

        with contextlib.suppress(Exception):
            jobs.delete_job(probe)
    python = next((line.split("python is", 1)[1].strip() for line in text.splitlines()
                   if line.startswith("geomjobs-check: python is")), "unknown")
    if state == "SUCCEEDED" and "geomjobs-check: ok" in text:
        return python
    cannot = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("geomjobs-check: cannot")]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("geomjobs-check:")]
    why = cannot[0] if cannot else lines[-1] if lines else (info.message or state)
    raise SpecError("", f"the Ray cluster at {url} cannot run geomjobs jobs: a job's entrypoint runs `python` "
                        f"from the head's PATH ({python}), and it fails: {why}. Ray runs job entrypoints with "
                        "whatever `python` is first on the PATH `ray start --head` had, not with the Python Ray "
                        "itself runs on. Start the head from the environment geomjobs is installed in (activate "
                        "it first, or `PATH=/path/to/venv/bin:$PATH ray start --head ...`), or install geomjobs' "
                        f"dependencies into {python} (see cluster/README.md). Nothing was submitted.")


def _known(call, job_id: str, address: str | None):
    """``call()`` against the Jobs API; an unknown job id is a SpecError naming it (exit 2)."""
    try:
        return call()
    except RuntimeError as e:   # Ray's SDK: "Request failed with status code 404: ... does not exist"
        if "status code 404" in str(e) or "does not exist" in str(e):
            raise SpecError("job_id", f"no job '{job_id}' on the Ray cluster at {resolve_address(address)}; "
                                      "give the id `geomjobs submit` printed") from None
        raise


def status(job_id: str, address: str | None = None) -> dict:
    """The job's Ray status and message, and its dataset's progress when readable from here."""
    jobs = client(address)
    info = _known(lambda: jobs.get_job_info(job_id), job_id, address)
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
    jobs = client(address)
    return _known(lambda: jobs.get_job_logs(job_id), job_id, address)


def follow_logs(job_id: str, address: str | None = None, write=print) -> None:
    import asyncio

    jobs = client(address)
    _known(lambda: jobs.get_job_info(job_id), job_id, address)

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk, end="")

    asyncio.run(tail())
