"""Solutions to lesson 17."""

import numpy as np


def momentum_update(p, g, buf, lr, momentum):
    """-> (p, buf) after one step of SGD with momentum"""
    buf = momentum * buf + g
    return p - lr * buf, buf


def rmsprop_update(p, g, sq, lr, alpha, eps):
    """-> (p, sq) after one step of RMSProp"""
    sq = alpha * sq + (1 - alpha) * g * g
    return p - lr * g / (np.sqrt(sq) + eps), sq


def adam_update(p, g, m, v, t, lr, betas, eps):
    """-> (p, m, v) after one step of Adam (t counts steps from 1)"""
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v
