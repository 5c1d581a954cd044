"""Finite-difference gradient checking: compare a backward pass with central differences, in float64.

The check reduces the output to a number with a *random* upstream gradient U, L = sum(f(x) * U), so that every
output element matters with its own weight (summing the output alone hides bugs in softmax and LayerNorm,
whose outputs have a fixed sum along an axis). Then for each checked element x_i

    analytic  a_i = dL/dx_i from one call of L.backward()
    numeric   n_i = (L(x + h e_i) - L(x - h e_i)) / 2h           (central differences, error O(h^2))
    rel_i     = |a_i - n_i| / max(|a_i| + |n_i|, floor)           (symmetric, with a guard near zero)

Modes: 'full' checks every element (small inputs), 'sampled' checks ``samples`` random elements of every
tensor (never skipping a tensor), and 'directional' checks one random direction d per tensor, comparing
sum(a * d) with (L(x + h d) - L(x - h d)) / 2h: two evaluations per tensor, cheap enough for whole models.

Bands for the largest relative error: below 1e-7 good, below 1e-4 fine, below 1e-2 uneasy, above that wrong.
"""

from dataclasses import dataclass

import numpy as np

from minivit import devices
from minivit.tensor import Tensor, concat, enable_grad, no_grad

BANDS = ((1e-7, "good"), (1e-4, "fine"), (1e-2, "uneasy"))


def verdict(max_rel):
    """The band of a relative error: 'good', 'fine', 'uneasy' or 'wrong'."""
    for bound, name in BANDS:
        if max_rel < bound:
            return name
    return "wrong"


class GradcheckError(AssertionError):
    """Raised by ``GradcheckReport.raise_if_failed`` (and ``gradcheck(..., raise_on_fail=True)``)."""


@dataclass
class CheckRow:
    """What the check found for one input or parameter."""
    name: str
    shape: tuple
    checked: int          # elements (or directions) compared
    max_abs: float        # largest |analytic - numeric|
    max_rel: float        # largest relative error
    worst_index: object   # element with the largest relative error (None in directional mode)
    analytic: float       # analytic value there
    numeric: float        # numeric value there
    passed: bool

    @property
    def verdict(self):
        return verdict(self.max_rel)


class GradcheckReport:
    """The result of a gradient check: one row per input and parameter; ``ok`` when all of them pass."""

    def __init__(self, rows, mode, eps, rtol, title="gradcheck"):
        self.rows, self.mode, self.eps, self.rtol, self.title = rows, mode, eps, rtol, title

    @property
    def ok(self):
        return all(r.passed for r in self.rows)

    @property
    def max_rel(self):
        return max((r.max_rel for r in self.rows), default=0.0)

    def __getitem__(self, name):
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")

    def failed(self):
        return [r for r in self.rows if not r.passed]

    def __str__(self):
        status = "PASSED" if self.ok else "FAILED"
        head = (f"{self.title} ({self.mode}, h={self.eps:g}, float64, pass if max rel <= {self.rtol:g}): {status}, "
                f"max rel error {self.max_rel:.2e} ({verdict(self.max_rel)})")
        cols = ("tensor", "shape", "checked", "max abs", "max rel", "worst at", "analytic", "numeric", "verdict")
        lines = [(r.name, str(tuple(r.shape)), str(r.checked), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                  "-" if r.worst_index is None else str(r.worst_index), f"{r.analytic:+.6e}", f"{r.numeric:+.6e}",
                  r.verdict + ("" if r.passed else "  <-- FAIL")) for r in self.rows]
        widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        table = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
        return "\n".join([head] + table)

    __repr__ = __str__

    def raise_if_failed(self):
        if not self.ok:
            names = ", ".join(r.name for r in self.failed())
            raise GradcheckError(f"backward disagrees with finite differences for: {names}\n{self}")
        return self


