"""diffusers-format PyTorch checkpoints (config.json + diffusion_pytorch_model.safetensors) read
without torch, for diffusers-vae-decoder, the diffusers-vae encoder and diffusers-unet
(geomjobs/generators/diffusers/pytorch_weights.py). Nothing is downloaded and torch is not
installed: the PyTorch folders are written from the tiny random-weight Flax models of
tests/diffusers_tiny.py by ``write_pytorch_folder``.

What each check rests on:

- **the key names and layouts a PyTorch checkpoint has** (test_keys_and_layouts_are_diffusers_own_conversion):
  every tensor the writer writes, passed through diffusers' own PyTorch -> Flax rules
  (``rename_key`` and ``rename_key_and_reshape_tensor``, what ``from_pretrained(from_pt=True)``
  runs), lands on the Flax param it came from, bit for bit, and every Flax param is reached once.
  This rests on diffusers' rules; the rules alone cannot tell ``linear_1`` (an attribute) from
  ``resnets_1`` (a ModuleList index), so
- **the PyTorch module source** (test_keys_and_config_match_the_pytorch_module_source), read with
  ``ast`` (torch cannot be imported): every component of every written key is an attribute the
  PyTorch modules assign (``self.<name> = ...``), every index follows a ``nn.ModuleList`` /
  ``nn.Sequential`` attribute, the map's list names are exactly such attributes, and the names it
  keeps with a ``_<digit>`` suffix are attributes; the written config.json has exactly the keys of
  the PyTorch class's ``__init__``, and the PyTorch-only keys' defaults (which the Flax classes
  compute) are the ``__init__`` defaults. That the PyTorch modules hold no parameter beyond these
  (e.g. no bias on the UNet's to_q) rests on diffusers' Flax classes being ports of them: without
  torch we cannot instantiate one. The layouts ((out, in, kh, kw) conv, (out, in) Linear) rest on
  diffusers' rules above.
- **the loader** (round trips, jobs): write -> read is exact in float32 and equal to the dtype's
  round-to-nearest-even in float16 / bfloat16 (also checked against the rounding bound), through
  safetensors' NumPy bf16 and through the raw-bytes fallback. Against the Flax-msgpack folder
  holding the same weights (loaded by diffusers' real ``from_pretrained``): a job on the PyTorch
  folder writes the same psi / nu records, bitwise (the VAE in the default run, the UNet in
  ``make test-slow``); both folders build equal Flax modules (every dataclass field) with bitwise
  equal params, and G(z) on 3 latents is bitwise equal (VAE and UNet); so are the bf16 params
  and the diffusers-vae encoder's latents.
- **bad input**: each refused before any work, naming the key, the file and the tensor.
"""
import ast
import importlib.util
import json
import os
import shutil
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file, save_file

from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.generators.diffusers import pytorch_weights as ptw  # noqa: E402
from geomjobs.generators.diffusers import pytorch_write as ptw_write  # noqa: E402
from geomjobs.generators.diffusers import write_pytorch_folder  # noqa: E402
from geomjobs.generators.diffusers.folders import load_pretrained, model_folder  # noqa: E402

from diffusers_tiny import quiet, write_pipeline  # noqa: E402

VAE = "diffusers-vae-decoder"
W = ptw.PT_WEIGHTS
UNET = "diffusers-unet"
DIFFUSERS = Path(importlib.util.find_spec("diffusers").origin).parent
PT_SOURCES = ["models/unets/unet_2d_condition.py", "models/unets/unet_2d_blocks.py", "models/resnet.py", "models/attention.py",
              "models/attention_processor.py", "models/transformers/transformer_2d.py", "models/embeddings.py",
              "models/activations.py", "models/downsampling.py", "models/upsampling.py", "models/autoencoders/vae.py",
              "models/autoencoders/autoencoder_kl.py"]
PT_CLASSES = {"UNet2DConditionModel": "models/unets/unet_2d_condition.py", "AutoencoderKL": "models/autoencoders/autoencoder_kl.py"}


def flat(tree):
    from flax.traverse_util import flatten_dict
    return flatten_dict(ptw._plain(tree))


