"""Layer normalisation over the last axis."""

from minivit.backend import get_array_module
from minivit.function import Function


class LayerNormFn(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b, mean and (biased) var over the last axis.

    Shapes: x (..., D), w (D,), b (D,) -> y (..., D)
    """

    def forward(self, x, w, b, *, eps=1e-6):
        xp = get_array_module(x)
        xc = x - x.mean(axis=-1, keepdims=True)
        self.rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
        self.xhat = xc * self.rstd
        self.w = w
        return self.xhat * w + b

    # g = dy * w ;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the last axis)
    # dw = sum(dy * xhat) ;  db = sum(dy)                                   (sums over all leading axes)
    def backward(self, dy):
        xhat = self.xhat
        dx = dw = db = None
        if self.needs_input_grad[0]:
            g = dy * self.w
            dx = self.rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        lead = tuple(range(dy.ndim - 1))
        if self.needs_input_grad[1]:
            dw = (dy * xhat).sum(axis=lead)
        if self.needs_input_grad[2]:
            db = dy.sum(axis=lead)
        return dx, dw, db
