"""Solutions to lesson 23."""

import numpy as np


def gaussian_kl(mu, logvar):
    """-> (kl, dmu (B, L), dlogvar (B, L)): the batch mean of KL(N(mu, e^logvar) || N(0, I)) and its gradients"""
    B = mu.shape[0]
    variance = np.exp(logvar)
    kl = 0.5 * (mu ** 2 + variance - logvar - 1).sum() / B
    return kl, mu / B, 0.5 * (variance - 1) / B