def write_pt_pipeline(root: Path, flax: dict, dtype="float32") -> Path:
    """The Flax pipeline's weights as a PyTorch pipeline folder (same scheduler and prompts)."""
    for name in ("vae", "unet"):
        m, p = flax[name]
        write_pytorch_folder(p, m.config, root / name, dtype)
    shutil.copytree(flax["root"] / "scheduler", root / "scheduler")
    shutil.copy(flax["root"] / "prompts.npz", root / "prompts.npz")
    return root


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(Flax pipeline, PyTorch pipeline) with the same weights."""
    quiet()
    base = tmp_path_factory.mktemp("pipes")
    flax = write_pipeline(base / "flax")
    return flax, write_pt_pipeline(base / "pt", flax)


def load(folder: Path, dtype=jnp.float32, name="vae"):
    """(module, params) through the generators' own loader (model_folder + load_pretrained)."""
    cls = diffusers.FlaxAutoencoderKL if name == "vae" else diffusers.FlaxUNet2DConditionModel
    module, params, _ = load_pretrained(cls, model_folder({"path": str(folder.parent), "subfolder": folder.name}, "x", name), dtype)
    return module, params


def vae_spec(root, **kw):
    return {"kind": VAE, "path": str(root), "subfolder": "vae", **kw}


def unet_spec(root, **kw):
    return {"kind": UNET, "path": str(root), "subfolder": "unet", "timestep": 400,
            "prompt_embeddings": str(Path(root) / "prompts.npz"), **kw}


# ------------------------------------------------------------------------------------------------
# (a) the key map is diffusers' own, and the PyTorch modules' source agrees
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vae", "unet"])
def test_keys_and_layouts_are_diffusers_own_conversion(pipes, name):
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    flax, pt = pipes
    module, params = flax[name]
    shapes = flat(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)))
    state = load_file(pt / name / ptw.PT_WEIGHTS)
    ref = flat(params)
    reached = set()
    for k, t in state.items():
        fk, ft = rename_key_and_reshape_tensor(tuple(rename_key(k).split(".")), t, shapes)
        assert fk in shapes and fk not in reached, (k, fk)
        reached.add(fk)
        assert ft.shape == shapes[fk].shape and ft.dtype == np.float32, k
        np.testing.assert_array_equal(ft, ref[fk], err_msg=k)
    assert reached == set(shapes)
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in state or name == "unet"
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight" in state or name == "vae"


