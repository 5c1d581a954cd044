"""Spectral normalisation of a layer's weight (Miyato et al. 2018), with PyTorch's semantics, and the "improved"
variant of ViTGAN (Lee et al. 2022).

The spectral norm sigma(W) is W's largest singular value: the most W can stretch a vector, so a layer x -> W x has
Lipschitz constant sigma(W), and W / sigma(W) has 1. A discriminator made of such layers (and 1-Lipschitz
activations) is 1-Lipschitz, which keeps its gradients from exploding.

Power iteration estimates sigma cheaply. With u and v unit vectors,

    v <- normalize(W^T u),   u <- normalize(W v),   sigma = u . (W v)

converges to the top singular vectors (u, v) and sigma(W). Training runs one step per forward and keeps u and
v from step to step (W changes little between steps, so the estimate stays good). The weight is then

    W_sn = W / sigma,   sigma = u . (W v)   with u and v held constant,

so the gradient flows through W both directly and through sigma: d sigma / d W = u v^T.

As ``torch.nn.utils.spectral_norm``: the original weight becomes the parameter ``weight_orig``; ``weight_u`` and
``weight_v`` are buffers (saved in the state dict), drawn from N(0, 1) and normalised at registration, with no
iterations then (the newer ``torch.nn.utils.parametrizations.spectral_norm`` runs 15 at registration; this
follows the older function, whose state dict it shares); power iteration runs before each forward in training
mode only, and eval mode reuses the stored u and v. ``weight`` is recomputed before every forward.
"""

import numpy as np

from minivit import devices
from minivit.nn import init
from minivit.nn.module import Module, Parameter
from minivit.tensor import Tensor

__all__ = ["spectral_norm", "improved_spectral_norm", "remove_spectral_norm", "SpectralNorm"]


def _normalize(a, eps):
    """a / max(||a||_2, eps), as ``torch.nn.functional.normalize``."""
    xp = devices.get_array_module(a)
    return a / max(float(xp.linalg.norm(a)), eps)


class SpectralNorm:
    """The forward pre-hook that sets ``module.<name>`` to the spectrally normalised weight before each forward.

    With ``improved`` (ViTGAN), the weight is sigma_init * W / sigma(W), sigma_init the exact spectral norm of the
    weight at registration (the buffer ``<name>_sigma_init``): every layer keeps the scale it was initialised
    with instead of being shrunk to norm 1, which for Transformers trains faster.
    """

    def __init__(self, name, n_power_iterations, dim, eps, improved):
        self.name, self.n_power_iterations, self.dim, self.eps = name, n_power_iterations, dim, eps
        self.improved = improved

    def matrix(self, weight):
        """The weight as a matrix (shape[dim], everything else): dim first, the other axes flattened."""
        if self.dim != 0:
            axes = (self.dim,) + tuple(d for d in range(weight.ndim) if d != self.dim)
            weight = weight.permute(axes) if isinstance(weight, Tensor) else weight.transpose(axes)
        return weight.reshape(weight.shape[0], -1)

    def power_iteration(self, module):
        """n_power_iterations steps on the current weight, updating the buffers u and v (no graph)."""
        W = self.matrix(getattr(module, self.name + "_orig").data)
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        for _ in range(self.n_power_iterations):
            v.data = _normalize(W.T @ u.data, self.eps)
            u.data = _normalize(W @ v.data, self.eps)

    def compute_weight(self, module, do_power_iteration):
        """W / sigma with sigma = u . (W v), u and v constants; power iteration first when asked."""
        if do_power_iteration:
            self.power_iteration(module)
        weight = getattr(module, self.name + "_orig")
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        sigma = (Tensor(u.data) * (self.matrix(weight) @ Tensor(v.data))).sum()
        if self.improved:
            return weight * (getattr(module, self.name + "_sigma_init") / sigma)
        return weight / sigma

    def __call__(self, module, args):
        setattr(module, self.name, self.compute_weight(module, do_power_iteration=module.training))


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, rng=None):
    """Normalise ``module.<name>`` by its spectral norm before every forward, as ``torch.nn.utils.spectral_norm``.

    Args:
        module: a Module with a Parameter ``name`` (a Linear's weight, for instance).
        n_power_iterations: power-iteration steps per training forward (at least 1).
        eps: guards the normalisation of u and v against division by zero.
        dim: the output axis of the weight; 0 by default (PyTorch uses 1 for transposed convolutions).
        rng: a NumPy Generator for the initial u and v; the library's default generator otherwise.

    Returns:
        the module, with ``<name>_orig`` a parameter, ``<name>_u`` and ``<name>_v`` buffers.
    """
    return _register(module, name, n_power_iterations, eps, dim, rng, improved=False)


