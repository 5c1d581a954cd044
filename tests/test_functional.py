"""The public functional API: clear errors on bad input, and the attention probabilities it can return."""

import numpy as np
import pytest

from minivit import Tensor, functional as F
from minivit import backend
from minivit.gradcheck import gradcheck, gradgradcheck


def test_cross_entropy_rejects_float_labels_and_out_of_range_classes():
    x = np.zeros((3, 4))
    with pytest.raises(TypeError, match="integer class indices, got dtype float64"):
        F.cross_entropy(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"classes from 0 to 4, expected 0..3"):
        F.cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"classes from -1"):
        F.cross_entropy(x, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"target has shape \(2,\), expected \(3,\)"):
        F.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="logits must be"):
        F.cross_entropy(np.zeros(4), np.array([0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=1.0)


def test_patchify_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="image 30x30 is not divisible by patch_size 4"):
        F.patchify(np.zeros((1, 1, 30, 30)), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        F.patchify(np.zeros((30, 30)), 2)
    with pytest.raises(ValueError, match="square grid"):
        F.unpatchify(np.zeros((1, 6, 4)), 2)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\) and weight \(4, 5\)"):
        F.linear(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"weight and bias must be \(3,\)"):
        F.layer_norm(np.zeros((2, 3)), np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError, match="q .* k .* v"):
        F.scaled_dot_product_attention(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(np.zeros(2), approximate="fast")
    with pytest.raises(ValueError, match="dropout: p"):
        F.dropout(np.zeros(2), p=1.0)


def test_attention_returns_probabilities_that_sum_to_one():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3)) for _ in range(3))
    out, probs = F.scaled_dot_product_attention(q, k, v, return_attn=True)
    assert probs.shape == (2, 5, 5) and not probs.requires_grad
    np.testing.assert_allclose(probs.data.sum(-1), 1.0)
    np.testing.assert_allclose(out.data, probs.data @ v)


def test_dropout_is_the_identity_when_not_training_and_reproducible_with_a_seed():
    x = Tensor(np.ones((4, 4)))
    assert F.dropout(x, 0.5, training=False) is x
    a = F.dropout(x, 0.5, generator=np.random.default_rng(5)).data
    b = F.dropout(x, 0.5, generator=np.random.default_rng(5)).data
    np.testing.assert_array_equal(a, b)


class FakeCupyArray:
    """Stands in for a CuPy array: only its module name matters to the device check."""
    __module__ = "cupy._core.core"
    shape, ndim = (2,), 1


def test_mixing_devices_names_both():
    with pytest.raises(TypeError, match=r"AddFn: inputs live on different devices \(input 0: numpy.ndarray on "
                                        r"cpu, input 1: cupy._core.core.FakeCupyArray on cuda\)"):
        backend.check_same_device([np.zeros(2), FakeCupyArray()], "AddFn")


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.normalize_device("tpu")


def test_layer_norm_without_weight_and_bias_and_with_pytorchs_normalized_shape():
    from minivit import Tensor
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    plain = F.layer_norm(x, (5,)).data
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(plain, ref, rtol=1e-12)
    np.testing.assert_allclose(F.layer_norm(x).data, ref, rtol=1e-12)
    np.testing.assert_allclose(F.layer_norm(x, 5, w, b, 1e-5).data, F.layer_norm(x, w, b, eps=1e-5).data)
    np.testing.assert_allclose(F.layer_norm(x, weight=w).data, ref * w, rtol=1e-12)
    np.testing.assert_allclose(F.layer_norm(x, bias=b).data, ref + b, rtol=1e-12)
    t = Tensor(x, requires_grad=True)
    F.layer_norm(t, (5,)).backward(rng.standard_normal(x.shape))
    assert t.grad.shape == x.shape
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, (3, 5))
    assert gradcheck(lambda a: F.layer_norm(a, (5,), eps=1e-5), [x]).ok
    assert gradgradcheck(lambda a: F.layer_norm(a), [x[0]]).ok


def test_layer_norm_without_weight_matches_torch():
    torch = pytest.importorskip("torch")
    from minivit import Tensor
    x = np.random.default_rng(1).standard_normal((4, 6))
    t, r = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    upstream = np.random.default_rng(2).standard_normal((4, 6))
    F.layer_norm(t, (6,), eps=1e-5).backward(upstream)
    y = torch.nn.functional.layer_norm(r, (6,), eps=1e-5)
    y.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(F.layer_norm(x, (6,), eps=1e-5).data, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t.grad, r.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_integer_inputs_get_named_errors():
    with pytest.raises(TypeError, match="linear: expected floating-point input, got dtype int64"):
        F.linear(np.ones((2, 3), np.int64), np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="layer_norm: expected floating-point"):
        F.layer_norm(np.ones((2, 3), np.uint8))
    with pytest.raises(TypeError, match="gelu: expected floating-point"):
        F.gelu(np.ones(3, np.int32))


def test_attention_masks_hide_keys_and_is_causal_is_the_lower_triangle():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 6, 2))
    _, probs = F.scaled_dot_product_attention(q, k, v, is_causal=True, return_attn=True)
    np.testing.assert_array_equal(probs.data[:, np.triu(np.ones((4, 6)), 1) > 0], 0.0)
    np.testing.assert_allclose(probs.data.sum(-1), 1.0)
    mask = rng.random((4, 6)) < 0.5
    mask[:, 2] = True
    out, probs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_attn=True)
    np.testing.assert_array_equal(probs.data[:, ~mask], 0.0)
    s = np.where(mask, q @ k.swapaxes(1, 2) / np.sqrt(3), -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out.data, (e / e.sum(-1, keepdims=True)) @ v, rtol=1e-12)
    float_mask = rng.standard_normal((1, 4, 6))
    shifted = F.scaled_dot_product_attention(q, k, v, attn_mask=Tensor(float_mask)).data
    s = q @ k.swapaxes(1, 2) / np.sqrt(3) + float_mask
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(shifted, (e / e.sum(-1, keepdims=True)) @ v, rtol=1e-12)
    assert gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), [q, k, v]).ok
    assert gradgradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), [q, k, v]).ok
    for dtype in (np.float32, np.float64):                       # the CPU's unshifted path is not taken with a mask
        out = F.scaled_dot_product_attention(*(a.astype(dtype) for a in (q, k, v)), is_causal=True)
        assert out.dtype == dtype and np.isfinite(out.data).all()


def test_attention_errors_are_named():
    q = np.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="not both"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((4, 4), bool), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((3, 4), bool))
    with pytest.raises(TypeError, match="boolean or floating"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((4, 4), np.int64))
    with pytest.raises(ValueError, match="at least 2 axes"):
        F.scaled_dot_product_attention(np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        F.scaled_dot_product_attention(np.zeros((2, 3), np.int64), np.zeros((2, 3)), np.zeros((2, 3)))
