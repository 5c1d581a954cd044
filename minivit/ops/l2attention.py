"""L2-distance attention (Kim, Papamakarios and Mnih, "The Lipschitz constant of self-attention", 2021).

Dot-product attention is not Lipschitz: its scores q_i . k_j grow without bound with the inputs. Scoring by
distance instead, and tying the query and key projections (q = k = x W: the caller passes the same tensor
twice), makes self-attention Lipschitz; ViTGAN's discriminator uses it for that reason.

The math. For queries q_i, keys k_j, values v_j and scale = 1/sqrt(d):

    s_ij = -||q_i - k_j||^2 * scale = -scale (|q_i|^2 - 2 q_i . k_j + |k_j|^2)
    p = softmax_j(s),   y_i = sum_j p_ij v_j

The term |q_i|^2 is the same for every key j of a row, and softmax does not change when a row is shifted, so the
op drops it: p = softmax_j(scale (2 q_i . k_j - |k_j|^2)), the same probabilities from smaller numbers. Back:

    dv = p^T dy ;   ds = p * (dp - rowsum(dp * p)),  dp = dy v^T
    dq_i = -2 scale sum_j ds_ij (q_i - k_j) = 2 scale (ds k)_i              (each row of ds sums to 0)
    dk_j = -2 scale sum_i ds_ij (k_j - q_i) = 2 scale ((ds^T q)_j - k_j colsum(ds)_j)

The composed version below builds the distances as written, from primitives; the op after it computes the
gradients by the formulas above.
"""

import math

from minivit.function import Function
from minivit.ops.softmax import SoftmaxFn, softmax_composed
from minivit.tensor import Tensor


# ------------------------------------------------------------------------------------------ readable version
def l2_distance_attention_composed(q, k, v, scale=None):
    """softmax_j(-||q_i - k_j||^2 * scale) v, from primitives.

    Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) -> (..., Nq, dv)
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    differences = q.reshape(*q.shape[:-1], 1, q.shape[-1]) - k.reshape(*k.shape[:-2], 1, *k.shape[-2:])
    distances = (differences * differences).sum(axis=-1)                            # (..., Nq, Nk)
    return softmax_composed(-distances * scale, axis=-1) @ v


# ----------------------------------------------------------------------------------------------- fused op
def _swap_last_two(a):
    """The last two axes swapped, for an array or a Tensor."""
    return a.transpose(-1, -2) if isinstance(a, Tensor) else a.swapaxes(-1, -2)


def l2_scores(q, k, scale):
    """scale (2 q k^T - |k|^2): the scores -||q_i - k_j||^2 * scale less the row constant -scale |q_i|^2.

    On arrays and on Tensors alike.  Shapes: q (..., Nq, d), k (..., Nk, d) -> (..., Nq, Nk)
    """
    k_squared = _swap_last_two((k * k).sum(axis=-1, keepdims=True))                 # (..., 1, Nk)
    return ((q @ _swap_last_two(k)) * 2.0 - k_squared) * scale


# dv = p^T dy ;  ds = p * (dp - rowsum(dp * p)), dp = dy v^T
# dq = 2 scale ds k ;  dk = 2 scale (ds^T q - k colsum(ds))        (see the module docstring)
def l2_attention_gradients(dy, q, k, v, p, scale):
    """(dq, dk, dv) of y = p v with p = softmax(l2_scores(q, k, scale)); on arrays and on Tensors alike."""
    dp = dy @ _swap_last_two(v)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = (ds @ k) * (2.0 * scale)
    dk = (_swap_last_two(ds) @ q - k * _swap_last_two(ds.sum(axis=-2, keepdims=True))) * (2.0 * scale)
    return dq, dk, _swap_last_two(p) @ dy


class L2AttentionFn(Function):
    """y = softmax_j(-||q_i - k_j||^2 * scale) v, the softmax over keys; scale = 1/sqrt(d) unless given.

    The probabilities are kept as ``self.p``.

    Shapes: q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv) -> y (..., Nq, dv); the leading axes all equal
    """

    def forward(self, q, k, v, *, scale=None):
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        self.q, self.k, self.v = q, k, v
        self.p = SoftmaxFn().forward(l2_scores(q, k, self.scale), axis=-1)
        return self.p @ v

    # see l2_attention_gradients
    def backward(self, dy):
        return l2_attention_gradients(dy, self.q, self.k, self.v, self.p, self.scale)

    def backward_graph(self, dy):
        q, k, v = self.parents
        p = SoftmaxFn.apply(l2_scores(q, k, self.scale), axis=-1)      # p again, as a node of the graph
        return l2_attention_gradients(dy, q, k, v, p, self.scale)
