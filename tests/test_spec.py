"""Bad specs and bad files fail before any work, naming the key and what was expected."""
import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from geomjobs.errors import SpecError
from geomjobs.runner.plan import plan_job
from geomjobs.spec import load_spec, validate_spec

from jobs import mlp_spec, write_mlp


@pytest.mark.parametrize("mutate,key,expected", [
    (lambda s: s.pop("model"), "model", "is required"),
    (lambda s: s["model"].update(kind="gan"), "model.kind", "expected one of"),
    (lambda s: s["model"].pop("weights"), "model.weights", "is required for kind 'mlp'"),
    (lambda s: s["model"].update(activation="swishy"), "model.activation", "expected one of"),
    (lambda s: s["latents"].update(count=0), "latents.count", ">= 1"),
    (lambda s: s["latents"].update(count="ten"), "latents.count", "expected integer"),
    (lambda s: s["latents"].update(colour="red"), "latents.colour", "not a known key"),
    (lambda s: s["descriptors"].update(local_scaling={"mode": "fast"}), "descriptors.local_scaling.mode", "expected one of"),
    (lambda s: s["descriptors"].update(local_complexity={"radius": -1.0}), "descriptors.local_complexity.radius", "> 0"),
    (lambda s: s.update(execution={"shard_size": 0}), "execution.shard_size", ">= 1"),
    (lambda s: s["descriptors"].update(local_scaling={"mode": "projection", "chunk": "big"}),
     "descriptors.local_scaling.chunk", "expected a positive integer or 'auto', got 'big'"),
    (lambda s: s["descriptors"].update(local_scaling={"mode": "projection", "chunk": 0}),
     "descriptors.local_scaling.chunk", ">= 1"),
    (lambda s: s.update(descriptors={}), "descriptors", "expected at least one of ['local_complexity', 'local_rank', 'local_scaling']"),
])
def test_schema_errors_name_the_key(tmp_path, mutate, key, expected):
    spec = mlp_spec("w.npz")
    mutate(spec)
    with pytest.raises(SpecError) as e:
        validate_spec(spec)
    assert e.value.key == key
    assert expected in str(e.value) and f"'{key}'" in str(e.value)


def test_defaults_are_filled_and_model_sizes_checked(tmp_path):
    w = write_mlp(tmp_path)  # d = 6, n = 10
    plan = plan_job(mlp_spec(w, local_scaling={}, local_rank={}))
    assert plan.spec["descriptors"]["local_scaling"]["mode"] == "exact"
    assert plan.spec["execution"] == {"shard_size": 16, "batch_size": 8, "dtype": "float32", "max_retries": 3}
    assert plan.spec["job_id"].startswith("job-")
    with pytest.raises(SpecError, match=r"descriptors.local_scaling.k'.*k <= n = 10"):
        plan_job(mlp_spec(w, local_scaling={"mode": "projection", "k": 11}))
    with pytest.raises(SpecError, match=r"only applies to mode: lanczos or projection"):
        plan_job(mlp_spec(w, local_scaling={"mode": "exact", "k": 3}))
    bad_shape = mlp_spec(w)
    bad_shape["latents"]["shape"] = [5]
    with pytest.raises(SpecError, match=r"latents.shape'.*shape \[6\]"):
        plan_job(bad_shape)


def test_bad_weight_files_give_clear_errors(tmp_path):
    missing = mlp_spec(str(tmp_path / "nope.npz"))
    with pytest.raises(SpecError, match=r"model.weights'.*nope.npz' does not exist"):
        plan_job(missing)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(SpecError, match=r"junk.npz' is not a readable .npz"):
        plan_job(mlp_spec(str(junk)))
    np.savez(tmp_path / "gap.npz", W0=np.ones((6, 3)), b0=np.ones(3), W2=np.ones((3, 2)), b2=np.ones(2))
    with pytest.raises(SpecError, match="without gaps"):
        plan_job(mlp_spec(str(tmp_path / "gap.npz")))
    np.savez(tmp_path / "mismatch.npz", W0=np.ones((6, 3)), b0=np.ones(3), W1=np.ones((4, 2)), b1=np.ones(2))
    with pytest.raises(SpecError, match="W1 takes 4 inputs but layer 0 gives 3"):
        plan_job(mlp_spec(str(tmp_path / "mismatch.npz")))
    np.savez(tmp_path / "nobias.npz", W0=np.ones((6, 3)))
    with pytest.raises(SpecError, match="W0 has no bias b0"):
        plan_job(mlp_spec(str(tmp_path / "nobias.npz")))


