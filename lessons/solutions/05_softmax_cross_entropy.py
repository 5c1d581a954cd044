"""Solutions to lesson 5."""

import numpy as np


def log_softmax_backward(logp, dy):
    """logp = log_softmax(x) along the last axis, dy = dL/dlogp -> dL/dx"""
    # d log p_k / d x_j = [k = j] - p_j, so dx_j = dy_j - p_j * sum_k dy_k
    return dy - np.exp(logp) * dy.sum(axis=-1, keepdims=True)


def smoothed_cross_entropy_backward(logits, labels, smoothing):
    """logits (B, K), labels (B,), smoothing in [0, 1) -> dL/dlogits of the mean smoothed cross-entropy"""
    B, K = logits.shape
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    q = np.full((B, K), smoothing / K)
    q[np.arange(B), labels] += 1.0 - smoothing
    return (p - q) / B              # for one row, -sum_k q_k log p_k has gradient p - q because q sums to 1
