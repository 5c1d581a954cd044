"""Tensor: an array, its gradient, and the op that made it.

A Tensor wraps a NumPy or CuPy array in ``.data``. When it was computed by an op from tensors that require
gradients, it remembers that op in ``._ctx``; the ops it came from, followed backwards, form the graph that
``backward()`` walks. Gradients land in ``.grad`` of the leaves (tensors made by the user, such as parameters)
and of any tensor that called ``retain_grad()``.
"""

import contextlib

import numpy as np

from minivit import backend


class _GradMode:
    enabled = True


def is_grad_enabled():
    return _GradMode.enabled


@contextlib.contextmanager
def set_grad_enabled(mode):
    """Inside this block ops record a graph when ``mode`` is True, and none when it is False."""
    previous = _GradMode.enabled
    _GradMode.enabled = bool(mode)
    try:
        yield
    finally:
        _GradMode.enabled = previous


def no_grad():
    """Inside this block ops record no graph: for evaluation, parameter updates and finite differences."""
    return set_grad_enabled(False)


def enable_grad():
    """Inside this block ops record a graph again, also inside ``no_grad()``."""
    return set_grad_enabled(True)


def _as_array(data, dtype):
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.ndarray) or backend.is_cupy_array(data):
        return data if dtype is None else data.astype(dtype, copy=False)
    if isinstance(data, np.generic):
        return np.asarray(data, dtype=dtype)
    # Python numbers and lists: float32 unless told otherwise, integers stay integers.
    array = np.asarray(data, dtype=dtype)
    if dtype is None and array.dtype == np.float64:
        array = array.astype(np.float32)
    return array


