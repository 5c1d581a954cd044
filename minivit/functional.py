"""The public functional API, under the names of ``torch.nn.functional``.

Each function checks its inputs, then runs one op from ``minivit.ops`` (the forward and its hand-written
backward live there). Inputs may be Tensors or plain arrays (taken as constants).
"""

import math

import numpy as np

from minivit import devices, rng
from minivit.ops import (CrossEntropyFn, DropoutFn, GELUFn, LayerNormFn, LinearFn, LogSoftmaxFn,
                         MultiHeadSelfAttentionFn, PatchifyFn, ScaledDotProductAttentionFn, SoftmaxFn, UnpatchifyFn)
from minivit.ops import FoldFn, UnfoldFn
from minivit.ops import BinaryCrossEntropyWithLogitsFn, L2AttentionFn, LogSigmoidFn, SigmoidFn, SoftplusFn
from minivit.ops import BernoulliLogLikelihoodFn, GaussianKLFn, GaussianLogLikelihoodFn, ReparameterizeFn
from minivit.tensor import Tensor, concat, stack, torch_names

__all__ = ["linear", "gelu", "softmax", "log_softmax", "layer_norm", "scaled_dot_product_attention",
           "multi_head_self_attention", "cross_entropy", "dropout", "patchify", "unpatchify", "unfold_patches",
           "fold_patches", "concat", "stack",
           "sigmoid", "softplus", "logsigmoid", "binary_cross_entropy_with_logits", "l2_distance_attention",
           "reparameterize", "gaussian_kl", "bernoulli_log_likelihood", "gaussian_log_likelihood"]


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
    _floating("linear", x, weight)
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
    x = _tensor(x)
    _floating("gelu", x)
    return GELUFn.apply(x, approximate=approximate)


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


def layer_norm(x, *args, weight=None, bias=None, eps=1e-6):
    """Normalise the last axis to zero mean and unit variance, then scale by ``weight`` and shift by ``bias``.

    Called as ``layer_norm(x, weight, bias, eps)`` or, as PyTorch, ``layer_norm(x, (D,), weight, bias, eps)``;
    weight and bias may be left out (None): no scale, no shift.

    Args:
        x: (..., D), floating.
        weight, bias: (D,) or None.
        eps: added to the variance; 1e-6 as in timm's ViT (PyTorch's default is 1e-5).
    """
    x = _tensor(x)
    _floating("layer_norm", x)
    D = x.shape[-1]
    if args and isinstance(args[0], (int, tuple, list)):                # PyTorch's normalized_shape
        shape = (args[0],) if isinstance(args[0], int) else tuple(args[0])
        if shape != (D,):
            raise ValueError(f"layer_norm: normalized_shape {shape} must be the last axis ({D},) of x {x.shape}; "
                             "normalising over several axes is not supported")
        args = args[1:]
    if len(args) > 3:
        raise TypeError(f"layer_norm: too many positional arguments ({len(args)} after x and normalized_shape)")
    given = dict(zip(("weight", "bias", "eps"), args))
    weight, bias, eps = given.get("weight", weight), given.get("bias", bias), given.get("eps", eps)
    xp = devices.get_array_module(x.data)
    weight = Tensor(xp.ones(D, dtype=x.dtype)) if weight is None else _tensor(weight)
    bias = Tensor(xp.zeros(D, dtype=weight.dtype)) if bias is None else _tensor(bias)
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"layer_norm: x has shape {x.shape}, so weight and bias must be ({D},); "
                         f"got {weight.shape} and {bias.shape}")
    return LayerNormFn.apply(x, weight, bias, eps=eps)


