"""Second derivatives against PyTorch: every functional op, Tensor primitives, and the WGAN-GP gradient penalty
of a whole ViT critic in every parameter. float64, 1e-10 relative. Skipped when PyTorch is not installed.

For f with inputs x, random U and V:  g = d sum(f(x) U) / dx  (create_graph=True), then d sum(g V) / d(x, U).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import minivit as mv  # noqa: E402
from minivit import Tensor, functional as F, nn  # noqa: E402
from minivit.testing.torch_reference import torch_vit_like  # noqa: E402
from tests.test_torch_parity import OPS  # noqa: E402

pytestmark = pytest.mark.torch
R = np.random.default_rng(5)
TOL = 1e-10

PRIMITIVES = {
    "div_pow_exp": (lambda a, b: (a / b) ** 3 + (a * b).exp(), lambda a, b: (a / b) ** 3 + (a * b).exp(),
                    [R.standard_normal((3, 4)), R.uniform(0.5, 2, (4,))]),
    "log_tanh_matmul": (lambda a, b: (a @ b).tanh() * (a * a + 1.0).log().sum(axis=1, keepdims=True),
                        lambda a, b: (a @ b).tanh() * (a * a + 1.0).log().sum(dim=1, keepdim=True),
                        [R.standard_normal((3, 4)), R.standard_normal((4, 2))]),
    "max_mean_index": (lambda a: (a * a).max(axis=1) * a[:, 1:3].mean() + a[np.array([0, 2, 2])].sum(),
                       lambda a: (a * a).amax(dim=1) * a[:, 1:3].mean() + a[torch.tensor([0, 2, 2])].sum(),
                       [R.standard_normal((3, 5))]),
    "concat_stack_permute": (lambda a, b: mv.stack([mv.concat([a, b], axis=1).permute(1, 0)[1:4] ** 2, a.T * b.T]),
                             lambda a, b: torch.stack([torch.cat([a, b], 1).permute(1, 0)[1:4] ** 2, a.T * b.T]),
                             [R.standard_normal((2, 3)), R.standard_normal((2, 3))]),
}


def _second_derivatives(fn, arrays, to_tensor, grad, zeros, U, V):
    floats = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    args = [to_tensor(a, i in floats) for i, a in enumerate(arrays)]
    xs = [args[i] for i in floats]
    u = to_tensor(U, True)
    first = grad(fn(*args), xs, u, create_graph=True)
    first = [zeros(x) if g is None else g for g, x in zip(first, xs)]
    total = sum((g * to_tensor(v, False)).sum() for g, v in zip(first, V))
    return [g for g in first], grad(total, xs + [u], None, create_graph=False)


def _ours(fn, arrays, U, V):
    def grad(y, xs, u, create_graph):
        return mv.grad(y, xs, u, create_graph=create_graph, allow_unused=True)
    first, second = _second_derivatives(fn, arrays, lambda a, g: Tensor(a, requires_grad=g) if a.dtype.kind == "f"
                                        else Tensor(a), grad, lambda x: Tensor(np.zeros(x.shape)), U, V)
    return [g.data for g in first], [None if g is None else g.data for g in second]


def _theirs(fn, arrays, U, V):
    def grad(y, xs, u, create_graph):
        return torch.autograd.grad(y, xs, u, create_graph=create_graph, allow_unused=True)
    with sdpa_kernel(SDPBackend.MATH):   # PyTorch's fused CPU attention has no second derivative
        first, second = _second_derivatives(fn, arrays,
                                            lambda a, g: torch.tensor(a, requires_grad=g) if a.dtype.kind == "f"
                                            else torch.from_numpy(a), grad, lambda x: torch.zeros_like(x), U, V)
    return [g.detach().numpy() for g in first], [None if g is None else g.numpy() for g in second]


CASES = {**{k: v for k, v in OPS.items()}, **PRIMITIVES}


def assert_second_derivatives_match_torch(ours, theirs, arrays, tol=TOL):
    """The first derivatives (with a random upstream U) and the second (with random directions V) of ``ours``
    against those of ``theirs``, the same function in PyTorch, on the same arrays."""
    with torch.no_grad():
        out_shape = tuple(theirs(*[torch.from_numpy(a) for a in arrays]).shape)
    U = R.standard_normal(out_shape)
    V = [R.standard_normal(a.shape) for a in arrays if a.dtype.kind == "f"]
    first, second = _ours(ours, arrays, U, V)
    first_ref, second_ref = _theirs(theirs, arrays, U, V)
    for i, (a, b) in enumerate(zip(first, first_ref)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"first derivative {i}")
    for i, (a, b) in enumerate(zip(second, second_ref)):
        if b is None:   # torch: that input enters the gradient linearly, so its second derivative is 0
            assert a is None or np.abs(a).max() <= tol, f"second derivative {i}"
        else:
            scale = max(np.abs(b).max(), 1.0)
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"second derivative {i}")


@pytest.mark.parametrize("name", CASES)
def test_second_derivatives_match_torch(name):
    assert_second_derivatives_match_torch(*CASES[name])


def test_gradient_penalty_of_a_vit_critic_matches_torch_in_every_parameter():
    """WGAN-GP: L = ((||d D(x_hat) / d x_hat||_2 - 1)^2).mean(), x_hat = a x + (1 - a) x_fake per sample."""
    critic = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=1, embed_dim=16, depth=2,
                                  num_heads=2, mlp_ratio=2.0, seed=4).double()
    ref = torch_vit_like(critic, dtype=torch.float64)
    real, fake = R.standard_normal((4, 1, 8, 8)), R.standard_normal((4, 1, 8, 8))
    alpha = R.uniform(size=(4, 1, 1, 1))
    x_hat = alpha * real + (1 - alpha) * fake

    x = Tensor(x_hat, requires_grad=True)
    (g,) = mv.grad(critic(x).sum(), x, create_graph=True)
    penalty = (((g * g).sum(axis=(1, 2, 3)) ** 0.5 - 1.0) ** 2).mean()
    penalty.backward()

    xt = torch.tensor(x_hat, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        (gt,) = torch.autograd.grad(ref(xt).sum(), xt, create_graph=True)
        penalty_ref = ((gt.flatten(1).norm(dim=1) - 1.0) ** 2).mean()
        penalty_ref.backward()

    np.testing.assert_allclose(penalty.data, penalty_ref.item(), rtol=TOL)
    np.testing.assert_allclose(g.data, gt.detach().numpy(), rtol=TOL, atol=TOL * np.abs(g.data).max())
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in critic.named_parameters():
        want = ref_params[name].grad
        if want is None:   # torch: no path from this parameter to the penalty
            assert p.grad is None or np.abs(p.grad).max() <= TOL, name
            continue
        want = want.numpy()
        np.testing.assert_allclose(p.grad, want, rtol=TOL, atol=TOL * max(np.abs(want).max(), 1e-300),
                                   err_msg=name)
        checked += 1
    assert checked >= len(ref_params) - 2   # at most the head's bias and the last norm's bias can be unreached