class Tensor:
    """An n-dimensional array that can record the ops applied to it and back-propagate through them.

    Args:
        data: a NumPy or CuPy array (kept as it is, no copy), a Python number or a nested list (float32 for
            floats, int64 for integers), or another Tensor.
        requires_grad: whether gradients should flow to this tensor; only floating dtypes can ask for them.
        dtype: optional dtype to convert to.
    """

    __array_priority__ = 1000  # so that `ndarray * tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._ctx = None        # the Function that produced this tensor, while its graph is alive
        self._freed = False     # True once backward() has released the graph behind this tensor
        self._retain = False

    # ----------------------------------------------------------------------------------------- basics
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._ctx is None and not self._freed

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({backend.asnumpy(self.data)!r}{grad}, device='{self.device}')".replace("\n", "\n       ")

    def numpy(self):
        """The values as a NumPy array (a copy when the tensor lives on the GPU)."""
        return backend.asnumpy(self.data)

    def item(self):
        """The one value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.item()

    def __float__(self):
        return float(self._one("float()"))

    def __int__(self):
        return int(self._one("int()"))

    def __bool__(self):
        return bool(self._one("bool()"))

    def _one(self, what):
        if self.data.size != 1:
            raise ValueError(f"{what} of a tensor with {self.data.size} elements (shape {self.shape}) is ambiguous; "
                             "it needs exactly one element (use .any() or .all() on .data for a truth test)")
        return self.data.item()

    __hash__ = object.__hash__   # tensors are keyed by identity, although == compares elementwise

    def detach(self):
        """The same array as a new leaf that records no graph."""
        return Tensor(self.data)

    def to(self, device=None, dtype=None):
        """A tensor on ``device`` ('cpu' or 'cuda') and/or with ``dtype``; a new leaf (no graph is kept)."""
        data = self.data if device is None else backend.to_device(self.data, device)
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        return Tensor(data, requires_grad=self.requires_grad)

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after backward (leaves always keep it)."""
        self._retain = True
        return self

    def zero_grad(self):
        self.grad = None

    # -------------------------------------------------------------------------------------- autograd
    def backward(self, grad=None, retain_graph=None, create_graph=False):
        """Back-propagate from this tensor through the graph that produced it, adding into ``.grad`` of the leaves.

        Args:
            grad: the upstream gradient dL/dself, same shape as self; may be omitted for a one-element tensor.
            retain_graph: keep the graph (and its saved arrays) for another backward; defaults to create_graph.
            create_graph: build a graph of the gradients so that they can be differentiated again; ``.grad``
                then holds Tensors instead of arrays.
        """
        _autograd.backward(self, grad, retain_graph=retain_graph, create_graph=create_graph)

    # ------------------------------------------------------------------------------------- operators
    def _lift(self, other):
        """Wrap a Python number or array as a constant tensor of this tensor's dtype and device."""
        if isinstance(other, Tensor):
            return other
        xp = backend.get_array_module(self.data)
        if isinstance(other, (int, float)):
            return Tensor(xp.asarray(other, dtype=self.dtype if self.dtype.kind == "f" else None))
        return Tensor(other)

    def __add__(self, other):
        return _ops.AddFn.apply(self, self._lift(other))

    def __radd__(self, other):
        return _ops.AddFn.apply(self._lift(other), self)

    def __sub__(self, other):
        return _ops.SubFn.apply(self, self._lift(other))

    def __rsub__(self, other):
        return _ops.SubFn.apply(self._lift(other), self)

    def __mul__(self, other):
        return _ops.MulFn.apply(self, self._lift(other))

    def __rmul__(self, other):
        return _ops.MulFn.apply(self._lift(other), self)

    def __truediv__(self, other):
        return _ops.DivFn.apply(self, self._lift(other))

    def __rtruediv__(self, other):
        return _ops.DivFn.apply(self._lift(other), self)

    def __matmul__(self, other):
        return _ops.MatMulFn.apply(self, self._lift(other))

    def __rmatmul__(self, other):
        return _ops.MatMulFn.apply(self._lift(other), self)

    def __neg__(self):
        return _ops.NegFn.apply(self)

    def __pow__(self, exponent):
        if isinstance(exponent, (np.integer, np.floating)):
            exponent = exponent.item()                       # a NumPy scalar: np.int64(2) -> 2
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
            raise TypeError(f"Tensor ** exponent needs a Python number exponent (or a NumPy scalar), got "
                            f"{type(exponent).__name__}; "
                            "for a tensor exponent write (y * x.log()).exp()")
        return _ops.PowFn.apply(self, exponent=exponent)

    def __rpow__(self, base):
        """base ** tensor for a number base (2 ** t)."""
        if isinstance(base, (np.integer, np.floating)):
            base = base.item()
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            return NotImplemented
        return _ops.RPowFn.apply(self, base=base)

    # Comparisons give boolean tensors that record no graph (their derivative is 0 almost everywhere).
    def _compare(self, other, op):
        return Tensor(op(self.data, other.data if isinstance(other, Tensor) else other))

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    def __eq__(self, other):
        return self._compare(other, lambda a, b: a == b)

    def __ne__(self, other):
        return self._compare(other, lambda a, b: a != b)

    def __getitem__(self, index):
        return _ops.GetItemFn.apply(self, index=_index_arrays(index))

    def exp(self):
        return _ops.ExpFn.apply(self)

    def log(self):
        return _ops.LogFn.apply(self)

    def tanh(self):
        return _ops.TanhFn.apply(self)

    def sqrt(self):
        return _ops.PowFn.apply(self, exponent=0.5)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _ops.ReshapeFn.apply(self, shape=tuple(shape))

    def permute(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return _ops.PermuteFn.apply(self, axes=tuple(axes))

    def transpose(self, axis0=-2, axis1=-1):
        """Swap two axes (the last two by default)."""
        from minivit.function import normalize_axis
        axis0, axis1 = normalize_axis(axis0, self.ndim, "transpose"), normalize_axis(axis1, self.ndim, "transpose")
        axes = list(range(self.ndim))
        axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
        return _ops.PermuteFn.apply(self, axes=tuple(axes))

    @property
    def T(self):
        return _ops.PermuteFn.apply(self, axes=tuple(reversed(range(self.ndim))))

    # axis/keepdims (NumPy's names) or dim/keepdim (PyTorch's), not both
    def sum(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        axis, keepdims = torch_names("sum", axis, keepdims, dim, keepdim)
        return _ops.SumFn.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        axis, keepdims = torch_names("mean", axis, keepdims, dim, keepdim)
        return _ops.MeanFn.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """The max over ``axis`` (a Tensor). With PyTorch's ``dim=`` (one axis), as ``torch.max``: a named pair
        (values, indices), the indices an integer tensor without gradient."""
        if dim is None:
            axis, keepdims = torch_names("max", axis, keepdims, dim, keepdim)
            return _ops.MaxFn.apply(self, axis=axis, keepdims=keepdims)
        axis, keepdims = torch_names("max", axis, keepdims, dim, keepdim)
        if not isinstance(axis, (int, np.integer)):
            raise TypeError(f"max(dim=...) takes one axis, got {axis!r}; use axis= for several")
        values = _ops.MaxFn.apply(self, axis=axis, keepdims=keepdims)
        axis = _normalize_axis(axis, self.ndim, "max")
        indices = self.data.argmax(axis=axis)
        if keepdims:
            indices = backend.get_array_module(indices).expand_dims(indices, axis)
        return MaxResult(values, Tensor(indices))


class MaxResult(tuple):
    """(values, indices) of ``Tensor.max(dim=...)``, as PyTorch's named tuple."""

    def __new__(cls, values, indices):
        return super().__new__(cls, (values, indices))

    @property
    def values(self):
        return self[0]

    @property
    def indices(self):
        return self[1]


def _normalize_axis(axis, ndim, op):
    from minivit.function import normalize_axis
    return normalize_axis(axis, ndim, op)


def torch_names(op, axis, keepdims, dim, keepdim):
    """Accept PyTorch's ``dim``/``keepdim`` beside NumPy's ``axis``/``keepdims``; both at once is an error."""
    if dim is not None:
        if axis is not None:
            raise TypeError(f"{op}: give axis or dim, not both")
        axis = dim
    if keepdim is not None:
        if keepdims:
            raise TypeError(f"{op}: give keepdims or keepdim, not both")
        keepdims = keepdim
    return (tuple(axis) if isinstance(axis, list) else axis), bool(keepdims)


def _index_arrays(index):
    """Replace Tensors inside an index by their arrays (an index is a setting, never a graph input)."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


def concat(tensors, axis=0, *, dim=None):
    """Join tensors along an existing axis (``dim`` is PyTorch's name for it)."""
    axis, _ = torch_names("concat", None if dim is not None else axis, False, dim, None)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat: needs at least one tensor, got an empty sequence")
    return _ops.ConcatFn.apply(*tensors, axis=axis)


def stack(tensors, axis=0, *, dim=None):
    """Join tensors along a new axis (``dim`` is PyTorch's name for it)."""
    axis, _ = torch_names("stack", None if dim is not None else axis, False, dim, None)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor, got an empty sequence")
    return _ops.StackFn.apply(*tensors, axis=axis)


from minivit import autograd as _autograd  # noqa: E402  (these import Tensor from here)
from minivit import ops as _ops  # noqa: E402
