"""Self-modulated LayerNorm (ViTGAN, Lee et al. 2022): a LayerNorm whose scale and shift come from the latent.

In a generator, every block can see the latent code w this way, not only the first layer's input:

    SLN(h, w) = gamma(w) * (h - mean(h)) / sqrt(var(h) + eps) + beta(w)

mean and var over the last axis of each token h, and gamma, beta affine maps of w (one scale and one shift per
channel, shared by all tokens of a sample).
"""

from minivit import devices
from minivit import functional as F
from minivit.nn.layers import Linear
from minivit.nn.module import Module
from minivit.tensor import Tensor


class SelfModulatedLayerNorm(Module):
    """SLN(h, w) = gamma(w) * LayerNorm(h) + beta(w), LayerNorm without its own affine.

    gamma and beta are Linear maps from the latent; their weights start at zero and their biases at 1 and 0,
    so that at initialisation the layer is a plain LayerNorm and the modulation is learned from there.

    Args:
        dim: D, the channels of h.
        latent_dim: the size of w.
        eps: added to the variance (1e-6, as the ViT's LayerNorms).

    Shapes: h (B, ..., D), w (B, latent_dim) -> (B, ..., D)
    """

    def __init__(self, dim, latent_dim, eps=1e-6, rng=None):
        super().__init__()
        self.dim, self.latent_dim, self.eps = dim, latent_dim, eps
        self.gamma = Linear(latent_dim, dim, rng=rng)
        self.beta = Linear(latent_dim, dim, rng=rng)
        for layer, bias in ((self.gamma, 1.0), (self.beta, 0.0)):
            layer.weight.data[...] = 0.0
            layer.bias.data[...] = bias

    def forward(self, h, w):
        h, w = (x if isinstance(x, Tensor) else Tensor(x) for x in (h, w))
        if h.ndim < 2 or h.shape[-1] != self.dim or w.shape != (h.shape[0], self.latent_dim):
            raise ValueError(f"SelfModulatedLayerNorm: h has shape {h.shape} and w {w.shape}; expected h "
                             f"(B, ..., {self.dim}) and w (B, {self.latent_dim}) with the same B")
        xp = devices.get_array_module(h.data)
        ones, zeros = Tensor(xp.ones(self.dim, dtype=h.dtype)), Tensor(xp.zeros(self.dim, dtype=h.dtype))
        normalized = F.layer_norm(h, ones, zeros, eps=self.eps)
        per_sample = (h.shape[0],) + (1,) * (h.ndim - 2) + (self.dim,)    # broadcast over the tokens
        return normalized * self.gamma(w).reshape(per_sample) + self.beta(w).reshape(per_sample)

    def extra_repr(self):
        return f"{self.dim}, latent_dim={self.latent_dim}, eps={self.eps}"
