"""Parity with PyTorch for the style-transfer losses: the Gram matrix, the Gram loss and the total variation
(values, gradients and second derivatives, float64, 1e-10). Skipped when PyTorch is not installed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minivit import Tensor, art  # noqa: E402
from tests.test_torch_parity import _compare  # noqa: E402
from tests.test_torch_second_order import assert_second_derivatives_match_torch  # noqa: E402

pytestmark = pytest.mark.torch
R = np.random.default_rng(15)
TOL = 1e-10
TARGET = R.standard_normal((2, 5, 5))


def torch_gram(tokens):
    return torch.einsum("bnd,bne->bde", tokens, tokens) / tokens.shape[1]


def torch_gram_loss(tokens):
    target = torch.from_numpy(TARGET)
    return ((torch_gram(tokens) - target) ** 2).sum() / (target ** 2).sum()


def torch_total_variation(images):
    return ((images[:, :, 1:] - images[:, :, :-1]) ** 2).mean() + ((images[..., 1:] - images[..., :-1]) ** 2).mean()


CASES = {
    "gram_matrix": (art.gram_matrix, torch_gram, [R.standard_normal((2, 7, 4))]),
    "gram_loss": (lambda t: art.gram_loss(t, Tensor(TARGET)), torch_gram_loss, [R.standard_normal((2, 6, 5))]),
    "total_variation": (art.total_variation, torch_total_variation, [R.uniform(size=(2, 3, 5, 6))]),
}


@pytest.mark.parametrize("name", CASES)
def test_style_loss_matches_torch_in_values_and_gradients(name):
    ours, theirs, arrays = CASES[name]
    _compare(ours, theirs, arrays, np.float64)


@pytest.mark.parametrize("name", CASES)
def test_style_loss_matches_torch_in_second_derivatives(name):
    assert_second_derivatives_match_torch(*CASES[name], tol=TOL)
