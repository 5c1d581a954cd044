"""Reductions along axes: sum, mean, max."""

from minivit.backend import get_array_module
from minivit.function import Function


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim for a in axis))


def _keep(dy, axes, keepdims):
    """Put back the reduced axes as length-1 axes, so that dy broadcasts against the input."""
    if keepdims:
        return dy
    return get_array_module(dy).expand_dims(dy, axes)


class SumFn(Function):
    """y = sum of x over ``axis`` (all axes when None).  Shapes: x (...) -> y (x without the reduced axes)"""

    def forward(self, x, *, axis=None, keepdims=False):
        self.x_shape, self.axes, self.keepdims = x.shape, _axes(axis, x.ndim), keepdims
        return x.sum(axis=self.axes, keepdims=keepdims)

    # dx = dy copied along the summed axes
    def backward(self, dy):
        xp = get_array_module(dy)
        return (xp.broadcast_to(_keep(dy, self.axes, self.keepdims), self.x_shape),)


class MeanFn(Function):
    """y = mean of x over ``axis`` (all axes when None).  Shapes: x (...) -> y (x without the reduced axes)"""

    def forward(self, x, *, axis=None, keepdims=False):
        self.x_shape, self.axes, self.keepdims = x.shape, _axes(axis, x.ndim), keepdims
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=keepdims)

    # dx = dy / n copied along the averaged axes (n elements averaged)
    def backward(self, dy):
        xp = get_array_module(dy)
        return (xp.broadcast_to(_keep(dy, self.axes, self.keepdims) / self.count, self.x_shape),)


class MaxFn(Function):
    """y = max of x over ``axis`` (all axes when None).  Shapes: x (...) -> y (x without the reduced axes)"""

    def forward(self, x, *, axis=None, keepdims=False):
        self.x, self.axes, self.keepdims = x, _axes(axis, x.ndim), keepdims
        self.y = x.max(axis=self.axes, keepdims=True)
        return self.y if keepdims else self.y.reshape([n for i, n in enumerate(x.shape) if i not in self.axes])

    # dx = dy where x is the max (split evenly between ties), 0 elsewhere
    def backward(self, dy):
        winners = (self.x == self.y).astype(self.x.dtype)
        winners /= winners.sum(axis=self.axes, keepdims=True)
        return (winners * _keep(dy, self.axes, self.keepdims),)
