"""minivit.grad, create_graph, higher-order derivatives, hvp and gradgradcheck."""

import math

import numpy as np
import pytest

import minivit as mv
from minivit import Tensor, functional as F, nn, ops
from minivit.gradcheck import gradcheck, gradgradcheck

R = np.random.default_rng(11)


def leaf(*shape):
    return Tensor(R.standard_normal(shape), requires_grad=True)


# ------------------------------------------------------------------------------------------- minivit.grad
def test_grad_equals_backward_and_leaves_dot_grad_alone():
    x, w = leaf(3, 4), leaf(5, 4)
    loss = (F.linear(x, w).tanh() * 2.0).sum()
    gx, gw = mv.grad(loss, [x, w], retain_graph=True)
    assert x.grad is None and w.grad is None
    loss.backward()
    np.testing.assert_allclose(gx.data, x.grad, rtol=1e-14)
    np.testing.assert_allclose(gw.data, w.grad, rtol=1e-14)
    assert not gx.requires_grad   # no graph unless asked for


def test_grad_of_an_intermediate_tensor_is_the_sum_over_its_uses():
    x = leaf(4)
    h = x * 3.0
    y = (h * h).sum() + h.sum()
    (gh,) = mv.grad(y, h)
    np.testing.assert_allclose(gh.data, 2 * h.data + 1, rtol=1e-14)


def test_grad_raises_for_an_unused_input_unless_allowed():
    x, unused = leaf(3), leaf(2)
    y = (x * x).sum()
    with pytest.raises(RuntimeError, match="input 1 .* was not used.*allow_unused=True"):
        mv.grad(y, [x, unused], retain_graph=True)
    gx, gu = mv.grad(y, [x, unused], allow_unused=True)
    assert gu is None
    np.testing.assert_allclose(gx.data, 2 * x.data)


def test_grad_errors_name_the_problem():
    x = leaf(3)
    constant = Tensor(np.ones(3))
    with pytest.raises(RuntimeError, match="input 0 .* does not require grad"):
        mv.grad((x * constant).sum(), constant)
    with pytest.raises(RuntimeError, match="does not require grad"):
        mv.grad(constant.sum(), x)
    with pytest.raises(RuntimeError, match="one-element"):
        mv.grad(x * 2.0, x)
    with pytest.raises(ValueError, match=r"has shape \(2,\), expected \(3,\)"):
        mv.grad(x * 2.0, x, grad_outputs=np.ones(2))
    with pytest.raises(ValueError, match="2 outputs and 1 grad_outputs"):
        mv.grad([x * 2.0, x * 3.0], x, grad_outputs=[np.ones(3)])
    with pytest.raises(TypeError, match="inputs must be a Tensor or a list or tuple of Tensors, got ndarray"):
        mv.grad((x * x).sum(), np.ones(3))
    with pytest.raises(TypeError, match=r"holding \['Tensor', 'ndarray'\]"):
        mv.grad((x * x).sum(), [x, np.ones(3)])


def test_a_second_walk_through_a_freed_graph_raises_and_retain_graph_allows_it():
    x = leaf(3)
    y = (x.exp() * x).sum()
    mv.grad(y, x)
    with pytest.raises(RuntimeError, match="already freed"):
        mv.grad(y, x)
    z = (x.exp() * x).sum()
    first = mv.grad(z, x, retain_graph=True)[0].data
    np.testing.assert_array_equal(mv.grad(z, x)[0].data, first)


def test_grad_with_several_outputs_adds_their_gradients():
    x = leaf(4)
    u, v = R.standard_normal(4), R.standard_normal(4)
    (g,) = mv.grad([x * x, x.tanh()], x, grad_outputs=[u, v])
    np.testing.assert_allclose(g.data, 2 * x.data * u + (1 - np.tanh(x.data) ** 2) * v, rtol=1e-13)


