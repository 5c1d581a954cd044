"""Fused ops and their composed twins agree in values and in gradients."""

import numpy as np
import pytest

from minivit import Tensor, composed, functional as F

R = np.random.default_rng(11)


def _values_and_grads(fn, arrays, upstream):
    tensors = [Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    out = fn(*tensors)
    out.backward(upstream)
    return out.data, [t.grad for t in tensors if t.requires_grad]


PAIRS = {
    "softmax": (lambda x: F.softmax(x), lambda x: composed.softmax(x), [R.standard_normal((3, 7)) * 4]),
    "log_softmax": (lambda x: F.log_softmax(x, axis=0), lambda x: composed.log_softmax(x, axis=0),
                    [R.standard_normal((5, 3))]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: composed.layer_norm(x, w, b),
                   [R.standard_normal((2, 4, 6)), R.standard_normal(6), R.standard_normal(6)]),
    "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                  lambda q, k, v: composed.scaled_dot_product_attention(q, k, v),
                  [R.standard_normal((2, 3, 5, 4)) for _ in range(3)]),
    "multi_head_attention": (
        lambda qkv: F.multi_head_self_attention(qkv, 2),
        lambda qkv: composed.multi_head_self_attention(qkv, 2),
        [R.standard_normal((3, 5, 12))]),
    "cross_entropy": (lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
                      lambda x, t: composed.cross_entropy(x, t, label_smoothing=0.1),
                      [R.standard_normal((6, 4)), R.integers(0, 4, 6)]),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: composed.gelu_tanh(x),
                  [R.standard_normal((4, 5)) * 2]),
    "gelu": (lambda x: F.gelu(x), lambda x: composed.gelu(x), [R.standard_normal((4, 5)) * 2]),
    "patchify": (lambda x: F.patchify(x, 2), lambda x: composed.patchify(x, 2), [R.standard_normal((2, 3, 4, 6))]),
    "unpatchify": (lambda x: F.unpatchify(x, 2, grid=(2, 3)), lambda x: composed.unpatchify(x, 2, grid=(2, 3)),
                   [R.standard_normal((2, 6, 12))]),
    "unfold_patches": (lambda x: F.unfold_patches(x, 4, 2, 1), lambda x: composed.unfold_patches(x, 4, 2, 1),
                       [R.standard_normal((2, 3, 6, 8))]),
    "fold_patches": (lambda x: F.fold_patches(x, (6, 8), 4, 2, 1),
                     lambda x: composed.fold_patches(x, (6, 8), 4, 2, 1), [R.standard_normal((2, 12, 48))]),
    "unfold_patches_channels_last": (lambda x: F.unfold_patches(x, 4, 2, 1, channels_last=True),
                                     lambda x: composed.unfold_patches(x, 4, 2, 1, channels_last=True),
                                     [R.standard_normal((2, 6, 8, 3))]),
    "fold_patches_channels_last": (lambda x: F.fold_patches(x, (6, 8), 4, 2, 1, channels_last=True),
                                   lambda x: composed.fold_patches(x, (6, 8), 4, 2, 1, channels_last=True),
                                   [R.standard_normal((2, 12, 48))]),
    "linear": (lambda x, w, b: F.linear(x, w, b), lambda x, w, b: composed.linear(x, w, b),
               [R.standard_normal((2, 3, 4)), R.standard_normal((5, 4)), R.standard_normal(5)]),
    "sigmoid": (F.sigmoid, composed.sigmoid, [R.standard_normal((3, 4)) * 3]),
    "softplus": (F.softplus, composed.softplus, [R.standard_normal((3, 4)) * 3]),
    "logsigmoid": (F.logsigmoid, composed.logsigmoid, [R.standard_normal((3, 4)) * 3]),
    "binary_cross_entropy_with_logits": (
        lambda x, t, w: F.binary_cross_entropy_with_logits(x, t, pos_weight=w, reduction="sum"),
        lambda x, t, w: composed.binary_cross_entropy_with_logits(x, t, pos_weight=w, reduction="sum"),
        [R.standard_normal((4, 3)) * 2, R.uniform(0, 1, (4, 3)), R.uniform(0.5, 2, 3)]),
    "l2_distance_attention": (F.l2_distance_attention, composed.l2_distance_attention,
                              [R.standard_normal((2, 5, 4)), R.standard_normal((2, 6, 4)),
                               R.standard_normal((2, 6, 3))]),
}


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_and_composed_agree(name, dtype):
    fused, comp, arrays = PAIRS[name]
    arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in arrays]
    out_shape = fused(*arrays).shape
    upstream = R.standard_normal(out_shape).astype(dtype)
    v1, g1 = _values_and_grads(fused, arrays, upstream)
    v2, g2 = _values_and_grads(comp, arrays, upstream)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(v1, v2, rtol=tol, atol=tol)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
