"""Solutions to lesson 9."""

import math

import numpy as np


def causal_attention_backward(q, k, v, dy):
    """q (..., N, d), k (..., N, d), v (..., N, e), dy (..., N, e) -> dq, dk, dv"""
    scale = 1 / math.sqrt(q.shape[-1])
    s = q @ k.swapaxes(-1, -2) * scale
    allowed = np.tril(np.ones(s.shape[-2:], dtype=bool))        # query i sees keys 0..i
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))                     # exactly 0 above the diagonal
    p /= p.sum(-1, keepdims=True)
    dv = p.swapaxes(-1, -2) @ dy
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale      # zero where p is zero: the mask needs no more
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv
