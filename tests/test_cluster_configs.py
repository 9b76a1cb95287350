"""cluster/: the launcher configs and KubeRay manifests parse, and what they name exists: geomjobs
verbs and flags (parsed by the real CLI parser), `ray start` flags (Ray's own CLI options),
spec files and paths in this repository, image and Ray versions of this project."""
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

import geomjobs
from geomjobs.cli import build_parser
from geomjobs.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = ["gcp-gpu.yaml", "gcp-tpu.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
# where configs put this repository on a node / in the image
REPO_MOUNTS = ("/opt/geomjobs/", "/home/ray/geomjobs/", "~/geomjobs/")
IMAGE = f"geomjobs:{geomjobs.__version__}"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def repo_path(p: str) -> Path:
    for mount in REPO_MOUNTS:
        if p.startswith(mount):
            return ROOT / p[len(mount):]
    return ROOT / p


def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {o for p in start.params for o in p.opts + p.secondary_opts}


def split_commands(cmd: str):
    """argv lists of the simple commands in a shell line (split at ; && || |, quotes respected),
    leading env assignments dropped."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    argv: list[str] = []
    for tok in [*lex, ";"]:
        if tok and set(tok) <= set(";&|"):
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                argv = argv[1:]
            if argv:
                yield argv
            argv = []
        else:
            argv.append(tok)


def check_geomjobs_argv(argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a valid geomjobs command: geomjobs {' '.join(argv)}")
    if args.command in ("run", "submit") and not args.spec.isupper():
        spec = repo_path(args.spec)
        assert spec.is_file(), f"spec {args.spec} does not exist in the repository"
        load_spec(spec)


def check_command(cmd: str) -> None:
    for argv in split_commands(cmd):
        prog = argv[0].rsplit("/", 1)[-1]
        if prog == "ray" and argv[1:2] == ["start"]:
            unknown = [a.split("=")[0] for a in argv[2:] if a.startswith("--") and a.split("=")[0] not in ray_start_options()]
            assert not unknown, f"ray start has no options {unknown}: {cmd}"
        if prog == "geomjobs":
            check_geomjobs_argv(argv[1:])
        if argv[:3] == ["python", "-m", "geomjobs.cli"]:
            check_geomjobs_argv(argv[3:])


def doc_command_lines(text: str):
    """Shell lines shown to users: in a README's code blocks, or in a config's comments indented
    as a command block (``#   command``)."""
    in_block = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        m = re.match(r"^\s*#\s{2,}(\S.*)$", line)
        s = line.strip() if in_block else (m.group(1) if m else "")
        s = re.sub(r"^export \w+=\S+\s*", "", s)
        s = re.sub(r"\s+#\s.*$", "", s).rstrip("&").strip()
        if re.match(r"^(geomjobs|ray|kubectl|docker) ", s):
            yield s


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_config_parses(name):
    docs = list(yaml.safe_load_all((CLUSTER / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_name_real_commands_paths_and_versions(name):
    cfg = load(name)
    assert cfg["provider"]["type"] == "gcp"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for key in ("cluster_name", "max_workers", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg
    for local in cfg.get("file_mounts", {}).values():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"file_mounts source {local} does not exist"
    commands = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                            "head_start_ray_commands", "worker_start_ray_commands") for c in cfg.get(k, [])]
    assert any("ray start --head" in c for c in commands)
    for c in commands:
        check_command(c)
        if "pip install" in c and "geomjobs" in c:   # installs this repository from where file_mounts put it
            assert any(m.rstrip("/") in c for m in cfg["file_mounts"]), c
    for c in doc_command_lines((CLUSTER / name).read_text()):
        check_command(c)
    image = cfg.get("docker", {}).get("image")
    if image:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py31"), image
    text = (CLUSTER / name).read_text()
    for pin in re.findall(r"ray\[default\]==([\d.]+)", text):
        assert pin == ray.__version__


def test_gpu_and_tpu_workers_match_the_example_specs():
    gpu, tpu = load("gcp-gpu.yaml"), load("gcp-tpu.yaml")
    gpu_node = gpu["available_node_types"]["gpu_worker"]
    assert gpu_node["resources"]["GPU"] >= 1 and gpu_node["node_config"]["guestAccelerators"]
    tpu_node = tpu["available_node_types"]["tpu_host"]
    assert tpu_node["node_config"]["acceleratorType"].startswith("v") and "runtimeVersion" in tpu_node["node_config"]
    gpu_spec = load_spec(CLUSTER / "jobs/gpu-quickstart.yaml")
    tpu_spec = load_spec(CLUSTER / "jobs/tpu-quickstart.yaml")
    assert gpu_spec["execution"]["resources"] == {"GPU": 1}
    # one worker per TPU host: a worker asks for all the chips of one host
    assert tpu_spec["execution"]["resources"]["TPU"] == tpu_node["resources"]["TPU"]
    for cfg in (gpu, tpu):   # the head runs the driver only
        assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("name", sorted(p.name for p in (CLUSTER / "jobs").glob("*.yaml")))
def test_every_example_job_spec_passes_the_schema(name):
    spec = load_spec(CLUSTER / "jobs" / name)
    assert spec["output"].startswith("gs://") and spec["execution"]["resources"]


def _containers(cluster_spec):
    pods = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_run_the_project_image_with_token_auth(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    for c in _containers(spec):
        assert c["image"].rsplit("/", 1)[-1] == IMAGE, c["image"]
    gpus = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpus, "a GPU worker group"
    for c in doc_command_lines((CLUSTER / name).read_text()):
        check_command(c)


def test_the_rayjob_runs_a_real_geomjobs_command_on_a_spec_in_the_image():
    job = load("kuberay-rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "geomjobs"
    check_geomjobs_argv(argv[1:])
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.address == "auto"   # a retry reruns it, which finishes the job
    assert args.spec.startswith("/opt/geomjobs/")   # where cluster/Dockerfile puts the repository


def test_the_dockerfile_builds_the_image_the_manifests_name():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=(\S+)", text).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py31")
    assert re.search(r"COPY .*\. /opt/geomjobs", text)
    assert f"-t {IMAGE} " in text
    assert (CLUSTER / "Dockerfile.dockerignore").exists()


def test_the_readme_names_real_files_and_commands():
    text = (CLUSTER / "README.md").read_text()
    for path in set(re.findall(r"cluster/[\w./-]*\w", text)):
        assert (ROOT / path).exists(), path
    for name in LAUNCHER + KUBERAY + ["Dockerfile"]:
        assert name in text
    lines = list(doc_command_lines(text))
    assert any(line.startswith("geomjobs submit") for line in lines)
    for c in lines:
        check_command(c)
    verbs = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"run", "submit", "status", "logs", "inspect"} <= set(verbs)
    for verb in re.findall(r"`geomjobs (\w+)", text):
        assert verb in verbs, verb