def pytorch_source():
    """(attributes assigned as self.<name> = ..., those assigned an nn.ModuleList / nn.Sequential)
    in diffusers' PyTorch module files, and the __init__ (args, defaults) of the two classes."""
    attrs, lists, inits = set(), set(), {}
    for rel in PT_SOURCES:
        tree = ast.parse((DIFFUSERS / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in PT_CLASSES and PT_CLASSES[node.name] == rel:
                init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
                a = init.args
                defaults = [None] * (len(a.args) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
                inits[node.name] = {arg.arg: d for arg, d in zip(a.args[1:], defaults[1:])}
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        attrs.add(t.attr)
                        if isinstance(node.value, ast.Call) and ast.unparse(node.value.func).split(".")[-1] in ("ModuleList", "Sequential"):
                            lists.add(t.attr)
    return attrs, lists, inits


def test_keys_and_config_match_the_pytorch_module_source(pipes):
    _, pt = pipes
    attrs, lists, inits = pytorch_source()
    assert {"down_blocks", "to_out", "net", "resnets"} <= lists and "linear_1" in attrs   # the walk works
    assert ptw.LIST_ATTRS <= lists, ptw.LIST_ATTRS - lists
    for name, cls in (("vae", "AutoencoderKL"), ("unet", "UNet2DConditionModel")):
        keys = list(load_file(pt / name / ptw.PT_WEIGHTS))
        for k in keys:
            parts = k.split(".")
            assert parts[-1] in ("weight", "bias"), k
            for i, c in enumerate(parts[:-1]):
                if c.isdigit():
                    assert parts[i - 1] in lists, (k, parts[i - 1])
                else:
                    assert c in attrs, (k, c)
        # names the map keeps with an _<digit> suffix are attributes, not list entries
        kept = {c for k in keys for c in k.split(".") if c[-1:].isdigit() and not c.isdigit()}
        assert kept and kept <= attrs, kept - attrs
        cfg = json.loads((pt / name / "config.json").read_text())
        assert cfg["_class_name"] == cls
        assert set(cfg) - {"_class_name", "_diffusers_version"} == set(inits[cls]), set(cfg) ^ set(inits[cls])
        assert {k: d for k, (d, _) in ptw.PT_ONLY[cls].items()} == {k: inits[cls][k] for k in ptw.PT_ONLY[cls]}
        assert not ptw.FLAX_ONLY & set(inits[cls])


# ------------------------------------------------------------------------------------------------
# (b) write -> read round trips
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_write_read_round_trips_to_the_dtypes_rounding(pipes, tmp_path, dtype, monkeypatch):
    flax, _ = pipes
    m, p = flax["vae"]
    write_pytorch_folder(p, m.config, tmp_path / "vae", dtype)
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    head, _ = ptw._header(str(tmp_path / "vae" / ptw.PT_WEIGHTS))
    assert head.pop("__metadata__") == {"format": "pt"} and {v["dtype"] for v in head.values()} == {code}
    _, q = load(tmp_path / "vae")
    ref, got = flat(p), flat(q)
    assert ref.keys() == got.keys()
    assert all(got[k].dtype == np.float32 for k in ref)
    a, b = (np.concatenate([t[k].ravel() for k in sorted(ref)]) for t in (ref, got))
    rounded = np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))      # XLA's round to nearest even
    np.testing.assert_array_equal(b, rounded)
    u = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype]     # unit roundoff
    assert np.all(np.abs(b - a) <= u * np.abs(a) + (2.0 ** -25 if dtype == "float16" else 0))   # + fp16's subnormal spacing / 2
    if dtype != "bfloat16":
        return
    # the raw-bytes path (a safetensors without NumPy bf16) reads the same numbers
    real = safetensors.safe_open

    class NoBf16:
        def __init__(self, *a, **kw):
            self.h = real(*a, **kw)

        def __enter__(self):
            self.inner = self.h.__enter__()
            return self

        def __exit__(self, *a):
            return self.h.__exit__(*a)

        def get_tensor(self, k):
            raise TypeError("data type 'bfloat16' not understood")

    monkeypatch.setattr(safetensors, "safe_open", NoBf16)
    _, raw = load(tmp_path / "vae")
    jax.tree_util.tree_map(np.testing.assert_array_equal, raw, q)
    monkeypatch.undo()
    # bf16 into a bfloat16 job is exact, into float64 too; and the hand-written format reads the same
    _, q16 = load(tmp_path / "vae", jnp.bfloat16)
    assert all(np.array_equal(np.asarray(a, np.float32), got[k]) and a.dtype == jnp.bfloat16 for k, a in flat(q16).items())
    _, q64 = load(tmp_path / "vae", jnp.float64)
    assert all(np.array_equal(a, got[k]) and a.dtype == np.float64 for k, a in flat(q64).items())
    tensors = load_file(tmp_path / "vae" / ptw.PT_WEIGHTS)
    ptw_write.write_safetensors_raw(tensors, str(tmp_path / "raw.safetensors"), {"format": "pt"})
    back = load_file(tmp_path / "raw.safetensors")
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k].view(np.uint16), tensors[k].view(np.uint16)) for k in back)


def test_deprecated_attention_names_sharded_and_variant_files_load(pipes, tmp_path):
    """Old VAE checkpoints name the attention query/key/value/proj_attn (diffusers' PyTorch loader
    renames them); big checkpoints are sharded with an index; a folder may hold only an fp16 variant."""
    flax, pt = pipes
    ref = flat(flax["vae"][1])
    state = load_file(pt / "vae" / ptw.PT_WEIGHTS)
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.").replace("to_out.0.", "proj_attn."): v
           for k, v in state.items()}
    assert "encoder.mid_block.attentions.0.query.weight" in old
    for case in ("old", "shards", "variant"):
        d = tmp_path / case / "vae"
        d.mkdir(parents=True)
        shutil.copy(pt / "vae" / "config.json", d)
        if case == "old":
            save_file(old, d / ptw.PT_WEIGHTS)
        elif case == "shards":
            names = sorted(state)
            parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:50],
                     "diffusion_pytorch_model-00002-of-00002.safetensors": names[50:]}
            for f, ks in parts.items():
                save_file({k: state[k] for k in ks}, d / f)
            (d / ptw.PT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
        else:
            save_file(state, d / "diffusion_pytorch_model.fp16.safetensors")
        _, q = load(d)
        got = flat(q)
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), case