def test_relative_paths_in_a_spec_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write_mlp(tmp_path / "sub", name="m.npz")
    spec = mlp_spec("m.npz")
    (tmp_path / "sub" / "job.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec(tmp_path / "sub" / "job.yaml")
    assert loaded["model"]["weights"] == str(tmp_path / "sub" / "m.npz")
    # an image encoder's model folder too; URIs stay as they are
    spec["latents"] = {"kind": "images", "source": "digits", "encoder": {"kind": "diffusers-vae", "path": "pipe"}}
    (tmp_path / "sub" / "enc.yaml").write_text(yaml.safe_dump(spec))
    assert load_spec(tmp_path / "sub" / "enc.yaml")["latents"]["encoder"]["path"] == str(tmp_path / "sub" / "pipe")
    spec["latents"]["encoder"]["path"] = "gs://b/pipe"
    (tmp_path / "sub" / "enc.yaml").write_text(yaml.safe_dump(spec))
    assert load_spec(tmp_path / "sub" / "enc.yaml")["latents"]["encoder"]["path"] == "gs://b/pipe"
    # a UNet's prompt embeddings, and the files of a sampling model under latents.model
    spec["model"] = {"kind": "diffusers-unet", "path": "pipe", "timestep": 10, "prompt_embeddings": "p.npz"}
    spec["latents"] = {"kind": "sampled", "model": {"kind": "mlp", "weights": "m.npz"},
                       "sampler": {"kind": "ddim", "steps": 2}, "count": 3}
    (tmp_path / "sub" / "gen.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec(tmp_path / "sub" / "gen.yaml")
    assert loaded["model"]["prompt_embeddings"] == str(tmp_path / "sub" / "p.npz")
    assert loaded["latents"]["model"]["weights"] == str(tmp_path / "sub" / "m.npz")
    # a guiding reward folder
    spec["latents"]["guidance"] = {"reward": "rw", "scale": 1.0}
    (tmp_path / "sub" / "guided.yaml").write_text(yaml.safe_dump(spec))
    assert load_spec(tmp_path / "sub" / "guided.yaml")["latents"]["guidance"]["reward"] == str(tmp_path / "sub" / "rw")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "geomjobs.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize("verb", ["status", "logs"])
def test_an_unreachable_jobs_api_is_one_line_naming_the_address_and_exit_2(tmp_path, verb):
    r = run_cli(verb, "raysubmit_0123456789abcdef", "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "http://127.0.0.1:1" in errors[0]   # Ray may log a warning line before it


def test_cli_bad_spec_exits_2_before_any_work(tmp_path):
    spec = mlp_spec(write_mlp(tmp_path))
    spec["latents"]["count"] = -3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli("run", "bad.yaml", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2
    assert "spec key 'latents.count'" in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    r = run_cli("run", "broken.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    r = run_cli("run", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_cli_run_then_inspect(tmp_path):
    spec = mlp_spec(write_mlp(tmp_path))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli("run", "job.yaml", "--out", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "40/40 rows in 3/3 shards" in r.stdout
    r = run_cli("inspect", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0
    assert "rows           40 of 40 samples (0 with status 'error')" in r.stdout
    assert "3 committed, 0 failed, 0 pending, of 3" in r.stdout and "record schema v2" in r.stdout
    # how the step ran, from the shards' markers: chunk auto on a CPU is one pass, sized by XLA
    # how the step ran, from the shards' markers (the engine's own line): chunk auto on a CPU is one pass
    assert re.search(r"^engine +local_scaling \(mode projection, all rows in one pass\) \+ local_rank, "
                     r"XLA memory plan [0-9.]+ GiB, 1 device\(s\): 3 shards$", r.stdout, re.M), r.stdout
    # piped into a reader that is gone before the first line (like head after its lines): exit 0, no traceback
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{sys.executable}' -m geomjobs.cli inspect '{tmp_path / 'out'}' | true"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # the same spec again: nothing left to compute, exit 0
    r = run_cli("run", "job.yaml", "--out", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stdout + r.stderr
    # a different job into the same folder: refused, naming what differs and what to do
    spec["latents"]["seed"] = 5
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli("run", "other.yaml", "--out", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert r.returncode == 2 and "holds a different job" in r.stderr and "latents.seed" in r.stderr, r.stderr


def test_chunk_auto_is_the_default_and_resolves_per_platform(tmp_path):
    """projection's chunk defaults to 'auto' (stored so, identical on every platform): one pass
    on a CPU, where XLA runs convolutions inside lax.map's while loop slowly, 32 rows at a time
    on an accelerator; an explicit chunk is kept; slq's 'auto' is its memory-bounded default."""
    from geomjobs.geometry.spectrum import default_chunk
    from geomjobs.runner.engine import Engine

    assert default_chunk("auto", 120, "cpu") is None and default_chunk(None, 120, "cpu") is None
    assert default_chunk("auto", 120, "gpu") == 32 and default_chunk("auto", 20, "tpu") == 20
    assert default_chunk(7, 120, "cpu") == 7 and default_chunk(7, 120, "gpu") == 7
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        default_chunk("big", 120, "gpu")
    w = write_mlp(tmp_path)  # d = 6, n = 10
    plan = plan_job(mlp_spec(w, local_scaling={"mode": "projection", "k": 8}))
    assert plan.spec["descriptors"]["local_scaling"]["chunk"] == "auto"
    assert Engine(plan).chunk is None    # the suite runs on the CPU (JAX_PLATFORMS=cpu)
    plan = plan_job(mlp_spec(w, local_scaling={"mode": "projection", "k": 8, "chunk": 3}))
    assert plan.spec["descriptors"]["local_scaling"]["chunk"] == 3 and Engine(plan).chunk == 3
    slq = plan_job(mlp_spec(w, local_scaling={"mode": "slq", "num_probes": 4, "steps": 3, "chunk": "auto"}))
    assert slq.spec["descriptors"]["local_scaling"]["chunk"] == 4


# spec_hash of these two specs by the release before model.guidance_scale became model.cfg_scale
# (geomjobs at e501131: spec_hash(validate_spec(spec)) with the key spelled guidance_scale): the
# hash stored jobs carry in job.json and every Parquet file, and the default job_id's suffix
UNET = {"kind": "diffusers-unet", "path": "/models/sd", "subfolder": "unet", "prompt_embeddings": "/models/prompts.npz",
        "prompt_index": 1, "negative_embedding_index": 0}
CFG_SPECS = {
    "81a926500cb65a2265a299dff09567a86756c5eaa43126121dcc7a3e82e0a321": lambda cfg: {
        "model": {"kind": "diffusers-vae-decoder", "path": "/models/sd", "subfolder": "vae"},
        "latents": {"kind": "sampled", "model": {**UNET, **cfg}, "count": 4, "seed": 0},
        "descriptors": {"local_scaling": {"mode": "projection", "k": 8}}},
    "a059d3af4b20f8f6137a12d6fdf490f7871cedb73ea1a3929463443e207edb79": lambda cfg: {
        "model": {**UNET, **cfg, "timestep": 400}, "latents": {"kind": "gaussian", "count": 2, "shape": [4, 8, 8]},
        "descriptors": {"local_rank": {}}},
}


def with_release_defaults(spec: dict) -> dict:
    """``spec`` with the descriptor defaults the release's validate_spec filled (they are filled
    by each descriptor's resolve now, at plan time, with the same values: the plans' hashes are
    unchanged, tests/test_descriptor_registry.py)."""
    spec = copy.deepcopy(spec)
    d = spec["descriptors"]
    if "local_rank" in d and "local_scaling" not in d:
        d["local_scaling"] = {}
    if "local_scaling" in d:
        d["local_scaling"] = {**d["local_scaling"], "seed": d["local_scaling"].get("seed", 0),
                              "save_singular_values": d["local_scaling"].get("save_singular_values", False)}
    return spec


@pytest.mark.parametrize("release_hash", sorted(CFG_SPECS))
def test_model_cfg_scale_keeps_the_hash_and_identity_of_jobs_stored_as_guidance_scale(release_hash):
    """model.guidance_scale is model.cfg_scale's old name: accepted with a one-line FutureWarning
    naming the new key, renamed in the resolved spec, and either spelling hashes as the release
    did; a spec the release stored (old name) has the identity of its rerun (resume compares it)."""
    from geomjobs.spec import identity, spec_hash

    make = CFG_SPECS[release_hash]
    with pytest.warns(FutureWarning, match=r"^spec key '(latents\.)?model\.guidance_scale' is deprecated: use "
                                           r"'(latents\.)?model\.cfg_scale'$"):
        old = validate_spec(make({"guidance_scale": 7.5}))
    new = validate_spec(make({"cfg_scale": 7.5}))
    assert old == new
    section = new["model"] if new["model"]["kind"] == "diffusers-unet" else new["latents"]["model"]
    assert section["cfg_scale"] == 7.5 and "guidance_scale" not in section
    new = with_release_defaults(new)                      # what the release stored
    assert spec_hash(new) == release_hash
    assert spec_hash(with_release_defaults(validate_spec(make({"cfg_scale": 2.0})))) != release_hash        # the value still counts
    # the release's resolved spec kept the old name; spec.yaml holds it as YAML
    stored = yaml.safe_load(yaml.safe_dump({**new, "output": "/elsewhere", "job_id": "job-" + release_hash[:12]}))
    held = stored["model"] if stored["model"]["kind"] == "diffusers-unet" else stored["latents"]["model"]
    held["guidance_scale"] = held.pop("cfg_scale")
    assert identity(stored) == identity(new) and spec_hash(stored) == release_hash


def test_model_cfg_scale_and_its_old_name_together_are_refused():
    with pytest.raises(SpecError) as e:
        validate_spec(CFG_SPECS[sorted(CFG_SPECS)[1]]({"cfg_scale": 2.0, "guidance_scale": 2.0}))
    assert e.value.key == "model.guidance_scale" and "give only 'model.cfg_scale'" in e.value.message
