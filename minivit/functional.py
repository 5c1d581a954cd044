"""The public functional API, under the names of ``torch.nn.functional``.

Each function checks its inputs, then runs one op from ``minivit.ops`` (the forward and its hand-written
backward live there). Inputs may be Tensors or plain arrays (taken as constants).
"""

import math

from minivit import backend
from minivit.ops import (CrossEntropyFn, DropoutFn, GELUFn, LayerNormFn, LinearFn, LogSoftmaxFn,
                         MultiHeadSelfAttentionFn, PatchifyFn, ScaledDotProductAttentionFn, SoftmaxFn, UnpatchifyFn)
from minivit.tensor import Tensor, concat, stack, torch_names

__all__ = ["linear", "gelu", "softmax", "log_softmax", "layer_norm", "scaled_dot_product_attention",
           "multi_head_self_attention", "cross_entropy", "dropout", "patchify", "unpatchify", "concat", "stack"]


def _tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def linear(x, weight, bias=None):
    """y = x W^T + b.

    Args:
        x: (..., in) inputs.
        weight: (out, in), PyTorch's layout.
        bias: (out,) or None.

    Returns:
        (..., out)
    """
    x, weight = _tensor(x), _tensor(weight)
    if weight.ndim != 2 or x.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"linear: x has shape {x.shape} and weight {weight.shape}; expected x (..., in) "
                         "and weight (out, in) with the same `in`")
    if bias is None:
        return LinearFn.apply(x, weight)
    bias = _tensor(bias)
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},)")
    return LinearFn.apply(x, weight, bias)