def improved_spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, rng=None):
    """ViTGAN's improved spectral norm: the weight becomes sigma_init * W / sigma(W), sigma_init the exact
    spectral norm of W at registration (buffer ``<name>_sigma_init``). Arguments as ``spectral_norm``."""
    return _register(module, name, n_power_iterations, eps, dim, rng, improved=True)


def _register(module, name, n_power_iterations, eps, dim, rng, improved):
    if not isinstance(module, Module):
        raise TypeError(f"spectral_norm: expected a minivit Module, got {type(module).__name__}")
    if any(isinstance(h, SpectralNorm) and h.name == name for h in module._forward_pre_hooks):
        raise RuntimeError(f"spectral_norm: {type(module).__name__}.{name} is already spectrally normalised")
    weight = module._parameters.get(name)
    if weight is None:
        raise KeyError(f"spectral_norm: {type(module).__name__} has no parameter {name!r}; its parameters are "
                       f"{list(module._parameters)}")
    if n_power_iterations < 1:
        raise ValueError(f"spectral_norm: n_power_iterations must be at least 1, got {n_power_iterations}")
    dim = 0 if dim is None else dim % weight.ndim
    fn = SpectralNorm(name, n_power_iterations, dim, eps, improved)
    W = fn.matrix(weight.data)
    h, w = W.shape
    xp = devices.get_array_module(W)
    rng = rng or init.default_rng()
    u = _normalize(xp.asarray(rng.standard_normal(h), dtype=W.dtype), eps)
    v = _normalize(xp.asarray(rng.standard_normal(w), dtype=W.dtype), eps)

    setattr(module, name + "_orig", weight)               # the same Parameter object, under its new name
    setattr(module, name, Tensor(weight.data))            # a plain tensor now, recomputed before every forward
    module.register_buffer(name + "_u", Tensor(u))
    module.register_buffer(name + "_v", Tensor(v))
    if improved:
        sigma_init = np.linalg.norm(devices.asnumpy(W).astype(np.float64), 2)   # the largest singular value
        module.register_buffer(name + "_sigma_init", Tensor(xp.asarray(sigma_init, dtype=W.dtype)))
    module.register_forward_pre_hook(fn)
    return module


def remove_spectral_norm(module, name="weight"):
    """Undo ``spectral_norm``: ``module.<name>`` becomes a Parameter again, holding the normalised weight as it
    is now (no power-iteration step), and ``<name>_orig``, the buffers and the hook are removed. Returns the
    module."""
    hooks = [h for h in module._forward_pre_hooks if isinstance(h, SpectralNorm) and h.name == name]
    if not hooks:
        raise ValueError(f"remove_spectral_norm: {type(module).__name__}.{name} is not spectrally normalised")
    weight = hooks[0].compute_weight(module, do_power_iteration=False)
    module._forward_pre_hooks.remove(hooks[0])
    for suffix in ("_orig", "_u", "_v", "_sigma_init"):
        if hasattr(module, name + suffix):
            delattr(module, name + suffix)
    setattr(module, name, Parameter(weight.data))
    return module
