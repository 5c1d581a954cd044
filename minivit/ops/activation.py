"""GELU and dropout.

The math.

    GELU(x) = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2      (exact, as timm)
    dx = dy (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

    tanh form: x/2 (1 + tanh u),  u = sqrt(2/pi) (x + 0.044715 x^3)
    dx = dy ((1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2))

    dropout: y = x m / (1 - p), m ~ Bernoulli(1 - p) ;  dx = dy m / (1 - p)

The composed versions build GELU from primitives; the op evaluates it and its derivative in cache-sized blocks.
"""

import math

from minivit.devices import get_array_module
from minivit.kernels import erfc, gelu_float32
from minivit.ops.erf import ErfFn
from minivit.parallel import parallel_rows
from minivit.function import Function
from minivit.tensor import Tensor, is_grad_enabled

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ------------------------------------------------------------------------------------------ readable version
def gelu_composed(x):
    """x Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2, from primitives.  Shapes: x -> same"""
    return x * (0.5 * (1.0 + ErfFn.apply(x * _SQRT_HALF)))


def gelu_tanh_composed(x):
    """x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), from primitives.  Shapes: x -> same"""
    return 0.5 * x * (1.0 + (_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)).tanh())


# ---------------------------------------------------------------------------------------- fast kernels


def gelu_exact(x, y, cdf):
    """y = x * Phi(x) and cdf = Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2, written into y and cdf.

    erfc, not 1 + erf: for x far below 0, 1 + erf(x / sqrt 2) cancels to 0 long before Phi(x) underflows."""
    xp = get_array_module(x)
    erfc(xp.multiply(x, -_SQRT_HALF, out=y), out=cdf)                   # y holds -x / sqrt 2 for a moment
    cdf *= 0.5
    with xp.errstate(invalid="ignore"):
        xp.multiply(x, cdf, out=y)
    y[xp.isneginf(x)] = -0.0                                            # the limit, not -inf * 0


# dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
def gelu_exact_backward(x, cdf, dy, dx):
    """dx of gelu_exact, given Phi(x) from the forward, written into dx."""
    xp = get_array_module(x)
    xp.multiply(x, x, out=dx)
    dx *= -0.5
    xp.exp(dx, out=dx)
    dx *= xp.maximum(x, -xp.finfo(x.dtype).max)                         # -inf * exp(-inf) would be NaN
    dx *= _INV_SQRT_2PI                                                 # x phi(x)
    dx += cdf
    dx *= dy


# --------------------------------------------------------------------------------------------------- the ops
class GELUFn(Function):
    """y = x * Phi(x), Phi the standard normal CDF: Phi(x) = (1 + erf(x / sqrt 2)) / 2 (exact, as timm).

    Computed without the cancellation of 1 + erf for negative x (erfc in float64, gelu_float32 in float32
    on the CPU), so that it stays within a few ulp of the exact value over the whole range: GELU(-1e30) = -0.0,
    GELU(+inf) = +inf, GELU(-inf) = -0.0 (the limit; PyTorch gives NaN at both infinities).

    With approximate='tanh': y = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3); it differs from the
    exact form by up to about 5e-4.

    Shapes: x -> y (same)
    """

    BLOCK = 2 ** 18   # elements evaluated at once by each thread, so that the temporaries stay in cache

    def forward(self, x, *, approximate="none"):
        xp = get_array_module(x)
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            self.t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            return 0.5 * x * (1 + self.t)
        flat = x.reshape(-1)
        y = xp.empty_like(flat)
        # float32 on the CPU: y and the derivative dy/dx in one pass (backward is then one product); elsewhere
        # Phi(x), from which backward computes the derivative. float16 on the CPU (under autocast) takes the
        # float32 path on a float32 copy of each block: y rounded to float16 once, dy/dx kept in float32.
        self.fused = xp.__name__ == "numpy" and x.dtype in (xp.float32, xp.float16)
        want_grad = is_grad_enabled() and any(self.needs_input_grad)
        saved_dtype = xp.float32 if self.fused else x.dtype
        self.saved = None if self.fused and not want_grad else xp.empty(flat.shape, dtype=saved_dtype)

        def part(r):
            if self.fused:
                saved = None if self.saved is None else self.saved[r]
                if x.dtype == xp.float32:
                    gelu_float32(flat[r], y[r], saved)
                else:
                    x32 = flat[r].astype(xp.float32)
                    y32 = xp.empty_like(x32)
                    gelu_float32(x32, y32, saved)
                    y[r] = y32
            else:
                gelu_exact(flat[r], y[r], self.saved[r])
        parallel_rows(len(flat), part, xp, block=self.BLOCK)
        return y.reshape(x.shape)

    # exact: dx = dy * (Phi(x) + x phi(x)), see gelu_exact_backward and gelu_float32
    # tanh:  dx = dy * ((1 + t)/2 + x/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2))
    def backward(self, dy):
        xp = get_array_module(dy)
        x = self.x
        if self.approximate == "tanh":
            t = self.t
            return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)),)
        flat, dy_flat = x.reshape(-1), dy.reshape(-1)
        dx = xp.empty_like(flat)

        def part(r):
            if self.fused:
                xp.multiply(dy_flat[r], self.saved[r], out=dx[r], casting="same_kind")   # saved = dy/dx
            else:
                gelu_exact_backward(flat[r], self.saved[r], dy_flat[r], dx[r])
        parallel_rows(len(flat), part, xp, block=self.BLOCK)
        return (dx.reshape(x.shape),)

    def backward_graph(self, dy):
        (x,) = self.parents
        if self.approximate == "tanh":
            t = (_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()
            return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)),)
        cdf = 0.5 * (1.0 + ErfFn.apply(x * _SQRT_HALF))                      # Phi(x)
        pdf = (-0.5 * x * x).exp() * _INV_SQRT_2PI                           # phi(x)
        return (dy * (cdf + x * pdf),)


class DropoutFn(Function):
    """y = x * m / (1 - p), m_i ~ Bernoulli(1 - p) drawn from ``generator`` (inverted dropout).

    Shapes: x -> y (same)
    """

    def forward(self, x, *, p, generator):
        self.mask = (generator.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype)
        self.mask *= 1.0 / (1.0 - p)
        return x * self.mask

    # dx = dy * m / (1 - p); the mask is a constant of the draw, so the second derivative in x is 0
    def backward(self, dy):
        return (dy * self.mask,)

    def backward_graph(self, dy):
        return (dy * Tensor(self.mask),)