# ------------------------------------------------------------------------------------- higher derivatives
def test_derivatives_of_x_to_the_fourth_to_any_order():
    x = Tensor(np.array([0.5, -1.5, 2.0]), requires_grad=True)
    y = (x ** 4).sum()
    d1 = mv.grad(y, x, create_graph=True)[0]
    d2 = mv.grad(d1.sum(), x, create_graph=True)[0]
    d3 = mv.grad(d2.sum(), x, create_graph=True)[0]
    d4 = mv.grad(d3.sum(), x, create_graph=True)[0]
    xs = x.data
    for got, want in [(d1, 4 * xs ** 3), (d2, 12 * xs ** 2), (d3, 24 * xs), (d4, np.full(3, 24.0))]:
        np.testing.assert_allclose(got.data, want, rtol=1e-13)


def test_third_derivative_of_tanh_matches_its_closed_form():
    x = Tensor(np.linspace(-2, 2, 7), requires_grad=True)
    g = x.tanh()
    for _ in range(3):   # each element of g depends on its own x only, so d g.sum() / dx is the next derivative
        g = mv.grad(g.sum(), x, create_graph=True)[0]
    t = np.tanh(x.data)
    np.testing.assert_allclose(g.data, -2 * (1 - t ** 2) * (1 - 3 * t ** 2), rtol=1e-12)


def test_backward_with_create_graph_leaves_differentiable_tensors_in_grad():
    x = Tensor(np.array([1.0, 2.0, -0.5]), requires_grad=True)
    (x ** 3).sum().backward(create_graph=True)
    assert isinstance(x.grad, Tensor) and x.grad.requires_grad
    np.testing.assert_allclose(x.grad.data, 3 * x.data ** 2)
    (second,) = mv.grad(x.grad.sum(), x)
    np.testing.assert_allclose(second.data, 6 * x.data)


def test_x_to_the_zero_has_zero_gradient_at_zero():
    x = Tensor(np.array([0.0, 2.0]), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0])
    (g,) = mv.grad((x ** 0).sum(), x, create_graph=True)
    np.testing.assert_array_equal(g.data, [0.0, 0.0])


def test_hessian_vector_product_of_a_quadratic_form_is_a_times_v():
    A = R.standard_normal((5, 5))
    A = A + A.T
    x, v = leaf(5), R.standard_normal(5)
    value, (hv,) = mv.hvp(lambda t: 0.5 * (t @ (Tensor(A) @ t)), x, v)
    np.testing.assert_allclose(value.data, 0.5 * x.data @ A @ x.data, rtol=1e-13)
    np.testing.assert_allclose(hv.data, A @ v, rtol=1e-12)


def test_hessian_vector_product_matches_finite_differences_of_the_gradient():
    W = R.standard_normal((4, 6))

    def f(x):
        return F.softmax(F.linear(x, Tensor(W)).tanh(), axis=-1).log().sum() + (x * x * x).sum()

    x0, v = R.standard_normal((2, 6)), R.standard_normal((2, 6))
    _, (hv,) = mv.hvp(f, Tensor(x0, requires_grad=True), v)

    def gradient(x):
        xt = Tensor(x, requires_grad=True)
        return mv.grad(f(xt), xt)[0].data

    h = 1e-6
    numeric = (gradient(x0 + h * v) - gradient(x0 - h * v)) / (2 * h)
    np.testing.assert_allclose(hv.data, numeric, rtol=1e-6, atol=1e-8)


def test_hvp_checks_its_vectors():
    with pytest.raises(ValueError, match=r"vector 0 has shape \(2,\), input 0 has \(3,\)"):
        mv.hvp(lambda t: (t * t).sum(), leaf(3), np.ones(2))


# ------------------------------------------------------------------------------------------ gradgradcheck
class _TanhWithConstantY(ops.TanhFn):
    """A planted bug: the graph backward uses the saved output as a constant (DeZero's BatchNorm mistake).
    The first derivative is right; its derivative misses the dependence of y on x."""

    def backward_graph(self, dy):
        y = Tensor(self.y)
        return (dy * (1 - y * y),)


