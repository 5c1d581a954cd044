"""Parity with PyTorch for the GAN building blocks: the logistic ops (values, gradients and second derivatives),
the GAN losses and penalties, and spectral normalisation. float64, 1e-10. Skipped when PyTorch is not installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from minivit import functional as F  # noqa: E402
from tests.test_torch_parity import _compare  # noqa: E402
from tests.test_torch_second_order import _ours, _theirs  # noqa: E402

pytestmark = pytest.mark.torch
R = np.random.default_rng(13)
TOL = 1e-10


def probabilities(*shape):
    return R.uniform(0, 1, shape)


def torch_bce_formula(x, t, weight=None, pos_weight=None):
    """PyTorch's binary_cross_entropy_with_logits written out, because torch has no gradient in pos_weight."""
    loss = pos_weight * t * TF.softplus(-x) + (1 - t) * TF.softplus(x)
    return loss if weight is None else (loss * weight).mean()


LOGISTIC = {
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
}


@pytest.mark.parametrize("name", LOGISTIC)
def test_logistic_op_matches_torch_in_values_and_gradients(name):
    ours, theirs, arrays = LOGISTIC[name]
    _compare(ours, theirs, arrays, np.float64)


@pytest.mark.parametrize("name", LOGISTIC)
def test_logistic_op_matches_torch_in_second_derivatives(name):
    ours, theirs, arrays = LOGISTIC[name]
    with torch.no_grad():
        out_shape = tuple(theirs(*[torch.from_numpy(a) for a in arrays]).shape)
    U = R.standard_normal(out_shape)
    V = [R.standard_normal(a.shape) for a in arrays]
    first, second = _ours(ours, arrays, U, V)
    first_ref, second_ref = _theirs(theirs, arrays, U, V)
    for i, (a, b) in enumerate(zip(first, first_ref)):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL, err_msg=f"first derivative {i}")
    for i, (a, b) in enumerate(zip(second, second_ref)):
        if b is None:   # torch: the input enters the gradient linearly
            assert a is None or np.abs(a).max() <= TOL, f"second derivative {i}"
        else:
            np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * max(np.abs(b).max(), 1.0),
                                       err_msg=f"second derivative {i}")


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
