"""Solutions to lesson 20."""

import numpy as np


def discriminator_loss_backward(real_logits, fake_logits):
    """-> (dreal (B_r,), dfake (B_f,)): the gradients of L_D with respect to the two sets of logits"""
    sigmoid = lambda x: 1 / (1 + np.exp(-x))                     # noqa: E731
    return (sigmoid(real_logits) - 1) / len(real_logits), sigmoid(fake_logits) / len(fake_logits)
