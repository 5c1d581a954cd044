"""The linear (fully connected) layer as one op.

The math. With the rows of x (all leading axes flattened to M rows) and W stored (out, in):

    y = x W^T + b
    dx = dy W ;  dW = dy^T x  (a sum over the M rows) ;  db = sum over the M rows of dy

The composed version is the same line with autograd's matmul; the op runs one large 2-D product per call
(``kernels.matmul``: float16 operands are multiplied in float32 on the CPU).
"""

from minivit.devices import get_array_module
from minivit.kernels import matmul
from minivit.ops.reduce import sum_rows
from minivit.parallel import parallel_rows
from minivit.function import Function


# ------------------------------------------------------------------------------------------ readable version
def linear_composed(x, weight, bias=None):
    """x W^T + b, from primitives.  Shapes: x (..., in), W (out, in), b (out,) -> (..., out)"""
    y = x @ weight.T
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------------------------- the op


class LinearFn(Function):
    """y = x W^T + b, applied to the last axis of x; W is stored (out, in) as in PyTorch and timm.

    Shapes: x (..., in), W (out, in), b (out,) optional -> y (..., out)
    """

    def forward(self, x, w, b=None):
        xp = get_array_module(x)
        self.x, self.w = x, w
        # One 2-D product over all leading axes keeps BLAS busy with one large, contiguous operand.
        x2 = x.reshape(-1, x.shape[-1])                                   # (M, in)
        y = xp.empty((len(x2), w.shape[0]), dtype=x.dtype)               # (M, out)

        def rows(r):
            matmul(x2[r], w.T, out=y[r])
            if b is not None:
                y[r] += b
        parallel_rows(len(x2), rows, xp)
        return y.reshape(*x.shape[:-1], w.shape[0])

    # dx = dy W ; dW = dy^T x (summed over all leading axes) ; db = dy summed over all leading axes
    def backward(self, dy):
        xp = get_array_module(dy)
        x2 = self.x.reshape(-1, self.x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw = self.needs_input_grad[0], self.needs_input_grad[1]
        need_db = len(self.needs_input_grad) == 3 and self.needs_input_grad[2]
        dx = xp.empty_like(x2) if need_dx else None

        # float16: each thread's share of dW and db stays float32 until the shares are added (one rounding, as one
        # product would give)
        half = dy.dtype == xp.float16

        def rows(r):  # dx for these rows, and their share of the sums dW and db
            if need_dx:
                matmul(dy2[r], self.w, out=dx[r])
            dw_part = matmul(dy2[r].T, x2[r], keep_float32=half) if need_dw else None
            return dw_part, (sum_rows(dy2[r], keep_float32=half) if need_db else None)
        parts = parallel_rows(len(dy2), rows, xp)
        dw = sum(p[0] for p in parts).astype(xp.result_type(dy2, x2), copy=False) if need_dw else None
        dx = dx.reshape(self.x.shape) if need_dx else None
        if len(self.needs_input_grad) == 2:
            return dx, dw
        return dx, dw, (sum(p[1] for p in parts).astype(dy.dtype, copy=False) if need_db else None)

    def backward_graph(self, dy):
        x, w = self.parents[:2]
        dy2 = dy.reshape(-1, dy.shape[-1])                                  # (M, out)
        dx = (dy @ w) if self.needs_input_grad[0] else None
        dw = dy2.transpose() @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None
        if len(self.parents) == 2:
            return dx, dw
        return dx, dw, (dy2.sum(axis=0) if self.needs_input_grad[2] else None)
