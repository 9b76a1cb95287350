"""kind diffusers-vae-decoder (that G is the diffusers decode is checked in test_diffusers.py): a tiny random-weight FlaxAutoencoderKL saved with save_pretrained
and loaded through the real from_pretrained (nothing downloaded)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_descriptors import ref_psi_nu

from geomjobs import run_job
from geomjobs.generators import build_generator
from geomjobs.geometry import exact_singular_values, local_rank, local_scaling, orthonormal_rows
from geomjobs.geometry.complexity import trace_sites
from geomjobs.geometry.spectrum import projected_singular_values
from geomjobs.spec import SpecError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A pipeline-like folder with a tiny VAE in vae/: 4 x 4 x 4 latents -> 3 x 8 x 8 images."""
    root = tmp_path_factory.mktemp("pipe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = diffusers.FlaxAutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=8)
        params = vae.init_weights(jax.random.PRNGKey(0))
        vae.save_pretrained(root / "vae", params=params)
    return root, vae, params


def test_psi_and_nu_equal_the_dense_jacobian_reference(tiny_vae):
    root, _, _ = tiny_vae
    gen = build_generator({"kind": "diffusers-vae-decoder", "path": str(root), "subfolder": "vae"})
    g = gen.flat_fn()
    z = jax.random.normal(jax.random.PRNGKey(2), (gen.latent_dim,))
    a = np.asarray(jax.jacfwd(g)(z), np.float64)            # 192 x 64
    psi, nu, _ = ref_psi_nu(a)
    s = exact_singular_values(g, z)
    # float32 model: the dense Jacobian is the same matrix, SVDs agree to float32 rounding
    np.testing.assert_allclose(local_scaling(s, *a.shape), psi, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(local_rank(s, *a.shape), nu, rtol=1e-4)
    w = orthonormal_rows(8, gen.output_dim, seed=0, stream="W")
    sp = projected_singular_values(g, z, jnp.asarray(w, jnp.float32), chunk=3)
    np.testing.assert_allclose(sp, np.linalg.svd(w @ a, compute_uv=False), rtol=1e-4, atol=1e-5)


def test_complexity_finds_the_decoder_silu_sites(tiny_vae):
    root, _, _ = tiny_vae
    gen = build_generator({"kind": "diffusers-vae-decoder", "path": str(root), "subfolder": "vae"})
    sites = trace_sites(lambda z: gen.apply(gen.params, z), jnp.zeros(gen.latent_shape))
    silu = [s for s in sites if s.name == "silu"]
    # decoder: conv_in, 2 mid resnets + 2 up blocks x 2 resnets, each with 2 SiLUs, and norm_out
    assert len(silu) == 2 * (2 + 2 * 2) + 1
    # flax's GroupNorm clamps its variance with max(var, 0): seen as a zero-clamp site, one per
    # group, inside a norm scope; select layers: [silu] to leave them out (they cannot flip anyway)
    others = [s for s in sites if s.name != "silu"]
    assert all(s.name == "max" and "norm" in s.label for s in others)


def test_a_job_on_the_decoder_in_bfloat16(tiny_vae, tmp_path):
    root, _, _ = tiny_vae
    spec = {"model": {"kind": "diffusers-vae-decoder", "path": str(root), "subfolder": "vae", "dtype": "bfloat16"},
            "latents": {"kind": "gaussian", "count": 6, "shape": [4, 4, 4]},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 8}, "local_rank": {},
                            "local_complexity": {"directions": 2, "radius": 0.05}},
            "execution": {"shard_size": 3, "batch_size": 2}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    import pandas as pd
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 6 and df.local_scaling.notna().all() and (df.local_rank > 1).all()


def test_bad_folders_and_keys_name_the_key(tiny_vae, tmp_path):
    root, _, _ = tiny_vae
    with pytest.raises(SpecError, match=r"model.subfolder'.*does not exist"):
        build_generator({"kind": "diffusers-vae-decoder", "path": str(root), "subfolder": "vea"})
    with pytest.raises(SpecError, match=r"model.path'.*no config.json"):
        build_generator({"kind": "diffusers-vae-decoder", "path": str(root)})
    with pytest.raises(SpecError, match=r"model.path'.*does not exist"):
        build_generator({"kind": "diffusers-vae-decoder", "path": str(tmp_path / "none")})
    with pytest.raises(SpecError, match=r"model.dtype'"):
        build_generator({"kind": "diffusers-vae-decoder", "path": str(root), "subfolder": "vae", "dtype": "int8"})
