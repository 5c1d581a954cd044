"""Softmax and log-softmax along one axis.

The math. For a row x of K scores:

    y_k = exp(x_k) / sum_j exp(x_j)                      (softmax; the same for x - c, so shift by the max)
    dy_k/dx_i = y_k (delta_ki - y_i)                     (the Jacobian: diag(y) - y y^T)
    dx_i = sum_k dy_k y_k (delta_ki - y_i) = y_i (dy_i - sum_k dy_k y_k)

    log_softmax(x)_k = x_k - log sum_j exp(x_j)
    dx_i = dy_i - softmax(x)_i sum_k dy_k

The composed versions below build the same functions from primitives and let autograd find the derivative;
the ops after them compute it by the formulas above in one pass.
"""

from minivit.backend import get_array_module
from minivit.function import Function, normalize_axis


# ------------------------------------------------------------------------------------------ readable version
def softmax_composed(x, axis=-1):
    """exp(x - max x) / sum exp(x - max x), from primitives.  Shapes: x (..., K) -> (..., K)"""
    # The shift changes no output, so it is a constant to autograd.
    e = (x - x.max(axis=axis, keepdims=True).detach()).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_composed(x, axis=-1):
    """x - max x - log sum exp(x - max x), from primitives.  Shapes: x (..., K) -> (..., K)"""
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


# ----------------------------------------------------------------------------------------------- fused ops


class SoftmaxFn(Function):
    """y = exp(x - max x) / sum(exp(x - max x)) along ``axis``.

    Shapes: x (..., K) -> y (..., K)
    """

    def forward(self, x, *, axis=-1):
        xp = get_array_module(x)
        axis = normalize_axis(axis, x.ndim, "softmax")
        e = xp.exp(x - x.max(axis=axis, keepdims=True))  # shift by the max: exp never overflows
        e /= e.sum(axis=axis, keepdims=True)
        self.y, self.axis = e, axis
        return e

    # dx = y * (dy - sum(dy * y))      (sum along axis, keepdims)
    def backward(self, dy):
        y = self.y
        return (y * (dy - (dy * y).sum(axis=self.axis, keepdims=True)),)

    def backward_graph(self, dy):
        (x,) = self.parents
        y = SoftmaxFn.apply(x, axis=self.axis)
        return (y * (dy - (dy * y).sum(axis=self.axis, keepdims=True)),)


class LogSoftmaxFn(Function):
    """y = x - max x - log sum exp(x - max x) along ``axis``.

    Shapes: x (..., K) -> y (..., K)
    """

    def forward(self, x, *, axis=-1):
        xp = get_array_module(x)
        axis = normalize_axis(axis, x.ndim, "log_softmax")
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.y, self.axis = y, axis
        return y

    # dx = dy - softmax(x) * sum(dy)    with softmax(x) = exp(y)
    def backward(self, dy):
        xp = get_array_module(dy)
        return (dy - xp.exp(self.y) * dy.sum(axis=self.axis, keepdims=True),)

    def backward_graph(self, dy):
        (x,) = self.parents
        return (dy - SoftmaxFn.apply(x, axis=self.axis) * dy.sum(axis=self.axis, keepdims=True),)
