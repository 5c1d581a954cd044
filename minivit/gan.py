"""GAN losses and penalties, each written from its formula.

A discriminator D gives a logit l(x) for "x is real", so D(x) = sigmoid(l(x)). Every classic loss is written on
the logits with the two stable identities

    log D(x)       = log sigmoid(l)  = logsigmoid(l)
    log(1 - D(x))  = log sigmoid(-l) = logsigmoid(-l)

so that a confident discriminator (l = +-1e4) gives finite losses and gradients. Expectations E are batch means.
A Wasserstein critic's output is a score, not a logit. ``LOSSES`` names each pair (discriminator loss, generator
loss) for a training loop that picks one by name.

The gradient penalties differentiate the discriminator with respect to its input with ``create_graph=True``, so
that the penalty itself can be back-propagated into the discriminator's parameters (a double backward). They
take the discriminator as a function of a batch: the gradient of the summed outputs with respect to the batch
holds each sample's own gradient when the discriminator treats every sample on its own. One that does not (a
minibatch standard deviation feature, ``ViTDiscriminator(minibatch_std=g)``) adds, to each sample's gradient, how
its group's other logits move with it; the penalty is then taken on that, as ProGAN did.
"""

import numpy as np

from minivit import devices, rng
from minivit import functional as F
from minivit.autograd import grad
from minivit.tensor import Tensor, stack

__all__ = ["discriminator_loss", "generator_loss_minimax", "generator_loss_non_saturating",
           "hinge_discriminator_loss", "hinge_generator_loss", "wasserstein_critic_loss",
           "wasserstein_generator_loss", "interpolate", "gradient_penalty", "r1_penalty", "LOSSES", "ring_centres",
           "ring_of_gaussians", "mode_counts"]


def _tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def _relu(x):
    """max(x, 0), as the larger of x and a zero beside it."""
    return stack([x, x * 0.0]).max(axis=0)


# ------------------------------------------------------------------------------ the minimax game (Goodfellow 2014)
def discriminator_loss(real_logits, fake_logits):
    """L_D = -E_x[log D(x)] - E_z[log(1 - D(G(z)))]: the cross-entropy of calling real 1 and fake 0."""
    real_logits, fake_logits = _tensor(real_logits), _tensor(fake_logits)
    return -F.logsigmoid(real_logits).mean() - F.logsigmoid(-fake_logits).mean()


def generator_loss_minimax(fake_logits):
    """L_G = E_z[log(1 - D(G(z)))]: the generator's side of the minimax game (it minimises what D maximises).

    It saturates: where D rejects the fakes confidently (l << 0), dL_G/dl = -sigmoid(l) is near 0, so the generator
    learns least exactly when it is worst. ``generator_loss_non_saturating`` is the usual fix.
    """
    return F.logsigmoid(-_tensor(fake_logits)).mean()


def generator_loss_non_saturating(fake_logits):
    """L_G = -E_z[log D(G(z))]: the same fixed point as the minimax loss, with dL_G/dl = -(1 - sigmoid(l)) near
    -1 where D rejects the fakes, so that a losing generator still gets a strong gradient."""
    return -F.logsigmoid(_tensor(fake_logits)).mean()


# ------------------------------------------------------------------------------ hinge (Lim & Ye 2017; SAGAN, BigGAN)
def hinge_discriminator_loss(real_logits, fake_logits):
    """L_D = E_x[max(0, 1 - l(x))] + E_z[max(0, 1 + l(G(z)))]: a margin of 1 on each side."""
    return _relu(1.0 - _tensor(real_logits)).mean() + _relu(1.0 + _tensor(fake_logits)).mean()


def hinge_generator_loss(fake_logits):
    """L_G = -E_z[l(G(z))]."""
    return -_tensor(fake_logits).mean()


# ------------------------------------------------------------------------------ Wasserstein (Arjovsky et al. 2017)
def wasserstein_critic_loss(real_scores, fake_scores):
    """L_D = E_z[f(G(z))] - E_x[f(x)]: minimising it makes the critic f estimate the Wasserstein-1 distance
    (given a Lipschitz bound: a gradient penalty, spectral norm or weight clipping)."""
    return _tensor(fake_scores).mean() - _tensor(real_scores).mean()


def wasserstein_generator_loss(fake_scores):
    """L_G = -E_z[f(G(z))]."""
    return -_tensor(fake_scores).mean()


