"""Parity with PyTorch for the VAE building blocks: the reparameterised sample, the closed-form KL, the Bernoulli
and Gaussian log-likelihoods (values, gradients and second derivatives, float64, 1e-10), and the KL against
torch.distributions. Skipped when PyTorch is not installed.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from minivit import functional as F  # noqa: E402
from tests.test_torch_parity import _compare  # noqa: E402
from tests.test_torch_second_order import assert_second_derivatives_match_torch  # noqa: E402

pytestmark = pytest.mark.torch
R = np.random.default_rng(14)
TOL = 1e-10


def torch_reparameterize(mu, logvar, eps):
    return mu + torch.exp(0.5 * logvar) * eps


def torch_kl(mu, logvar):
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(-1)


def torch_bernoulli(logits, x):
    """log p(x) = -BCE(logits, x), summed per sample; PyTorch's own loss."""
    return -TF.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def torch_gaussian(x, mean, logvar):
    """log N(x; mean, e^logvar) per sample, from torch.distributions.Normal."""
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    return normal.log_prob(x).flatten(1).sum(1)


CASES = {
    "reparameterize": (F.reparameterize, torch_reparameterize, [R.standard_normal((4, 3)), R.standard_normal((4, 3)),
                                                                R.standard_normal((4, 3))]),
    "reparameterize_k_samples": (F.reparameterize, torch_reparameterize,
                                 [R.standard_normal((2, 3)), R.standard_normal((2, 3)), R.standard_normal((6, 2, 3))]),
    "gaussian_kl": (F.gaussian_kl, torch_kl, [R.standard_normal((5, 4)) * 2, R.standard_normal((5, 4))]),
    "bernoulli": (F.bernoulli_log_likelihood, torch_bernoulli,
                  [R.standard_normal((3, 1, 4, 4)) * 4, (R.uniform(size=(3, 1, 4, 4)) < 0.5).astype(float)]),
    "bernoulli_soft_targets": (F.bernoulli_log_likelihood, torch_bernoulli,
                               [R.standard_normal((2, 7)) * 3, R.uniform(size=(2, 7))]),
    "gaussian": (F.gaussian_log_likelihood, torch_gaussian,
                 [R.standard_normal((3, 2, 4)), R.standard_normal((3, 2, 4)), R.standard_normal((3, 2, 4))]),
    "gaussian_shared_variance": (F.gaussian_log_likelihood, lambda x, m, v: torch_gaussian(x, m, v.expand_as(x)),
                                 [R.standard_normal((4, 5)), R.standard_normal((4, 5)), R.standard_normal((1, 1))]),
}


@pytest.mark.parametrize("name", CASES)
def test_vae_op_matches_torch_in_values_and_gradients(name):
    ours, theirs, arrays = CASES[name]
    _compare(ours, theirs, arrays, np.float64)


@pytest.mark.parametrize("name", CASES)
def test_vae_op_matches_torch_in_second_derivatives(name):
    assert_second_derivatives_match_torch(*CASES[name], tol=TOL)


def test_closed_form_kl_matches_torch_distributions():
    mu, logvar = R.standard_normal((6, 3)) * 2, R.standard_normal((6, 3))
    q = torch.distributions.Normal(torch.from_numpy(mu), torch.from_numpy(np.exp(0.5 * logvar)))
    p = torch.distributions.Normal(torch.zeros(6, 3, dtype=torch.float64), torch.ones(6, 3, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(q, p).sum(-1).numpy()
    np.testing.assert_allclose(F.gaussian_kl(mu, logvar).data, ref, rtol=TOL)


def test_reparameterized_sample_uses_the_standard_deviation_not_the_variance():
    """exp(logvar / 2) * eps, not exp(logvar) * eps: with logvar = log 4 the samples spread with std 2."""
    mu, logvar = np.zeros((1, 1)), np.full((1, 1), math.log(4.0))
    z = F.reparameterize(mu, logvar, generator=np.random.default_rng(0), samples=20000).data
    assert abs(z.std() - 2.0) < 0.05


def test_bernoulli_log_likelihood_is_finite_on_huge_logits():
    logits = np.array([[1e4, -1e4, 50.0, -50.0]])
    x = np.array([[1.0, 0.0, 0.0, 1.0]])
    ref = torch_bernoulli(torch.from_numpy(logits), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(F.bernoulli_log_likelihood(logits, x).data, ref, rtol=TOL)
    assert np.isfinite(F.bernoulli_log_likelihood(logits, x).data).all()


@pytest.mark.parametrize("call, message", [
    (lambda: F.reparameterize(np.zeros((2, 3)), np.zeros((2, 4))), "same shape"),
    (lambda: F.reparameterize(np.zeros((2, 3)), np.zeros((2, 3)), eps=np.zeros((3, 2))), "must end with"),
    (lambda: F.gaussian_kl(np.zeros(3), np.zeros(4)), "same shape"),
    (lambda: F.bernoulli_log_likelihood(np.zeros((2, 3)), np.zeros((3, 2))), "same shape"),
    (lambda: F.gaussian_log_likelihood(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2)), "does not broadcast"),
])
def test_bad_shapes_are_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
