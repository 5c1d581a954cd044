"""Layer normalisation over the last axis."""

from minivit.backend import get_array_module, sum_last, sum_rows
from minivit.function import Function


class LayerNormFn(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b, mean and (biased) var over the last axis.

    Shapes: x (..., D), w (D,), b (D,) -> y (..., D)
    """

    def forward(self, x, w, b, *, eps=1e-6):
        xp = get_array_module(x)
        D = x.shape[-1]
        xc = x - sum_last(x) * (1.0 / D)
        rstd = sum_last(xc * xc)
        rstd *= 1.0 / D
        rstd += eps
        self.rstd = 1.0 / xp.sqrt(rstd, out=rstd)
        xc *= self.rstd
        self.xhat, self.w = xc, w
        y = xc * w
        y += b
        return y

    # g = dy * w ;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the last axis)
    # dw = sum(dy * xhat) ;  db = sum(dy)                                   (sums over all leading axes)
    def backward(self, dy):
        xhat = self.xhat
        D = dy.shape[-1]
        dx = dw = db = None
        if self.needs_input_grad[0]:
            dx = dy * self.w                                   # g
            mean_gx = sum_last(dx * xhat) * (1.0 / D)
            dx -= sum_last(dx) * (1.0 / D)
            dx -= xhat * mean_gx
            dx *= self.rstd
        if self.needs_input_grad[1]:
            dw = sum_rows((dy * xhat).reshape(-1, D))
        if self.needs_input_grad[2]:
            db = sum_rows(dy.reshape(-1, D))
        return dx, dw, db
