"""Mixed precision: autocast (each op in the dtype its numerics allow) and a dynamic loss scaler (GradScaler).

The names and the rules are PyTorch's (``torch.autocast``, ``torch.amp.GradScaler``).

float16 has a 10-bit mantissa (eps 9.8e-4) and a range of 6e-8 (smallest subnormal) to 65504. Matrix products
keep their accuracy in it (each output is a sum that the hardware accumulates in float32), so under ``autocast``
they run in float16: on a GPU that is what its tensor cores run fast. On the CPU (NumPy has no float16 BLAS) the
float16 operands are multiplied by float32 BLAS and each output rounded to float16 once (``kernels.matmul``): the
same numbers, with float16 storage between the ops. Softmax, log-softmax, LayerNorm, the losses,
exp/log/pow and reductions sum many terms or span a wide range, so they run in float32. Every other op runs in the
dtype of its inputs. The parameters stay float32 ("master weights"): a cast node feeds the float16 copy to the
op and turns the gradient back into float32 for the optimizer.

Gradients below 6e-8 are flushed to zero in float16. The loss scaler multiplies the loss by a large factor S before
backward, so that the float16 gradients are S times larger; it divides them by S again (in float32) before the
step. When a gradient overflowed (Inf or NaN), it skips the step and halves S; after ``growth_interval`` clean
steps it doubles S.

    scaler = GradScaler()
    with autocast(dtype="float16"):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)            # only when the gradients are needed before the step (clipping)
    clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)                # skipped if a gradient is Inf or NaN
    scaler.update()
"""

import contextlib

import numpy as np

from minivit import devices, function
from minivit.function import Function
from minivit.kernels import astype
from minivit.ops import (BinaryCrossEntropyWithLogitsFn, CrossEntropyFn, ExpFn, LayerNormFn, LinearFn, LogFn,
                         LogSigmoidFn, LogSoftmaxFn, MatMulFn, MeanFn, MultiHeadSelfAttentionFn, PowFn,
                         ScaledDotProductAttentionFn, SoftmaxFn, SoftplusFn, SumFn)

LOW = "low"          # the autocast dtype (float16)
FLOAT32 = "float32"

# op -> the dtype its floating inputs are cast to under autocast; ops not listed run in their inputs' dtype.
# One choice differs from PyTorch: its fused attention kernels run in float16 but accumulate the softmax in float32;
# minivit's attention ops compute their softmax in their inputs' dtype, so they run in float32 (the q, k, v
# projections before them are float16).
POLICY = {
    LinearFn: LOW, MatMulFn: LOW,
    ScaledDotProductAttentionFn: FLOAT32, MultiHeadSelfAttentionFn: FLOAT32,
    SoftmaxFn: FLOAT32, LogSoftmaxFn: FLOAT32, LayerNormFn: FLOAT32, CrossEntropyFn: FLOAT32,
    BinaryCrossEntropyWithLogitsFn: FLOAT32, SumFn: FLOAT32, MeanFn: FLOAT32, ExpFn: FLOAT32, LogFn: FLOAT32,
    PowFn: FLOAT32, SoftplusFn: FLOAT32, LogSigmoidFn: FLOAT32,
}
LOW_DTYPES = ("float16",)


class CastFn(Function):
    """y = x in another dtype; the gradient goes back in the dtype of x."""

    def forward(self, x, dtype):
        self.source = x.dtype
        return astype(x, dtype)

    def backward(self, dy):
        return (astype(dy, self.source),)

    def backward_graph(self, dy):
        return (CastFn.apply(dy, dtype=self.source),)


def cast(t, dtype):
    """Tensor ``t`` in ``dtype`` (itself when it is not floating or already in it), as a differentiable op."""
    if t.dtype.kind != "f" or t.dtype == dtype:
        return t
    return CastFn.apply(t, dtype=dtype)


class _Policy:
    """The callable that ``Function.__call__`` asks under autocast (``function.autocast_policy``)."""

    def __init__(self, dtype):
        self.dtypes = {LOW: np.dtype(dtype), FLOAT32: np.dtype(np.float32)}

    def __call__(self, fn, tensors):
        rule = POLICY.get(type(fn))
        if rule is None:
            return tensors
        return tuple(cast(t, self.dtypes[rule]) for t in tensors)


@contextlib.contextmanager
def autocast(dtype="float16", enabled=True):
    """Inside this block the ops in ``POLICY`` run in ``dtype`` (matrix products) or float32 (the rest of the
    table); the others in their inputs' dtype. Blocks nest; ``enabled=False`` turns it off inside."""
    if str(np.dtype(dtype)) not in LOW_DTYPES:
        raise ValueError(f"autocast: dtype must be one of {', '.join(LOW_DTYPES)}, got {dtype!r} "
                         "(NumPy has no bfloat16)")
    outer = function.autocast_policy
    function.autocast_policy = _Policy(dtype) if enabled else None
    try:
        yield
    finally:
        function.autocast_policy = outer


class GradScaler:
    """Dynamic loss scaling with the semantics of ``torch.amp.GradScaler``.

    Args:
        init_scale: the first scale S (2^16).
        growth_factor: S is multiplied by this after ``growth_interval`` steps in a row without Inf/NaN (2).
        backoff_factor: S is multiplied by this when a gradient is Inf/NaN, and that step is skipped (0.5).
        growth_interval: clean steps before S grows (2000).
        enabled: False makes every method a pass-through (scale(loss) is loss, step is optimizer.step()).
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 enabled=True):
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(f"GradScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                             f"growth_interval >= 1, got {init_scale}, {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}")
        self.enabled = enabled
        self._scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self._growth_tracker = int(growth_interval), 0
        self._found_inf = {}  # id(optimizer) -> whether its gradients held Inf/NaN (set by unscale_)

    def get_scale(self):
        return self._scale if self.enabled else 1.0

    def scale(self, loss):
        """The loss times S (a Tensor for ``backward()``)."""
        return loss * self._scale if self.enabled else loss

    def unscale_(self, optimizer):
        """Divide the optimizer's gradients by S in place, in float32, and note whether any is Inf or NaN."""
        if not self.enabled:
            return
        if id(optimizer) in self._found_inf:
            raise RuntimeError("GradScaler.unscale_ was already called on this optimizer since the last update()")
        inverse = 1.0 / self._scale
        found = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.grad = p.grad.astype(np.float32, copy=False) if p.grad.dtype == np.float16 else p.grad
                p.grad *= inverse
                found = found or not bool(devices.get_array_module(p.grad).isfinite(p.grad).all())
        self._found_inf[id(optimizer)] = found

    def step(self, optimizer):
        """``optimizer.step()`` unless a gradient is Inf or NaN (then the weights are left untouched).
        Returns whether the step was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)]:
            return False
        optimizer.step()
        return True

    def update(self):
        """Back off after an overflow, grow after ``growth_interval`` clean steps; start a new step."""
        if not self.enabled:
            return
        if not self._found_inf:
            raise RuntimeError("GradScaler.update: no step() or unscale_() since the last update()")
        if any(self._found_inf.values()):
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._scale *= self.growth_factor
                self._growth_tracker = 0
        self._found_inf = {}

    def state_dict(self):
        """The scale and its counters, with torch.amp.GradScaler's keys."""
        if not self.enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state):
        if not state:
            return
        self._scale, self.growth_factor = float(state["scale"]), float(state["growth_factor"])
        self.backoff_factor, self.growth_interval = float(state["backoff_factor"]), int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])