class _TanhScaledGraph(ops.TanhFn):
    """A planted bug: a graph backward that is consistently differentiated but 0.1% off."""

    def backward_graph(self, dy):
        (x,) = self.parents
        y = x.tanh()
        return (dy * (1 - 0.999 * y * y),)


def test_gradgradcheck_catches_a_second_derivative_through_a_cached_statistic():
    x = R.standard_normal((3, 4))
    assert gradcheck(lambda t: _TanhWithConstantY.apply(t), [x]).ok          # first order is fine
    report = gradgradcheck(lambda t: _TanhWithConstantY.apply(t), [x])
    assert report["first: input 0"].passed
    assert not report["second: input 0"].passed and not report.ok
    assert report["second: upstream"].passed   # the dependence on the upstream gradient is right
    assert "gradgradcheck" in str(report) and "FAIL" in str(report)


def test_gradgradcheck_catches_a_wrong_graph_backward_that_is_consistently_differentiated():
    report = gradgradcheck(lambda t: _TanhScaledGraph.apply(t), [R.standard_normal((3, 4))])
    assert not report["first: input 0"].passed and not report.ok


def test_gradgradcheck_of_a_whole_vit_in_directional_mode():
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                 num_heads=2, mlp_ratio=2.0, seed=0)
    images = R.standard_normal((2, 1, 8, 8))
    report = gradgradcheck(model, [images], mode="directional", rtol=1e-5)
    assert report.ok, str(report)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(report.rows) == 2 * (n_params + 1) + 1
    assert model.dtype == np.float32   # restored after the check


def test_gradient_penalty_of_a_vit_critic_matches_finite_differences():
    """The WGAN-GP penalty ((||d critic(x) / dx||_2 - 1)^2).mean(), differentiated in the critic's parameters."""
    critic = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=1, embed_dim=8, depth=1,
                                  num_heads=2, mlp_ratio=2.0, seed=1).double()
    x = R.standard_normal((3, 1, 8, 8))

    def penalty(images):
        (g,) = mv.grad(critic(images).sum(), images, create_graph=True)
        norms = ((g * g).sum(axis=(1, 2, 3)) + 1e-12) ** 0.5
        return ((norms - 1.0) ** 2).mean()

    report = gradcheck(penalty, [x], params=critic, mode="directional")
    assert report.ok, str(report)
    assert len(report.rows) == 1 + sum(1 for p in critic.parameters() if p.requires_grad)


def test_grad_skips_ops_that_lead_only_to_unwanted_inputs():
    """grad(y, x) asks no op for the gradient of a parameter it does not need."""
    calls = []

    class Watch(ops.LinearFn):
        def backward(self, dy):
            calls.append(self.needs_input_grad)
            return super().backward(dy)

    x, w = leaf(2, 3), leaf(4, 3)
    mv.grad(Watch.apply(x, w).sum(), x)
    assert calls == [(True, False)]


def test_profiler_and_anomaly_hooks_see_the_graph_backward_too():
    from minivit.function import detect_anomaly
    from minivit.profile import Profiler

    x = leaf(3)
    with Profiler() as prof:
        mv.grad((x.exp() * x).sum(), x, create_graph=True)
    assert prof.stats[("ExpFn", "backward")][0] == 1
    at_zero = Tensor(np.array([0.0, 1.0]), requires_grad=True)
    with detect_anomaly(), np.errstate(divide="ignore"):
        root = (at_zero ** 0.5).sum()   # finite; its gradient 0.5 / sqrt(x) is not, at 0
        with pytest.raises(FloatingPointError, match="anomaly: PowFn produced NaN or Inf"):
            mv.grad(root, at_zero, create_graph=True)
    assert math.isfinite(float(mv.grad((x * x).sum(), x)[0].data.sum()))