# ------------------------------------------------------------------------------------------------
# (c) jobs on the PyTorch folder equal jobs on the Flax folder
# ------------------------------------------------------------------------------------------------

def run_records(spec, out):
    import pandas as pd

    from geomjobs import run_job
    res = run_job(spec, str(out))
    assert res.ok, res
    return pd.read_parquet(out).sort_values("sample_id").reset_index(drop=True)


@pytest.mark.slow   # ~60 s (VAE), ~70 s (UNet); the default run checks G(z) and the params bitwise, which decide these records
@pytest.mark.parametrize("kind", [VAE, UNET])
def test_a_job_on_the_pytorch_folder_equals_the_job_on_the_flax_folder(pipes, tmp_path, kind):
    """The psi / nu records of one job run on each folder: bitwise equal. (~30 s for the VAE; the
    UNet's ~60 s runs in make test-slow, its G(z) in the default run below.)"""
    flax, pt = pipes
    make = vae_spec if kind == VAE else unet_spec
    records = {}
    for name, root in (("flax", flax["root"]), ("pt", pt)):
        spec = {"model": make(root, model_id="m"), "latents": {"kind": "gaussian", "count": 3, "shape": [4, 4, 4], "seed": 2},
                "descriptors": {"local_scaling": {"mode": "projection", "k": 6, "chunk": 4}, "local_rank": {}},
                "execution": {"shard_size": 3, "batch_size": 3}}
        records[name] = run_records(spec, tmp_path / name)
    for col in ("local_scaling", "local_rank"):
        np.testing.assert_array_equal(records["pt"][col], records["flax"][col])
    assert np.isfinite(records["pt"].local_scaling).all() and (records["pt"].status == "ok").all()


@pytest.mark.parametrize("name", ["vae", "unet"])
def test_g_of_z_on_the_pytorch_folder_equals_the_flax_folder(pipes, name):
    """The two folders give equal Flax modules (every dataclass field: the PyTorch config.json
    builds the module the Flax one does) and bitwise equal params, so the generators are the same
    function; G(z) on 3 latents, the Flax generator's jitted G on each folder's params, is bitwise
    equal too."""
    flax, pt = pipes
    ma, _ = load(flax["root"] / name, name=name)
    mb, _ = load(pt / name, name=name)
    assert ma == mb
    make = vae_spec if name == "vae" else unet_spec
    ga, gb = build_generator(make(flax["root"])), build_generator(make(pt))
    assert (ga.latent_shape, ga.output_shape) == (gb.latent_shape, gb.output_shape)
    jax.tree_util.tree_map(np.testing.assert_array_equal, gb.params, ga.params)
    g = jax.jit(jax.vmap(ga.apply, (None, 0)))
    z = jax.random.normal(jax.random.PRNGKey(5), (3, *ga.latent_shape), jnp.float32)
    out = g(gb.params, z)
    np.testing.assert_array_equal(out, g(ga.params, z))
    assert np.isfinite(out).all() and float(jnp.std(out)) > 0


def test_bfloat16_models_and_the_encoder_read_pytorch_folders_as_flax_ones(pipes, tmp_path):
    """model.dtype bfloat16 on the float32 PyTorch folder gives the params the Flax folder gives
    (both round to nearest even); the diffusers-vae encoder's latents are the same, bitwise."""
    from geomjobs.runner.plan import plan_job

    from diffusers_tiny import png_folder

    flax, pt = pipes
    a, b = build_generator(vae_spec(flax["root"], dtype="bfloat16")), build_generator(vae_spec(pt, dtype="bfloat16"))
    assert {x.dtype for x in jax.tree_util.tree_leaves(b.params)} == {jnp.dtype(jnp.bfloat16)}
    # the same params bit for bit (G(z) of the two folders is compared in float32 by the job test)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16)),
                           b.params, a.params)
    folder, _ = png_folder(tmp_path, n=3)
    lat = {}
    for name, root in (("flax", flax["root"]), ("pt", pt)):
        enc = {"kind": "diffusers-vae", "path": str(root), "subfolder": "vae"}
        plan = plan_job({"model": vae_spec(root), "latents": {"kind": "images", "source": "folder", "uri": str(folder), "encoder": enc},
                         "descriptors": {"local_scaling": {}}})
        lat[name] = plan.latents.latents(np.arange(3))
    np.testing.assert_array_equal(lat["pt"], lat["flax"])


