"""Solutions to lesson 16."""

import math

import numpy as np
from scipy.special import erf


def block_backward(x, params, dy, nh):
    """x (B, N, D), params {name: array}, dy (B, N, D) -> {"dm": ..., "dx": ..., "dnorm1.weight": ..., ...}"""
    P, c = params, block_forward(x, params, nh)                 # block_forward: the lesson's forward
    B, N, D = x.shape
    hd = D // nh
    g = {}

    def linear_back(name, inp, dout):                            # out = inp W^T + b over (B, N, .)
        g[f"d{name}.weight"] = dout.reshape(-1, dout.shape[-1]).T @ inp.reshape(-1, inp.shape[-1])
        g[f"d{name}.bias"] = dout.sum(axis=(0, 1))
        return dout @ P[f"{name}.weight"]

    def layer_norm_back(name, inp, dout, eps=1e-6):
        xc = inp - inp.mean(-1, keepdims=True)
        r = 1 / np.sqrt((xc ** 2).mean(-1, keepdims=True) + eps)
        xhat = xc * r
        g[f"d{name}.weight"] = (dout * xhat).sum(axis=(0, 1))
        g[f"d{name}.bias"] = dout.sum(axis=(0, 1))
        dxhat = dout * P[f"{name}.weight"]
        return r * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))

    g["dm"] = dy                                                  # y = x1 + m
    g["dg"] = linear_back("mlp.fc2", c["g"], g["dm"])
    f1 = c["f1"]
    gelu_grad = 0.5 * (1 + erf(f1 / math.sqrt(2))) + f1 * np.exp(-f1 * f1 / 2) / math.sqrt(2 * math.pi)
    g["df1"] = g["dg"] * gelu_grad
    g["dh2"] = linear_back("mlp.fc1", c["h2"], g["df1"])
    g["dx1"] = dy + layer_norm_back("norm2", c["x1"], g["dh2"])   # the residual: dy directly, plus the MLP path
    g["da"] = g["dx1"]                                            # x1 = x + a
    g["dattn"] = linear_back("attn.proj", c["attn"], g["da"])
    dheads = g["dattn"].reshape(B, N, nh, hd).transpose(0, 2, 1, 3)              # (B, nh, N, hd)
    p, q, k, v = c["p"], c["q"], c["k"], c["v"]
    dv = p.swapaxes(-1, -2) @ dheads
    dp = dheads @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(hd)
    dq, dk = ds @ k, ds.swapaxes(-1, -2) @ q
    g["dqkv"] = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * D)
    g["dh1"] = linear_back("attn.qkv", c["h1"], g["dqkv"])
    g["dx"] = g["dx1"] + layer_norm_back("norm1", x, g["dh1"])   # the residual: dx1 directly, plus attention
    return g