def _floating(op, *tensors):
    for t in tensors:
        if t.dtype.kind != "f":
            raise TypeError(f"{op}: expected floating-point input, got dtype {t.dtype} (shape {t.shape}); "
                            "convert with .astype(np.float32) first")


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 return_attn=False):
    """softmax(q k^T / sqrt(d) + mask) v, with the softmax over the keys; PyTorch's signature.

    Args:
        q: (..., Nq, d) queries.
        k: (..., Nk, d) keys.
        v: (..., Nk, dv) values.
        attn_mask: broadcastable to (..., Nq, Nk): boolean (True where a query may look at a key) or floating
            (added to the scores; a constant, no gradient flows into it). A row that may look nowhere gives NaN,
            as in PyTorch.
        dropout_p: must be 0 (dropout on the attention weights is not supported).
        is_causal: query i looks at keys 0..i only (the top-left triangle, as PyTorch); not with ``attn_mask``.
        scale: multiplies the scores; 1/sqrt(d) by default.
        return_attn: also return the attention probabilities (..., Nq, Nk): a copy, as a Tensor without gradient.

    Returns:
        (..., Nq, dv), or (output, probabilities) with ``return_attn``.
    """
    q, k, v = _tensor(q), _tensor(k), _tensor(v)
    if min(q.ndim, k.ndim, v.ndim) < 2 or not (q.ndim == k.ndim == v.ndim) or q.shape[-1] != k.shape[-1] \
            or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape}; expected "
                         "q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) with at least 2 axes each")
    _floating("scaled_dot_product_attention", q, k, v)
    if dropout_p:
        raise ValueError(f"scaled_dot_product_attention: dropout_p={dropout_p} is not supported; pass 0")
    xp = devices.get_array_module(q.data)
    Nq, Nk = q.shape[-2], k.shape[-2]
    bias = None
    if is_causal:
        if attn_mask is not None:
            raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal=True, not both")
        attn_mask = xp.tril(xp.ones((Nq, Nk), dtype=bool))
    if attn_mask is not None:
        mask = attn_mask.data if isinstance(attn_mask, Tensor) else xp.asarray(attn_mask)
        try:
            batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
            fits = np.broadcast_shapes(tuple(mask.shape), batch + (Nq, Nk)) == batch + (Nq, Nk)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"scaled_dot_product_attention: attn_mask of shape {tuple(mask.shape)} does not "
                             f"broadcast to the scores' shape (..., {Nq}, {Nk}) of q {q.shape} and k {k.shape}")
        dtype = xp.result_type(q.dtype, k.dtype)
        if mask.dtype == bool:
            bias = xp.where(mask, 0.0, -xp.inf).astype(dtype)
        elif mask.dtype.kind == "f":
            bias = mask.astype(dtype, copy=False)
        else:
            raise TypeError(f"scaled_dot_product_attention: attn_mask must be boolean or floating, got {mask.dtype}")
    fn = ScaledDotProductAttentionFn()
    out = fn(q, k, v, scale=scale, bias=bias)
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


