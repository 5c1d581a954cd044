"""The variational autoencoder's pieces: the reparameterised sample, the KL term and two likelihoods.

The math. The encoder gives, for each image, a diagonal Gaussian q(z|x) = N(mu, s^2) written through its
log-variance v = log s^2 (any real number, so the network needs no constraint):

    reparameterise:  z = mu + exp(v / 2) * eps,  eps ~ N(0, I) drawn outside the graph
                     dz/dmu = 1,  dz/dv = exp(v / 2) eps / 2,  dz/deps = exp(v / 2)

    KL(N(mu, s^2) || N(0, 1)) = 1/2 sum_j (mu_j^2 + e^(v_j) - v_j - 1)      (summed over the latent axis)
                     dKL/dmu_j = mu_j,   dKL/dv_j = (e^(v_j) - 1) / 2

The decoder gives a distribution over pixels; the log-likelihood of an image is summed over all its pixels
(every axis but the first, the batch):

    Bernoulli with logits l, pixels x in {0, 1} (or [0, 1]):
        log p(x | l) = sum x log sigmoid(l) + (1 - x) log sigmoid(-l) = sum x l - softplus(l)
        d/dl = x - sigmoid(l),   d/dx = l

    Gaussian with mean m and log-variance w (w broadcast against x: one per pixel, per channel or shared):
        log N(x; m, e^w) = -1/2 sum log(2 pi) + w + (x - m)^2 e^(-w)
        d/dm = (x - m) e^(-w),   d/dx = -(x - m) e^(-w),   d/dw = -1/2 (1 - (x - m)^2 e^(-w))

Note the half in exp(v / 2): the standard deviation is exp(v / 2); exp(v) would be the variance (a known bug of a
popular teaching example). The composed versions below build each formula from primitives; the ops after them
compute it in one pass, finite for every logit (softplus is evaluated through e^-|l|).
"""

import math

from minivit.backend import get_array_module
from minivit.function import Function, unbroadcast
from minivit.ops.arithmetic import ExpFn
from minivit.ops.logistic import SigmoidFn, SoftplusFn, sigmoid_array, softplus_array

LOG_2PI = math.log(2 * math.pi)


def _sum_but_first(a):
    """Sum over every axis but the first (the batch): one value per sample.  Shapes: (B, ...) -> (B,)"""
    return a.sum(axis=tuple(range(1, a.ndim)))


def _per_sample(g, ndim):
    """The upstream gradient of one value per sample, shaped to broadcast against the (B, ...) inputs."""
    return g.reshape(g.shape + (1,) * (ndim - 1))


# ------------------------------------------------------------------------------------------ readable version
def reparameterize_composed(mu, logvar, eps):
    """mu + exp(logvar / 2) * eps, from primitives.  Shapes: mu, logvar (..., L), eps broadcastable -> eps's"""
    return mu + (logvar * 0.5).exp() * eps


def gaussian_kl_composed(mu, logvar):
    """1/2 sum (mu^2 + e^v - v - 1) over the last axis, from primitives.  Shapes: (..., L) -> (...)"""
    return (mu * mu + logvar.exp() - logvar - 1.0).sum(axis=-1) * 0.5


def bernoulli_log_likelihood_composed(logits, x):
    """sum x l - softplus(l) over every axis but the first, from primitives (overflows past l = 709).
    Shapes: logits, x (B, ...) -> (B,)"""
    return _sum_but_first(x * logits - (1.0 + logits.exp()).log())


def gaussian_log_likelihood_composed(x, mean, logvar):
    """-1/2 sum log 2pi + w + (x - m)^2 e^-w, from primitives.  Shapes: x, mean (B, ...), logvar broadcastable
    -> (B,)"""
    d = x - mean
    return _sum_but_first((d * d * (-logvar).exp() + logvar + LOG_2PI) * -0.5)


# ----------------------------------------------------------------------------------------------- fused ops
class ReparameterizeFn(Function):
    """z = mu + exp(logvar / 2) * eps: a sample of N(mu, exp(logvar)) that is differentiable in mu and logvar.

    eps is a graph input like the others (a constant array in training; it may itself be a Tensor). It may carry
    extra leading axes, e.g. (k, B, L) for k samples per image; then mu and logvar are broadcast along them.

    Shapes: mu (B, L), logvar (B, L), eps (..., B, L) -> z (eps's shape)
    """

    def forward(self, mu, logvar, eps):
        xp = get_array_module(mu)
        self.shapes = (mu.shape, logvar.shape, eps.shape)
        self.std, self.eps = xp.exp(0.5 * logvar), eps
        return mu + self.std * eps

    # dmu = dy,  dlogvar = dy * std * eps / 2,  deps = dy * std  (each summed over the axes it was broadcast along)
    def backward(self, dy):
        need = self.needs_input_grad
        dmu = unbroadcast(dy, self.shapes[0]) if need[0] else None
        dlogvar = unbroadcast(0.5 * dy * self.std * self.eps, self.shapes[1]) if need[1] else None
        deps = unbroadcast(dy * self.std, self.shapes[2]) if need[2] else None
        return dmu, dlogvar, deps

    def backward_graph(self, dy):
        mu, logvar, eps = self.parents
        need = self.needs_input_grad
        std = ExpFn.apply(logvar * 0.5)
        dmu = unbroadcast(dy, mu.shape) if need[0] else None
        dlogvar = unbroadcast(dy * std * eps * 0.5, logvar.shape) if need[1] else None
        deps = unbroadcast(dy * std, eps.shape) if need[2] else None
        return dmu, dlogvar, deps


