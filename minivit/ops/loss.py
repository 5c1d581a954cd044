"""Cross-entropy fused with log-softmax.

The math. For logits x_i (K classes) and the (label-smoothed) target distribution q_i:

    loss_i = -sum_k q_ik log softmax(x_i)_k
    dx_i = (softmax(x_i) - q_i) * dloss_i                 (log-softmax's backward with sum_k q_ik = 1)

The composed version builds the loss from log_softmax and a one-hot table; the op never forms the table.
"""

from minivit.backend import get_array_module
from minivit.function import Function
from minivit.ops.softmax import SoftmaxFn, log_softmax_composed
from minivit.tensor import Tensor


# ------------------------------------------------------------------------------------------ readable version
def cross_entropy_composed(logits, target, label_smoothing=0.0):
    """mean over the batch of -sum_k q_k log softmax(logits)_k, q the (smoothed) one-hot target.

    Shapes: logits (B, K), target (B,) integers -> ()
    """
    target = target.data if isinstance(target, Tensor) else target
    xp = get_array_module(logits.data)
    K = logits.shape[1]
    q = xp.eye(K, dtype=logits.dtype)[target] * (1.0 - label_smoothing) + label_smoothing / K   # (B, K)
    return -(log_softmax_composed(logits, axis=1) * q).sum(axis=1).mean()


# ------------------------------------------------------------------------------------------------- the op


class CrossEntropyFn(Function):
    """loss_i = -sum_k q_ik log softmax(x_i)_k with q_i = (1 - s) onehot(t_i) + s / K (label smoothing s).

    reduction='mean' averages loss_i over the batch, 'sum' adds them, 'none' returns them.

    Shapes: x (B, K) logits, t (B,) integer classes -> loss () or (B,)
    """

    def forward(self, x, t, *, label_smoothing=0.0, reduction="mean"):
        xp = get_array_module(x)
        B, K = x.shape
        shifted = x - x.max(axis=1, keepdims=True)
        logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        rows = xp.arange(B)
        loss = -(1.0 - label_smoothing) * logp[rows, t]
        if label_smoothing:
            loss -= (label_smoothing / K) * logp.sum(axis=1)
        self.p, self.t, self.s, self.reduction = xp.exp(logp), t, label_smoothing, reduction
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    # dx_i = (softmax(x_i) - q_i) * dloss_i      with dloss_i = dy / B (mean), dy (sum) or dy_i (none)
    def backward(self, dy):
        xp = get_array_module(dy)
        B, K = self.p.shape
        dx = self.p - self.s / K
        dx[xp.arange(B), self.t] -= 1.0 - self.s
        if self.reduction == "mean":
            dx *= dy / B
        elif self.reduction == "sum":
            dx *= dy
        else:
            dx *= dy[:, None]
        return dx, None

    def backward_graph(self, dy):
        x, t = self.parents
        xp = get_array_module(x.data)
        B, K = x.shape
        q = xp.full((B, K), self.s / K, dtype=x.dtype)
        q[xp.arange(B), t.data] += 1.0 - self.s                         # the smoothed one-hot target
        dloss = dy * (1.0 / B) if self.reduction == "mean" else dy if self.reduction == "sum" else dy.reshape(B, 1)
        return (SoftmaxFn.apply(x, axis=1) - Tensor(q)) * dloss, None