def test_a_folder_with_both_formats_loads_the_flax_weights(pipes, tmp_path):
    flax, _ = pipes
    d = tmp_path / "both" / "vae"
    shutil.copytree(flax["root"] / "vae", d)
    (d / ptw.PT_WEIGHTS).write_bytes(b"not read")     # would be refused if it were read
    _, q = load(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, flat(q), flat(flax["vae"][1]))


def test_a_gs_folder_copies_only_the_weights_it_reads(pipes, tmp_path, monkeypatch):
    """On the GCS emulator: a PyTorch folder that also holds a .bin and an fp16 variant copies
    config.json and diffusion_pytorch_model.safetensors only; a folder with Flax weights too copies
    the Flax file only; a folder with only a .bin is refused before anything is copied."""
    from geomjobs.sink.fs import filesystem

    from ray_cluster import GcsEmulator, serving

    flax, pt = pipes
    monkeypatch.setenv("GEOMJOBS_CACHE_DIR", str(tmp_path / "cache"))
    with serving(GcsEmulator()) as em:
        base = f"gs://{em.bucket}/models"
        fs, root = filesystem(base)
        fs.put(str(pt / "vae" / "config.json"), f"{root}/pt/vae/config.json")
        fs.put(str(pt / "vae" / ptw.PT_WEIGHTS), f"{root}/pt/vae/{ptw.PT_WEIGHTS}")
        fs.pipe({f"{root}/pt/vae/diffusion_pytorch_model.bin": b"pickle", f"{root}/pt/vae/diffusion_pytorch_model.fp16.safetensors": b"x",
                 f"{root}/both/vae/{ptw.PT_WEIGHTS}": b"not read", f"{root}/bin/vae/diffusion_pytorch_model.bin": b"pickle",
                 f"{root}/bin/vae/config.json": (pt / "vae" / "config.json").read_bytes()})
        fs.put(str(flax["root"] / "vae" / "config.json"), f"{root}/both/vae/config.json")
        fs.put(str(flax["root"] / "vae" / ptw.FLAX_WEIGHTS), f"{root}/both/vae/{ptw.FLAX_WEIGHTS}")
        ref = build_generator(vae_spec(flax["root"]))
        for case, want in (("pt", {"config.json", W}), ("both", {"config.json", ptw.FLAX_WEIGHTS})):
            before = set(os.listdir(tmp_path / "cache")) if (tmp_path / "cache").exists() else set()
            gen = build_generator(vae_spec(f"{base}/{case}"))
            jax.tree_util.tree_map(np.testing.assert_array_equal, gen.params, ref.params)
            (new,) = set(os.listdir(tmp_path / "cache")) - before
            assert set(os.listdir(tmp_path / "cache" / new / "vae")) == want, case
        before = os.listdir(tmp_path / "cache")
        with pytest.raises(SpecError, match=r"model.subfolder'.*only PyTorch pickle weights \['diffusion_pytorch_model.bin'\]"):
            build_generator(vae_spec(f"{base}/bin"))
        assert os.listdir(tmp_path / "cache") == before     # refused from the listing: nothing copied


# ------------------------------------------------------------------------------------------------
# (d) bad input: exit 2 before any work, naming the key, the file and the tensor
# ------------------------------------------------------------------------------------------------

def mutate(pipes, tmp_path, name, state_fn=None, config_fn=None, files=None):
    """A copy of the PyTorch folder ``name`` (vae | unet) with its tensors / config changed; returns the pipeline root."""
    _, pt = pipes
    d = tmp_path / "bad" / name
    d.mkdir(parents=True)
    cfg = json.loads((pt / name / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config_fn(cfg) if config_fn else cfg))
    if files is not None:
        for f, data in files.items():
            (d / f).write_bytes(data)
    else:
        state = load_file(pt / name / ptw.PT_WEIGHTS)
        save_file(state_fn(state) if state_fn else state, d / ptw.PT_WEIGHTS)
    return tmp_path / "bad"


def drop(k):
    return lambda s: {n: v for n, v in s.items() if n != k}


def change(k, v):
    return lambda s: {**s, k: v}


