"""The logistic family: sigmoid, softplus, log-sigmoid and binary cross-entropy on logits.

The math. For a logit x (the log-odds of the positive class):

    sigmoid(x)  = 1 / (1 + e^-x)                 d sigmoid(x)/dx  = sigmoid(x) (1 - sigmoid(x))
    softplus(x) = log(1 + e^x)                   d softplus(x)/dx = sigmoid(x)
    log sigmoid(x) = -softplus(-x)               d log sigmoid(x)/dx = sigmoid(-x) = 1 - sigmoid(x)
    bce(x, t) = -[w t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))] = w t softplus(-x) + (1 - t) softplus(x)

For large |x| e^x overflows (past x = 88 in float32, 709 in float64), so the ops evaluate through e^-|x|, which
lies in (0, 1]:

    softplus(x) = max(x, 0) + log(1 + e^-|x|)
    sigmoid(x)  = 1 / (1 + e^-|x|)  for x >= 0,   e^-|x| / (1 + e^-|x|)  for x < 0

The composed versions below build the same functions from primitives, as the formulas read (and so overflow
where the formulas do); the ops after them are finite for every logit (try x = +-1e4).
"""

from minivit.devices import get_array_module
from minivit.function import Function, unbroadcast


# ------------------------------------------------------------------------------------------ readable version
def sigmoid_composed(x):
    """1 / (1 + e^-x), from primitives.  Shapes: x -> same"""
    return 1.0 / (1.0 + (-x).exp())


def softplus_composed(x):
    """log(1 + e^x), from primitives.  Shapes: x -> same"""
    return (1.0 + x.exp()).log()


def logsigmoid_composed(x):
    """-softplus(-x), from primitives.  Shapes: x -> same"""
    return -softplus_composed(-x)


def binary_cross_entropy_with_logits_composed(x, t, pos_weight=None, reduction="mean"):
    """w t softplus(-x) + (1 - t) softplus(x), reduced; from primitives.  Shapes: x, t -> () or x's shape"""
    loss = t * softplus_composed(-x) * (1.0 if pos_weight is None else pos_weight) + (1.0 - t) * softplus_composed(x)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


# ----------------------------------------------------------------------------------------------- fused ops
def softplus_array(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), finite for every finite x."""
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid_array(x):
    """1 / (1 + e^-x), evaluated through e^-|x| so that no exponential overflows."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class SigmoidFn(Function):
    """y = sigmoid(x) = 1 / (1 + e^-x).  Shapes: x -> y (same)"""

    def forward(self, x):
        self.y = sigmoid_array(x)
        return self.y

    # dx = dy * y * (1 - y)
    def backward(self, dy):
        return (dy * self.y * (1 - self.y),)

    def backward_graph(self, dy):
        (x,) = self.parents
        y = SigmoidFn.apply(x)
        return (dy * y * (1 - y),)


class SoftplusFn(Function):
    """y = softplus(x) = log(1 + e^x), a smooth ReLU.  Shapes: x -> y (same)"""

    def forward(self, x):
        self.x = x
        return softplus_array(x)

    # dx = dy * sigmoid(x)
    def backward(self, dy):
        return (dy * sigmoid_array(self.x),)

    def backward_graph(self, dy):
        (x,) = self.parents
        return (dy * SigmoidFn.apply(x),)


class LogSigmoidFn(Function):
    """y = log sigmoid(x) = -softplus(-x) = min(x, 0) - log(1 + e^-|x|).  Shapes: x -> y (same)"""

    def forward(self, x):
        self.x = x
        return -softplus_array(-x)

    # dx = dy * sigmoid(-x) = dy * (1 - sigmoid(x))
    def backward(self, dy):
        return (dy * sigmoid_array(-self.x),)

    def backward_graph(self, dy):
        (x,) = self.parents
        return (dy * SigmoidFn.apply(-x),)


class BinaryCrossEntropyWithLogitsFn(Function):
    """Binary cross-entropy between sigmoid(x) and targets t in [0, 1], on the logits x:

        loss_i = -[w t_i log sigmoid(x_i) + (1 - t_i) log(1 - sigmoid(x_i))]
               = w t_i softplus(-x_i) + (1 - t_i) softplus(x_i)

    with w the optional pos_weight (a weight of the positive term, broadcast against x; 1 when absent).
    reduction='mean' averages loss_i over all elements, 'sum' adds them, 'none' returns them.

    Shapes: x, t (same shape), pos_weight broadcastable to it -> loss () or x's shape
    """

    def forward(self, x, t, *pos_weight, reduction="mean"):
        self.x, self.t, self.reduction = x, t, reduction
        self.w = pos_weight[0] if pos_weight else None
        w = 1.0 if self.w is None else self.w
        loss = w * t * softplus_array(-x) + (1 - t) * softplus_array(x)
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    def _dloss(self, dy, n):
        """The upstream gradient of each loss_i: dy / n (mean), dy (sum) or dy_i (none)."""
        return dy * (1.0 / n) if self.reduction == "mean" else dy

    # with g_i the upstream gradient of loss_i (see _dloss) and s = sigmoid:
    #   dx_i = g_i * ((1 - t_i) s(x_i) - w t_i s(-x_i))
    #   dt_i = g_i * (w softplus(-x_i) - softplus(x_i))
    #   dw   = sum of g_i t_i softplus(-x_i) over the axes that w was broadcast along
    def backward(self, dy):
        x, t = self.x, self.t
        w = 1.0 if self.w is None else self.w
        g = self._dloss(dy, x.size)
        dx = g * ((1 - t) * sigmoid_array(x) - w * t * sigmoid_array(-x)) if self.needs_input_grad[0] else None
        dt = g * (w * softplus_array(-x) - softplus_array(x)) if self.needs_input_grad[1] else None
        grads = (dx, dt)
        if self.w is not None:
            dw = unbroadcast(g * t * softplus_array(-x), self.w.shape) if self.needs_input_grad[2] else None
            grads += (dw,)
        return grads

    def backward_graph(self, dy):
        x, t = self.parents[:2]
        w = self.parents[2] if len(self.parents) == 3 else 1.0
        g = self._dloss(dy, x.size)
        dx = g * ((1 - t) * SigmoidFn.apply(x) - w * t * SigmoidFn.apply(-x)) if self.needs_input_grad[0] else None
        dt = g * (w * SoftplusFn.apply(-x) - SoftplusFn.apply(x)) if self.needs_input_grad[1] else None
        grads = (dx, dt)
        if len(self.parents) == 3:
            dw = unbroadcast(g * t * SoftplusFn.apply(-x), w.shape) if self.needs_input_grad[2] else None
            grads += (dw,)
        return grads
