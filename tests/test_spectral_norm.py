"""Spectral normalisation: sigma converges to the largest singular value, the layer becomes 1-Lipschitz, eval
mode keeps u and v, the state dict round-trips, the improved variant keeps the initial scale, gradients and
second derivatives pass the float64 checks, and bad uses are refused; and the Module buffers it rests on.
(PyTorch parity: tests/test_gan_parity.py.)
"""

import numpy as np
import pytest

from minivit import Tensor, gradcheck, gradgradcheck, nn
from minivit.nn.utils import improved_spectral_norm, spectral_norm

R = np.random.default_rng(17)


def _layer(seed=0, n_in=6, n_out=4, **kwargs):
    return spectral_norm(nn.Linear(n_in, n_out, rng=np.random.default_rng(seed)).double(),
                         rng=np.random.default_rng(seed + 100), **kwargs)


def _top_singular_value(w):
    return np.linalg.norm(w, 2)


def test_power_iteration_drives_the_normalised_weight_to_spectral_norm_one():
    layer = _layer(seed=1)
    W = layer.weight_orig.data
    x = R.standard_normal((2, 6))
    layer(x)
    after_one = abs(_top_singular_value(layer.weight.data) - 1)
    for _ in range(60):
        layer(x)                        # one power-iteration step per training forward
    assert abs(_top_singular_value(layer.weight.data) - 1) < 1e-8 < after_one
    u, v = layer.weight_u.data, layer.weight_v.data
    np.testing.assert_allclose(u @ W @ v, _top_singular_value(W), rtol=1e-10)   # sigma = u . (W v)


def test_a_normalised_layer_is_1_lipschitz():
    layer = _layer(seed=2, n_power_iterations=50)
    layer(R.standard_normal((1, 6)))
    x, y = R.standard_normal((200, 6)), R.standard_normal((200, 6))
    layer.eval()
    stretch = np.linalg.norm(layer(x).data - layer(y).data, axis=1) / np.linalg.norm(x - y, axis=1)
    assert stretch.max() <= 1 + 1e-9
    assert stretch.max() > 0.5           # and not trivially far below the bound


def test_eval_mode_reuses_the_stored_vectors():
    layer = _layer(seed=3)
    layer(R.standard_normal((2, 6)))
    u, v = layer.weight_u.data.copy(), layer.weight_v.data.copy()
    layer.eval()
    x = R.standard_normal((3, 6))
    first = layer(x).data
    np.testing.assert_array_equal(layer(x).data, first)
    np.testing.assert_array_equal(layer.weight_u.data, u)
    np.testing.assert_array_equal(layer.weight_v.data, v)
    layer.train()
    layer(x)
    assert not np.array_equal(layer.weight_u.data, u)


def test_the_state_dict_holds_weight_orig_u_and_v_and_round_trips():
    layer = _layer(seed=4)
    for _ in range(3):
        layer(R.standard_normal((2, 6)))
    state = layer.state_dict()
    assert list(state) == ["bias", "weight_orig", "weight_u", "weight_v"]
    assert [name for name, _ in layer.named_parameters()] == ["bias", "weight_orig"]
    other = _layer(seed=9)
    other.load_state_dict(state)
    layer.eval(), other.eval()
    x = R.standard_normal((3, 6))
    np.testing.assert_array_equal(other(x).data, layer(x).data)
    other.float()                        # buffers follow the module's dtype
    assert other.weight_u.dtype == other.weight_v.dtype == other(x.astype(np.float32)).dtype == np.float32


def test_the_improved_variant_keeps_the_initial_scale():
    plain = _layer(seed=5, n_power_iterations=100)
    improved = improved_spectral_norm(nn.Linear(6, 4, rng=np.random.default_rng(5)).double(),
                                      rng=np.random.default_rng(105), n_power_iterations=100)
    W0 = improved.weight_orig.data.copy()
    sigma0 = _top_singular_value(W0)
    np.testing.assert_allclose(improved.weight_sigma_init.data, sigma0, rtol=1e-12)
    x = Tensor(R.standard_normal((3, 6)), requires_grad=True)
    improved(x).sum().backward()
    np.testing.assert_allclose(improved.weight.data, W0, rtol=1e-8)      # sigma(W) = sigma0 at init
    plain(x).sum().backward()
    np.testing.assert_allclose(improved.weight.data, sigma0 * plain.weight.data, rtol=1e-12)
    np.testing.assert_allclose(improved.weight_orig.grad, sigma0 * plain.weight_orig.grad, rtol=1e-10)


@pytest.mark.parametrize("register", [spectral_norm, improved_spectral_norm])
def test_gradients_and_second_derivatives_pass_the_float64_checks(register):
    layer = register(nn.Linear(5, 3, rng=np.random.default_rng(6)), rng=np.random.default_rng(7))
    layer(R.standard_normal((2, 5)).astype(np.float32))    # one training step, then the checks run in eval mode
    x = R.standard_normal((4, 5))
    assert gradcheck(lambda x: layer(x).tanh(), [x], params=layer).ok
    assert gradgradcheck(lambda x: layer(x).tanh(), [x], params=layer).ok


def test_a_spectrally_normalised_layer_of_a_higher_rank_weight_uses_dim():
    class Conv(nn.Module):          # a weight (out, in, k) used as a matrix (out, in * k)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(R.standard_normal((4, 3, 2)))

        def forward(self, x):
            return x @ self.weight.reshape(4, -1).T

    for dim, rows in ((0, 4), (2, 2)):
        conv = spectral_norm(Conv(), dim=dim, n_power_iterations=200, rng=np.random.default_rng(1))
        conv(R.standard_normal((1, 6)))
        W = np.moveaxis(conv.weight.data, dim, 0).reshape(rows, -1)
        np.testing.assert_allclose(_top_singular_value(W), 1.0, rtol=1e-8)
        assert conv.weight_u.shape == (rows,)


def test_bad_uses_are_refused_with_clear_errors():
    with pytest.raises(KeyError, match="no parameter 'kernel'"):
        spectral_norm(nn.Linear(3, 2), name="kernel")
    with pytest.raises(ValueError, match="at least 1, got 0"):
        spectral_norm(nn.Linear(3, 2), n_power_iterations=0)
    layer = spectral_norm(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="already spectrally normalised"):
        spectral_norm(layer)
    with pytest.raises(TypeError, match="is a buffer"):
        layer.weight_u = np.zeros(2)
    with pytest.raises(TypeError, match="expected a minivit Module"):
        spectral_norm(lambda x: x)


def test_buffers_are_saved_loaded_and_converted_and_integer_buffers_keep_their_dtype():
    layer = nn.Linear(2, 2)
    layer.register_buffer("steps", Tensor(np.array(3)))
    layer.double()
    assert layer.steps.dtype == np.array(3).dtype and layer.weight.dtype == np.float64
    assert list(layer.state_dict()) == ["weight", "bias", "steps"]
    state = layer.state_dict()
    state["steps"] = np.array(7)
    layer.load_state_dict(state)
    assert int(layer.steps.item()) == 7
    with pytest.raises(TypeError, match="expected a Tensor"):
        layer.register_buffer("bad", np.zeros(2))
    with pytest.raises(KeyError, match="already has a parameter"):
        layer.register_buffer("weight", Tensor(np.zeros(2)))