BAD = [   # (model, folder change, spec change, message)
    ("vae", {"files": {}}, {},
     rf"has no weights: expected {W} \(diffusers' PyTorch format\) or {ptw.FLAX_WEIGHTS}; found \['config.json'\]"),
    ("vae", {"files": {"diffusion_pytorch_model.bin": b"x"}}, {},
     r"only PyTorch pickle weights \['diffusion_pytorch_model.bin'\].*need torch"),
    ("vae", {"files": {"diffusion_pytorch_model.fp16.safetensors": b"x", "diffusion_pytorch_model.ema.safetensors": b"x"}}, {},
     r"several weight variants.*fp16.*keep one"),
    ("vae", {"files": {W: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"}}, {}, rf"{W}' is not a readable safetensors file"),
    ("vae", {"state_fn": lambda s: {**s, "decoder.extra.weight": np.zeros(3, np.float32)}}, {},
     rf"{W}': tensor 'decoder.extra.weight' is not a parameter of the AutoencoderKL of config.json$"),
    ("vae", {"state_fn": drop("decoder.conv_out.bias")}, {}, rf"{W}' has no tensor 'decoder.conv_out.bias', which the AutoencoderKL"),
    ("vae", {"state_fn": lambda s: {**s, "decoder.conv_in.weight": s["decoder.conv_in.weight"].transpose(2, 3, 1, 0).copy()}}, {},
     rf"{W}': tensor 'decoder.conv_in.weight' has shape \[3, 3, 4, 16\]; the AutoencoderKL of config.json needs \[16, 4, 3, 3\]"),
    ("vae", {"config_fn": lambda c: {**c, "block_out_channels": [8, 24]}}, {},
     r"tensor 'decoder.conv_in.bias' has shape \[16\]; the AutoencoderKL of config.json needs \[24\]"),
    ("vae", {"state_fn": lambda s: {**s, "decoder.conv_in.bias": np.arange(16, dtype=np.int32)}}, {},
     rf"{W}': tensor 'decoder.conv_in.bias' is I32; the job holds parameters as floating point"),
    ("vae", {"state_fn": lambda s: {**s, "decoder.conv_in.bias": np.full(16, 1e300)}}, {},
     r"tensor 'decoder.conv_in.bias' \(F64\) has values up to 1e\+300, beyond the range of float32 \(model.dtype\)"),
    ("vae", {"state_fn": lambda s: {**s, "decoder.conv_in.bias": np.full(16, 1e300)}}, {"dtype": "bfloat16"},
     r"tensor 'decoder.conv_in.bias' \(F64\) has values up to 1e\+300, beyond the range of bfloat16"),
    ("vae", {"state_fn": lambda s: {**s, "post_quant_conv.bias": np.full(4, np.nan, np.float16)}}, {},
     r"tensor 'post_quant_conv.bias' holds non-finite values"),
    ("vae", {"config_fn": lambda c: {**c, "act_fn": "gelu"}}, {},
     r"config.json' sets act_fn: \"gelu\"; diffusers' Flax AutoencoderKL computes only"),
    ("vae", {"config_fn": lambda c: {**c, "use_post_quant_conv": False}}, {}, r"sets use_post_quant_conv: false"),
    ("unet", {"config_fn": lambda c: {**c, "norm_num_groups": 16}}, {}, r"sets norm_num_groups: 16; diffusers' Flax UNet2DConditionModel"),
    ("unet", {"config_fn": lambda c: {**c, "resnet_time_scale_shift": "scale_shift"}}, {}, r"sets resnet_time_scale_shift"),
    ("unet", {"config_fn": lambda c: {**c, "down_block_types": ["AttnDownBlock2D"]}}, {},
     r"config.json' has down_block_types\[0\]: \"AttnDownBlock2D\"; diffusers' Flax UNet2DConditionModel builds only CrossAttnDownBlock2D"),
    ("unet", {"config_fn": lambda c: {**c, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}}, {},
     r"config.json' does not give a UNet2DConditionModel: ValueError: Unexpected mid_block_type"),
    ("unet", {"state_fn": drop("time_embedding.linear_2.weight")}, {}, r"has no tensor 'time_embedding.linear_2.weight'"),
]


@pytest.mark.parametrize("model,folder,spec,msg", BAD)
def test_bad_checkpoints_name_the_file_and_the_tensor(pipes, tmp_path, model, folder, spec, msg):
    root = mutate(pipes, tmp_path, model, **folder)
    make = vae_spec if model == "vae" else unet_spec
    if model == "unet":
        shutil.copy(pipes[1] / "prompts.npz", root)
    with pytest.raises(SpecError) as e:
        build_generator(make(root, **spec))
    assert e.value.key == "model.subfolder" and __import__("re").search(msg, e.value.message), e.value


def test_float64_checkpoints_load_into_float64_jobs_exactly(pipes, tmp_path):
    """An F64 checkpoint whose values float32 cannot hold is refused for a float32 job (BAD above)
    and loads, exactly, into a float64 one."""
    big = np.linspace(-1e300, 1e300, 16)
    wide = lambda s: {**{k: v.astype(np.float64) for k, v in s.items()}, "decoder.conv_in.bias": big}  # noqa: E731
    root = mutate(pipes, tmp_path, "vae", state_fn=wide)
    _, q = load(root / "vae", jnp.float64)
    np.testing.assert_array_equal(q["decoder"]["conv_in"]["bias"], big)
    assert {a.dtype for a in jax.tree_util.tree_leaves(q)} == {np.dtype(np.float64)}


def test_a_unet_folder_given_as_a_vae_and_the_reverse_are_named(pipes, tmp_path):
    """With _class_name in config.json the folder is named at once; without it, by the first key
    the model does not have, with the model the weights look like."""
    _, pt = pipes
    with pytest.raises(SpecError, match=r"model.subfolder'.*is a UNet2DConditionModel folder; expected a folder of AutoencoderKL"):
        build_generator(vae_spec(pt, subfolder="unet"))
    with pytest.raises(SpecError, match=r"model.subfolder'.*is a AutoencoderKL folder; expected a folder of UNet2DConditionModel"):
        build_generator(unet_spec(pt, subfolder="vae"))
    for model, weights_of, first, looks in (("vae", "unet", "conv_in.bias", "UNet2DConditionModel"),
                                            ("unet", "vae", "decoder.conv_in.bias", "AutoencoderKL")):
        d = tmp_path / f"{model}-with-{weights_of}" / model
        d.mkdir(parents=True)
        cfg = json.loads((pt / model / "config.json").read_text())
        cfg.pop("_class_name")
        (d / "config.json").write_text(json.dumps(cfg))
        shutil.copy(pt / weights_of / W, d / W)
        shutil.copy(pt / "prompts.npz", d.parent)
        make = vae_spec if model == "vae" else unet_spec
        with pytest.raises(SpecError) as e:
            build_generator(make(d.parent))
        assert f"{W}': tensor '{first}' is not a parameter" in e.value.message and f"looks like a {looks}'s weights" in e.value.message


def test_the_encoder_and_the_command_line_name_the_key_and_exit_2(pipes, tmp_path, capsys):
    import yaml

    from geomjobs.cli import main
    from geomjobs.runner.plan import plan_job

    from diffusers_tiny import png_folder

    root = mutate(pipes, tmp_path, "vae", state_fn=drop("encoder.conv_in.weight"))
    folder, _ = png_folder(tmp_path, n=2)
    enc = {"kind": "diffusers-vae", "path": str(root), "subfolder": "vae"}
    job = {"model": vae_spec(pipes[1]), "latents": {"kind": "images", "source": "folder", "uri": str(folder), "encoder": enc},
           "descriptors": {"local_scaling": {}}}
    with pytest.raises(SpecError) as e:
        plan_job(job)
    assert e.value.key == "latents.encoder.subfolder" and "has no tensor 'encoder.conv_in.weight'" in e.value.message
    # a float64 job needs 64-bit JAX: without it, model.dtype float64 is refused (what the job cannot hold)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(SpecError, match=r"model.dtype'.*float64 needs 64-bit JAX"):
            build_generator(vae_spec(pipes[1], dtype="float64"))
    finally:
        jax.config.update("jax_enable_x64", True)
    spec = {"model": vae_spec(root), "latents": {"kind": "gaussian", "count": 2, "shape": [4, 4, 4]}, "descriptors": {"local_scaling": {}}}
    bad = mutate(pipes, tmp_path / "2", "vae", state_fn=drop("decoder.conv_out.bias"))
    spec["model"] = vae_spec(bad)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.subfolder" in err and f"{bad / 'vae' / W}' has no tensor 'decoder.conv_out.bias'" in err, err
    assert not (tmp_path / "out").exists()
