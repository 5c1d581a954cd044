"""Elementwise arithmetic, exp/log/tanh and matrix products.

Binary ops broadcast like NumPy; their backward sums each gradient back to its input's shape (``unbroadcast``).
"""

import math

from minivit.devices import get_array_module
from minivit.function import Function, unbroadcast
from minivit.kernels import matmul


class AddFn(Function):
    """y = a + b (broadcasting).  Shapes: a, b broadcastable -> y"""

    def forward(self, a, b):
        self.a_shape, self.b_shape = a.shape, b.shape
        return a + b

    # da = dy ; db = dy   (each summed back to its input's shape)
    def backward(self, dy):
        return unbroadcast(dy, self.a_shape), unbroadcast(dy, self.b_shape)

    backward_graph = backward   # the same two lines on Tensors


class SubFn(Function):
    """y = a - b (broadcasting).  Shapes: a, b broadcastable -> y"""

    def forward(self, a, b):
        self.a_shape, self.b_shape = a.shape, b.shape
        return a - b

    # da = dy ; db = -dy
    def backward(self, dy):
        return unbroadcast(dy, self.a_shape), unbroadcast(-dy, self.b_shape)

    backward_graph = backward


class MulFn(Function):
    """y = a * b (broadcasting).  Shapes: a, b broadcastable -> y"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    # da = dy * b ; db = dy * a
    def backward(self, dy):
        da = unbroadcast(dy * self.b, self.a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(dy * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return da, db

    def backward_graph(self, dy):
        a, b = self.parents
        da = unbroadcast(dy * b, a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(dy * a, b.shape) if self.needs_input_grad[1] else None
        return da, db


class DivFn(Function):
    """y = a / b (broadcasting).  Shapes: a, b broadcastable -> y"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    # da = dy / b ; db = -dy * a / b^2 = -dy * (a / b) / b   (a / b first: a b^2 could overflow or vanish)
    def backward(self, dy):
        a, b = self.a, self.b
        da = unbroadcast(dy / b, a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(-dy * (a / b) / b, b.shape) if self.needs_input_grad[1] else None
        return da, db

    def backward_graph(self, dy):
        a, b = self.parents
        da = unbroadcast(dy / b, a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(-dy * (a / b) / b, b.shape) if self.needs_input_grad[1] else None
        return da, db


class CastFn(Function):
    """y = x converted to ``dtype`` (a NumPy dtype).  Shapes: x -> y (same)"""

    def forward(self, x, *, dtype):
        self.x_dtype = x.dtype
        return x.astype(dtype)

    # dx = dy converted back to x's dtype
    def backward(self, dy):
        return (dy.astype(self.x_dtype),)

    def backward_graph(self, dy):
        return (CastFn.apply(dy, dtype=self.x_dtype),)


class NegFn(Function):
    """y = -x.  Shapes: x -> y (same)"""

    def forward(self, x):
        return -x

    # dx = -dy
    def backward(self, dy):
        return (-dy,)

    backward_graph = backward


class PowFn(Function):
    """y = x ** p for a constant number p.  Shapes: x -> y (same)"""

    def forward(self, x, *, exponent):
        self.x, self.p = x, exponent
        return x ** exponent

    # dx = dy * p * x^(p-1);  for p = 0 the output is constant and dx = 0 (also at x = 0, where x^-1 is inf)
    def backward(self, dy):
        if self.p == 0:
            return (dy * 0,)
        return (dy * self.p * self.x ** (self.p - 1),)

    def backward_graph(self, dy):
        (x,) = self.parents
        if self.p == 0:
            return (dy * 0,)
        return (dy * (self.p * x ** (self.p - 1)),)


class RPowFn(Function):
    """y = base ** x for a constant number base (2 ** t).  Shapes: x -> y (same)"""

    def forward(self, x, *, base):
        xp = get_array_module(x)
        self.base = base
        self.y = xp.power(xp.asarray(base, dtype=x.dtype), x)
        return self.y

    # dx = dy * y * ln(base);  for base = 0 the output is 0 (x > 0) and PyTorch's dx = 0 is kept
    def backward(self, dy):
        if self.base == 0:
            return (dy * 0,)
        return (dy * self.y * math.log(self.base) if self.base > 0 else dy * self.y * math.nan,)

    def backward_graph(self, dy):
        (x,) = self.parents
        if self.base == 0:
            return (dy * 0,)
        log_base = math.log(self.base) if self.base > 0 else math.nan
        return (dy * RPowFn.apply(x, base=self.base) * log_base,)


class ExpFn(Function):
    """y = e^x.  Shapes: x -> y (same)"""

    def forward(self, x):
        self.y = get_array_module(x).exp(x)
        return self.y

    # dx = dy * y
    def backward(self, dy):
        return (dy * self.y,)

    def backward_graph(self, dy):
        (x,) = self.parents
        return (dy * x.exp(),)   # y again as a node of the graph, so that its own derivative is known


class LogFn(Function):
    """y = ln x.  Shapes: x -> y (same)"""

    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    # dx = dy / x
    def backward(self, dy):
        return (dy / self.x,)

    def backward_graph(self, dy):
        (x,) = self.parents
        return (dy / x,)


class TanhFn(Function):
    """y = tanh x.  Shapes: x -> y (same)"""

    def forward(self, x):
        self.y = get_array_module(x).tanh(x)
        return self.y

    # dx = dy * (1 - y^2)
    def backward(self, dy):
        return (dy * (1 - self.y * self.y),)

    def backward_graph(self, dy):
        (x,) = self.parents
        y = x.tanh()
        return (dy * (1 - y * y),)



class MatMulFn(Function):
    """y = a @ b, with NumPy's rules: 1-D operands are vectors, leading axes broadcast as a batch.

    Shapes: a (..., n, k), b (..., k, m) -> y (..., n, m)
    """

    def forward(self, a, b):
        self.a, self.b = a, b
        return matmul(a, b)

    # da = dy @ b^T ; db = a^T @ dy   (batch axes summed back to each input's shape)
    def backward(self, dy):
        a, b = self.a, self.b
        # View vectors as matrices: a (k,) as (1, k), b (k,) as (k, 1), and dy to match.
        if b.ndim == 1:
            b, dy = b[:, None], dy[..., None]
        if a.ndim == 1:
            a, dy = a[None, :], dy[..., None, :]
        da = db = None
        if self.needs_input_grad[0]:
            da = unbroadcast(matmul(dy, b.swapaxes(-1, -2)), a.shape).reshape(self.a.shape)
        if self.needs_input_grad[1]:
            if b.ndim == 2 and a.ndim > 2:
                # A shared weight: one large product over all batch rows instead of a batch of small ones.
                db = matmul(a.reshape(-1, a.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
            else:
                db = unbroadcast(matmul(a.swapaxes(-1, -2), dy), b.shape)
            db = db.reshape(self.b.shape)
        return da, db

    def backward_graph(self, dy):
        a0, b0 = self.parents
        a, b = a0, b0
        if b.ndim == 1:
            b, dy = b.reshape(-1, 1), dy.reshape(*dy.shape, 1)
        if a.ndim == 1:
            a, dy = a.reshape(1, -1), dy.reshape(*dy.shape[:-1], 1, dy.shape[-1])
        da = unbroadcast(dy @ b.transpose(-1, -2), a.shape).reshape(a0.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(a.transpose(-1, -2) @ dy, b.shape).reshape(b0.shape) if self.needs_input_grad[1] else None
        return da, db