def gelu(x, approximate="none"):
    """GELU(x) = x * Phi(x) with Phi the standard normal CDF (exact erf form, as timm and PyTorch).

    Args:
        x: any shape.
        approximate: 'none' (exact) or 'tanh' (x/2 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))).
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GELUFn.apply(_tensor(x), approximate=approximate)


def softmax(x, axis=None, *, dim=None):
    """softmax(x)_k = exp(x_k) / sum_j exp(x_j) along ``axis`` (or PyTorch's ``dim``; the last axis by default),
    computed with the max subtracted."""
    axis, _ = torch_names("softmax", axis, False, dim, None)
    return SoftmaxFn.apply(_tensor(x), axis=-1 if axis is None else axis)


def log_softmax(x, axis=None, *, dim=None):
    """log_softmax(x)_k = x_k - log sum_j exp(x_j) along ``axis`` (or ``dim``; the last axis by default),
    computed with the max subtracted."""
    axis, _ = torch_names("log_softmax", axis, False, dim, None)
    return LogSoftmaxFn.apply(_tensor(x), axis=-1 if axis is None else axis)


def layer_norm(x, weight, bias, eps=1e-6):
    """Normalise the last axis to zero mean and unit variance, then scale by ``weight`` and shift by ``bias``.

    Args:
        x: (..., D).
        weight, bias: (D,).
        eps: added to the variance; 1e-6 as in timm's ViT.
    """
    x, weight, bias = _tensor(x), _tensor(weight), _tensor(bias)
    D = x.shape[-1]
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"layer_norm: x has shape {x.shape}, so weight and bias must be ({D},); "
                         f"got {weight.shape} and {bias.shape}")
    return LayerNormFn.apply(x, weight, bias, eps=eps)


def scaled_dot_product_attention(q, k, v, scale=None, return_attn=False):
    """softmax(q k^T / sqrt(d)) v, with the softmax over the keys.

    Args:
        q: (..., Nq, d) queries.
        k: (..., Nk, d) keys.
        v: (..., Nk, dv) values.
        scale: multiplies the scores; 1/sqrt(d) by default.
        return_attn: also return the attention probabilities (..., Nq, Nk): a copy, as a Tensor without gradient.

    Returns:
        (..., Nq, dv), or (output, probabilities) with ``return_attn``.
    """
    q, k, v = _tensor(q), _tensor(k), _tensor(v)
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.ndim < 2 or not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape}; expected "
                         "q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv)")
    fn = ScaledDotProductAttentionFn()
    out = fn(q, k, v, scale=scale)
    return (out, Tensor(fn.p.copy())) if return_attn else out   # a copy: backward still reads fn.p


def multi_head_self_attention(qkv, num_heads, return_attn=False):
    """Self-attention with ``num_heads`` heads on a packed projection qkv = [q | k | v] (timm's layout).

    Equal to splitting qkv.reshape(B, N, 3, nh, hd) into q, k, v of shape (B, nh, N, hd), running
    ``scaled_dot_product_attention`` on them and putting the heads side by side again, in one op.

    Args:
        qkv: (B, N, 3D), D divisible by ``num_heads``.
        return_attn: also return the probabilities (B, nh, N, N): a copy, as a Tensor without gradient.

    Returns:
        (B, N, D), or (output, probabilities) with ``return_attn``.
    """
    qkv = _tensor(qkv)
    if qkv.ndim != 3 or qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"multi_head_self_attention: qkv must be (B, N, 3D) with D divisible by num_heads "
                         f"{num_heads}, got shape {qkv.shape}")
    fn = MultiHeadSelfAttentionFn()
    out = fn(qkv, num_heads=num_heads)
    return (out, Tensor(fn.p.copy())) if return_attn else out   # a copy: backward still reads fn.p


def cross_entropy(logits, target, label_smoothing=0.0, reduction="mean"):
    """Cross-entropy between softmax(logits) and the target classes, fused with log-softmax.

    Args:
        logits: (B, K) unnormalised scores.
        target: (B,) integer class indices in [0, K).
        label_smoothing: s in [0, 1): the target puts 1 - s on the class and s/K on every class.
        reduction: 'mean' (default), 'sum' or 'none'.

    Returns:
        a scalar, or (B,) with reduction='none'.
    """
    logits, target = _tensor(logits), _tensor(target)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (B, K), got shape {logits.shape}")
    if target.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: target has shape {target.shape}, expected ({logits.shape[0]},) "
                         f"to match logits {logits.shape}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    # On the GPU a range check would wait for the device; loaders check labels on the host instead.
    if target.device == "cpu" and target.size:
        lo, hi = int(target.data.min()), int(target.data.max())
        K = logits.shape[1]
        if lo < 0 or hi >= K:
            raise ValueError(f"cross_entropy: target holds classes from {lo} to {hi}, expected 0..{K - 1} "
                             f"for {K} logits")
    return CrossEntropyFn.apply(logits, target, label_smoothing=float(label_smoothing), reduction=reduction)


def dropout(x, p=0.5, training=True, generator=None):
    """Zero each element with probability p and scale the rest by 1/(1-p); the identity when not training.

    Args:
        x: any shape.
        p: drop probability in [0, 1).
        training: when False, return x unchanged.
        generator: a ``numpy.random.Generator`` (or CuPy's, for GPU tensors); the library default otherwise,
            seeded by ``minivit.manual_seed``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    x = _tensor(x)
    if not training or p == 0.0:
        return x
    if generator is None:
        generator = backend.default_generator(backend.get_array_module(x.data))
    return DropoutFn.apply(x, p=float(p), generator=generator)


def patchify(images, patch_size):
    """Cut images into flattened patches, each in (C, P, P) order, patches in row-major grid order.

    Args:
        images: (B, C, H, W) with H and W divisible by ``patch_size``.

    Returns:
        (B, H/P * W/P, C*P*P)
    """
    images = _tensor(images)
    if images.ndim != 4:
        raise ValueError(f"patchify: images must be (B, C, H, W), got shape {images.shape}")
    H, W = images.shape[2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"patchify: image {H}x{W} is not divisible by patch_size {patch_size}")
    return PatchifyFn.apply(images, patch_size=patch_size)


def unpatchify(patches, patch_size, grid=None):
    """Put flattened patches back into images: the inverse of ``patchify``.

    Args:
        patches: (B, Np, C*P*P).
        grid: (rows, cols) of patches; a square grid by default.

    Returns:
        (B, C, rows*P, cols*P)
    """
    patches = _tensor(patches)
    if patches.ndim != 3 or patches.shape[2] % (patch_size * patch_size):
        raise ValueError(f"unpatchify: patches must be (B, Np, C*P*P) with P={patch_size}, got {patches.shape}")
    Np = patches.shape[1]
    if grid is None:
        side = math.isqrt(Np)
        if side * side != Np:
            raise ValueError(f"unpatchify: {Np} patches do not make a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    if grid[0] * grid[1] != Np:
        raise ValueError(f"unpatchify: grid {grid} holds {grid[0] * grid[1]} patches, got {Np}")
    return UnpatchifyFn.apply(patches, patch_size=patch_size, grid=tuple(grid))
