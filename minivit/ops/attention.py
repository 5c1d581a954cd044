"""Scaled dot-product attention as one op, and multi-head self-attention on a packed qkv projection.

The math. With scores s = q k^T * scale (scale = 1/sqrt(d)), probabilities p = softmax(s) over the keys and
y = p v:

    dv = p^T dy
    dp = dy v^T
    ds = p * (dp - rowsum(dp * p))        (softmax's backward, row by row; rowsum(dp * p) = rowsum(dy * y))
    dq = scale * ds k ;  dk = scale * ds^T q

Multi-head attention splits the packed projection qkv (B, N, 3D) into q, k, v of shape (B, nh, N, hd) each
(``split_heads``), attends in every head, and puts the heads side by side again (``merge_heads``).

The composed versions build both from primitives; the ops compute the derivative by the formulas above, write
into their final layouts, and keep the probabilities for backward and for pictures.
"""

import math

from minivit.devices import get_array_module
from minivit.ops.reduce import sum_last
from minivit.parallel import parallel_rows
from minivit.function import Function, unbroadcast
from minivit.ops.shape import StackFn
from minivit.ops.softmax import SoftmaxFn, softmax_composed
from minivit.tensor import Tensor


# ------------------------------------------------------------------------------------------ readable version
def split_heads(qkv, num_heads):
    """The packed projection [q | k | v] as three head-major tensors (arrays or Tensors, views where possible).

    Shapes: qkv (B, N, 3D) -> q, k, v each (B, nh, N, hd), hd = D / nh
    """
    B, N, three_d = qkv.shape
    heads = qkv.reshape(B, N, 3, num_heads, three_d // (3 * num_heads))
    heads = heads.permute(2, 0, 3, 1, 4) if hasattr(heads, "permute") else heads.transpose(2, 0, 3, 1, 4)
    return heads[0], heads[1], heads[2]


def merge_heads(y):
    """The heads side by side again (arrays or Tensors).  Shapes: y (B, nh, N, hd) -> (B, N, nh*hd)"""
    B, nh, N, hd = y.shape
    y = y.permute(0, 2, 1, 3) if hasattr(y, "permute") else y.transpose(0, 2, 1, 3)
    return y.reshape(B, N, nh * hd)


def scaled_dot_product_attention_composed(q, k, v, scale=None):
    """softmax(q k^T * scale) v, from primitives.  Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv)"""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale   # (..., Nq, Nk)
    return softmax_composed(scores, axis=-1) @ v


def multi_head_self_attention_composed(qkv, num_heads):
    """Split a packed qkv into heads, attend in each, put the heads side by side again, from primitives.

    Shapes: qkv (B, N, 3D) -> (B, N, D)
    """
    return merge_heads(scaled_dot_product_attention_composed(*split_heads(qkv, num_heads)))


# ---------------------------------------------------------------------------------------------- fast kernels


def transposed_copy(a, scale):
    """scale * a^T over the last two axes, as a new C-contiguous array.  Shapes: a (..., n, d) -> (..., d, n)

    For the small matrices of attention, BLAS multiplies by a transposed view (q @ k^T) at about half the speed
    it reaches with a contiguous operand (OpenBLAS, measured); the copy costs less than that, and takes the
    scale along for free.
    """
    xp = get_array_module(a)
    out = xp.empty(a.shape[:-2] + (a.shape[-1], a.shape[-2]), dtype=a.dtype)
    return xp.multiply(a.swapaxes(-1, -2), scale, out=out)


def attention_forward(q, k, v, scale, y=None, p=None, bias=None):
    """y = softmax(q k^T * scale + bias) v and p = softmax(q k^T * scale + bias), written into ``y`` and ``p``
    when given; ``bias`` (an additive mask: -inf where a query may not look) is optional.

    Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv), bias broadcastable to (..., Nq, Nk)
            -> y (..., Nq, dv), p (..., Nq, Nk)
    """
    xp = get_array_module(q)
    kt = transposed_copy(k, scale)                                       # (..., d, Nk)
    p = xp.matmul(q, kt, out=p)                                          # the scores s = q k^T * scale
    if bias is not None:
        p += bias
    # Softmax does not change when a row is shifted; the usual shift by the row max only keeps exp from
    # overflowing and the small probabilities from underflowing. Scores of a working model are far from exp's
    # limits, so on the CPU try without it (two passes fewer over the largest array of the step) and shift only
    # the rows that need it. Unshifted, p_j = exp(s_j) / total loses nothing when 1 <= total < 1e30: no exp
    # overflowed, and an exp(s_j) that underflowed below the normal range gives p_j <= exp(s_j), itself below
    # it, as the shifted form would. Other rows (all scores negative, or huge) are redone with the shift. On the
    # GPU that check would wait for the device, so the shift is always made there.
    shift = xp.__name__ != "numpy" or bias is not None                  # a mask: always shift (simpler)
    if not shift:
        with xp.errstate(over="ignore", under="ignore"):   # an overflow here only sends the row to the shift
            xp.exp(p, out=p)
            total = sum_last(p)                             # (inf, or a sum of huge terms that overflows)
        ok = (total >= 1.0) & (total < 1e30)
        if not bool(ok.all()):
            bad = xp.nonzero(~ok[..., 0])                                # the rows to redo: (..., Nq) indices
            if 8 * len(bad[0]) > ok.size:                                # many: all scores again, shifted
                shift = True
                xp.matmul(q, kt, out=p)
            else:
                batch = p.shape[:-2]
                q_rows = xp.broadcast_to(q, batch + q.shape[-2:])[bad]                      # (n, d)
                kt_rows = xp.broadcast_to(kt, batch + kt.shape[-2:])[bad[:-1]]              # (n, d, Nk)
                s = (q_rows[:, None, :] @ kt_rows)[:, 0]                                     # (n, Nk)
                s -= s.max(axis=-1, keepdims=True)
                xp.exp(s, out=s)
                p[bad] = s
                total[bad] = s.sum(axis=-1, keepdims=True)
    if shift:
        p -= p.max(axis=-1, keepdims=True)
        xp.exp(p, out=p)
        total = sum_last(p)
    p /= total
    return xp.matmul(p, v, out=y), p


# dv = p^T dy ;  ds = p * (dp - rowsum(dy * y)), dp = dy v^T   (rowsum(dp * p) = rowsum(dy * y))
# dq = scale * ds k ;  dk = scale * ds^T q
# The array `ds` below holds scale * ds: the scale rides on the small copy of v^T instead of a pass over ds.
def attention_backward(dy, q, k, v, p, y, scale, dq=None, dk=None, dv=None):
    """The gradients (dq, dk, dv) of attention_forward, given the upstream gradient dy of y; written into
    ``dq``, ``dk`` and ``dv`` when given."""
    xp = get_array_module(dy)
    ds = dy @ transposed_copy(v, scale)                                  # scale * dp
    ds -= scale * sum_last(dy * y)
    ds *= p                                                              # scale * ds
    return (xp.matmul(ds, k, out=dq), xp.matmul(ds.swapaxes(-1, -2), q, out=dk),
            xp.matmul(p.swapaxes(-1, -2), dy, out=dv))


def attention_backward_graph(dy, q, k, v, scale, bias=None):
    """attention_backward on Tensors, with p recomputed from q and k: gradients that can be differentiated again.
    Shapes as attention_forward; returns (dq, dk, dv) in the broadcast batch shape."""
    scores = (q @ k.transpose(-1, -2)) * scale
    p = SoftmaxFn.apply(scores if bias is None else scores + Tensor(bias), axis=-1)
    dv = p.transpose(-1, -2) @ dy
    dp = dy @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


# --------------------------------------------------------------------------------------------------- the ops
class ScaledDotProductAttentionFn(Function):
    """y = softmax(q k^T * scale + bias) v, the softmax over keys; scale = 1/sqrt(d) unless given; ``bias`` an
    optional constant additive mask (-inf where a query may not look), broadcastable to (..., Nq, Nk).

    The attention probabilities p = softmax(q k^T * scale + bias) are kept as ``self.p`` (for backward and for
    pictures).

    Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) -> y (..., Nq, dv); p (..., Nq, Nk)
    """

    def forward(self, q, k, v, *, scale=None, bias=None):
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        self.bias = bias
        self.y, self.p = attention_forward(q, k, v, self.scale, bias=bias)
        self.q, self.k, self.v = q, k, v
        return self.y

    # see attention_backward; batch axes that q, k or v shared by broadcasting are summed back
    def backward(self, dy):
        grads = attention_backward(dy, self.q, self.k, self.v, self.p, self.y, self.scale)
        return tuple(unbroadcast(g, x.shape) for g, x in zip(grads, (self.q, self.k, self.v)))

    def backward_graph(self, dy):
        grads = attention_backward_graph(dy, *self.parents, self.scale, bias=self.bias)
        return tuple(unbroadcast(g, x.shape) for g, x in zip(grads, self.parents))


class MultiHeadSelfAttentionFn(Function):
    """Multi-head self-attention on a packed projection qkv = x W_qkv^T + b_qkv, as in timm's Attention.

    The last axis of qkv holds [q | k | v], each split into nh heads of width hd = D / nh; every head attends
    on its own and the heads' outputs are put side by side again:

        q, k, v = qkv.reshape(B, N, 3, nh, hd) moved to (B, nh, N, hd) each
        y_h = softmax(q_h k_h^T / sqrt(hd)) v_h ;  y = [y_1 | ... | y_nh]

    One op instead of reshape, permute, three slices, attention, transpose and reshape: the same numbers, but
    backward writes dq, dk and dv straight into one array of qkv's layout instead of adding three zero-padded
    slices. The probabilities (B, nh, N, N) are kept as ``self.p``.

    Shapes: qkv (B, N, 3D) -> y (B, N, D)
    """

    def forward(self, qkv, *, num_heads):
        xp = get_array_module(qkv)
        B, N, three_d = qkv.shape
        nh, hd = num_heads, three_d // (3 * num_heads)
        self.q, self.k, self.v = split_heads(qkv, nh)                    # (B, nh, N, hd) views each
        self.scale = 1.0 / math.sqrt(hd)
        y = xp.empty((B, N, nh, hd), dtype=qkv.dtype)                    # the output's layout: heads side by side
        self.y = y.transpose(0, 2, 1, 3)                                 # (B, nh, N, hd), a view of it
        self.p = xp.empty((B, nh, N, N), dtype=qkv.dtype)

        def images(b):  # the images of a batch are independent
            attention_forward(self.q[b], self.k[b], self.v[b], self.scale, y=self.y[b], p=self.p[b])
        parallel_rows(B, images, xp)
        return y.reshape(B, N, nh * hd)

    # dy (B, N, D) -> per head (B, nh, N, hd) ; then attention_backward, writing into qkv's layout
    def backward(self, dy):
        xp = get_array_module(dy)
        B, nh, N, hd = self.y.shape
        dy_heads = dy.reshape(B, N, nh, hd).transpose(0, 2, 1, 3)           # (B, nh, N, hd)
        dqkv = xp.empty((B, N, 3, nh, hd), dtype=dy.dtype)
        dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                          # (B, nh, N, hd) views each

        def images(b):
            attention_backward(dy_heads[b], self.q[b], self.k[b], self.v[b], self.p[b], self.y[b], self.scale,
                               dq=dq[b], dk=dk[b], dv=dv[b])
        parallel_rows(B, images, xp)
        return (dqkv.reshape(B, N, 3 * nh * hd),)

    def backward_graph(self, dy):
        (qkv,) = self.parents
        B, nh, N, hd = self.y.shape
        dy_heads = dy.reshape(B, N, nh, hd).permute(0, 2, 1, 3)                      # (B, nh, N, hd)
        grads = attention_backward_graph(dy_heads, *split_heads(qkv, nh), self.scale)
        dheads = StackFn.apply(*grads, axis=0)                                       # (3, B, nh, N, hd)
        return (dheads.permute(1, 3, 0, 2, 4).reshape(B, N, 3 * nh * hd),)
