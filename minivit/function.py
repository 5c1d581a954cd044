"""Function: the base of every op, and the helper that undoes broadcasting in backward.

An op is a subclass with two methods on raw arrays:

    forward(self, *arrays, **settings) -> array      saves on ``self`` what backward needs
    backward(self, dy) -> tuple of arrays            one gradient per input, None where not needed

``Op.apply(*tensors, **settings)`` runs forward on the tensors' arrays and, when gradients are wanted, links the
result to this op so that ``Tensor.backward`` can call ``backward`` later. Settings (an axis, a scale, an index)
are keyword arguments and never graph inputs.
"""

import contextlib
import time

from minivit import backend
from minivit.tensor import Tensor, is_grad_enabled


class _AnomalyMode:
    enabled = False


# The active minivit.profile.Profiler, if any (a one-element list so that other modules can set it).
_PROFILER = [None]


def timed(name, phase, compute, *args):
    """Run ``compute(*args)``, and report its duration to the active profiler if there is one."""
    profiler = _PROFILER[0]
    if profiler is None:
        return compute(*args)
    t0 = time.perf_counter()
    result = compute(*args)
    backend.synchronize(result[0] if isinstance(result, tuple) else result)
    profiler.record(name, phase, time.perf_counter() - t0)
    return result


@contextlib.contextmanager
def detect_anomaly():
    """Inside this block every op checks its output (and, in backward, its gradients) for NaN and Inf and
    raises FloatingPointError naming the first op that produced one. Slower: for hunting a diverging run."""
    previous = _AnomalyMode.enabled
    _AnomalyMode.enabled = True
    try:
        yield
    finally:
        _AnomalyMode.enabled = previous


def first_non_finite(arrays):
    """Index of the first array holding NaN or Inf, or None (used in anomaly mode)."""
    for i, a in enumerate(arrays):
        if a is not None and a.dtype.kind == "f" and not bool(backend.get_array_module(a).isfinite(a).all()):
            return i
    return None


class Function:
    #: every op class defined by minivit, in definition order (the tests check that each one has a gradient test)
    registry = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("minivit.ops."):
            Function.registry.append(cls)

    parents = ()
    needs_input_grad = ()

    @classmethod
    def apply(cls, *inputs, **settings):
        """Run the op on tensors (or arrays, taken as constants) and return the output Tensor."""
        return cls()(*inputs, **settings)

    def __call__(self, *inputs, **settings):
        tensors = tuple(x if isinstance(x, Tensor) else Tensor(x) for x in inputs)
        arrays = tuple(t.data for t in tensors)
        backend.check_same_device(arrays, type(self).__name__)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        track = is_grad_enabled() and any(self.needs_input_grad)
        y = timed(type(self).__name__, "forward", lambda: self.forward(*arrays, **settings))
        if _AnomalyMode.enabled and first_non_finite([y]) is not None:
            bad_inputs = first_non_finite(arrays)
            raise FloatingPointError(
                f"anomaly: {type(self).__name__} produced NaN or Inf in its output (shape {tuple(y.shape)}) from "
                f"inputs of shapes {[tuple(a.shape) for a in arrays]}"
                + ("" if bad_inputs is None else f"; input {bad_inputs} was already non-finite"))
        out = Tensor(y, requires_grad=track)
        if track:
            out._ctx = self
            self.parents = tensors
        return out

    def forward(self, *arrays, **settings):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting stretched, so that it has ``shape`` again.

    Broadcasting copies an input along new leading axes and along axes of length 1; the gradient of a copy is
    the sum of the gradients of all its copies.
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=stretched).reshape(shape)