def cross_entropy(logits, target, label_smoothing=0.0, reduction="mean", weight=None, ignore_index=-100):
    """Cross-entropy between softmax(logits) and the target, fused with log-softmax, as PyTorch's.

    Args:
        logits: (B, K) unnormalised scores, floating.
        target: (B,) integer class indices in [0, K) (or ``ignore_index``), or (B, K) class probabilities
            (floating; rows summing to 1), which may require grad.
        label_smoothing: s in [0, 1): the target puts 1 - s on the class (on the given probabilities) and s/K on
            every class.
        reduction: 'mean' (default), 'sum' or 'none'. The mean divides by the summed weights of the target
            classes of the rows not ignored (by B for probability targets).
        weight: (K,) a weight per class, or None.
        ignore_index: rows whose class index equals it add nothing and count for nothing (-100 as PyTorch).

    Returns:
        a scalar, or (B,) with reduction='none' (0 for ignored rows).
    """
    logits, target = _tensor(logits), _tensor(target)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (B, K), got shape {logits.shape}")
    if logits.dtype.kind != "f":
        raise TypeError(f"cross_entropy: logits must be floating-point scores, got dtype {logits.dtype}; "
                        "convert with .astype(np.float32)")
    B, K = logits.shape
    soft = target.dtype.kind == "f" and target.ndim == 2
    if soft:
        if target.shape != logits.shape:
            raise ValueError(f"cross_entropy: probability targets have shape {target.shape}, expected {logits.shape}")
    else:
        if target.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype {target.dtype} "
                            f"and shape {target.shape} (class probabilities must be floating (B, K))")
        if target.shape != (B,):
            raise ValueError(f"cross_entropy: target has shape {target.shape}, expected ({B},) "
                             f"to match logits {logits.shape}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if weight is not None:
        weight = weight.data if isinstance(weight, Tensor) else weight
        if tuple(weight.shape) != (K,):
            raise ValueError(f"cross_entropy: weight must be ({K},), one per class, got shape {tuple(weight.shape)}")
        weight = weight.astype(logits.dtype, copy=False)
    # On the GPU a range check would wait for the device; loaders check labels on the host instead.
    if not soft and target.device == "cpu" and target.size:
        labels = target.data if ignore_index is None else target.data[target.data != ignore_index]
        if labels.size:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= K:
                raise ValueError(f"cross_entropy: target holds classes from {lo} to {hi}, expected 0..{K - 1} "
                                 f"for {K} logits" + ("" if ignore_index is None else
                                                      f" (or ignore_index {ignore_index})"))
    return CrossEntropyFn.apply(logits, target, label_smoothing=float(label_smoothing), reduction=reduction,
                                weight=weight, ignore_index=ignore_index)


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
        generator = rng.default_generator(devices.get_array_module(x.data))
    return DropoutFn.apply(x, p=float(p), generator=generator)


def patchify(images, patch_size):
    """Cut images into flattened patches, each in (C, P, P) order, patches in row-major grid order.

    Args:
        images: (B, C, H, W) with H and W divisible by ``patch_size``.

    Returns:
        (B, H/P * W/P, C*P*P)
    """
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patchify: patch_size must be a positive integer, got {patch_size!r}")
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
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"unpatchify: patch_size must be a positive integer, got {patch_size!r}")
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


def _window_settings(name, kernel_size, stride, padding):
    """(k, s, p) as ints, or a ValueError naming the setting, what it must be and what came."""
    stride = kernel_size if stride is None else stride
    for what, value, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name}: {what} must be an integer >= {least}, got {value!r}")
    return int(kernel_size), int(stride), int(padding)


def _check_window_fits(name, image_size, k, p):
    H, W = image_size
    if H + 2 * p < k or W + 2 * p < k:
        raise ValueError(f"{name}: expected an image of at least {k}x{k} after padding (kernel_size {k}), got "
                         f"{H}x{W} with padding {p}, {H + 2 * p}x{W + 2 * p} padded")


def unfold_patches(images, kernel_size, stride=None, padding=0, channels_last=False):
    """Cut images into (possibly overlapping) windows, each flattened in (C, k, k) order, windows in row-major
    grid order: ``torch.nn.functional.unfold`` with its last two axes swapped.

    Args:
        images: (B, C, H, W), or (B, H, W, C) with ``channels_last``.
        kernel_size: window side k.
        stride: step s between windows (default k: ``patchify``'s non-overlapping patches).
        padding: zeros p added on each side of H and W.
        channels_last: images (B, H, W, C), each window flattened in (k, k, C) order (faster: see
            ``minivit.ops.patch``); a Conv2d weight W (D, C, k, k) then pairs as ``W.permute(0, 2, 3, 1)``.

    Returns:
        (B, gh*gw, C*k*k) with gh = (H + 2p - k)//s + 1 and gw = (W + 2p - k)//s + 1.
    """
    k, s, p = _window_settings("unfold_patches", kernel_size, stride, padding)
    images = _tensor(images)
    if images.ndim != 4:
        layout = "(B, H, W, C)" if channels_last else "(B, C, H, W)"
        raise ValueError(f"unfold_patches: images must be {layout}, got shape {images.shape}")
    size = images.shape[1:3] if channels_last else images.shape[2:]
    _check_window_fits("unfold_patches", size, k, p)
    return UnfoldFn.apply(images, kernel_size=k, stride=s, padding=p, channels_last=bool(channels_last))


