"""Cross-entropy fused with log-softmax.

The math. For logits x_i (K classes) and the (label-smoothed) target distribution q_i:

    loss_i = -sum_k q_ik log softmax(x_i)_k
    dx_i = (softmax(x_i) - q_i) * dloss_i                 (log-softmax's backward with sum_k q_ik = 1)

With class weights w and ignored rows the coefficients become c_ik = w_k q_ik (0 on ignored rows), and
dx_i = (sum_k c_ik softmax(x_i) - c_i) * dloss_i.

The composed version builds the loss from log_softmax and a one-hot table; the op never forms the table.
"""

from minivit.backend import get_array_module
from minivit.function import Function
from minivit.ops.softmax import LogSoftmaxFn, SoftmaxFn, log_softmax_composed
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
    """loss_i = -sum_k c_ik log softmax(x_i)_k, with the coefficients c_ik = w_k q_ik:

        class targets t (B,):           q_i = (1 - s) onehot(t_i) + s / K,  c_i = 0 where t_i = ignore_index
        probability targets t (B, K):   q_i = (1 - s) t_i + s / K

    (label smoothing s, class weights w, 1 without ``weight``). reduction='mean' divides the sum of loss_i by
    sum_i w_(t_i) over the rows not ignored (by B for probability targets), as PyTorch; 'sum' adds them, 'none'
    returns them.

    Shapes: x (B, K) logits, t (B,) integer classes or (B, K) probabilities -> loss () or (B,)
    """

    def forward(self, x, t, *, label_smoothing=0.0, reduction="mean", weight=None, ignore_index=None):
        xp = get_array_module(x)
        B, K = x.shape
        shifted = x - x.max(axis=1, keepdims=True)
        logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        self.s, self.reduction, self.weight, self.ignore_index = label_smoothing, reduction, weight, ignore_index
        self.soft = t.dtype.kind == "f"
        ignored = None if self.soft or ignore_index is None else (t == ignore_index)
        if ignored is not None and not bool(ignored.any()):
            ignored = None
        self.general = self.soft or weight is not None or ignored is not None
        self.p = xp.exp(logp)
        if not self.general:   # the training step's case: one class per row, every class weighing 1
            rows = xp.arange(B)
            loss = -(1.0 - label_smoothing) * logp[rows, t]
            if label_smoothing:
                loss -= (label_smoothing / K) * logp.sum(axis=1)
            self.t, self.count = t, B
        else:
            self.c, self.count = self._coefficients(xp, t, ignored, B, K, x.dtype)
            self.logp = logp
            loss = -(self.c * logp).sum(axis=1)
        if reduction == "mean":
            return loss.sum() / self.count
        if reduction == "sum":
            return loss.sum()
        return loss

    def _coefficients(self, xp, t, ignored, B, K, dtype):
        """c (B, K) and the divisor of the mean, from raw arrays."""
        s, w = self.s, self.weight
        if self.soft:
            c = (1.0 - s) * t + s / K
            if w is not None:
                c = c * w
            return c.astype(dtype, copy=False), B
        c = xp.full((B, K), s / K, dtype=dtype)
        safe = t if ignored is None else xp.where(ignored, 0, t)
        c[xp.arange(B), safe] += 1.0 - s
        row_weight = xp.ones(B, dtype=dtype) if w is None else w[safe].astype(dtype)
        if w is not None:
            c *= w
        if ignored is not None:
            c[ignored] = 0
            row_weight = xp.where(ignored, 0, row_weight)
        return c, row_weight.sum()

    def _dloss(self, dy, B):
        """dL/dloss_i as a column (B, 1) or a scalar (arrays or Tensors)."""
        if self.reduction == "mean":
            return dy * (1.0 / self.count)
        if self.reduction == "sum":
            return dy
        return dy.reshape(B, 1)

    # dx_i = (sum_k c_ik softmax(x_i) - c_i) * dloss_i;  dt_ik = -(1 - s) w_k log softmax(x_i)_k * dloss_i (soft)
    # with dloss_i = dy / divisor (mean), dy (sum) or dy_i (none)
    def backward(self, dy):
        xp = get_array_module(dy)
        B, K = self.p.shape
        if not self.general:
            dx = self.p - self.s / K
            dx[xp.arange(B), self.t] -= 1.0 - self.s
            dx *= self._dloss(dy, B)
            return dx, None
        dloss = self._dloss(dy, B)
        dx = (self.p * self.c.sum(axis=1, keepdims=True) - self.c) * dloss if self.needs_input_grad[0] else None
        dt = None
        if self.soft and self.needs_input_grad[1]:
            dt = -(1.0 - self.s) * self.logp * dloss
            if self.weight is not None:
                dt = dt * self.weight
        return dx, dt

    def backward_graph(self, dy):
        x, t = self.parents
        xp = get_array_module(x.data)
        B, K = x.shape
        dloss = self._dloss(dy, B)
        w = None if self.weight is None else Tensor(self.weight)
        if self.soft:
            c = (1.0 - self.s) * t + self.s / K                              # a graph in t
            c = c if w is None else c * w
        elif not self.general:
            q = xp.full((B, K), self.s / K, dtype=x.dtype)
            q[xp.arange(B), t.data] += 1.0 - self.s                         # the smoothed one-hot target
            return (SoftmaxFn.apply(x, axis=1) - Tensor(q)) * dloss, None
        else:
            c = Tensor(self.c)
        dx = (SoftmaxFn.apply(x, axis=1) * c.sum(axis=1, keepdims=True) - c) * dloss \
            if self.needs_input_grad[0] else None
        dt = None
        if self.soft and self.needs_input_grad[1]:
            dt = LogSoftmaxFn.apply(x, axis=1) * dloss * -(1.0 - self.s)
            dt = dt if w is None else dt * w
        return dx, dt
