"""Function: the base of every op, the hooks that watch ops run, and the helper that undoes broadcasting.

An op is a subclass with a forward and two ways back:

    forward(self, *arrays, **settings) -> array      on raw arrays; saves on ``self`` what backward needs
    backward(self, dy) -> tuple of arrays            on raw arrays, the fast path of every training step
    backward_graph(self, dy) -> tuple of Tensors     the same gradients built from differentiable ops, used when
                                                     a graph of the gradient is wanted (``create_graph=True``)

Both backwards return one gradient per input, None where it is not needed. ``backward_graph`` reads the inputs
as Tensors from ``self.parents`` and recomputes from them whatever depends on them (never cached statistics:
their derivative would be lost), so that the gradient it returns can be differentiated again, to any order.

``Op.apply(*tensors, **settings)`` runs forward on the tensors' arrays and, when gradients are wanted, links the
result to this op so that the graph walk in ``minivit.autograd`` can call a backward later. Settings (an axis, a
scale, an index) are keyword arguments and never graph inputs.

dtypes: one rule for every op. Floating inputs of different precisions are promoted to the widest of them
before the op runs (NumPy's rule between arrays; PyTorch raises instead for linear, matmul and the norms), through
a cast op, so each input's gradient comes back in that input's own dtype. Integer inputs (labels, indices) are
left alone. Python numbers (and NumPy float scalars) take the dtype of the tensor they meet, so float32 stays
float32.
"""

import contextlib

from minivit import devices
from minivit.tensor import Tensor, is_grad_enabled


class Function:
    parents = ()
    needs_input_grad = ()

    @classmethod
    def apply(cls, *inputs, **settings):
        """Run the op on tensors (or arrays, taken as constants) and return the output Tensor."""
        return cls()(*inputs, **settings)

    def __call__(self, *inputs, **settings):
        tensors = tuple(x if isinstance(x, Tensor) else Tensor(x) for x in inputs)
        if len(tensors) > 1:
            tensors = promote(tensors)
        if autocast_policy is not None:
            tensors = autocast_policy(self, tensors)
        arrays = tuple(t.data for t in tensors)
        devices.check_same_device(arrays, type(self).__name__)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        track = is_grad_enabled() and any(self.needs_input_grad)
        y = run_with_hooks(self, "forward", lambda: self.forward(*arrays, **settings), arrays)
        out = Tensor(y, requires_grad=track)
        if track:
            out._ctx = self
            self.parents = tensors
        return out

    def forward(self, *arrays, **settings):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def backward_graph(self, dy):
        raise NotImplementedError(f"{type(self).__name__} has no backward_graph, so its gradient cannot be "
                                  "differentiated (create_graph=True)")


# Inside ``minivit.amp.autocast``: policy(fn, tensors) -> the tensors the op runs on, cast to the dtype that the
# op's entry in the policy table asks for (None outside autocast: then an op costs one test).
autocast_policy = None


# ------------------------------------------------------------------------------------------------- hooks
# A hook watches every op run: hook(fn, phase, compute, inputs) must call compute() and return its result.
# phase is 'forward' or 'backward'; inputs are the arrays (forward) or the upstream gradient (backward).
# Hooks nest, the first added outermost. The profiler and the anomaly mode are hooks; with none, an op costs
# one empty-list test.
_hooks = []


def run_with_hooks(fn, phase, compute, inputs):
    """``compute()``, seen by every active hook."""
    if not _hooks:
        return compute()
    call = compute
    for hook in reversed(_hooks):
        call = (lambda h, inner: lambda: h(fn, phase, inner, inputs))(hook, call)
    return call()


@contextlib.contextmanager
def hook(h):
    """Inside this block ``h`` watches every op (see ``run_with_hooks``)."""
    _hooks.append(h)
    try:
        yield h
    finally:
        _hooks.remove(h)


def first_non_finite(values):
    """Index of the first array (or Tensor) holding NaN or Inf, or None."""
    for i, a in enumerate(values):
        a = a.data if isinstance(a, Tensor) else a
        if a is not None and a.dtype.kind == "f" and not bool(devices.get_array_module(a).isfinite(a).all()):
            return i
    return None


def _anomaly_hook(fn, phase, compute, inputs):
    result = compute()
    name = type(fn).__name__
    if phase == "forward":
        if first_non_finite([result]) is not None:
            bad_input = first_non_finite(inputs)
            raise FloatingPointError(
                f"anomaly: {name} produced NaN or Inf in its output (shape {tuple(result.shape)}) from "
                f"inputs of shapes {[tuple(a.shape) for a in inputs]}"
                + ("" if bad_input is None else f"; input {bad_input} was already non-finite"))
    elif isinstance(result, tuple):
        bad = first_non_finite(result)
        if bad is not None:
            raise FloatingPointError(f"anomaly: {name}.backward produced NaN or Inf in the gradient of input {bad}")
    return result


def detect_anomaly():
    """Inside this block every op checks its output (and, in backward, its gradients) for NaN and Inf and
    raises FloatingPointError naming the first op that produced one. Slower: for hunting a diverging run."""
    return hook(_anomaly_hook)


# ---------------------------------------------------------------------------------------------- helpers
def promote(tensors):
    """The tensors with every floating one cast to the widest floating dtype among them (see the module doc)."""
    floats = {t.data.dtype for t in tensors if t.data.dtype.kind == "f"}
    if len(floats) < 2:
        return tensors
    import numpy as np
    from minivit.ops.arithmetic import CastFn
    common = np.result_type(*floats)
    return tuple(CastFn.apply(t, dtype=common) if t.data.dtype.kind == "f" and t.data.dtype != common else t
                 for t in tensors)


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting stretched, so that it has ``shape`` again.

    Broadcasting copies an input along new leading axes and along axes of length 1; the gradient of a copy is
    the sum of the gradients of all its copies. Works on arrays and on Tensors alike (then it records a graph).
    """
    if tuple(grad.shape) == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=stretched).reshape(shape)


def normalize_axis(axis, ndim, op):
    """``axis`` as an index in [0, ndim), negative axes counted from the end; an axis out of range raises."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor with {ndim} dimensions "
                         f"(expected {-ndim}..{ndim - 1})")
    return axis % ndim
