"""Layer normalisation over the last axis."""

from minivit.backend import get_array_module, sum_last
from minivit.function import Function


class LayerNormFn(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b, mean and (biased) var over the last axis.

    Shapes: x (..., D), w (D,), b (D,) -> y (..., D)
    """

    def forward(self, x, w, b, *, eps=1e-6):
        xp = get_array_module(x)
        D = x.shape[-1]
        xc = x - sum_last(x) / D
        self.rstd = 1.0 / xp.sqrt(sum_last(xc * xc) / D + eps)
        self.xhat = xc * self.rstd
        self.w = w
        return self.xhat * w + b

    # g = dy * w ;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the last axis)
    # dw = sum(dy * xhat) ;  db = sum(dy)                                   (sums over all leading axes)
    def backward(self, dy):
        xhat = self.xhat
        dx = dw = db = None
        if self.needs_input_grad[0]:
            D = dy.shape[-1]
            g = dy * self.w
            dx = self.rstd * (g - sum_last(g) / D - xhat * (sum_last(g * xhat) / D))
        lead = tuple(range(dy.ndim - 1))
        if self.needs_input_grad[1]:
            dw = (dy * xhat).sum(axis=lead)
        if self.needs_input_grad[2]:
            db = dy.sum(axis=lead)
        return dx, dw, db
