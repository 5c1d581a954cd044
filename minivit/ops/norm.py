"""Layer normalisation over the last axis."""

from minivit.backend import get_array_module, parallel_rows, sum_last, sum_rows
from minivit.function import Function


def layer_norm_rows(x, w, b, eps):
    """(y, xhat, rstd) for rows x (M, D): xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), y = xhat w + b."""
    xp = get_array_module(x)
    D = x.shape[-1]
    xhat = x - sum_last(x) * (1.0 / D)
    rstd = sum_last(xhat * xhat)
    rstd *= 1.0 / D
    rstd += eps
    rstd = 1.0 / xp.sqrt(rstd, out=rstd)
    xhat *= rstd
    y = xhat * w
    y += b
    return y, xhat, rstd


# g = dy * w ;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the last axis)
# dw = sum(dy * xhat) ;  db = sum(dy)                                   (sums over all rows)
def layer_norm_rows_backward(dy, xhat, rstd, w):
    """(dx, dw, db) of layer_norm_rows for rows (M, D); dw and db are sums over these rows."""
    D = dy.shape[-1]
    dx = dy * w                                                         # g
    mean_gx = sum_last(dx * xhat) * (1.0 / D)
    dx -= sum_last(dx) * (1.0 / D)
    dx -= xhat * mean_gx
    dx *= rstd
    return dx, sum_rows(dy * xhat), sum_rows(dy)


class LayerNormFn(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b, mean and (biased) var over the last axis.

    Shapes: x (..., D), w (D,), b (D,) -> y (..., D)
    """

    def forward(self, x, w, b, *, eps=1e-6):
        xp = get_array_module(x)
        x2 = x.reshape(-1, x.shape[-1])                                 # (M, D): every token on its own
        y, self.xhat = xp.empty_like(x2), xp.empty_like(x2)
        self.rstd = xp.empty((len(x2), 1), dtype=x.dtype)
        self.w = w

        def rows(r):
            y[r], self.xhat[r], self.rstd[r] = layer_norm_rows(x2[r], w, b, eps)
        parallel_rows(len(x2), rows, xp)
        return y.reshape(x.shape)

    # see layer_norm_rows_backward; dw and db add up over the blocks of rows
    def backward(self, dy):
        xp = get_array_module(dy)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = xp.empty_like(dy2)

        def rows(r):
            dx[r], dw_rows, db_rows = layer_norm_rows_backward(dy2[r], self.xhat[r], self.rstd[r], self.w)
            return dw_rows, db_rows
        parts = parallel_rows(len(dy2), rows, xp)
        return dx.reshape(dy.shape), sum(p[0] for p in parts), sum(p[1] for p in parts)
