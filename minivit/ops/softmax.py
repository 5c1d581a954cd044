"""Softmax and log-softmax along one axis."""

from minivit.backend import get_array_module
from minivit.function import Function, normalize_axis


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
