"""geomjobs.metrics against closed forms: Vendi scores of kernels with known spectra, Frechet
distances of sample sets whose sample moments are exactly known."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from geomjobs.metrics import cosine_kernel, frechet_distance, frechet_distance_gaussians, vendi_eigenvalues, vendi_score


def renyi_vendi(p, q):
    """exp of the Renyi entropy of order q of a probability vector p, written out per case."""
    p = np.asarray([x for x in p if x > 0], np.float64)
    if q == 1:
        return math.exp(-sum(x * math.log(x) for x in p))
    if q == math.inf:
        return 1.0 / max(p)
    if q == 0:
        return float(len(p))
    return sum(x ** q for x in p) ** (1.0 / (1.0 - q))


QS = [0, 0.5, 1, 2, 3.5, math.inf]


@pytest.mark.parametrize("q", QS)
def test_identical_items_score_one(q):
    x = np.tile(np.array([[0.3, -1.2, 2.0, 0.5]]), (7, 1))
    assert vendi_score(x, q) == pytest.approx(1.0, abs=1e-12)
    assert vendi_score(np.ones((7, 7)), q, kernel=True) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("q", QS)
def test_orthogonal_items_score_n(q):
    x = 3.0 * np.eye(6)[:5]                                    # 5 orthogonal items in R^6
    assert vendi_score(x, q) == pytest.approx(5.0, rel=1e-12)
    assert vendi_score(np.eye(9), q, kernel=True) == pytest.approx(9.0, rel=1e-12)


@pytest.mark.parametrize("q", QS)
def test_block_kernel_is_renyi_of_group_shares(q):
    # groups of identical items, groups mutually orthogonal: K / n has eigenvalues n_g / n (and 0s)
    sizes = [1, 2, 5]
    n = sum(sizes)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    K = (groups[:, None] == groups[None, :]).astype(float)
    want = renyi_vendi([s / n for s in sizes], q)
    assert vendi_score(K, q, kernel=True) == pytest.approx(want, rel=1e-10)
    feats = np.eye(4)[groups] * np.arange(1, n + 1)[:, None]     # scaled copies: the cosine kernel is K
    assert vendi_score(feats, q) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("q", QS)
def test_equicorrelated_kernel_closed_form(q):
    # K = (1 - c) I + c 1 1^T: eigenvalues of K / n are (1 - c + n c) / n once and (1 - c) / n (n - 1 times)
    n, c = 10, 0.3
    K = (1 - c) * np.eye(n) + c * np.ones((n, n))
    p = [(1 - c + n * c) / n] + [(1 - c) / n] * (n - 1)
    assert vendi_score(K, q, kernel=True) == pytest.approx(renyi_vendi(p, q), rel=1e-10)


@pytest.mark.parametrize("shape", [(40, 5), (6, 30)])     # primal (d < n) and dual (d >= n) forms
def test_features_equal_their_cosine_kernel(rng, shape):
    x = rng.standard_normal(shape)
    K = cosine_kernel(x)
    np.testing.assert_allclose(np.diag(K), 1.0, atol=1e-12)
    lam_f, lam_k = vendi_eigenvalues(x), vendi_eigenvalues(K, kernel=True)
    m = min(len(lam_f), len(lam_k))
    np.testing.assert_allclose(lam_f[:m], lam_k[:m], atol=1e-12)
    assert lam_f.sum() == pytest.approx(1.0, abs=1e-12)
    for q in QS[1:]:
        assert vendi_score(x, q) == pytest.approx(vendi_score(K, q, kernel=True), rel=1e-9)


def test_vendi_rejects_bad_input():
    with pytest.raises(ValueError, match="q must be"):
        vendi_score(np.eye(3), -1)
    with pytest.raises(ValueError, match="square"):
        vendi_score(np.ones((3, 2)), kernel=True)
    with pytest.raises(ValueError, match="symmetric"):
        vendi_score(np.array([[1.0, 0.5], [0.0, 1.0]]), kernel=True)
    with pytest.raises(ValueError, match="all-zero"):
        vendi_score(np.zeros((3, 2)))


def samples_with_moments(rng, n, mean, cov):
    """n samples whose sample mean and sample covariance (ddof = 1) are exactly ``mean`` and ``cov``."""
    d = len(mean)
    x = rng.standard_normal((n, d))
    x -= x.mean(0)
    white = np.linalg.solve(np.linalg.cholesky(np.cov(x, rowvar=False)), x.T).T     # sample cov = I
    return white @ np.linalg.cholesky(cov).T + mean


def closed_form_commuting(mu_a, eig_a, mu_b, eig_b):
    """||mu_a - mu_b||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for covariances Q diag(a) Q^T, Q diag(b) Q^T."""
    return float(np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(eig_a) - np.sqrt(eig_b)) ** 2))


def test_frechet_diagonal_covariances(rng):
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    xa = samples_with_moments(rng, 500, mu_a, np.diag(a))
    xb = samples_with_moments(rng, 300, mu_b, np.diag(b))
    want = closed_form_commuting(mu_a, a, mu_b, b)
    assert frechet_distance(xa, xb) == pytest.approx(want, rel=1e-9)
    assert frechet_distance_gaussians(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_commuting_covariances(rng):
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    a, b = np.array([3.0, 1.0, 0.5, 0.1]), np.array([0.2, 2.0, 0.5, 1.5])
    mu_a, mu_b = rng.standard_normal(4), rng.standard_normal(4)
    sa, sb = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = closed_form_commuting(mu_a, a, mu_b, b)
    assert frechet_distance_gaussians(mu_a, sa, mu_b, sb) == pytest.approx(want, rel=1e-9)
    xa, xb = samples_with_moments(rng, 400, mu_a, sa), samples_with_moments(rng, 400, mu_b, sb)
    assert frechet_distance(xa, xb) == pytest.approx(want, rel=1e-8)


def test_frechet_general_covariances_match_the_symmetric_form(rng):
    # tr sqrtm(S_a S_b) = tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}, the textbook form
    ma, mb = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    sa, sb = ma @ ma.T + 0.1 * np.eye(5), mb @ mb.T + 0.1 * np.eye(5)
    ra = np.real(scipy.linalg.sqrtm(sa))
    inner = np.linalg.eigvalsh(ra @ sb @ ra)
    want = np.trace(sa) + np.trace(sb) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert frechet_distance_gaussians(np.zeros(5), sa, np.zeros(5), sb) == pytest.approx(want, rel=1e-8)


def test_frechet_identical_samples_is_zero(rng):
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    assert abs(frechet_distance(x, x.copy())) < 1e-8
    # rank-deficient covariance (more features than the samples span): still finite and ~0
    y = rng.standard_normal((5, 12))
    assert abs(frechet_distance(y, y.copy())) < 1e-4


def test_frechet_rejects_bad_input(rng):
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(rng.standard_normal((5, 3)), rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(rng.standard_normal((1, 3)), rng.standard_normal((5, 3)))


# --------------------------------------------------------------------------------------------
# the vendi-score package (0.0.3) as an oracle at q = 1 (its score_X ignores q, so only q = 1 is
# compared; its eigvalsh of K / n keeps rounding-level negative eigenvalues out via p > 0)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(50, 8), (12, 40), (200, 128)])
def test_vendi_equals_the_vendi_score_package_at_q1(rng, shape):
    import warnings

    from vendi_score import vendi as vs

    x = rng.standard_normal(shape) + 0.5 * rng.standard_normal(shape[1])     # correlated items
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)                 # its scipy.sparse.csr namespace
        want_x = vs.score_X(x, q=1)
        want_k = vs.score_K(cosine_kernel(x), q=1)
        want_dual = vs.score_dual(x, q=1)
    # both are exp(entropy) of the same eigenvalues in float64: agreement to ~1e-10 relative
    assert vendi_score(x, 1) == pytest.approx(want_x, rel=1e-9)
    assert vendi_score(x, 1) == pytest.approx(want_k, rel=1e-9)
    assert vendi_score(x, 1) == pytest.approx(want_dual, rel=1e-9)
    assert vendi_score(cosine_kernel(x), 1, kernel=True) == pytest.approx(want_k, rel=1e-9)