# ------------------------------------------------------------------------------ gradient penalties
def interpolate(real, fake, generator=None):
    """x_hat = a x + (1 - a) G(z) with one a ~ U[0, 1) per sample, drawn as ``generator.random((B, 1, ..., 1))``.

    Both inputs are taken as constants (their arrays), and x_hat is a new leaf that requires a gradient.
    ``generator`` is a NumPy (or CuPy) Generator; the library default otherwise, seeded by
    ``minivit.manual_seed``.
    """
    real, fake = _tensor(real).data, _tensor(fake).data
    if real.shape != fake.shape:
        raise ValueError(f"interpolate: real {real.shape} and fake {fake.shape} must have the same shape")
    if generator is None:
        generator = rng.default_generator(devices.get_array_module(real))
    a = generator.random((real.shape[0],) + (1,) * (real.ndim - 1), dtype=real.dtype)
    return Tensor(a * real + (1 - a) * fake, requires_grad=True)


def _input_gradient(discriminator, x):
    """grad_x of sum_i D(x_i), with the graph kept so that it can be differentiated again."""
    (g,) = grad(discriminator(x).sum(), x, create_graph=True)
    return g


def _squared_norms(g):
    """||g_i||^2 for each sample i of a batch (every axis but the first summed)."""
    return (g * g).sum(axis=tuple(range(1, g.ndim)))


def gradient_penalty(discriminator, real, fake, lam=10.0, generator=None):
    """WGAN-GP (Gulrajani et al. 2017): lam * E[(||grad_x D(x_hat)||_2 - 1)^2] at per-sample interpolates
    x_hat = a x + (1 - a) G(z) (see ``interpolate``), pushing the critic's gradient norm towards 1 between the
    two distributions. Back-propagating it reaches the critic's parameters through a double backward.

    Args:
        discriminator: a callable (a Module) from a batch (B, ...) to scores (B,) or (B, 1).
        real, fake: batches of the same shape; used as constants.
        lam: the penalty's weight, 10 in the paper.
        generator: draws a (see ``interpolate``).
    """
    x_hat = interpolate(real, fake, generator)
    norms = _squared_norms(_input_gradient(discriminator, x_hat)) ** 0.5
    return lam * ((norms - 1.0) ** 2).mean()


def r1_penalty(discriminator, real, gamma=10.0):
    """R1 (Mescheder et al. 2018): gamma / 2 * E_x[||grad_x D(x)||_2^2] on real data only.

    Args:
        discriminator: a callable from a batch (B, ...) to logits (B,) or (B, 1).
        real: a batch of real data; used as a constant.
        gamma: the penalty's weight.
    """
    x = Tensor(_tensor(real).data, requires_grad=True)
    return (gamma / 2) * _squared_norms(_input_gradient(discriminator, x)).mean()


# name -> (discriminator loss(real, fake), generator loss(fake)); the penalties are added on top by the caller
LOSSES = {
    "minimax": (discriminator_loss, generator_loss_minimax),
    "non-saturating": (discriminator_loss, generator_loss_non_saturating),
    "hinge": (hinge_discriminator_loss, hinge_generator_loss),
    "wasserstein": (wasserstein_critic_loss, wasserstein_generator_loss),
}


# ------------------------------------------------------------------------------ a toy distribution with modes
def ring_centres(modes=8, radius=2.0):
    """The centres c_k = radius (cos(2 pi k / modes), sin(2 pi k / modes)), k = 0..modes-1: (modes, 2)."""
    angles = 2 * np.pi * np.arange(modes) / modes
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def ring_of_gaussians(n, rng, modes=8, radius=2.0, std=0.05, dtype=np.float32):
    """n samples of the equal mixture of N(c_k, std^2 I) around ``ring_centres``: the classic test of mode
    collapse (a collapsed generator puts its samples on a few of the modes). ``rng``: a NumPy Generator."""
    centres = ring_centres(modes, radius)[rng.integers(0, modes, n)]
    return (centres + std * rng.standard_normal((n, 2))).astype(dtype)


def mode_counts(samples, centres, radius):
    """For each centre, how many of the samples (n, 2) lie within ``radius`` of it (3 std, say)."""
    samples = devices.asnumpy(_tensor(samples).data).astype(np.float64)
    distances = np.linalg.norm(samples[:, None, :] - centres[None, :, :], axis=2)
    return (distances < radius).sum(axis=0)