def _variables(inputs, params, names):
    """The float64 leaf tensors to check, with names, and the arguments to call ``fn`` with."""
    args, checked = [], []
    for i, x in enumerate(inputs):
        name = names[i] if names else f"input {i}"
        data = x.data if isinstance(x, Tensor) else x
        if not isinstance(data, np.ndarray) and not devices.is_cupy_array(data):
            data = np.asarray(data)
        if data.dtype.kind == "f":
            t = Tensor(data.astype(np.float64), requires_grad=True)  # a fresh copy: perturbing it is safe
            checked.append((name, t))
        else:
            t = Tensor(data)  # integer inputs (labels, indices) are constants
        args.append(t)
    for name, p in params:
        if p.dtype != np.float64:
            raise ValueError(f"gradcheck: parameter {name!r} is {p.dtype}; checks run in float64 "
                             "(convert the module with .double())")
        checked.append((name, p))
    return args, checked


def gradcheck(fn, inputs=(), *, params=None, names=None, upstream=None, mode="full", eps=1e-6, rtol=1e-5,
              floor=1e-3, samples=8, seed=0, raise_on_fail=False):
    """Check the gradients of ``fn`` against central finite differences in float64.

    Args:
        fn: a function of Tensors returning a Tensor, or a Module (its parameters are then checked too).
        inputs: arrays or Tensors passed to ``fn``; floating ones are copied to float64 and checked, integer
            ones (labels) are passed as constants.
        params: a Module, a dict name -> Tensor, or None: further tensors ``fn`` uses, checked as well.
            A Module is converted to float64 and put in eval mode for the check, then restored.
        names: names for the inputs in the report (default 'input 0', 'input 1', ...).
        upstream: the upstream gradient U (output's shape); random normal by default.
        mode: 'full', 'sampled' or 'directional' (see the module docstring).
        eps: the finite-difference step h.
        rtol: an element passes when its relative error is at most ``rtol``.
        floor: the zero guard: gradients smaller than this are compared on an absolute scale, so an absolute
            error below rtol * floor always passes (finite differences carry a noise of about 1e-10 here).
        samples: elements per tensor in 'sampled' mode.
        seed: seeds the upstream gradient, the sampled elements and the directions.
        raise_on_fail: raise GradcheckError (with the table) instead of returning a failing report.

    Returns:
        a GradcheckReport; ``print`` it for the table, test ``report.ok``.
    """
    def body(args, checked, settings):
        return _check(fn, args, checked, upstream, **settings)
    return _run(fn, inputs, params, names, body, mode, eps, rtol, floor, samples, seed, raise_on_fail, "gradcheck")


def gradgradcheck(fn, inputs=(), *, params=None, names=None, upstream=None, mode="full", eps=1e-6, rtol=1e-5,
                  floor=1e-3, samples=8, seed=0, raise_on_fail=False):
    """Check the second derivatives of ``fn`` against central finite differences of its first derivatives.

    With a random upstream gradient U, the first derivatives are g(x, U) = d sum(fn(x) * U) / dx, computed with
    ``create_graph=True`` (every op through its ``backward_graph``). Two checks, one report:

        rows 'first: x'      g against finite differences of sum(fn(x) * U), as ``gradcheck`` does, because a
                             backward_graph that is wrong but consistently differentiated would pass the second
        rows 'second: x'     with a second random upstream V (g's shape), d sum(g * V) / dx against finite
                             differences of g, for every checked x and for U itself ('second: upstream': g is
                             linear in U, so this checks how the gradient depends on the upstream gradient)

    Arguments as ``gradcheck``; ``upstream`` is U (random by default). Returns a GradcheckReport.
    """
    from minivit.autograd import grad

    def body(args, checked, settings):
        rng = settings["rng"]
        with no_grad():
            out_shape = fn(*args).shape
        U = rng.standard_normal(out_shape) if upstream is None else np.asarray(
            upstream.data if isinstance(upstream, Tensor) else upstream, dtype=np.float64)
        xp = devices.get_array_module(args[0].data) if args else np
        U = Tensor(xp.asarray(U), requires_grad=True)
        first_rows = _check(fn, args, checked, U.data, create_graph=True, **settings)
        variables = [t for _, t in checked]

        def first_derivatives(*args_and_u):
            *fn_args, u = args_and_u
            with enable_grad():
                grads = grad(fn(*fn_args), variables, u, create_graph=True, allow_unused=True)
                return concat([(g if g is not None else Tensor(xp.zeros(t.shape))).reshape(-1)
                               for g, t in zip(grads, variables)])
        second_rows = _check(first_derivatives, list(args) + [U], checked + [("upstream", U)], None, **settings)
        for row in first_rows:
            row.name = f"first: {row.name}"
        for row in second_rows:
            row.name = f"second: {row.name}"
        return first_rows + second_rows
    return _run(fn, inputs, params, names, body, mode, eps, rtol, floor, samples, seed, raise_on_fail,
                "gradgradcheck")


