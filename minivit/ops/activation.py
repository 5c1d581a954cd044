"""GELU and dropout."""

import math

from minivit.backend import erf, get_array_module
from minivit.function import Function

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GELUFn(Function):
    """y = x * Phi(x), Phi the standard normal CDF: Phi(x) = (1 + erf(x / sqrt 2)) / 2 (exact, as timm).

    With approximate='tanh': y = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3); it differs from the
    exact form by up to about 5e-4.

    Shapes: x -> y (same)
    """

    def forward(self, x, *, approximate="none"):
        xp = get_array_module(x)
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            self.t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            return 0.5 * x * (1 + self.t)
        cdf = erf(x * _SQRT_HALF)
        cdf += 1.0
        cdf *= 0.5
        self.cdf = cdf
        return x * cdf

    # exact: dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    # tanh:  dx = dy * ((1 + t)/2 + x/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2))
    def backward(self, dy):
        xp = get_array_module(dy)
        x = self.x
        if self.approximate == "tanh":
            t = self.t
            slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        else:
            slope = x * x
            slope *= -0.5
            xp.exp(slope, out=slope)
            slope *= x
            slope *= _INV_SQRT_2PI
            slope += self.cdf
        slope *= dy
        return (slope,)


class DropoutFn(Function):
    """y = x * m / (1 - p), m_i ~ Bernoulli(1 - p) drawn from ``generator`` (inverted dropout).

    Shapes: x -> y (same)
    """

    def forward(self, x, *, p, generator):
        self.mask = (generator.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype)
        self.mask *= 1.0 / (1.0 - p)
        return x * self.mask

    # dx = dy * m / (1 - p)
    def backward(self, dy):
        return (dy * self.mask,)
