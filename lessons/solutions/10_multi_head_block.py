"""Solutions to lesson 10."""

import numpy as np


def split_heads(qkv, nh):
    """qkv (B, N, 3D) -> q, k, v each (B, nh, N, hd)"""
    B, N, three_d = qkv.shape
    hd = three_d // (3 * nh)
    q, k, v = qkv.reshape(B, N, 3, nh, hd).transpose(2, 0, 3, 1, 4)
    return q, k, v


def split_heads_backward(dq, dk, dv):
    """dq, dk, dv each (B, nh, N, hd) -> dqkv (B, N, 3D)"""
    g = np.stack([dq, dk, dv])                   # (3, B, nh, N, hd)
    B, N = g.shape[1], g.shape[3]
    return g.transpose(1, 3, 0, 2, 4).reshape(B, N, -1)
