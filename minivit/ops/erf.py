"""The error function as an op (its kernel, shared with GELU, is in ``minivit.kernels``).

The math.

    erf x = 2/sqrt(pi) * integral from 0 to x of exp(-t^2) dt
    d erf x / dx = 2/sqrt(pi) * exp(-x^2)

GELU's exact form is x (1 + erf(x / sqrt 2)) / 2.
"""

import math

from minivit.devices import get_array_module
from minivit.function import Function
from minivit.kernels import erf


class ErfFn(Function):
    """y = erf x = 2/sqrt(pi) * integral from 0 to x of exp(-t^2) dt.  Shapes: x -> y (same)"""

    def forward(self, x):
        self.x = x
        return erf(x)

    # dx = dy * 2/sqrt(pi) * exp(-x^2)
    def backward(self, dy):
        return (dy * (2.0 / math.sqrt(math.pi)) * get_array_module(dy).exp(-self.x * self.x),)

    def backward_graph(self, dy):
        (x,) = self.parents
        return (dy * (2.0 / math.sqrt(math.pi)) * (-(x * x)).exp(),)
