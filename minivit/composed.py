"""The same layers built from primitives (+, *, exp, sum, @, ...) and differentiated by autograd.

These are the "composed twins" of the fused ops in ``minivit.functional``: slower and hungrier for memory (every
intermediate is kept for backward), but each line is a line of the math. The lessons start from them, and the
tests check that fused and composed agree in values and in gradients.
"""

import math

from minivit import backend
from minivit.tensor import Tensor


def linear(x, weight, bias=None):
    """x W^T + b.  Shapes: x (..., in), W (out, in), b (out,) -> (..., out)"""
    y = x @ weight.T
    return y if bias is None else y + bias


def softmax(x, axis=-1):
    """exp(x - max x) / sum exp(x - max x).  Shapes: x (..., K) -> (..., K)"""
    # The shift changes no output, so it is a constant to autograd.
    e = (x - x.max(axis=axis, keepdims=True).detach()).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    """x - max x - log sum exp(x - max x).  Shapes: x (..., K) -> (..., K)"""
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def layer_norm(x, weight, bias, eps=1e-6):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis.  Shapes: x (..., D), w, b (D,) -> (..., D)"""
    xc = x - x.mean(axis=-1, keepdims=True)
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / (var + eps) ** 0.5 * weight + bias


def gelu_tanh(x):
    """x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).  Shapes: x -> same"""
    return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)).tanh())


def scaled_dot_product_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v.  Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) -> (..., Nq, dv)"""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale   # (..., Nq, Nk)
    return softmax(scores, axis=-1) @ v


def multi_head_self_attention(qkv, num_heads):
    """Split a packed qkv into heads, attend in each, put the heads side by side again.

    Shapes: qkv (B, N, 3D) -> (B, N, D)
    """
    B, N, three_d = qkv.shape
    D = three_d // 3
    hd = D // num_heads
    heads = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)     # (3, B, nh, N, hd)
    out = scaled_dot_product_attention(heads[0], heads[1], heads[2])       # (B, nh, N, hd)
    return out.transpose(1, 2).reshape(B, N, D)                            # (B, N, nh*hd)


def cross_entropy(logits, target, label_smoothing=0.0):
    """mean over the batch of -sum_k q_k log softmax(logits)_k, q the (smoothed) one-hot target.

    Shapes: logits (B, K), target (B,) integers -> ()
    """
    target = target.data if isinstance(target, Tensor) else target
    xp = backend.get_array_module(logits.data)
    K = logits.shape[1]
    q = xp.eye(K, dtype=logits.dtype)[target] * (1.0 - label_smoothing) + label_smoothing / K   # (B, K)
    return -(log_softmax(logits, axis=1) * q).sum(axis=1).mean()
