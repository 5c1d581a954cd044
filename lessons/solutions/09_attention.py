"""Solutions to lesson 9."""

import math

import numpy as np


def attention_backward(q, k, v, dy):
    """q (..., N, d), k (..., M, d), v (..., M, e), dy (..., N, e) -> dq, dk, dv"""
    scale = 1 / math.sqrt(q.shape[-1])
    s = q @ k.swapaxes(-1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = p.swapaxes(-1, -2) @ dy
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv
