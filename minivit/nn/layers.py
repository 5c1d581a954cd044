"""General layers: Linear, LayerNorm, GELU, Dropout, Identity."""

import math

import numpy as np

from minivit import devices, rng
from minivit import functional as F
from minivit.nn import init
from minivit.nn.module import Module, Parameter


class Identity(Module):
    def forward(self, x):
        return x


class Linear(Module):
    """y = x W^T + b with W (out_features, in_features), as ``torch.nn.Linear``.

    Initialised like PyTorch: W and b uniform in +-1/sqrt(in_features), from ``rng`` (a NumPy Generator) or
    the library's default generator.
    """

    def __init__(self, in_features, out_features, bias=True, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.zeros((out_features, in_features), dtype=np.float32))
        self.bias = Parameter(np.zeros(out_features, dtype=np.float32)) if bias else None
        rng = rng or init.default_rng()
        bound = 1.0 / math.sqrt(in_features)
        init.uniform_(self.weight, bound, rng)
        if self.bias is not None:
            init.uniform_(self.bias, bound, rng)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LayerNorm(Module):
    """LayerNorm over the last axis with a learned scale ``weight`` (ones) and shift ``bias`` (zeros).

    eps defaults to PyTorch's 1e-5; the ViT passes timm's 1e-6.
    """

    def __init__(self, normalized_shape, eps=1e-5):
        super().__init__()
        self.normalized_shape, self.eps = int(normalized_shape), eps
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=np.float32))
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype=np.float32))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class GELU(Module):
    """GELU activation: exact (erf) by default, approximate='tanh' for the tanh form."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Dropout(Module):
    """Inverted dropout while training, the identity in eval mode.

    Args:
        p: drop probability.
        seed: seeds this layer's own generator; None uses the library's default generator.
    """

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.seed = float(p), seed
        self._generators = {}

    def generator(self, xp):
        if self.seed is None:
            return rng.default_generator(xp)
        if xp.__name__ not in self._generators:
            self._generators[xp.__name__] = xp.random.default_rng(self.seed)
        return self._generators[xp.__name__]

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return F.dropout(x, self.p, training=True, generator=self.generator(devices.get_array_module(x.data)))

    def extra_repr(self):
        return f"p={self.p}"
