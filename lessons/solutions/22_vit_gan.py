"""Solutions to lesson 22."""

import numpy as np


def sln_backward(h, gamma, beta, dy, eps):
    centred = h - h.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps)
    h_hat = centred * rstd
    g = dy * gamma[:, None, :]                          # each sample's own scale
    dh = rstd * (g - g.mean(-1, keepdims=True) - h_hat * (g * h_hat).mean(-1, keepdims=True))
    return dh, (dy * h_hat).sum(axis=1), dy.sum(axis=1)   # per sample: summed over the tokens only


def frechet_distance(mu1, S1, mu2, S2):
    # tr (S1 S2)^(1/2) = sum of the square roots of the eigenvalues of the symmetric R S2 R, R = S1^(1/2)
    values, vectors = np.linalg.eigh(S1)
    root1 = vectors @ np.diag(np.sqrt(np.maximum(values, 0.0))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ S2 @ root1)
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(S1) + np.trace(S2) - 2 * np.sqrt(np.maximum(middle, 0.0)).sum())


def minibatch_std_backward(x, dy, group_size, eps):
    B, D = x.shape
    groups = x.reshape(B // group_size, group_size, D)
    centred = groups - groups.mean(axis=1, keepdims=True)
    sigma = np.sqrt((centred ** 2).mean(axis=1, keepdims=True) + eps)          # (B/g, 1, D)
    ds = dy[:, -1].reshape(B // group_size, group_size, 1).sum(axis=1, keepdims=True)   # s_k is in all g rows
    return dy[:, :-1] + (ds * centred / (group_size * D * sigma)).reshape(B, D)
