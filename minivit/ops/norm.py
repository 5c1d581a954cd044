"""Layer normalisation over the last axis.

The math. For a row x of D features, with mean mu and biased variance var over the row:

    xhat = (x - mu) * rstd,   rstd = 1 / sqrt(var + eps),   y = xhat * w + b
    g = dy * w                                            (the gradient that reaches xhat)
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (mu and var depend on every x of the row: the two means)
    dw = sum over rows of dy * xhat ;  db = sum over rows of dy

The composed version builds the same function from primitives; the op computes its derivative by the formulas
above, and the row kernels after it do so in place, a block of rows per thread.
"""

from minivit.backend import get_array_module, parallel_rows, sum_last, sum_rows
from minivit.function import Function
from minivit.tensor import Tensor


# ------------------------------------------------------------------------------------------ readable version
def layer_norm_composed(x, weight, bias, eps=1e-6):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis, from primitives.

    Shapes: x (..., D), w, b (D,) -> (..., D)
    """
    xc = x - x.mean(axis=-1, keepdims=True)
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / (var + eps) ** 0.5 * weight + bias


# ------------------------------------------------------------------------------------ fast kernels (in place)


def layer_norm_rows(x, w, b, eps, y, xhat, rstd):
    """LayerNorm of rows x (M, D), written into y (M, D), xhat (M, D) and rstd (M, 1):
    xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), y = xhat w + b."""
    xp = get_array_module(x)
    D = x.shape[-1]
    with xp.errstate(over="ignore", invalid="ignore", divide="ignore"):   # huge rows: handled below
        xp.subtract(x, sum_last(x) * (1.0 / D), out=xhat)              # x - mean
        xp.multiply(xhat, xhat, out=y)                                  # y holds the squares for a moment
        var = sum_last(y) * (1.0 / D)
        xp.divide(1.0, xp.sqrt(var + eps), out=rstd)
        xhat *= rstd
    # A row whose squares (or sum) overflow gets var = inf and rstd = 0: xhat would be 0 and y the bias. Such rows
    # are redone on a scaled copy. The test reads one number per row (on the CPU only: on the GPU it would wait
    # for the device).
    if xp.__name__ == "numpy" and not xp.isfinite(var).all():
        bad = ~xp.isfinite(var[:, 0])
        xhat[bad], rstd[bad] = layer_norm_scaled(x[bad], eps)
    xp.multiply(xhat, w, out=y)
    y += b


def layer_norm_scaled(x, eps):
    """(xhat, rstd) of rows x (M, D) whose squares would overflow: computed on x / s with s = max |x| per row,
    using xhat(x) = xhat(x / s) with eps / s^2 in place of eps, and rstd(x) = rstd(x / s) / s."""
    xp = get_array_module(x)
    with xp.errstate(over="ignore", invalid="ignore"):
        s = xp.abs(x).max(axis=-1, keepdims=True)
        s[(s == 0) | ~xp.isfinite(s)] = 1                               # a row with inf or NaN stays NaN below
        xs = x / s
        xs -= xs.mean(axis=-1, keepdims=True)
        rstd_s = 1.0 / xp.sqrt((xs * xs).mean(axis=-1, keepdims=True) + eps / s / s)
        return xs * rstd_s, rstd_s / s


# g = dy * w ;  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the last axis)
# dw = sum(dy * xhat) ;  db = sum(dy)                                   (sums over all rows)
# The row sums are matrix-vector products: sum(g) = dy @ w and sum(g * xhat) = (dy * xhat) @ w.
def layer_norm_rows_backward(dy, xhat, rstd, w, dx):
    """dx of layer_norm_rows for rows (M, D), written into dx; returns (dw, db) summed over these rows."""
    xp = get_array_module(dy)
    D = dy.shape[-1]
    dy_xhat = dy * xhat
    dw, db = sum_rows(dy_xhat), sum_rows(dy)
    mean_g = (dy @ w)[:, None] * (1.0 / D)                              # (M, 1)
    mean_gx = (dy_xhat @ w)[:, None] * (1.0 / D)
    xp.multiply(xhat, mean_gx, out=dy_xhat)                             # reuse the buffer: xhat * mean(g xhat)
    dy_xhat += mean_g
    xp.multiply(dy, w, out=dx)                                          # g
    dx -= dy_xhat
    dx *= rstd
    return dw, db


# ---------------------------------------------------------------------------------------------------- the op
class LayerNormFn(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b, mean and (biased) var over the last axis.

    Shapes: x (..., D), w (D,), b (D,) -> y (..., D)
    """

    def forward(self, x, w, b, *, eps=1e-6):
        xp = get_array_module(x)
        x2 = x.reshape(-1, x.shape[-1])                                 # (M, D): every token on its own
        y, self.xhat = xp.empty_like(x2), xp.empty_like(x2)
        self.rstd = xp.empty((len(x2), 1), dtype=x.dtype)
        self.w, self.eps = w, eps

        def rows(r):
            layer_norm_rows(x2[r], w, b, eps, y[r], self.xhat[r], self.rstd[r])
        parallel_rows(len(x2), rows, xp)
        return y.reshape(x.shape)

    # see layer_norm_rows_backward; dw and db add up over the blocks of rows
    def backward(self, dy):
        xp = get_array_module(dy)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = xp.empty_like(dy2)

        def rows(r):
            return layer_norm_rows_backward(dy2[r], self.xhat[r], self.rstd[r], self.w, dx[r])
        parts = parallel_rows(len(dy2), rows, xp)
        return dx.reshape(dy.shape), sum(p[0] for p in parts), sum(p[1] for p in parts)

    # The same formulas on Tensors, with xhat and rstd recomputed from x so that their derivatives count.
    # Each row is divided by a constant s (its largest deviation when that is huge, else 1) before squaring, so
    # that the squares cannot overflow: rstd = ((xc/s)^2 mean + eps/s^2)^-1/2 / s is the same function of x.
    def backward_graph(self, dy):
        x, w, _ = self.parents
        xp = get_array_module(x.data)
        xc = x - x.mean(axis=-1, keepdims=True)
        big = xp.abs(xc.data).max(axis=-1, keepdims=True)
        s = Tensor(xp.where(big > 1e15, big, 1.0).astype(x.dtype))
        xs = xc / s
        rstd = ((xs * xs).mean(axis=-1, keepdims=True) + self.eps / s / s) ** -0.5 / s
        xhat = xc * rstd
        g = dy * w
        dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        rows = tuple(range(dy.ndim - 1))
        return dx, (dy * xhat).sum(axis=rows), dy.sum(axis=rows)
