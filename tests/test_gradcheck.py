"""The checker itself: it passes right backwards, fails wrong ones in every mode, and reports clearly."""

import numpy as np
import pytest

from minivit import Tensor, functional as F, nn
from minivit.function import Function
from minivit.gradcheck import GradcheckError, gradcheck, verdict


class SoftmaxForgotTheSum(Function):
    """A classic mistake: dx = y * dy, leaving out the -sum(dy * y) term."""

    def forward(self, x):
        return _softmax(x, self)

    def backward(self, dy):
        return (self.y * dy,)


def _softmax(x, fn):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    fn.y = e / e.sum(axis=-1, keepdims=True)
    return fn.y


class LayerNormNoProjection(Function):
    """LayerNorm whose backward forgets the -xhat * mean(dy * xhat) term: invisible under a uniform upstream."""

    def forward(self, x):
        xc = x - x.mean(-1, keepdims=True)
        self.rstd = 1 / np.sqrt((xc ** 2).mean(-1, keepdims=True) + 1e-6)
        self.xhat = xc * self.rstd
        return self.xhat

    def backward(self, dy):
        return (self.rstd * (dy - dy.mean(-1, keepdims=True)),)


class TanhOffByFactor(Function):
    def forward(self, x):
        self.y = np.tanh(x)
        return self.y

    def backward(self, dy):
        return (dy * (1 - self.y ** 2) * 1.001,)


X = np.random.default_rng(0).standard_normal((3, 5))


@pytest.mark.parametrize("mode", ["full", "sampled", "directional"])
@pytest.mark.parametrize("wrong", [SoftmaxForgotTheSum, LayerNormNoProjection, TanhOffByFactor])
def test_a_wrong_backward_fails_in_every_mode(wrong, mode):
    report = gradcheck(lambda x: wrong.apply(x), [X], mode=mode)
    assert not report.ok, report
    assert report.rows[0].verdict in ("uneasy", "wrong")
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(lambda x: wrong.apply(x), [X], mode=mode, raise_on_fail=True)


def test_summing_the_output_would_hide_the_layer_norm_bug_but_the_random_upstream_does_not():
    hidden = gradcheck(lambda x: LayerNormNoProjection.apply(x), [X], upstream=np.ones_like(X))
    assert hidden.ok  # the reason the checker never uses a uniform upstream by default
    assert not gradcheck(lambda x: LayerNormNoProjection.apply(x), [X]).ok


@pytest.mark.parametrize("mode", ["full", "sampled", "directional"])
def test_right_backwards_pass_in_every_mode(mode):
    report = gradcheck(lambda x, w, b: F.layer_norm(x, w, b), [X, np.ones(5) + X[0], X[1]], mode=mode)
    assert report.ok, report
    assert [r.name for r in report.rows] == ["input 0", "input 1", "input 2"]


def test_the_report_names_the_worst_element_with_both_values():
    report = gradcheck(lambda x: TanhOffByFactor.apply(x), [X], names=["x"])
    row = report["x"]
    assert row.checked == X.size and row.worst_index is not None and len(row.worst_index) == 2
    assert abs(row.analytic / row.numeric - 1.001) < 1e-5
    text = str(report)
    for word in ("FAILED", "x", "max rel", "worst at", "analytic", "numeric", "FAIL"):
        assert word in text


def test_sampled_mode_checks_every_tensor_and_at_most_samples_elements():
    model = nn.Linear(6, 4, rng=np.random.default_rng(0))
    report = gradcheck(model, [np.random.default_rng(1).standard_normal((2, 6))], mode="sampled", samples=5)
    assert [r.name for r in report.rows] == ["input 0", "weight", "bias"]
    assert [r.checked for r in report.rows] == [5, 5, 4]
    assert report.ok, report


def test_module_checks_run_in_float64_and_restore_the_module():
    model = nn.Linear(3, 2, rng=np.random.default_rng(0))
    before = model.weight.data.copy()
    report = gradcheck(model, [np.ones((1, 3), np.float32)])
    assert report.ok
    assert model.weight.dtype == np.float32 and model.training and model.weight.grad is None
    np.testing.assert_array_equal(model.weight.data, before)


def test_a_parameter_dict_must_be_float64():
    w = Tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="float64"):
        gradcheck(lambda x: x * w, [np.ones(3)], params={"w": w})


def test_integer_inputs_are_constants():
    report = gradcheck(lambda x, t: F.cross_entropy(x, t), [X, np.array([0, 4, 2])])
    assert len(report.rows) == 1 and report.ok


def test_verdict_bands():
    assert [verdict(v) for v in (1e-9, 1e-5, 1e-3, 0.5)] == ["good", "fine", "uneasy", "wrong"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        gradcheck(lambda x: x, [X], mode="fast")
    with pytest.raises(TypeError, match="must return a Tensor"):
        gradcheck(lambda x: 3.0, [X])
    with pytest.raises(ValueError, match="upstream has shape"):
        gradcheck(lambda x: x * 2, [X], upstream=np.ones(2))
