"""Scaled dot-product attention as one op."""

import math

from minivit.backend import get_array_module, sum_last
from minivit.function import Function


class ScaledDotProductAttentionFn(Function):
    """y = softmax(q k^T * scale) v, the softmax over keys; scale = 1/sqrt(d) unless given.

    The attention probabilities p = softmax(q k^T * scale) are kept as ``self.p`` (for backward and for pictures).

    Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) -> y (..., Nq, dv); p (..., Nq, Nk)
    """

    def forward(self, q, k, v, *, scale=None):
        xp = get_array_module(q)
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        s = q @ k.swapaxes(-1, -2)
        s *= self.scale
        s -= s.max(axis=-1, keepdims=True)  # shift by the max: exp never overflows
        p = xp.exp(s, out=s)
        p /= sum_last(p)
        self.q, self.k, self.v, self.p = q, k, v, p
        self.y = p @ v
        return self.y

    # dv = p^T dy ;  dp = dy v^T ;  ds = p * (dp - rowsum(dy * y))   (rowsum(dp * p) = rowsum(dy * y))
    # dq = scale * ds k ;  dk = scale * ds^T q
    def backward(self, dy):
        p = self.p
        dv = p.swapaxes(-1, -2) @ dy
        ds = dy @ self.v.swapaxes(-1, -2)
        ds -= sum_last(dy * self.y)
        ds *= p
        ds *= self.scale
        dq = ds @ self.k
        dk = ds.swapaxes(-1, -2) @ self.q
        return dq, dk, dv
