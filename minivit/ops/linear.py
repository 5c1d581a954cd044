"""The linear (fully connected) layer as one op."""

from minivit.backend import sum_rows
from minivit.function import Function


class LinearFn(Function):
    """y = x W^T + b, applied to the last axis of x; W is stored (out, in) as in PyTorch and timm.

    Shapes: x (..., in), W (out, in), b (out,) optional -> y (..., out)
    """

    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        # One 2-D product over all leading axes keeps BLAS busy with one large, contiguous operand.
        y = x.reshape(-1, x.shape[-1]) @ w.T
        if b is not None:
            y += b
        return y.reshape(*x.shape[:-1], w.shape[0])

    # dx = dy W ; dW = dy^T x (summed over all leading axes) ; db = dy summed over all leading axes
    def backward(self, dy):
        x2 = self.x.reshape(-1, self.x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ self.w).reshape(self.x.shape) if self.needs_input_grad[0] else None
        dw = dy2.T @ x2 if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 2:
            return dx, dw
        db = sum_rows(dy2) if self.needs_input_grad[2] else None
        return dx, dw, db