def fold_patches(patches, image_size, kernel_size, stride=None, padding=0, channels_last=False):
    """Add windows back into images: the adjoint of ``unfold_patches`` (and its backward). Pixels inside several
    windows get the sum; the padding is cropped off.

    Args:
        patches: (B, gh*gw, C*k*k) with the grid of ``unfold_patches`` for these settings (windows in (k, k, C)
            order with ``channels_last``).
        image_size: (H, W) of the images the windows were cut from.

    Returns:
        (B, C, H, W), or (B, H, W, C) with ``channels_last``.
    """
    k, s, p = _window_settings("fold_patches", kernel_size, stride, padding)
    H, W = (int(n) for n in image_size)
    _check_window_fits("fold_patches", (H, W), k, p)
    patches = _tensor(patches)
    gh, gw = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    if patches.ndim != 3 or patches.shape[1] != gh * gw or patches.shape[2] % (k * k):
        raise ValueError(f"fold_patches: expected patches (B, {gh * gw}, C*{k * k}) for a {H}x{W} image with "
                         f"kernel_size {k}, stride {s}, padding {p}, got shape {patches.shape}")
    return FoldFn.apply(patches, image_size=(H, W), kernel_size=k, stride=s, padding=p,
                        channels_last=bool(channels_last))


def sigmoid(x):
    """sigmoid(x) = 1 / (1 + e^-x), computed through e^-|x| so that it is finite for every logit."""
    return SigmoidFn.apply(_tensor(x))


def softplus(x, beta=1.0):
    """softplus(x) = log(1 + e^(beta x)) / beta, a smooth ReLU, finite for every x.

    PyTorch switches to the identity where beta x > 20 (``threshold``); minivit keeps the exact formula
    everywhere (the two differ by less than 2e-9 there).
    """
    if beta <= 0:
        raise ValueError(f"softplus: beta must be positive, got {beta}")
    x = _tensor(x)
    if beta == 1.0:
        return SoftplusFn.apply(x)
    return SoftplusFn.apply(x * beta) * (1.0 / beta)


