"""Solutions to lesson 21."""

import numpy as np

import minivit as mv
from minivit import Tensor


def gradient_penalty(critic, real, fake, a, lam=10.0):
    x_hat = Tensor(a * real + (1 - a) * fake, requires_grad=True)                 # one a per sample
    (g,) = mv.grad(critic(x_hat).sum(), x_hat, create_graph=True)                 # each sample's own gradient
    norms = (g * g).sum(axis=tuple(range(1, g.ndim))) ** 0.5                      # one norm per sample
    return lam * ((norms - 1.0) ** 2).mean()


def spectral_norm_backward(W, u, v, dy):
    sigma = u @ W @ v
    # Y = W / sigma: directly dy / sigma; through sigma, dL/dsigma = -sum(dy * W) / sigma^2 and dsigma/dW = u v^T
    return dy / sigma - ((dy * W).sum() / sigma ** 2) * np.outer(u, v)
