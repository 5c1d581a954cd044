"""Parity with PyTorch for the GAN building blocks: the logistic ops (values, gradients and second derivatives),
the GAN losses and penalties, and spectral normalisation. float64, 1e-10. Skipped when PyTorch is not installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from minivit import Tensor, functional as F, gan, grad, nn  # noqa: E402
from minivit.nn.gan import MinibatchStd  # noqa: E402
from tests.test_torch_parity import _compare  # noqa: E402
from tests.test_torch_second_order import assert_second_derivatives_match_torch  # noqa: E402

pytestmark = pytest.mark.torch
R = np.random.default_rng(13)
TOL = 1e-10


def probabilities(*shape):
    return R.uniform(0, 1, shape)


def torch_bce_formula(x, t, weight=None, pos_weight=None):
    """PyTorch's binary_cross_entropy_with_logits written out, because torch has no gradient in pos_weight."""
    loss = pos_weight * t * TF.softplus(-x) + (1 - t) * TF.softplus(x)
    return loss if weight is None else (loss * weight).mean()


def _torch_l2_attention(q, k, v, scale=None):
    """softmax_j(-||q_i - k_j||^2 * scale) v with the squared distances written out."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    distances = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
    return torch.softmax(-distances * scale, dim=-1) @ v


def _torch_minibatch_std(x, group_size):
    """x (B, D) with its groups' mean feature standard deviation appended, from torch's own var."""
    groups = x.reshape(x.shape[0] // group_size, group_size, x.shape[1])
    spread = (groups.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1, keepdim=True)
    return torch.cat([x, spread.repeat_interleave(group_size, dim=0)], dim=1)


NEW_OPS = {
    "sigmoid": (F.sigmoid, torch.sigmoid, [R.standard_normal((4, 5)) * 4]),
    "softplus": (F.softplus, TF.softplus, [R.standard_normal((3, 6)) * 4]),
    "softplus_beta": (lambda x: F.softplus(x, beta=2.5), lambda x: TF.softplus(x, beta=2.5),
                      [R.standard_normal(12) * 2]),
    "logsigmoid": (F.logsigmoid, TF.logsigmoid, [R.standard_normal((2, 3, 4)) * 4]),
    "bce_mean": (F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits,
                 [R.standard_normal((6, 3)) * 3, probabilities(6, 3)]),
    "bce_sum_hard_targets": (lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
                             lambda x, t: TF.binary_cross_entropy_with_logits(x, t, reduction="sum"),
                             [R.standard_normal(10) * 3, R.integers(0, 2, 10).astype(float)]),
    "bce_none_pos_weight": (
        lambda x, t, w: F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=w),
        lambda x, t, w: torch_bce_formula(x, t, pos_weight=w),
        [R.standard_normal((4, 3)) * 2, probabilities(4, 3), R.uniform(0.5, 3, 3)]),
    "bce_weight_pos_weight": (
        lambda x, t, w, pw: F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw),
        lambda x, t, w, pw: torch_bce_formula(x, t, weight=w, pos_weight=pw),
        [R.standard_normal((5, 2)) * 2, probabilities(5, 2), R.uniform(0.5, 2, (5, 1)), R.uniform(0.5, 3, 2)]),
    "l2_distance_attention": (F.l2_distance_attention, _torch_l2_attention,
                              [R.standard_normal((2, 5, 4)), R.standard_normal((2, 6, 4)),
                               R.standard_normal((2, 6, 3))]),
    "l2_distance_attention_tied": (lambda x, v: F.l2_distance_attention(x, x, v, scale=0.3),
                                   lambda x, v: _torch_l2_attention(x, x, v, scale=0.3),
                                   [R.standard_normal((3, 5, 4)), R.standard_normal((3, 5, 2))]),
    "minibatch_std": (lambda x: MinibatchStd(3)(x), lambda x: _torch_minibatch_std(x, 3),
                      [R.standard_normal((6, 4))]),
}


@pytest.mark.parametrize("name", NEW_OPS)
def test_op_matches_torch_in_values_and_gradients(name):
    ours, theirs, arrays = NEW_OPS[name]
    _compare(ours, theirs, arrays, np.float64)


@pytest.mark.parametrize("name", NEW_OPS)
def test_op_matches_torch_in_second_derivatives(name):
    assert_second_derivatives_match_torch(*NEW_OPS[name], tol=TOL)


def test_logistic_ops_match_torch_on_huge_logits():
    x = np.array([1e4, -1e4, 50.0, -50.0, 0.0])
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.5])
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    np.testing.assert_allclose(F.sigmoid(x).data, torch.sigmoid(xt).numpy(), rtol=TOL, atol=0)
    np.testing.assert_allclose(F.softplus(x).data, TF.softplus(xt).numpy(), rtol=TOL, atol=0)
    np.testing.assert_allclose(F.logsigmoid(x).data, TF.logsigmoid(xt).numpy(), rtol=TOL, atol=0)
    # torch writes the loss as (1 - t) x + softplus(-x) and loses e^-50 = 2e-22 to cancellation at x = -50, t = 0;
    # minivit's (1 - t) softplus(x) keeps it, hence the absolute tolerance
    loss = F.binary_cross_entropy_with_logits(x, t, reduction="none").data
    np.testing.assert_allclose(loss, TF.binary_cross_entropy_with_logits(xt, tt, reduction="none").numpy(),
                               rtol=TOL, atol=1e-20)
    np.testing.assert_allclose(loss[3], np.exp(-50.0), rtol=1e-12)


def test_the_written_out_formula_is_torchs_binary_cross_entropy_with_pos_weight():
    x, t, w, pw = R.standard_normal((5, 3)) * 3, probabilities(5, 3), R.uniform(0.5, 2, (5, 1)), R.uniform(0.5, 3, 3)
    args = [torch.from_numpy(a) for a in (x, t, w, pw)]
    ref = TF.binary_cross_entropy_with_logits(args[0], args[1], weight=args[2], pos_weight=args[3])
    np.testing.assert_allclose(torch_bce_formula(*args).numpy(), ref.numpy(), rtol=TOL)
    np.testing.assert_allclose(F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw).data, ref.numpy(),
                               rtol=TOL)


# ------------------------------------------------------------------------------------------------ GAN losses
def _torch_relu(x):
    return torch.clamp(x, min=0)


# name -> (ours, the same formula in PyTorch written with probabilities where the paper does, logits shapes)
GAN_LOSSES = {
    "discriminator_minimax": (gan.discriminator_loss,
                              lambda r, f: -torch.log(torch.sigmoid(r)).mean() - torch.log(1 - torch.sigmoid(f)).mean(),
                              [(6, 1), (5, 1)]),
    "generator_minimax": (gan.generator_loss_minimax, lambda f: torch.log(1 - torch.sigmoid(f)).mean(), [(7,)]),
    "generator_non_saturating": (gan.generator_loss_non_saturating, lambda f: -torch.log(torch.sigmoid(f)).mean(),
                                 [(7, 1)]),
    "hinge_discriminator": (gan.hinge_discriminator_loss,
                            lambda r, f: _torch_relu(1 - r).mean() + _torch_relu(1 + f).mean(), [(8,), (8,)]),
    "hinge_generator": (gan.hinge_generator_loss, lambda f: -f.mean(), [(5,)]),
    "wasserstein_critic": (gan.wasserstein_critic_loss, lambda r, f: f.mean() - r.mean(), [(6, 1), (4, 1)]),
    "wasserstein_generator": (gan.wasserstein_generator_loss, lambda f: -f.mean(), [(6,)]),
}


@pytest.mark.parametrize("name", GAN_LOSSES)
def test_gan_loss_matches_its_formula_in_torch(name):
    ours, theirs, shapes = GAN_LOSSES[name]
    _compare(ours, theirs, [R.standard_normal(s) * 2 for s in shapes], np.float64)


def test_discriminator_loss_is_binary_cross_entropy_and_finite_on_confident_logits():
    real, fake = np.array([1e4, -1e4, 0.3]), np.array([-1e4, 1e4, -0.2])
    expected = (F.binary_cross_entropy_with_logits(real, np.ones(3)).data
                + F.binary_cross_entropy_with_logits(fake, np.zeros(3)).data)
    np.testing.assert_allclose(gan.discriminator_loss(real, fake).data, expected, rtol=1e-12)
    assert np.isfinite(gan.generator_loss_minimax(fake).data) and np.isfinite(
        gan.generator_loss_non_saturating(fake).data)


def test_the_minimax_generator_loss_saturates_where_the_non_saturating_one_does_not():
    fake = Tensor(np.array([-8.0, -8.0]), requires_grad=True)   # D rejects the fakes with confidence
    (g_minimax,) = grad(gan.generator_loss_minimax(fake), fake)
    (g_non_saturating,) = grad(gan.generator_loss_non_saturating(fake), fake)
    assert np.abs(g_minimax.data).max() < 1e-3 < 0.4 < np.abs(g_non_saturating.data).min()


# ------------------------------------------------------------------------------------------------ penalties
class _Critic(nn.Module):
    """An MLP critic on (B, C, H, W) batches, flattened: Linear -> GELU -> Linear -> one score."""

    def __init__(self, n_in, hidden, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.fc1, self.act, self.fc2 = nn.Linear(n_in, hidden, rng=rng), nn.GELU(), nn.Linear(hidden, 1, rng=rng)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.reshape(x.shape[0], -1))))


def _torch_twin(critic):
    twin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(critic.fc1.in_features, critic.fc1.out_features),
                               torch.nn.GELU(), torch.nn.Linear(critic.fc2.in_features, 1)).double()
    with torch.no_grad():
        for mine, theirs in ((critic.fc1, twin[1]), (critic.fc2, twin[3])):
            theirs.weight.copy_(torch.from_numpy(mine.weight.data))
            theirs.bias.copy_(torch.from_numpy(mine.bias.data))
    return twin


def _assert_same_parameter_gradients(critic, twin):
    pairs = ((critic.fc1, twin[1]), (critic.fc2, twin[3]))
    for i, (mine, theirs) in enumerate(pairs):
        for name in ("weight", "bias"):
            if getattr(theirs, name).grad is None:   # torch: no path from it (the last bias, in an input gradient)
                got = getattr(mine, name).grad
                assert got is None or np.abs(got).max() == 0, f"layer {i} {name}"
                continue
            want = getattr(theirs, name).grad.numpy()
            np.testing.assert_allclose(getattr(mine, name).grad, want, rtol=TOL, atol=TOL * np.abs(want).max(),
                                       err_msg=f"layer {i} {name}")


def test_wgan_gp_critic_loss_matches_torch_in_value_and_every_parameter_gradient():
    """L = E[f(fake)] - E[f(real)] + lam E[(||grad f(x_hat)||_2 - 1)^2], x_hat = a x + (1 - a) fake per sample."""
    critic = _Critic(6, 16, seed=3).double()
    twin = _torch_twin(critic)
    real, fake = R.standard_normal((5, 1, 2, 3)), R.standard_normal((5, 1, 2, 3))

    loss = (gan.wasserstein_critic_loss(critic(real), critic(fake))
            + gan.gradient_penalty(critic, real, fake, lam=10.0, generator=np.random.default_rng(8)))
    loss.backward()

    a = torch.from_numpy(np.random.default_rng(8).random((5, 1, 1, 1)))   # the same draw as gan.interpolate
    x_hat = (a * torch.from_numpy(real) + (1 - a) * torch.from_numpy(fake)).requires_grad_(True)
    (g,) = torch.autograd.grad(twin(x_hat).sum(), x_hat, create_graph=True)
    penalty = 10.0 * ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    loss_ref = twin(torch.from_numpy(fake)).mean() - twin(torch.from_numpy(real)).mean() + penalty
    loss_ref.backward()

    assert penalty.item() > 1e-3   # the penalty is not trivially zero, so its gradients are tested
    np.testing.assert_allclose(loss.data, loss_ref.item(), rtol=TOL)
    _assert_same_parameter_gradients(critic, twin)


def test_r1_penalty_matches_torch_in_value_and_every_parameter_gradient():
    """R1 = gamma/2 E[||grad_x D(x)||^2] on real data."""
    critic = _Critic(6, 8, seed=5).double()
    twin = _torch_twin(critic)
    real = R.standard_normal((4, 1, 3, 2))

    penalty = gan.r1_penalty(critic, real, gamma=3.0)
    penalty.backward()

    x = torch.from_numpy(real).requires_grad_(True)
    (g,) = torch.autograd.grad(twin(x).sum(), x, create_graph=True)
    penalty_ref = 3.0 / 2 * (g.flatten(1) ** 2).sum(dim=1).mean()
    penalty_ref.backward()

    np.testing.assert_allclose(penalty.data, penalty_ref.item(), rtol=TOL)
    _assert_same_parameter_gradients(critic, twin)


def test_interpolates_lie_on_the_segment_with_one_weight_per_sample():
    real, fake = R.standard_normal((6, 2, 3)), R.standard_normal((6, 2, 3))
    x_hat = gan.interpolate(real, fake, np.random.default_rng(1)).data
    a = (x_hat - fake)[:, :1, :1] / (real - fake)[:, :1, :1]
    assert ((a > 0) & (a < 1)).all() and np.ptp(a) > 0.1           # inside the segment, different per sample
    np.testing.assert_allclose(x_hat, a * real + (1 - a) * fake, rtol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        gan.interpolate(real, fake[:3])


# ------------------------------------------------------------------------------------------------ spectral norm
def _spectral_twins(seed):
    """A spectrally normalised minivit Linear and torch Linear with the same weight, bias, u and v (float64)."""
    mine = nn.utils.spectral_norm(nn.Linear(5, 4, rng=np.random.default_rng(seed)).double(),
                                  rng=np.random.default_rng(seed + 1))
    theirs = torch.nn.Linear(5, 4).double()
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(mine.weight_orig.data))
        theirs.bias.copy_(torch.from_numpy(mine.bias.data))
    theirs = torch.nn.utils.spectral_norm(theirs)
    with torch.no_grad():
        theirs.weight_u.copy_(torch.from_numpy(mine.weight_u.data))
        theirs.weight_v.copy_(torch.from_numpy(mine.weight_v.data))
    return mine, theirs


def _assert_close(a, b, what):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * max(np.abs(b).max(), 1e-300), err_msg=what)


def test_spectral_norm_matches_torch_over_training_steps_in_values_buffers_and_every_gradient():
    mine, theirs = _spectral_twins(seed=2)
    assert list(mine.state_dict()) == list(theirs.state_dict()) == ["bias", "weight_orig", "weight_u", "weight_v"]
    lr = 0.1
    for step in range(5):
        x = R.standard_normal((3, 5))
        upstream = R.standard_normal((3, 4))
        x_mine, x_theirs = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        y, y_ref = mine(x_mine), theirs(x_theirs)
        y.backward(upstream)
        y_ref.backward(torch.from_numpy(upstream))
        _assert_close(y.data, y_ref, f"output, step {step}")
        _assert_close(mine.weight.data, theirs.weight, f"normalised weight, step {step}")
        _assert_close(mine.weight_u.data, theirs.weight_u, f"u, step {step}")
        _assert_close(mine.weight_v.data, theirs.weight_v, f"v, step {step}")
        _assert_close(x_mine.grad, x_theirs.grad, f"input gradient, step {step}")
        _assert_close(mine.weight_orig.grad, theirs.weight_orig.grad, f"weight_orig gradient, step {step}")
        _assert_close(mine.bias.grad, theirs.bias.grad, f"bias gradient, step {step}")
        with torch.no_grad():   # the same SGD step on both
            for p, q in ((mine.weight_orig, theirs.weight_orig), (mine.bias, theirs.bias)):
                p.data = p.data - lr * p.grad
                q -= lr * q.grad
                p.grad, q.grad = None, None
    for name, value in mine.state_dict().items():
        _assert_close(value, theirs.state_dict()[name], f"state dict {name}")

    mine.eval(), theirs.eval()   # eval: no power iteration, the stored u and v are used as they are
    u_before = mine.weight_u.data.copy()
    x = R.standard_normal((2, 5))
    _assert_close(mine(x).data, theirs(torch.from_numpy(x)), "eval output")
    np.testing.assert_array_equal(mine.weight_u.data, u_before)


def test_gradient_penalty_through_spectral_norm_matches_torch():
    """The double backward of a penalty reaches weight_orig through sigma = u . (W v) as in torch."""
    mine, theirs = _spectral_twins(seed=6)
    x = R.standard_normal((3, 5))
    x_mine = Tensor(x, requires_grad=True)
    (g,) = grad(F.gelu(mine(x_mine)).sum(), x_mine, create_graph=True)
    penalty = ((g * g).sum(axis=1) ** 0.5 - 1.0) ** 2
    penalty.mean().backward()
    x_theirs = torch.tensor(x, requires_grad=True)
    (g_ref,) = torch.autograd.grad(TF.gelu(theirs(x_theirs)).sum(), x_theirs, create_graph=True)
    ((g_ref.norm(dim=1) - 1) ** 2).mean().backward()
    _assert_close(g.data, g_ref, "input gradient")
    _assert_close(mine.weight_orig.grad, theirs.weight_orig.grad, "weight_orig gradient of the penalty")
    _assert_close(mine.bias.grad, theirs.bias.grad, "bias gradient of the penalty")


def test_remove_spectral_norm_matches_torch():
    mine, theirs = _spectral_twins(seed=8)
    x = R.standard_normal((2, 5))
    mine(x), theirs(torch.from_numpy(x))             # one power-iteration step on both
    nn.utils.remove_spectral_norm(mine)
    torch.nn.utils.remove_spectral_norm(theirs)
    assert list(mine.state_dict()) == ["bias", "weight"] and sorted(theirs.state_dict()) == ["bias", "weight"]
    assert [name for name, _ in mine.named_parameters()] == ["bias", "weight"]
    _assert_close(mine.weight.data, theirs.weight, "weight after removal")
    _assert_close(mine(x).data, theirs(torch.from_numpy(x)), "output after removal")
    with pytest.raises(ValueError, match="not spectrally normalised"):
        nn.utils.remove_spectral_norm(mine)
