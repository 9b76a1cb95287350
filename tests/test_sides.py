"""``mode: projection`` forms W A from either side of A (geometry/spectrum.py): k VJPs, or d JVPs
and one product with W. Both are the dense reference's W A up to float rounding, on an MLP and on
a convolutional decoder; the job picks the side from XLA's cost counts and says which it took."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from geomjobs import run_job
from geomjobs.generators.mlp import load_mlp_weights
from geomjobs.geometry.spectrum import SIDES, cheaper_side, projected_singular_values
from geomjobs.latents import build_latents
from geomjobs.sink.dataset import Dataset

from jobs import mlp_spec, read_sorted, write_mlp
from references import numpy_mlp_jacobian, psi_nu


class Decoder(nn.Module):
    """4 x 4 x 2 latent -> 3 x 8 x 8 image: a 3x3 conv, nearest upsampling, a 3x3 conv (d = 32, n = 192)."""

    @nn.compact
    def __call__(self, z):
        h = nn.silu(nn.Conv(16, (3, 3))(z.reshape(1, 4, 4, 2)))
        h = jax.image.resize(h, (1, 8, 8, 16), "nearest")
        return nn.Conv(3, (3, 3))(h).reshape(-1)


def models(dtype):
    rng = np.random.default_rng(0)
    w1, w2 = (jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype) for s in [(6, 40), (40, 50)])
    mlp = (lambda z: jnp.tanh(z @ w1) @ w2, 6, 50)
    dec = Decoder()
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), dec.init(jax.random.PRNGKey(0), jnp.zeros(32)))
    return {"mlp": mlp, "conv": (lambda z: dec.apply(params, z), 32, 192)}


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_both_sides_are_the_dense_reference(name):
    """float64 (x64 is on in the suite): each side's singular values equal the SVD of W times the
    dense Jacobian to 1e-10 of s_1 (both are exact up to a few hundred roundings of 1e-16)."""
    g, d, n = models(jnp.float64)[name]
    rng = np.random.default_rng(1)
    k = 40
    w = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    for i in range(3):
        z = jnp.asarray(rng.standard_normal(d))
        ref = np.linalg.svd(w @ np.asarray(jax.jacfwd(g)(z)), compute_uv=False)
        for side in SIDES:
            s = np.asarray(projected_singular_values(g, z, w, side=side))
            np.testing.assert_allclose(s, ref, rtol=0, atol=1e-10 * ref[0], err_msg=f"{side}, sample {i}")
        # chunked tangents (lax.map) give the same values as one vmapped pass
        np.testing.assert_allclose(projected_singular_values(g, z, w, side="jvp", chunk=5),
                                   projected_singular_values(g, z, w, side="jvp"), rtol=1e-13)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_in_float32_the_sides_agree_to_rounding(name):
    """float32: the two sides sum the same products in different orders. Each entry of W A then
    differs by at most ~ n eps |w_i| |a_j| (eps = 2^-24, |w_i| = 1), so every singular value by at
    most ||dM||_F <= n eps sqrt(k d) max_j |a_j|; psi = sum log s_i moves by sum |ds_i| / s_i."""
    g, d, n = models(jnp.float32)[name]
    rng = np.random.default_rng(2)
    k = 40
    w = np.linalg.qr(rng.standard_normal((n, k)))[0].T.astype(np.float32)
    for _ in range(3):
        z = jnp.asarray(rng.standard_normal(d), jnp.float32)
        a = np.asarray(jax.jacfwd(g)(z), np.float64)
        bound = n * 2.0**-24 * np.sqrt(k * d) * np.linalg.norm(a, axis=0).max()
        sv, sj = (np.asarray(projected_singular_values(g, z, w, side=s), np.float64) for s in SIDES)
        assert np.abs(sv - sj).max() <= bound, (np.abs(sv - sj).max(), bound)
        assert abs(np.log(sv).sum() - np.log(sj).sum()) <= (bound / sj).sum()


def test_the_cheaper_side_follows_the_shapes():
    g, d, n = models(jnp.float32)["mlp"]                   # d = 6 inputs, 50 outputs
    z = jnp.zeros(d, jnp.float32)
    squashed = lambda z: jnp.tanh(g(z))                    # noqa: E731 - nothing of the sweep is shared across a batch
    assert cheaper_side(squashed, z, 40) == "jvp"          # 6 JVPs + a 40 x 50 x 6 product < 40 VJPs
    assert cheaper_side(g, z, 40, batch=1) == "jvp"        # one sample: the same counts
    # a batch of 16: the last layer is linear, so W w2^T (40 x 50 x 40) is traced once per batch and
    # each sample's 40 VJPs cost 40 x 40 x 6 products, below 6 JVPs + the product with W
    assert cheaper_side(g, z, 40) == "vjp"
    assert cheaper_side(g, z, 6) == "vjp"                  # d >= k: never counted
    assert cheaper_side(lambda z: jnp.tanh(z[:50] * 2.0), jnp.zeros(200, jnp.float32), 30) == "vjp"   # d = 200 > k


def test_a_job_takes_the_jvp_side_where_it_is_cheaper_and_says_so(tmp_path):
    """The 6-24-24-10 MLP with k = 10 projections: 6 JVPs beat 10 VJPs. The records equal the
    dense reference (x64 job), and the commit markers and `inspect` name the side."""
    spec = mlp_spec(write_mlp(tmp_path), count=12, local_scaling={"mode": "projection", "k": 10}, local_rank={})
    spec["execution"]["dtype"] = "float64"
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok
    engines = Dataset(res.uri).summary().engines()
    assert [e["side"] for e in engines] == ["jvp"] and "W A from d JVPs" in engines[0]["display"]
    df = read_sorted(res.uri)
    layers = load_mlp_weights(spec["model"]["weights"])
    z = build_latents(spec["latents"]).latents(np.arange(12))
    w = Dataset(res.uri).artifacts()["W"]
    for i in range(12):
        psi, nu, _ = psi_nu(w @ numpy_mlp_jacobian(layers, z[i]))
        assert df.local_scaling[i] == pytest.approx(psi, rel=1e-10) and df.local_rank[i] == pytest.approx(nu, rel=1e-10)
