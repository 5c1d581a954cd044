"""Ops that move values around without changing them: reshape, permute, indexing, concat and stack."""

from minivit.devices import get_array_module, is_cupy_array
from minivit.function import Function, normalize_axis


class ReshapeFn(Function):
    """y = x with a new shape (same values in the same C order).  Shapes: x (*s) -> y (*shape)"""

    def forward(self, x, *, shape):
        self.x_shape = x.shape
        return x.reshape(shape)

    # dx = dy reshaped back
    def backward(self, dy):
        return (dy.reshape(self.x_shape),)

    backward_graph = backward


class PermuteFn(Function):
    """y = x with its axes reordered: y.shape[i] = x.shape[axes[i]].  Shapes: x (s_0..s_n) -> y (s_axes[0]..)"""

    def forward(self, x, *, axes):
        self.axes = tuple(normalize_axis(a, x.ndim, "permute") for a in axes)
        if sorted(self.axes) != list(range(x.ndim)):
            raise ValueError(f"permute: axes {tuple(axes)} are not a permutation of the {x.ndim} axes of a tensor "
                             f"of shape {x.shape}")
        return x.transpose(self.axes)

    # dx = dy with the inverse permutation
    def backward(self, dy):
        return (dy.transpose(self._inverse()),)

    def backward_graph(self, dy):
        return (PermuteFn.apply(dy, axes=self._inverse()),)

    def _inverse(self):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return tuple(inverse)


def _is_basic(index):
    """True for an index made only of ints, slices, None and Ellipsis (each element picked at most once)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in parts)


class GetItemFn(Function):
    """y = x[index] for basic slicing or integer/boolean array indexing.  Shapes: x -> y (as NumPy indexing)"""

    def forward(self, x, *, index):
        self.x_shape, self.x_dtype, self.index = x.shape, x.dtype, index
        return x[index]

    # dx = zeros, then dx[index] += dy   (an element picked twice gets both gradients): see IndexAddFn
    def backward(self, dy):
        return (index_add(dy, self.index, self.x_shape),)

    def backward_graph(self, dy):
        return (IndexAddFn.apply(dy, index=self.index, shape=self.x_shape),)


def index_add(values, index, shape):
    """zeros(shape) with ``values`` added at ``index`` (repeated indices add up)."""
    xp = get_array_module(values)
    out = xp.zeros(shape, dtype=values.dtype)
    if _is_basic(index):
        out[index] = values
    else:
        scatter_add(out, index, values)
    return out


class IndexAddFn(Function):
    """y = zeros(shape) with x added at ``index``: the adjoint of indexing, and so the backward of GetItemFn.

    Shapes: x (as x_shape[index]) -> y (shape)
    """

    def forward(self, x, *, index, shape):
        self.index = index
        return index_add(x, index, shape)

    # dx = dy[index]
    def backward(self, dy):
        return (dy[self.index],)

    def backward_graph(self, dy):
        return (GetItemFn.apply(dy, index=self.index),)


class ConcatFn(Function):
    """y = the inputs joined along an existing axis.  Shapes: x_i (..., n_i, ...) -> y (..., sum n_i, ...)"""

    def forward(self, *xs, axis=0):
        xp = get_array_module(*xs)
        self.axis = normalize_axis(axis, xs[0].ndim, "concat")
        self.sizes = [x.shape[self.axis] for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    # dx_i = the slice of dy that x_i filled
    def backward(self, dy):
        return tuple(dy[index] for index in self._slices())

    def backward_graph(self, dy):
        return tuple(GetItemFn.apply(dy, index=index) for index in self._slices())

    def _slices(self):
        slices, start = [], 0
        for n in self.sizes:
            slices.append((slice(None),) * self.axis + (slice(start, start + n),))
            start += n
        return slices


class StackFn(Function):
    """y = the inputs joined along a new axis.  Shapes: k inputs x (...) -> y (..., k, ...)"""

    def forward(self, *xs, axis=0):
        xp = get_array_module(*xs)
        self.axis = normalize_axis(axis, xs[0].ndim + 1, "stack")
        self.count = len(xs)
        return xp.stack(xs, axis=self.axis)

    # dx_i = dy[..., i, ...] along the new axis
    def backward(self, dy):
        return tuple(dy[index] for index in self._slices())

    def backward_graph(self, dy):
        return tuple(GetItemFn.apply(dy, index=index) for index in self._slices())

    def _slices(self):
        return [(slice(None),) * self.axis + (i,) for i in range(self.count)]


def scatter_add(target, index, values):
    """``target[index] += values`` that adds up repeated indices (unbuffered, unlike ``+=``)."""
    if is_cupy_array(target):
        import cupyx
        cupyx.scatter_add(target, index, values)
    else:
        get_array_module(target).add.at(target, index, values)
