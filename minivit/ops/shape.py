"""Ops that move values around without changing them: reshape, permute, indexing, concat and stack."""

from minivit.backend import get_array_module, scatter_add
from minivit.function import Function


class ReshapeFn(Function):
    """y = x with a new shape (same values in the same C order).  Shapes: x (*s) -> y (*shape)"""

    def forward(self, x, *, shape):
        self.x_shape = x.shape
        return x.reshape(shape)

    # dx = dy reshaped back
    def backward(self, dy):
        return (dy.reshape(self.x_shape),)


class PermuteFn(Function):
    """y = x with its axes reordered: y.shape[i] = x.shape[axes[i]].  Shapes: x (s_0..s_n) -> y (s_axes[0]..)"""

    def forward(self, x, *, axes):
        self.axes = tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    # dx = dy with the inverse permutation
    def backward(self, dy):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return (dy.transpose(inverse),)


def _is_basic(index):
    """True for an index made only of ints, slices, None and Ellipsis (each element picked at most once)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in parts)


class GetItemFn(Function):
    """y = x[index] for basic slicing or integer/boolean array indexing.  Shapes: x -> y (as NumPy indexing)"""

    def forward(self, x, *, index):
        self.x_shape, self.x_dtype, self.index = x.shape, x.dtype, index
        return x[index]

    # dx = zeros, then dx[index] += dy   (an element picked twice gets both gradients)
    def backward(self, dy):
        xp = get_array_module(dy)
        dx = xp.zeros(self.x_shape, dtype=self.x_dtype)
        if _is_basic(self.index):
            dx[self.index] = dy
        else:
            scatter_add(dx, self.index, dy)
        return (dx,)


class ConcatFn(Function):
    """y = the inputs joined along an existing axis.  Shapes: x_i (..., n_i, ...) -> y (..., sum n_i, ...)"""

    def forward(self, *xs, axis=0):
        xp = get_array_module(*xs)
        self.axis = axis % xs[0].ndim
        self.sizes = [x.shape[self.axis] for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    # dx_i = the slice of dy that x_i filled
    def backward(self, dy):
        grads, start = [], 0
        for n in self.sizes:
            grads.append(dy[(slice(None),) * self.axis + (slice(start, start + n),)])
            start += n
        return tuple(grads)


class StackFn(Function):
    """y = the inputs joined along a new axis.  Shapes: k inputs x (...) -> y (..., k, ...)"""

    def forward(self, *xs, axis=0):
        xp = get_array_module(*xs)
        self.axis = axis % (xs[0].ndim + 1)
        return xp.stack(xs, axis=self.axis)

    # dx_i = dy[..., i, ...] along the new axis
    def backward(self, dy):
        return tuple(dy[(slice(None),) * self.axis + (i,)] for i in range(dy.shape[self.axis]))