def logsigmoid(x):
    """log sigmoid(x) = -softplus(-x): the log-probability of the positive class for a logit x."""
    return LogSigmoidFn.apply(_tensor(x))


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Binary cross-entropy of sigmoid(input) against ``target``, computed on the logits (stable for +-1e4):

        loss_i = -weight_i [pos_weight t_i log sigmoid(x_i) + (1 - t_i) log(1 - sigmoid(x_i))]

    Args:
        input: logits x of any shape.
        target: t in [0, 1], the same shape.
        weight: rescales each element's loss; broadcast against x.
        reduction: 'mean' (over all elements, default), 'sum' or 'none'.
        pos_weight: weight of the positive term, broadcast against x (one per class on the last axis).
    """
    x, t = _tensor(input), _tensor(target)
    if t.shape != x.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: target has shape {t.shape}, expected the shape of "
                         f"input {x.shape}")
    if t.dtype.kind != "f":
        raise TypeError(f"binary_cross_entropy_with_logits: target must be floating point (probabilities in "
                        f"[0, 1]), got dtype {t.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"binary_cross_entropy_with_logits: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    extra = () if pos_weight is None else (_tensor(pos_weight),)
    if weight is None:
        return BinaryCrossEntropyWithLogitsFn.apply(x, t, *extra, reduction=reduction)
    loss = BinaryCrossEntropyWithLogitsFn.apply(x, t, *extra, reduction="none") * _tensor(weight)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def l2_distance_attention(q, k, v, scale=None):
    """softmax_j(-||q_i - k_j||^2 * scale) v, attention by distance (Kim et al. 2021); scale = 1/sqrt(d).

    With tied projections (pass the same tensor as q and k) self-attention is Lipschitz, unlike dot-product
    attention: ViTGAN's discriminator uses it.

    Args:
        q: (..., Nq, d) queries.
        k: (..., Nk, d) keys.
        v: (..., Nk, dv) values; the leading axes of q, k and v equal.

    Returns:
        (..., Nq, dv)
    """
    q, k, v = _tensor(q), _tensor(k), _tensor(v)
    if (q.ndim < 2 or not q.ndim == k.ndim == v.ndim or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]
            or not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"l2_distance_attention: q {q.shape}, k {k.shape}, v {v.shape}; expected q (..., Nq, d), "
                         "k (..., Nk, d), v (..., Nk, dv) with the same leading axes")
    return L2AttentionFn.apply(q, k, v, scale=scale)


# ----------------------------------------------------------------------------------- variational autoencoders
def reparameterize(mu, logvar, eps=None, generator=None, samples=None):
    """z = mu + exp(logvar / 2) * eps: a sample of N(mu, exp(logvar)) through which gradients reach mu and logvar.

    Args:
        mu, logvar: (B, L) mean and log-variance of each image's posterior.
        eps: the standard-normal noise, of mu's shape or with leading sample axes (k, B, L); drawn when None.
        generator: draws eps (a ``numpy.random.Generator``, or CuPy's); the library default when None.
        samples: draw k samples per image, z of shape (k, B, L) (only when eps is None).
    """
    mu, logvar = _tensor(mu), _tensor(logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"reparameterize: mu {mu.shape} and logvar {logvar.shape} must have the same shape")
    if eps is None:
        xp = devices.get_array_module(mu.data)
        generator = generator or rng.default_generator(xp)
        shape = ((samples,) if samples else ()) + tuple(mu.shape)
        eps = generator.standard_normal(shape).astype(mu.dtype)
    elif samples is not None:
        raise ValueError("reparameterize: pass either eps or samples, not both")
    eps = _tensor(eps)
    if tuple(eps.shape[eps.ndim - mu.ndim:]) != tuple(mu.shape):
        raise ValueError(f"reparameterize: eps {eps.shape} must end with mu's shape {mu.shape}")
    return ReparameterizeFn.apply(mu, logvar, eps)


def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) = 1/2 sum (mu^2 + exp(logvar) - logvar - 1) over the last axis.

    Shapes: mu, logvar (..., L) -> (...)
    """
    mu, logvar = _tensor(mu), _tensor(logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"gaussian_kl: mu {mu.shape} and logvar {logvar.shape} must have the same shape")
    return GaussianKLFn.apply(mu, logvar)


def bernoulli_log_likelihood(logits, x):
    """log p(x | logits) for independent Bernoulli pixels, summed over every axis but the first.

    Shapes: logits (B, ...), x (same; pixels in [0, 1], usually binarised to {0, 1}) -> (B,)
    """
    logits, x = _tensor(logits), _tensor(x)
    if logits.shape != x.shape or logits.ndim < 1:
        raise ValueError(f"bernoulli_log_likelihood: logits {logits.shape} and x {x.shape} must have the same "
                         "shape (B, ...)")
    return BernoulliLogLikelihoodFn.apply(logits, x)


def gaussian_log_likelihood(x, mean, logvar):
    """log N(x; mean, exp(logvar)) for independent Gaussian pixels, summed over every axis but the first.

    Shapes: x (B, ...), mean (same), logvar broadcastable to x (a scalar for one shared variance) -> (B,)
    """
    x, mean, logvar = _tensor(x), _tensor(mean), _tensor(logvar)
    if x.shape != mean.shape or x.ndim < 1:
        raise ValueError(f"gaussian_log_likelihood: x {x.shape} and mean {mean.shape} must have the same shape")
    if logvar.ndim > x.ndim or any(a not in (1, b) for a, b in zip(logvar.shape[::-1], x.shape[::-1])):
        raise ValueError(f"gaussian_log_likelihood: logvar {logvar.shape} does not broadcast to x {x.shape}")
    return GaussianLogLikelihoodFn.apply(x, mean, logvar)