class GaussianKLFn(Function):
    """KL(N(mu, exp(logvar)) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(logvar_j) - logvar_j - 1), over the last axis.

    Shapes: mu (..., L), logvar (..., L) -> kl (...)
    """

    def forward(self, mu, logvar):
        xp = get_array_module(mu)
        self.mu, self.var = mu, xp.exp(logvar)
        return 0.5 * (mu * mu + self.var - logvar - 1).sum(axis=-1)

    # dmu = dy * mu,  dlogvar = dy * (exp(logvar) - 1) / 2   (dy broadcast along the latent axis)
    def backward(self, dy):
        g = dy[..., None]
        dmu = g * self.mu if self.needs_input_grad[0] else None
        dlogvar = 0.5 * g * (self.var - 1) if self.needs_input_grad[1] else None
        return dmu, dlogvar

    def backward_graph(self, dy):
        mu, logvar = self.parents
        g = dy.reshape(tuple(dy.shape) + (1,))
        dmu = g * mu if self.needs_input_grad[0] else None
        dlogvar = g * (ExpFn.apply(logvar) - 1.0) * 0.5 if self.needs_input_grad[1] else None
        return dmu, dlogvar


class BernoulliLogLikelihoodFn(Function):
    """log p(x | logits) = sum x log sigmoid(l) + (1 - x) log sigmoid(-l) = sum x l - softplus(l), one value per
    sample (summed over every axis but the first). x are the pixels in {0, 1} (binarised images) or [0, 1].

    Shapes: logits (B, ...), x (same) -> log p (B,)
    """

    def forward(self, logits, x):
        self.logits, self.x = logits, x
        return _sum_but_first(x * logits - softplus_array(logits))

    # dlogits = dy * (x - sigmoid(l)),  dx = dy * l
    def backward(self, dy):
        g = _per_sample(dy, self.logits.ndim)
        dl = g * (self.x - sigmoid_array(self.logits)) if self.needs_input_grad[0] else None
        dx = g * self.logits if self.needs_input_grad[1] else None
        return dl, dx

    def backward_graph(self, dy):
        logits, x = self.parents
        g = dy.reshape(tuple(dy.shape) + (1,) * (logits.ndim - 1))
        dl = g * (x - SigmoidFn.apply(logits)) if self.needs_input_grad[0] else None
        dx = g * logits if self.needs_input_grad[1] else None
        return dl, dx


class GaussianLogLikelihoodFn(Function):
    """log N(x; mean, exp(logvar)) = -1/2 sum log(2 pi) + logvar + (x - mean)^2 exp(-logvar), one value per sample
    (summed over every axis but the first). logvar is broadcast against x (a scalar: one shared variance).

    Shapes: x (B, ...), mean (same), logvar broadcastable to x -> log p (B,)
    """

    def forward(self, x, mean, logvar):
        xp = get_array_module(x)
        self.shapes = (x.shape, mean.shape, logvar.shape)
        self.precision = xp.exp(-logvar)
        self.diff = x - mean
        full = xp.broadcast_to(logvar, x.shape)
        return -0.5 * _sum_but_first(self.diff * self.diff * self.precision + full + LOG_2PI)

    # with r = (x - mean) e^-logvar:  dx = -dy r,  dmean = dy r,  dlogvar = -dy (1 - (x - mean) r) / 2
    def backward(self, dy):
        g = _per_sample(dy, len(self.shapes[0]))
        r = self.diff * self.precision
        need = self.needs_input_grad
        dx = unbroadcast(-g * r, self.shapes[0]) if need[0] else None
        dmean = unbroadcast(g * r, self.shapes[1]) if need[1] else None
        dlogvar = unbroadcast(-0.5 * g * (1 - self.diff * r), self.shapes[2]) if need[2] else None
        return dx, dmean, dlogvar

    def backward_graph(self, dy):
        x, mean, logvar = self.parents
        g = dy.reshape(tuple(dy.shape) + (1,) * (x.ndim - 1))
        diff = x - mean
        r = diff * ExpFn.apply(-logvar)
        need = self.needs_input_grad
        dx = unbroadcast(-g * r, x.shape) if need[0] else None
        dmean = unbroadcast(g * r, mean.shape) if need[1] else None
        dlogvar = unbroadcast((1.0 - diff * r) * g * -0.5, logvar.shape) if need[2] else None
        return dx, dmean, dlogvar