def _is_module(x):
    """A minivit.nn.Module, told by what it can do (the engine does not import the layers built on it)."""
    return all(hasattr(x, name) for name in ("named_parameters", "to", "eval", "train", "zero_grad"))


def _run(fn, inputs, params, names, body, mode, eps, rtol, floor, samples, seed, raise_on_fail, title):
    """Prepare the float64 variables (and a Module's parameters), run the check ``body``, restore, report."""
    if mode not in ("full", "sampled", "directional"):
        raise ValueError(f"gradcheck: mode must be 'full', 'sampled' or 'directional', got {mode!r}")
    if params is None and _is_module(fn):
        params = fn
    module = params if _is_module(params) else None
    if module is not None:
        restore_dtype, restore_training = module.dtype, module.training
        module.to(dtype=np.float64).eval()
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    else:
        named = list((params or {}).items())
    settings = dict(mode=mode, eps=eps, rtol=rtol, floor=floor, samples=samples, rng=np.random.default_rng(seed))
    try:
        args, checked = _variables(inputs, named, names)
        rows = body(args, checked, settings)
    finally:
        if module is not None:
            module.to(dtype=restore_dtype).train(restore_training)
            module.zero_grad()
    report = GradcheckReport(rows, mode, eps, rtol, title)
    if raise_on_fail:
        report.raise_if_failed()
    return report


def _check(fn, args, checked, upstream, mode, eps, rtol, floor, samples, rng, create_graph=False):
    out = fn(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    xp = devices.get_array_module(out.data)
    if upstream is None:
        U = xp.asarray(rng.standard_normal(out.shape))
    else:
        U = xp.asarray(upstream.data if isinstance(upstream, Tensor) else upstream, dtype=np.float64)
        if U.shape != out.shape:
            raise ValueError(f"gradcheck: upstream has shape {U.shape}, the output {out.shape}")

    for _, t in checked:
        t.grad = None
    out.backward(U, create_graph=create_graph)
    analytic = {name: np.zeros(t.shape) if t.grad is None else
                devices.asnumpy(t.grad.data if isinstance(t.grad, Tensor) else t.grad) for name, t in checked}
    for _, t in checked:
        t.grad = None

    def loss():   # with the caller's grad mode: fn may itself differentiate (a gradient penalty)
        return float((fn(*args).data * U).sum())

    rows = []
    for name, t in checked:
        a = analytic[name]
        if mode == "directional":
            d = rng.standard_normal(t.shape)
            x0 = t.data.copy()
            t.data[...] = x0 + eps * xp.asarray(d)
            up = loss()
            t.data[...] = x0 - eps * xp.asarray(d)
            down = loss()
            t.data[...] = x0
            a_vals, n_vals, index = np.array([float((a * d).sum())]), np.array([(up - down) / (2 * eps)]), None
        else:
            flat = range(t.size) if mode == "full" else rng.choice(t.size, size=min(samples, t.size), replace=False)
            positions = [np.unravel_index(i, t.shape) for i in flat]
            n_vals = np.empty(len(positions))
            for j, pos in enumerate(positions):
                x0 = float(t.data[pos])
                t.data[pos] = x0 + eps
                up = loss()
                t.data[pos] = x0 - eps
                down = loss()
                t.data[pos] = x0
                n_vals[j] = (up - down) / (2 * eps)
            a_vals = np.array([a[pos] for pos in positions])
            index = positions
        err = np.abs(a_vals - n_vals)
        rel = err / np.maximum(np.abs(a_vals) + np.abs(n_vals), floor)
        w = int(np.argmax(rel)) if rel.size else 0
        worst = None if index is None else tuple(int(i) for i in index[w]) if rel.size else None
        rows.append(CheckRow(name, tuple(t.shape), len(rel), float(err.max(initial=0.0)), float(rel.max(initial=0.0)),
                             worst, float(a_vals[w]) if rel.size else 0.0, float(n_vals[w]) if rel.size else 0.0,
                             bool((rel <= rtol).all())))
    return rows
