"""Check functions for the lessons' exercises: feedback that diagnoses, never just "wrong".

Each ``check_<exercise>(fn)`` calls the learner's function on a few inputs and compares with the engine (or,
for a backward, with central finite differences in float64). It returns a ``Feedback`` that prints as a short
report: passed; not attempted (the function still returns None or raises NotImplementedError, so an unsolved
notebook runs on); or failed, with a diagnosis:

- a backward's gradient is compared as a whole with the finite-difference gradient, so that the typical mistakes
  get their names: a constant ratio ("4.00x the expected everywhere: a missing 1/B?"), a sign flip, the right
  numbers in the wrong places (a transpose), a gradient that is zero;
- properties every right answer has (softmax's input gradient sums to zero along each row, LayerNorm's dx is
  orthogonal to x_hat) are checked, and the one that fails is named;
- when the learner's code raises, the report shows the line of their code that raised and the cases that passed;
- hints come in steps: a failure prints a nudge, and ``feedback.hint(2)`` (or ``exercises.hint(name, 2)``) gives
  the formula.

With the environment variable ``MINIVIT_STRICT_CHECKS=1`` anything but a pass raises ``ExerciseError`` (the
lessons' solved runs in CI use it).
"""

import math
import os
import traceback

import numpy as np

from minivit import devices
from minivit.gradcheck import verdict
from minivit.nn import init as nn_init
from minivit.nn.gan import MinibatchStd
from minivit.tensor import Tensor

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
HINTS = {}   # exercise -> (a nudge, the formula): filled in by each check


class ExerciseError(AssertionError):
    """Raised by a check in strict mode when an exercise is not solved."""


class NotAttempted(Exception):
    pass


class Hint(str):
    """A hint that shows as plain text when it is the last value of a notebook cell."""

    def __repr__(self):
        return str(self)


def hint(exercise, level=1):
    """The hint for ``exercise``: level 1 a nudge towards the idea, level 2 the formula itself."""
    if exercise not in HINTS:
        raise ValueError(f"no exercise named {exercise!r}; exercises: {', '.join(sorted(HINTS))}")
    nudge, formula = HINTS[exercise]
    return Hint(f"hint {exercise} (1 of 2): {nudge}" if level <= 1 else f"hint {exercise} (2 of 2): {formula}")


class Feedback:
    """The outcome of one check: 'passed', 'failed' or 'not attempted', with the lines that explain it."""

    def __init__(self, exercise, status, lines=()):
        self.exercise, self.status, self.lines = exercise, status, list(lines)
        if status != "passed" and os.environ.get("MINIVIT_STRICT_CHECKS") == "1":
            raise ExerciseError(str(self))

    @property
    def passed(self):
        return self.status == "passed"

    def __bool__(self):
        return self.passed

    def hint(self, level=2):
        """The next hint: ``hint(2)`` gives the formula (the report already shows the first, gentler one)."""
        return hint(self.exercise, level)

    def __str__(self):
        mark = {"passed": "PASSED", "failed": "FAILED", "not attempted": "NOT ATTEMPTED"}[self.status]
        return "\n".join([f"[{mark}] {self.exercise}"] + [f"  {line}" for line in self.lines])

    __repr__ = __str__


def _call(fn, *args):
    """Call the learner's function; None or NotImplementedError mean 'not attempted'."""
    try:
        result = fn(*args)
    except NotImplementedError as e:
        raise NotAttempted from e
    if result is None or (isinstance(result, tuple) and all(r is None for r in result)):
        raise NotAttempted
    return result


def _array(value):
    value = value.data if isinstance(value, Tensor) else value
    return devices.asnumpy(value) if devices.is_cupy_array(value) else np.asarray(value)


def _compare(label, got, expected, rtol=1e-6, atol=1e-8):
    """None when close, else a line naming the shape mismatch or the worst element."""
    got = _array(got)
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        return f"{label}: shape {got.shape}, expected {expected.shape}"
    if not np.all(np.isfinite(got)):
        return f"{label}: holds NaN or Inf"
    err = np.abs(got - expected)
    bad = err > atol + rtol * np.abs(expected)
    if not bad.any():
        return None
    worst = np.unravel_index(np.argmax(err - rtol * np.abs(expected)), err.shape)
    return (f"{label}: {int(bad.sum())} of {bad.size} elements differ; worst at {tuple(int(i) for i in worst)}: "
            f"expected {expected[worst]:+.6g}, got {got[worst]:+.6g}")


def _where_it_raised(error):
    """'line N of your code: <source>' for the innermost frame outside minivit and NumPy, or None."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename) if not frame.filename.startswith("<") else frame.filename
        if path.startswith(_PACKAGE_DIR) or f"{os.sep}numpy{os.sep}" in path:
            continue
        source = (frame.line or "").strip()
        return f"line {frame.lineno} of your code{' (' + frame.name + ')' if frame.name != '<lambda>' else ''}: " \
               + (source or "(source not available)")
    return None


def _raised_lines(error):
    lines = [f"your function raised {type(error).__name__}: {error}"]
    where = _where_it_raised(error)
    if where:
        lines.append(where)
    return lines


def _run(exercise, hints, body):
    """Run ``body()`` (which returns (problem lines, summary)) and wrap it in Feedback.

    hints: (a nudge shown with a failure, the formula that ``hint(2)`` gives).
    """
    if isinstance(hints, str):
        raise TypeError(f"{exercise}: give the hints as (a nudge, the formula), not one string")
    HINTS[exercise] = hints
    try:
        problems, summary = body()
    except NotAttempted:
        return Feedback(exercise, "not attempted", ["fill in the function (it still returns None); the lesson "
                                                    "goes on with the engine's own version"])
    except Exception as e:  # the learner's code raised: say so, with their line
        return Feedback(exercise, "failed", _raised_lines(e) + [f"hint: {hints[0]}", _MORE_HINT.format(exercise)])
    if problems:
        return Feedback(exercise, "failed", problems + [f"hint: {hints[0]}", _MORE_HINT.format(exercise)])
    return Feedback(exercise, "passed", [summary])


_MORE_HINT = "still stuck? .hint(2) on this feedback, or exercises.hint({0!r}, 2), shows the formula"


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ gradients
def numeric_gradients(forward, arrays, dy, count, h=1e-6):
    """Central differences of L = sum(forward(*arrays) * dy) for the first ``count`` arrays (float64)."""
    arrays = [np.array(a, dtype=np.float64) if i < count else a for i, a in enumerate(arrays)]
    grads = []
    for x in arrays[:count]:
        g = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            kept = x[index]
            x[index] = kept + h
            up = float((forward(*arrays) * dy).sum())
            x[index] = kept - h
            down = float((forward(*arrays) * dy).sum())
            x[index] = kept
            g[index] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def _close(a, b, rtol=1e-5, atol=1e-7):
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * (np.abs(a) + np.abs(b))))


def _factor_name(ratio, factors):
    """'a missing 1/B?' when ratio is B (the learner forgot to divide), 'an extra 1/B?' when it is 1/B."""
    for value, name in factors:
        if math.isclose(ratio, value, rel_tol=1e-3):
            return f"a missing 1/{name}?" if value > 1 else f"an extra factor {name}?"
        if math.isclose(ratio, 1 / value, rel_tol=1e-3):
            return f"an extra 1/{name} (a mean where the formula has a sum?)" if value > 1 else \
                f"a missing factor {name}?"
    if math.isclose(ratio, round(ratio), rel_tol=1e-3):
        return f"a missing 1/{round(ratio)}?"
    if ratio and math.isclose(1 / ratio, round(1 / ratio), rel_tol=1e-3):
        return f"an extra 1/{round(1 / ratio)}?"
    return "a constant factor is missing or extra"


def diagnose(name, got, expected, factors=()):
    """Name the typical mistake that turns ``expected`` into ``got``, or None when none fits.

    factors: (value, name) pairs of constants in the forward (the batch size B, sqrt(d), ...), so that a ratio
    can be traced to the constant that was forgotten.
    """
    scale = np.abs(expected).max() + 1e-12
    if not np.all(np.isfinite(got)):
        return f"d{name} holds NaN or Inf"
    if got.shape != expected.shape:
        if got.ndim >= 2 and expected.ndim >= 2 and got.shape == expected.swapaxes(-1, -2).shape:
            same = _close(got.swapaxes(-1, -2), expected)
            return (f"d{name} has shape {got.shape}, expected {expected.shape}"
                    + (": it is the expected gradient transposed" if same else ": a transpose too many or missing"))
        return None
    if np.abs(got).max() <= 1e-12 * scale:
        return f"d{name} is zero everywhere, but the gradient is not"
    if _close(got, -expected):
        return f"d{name} has the right size everywhere but the opposite sign: a sign flip"
    ratio = float((got * expected).sum() / max((expected * expected).sum(), 1e-300))
    if not math.isclose(ratio, 1.0, rel_tol=1e-4) and _close(got, ratio * expected, rtol=1e-4):
        return (f"your gradient d{name} is {ratio:.2f}x the expected everywhere: {_factor_name(ratio, factors)}")
    if got.ndim >= 2 and got.shape[-1] == got.shape[-2] and _close(got.swapaxes(-1, -2), expected):
        return f"d{name} holds the right numbers in the wrong places: it is the expected gradient transposed"
    if got.size > 1 and _close(np.sort(got.ravel()), np.sort(expected.ravel())):
        return (f"d{name} holds the right numbers in the wrong places (a transpose, or axes in the wrong order "
                f"before a reshape?)")
    return None


def _worst_line(label, got, expected):
    rel = np.abs(got - expected) / np.maximum(np.abs(got) + np.abs(expected), 1e-12)
    worst = np.unravel_index(np.argmax(rel), rel.shape)
    wrong = int((np.abs(got - expected) > 1e-7 + 1e-5 * (np.abs(got) + np.abs(expected))).sum())
    return (f"{label}: {wrong} of {got.size} elements wrong; worst at {tuple(int(i) for i in worst)}: your gradient "
            f"{got[worst]:+.6g}, finite differences {expected[worst]:+.6g} (relative error {rel[worst]:.1e}, "
            f"{verdict(float(rel[worst]))})")


def _gradient_gate(forward, learner_backward, cases, names, factors=None, invariants=(), mistakes=()):
    """Compare the learner's backward with finite differences on each case and diagnose what differs.

    forward(*arrays) -> y; learner_backward(arrays, y, dy) -> one gradient per checked input (in ``names``).
    factors(arrays) -> (value, name) pairs of the forward's constants, to name a ratio.
    invariants: (input name, description, fn(gradient, arrays, y) -> how far it is violated, 0 when it holds).
    mistakes: (input name, description, fn(arrays, y, dy) -> the gradient that mistake gives) for the mistakes
    that no general test names (a missing term of a sum).
    Returns (problems, max relative error).
    """
    problems, worst, passed_cases = [], 0.0, []
    for c, arrays in enumerate(cases):
        arrays = [np.array(a) for a in arrays]
        y = forward(*arrays)
        dy = np.random.default_rng(100 + c).standard_normal(np.shape(y))
        expected = numeric_gradients(forward, arrays, dy, len(names))
        try:
            grads = _call(learner_backward, [a.copy() for a in arrays], y, dy)
        except NotAttempted:
            raise
        except Exception as e:
            problems += [f"case {c + 1}: " + line for line in _raised_lines(e)]
            if passed_cases:
                problems.append("cases passed before it: " + ", ".join(str(k) for k in passed_cases))
            return problems, worst
        grads = grads if isinstance(grads, tuple) else (grads,)
        if len(grads) != len(names):
            return problems + [f"return {len(names)} gradients ({', '.join('d' + n for n in names)}), got "
                               f"{len(grads)}"], worst
        grads = tuple(_array(g).astype(np.float64) if g is not None else None for g in grads)
        right, wrong = [], []
        for name, g, e in zip(names, grads, expected):
            label = f"case {c + 1}, d{name} {e.shape}"
            if g is None:
                wrong.append(f"{label}: returned None")
                continue
            if _close(g, e):
                right.append("d" + name)
                worst = max(worst, float((np.abs(g - e) / np.maximum(np.abs(g) + np.abs(e), 1e-12)).max()))
                continue
            lines = []
            named = diagnose(name, g, e, factors(arrays) if factors else ())
            if named:
                lines.append(f"{label}: {named}")
            if g.shape != e.shape:
                others = [n for n, other in zip(names, expected) if n != name and _close(g, other)]
                if others and not named:
                    named = (f"what you return as d{name} is d{others[0]}: return the gradients in the order "
                             f"{', '.join('d' + n for n in names)}")
                    lines.append(f"{label}: {named}")
                if not named:
                    lines.append(f"{label}: the gradient for {name} has shape {g.shape}, expected {e.shape} "
                                 f"(the shape of {name})")
                wrong += lines
                continue
            for mistake_name, description, mistake in mistakes:
                if mistake_name == name and not named and _close(g, _array(mistake(arrays, y, dy))):
                    lines.append(f"{label}: {description}")
                    named = description
            for inv_name, description, violation in invariants:
                if inv_name == name:
                    amount = float(violation(g, arrays, y))
                    if amount > 1e-4 * (np.abs(g).max() + 1e-12) + 1e-9:   # eps bends LayerNorm's by ~1e-6
                        lines.append(f"{label}: {description} fails for yours (off by up to {amount:.3g}): a term "
                                     f"is missing or wrong")
            lines.append(_worst_line(label, g, e))
            wrong += lines
        if wrong:
            if right:
                wrong.append(f"case {c + 1}: {', '.join(right)} right")
            if passed_cases:
                wrong.append("cases passed: " + ", ".join(str(k) for k in passed_cases))
            return problems + wrong, worst
        passed_cases.append(c + 1)
    return problems, worst


def _gate(exercise, hints, forward, backward, cases, names, **diagnostics):
    HINTS[exercise] = hints

    def body():
        problems, worst = _gradient_gate(forward, backward, cases, names, **diagnostics)
        return problems, (f"matches finite differences on {len(cases)} cases (largest relative error "
                          f"{worst:.1e})")
    return _run(exercise, hints, body)


def _rows_sum(axis=-1):
    """The violation of 'sums to zero along ``axis``': the largest absolute sum."""
    return lambda g, arrays, y: np.abs(g.sum(axis)).max()


# ------------------------------------------------------------------------------------------------ lesson 0
def check_accuracy(fn):
    """fn(logits (B, K), labels (B,)) -> the fraction of rows whose largest logit is at the label."""
    def body():
        rng = _rng()
        problems = []
        for c in range(3):
            logits, labels = rng.standard_normal((20, 5)), rng.integers(0, 5, 20)
            expected = float((logits.argmax(1) == labels).mean())
            got = _call(fn, logits, labels)
            if not np.isclose(float(got), expected):
                problems.append(f"case {c + 1}: expected {expected:.3f}, got {float(got):.3f}")
        return problems, "right on 3 random batches"
    return _run("accuracy", ("the prediction of a row is the class with the largest logit",
                             "compare logits.argmax(axis=1) with the labels and take the mean"), body)


# ------------------------------------------------------------------------------------------------ lesson 1
def check_central_difference(fn):
    """fn(f, x, h) -> (f(x + h) - f(x - h)) / (2h), the central difference."""
    def body():
        cube = _call(fn, lambda x: x ** 3, 1.0, 1e-3)
        problems = []
        if abs(cube - 3.0) > 1e-5:
            if abs(cube - 3.003001) < 1e-5:
                problems.append("on x^3 at x=1 with h=1e-3 you get 3.003001: that is the forward difference "
                                "(f(x+h) - f(x)) / h, whose error shrinks only like h")
            else:
                problems.append(f"on x^3 at x=1 with h=1e-3: expected 3.000001, got {cube!r}")
        for x in (0.3, 2.0):
            got = _call(fn, math.sin, x, 1e-5)
            if abs(got - math.cos(x)) > 1e-8:
                problems.append(f"d/dx sin at x={x}: expected {math.cos(x):.10f}, got {got!r}")
        return problems, "central, with O(h^2) error"
    return _run("central_difference", ("step to both sides of x, not only forward",
                                       "(f(x + h) - f(x - h)) / (2 h)"), body)


# ------------------------------------------------------------------------------------------------ lesson 2
def check_topological_order(fn):
    """fn(root Tensor) -> list of the tensors behind root, root first, each before all of its inputs."""
    def body():
        x = Tensor(np.ones(2), requires_grad=True)
        w = Tensor(np.ones(2), requires_grad=True)
        a = x * w
        b = a + x
        root = (a * b).sum()
        order = _call(fn, root)
        ids = [id(t) for t in order]
        expected = {id(t) for t in (x, w, a, b, root)} | {id(t) for t in _all_nodes(root)}
        problems = []
        if set(ids) != expected or len(ids) != len(expected):
            problems.append(f"expected each of the {len(expected)} tensors exactly once, got {len(ids)} entries")
        elif not _users_first(ids, root):
            if _users_first(ids[::-1], root):
                problems.append("your order is reversed: it starts at the inputs, but backward must start at the "
                                "root (reverse the list you built)")
            else:
                problems.append("an input comes before a tensor computed from it: a tensor may pass on its gradient "
                                "only after every tensor that uses it has")
            if id(order[0]) != id(root):
                problems.append(f"the first entry should be the root; yours is a tensor of shape "
                                f"{tuple(order[0].shape)}")
        return problems, "every tensor once, each before its inputs"
    return _run("topological_order", ("a tensor may be processed only when everything computed from it has been",
                                      "a depth-first search from the root that appends a node after all its inputs "
                                      "(postorder), then reversed so that the root comes first"), body)


def _users_first(ids, root):
    """Whether each tensor comes before all of its inputs in the list of ids."""
    position = {i: k for k, i in enumerate(ids)}
    return all(position[id(parent)] > position[id(node)] for node in _all_nodes(root)
               for parent in (node._ctx.parents if node._ctx else ()) if parent.requires_grad)


def _all_nodes(root):
    seen, stack, out = set(), [root], []
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append(t)
        if t._ctx is not None:
            stack.extend(p for p in t._ctx.parents if p.requires_grad)
    return out


def check_sigmoid_backward(fn):
    """fn(y, dy) -> dx for y = 1 / (1 + exp(-x))."""
    rng = _rng(2)
    cases = [[rng.standard_normal((3, 4)) * 2], [rng.standard_normal(7)]]
    return _gate("sigmoid_backward", ("differentiate 1 / (1 + e^-x) and write the result with y alone; then the "
                                      "chain rule: multiply by the upstream gradient",
                                      "dx = dy * y * (1 - y)"),
                 lambda x: 1.0 / (1.0 + np.exp(-x)), lambda xs, y, dy: fn(y, dy), cases, ("x",))


# ------------------------------------------------------------------------------------------------ lesson 3
def check_relative_error(fn):
    """fn(a, n) -> |a - n| / max(|a| + |n|, 1e-12) elementwise (the symmetric relative error with a zero guard)."""
    def body():
        a = np.array([1.0, -2.0, 0.0, 1e-3, 5.0])
        n = np.array([1.1, -2.0, 0.0, -1e-3, 4.0])
        expected = np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), 1e-12)
        got = _call(fn, a, n)
        line = _compare("relative error", got, expected, rtol=1e-9)
        problems = [line] if line else []
        if line and np.isnan(_array(got)).any():
            problems.append("0/0 gave NaN: guard the denominator with max(..., 1e-12)")
        return problems, "symmetric and safe at zero"
    return _run("relative_error", ("symmetric in a and n, and never 0/0",
                                   "|a - n| / max(|a| + |n|, 1e-12)"), body)


# ------------------------------------------------------------------------------------------------ lesson 4
def check_linear_backward(fn):
    """fn(x (B, in), w (out, in), dy (B, out)) -> (dx, dw, db) for y = x w^T + b."""
    rng = _rng(4)
    cases = [[rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)],
             [rng.standard_normal((2, 6)), rng.standard_normal((2, 6)), rng.standard_normal(2)]]
    return _gate("linear_backward", ("each gradient has the shape of its input: let the shapes choose the product "
                                     "and the transpose; b was added to every row",
                                     "dx = dy w, dw = dy^T x, db = dy summed over the batch"),
                 lambda x, w, b: x @ w.T + b, lambda xs, y, dy: fn(xs[0], xs[1], dy), cases, ("x", "w", "b"),
                 factors=lambda arrays: [(len(arrays[0]), "B")])


def check_layer_scale_backward(fn):
    """fn(x (B, N, D), gamma (D,), dy (B, N, D)) -> (dx, dgamma) for y = x * gamma (one scale per channel)."""
    rng = _rng(41)
    cases = [[rng.standard_normal((2, 3, 4)), rng.standard_normal(4)],
             [rng.standard_normal((3, 5, 2)), rng.standard_normal(2)]]
    return _gate("layer_scale_backward", ("gamma was copied to every token of every image: which axes did the "
                                          "broadcast add, and what happens to a copied value's gradient?",
                                          "dx = dy * gamma; dgamma = (dy * x) summed over the batch and token "
                                          "axes"),
                 lambda x, gamma: x * gamma, lambda xs, y, dy: fn(xs[0], xs[1], dy), cases, ("x", "gamma"),
                 factors=lambda arrays: [(arrays[0].shape[0] * arrays[0].shape[1], "(B N)"),
                                         (arrays[0].shape[0], "B"), (arrays[0].shape[1], "N")])


# ------------------------------------------------------------------------------------------------ lesson 5
def check_softmax_backward(fn):
    """fn(y, dy) -> dx for y = softmax(x) along the last axis."""
    rng = _rng(5)
    cases = [[rng.standard_normal((3, 5))], [rng.standard_normal((2, 2, 4)) * 3]]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return _gate("softmax_backward", ("every y_i depends on every x_j: the Jacobian is diag(y) - y y^T, not only "
                                      "its diagonal",
                                      "dx = y * (dy - sum(dy * y, last axis, keepdims=True))"), softmax,
                 lambda xs, y, dy: fn(y, dy), cases, ("x",),
                 invariants=[("x", "softmax's input gradient sums to zero along each row (adding a constant to a "
                              "row of x leaves y unchanged)", _rows_sum())])


def check_cross_entropy_backward(fn):
    """fn(logits (B, K), labels (B,)) -> dlogits of the mean cross-entropy: (softmax(logits) - onehot) / B."""
    rng = _rng(6)
    cases = [[rng.standard_normal((4, 3)), rng.integers(0, 3, 4)], [rng.standard_normal((6, 5)), rng.integers(0, 5, 6)]]

    def loss(x, t):
        shifted = x - x.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        return -logp[np.arange(len(t)), t].mean()
    return _gate("cross_entropy_backward", ("the loss is a mean over the batch; for one row, -log softmax(x)[t] "
                                            "has a gradient that is the probabilities minus a one-hot vector",
                                            "softmax(logits), subtract 1 at each label, divide by the batch size"),
                 loss, lambda xs, y, dy: _array(_call(fn, xs[0], xs[1])) * dy, cases, ("logits",),
                 factors=lambda arrays: [(len(arrays[0]), "B")],
                 invariants=[("logits", "each row of the gradient sums to zero (probabilities sum to 1, the one-hot "
                              "row too)", _rows_sum())])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def check_log_softmax_backward(fn):
    """fn(logp, dy) -> dx for logp = log_softmax(x) along the last axis."""
    rng = _rng(42)
    cases = [[rng.standard_normal((3, 5))], [rng.standard_normal((2, 2, 4)) * 3]]
    return _gate("log_softmax_backward", ("log p_k = x_k - log sum_j exp(x_j): two terms; the gradient of the "
                                          "second one is a distribution you met in this lesson",
                                          "dx = dy - exp(logp) * sum(dy, last axis, keepdims=True)"),
                 lambda x: np.log(_softmax(x)), lambda xs, y, dy: fn(y, dy), cases, ("x",),
                 invariants=[("x", "log-softmax's input gradient sums to zero along each row (adding a constant to "
                              "a row of x leaves log p unchanged)", _rows_sum())],
                 mistakes=[("x", "dx is softmax's backward applied to dy: but here the output is log p, whose "
                            "derivative differs", lambda a, y, dy: _softmax(a[0]) * (dy - (dy * _softmax(a[0])).sum(
                                -1, keepdims=True)))])


def check_smoothed_cross_entropy_backward(fn):
    """fn(logits (B, K), labels (B,), smoothing) -> dlogits of the mean cross-entropy against the smoothed target
    q = (1 - smoothing) onehot + smoothing / K."""
    rng = _rng(43)
    cases = [[rng.standard_normal((4, 3)), rng.integers(0, 3, 4)], [rng.standard_normal((6, 5)), rng.integers(0, 5, 6)]]

    def loss(x, t):
        K = x.shape[1]
        q = (1 - 0.1) * np.eye(K)[t] + 0.1 / K
        return -(q * np.log(_softmax(x))).sum(1).mean()
    return _gate("smoothed_cross_entropy_backward",
                 ("the target is now a distribution q, not a one-hot row: for one row, -sum_k q_k log p_k; use that "
                  "q sums to 1",
                  "(softmax(logits) - q) / B with q = (1 - smoothing) onehot + smoothing / K"),
                 loss, lambda xs, y, dy: _array(_call(fn, xs[0], xs[1], 0.1)) * dy, cases, ("logits",),
                 factors=lambda arrays: [(len(arrays[0]), "B")],
                 invariants=[("logits", "each row of the gradient sums to zero (p and q both sum to 1)", _rows_sum())],
                 mistakes=[("logits", "this is the gradient without smoothing: the target q gives the label "
                            "1 - smoothing + smoothing / K and every other class smoothing / K",
                            lambda a, y, dy: (_softmax(a[0]) - np.eye(a[0].shape[1])[a[1]]) / len(a[1]) * dy)])


# ------------------------------------------------------------------------------------------------ lesson 6
def check_layer_norm_backward(fn):
    """fn(x (..., D), w (D,), dy, eps) -> (dx, dw, db) for y = (x - mean) / sqrt(var + eps) * w + b."""
    rng = _rng(7)
    cases = [[rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal(6)],
             [rng.standard_normal((2, 3, 5)) * 2 + 1, rng.standard_normal(5), rng.standard_normal(5)]]

    def forward(x, w, b):
        xc = x - x.mean(-1, keepdims=True)
        return xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + 1e-6) * w + b
    def along_xhat(g, arrays, y):               # LayerNorm ignores a shift of a row and a rescale of it
        x = arrays[0]
        xc = x - x.mean(-1, keepdims=True)
        return np.abs((g * xc).sum(-1) / np.sqrt((xc ** 2).sum(-1))).max()
    return _gate("layer_norm_backward",
                 ("the mean and the variance depend on every x of the row: besides the direct path through "
                  "(x - mean), x reaches the output through the mean and through the variance",
                  "with g = dy * w and xhat the normalised x: dx = (g - mean(g) - xhat * mean(g * xhat)) / "
                  "sqrt(var + eps); dw = sum(dy * xhat), db = sum(dy) over all but the last axis"),
                 forward, lambda xs, y, dy: fn(xs[0], xs[1], dy, 1e-6), cases, ("x", "w", "b"),
                 factors=lambda arrays: [(int(np.prod(arrays[0].shape[:-1])), "(number of rows)"),
                                         (arrays[0].shape[-1], "D")],
                 invariants=[("x", "LayerNorm's dx sums to zero along each row (shifting a row does not change "
                              "y)", _rows_sum()),
                             ("x", "LayerNorm's dx is orthogonal to x_hat along each row (scaling a row does not "
                              "change y)", along_xhat)],
                 mistakes=[("x", "dx is what it would be if w were all ones: the gradient that reaches x_hat is "
                            "dy * w", lambda a, y, dy: _layer_norm_dx(a[0], np.ones_like(a[1]), dy))])


def _layer_norm_dx(x, w, dy, eps=1e-6):
    xc = x - x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((xc ** 2).mean(-1, keepdims=True) + eps)
    xhat, g = xc * rstd, dy * w
    return rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


def check_rms_norm_backward(fn):
    """fn(x (..., D), w (D,), dy, eps) -> (dx, dw) for y = x / sqrt(mean(x^2) + eps) * w (RMSNorm: no mean, no
    bias)."""
    rng = _rng(44)
    cases = [[rng.standard_normal((4, 6)), rng.standard_normal(6)],
             [rng.standard_normal((2, 3, 5)) * 2 + 1, rng.standard_normal(5)]]

    def forward(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w

    def along_x(g, arrays, y):                  # RMSNorm ignores a rescale of a row
        x = arrays[0]
        return np.abs((g * x).sum(-1) / np.sqrt((x ** 2).sum(-1))).max()

    def dx_unit_w(a, y, dy):
        x = a[0]
        r = 1 / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
        return r * (dy - x * r * (dy * x * r).mean(-1, keepdims=True))
    return _gate("rms_norm_backward",
                 ("as in LayerNorm, x reaches the output directly and through the statistic of its row; here the "
                  "only statistic is the mean square, so one of LayerNorm's three paths is gone",
                  "with g = dy * w, r = 1/sqrt(mean(x^2) + eps) and xhat = x r: dx = r (g - xhat mean(g xhat)); "
                  "dw = sum(dy * xhat) over all but the last axis"),
                 forward, lambda xs, y, dy: fn(xs[0], xs[1], dy, 1e-6), cases, ("x", "w"),
                 factors=lambda arrays: [(int(np.prod(arrays[0].shape[:-1])), "(number of rows)"),
                                         (arrays[0].shape[-1], "D")],
                 invariants=[("x", "RMSNorm's dx is orthogonal to x along each row (scaling a row does not change "
                              "y)", along_x)],
                 mistakes=[("x", "dx is what it would be if w were all ones: the gradient that reaches x_hat is "
                            "dy * w", dx_unit_w)])


# ------------------------------------------------------------------------------------------------ lesson 7
def check_gelu_backward(fn):
    """fn(x, dy) -> dx for y = x * Phi(x) (exact GELU)."""
    from scipy.special import erf
    rng = _rng(8)
    cases = [[rng.standard_normal((4, 5)) * 2], [np.linspace(-4, 4, 17)]]
    def phi(x):
        return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return _gate("gelu_backward", ("x Phi(x) is a product: the product rule gives two terms; Phi's derivative is "
                                   "the normal density",
                                   "d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)"),
                 lambda x: x * 0.5 * (1 + erf(x / math.sqrt(2))), lambda xs, y, dy: fn(xs[0], dy), cases, ("x",),
                 mistakes=[("x", "dx is Phi(x) dy: the product rule's second term, x phi(x), is missing",
                            lambda a, y, dy: dy * 0.5 * (1 + erf(a[0] / math.sqrt(2)))),
                           ("x", "the second term x phi(x) is there but phi lacks its 1/sqrt(2 pi)",
                            lambda a, y, dy: dy * (0.5 * (1 + erf(a[0] / math.sqrt(2)))
                                                   + a[0] * np.exp(-a[0] ** 2 / 2)))])


def check_gelu_tanh_backward(fn):
    """fn(x, dy) -> dx for the tanh approximation y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    rng = _rng(45)
    c = math.sqrt(2 / math.pi)
    cases = [[rng.standard_normal((4, 5)) * 2], [np.linspace(-4, 4, 17)]]

    def forward(x):
        return 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3)))

    def no_inner(a, y, dy):
        x = a[0]
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c)

    def no_product_rule(a, y, dy):
        return dy * 0.5 * (1 + np.tanh(c * (a[0] + 0.044715 * a[0] ** 3)))
    return _gate("gelu_tanh_backward", ("a product again, with a chain inside: x times 0.5 (1 + tanh(u(x))); "
                                        "tanh' = 1 - tanh^2, and u is a polynomial in x",
                                        "with u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u): dx = dy (0.5 (1 + "
                                        "t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))"),
                 forward, lambda xs, y, dy: fn(xs[0], dy), cases, ("x",),
                 mistakes=[("x", "the inner derivative du/dx misses its polynomial part: d/dx (x + 0.044715 x^3) "
                            "is 1 + 3 * 0.044715 x^2", no_inner),
                           ("x", "dx is 0.5 (1 + tanh(u)) dy: the product rule's second term, the one with "
                            "tanh's derivative, is missing", no_product_rule)])


# ------------------------------------------------------------------------------------------------ lesson 8
def _reference_patchify(images, P):
    B, C, H, W = images.shape
    return (images.reshape(B, C, H // P, P, W // P, P).transpose(0, 2, 4, 1, 3, 5)
            .reshape(B, (H // P) * (W // P), C * P * P))


def check_patchify(fn):
    """fn(images (B, C, H, W), P) -> (B, H/P * W/P, C*P*P), patches row by row, each flattened as (C, P, P)."""
    def body():
        rng = _rng(9)
        problems = []
        for c, (shape, P) in enumerate((((2, 1, 4, 4), 2), ((1, 3, 6, 4), 2), ((2, 2, 8, 8), 4))):
            images = rng.standard_normal(shape)
            line = _compare(f"case {c + 1} (images {shape}, P={P})", _call(fn, images, P),
                            _reference_patchify(images, P), rtol=0, atol=0)
            if line:
                problems.append(line)
        return problems, "same patches in the same order as the engine"
    return _run("patchify", ("split H and W each into (grid, P) with a reshape, then bring the two grid axes "
                             "before the channel axis",
                             "reshape to (B, C, H/P, P, W/P, P), move the grid axes forward: transpose(0, 2, 4, 1, "
                             "3, 5), then flatten each patch"), body)


def check_patchify_backward(fn):
    """fn(dy (B, Np, C*P*P), image_shape (B, C, H, W), P) -> dimages: the gradients put back at their pixels."""
    rng = _rng(10)
    cases = [[rng.standard_normal((2, 1, 4, 4))], [rng.standard_normal((1, 3, 4, 6))]]
    return _gate("patchify_backward", ("patchify only moves values, so its backward moves them back: undo each "
                                       "step of the forward, last step first",
                                       "dy.reshape(B, H/P, W/P, C, P, P).transpose(0, 3, 1, 4, 2, 5).reshape(B, C, "
                                       "H, W)"),
                 lambda x: _reference_patchify(x, 2), lambda xs, y, dy: fn(dy, xs[0].shape, 2), cases, ("images",))


# ------------------------------------------------------------------------------------------------ lesson 9
def check_attention_backward(fn):
    """fn(q, k, v, dy) -> (dq, dk, dv) for y = softmax(q k^T / sqrt(d)) v."""
    rng = _rng(11)
    cases = [[rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))],
             [rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))]]

    def forward(q, k, v):
        s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True) @ v
    return _gate("attention_backward", ("walk the forward backwards: y = p v (a matrix product), p = softmax(s) "
                                        "row by row (lesson 5), s = q k^T / sqrt(d) (another product and a "
                                        "constant)",
                                        "recompute p; dv = p^T dy; dp = dy v^T; ds = p * (dp - rowsum(dp * p)); "
                                        "dq = ds k / sqrt(d); dk = ds^T q / sqrt(d)"),
                 forward, lambda xs, y, dy: fn(*xs, dy), cases, ("q", "k", "v"),
                 factors=lambda arrays: [(math.sqrt(arrays[0].shape[-1]), "sqrt(d)")],
                 mistakes=[("q", "ds is p * dp: softmax's backward lacks its second term, the subtraction of "
                            "rowsum(dp * p) (every probability of a row depends on every score of the row)",
                            lambda a, y, dy: _attention_grads(*a, dy, rowsum=False)[0])],
                 invariants=[("k", "dk sums to zero over the keys (moving every key by the same vector shifts each "
                              "row of scores by a constant, which softmax ignores)", _rows_sum(axis=-2))])


def _attention_grads(q, k, v, dy, causal=False, rowsum=True):
    """Reference (dq, dk, dv) of softmax(q k^T / sqrt(d) [+ causal mask]) v, optionally without softmax's rowsum."""
    scale = 1 / math.sqrt(q.shape[-1])
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = dy @ v.swapaxes(-1, -2)
    ds = (p * (dp - (dp * p).sum(-1, keepdims=True)) if rowsum else p * dp) * scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dy


def check_causal_attention_backward(fn):
    """fn(q, k, v, dy) -> (dq, dk, dv) for y = softmax(mask(q k^T / sqrt(d))) v, where query i sees keys 0..i."""
    rng = _rng(46)
    cases = [[rng.standard_normal((4, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))],
             [rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))]]

    def forward(q, k, v):
        s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True) @ v
    return _gate("causal_attention_backward",
                 ("a masked score is -inf, so its probability is exactly 0: what gradient can flow through it? Then "
                  "the steps of the unmasked backward apply unchanged",
                  "recompute p with the mask (scores above the diagonal set to -inf before the softmax); then dv = "
                  "p^T dy; dp = dy v^T; ds = p * (dp - rowsum(dp * p)); dq = ds k / sqrt(d); dk = ds^T q / sqrt(d)"),
                 forward, lambda xs, y, dy: fn(*xs, dy), cases, ("q", "k", "v"),
                 factors=lambda arrays: [(math.sqrt(arrays[0].shape[-1]), "sqrt(d)")],
                 mistakes=[(name, f"d{name} is the gradient of attention without the mask: the probabilities you "
                            f"differentiate must be the masked ones (zero above the diagonal)",
                            lambda a, y, dy, i=i: _attention_grads(*a, dy)[i]) for i, name in enumerate("qkv")]
                 + [("q", "ds is p * dp: softmax's backward lacks its second term, the subtraction of "
                     "rowsum(dp * p)", lambda a, y, dy: _attention_grads(*a, dy, causal=True, rowsum=False)[0])],
                 invariants=[("k", "dk sums to zero over the keys (moving every key by the same vector shifts each "
                              "allowed score of a row by the same amount, which softmax ignores)",
                              _rows_sum(axis=-2))])


# ------------------------------------------------------------------------------------------------ lesson 10
def check_split_heads(fn):
    """fn(qkv (B, N, 3D), num_heads) -> (q, k, v), each (B, nh, N, hd), in timm's layout."""
    def body():
        rng = _rng(12)
        B, N, nh, hd = 2, 5, 3, 4
        qkv = rng.standard_normal((B, N, 3 * nh * hd))
        got = _call(fn, qkv, nh)
        if not isinstance(got, tuple) or len(got) != 3:
            return ["return a tuple (q, k, v)"], ""
        expected = qkv.reshape(B, N, 3, nh, hd).transpose(2, 0, 3, 1, 4)
        problems = [line for line in (_compare(name, g, e, rtol=0, atol=0) for name, g, e in zip("qkv", got, expected))
                    if line]
        return problems, "q, k and v split into heads as timm does"
    return _run("split_heads", ("the last axis holds [q | k | v], each of them [head 0 | head 1 | ...]: split it "
                                "in that order, then move the axes",
                                "reshape to (B, N, 3, nh, hd), then transpose(2, 0, 3, 1, 4)"), body)


def check_split_heads_backward(fn):
    """fn(dq, dk, dv) -> dqkv (B, N, 3D): the gradients of the heads put back in qkv's layout."""
    rng = _rng(15)
    nh = 3
    cases = [[rng.standard_normal((2, 5, 3 * nh * 4))], [rng.standard_normal((1, 3, 3 * nh * 2))]]

    def forward(qkv):                                        # (3, B, nh, N, hd): q, k and v stacked
        B, N, three_d = qkv.shape
        return qkv.reshape(B, N, 3, nh, three_d // (3 * nh)).transpose(2, 0, 3, 1, 4)
    return _gate("split_heads_backward", ("the forward only moves values: undo its transpose with the inverse "
                                          "permutation, then its reshape",
                                          "stack (dq, dk, dv), transpose(1, 3, 0, 2, 4) to (B, N, 3, nh, hd), "
                                          "reshape to (B, N, 3D)"),
                 forward, lambda xs, y, dy: fn(dy[0], dy[1], dy[2]), cases, ("qkv",))


# ------------------------------------------------------------------------------------------------ lesson 11
def check_sincos_2d(fn):
    """fn(embed_dim, (rows, cols)) -> (rows*cols, embed_dim) fixed 2-D sine-cosine position embedding."""
    def body():
        problems = []
        for c, (D, grid) in enumerate(((8, (2, 3)), (16, (4, 4)))):
            line = _compare(f"case {c + 1} (D={D}, grid={grid})", _call(fn, D, grid), nn_init.sincos_2d(D, grid),
                            rtol=1e-9, atol=1e-12)
            if line:
                problems.append(line)
        return problems, "the same table as the library"
    return _run("sincos_2d", ("D/4 frequencies; the row gets half of the channels, the column the other half",
                              "w_i = 10000^(-i/(D/4)); concatenate sin(row w), cos(row w), sin(col w), cos(col w)"),
                body)


def check_tokens_backward(fn):
    """fn(dy (B, N, D)) -> (dcls (1, 1, D), dpatches (B, N-1, D), dpos (1, N, D)) for
    y = concat([cls copied to every image, patches], axis=1) + pos."""
    rng = _rng(16)
    cases = [[rng.standard_normal((1, 1, 4)), rng.standard_normal((3, 5, 4)), rng.standard_normal((1, 6, 4))],
             [rng.standard_normal((1, 1, 2)), rng.standard_normal((2, 3, 2)), rng.standard_normal((1, 4, 2))]]

    def forward(cls, patches, pos):
        copies = np.broadcast_to(cls, (patches.shape[0], 1, cls.shape[-1]))
        return np.concatenate([copies, patches], axis=1) + pos
    return _gate("tokens_backward", ("a value copied to many places receives the sum of their gradients",
                                     "the class token and the position embedding were copied to every image: sum "
                                     "their gradients over the batch (keepdims); the patches get the rest of dy"),
                 forward, lambda xs, y, dy: fn(dy), cases, ("cls", "patches", "pos"),
                 factors=lambda arrays: [(len(arrays[1]), "B")],
                 mistakes=[("cls", "dcls is the gradient of the first image only: the class token is copied to all "
                            "B images, and each copy sends a gradient back", lambda a, y, dy: dy[:1, :1]),
                           ("pos", "dpos is the gradient of the first image only: the position table is added to all "
                            "B images, and each sends a gradient back", lambda a, y, dy: dy[:1])])


# ------------------------------------------------------------------------------------------------ lesson 12
def check_adamw_update(fn):
    """fn(p, g, m, v, t, lr, betas, eps, weight_decay) -> (p, m, v) after one AdamW step (t counts from 1)."""
    def body():
        from minivit import optim
        from minivit.nn import Parameter
        rng = _rng(13)
        p0 = rng.standard_normal(6)
        param = Parameter(p0.copy())
        opt = optim.AdamW([param], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        m, v, p = np.zeros(6), np.zeros(6), p0.copy()
        problems = []
        for t in range(1, 4):
            g = rng.standard_normal(6)
            param.grad = g.copy()
            opt.step()
            p, m, v = (_array(a) for a in _call(fn, p.copy(), g, m.copy(), v.copy(), t, 0.01, (0.9, 0.99), 1e-8, 0.1))
            state = opt.state[0]
            for name, got, expected in (("m", m, state["exp_avg"]), ("v", v, state["exp_avg_sq"]),
                                        ("p", p, param.data)):
                line = _compare(f"step {t}, {name}", got, expected, rtol=1e-9, atol=1e-12)
                if line:
                    problems.append(line)
            if problems:
                break
        return problems, "three steps equal to minivit.optim.AdamW"
    return _run("adamw_update", ("the decay is decoupled from the gradient, and m and v start at zero, so early "
                                 "steps need a correction",
                                 "decay p by (1 - lr wd) first; bias-correct m and v with 1 - beta^t"), body)


# ------------------------------------------------------------------------------------------------ lesson 13
def check_attention_rollout(fn):
    """fn(list of (B, nh, N, N) probabilities) -> (B, N, N) rollout with the residual identity mixed in."""
    def body():
        from minivit.trace import attention_rollout
        rng = _rng(14)
        layers = []
        for _ in range(3):
            a = rng.random((2, 2, 4, 4))
            layers.append(a / a.sum(-1, keepdims=True))
        line = _compare("rollout", _call(fn, layers), attention_rollout(layers), rtol=1e-9)
        return ([line] if line else []), "equal to minivit.trace.attention_rollout"
    return _run("attention_rollout", ("the residual path is attention to oneself; the first layer acts first",
                                      "average the heads, A' = (A + I) / 2 renormalised, multiply the layers with "
                                      "the first one rightmost"), body)


# ------------------------------------------------------------------------------------------------ lesson 14
def check_get_array_module(fn):
    """fn(array) -> the module (numpy or cupy) that owns the array."""
    def body():
        problems = []
        if _call(fn, np.zeros(2)) is not np:
            problems.append("a NumPy array should give the numpy module")
        if devices.cuda_available():
            import cupy
            if _call(fn, cupy.zeros(2)) is not cupy:
                problems.append("a CuPy array should give the cupy module")
        return problems, "numpy for NumPy arrays" + (", cupy for CuPy arrays" if devices.cuda_available() else "")
    return _run("get_array_module", ("an array knows which library made it",
                                      "look at type(x).__module__, or use cupy.get_array_module"), body)


# ------------------------------------------------------------------------------------------------ lesson 16
# A pre-norm ViT block, one line per intermediate, in the order of the forward:
BLOCK_STEPS = (
    ("h1", "x", "h1 = norm1(x)                      LayerNorm (lesson 6)"),
    ("qkv", "h1", "qkv = h1 W_qkv^T + b_qkv           linear (lesson 4)"),
    ("attn", "qkv", "attn = heads of softmax(q k^T / sqrt(hd)) v, side by side   (lessons 9 and 10)"),
    ("a", "attn", "a = attn W_proj^T + b_proj         linear"),
    ("x1", "a", "x1 = x + a                         residual: x gets a gradient from here too"),
    ("h2", "x1", "h2 = norm2(x1)                     LayerNorm"),
    ("f1", "h2", "f1 = h2 W_fc1^T + b_fc1            linear"),
    ("g", "f1", "g = gelu(f1)                       exact GELU (lesson 7)"),
    ("m", "g", "m = g W_fc2^T + b_fc2              linear"),
    ("y", "m", "y = x1 + m                         residual: x1 gets a gradient from here too"),
)
BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                "mlp.fc2.bias")
_BLOCK_PARAM_STEP = {"norm1": "h1", "attn.qkv": "qkv", "attn.proj": "a", "norm2": "h2", "mlp.fc1": "f1",
                     "mlp.fc2": "m"}


def block_gradients(x, params, dy, nh):
    """The engine's gradient of every intermediate of a pre-norm block (names as in BLOCK_STEPS, 'dx' for the
    input) and of every parameter ('d' + its timm name), for the upstream gradient dy of the output y."""
    from minivit.tensor import enable_grad
    with enable_grad():                     # also when called from inside a backward, which runs without a graph
        return _block_gradients(x, params, dy, nh)


def _block_gradients(x, params, dy, nh):
    from minivit import functional as F
    p = {name: Tensor(np.asarray(value), requires_grad=True) for name, value in params.items()}
    xt = Tensor(np.asarray(x), requires_grad=True)
    t = {}
    t["h1"] = F.layer_norm(xt, p["norm1.weight"], p["norm1.bias"], eps=1e-6)
    t["qkv"] = F.linear(t["h1"], p["attn.qkv.weight"], p["attn.qkv.bias"])
    t["attn"] = F.multi_head_self_attention(t["qkv"], nh)
    t["a"] = F.linear(t["attn"], p["attn.proj.weight"], p["attn.proj.bias"])
    t["x1"] = xt + t["a"]
    t["h2"] = F.layer_norm(t["x1"], p["norm2.weight"], p["norm2.bias"], eps=1e-6)
    t["f1"] = F.linear(t["h2"], p["mlp.fc1.weight"], p["mlp.fc1.bias"])
    t["g"] = F.gelu(t["f1"])
    t["m"] = F.linear(t["g"], p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    t["y"] = t["x1"] + t["m"]
    for tensor in t.values():
        tensor.retain_grad()
    t["y"].backward(np.asarray(dy))
    grads = {"d" + name: _array(tensor.grad) for name, tensor in t.items() if name != "y"}   # dy is given
    grads["dx"] = _array(xt.grad)
    grads.update({"d" + name: _array(tensor.grad) for name, tensor in p.items()})
    return grads


def cmp(name, mine, expected, factors=()):
    """One line comparing a gradient of yours with the engine's: exact, approximate (with the largest difference),
    or wrong (with a diagnosis when one fits)."""
    mine, expected = _array(mine), np.asarray(expected)
    if mine.shape == expected.shape and np.array_equal(mine, expected):
        verdict_ = "exact"
    elif mine.shape == expected.shape and np.allclose(mine, expected, rtol=1e-5, atol=1e-8):
        verdict_ = f"approximate (largest difference {np.abs(mine - expected).max():.1e})"
    else:
        named = diagnose(name[1:] if name.startswith("d") else name, mine, expected, factors) if mine.ndim else None
        verdict_ = "WRONG" + (f": {named}" if named else (f": shape {mine.shape}, expected {expected.shape}"
                                                           if mine.shape != expected.shape else ""))
    return Hint(f"{name:<22s} {verdict_}")


def block_comparer(x, params, dy, nh):
    """compare(name, mine) -> a cmp line against the engine's gradient of that name for this block, x and dy.

    The engine's numbers stay inside the closure: a learner sees verdicts, not answers."""
    expected = block_gradients(x, params, dy, nh)

    def compare(name, mine):
        if name not in expected:
            raise ValueError(f"no gradient named {name!r}; names: {', '.join(expected)}")
        return cmp(name, mine, expected[name], _block_factors(x))
    return compare


def _block_factors(x):
    B, N = np.shape(x)[:2]
    return [(B * N, "(B N)"), (B, "B"), (N, "N")]


def check_block_backward(fn):
    """fn(x (B, N, D), params {timm name: array}, dy (B, N, D), nh) -> {'dx': ..., 'dh1': ..., 'dnorm1.weight': ...}:
    the gradient of every intermediate of BLOCK_STEPS and of every parameter, each compared with the engine's."""
    def body():
        rng = _rng(47)
        B, N, D, nh, hidden = 2, 5, 8, 2, 16
        shapes = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
                  "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
                  "mlp.fc1.weight": (hidden, D), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (D, hidden),
                  "mlp.fc2.bias": (D,)}
        params = {name: rng.standard_normal(shape) * (0.3 if name.endswith("weight") and "norm" not in name else 1)
                  for name, shape in shapes.items()}
        x, dy = rng.standard_normal((B, N, D)), rng.standard_normal((B, N, D))
        expected = block_gradients(x, params, dy, nh)
        got = _call(fn, x.copy(), {k: v.copy() for k, v in params.items()}, dy.copy(), nh)
        if not isinstance(got, dict):
            return [f"return a dict of gradients (keys such as 'dx', 'dh1', 'dnorm1.weight'), got "
                    f"{type(got).__name__}"], ""
        missing = [k for k in expected if k not in got or got[k] is None]
        lines, first_wrong = [], None
        order = ["d" + name for name, _, _ in reversed(BLOCK_STEPS[:-1])] + ["dx"] + ["d" + n for n in BLOCK_PARAMS]
        for key in order:
            if key in missing:
                continue
            line = cmp(key, got[key], expected[key], _block_factors(x))
            lines.append(str(line))
            if "WRONG" in line and first_wrong is None:
                first_wrong = key
        problems = []
        if missing:
            problems.append("missing from your dict: " + ", ".join(missing))
        if first_wrong is not None:
            problems = ["every gradient, from the output back to the input, then the parameters:"] + \
                [f"  {line}" for line in lines] + problems
            problems.append(_where_the_chain_breaks(first_wrong))
        return problems, f"all {len(expected)} gradients equal the engine's (exactly or to rounding)"
    return _run("block_backward", ("go backwards through the forward one line at a time, each line an op from "
                                   "lessons 4-10; a residual adds: x1 gets dy directly and again through the MLP, "
                                   "x gets dx1 directly and again through attention",
                                   "dm = dy; backward of fc2 -> dg; gelu' -> df1; fc1 -> dh2; norm2 -> its dx, "
                                   "dx1 = dy + that; da = dx1; proj -> dattn; attention -> dqkv (split heads, dq, "
                                   "dk, dv, put back); qkv -> dh1; norm1 -> its dx, dx = dx1 + that; parameters "
                                   "from the linear and LayerNorm backwards of lessons 4 and 6"), body)


def _where_the_chain_breaks(first_wrong):
    name = first_wrong[1:]
    if name == "x":
        step = "the first line, h1 = norm1(x), or the residual: dx = dx1 + what comes back through norm1"
        return f"the first wrong gradient is dx: all after it are right, so look at {step}"
    step = next((s for s in BLOCK_STEPS if s[0] == name), None)
    if step is None:                                          # a parameter: its own step is named by its prefix
        prefix = name.rsplit(".", 1)[0]
        out = _BLOCK_PARAM_STEP[prefix]
        line = next(s[2] for s in BLOCK_STEPS if s[0] == out)
        return (f"the intermediate gradients are right but d{name} is not: look at the parameter gradients of the "
                f"step {line.split('   ')[0].strip()}")
    later = [s for s in BLOCK_STEPS if s[1] == name]
    if not later:
        return f"the first wrong gradient is d{name}, the block's output gradient: it is dy itself"
    return (f"going backwards, the first wrong gradient is d{name}; d{later[0][0]} is right, so the mistake is in "
            f"the backward of: {later[0][2].split('   ')[0].strip()}"
            + (" (and x1 also receives dy directly)" if name == "x1" else ""))


# ------------------------------------------------------------------------------------------------ lesson 17
def _momentum_reference(p, g, buf, lr, momentum, damped=False):
    buf = momentum * buf + ((1 - momentum) * g if damped else g)
    return p - lr * buf, buf


def _rmsprop_reference(p, g, sq, lr, alpha, eps, root=True, eps_inside=False):
    sq = alpha * sq + (1 - alpha) * g * g
    denom = (np.sqrt(sq + eps) if eps_inside else np.sqrt(sq) + eps) if root else sq + eps
    return p - lr * g / denom, sq


def _adam_reference(p, g, m, v, t, lr, betas, eps, correct=True, eps_inside=False):
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if correct else (m, v)
    return p - lr * mh / (np.sqrt(vh + eps) if eps_inside else np.sqrt(vh) + eps), m, v


def _update_rule_check(exercise, hints, fn, reference, state_names, settings, mistakes):
    """Run three steps of the learner's update rule and of the reference from the same state; name a mistake
    when the learner's steps equal one of ``mistakes`` ((description, reference with that mistake))."""
    def body():
        rng = _rng(48)
        p0 = rng.standard_normal(5)
        grads = [rng.standard_normal(5) for _ in range(3)]
        with_t = "t" in settings

        def run(rule):
            p, state = p0.copy(), [np.zeros(5) for _ in state_names]
            out = []
            for t, g in enumerate(grads, start=1):
                extra = {"t": t} if with_t else {}
                result = rule(p.copy(), g.copy(), *[s.copy() for s in state], **extra, **settings["values"])
                p, state = _array(result[0]), [_array(s) for s in result[1:]]
                out.append((p, state))
            return out

        def call(p, g, *state, **kw):
            args = [p, g, *state] + ([kw.pop("t")] if "t" in kw else []) + list(kw.values())
            result = _call(fn, *args)
            if not isinstance(result, tuple) or len(result) != 1 + len(state_names):
                raise ValueError(f"return a tuple (p, {', '.join(state_names)}), got {type(result).__name__}")
            return result

        expected, got = run(reference), run(call)
        for (name, rule) in mistakes:
            if all(np.allclose(gp, mp) for (gp, _), (mp, _) in zip(got, run(rule))) and \
                    not all(np.allclose(gp, ep) for (gp, _), (ep, _) in zip(got, expected)):
                return [f"your steps are those of a known mistake: {name}"], ""
        problems = []
        for t, ((gp, gs), (ep, es)) in enumerate(zip(got, expected), start=1):
            for label, a, b in [("p", gp, ep)] + list(zip(state_names, gs, es)):
                line = _compare(f"step {t}, {label}", a, b, rtol=1e-9, atol=1e-12)
                if line:
                    problems.append(line)
            if problems:
                break
        return problems, "three steps equal to the reference"
    return _run(exercise, hints, body)


def check_momentum_update(fn):
    """fn(p, g, buf, lr, momentum) -> (p, buf): SGD with momentum as torch.optim.SGD (buf <- momentum buf + g)."""
    settings = {"values": dict(lr=0.1, momentum=0.9)}
    return _update_rule_check(
        "momentum_update", ("the buffer accumulates raw gradients, older ones shrinking by `momentum` each step; "
                            "the step follows the buffer, not the gradient",
                            "buf = momentum * buf + g; p = p - lr * buf"),
        fn, _momentum_reference, ("buf",), settings,
        [("buf = momentum buf + (1 - momentum) g is an average of the gradients (Adam's m), 10x smaller here: "
          "PyTorch's SGD adds g undamped", lambda p, g, b, lr, momentum: _momentum_reference(p, g, b, lr, momentum,
                                                                                              damped=True)),
         ("the step uses the gradient, not the buffer", lambda p, g, b, lr, momentum: (
             p - lr * g, momentum * b + g))])


def check_rmsprop_update(fn):
    """fn(p, g, sq, lr, alpha, eps) -> (p, sq): RMSProp as torch.optim.RMSprop (no momentum, not centered)."""
    settings = {"values": dict(lr=0.01, alpha=0.99, eps=1e-8)}
    return _update_rule_check(
        "rmsprop_update", ("keep a running average of the squared gradient per weight and divide each step by its "
                           "square root",
                           "sq = alpha * sq + (1 - alpha) * g^2; p = p - lr * g / (sqrt(sq) + eps)"),
        fn, _rmsprop_reference, ("sq",), settings,
        [("the step divides by sq, not by its square root", lambda p, g, s, lr, alpha, eps: _rmsprop_reference(
            p, g, s, lr, alpha, eps, root=False)),
         ("eps is inside the square root (PyTorch adds it after)", lambda p, g, s, lr, alpha, eps: _rmsprop_reference(
             p, g, s, lr, alpha, eps, eps_inside=True))])


def check_adam_update(fn):
    """fn(p, g, m, v, t, lr, betas, eps) -> (p, m, v): Adam without weight decay (t counts from 1)."""
    settings = {"values": dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8), "t": True}
    return _update_rule_check(
        "adam_update", ("momentum (an average of g) and RMSProp (an average of g^2) together; both averages start "
                        "at zero, so divide each by the weight its terms have so far",
                        "m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p = p - lr (m / (1 - b1^t)) / "
                        "(sqrt(v / (1 - b2^t)) + eps)"),
        fn, _adam_reference, ("m", "v"), settings,
        [("m and v are not bias-corrected: early steps are too small (m / (1 - b1^t), v / (1 - b2^t))",
          lambda p, g, m, v, t, lr, betas, eps: _adam_reference(p, g, m, v, t, lr, betas, eps, correct=False)),
         ("eps is inside the square root (PyTorch adds it after)",
          lambda p, g, m, v, t, lr, betas, eps: _adam_reference(p, g, m, v, t, lr, betas, eps, eps_inside=True))])


def reference_rule(name):
    """The reference update rule of lesson 17's exercise ``name``: the lesson runs on it while the exercise is open."""
    rules = {"momentum_update": _momentum_reference, "rmsprop_update": _rmsprop_reference,
             "adam_update": _adam_reference}
    if name not in rules:
        raise ValueError(f"no reference rule {name!r}; rules: {', '.join(rules)}")
    return rules[name]


# ------------------------------------------------------------------------------------------------ lesson 18
def _integrated_gradients_reference(grad_fn, x, baseline, steps, midpoints=True, times_delta=True):
    fractions = (np.arange(steps) + (0.5 if midpoints else 0.0)) / steps
    mean_grad = sum(np.asarray(grad_fn(baseline + a * (x - baseline))) for a in fractions) / steps
    return (x - baseline) * mean_grad if times_delta else mean_grad


def check_integrated_gradients(fn):
    """fn(grad_fn, x, baseline, steps) -> attributions of x's shape: (x - baseline) times the mean of grad_fn at
    baseline + a (x - baseline) for the midpoints a = (k + 1/2) / steps, k = 0 .. steps - 1."""
    def body():
        rng = _rng(49)
        w, x, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
        problems = []
        # f = sum(w x^2): the gradient 2 w x is linear in x, so the midpoint rule is exact: w (x^2 - b^2)
        got = _array(_call(fn, lambda z: 2 * w * z, x.copy(), b.copy(), 8))
        expected = w * (x ** 2 - b ** 2)
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-9, atol=1e-12):
            named = diagnose("attribution", got, expected)
            for description, kwargs in (("the attributions are the mean gradient alone: multiply by (x - baseline)",
                                         dict(times_delta=False)),
                                        ("the points are a = k / steps, the left ends of the intervals, not their "
                                         "midpoints (k + 1/2) / steps", dict(midpoints=False))):
                if got.shape == expected.shape and np.allclose(
                        got, _integrated_gradients_reference(lambda z: 2 * w * z, x, b, 8, **kwargs)):
                    named = description
            problems.append("on f = sum(w x^2) with 8 steps (the midpoint rule is exact there): "
                            + (named or _compare("attributions", got, expected, rtol=1e-9)))
            return problems, ""
        # completeness on a curved function: the attributions add up to f(x) - f(baseline)
        f = lambda z: float(np.tanh(w * z).sum())                    # noqa: E731
        got = _array(_call(fn, lambda z: w * (1 - np.tanh(w * z) ** 2), x.copy(), b.copy(), 200))
        gap = abs(got.sum() - (f(x) - f(b)))
        if gap > 1e-4:
            problems.append(f"on f = sum(tanh(w x)), the attributions sum to {got.sum():+.6f} but f(x) - f(baseline) "
                            f"= {f(x) - f(b):+.6f}: completeness fails")
        return problems, "exact on a quadratic; complete (sums to f(x) - f(baseline)) on a curved function"
    return _run("integrated_gradients", ("walk in a straight line from the baseline to x, average the gradient at "
                                         "evenly spaced points, and weigh each input by how far it moved",
                                         "(x - baseline) * mean over k of grad_fn(baseline + (k + 1/2) / steps * "
                                         "(x - baseline)), k = 0 .. steps - 1"), body)


def reference_integrated_gradients(grad_fn, x, baseline, steps):
    """Lesson 18's exercise as the library computes it: the lesson runs on it while the exercise is open."""
    return _integrated_gradients_reference(grad_fn, x, baseline, steps)


# ------------------------------------------------------------------------------------------------ lesson 19
def reference_update_ratio(before, after):
    """log10(std(after - before) / std(before)): lesson 19's exercise, which the lesson runs on while it is open."""
    return float(np.log10(np.std(after - before) / np.std(before)))


def check_update_ratio(fn):
    """fn(before, after) -> log10(std(after - before) / std(before)) as a float."""
    def body():
        rng = _rng(50)
        before = rng.standard_normal((6, 5)) * 0.02
        problems = []
        for scale in (1e-3, 1e-1):
            after = before + scale * 0.02 * rng.standard_normal((6, 5))
            expected = reference_update_ratio(before, after)
            got = float(_call(fn, before.copy(), after.copy()))
            if math.isclose(got, 10 ** expected, rel_tol=1e-6):
                problems.append(f"you return the ratio itself ({got:.3g}); take its log10")
            elif math.isclose(got, -expected, rel_tol=1e-6):
                problems.append("the ratio is upside down: std(after - before) goes on top")
            elif math.isclose(got, float(np.log10(np.std(after - before) / np.std(after))), rel_tol=1e-9):
                problems.append("you divide by std(after): the data is the parameter before the step")
            elif not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
                problems.append(f"update {scale:g} x the data's scale: expected {expected:+.4f}, got {got:+.4f}")
        return problems, "log10 of the update's std over the parameter's std"
    return _run("update_ratio", ("how large the change is, relative to how large the weights are, on a log scale",
                                 "np.log10(np.std(after - before) / np.std(before))"), body)


# ------------------------------------------------------------------------------------------------ lesson 15
def _softmax_last(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softmax_double_backward_mistakes(y, dy, v):
    """What typical slips give instead of (dx, ddy), the gradients of sum(v * y * (dy - sum(dy * y))), each with
    the words that explain it."""
    s, r = (dy * y).sum(-1, keepdims=True), (v * y).sum(-1, keepdims=True)

    def through_softmax(gy):                                # d/dx from d/dy: softmax's own backward
        return y * (gy - (gy * y).sum(-1, keepdims=True))
    gy = v * (dy - s) - dy * r                              # the right d/dy: y in front and inside s
    dx_mistakes = [
        (np.zeros_like(y), "dx is zero: y was treated as a constant, but y = softmax(x) moves with x, and so does "
                           "the backward y * (dy - s) built from it"),
        (gy, "dx equals the derivative with respect to y: y = softmax(x), so pass it back through softmax's "
             "backward once more, dx = y * (gy - sum(gy * y))"),
        (through_softmax(v * (dy - s)), "dx misses the term from s = sum(dy * y), which depends on y too: "
                                        "its derivative adds -dy * sum(v * y) to the derivative with respect to y"),
        (through_softmax(v * (dy - s) + dy * r), "dx has a sign error in the term from s = sum(dy * y): "
                                                 "s is subtracted, so its term is -dy * sum(v * y)"),
        (through_softmax(v * dy - dy * r), "dx misses the term from the y in front: d/dy of y * (dy - s) "
                                           "holds v * (dy - s), not only v * dy"),
    ]
    ddy_mistakes = [
        (v * y, "ddy misses the sum: the backward is linear in dy, and its derivative in dy is softmax's "
                "backward applied to v, y * (v - sum(v * y))"),
        (v, "ddy is v itself: the backward multiplies dy by softmax's Jacobian, so ddy = y * (v - sum(v * y))"),
        (np.zeros_like(v), "ddy is zero: the backward depends on dy (linearly), so its derivative in dy is "
                           "softmax's backward applied to v"),
    ]
    return dx_mistakes, ddy_mistakes


def check_softmax_double_backward(fn):
    """fn(y, dy, v) -> (dx, ddy) for the softmax backward g(x, dy) = y * (dy - sum(dy * y)), y = softmax(x)
    along the last axis: the gradients of sum(v * g) with respect to x (through y) and to dy."""
    rng = _rng(17)
    cases = [[rng.standard_normal((3, 5)), rng.standard_normal((3, 5))],
             [rng.standard_normal((2, 2, 4)) * 2, rng.standard_normal((2, 2, 4))]]

    def softmax_backward(x, dy):
        y = _softmax_last(x)
        return y * (dy - (dy * y).sum(-1, keepdims=True))

    def body():
        problems, worst = _gradient_gate(softmax_backward, lambda xs, g, v: fn(_softmax_last(xs[0]), xs[1], v),
                                         cases, ("x", "dy"))
        problems += _diagnose_softmax_double_backward(fn, *cases[0], rng.standard_normal(cases[0][0].shape))
        return problems, (f"matches finite differences of softmax's backward on {len(cases)} cases (largest "
                          f"relative error {worst:.1e}) and the engine's double backward")
    return _run("softmax_double_backward", ("y appears twice in the backward y * (dy - s), in front and inside s = "
                                            "sum(dy * y), and x reaches it only through y",
                                            "differentiate sum(v * y * (dy - s)), s = sum(dy * y), with respect to y "
                                            "first (y appears twice: in front and inside s), then pass that back "
                                            "through softmax's backward; ddy is softmax's backward applied to v"),
                body)


def _diagnose_softmax_double_backward(fn, x, dy, v):
    """Lines naming the slip behind a wrong answer, and how it compares with the engine's double backward."""
    from minivit.autograd import grad
    from minivit.ops import SoftmaxFn

    xt, dyt = Tensor(x, requires_grad=True), Tensor(dy, requires_grad=True)
    (g,) = grad(SoftmaxFn.apply(xt), xt, dyt, create_graph=True)
    engine = [t.data for t in grad(g, (xt, dyt), v)]
    y = _softmax_last(x)
    dx_mistakes, ddy_mistakes = _softmax_double_backward_mistakes(y, dy, v)
    got = _call(fn, y, dy, v)
    if not isinstance(got, tuple) or len(got) != 2:
        return []
    lines = []
    for name, value, expected, mistakes in (("dx", got[0], engine[0], dx_mistakes),
                                            ("ddy", got[1], engine[1], ddy_mistakes)):
        value = _array(value)
        line = _compare(f"{name} against the engine's double backward (case 1)", value, expected, rtol=1e-6)
        if line is None:
            continue
        lines.append(line)
        for wrong, why in mistakes:
            if value.shape == wrong.shape and np.allclose(value, wrong, rtol=1e-6, atol=1e-10):
                lines.append(why)
                break
    return lines


# ------------------------------------------------------------------------------------------------ lesson 20
def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))                 # sigmoid without overflow for large |x|


def _discriminator_loss(real, fake):
    """L_D = -mean(log sigmoid(real)) - mean(log sigmoid(-fake)) in float64, stable for large logits."""
    return np.logaddexp(0.0, -real).mean() + np.logaddexp(0.0, fake).mean()


def reference_discriminator_loss_backward(real_logits, fake_logits):
    """Lesson 20's exercise as the library computes it: the lesson runs on it while the exercise is open."""
    return (_sigmoid(real_logits) - 1.0) / len(real_logits), _sigmoid(fake_logits) / len(fake_logits)


def check_discriminator_loss_backward(fn):
    """fn(real_logits (B_r,), fake_logits (B_f,)) -> (dreal, dfake), the gradients of
    L_D = -mean(log sigmoid(real_logits)) - mean(log(1 - sigmoid(fake_logits))) with respect to the logits."""
    rng = _rng(20)
    cases = [[rng.standard_normal(6) * 2, rng.standard_normal(6) * 2],
             [rng.standard_normal(4) * 3, rng.standard_normal(7) * 3]]     # unequal batches: each term its own 1/B

    def real_probability_mistake(arrays, y, dy):           # dL/dD instead of dL/dl: D = sigmoid(l) is not the input
        return -dy / (len(arrays[0]) * _sigmoid(arrays[0]))

    def fake_probability_mistake(arrays, y, dy):
        return dy / (len(arrays[1]) * (1.0 - _sigmoid(arrays[1])))
    def _times(grads, dy):                                  # the loss is a scalar: scale by the upstream dy
        if not isinstance(grads, (tuple, list)):
            return grads
        return tuple(None if g is None else _array(g) * dy for g in grads)
    probabilities = ("the gradient with respect to the probabilities D = sigmoid(l) (-1/(B D) and 1/(B (1 - D))), "
                     "not the logits: multiply by dD/dl = D (1 - D)")
    return _gate("discriminator_loss_backward",
                 ("d/dl of -log sigmoid(l) and of -log(1 - sigmoid(l)); each term is a mean over its own batch",
                  "dreal = (sigmoid(real_logits) - 1) / B_real, dfake = sigmoid(fake_logits) / B_fake"),
                 _discriminator_loss, lambda xs, y, dy: _times(_call(fn, xs[0], xs[1]), dy),
                 cases, ("real", "fake"),
                 factors=lambda arrays: [(len(arrays[0]), "B_real")] if len(arrays[0]) == len(arrays[1]) else
                 [(len(arrays[0]), "B_real"), (len(arrays[1]), "B_fake")],
                 mistakes=[("real", "dreal is sigmoid(l) / B, the fake term's gradient: -log sigmoid(l) has the "
                            "gradient sigmoid(l) - 1 (negative: raising a real logit lowers the loss)",
                            lambda arrays, y, dy: dy * _sigmoid(arrays[0]) / len(arrays[0])),
                           ("real", "dreal is " + probabilities, real_probability_mistake),
                           ("fake", "dfake is " + probabilities, fake_probability_mistake),
                           ("fake", "dfake is (sigmoid(l) - 1) / B, the real term's gradient: -log(1 - sigmoid(l)) "
                            "= -log sigmoid(-l) has the gradient sigmoid(l)",
                            lambda arrays, y, dy: dy * (_sigmoid(arrays[1]) - 1) / len(arrays[1]))])


# ------------------------------------------------------------------------------------------------ lesson 21
def reference_spectral_norm_backward(W, u, v, dy):
    """dW of L = sum(dy * W / sigma), sigma = u^T W v with u and v held constant: lesson 21's exercise as the
    library's spectral norm computes it (the lesson runs on it while the exercise is open)."""
    sigma = u @ W @ v
    return dy / sigma - ((dy * W).sum() / sigma ** 2) * np.outer(u, v)


def check_spectral_norm_backward(fn):
    """fn(W (m, n), u (m,), v (n,), dy (m, n)) -> dW, the gradient of sum(dy * W / sigma) with respect to W,
    sigma = u^T W v and u, v constants (the power iteration's vectors)."""
    rng = _rng(21)

    def unit(n):
        a = rng.standard_normal(n)
        return a / np.linalg.norm(a)

    def case(m, n):
        W = rng.standard_normal((m, n))
        u, v = np.linalg.svd(W)[0][:, 0], np.linalg.svd(W)[2][0]       # the top singular vectors ...
        u, v = u + 0.1 * unit(m), v + 0.1 * unit(n)                     # ... as power iteration has them, nearly
        return [W, u / np.linalg.norm(u), v / np.linalg.norm(v)]
    cases = [case(4, 3), case(3, 3), case(2, 5)]

    def forward(W, u, v):
        return W / (u @ W @ v)

    def sigma(arrays):
        W, u, v = arrays
        return float(u @ W @ v)

    def through_sigma(arrays, dy):                          # the term that sigma's dependence on W adds
        W, u, v = arrays
        return ((dy * W).sum() / sigma(arrays) ** 2) * np.outer(u, v)
    mistakes = [
        ("W", "dW is dy / sigma: sigma was treated as a constant, but sigma = u^T W v moves with W; the quotient "
              "rule adds a term through sigma, with d sigma / dW = u v^T",
         lambda arrays, y, dy: dy / sigma(arrays)),
        ("W", "the term through sigma has the wrong sign: W / sigma falls as sigma grows, so that term is "
              "subtracted",
         lambda arrays, y, dy: dy / sigma(arrays) + through_sigma(arrays, dy)),
        ("W", "the term through sigma is divided by sigma once; d(1/sigma) = -d sigma / sigma^2 needs sigma^2",
         lambda arrays, y, dy: dy / sigma(arrays) - through_sigma(arrays, dy) * sigma(arrays)),
        ("W", "the term through sigma uses v u^T: d(u^T W v) / dW_ij = u_i v_j, so it is the outer product u v^T "
              "(shape (m, n), as W)",
         lambda arrays, y, dy: dy / sigma(arrays) - through_sigma(arrays, dy).T
         if arrays[0].shape[0] == arrays[0].shape[1] else np.full_like(dy, np.nan)),
        ("W", "the term through sigma multiplies dy * W element by element: sigma is one number, so the chain rule "
              "through it first sums, dL/d sigma = -sum(dy * W) / sigma^2",
         lambda arrays, y, dy: dy / sigma(arrays) - dy * arrays[0] * np.outer(arrays[1], arrays[2])
         / sigma(arrays) ** 2),
    ]
    return _gate("spectral_norm_backward",
                 ("W appears twice in W / sigma: on top, and inside sigma = u^T W v; find d sigma / dW for the "
                  "bilinear form u^T W v first, then use the quotient rule",
                  "dW = dy / sigma - (sum(dy * W) / sigma^2) * np.outer(u, v), with sigma = u @ W @ v"),
                 forward, lambda xs, y, dy: _call(fn, xs[0], xs[1], xs[2], dy), cases, ("W",),
                 factors=lambda arrays: [(sigma(arrays), "sigma")], mistakes=mistakes)


class _PenaltyCritic:
    """A small critic for the gradient-penalty check: images (B, C, H, W) -> scores (B,), flatten, Linear, tanh,
    Linear; built lazily so that importing the exercises does not build modules."""

    @staticmethod
    def make(shape, seed):
        from minivit.nn.layers import Linear
        from minivit.nn.module import Module

        class Critic(Module):
            def __init__(self):
                super().__init__()
                rng = np.random.default_rng(seed)
                self.fc1 = Linear(int(np.prod(shape)), 6, rng=rng)
                self.fc2 = Linear(6, 1, rng=rng)

            def forward(self, x):
                return self.fc2(self.fc1(x.reshape(x.shape[0], -1)).tanh()).reshape(-1)
        return Critic().double()


class _FixedDraw:
    """Stands in for a random generator: ``random`` returns the given interpolation weights."""

    def __init__(self, a):
        self.a = a

    def random(self, shape, dtype=None):
        return self.a.reshape(shape).astype(dtype or self.a.dtype)


def _penalty_variants(g, lam):
    """What typical slips give instead of lam * mean((||g_i|| - 1)^2), from the per-sample input gradients g."""
    flat = g.reshape(len(g), -1)
    norms = np.linalg.norm(flat, axis=1)
    last = np.linalg.norm(g, axis=-1)                                  # a norm over the last axis only
    channels = np.linalg.norm(g, axis=1)                               # a norm over the channels only
    return [
        (lam * (norms ** 2).mean(), "you penalise ||g||^2, which pulls the gradient towards 0 (that is R1's idea); "
                                    "WGAN-GP pulls its norm towards 1: (||g|| - 1)^2"),
        (lam * ((norms ** 2 - 1) ** 2).mean(), "you use the squared norm ||g||^2 inside (||.|| - 1)^2: take the "
                                               "square root of the sum of squares first"),
        (lam * ((norms - 1) ** 2).sum(), "you sum over the batch where the penalty is a mean, E[...]: "
                                         f"{len(g)}x too large"),
        (((norms - 1) ** 2).mean(), "the penalty is missing its weight lam"),
        (lam * (np.linalg.norm(flat) - 1) ** 2, "one norm for the whole batch: each sample needs its own norm "
                                                "(sum the squares over every axis but the first)"),
        (lam * ((last - 1) ** 2).mean(), "the norm is taken over the last axis only (rows of pixels): each sample's "
                                         "norm sums the squares over every axis but the first"),
        (lam * ((channels - 1) ** 2).mean(), "the norm is taken over the channels only: each sample's norm sums the "
                                             "squares over every axis but the first"),
        (lam * ((np.abs(flat).sum(1) - 1) ** 2).mean(), "you use the L1 norm (sum of |g|): the penalty is on the "
                                                        "Euclidean norm, sqrt(sum(g^2))"),
    ]


def _reference_penalty(critic, real, fake, a, lam):
    """(the library's penalty Tensor, the per-sample input gradients at x_hat) for fixed interpolation weights."""
    from minivit import gan
    from minivit.autograd import grad
    x_hat = Tensor(a * real + (1 - a) * fake, requires_grad=True)
    (g,) = grad(critic(x_hat).sum(), x_hat)
    return gan.gradient_penalty(critic, real, fake, lam=lam, generator=_FixedDraw(a)), g.data


def check_gradient_penalty(fn):
    """fn(critic, real, fake, a, lam) -> the WGAN-GP penalty lam * mean((||grad D(x_hat_i)||_2 - 1)^2) as a Tensor
    that back-propagates into the critic's parameters, x_hat = a * real + (1 - a) * fake."""
    rng = _rng(210)
    shapes = [(5, 1, 3, 3), (4, 2, 2, 3)]

    def body():
        problems = []
        for c, shape in enumerate(shapes):
            label = f"case {c + 1} (batch {shape})"
            real, fake = rng.standard_normal(shape) + 1.0, rng.standard_normal(shape) * 0.5
            a = rng.random((shape[0],) + (1,) * (len(shape) - 1))
            lam = 10.0
            critic = _PenaltyCritic.make(shape[1:], seed=c)
            expected, g = _reference_penalty(critic, real, fake, a, lam)
            critic.zero_grad()
            expected.backward()
            expected_grads = {n: None if p.grad is None else np.array(p.grad) for n, p in critic.named_parameters()}
            critic.zero_grad()
            got = _call(fn, critic, real.copy(), fake.copy(), a.copy(), lam)
            if not isinstance(got, Tensor):
                problems.append(f"{label}: you return a {type(got).__name__}; return the penalty as a Tensor (not "
                                f".item() or .data), so that the training step can call .backward() on it")
                value = float(np.asarray(got).reshape(-1)[0]) if np.size(got) == 1 else None
            else:
                if got.size != 1:
                    return problems + [f"{label}: the penalty has shape {got.shape}; it is one number, a mean over "
                                       "the batch"], ""
                value = float(got.data.reshape(-1)[0])
            target = float(expected.data)
            if value is None:
                return problems, ""
            if not math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-10):
                line = f"{label}: penalty {value:.6g}, expected {target:.6g}"
                for wrong, why in _penalty_variants(g, lam):
                    if math.isclose(value, wrong, rel_tol=1e-6, abs_tol=1e-10):
                        line += f": {why}"
                        break
                else:
                    swapped = float(_reference_penalty(critic, real, fake, 1 - a, lam)[0].data)
                    if math.isclose(value, swapped, rel_tol=1e-6):
                        line += ": a weighs the fake batch in your x_hat; x_hat = a * real + (1 - a) * fake"
                return problems + [line], ""
            if problems:
                return problems, ""
            if not got.requires_grad:
                return [f"{label}: the value is right, but the penalty does not reach the critic's parameters (it "
                        "does not require grad): take the input gradient with grad(..., create_graph=True), so that "
                        "it is itself a graph that backward can differentiate"], ""
            try:
                got.backward()
            except Exception as e:
                return [f"{label}: the value is right, but .backward() on your penalty raised {type(e).__name__}: "
                        f"{e}"], ""
            for name, p in critic.named_parameters():
                want, have = expected_grads[name], p.grad
                if want is None and have is not None and np.abs(_array(have)).max() > 1e-12:
                    problems.append(f"{label}: d penalty / d {name} should be None or zero (a shift of every score "
                                    "does not change the input gradient), got a nonzero gradient")
                elif want is not None and have is None:
                    problems.append(f"{label}: the value is right, but d penalty / d {name} is None: the penalty "
                                    "has no graph back to that parameter (grad(..., create_graph=True))")
                elif want is not None:
                    line = _compare(f"{label}: d penalty / d {name}", have, want, rtol=1e-5, atol=1e-9)
                    if line:
                        problems.append(line + " (the value is right: was something detached with .data on the "
                                               "way?)")
            if problems:
                return problems, ""
        return problems, (f"value and gradients in the critic's parameters match the library's "
                          f"gan.gradient_penalty on {len(shapes)} batches")
    return _run("gradient_penalty", ("interpolate per sample, differentiate the summed scores with respect to x_hat "
                                     "keeping the graph, then one norm per sample",
                                     "x_hat = Tensor(a * real + (1 - a) * fake, requires_grad=True); (g,) = "
                                     "minivit.grad(critic(x_hat).sum(), x_hat, create_graph=True); norms = "
                                     "((g * g).sum(axis=tuple(range(1, g.ndim)))) ** 0.5; return lam * ((norms - 1) "
                                     "** 2).mean()"), body)


# ------------------------------------------------------------------------------------------------ lesson 22
def check_frechet_distance(fn):
    """fn(mu1 (d,), S1 (d, d), mu2 (d,), S2 (d, d)) -> ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) as a float,
    compared with ``minivit.gan_metrics.frechet_distance_from_statistics``."""
    from minivit.gan_metrics import frechet_distance_from_statistics
    import scipy.linalg
    rng = _rng(22)

    def covariance(d, scale):
        a = rng.standard_normal((d, d)) * scale
        return a @ a.T + 0.2 * np.eye(d)
    cases = [(rng.standard_normal(3), covariance(3, 1.0), rng.standard_normal(3), covariance(3, 0.7)),
             (rng.standard_normal(4), covariance(4, 0.5), rng.standard_normal(4) + 1, covariance(4, 1.5)),
             (rng.standard_normal(2), np.diag(rng.uniform(0.5, 2, 2)), rng.standard_normal(2),
              np.diag(rng.uniform(0.5, 2, 2)))]

    def slips(mu1, s1, mu2, s2):
        diff = mu1 - mu2
        root = scipy.linalg.sqrtm(s1 @ s2).real
        with np.errstate(invalid="ignore"):
            elementwise = np.trace(np.sqrt(s1 @ s2))
        return [
            (diff @ diff + np.trace(s1 + s2) - np.trace(root), "the cross term needs its factor 2: "
                                                               "tr(S1 + S2 - 2 (S1 S2)^(1/2))"),
            (np.sqrt(diff @ diff) + np.trace(s1 + s2 - 2 * root), "the mean term is the squared distance "
                                                                   "||mu1 - mu2||^2, not the distance"),
            (np.trace(s1 + s2 - 2 * root), "the mean term ||mu1 - mu2||^2 is missing"),
            (diff @ diff + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1).real @ scipy.linalg.sqrtm(s2).real),
             "you use S1^(1/2) S2^(1/2): the square root of a product is the product of the roots only when S1 and "
             "S2 commute; take the root of S1 S2 (or of S1^(1/2) S2 S1^(1/2), which has the same trace)"),
            (diff @ diff + np.trace(s1 + s2) - 2 * elementwise, "you take the square root element by element; "
                                                                "(S1 S2)^(1/2) is the matrix square root (scipy.linalg."
                                                                "sqrtm, or through eigenvalues)"),
            (diff @ diff + np.trace(s1 + s2 - 2 * (s1 @ s2)), "the square root of S1 S2 is missing"),
            (diff @ diff + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum(),
             "you use only the diagonals (per-axis standard deviations): right only for diagonal covariances; "
             "the features are correlated"),
        ]

    def body():
        problems, passed = [], []
        for c, (mu1, s1, mu2, s2) in enumerate(cases):
            got = _call(fn, mu1.copy(), s1.copy(), mu2.copy(), s2.copy())
            got = np.asarray(_array(got))
            if got.size != 1:
                return problems + [f"case {c + 1}: return one number, got an array of shape {got.shape}"], ""
            got = complex(got.reshape(-1)[0])
            if abs(got.imag) > 1e-6 * max(1.0, abs(got.real)):
                problems.append(f"case {c + 1}: your distance is complex ({got:.4g}); its imaginary part comes "
                                "from rounding in the square root: keep the real part")
                continue
            got = got.real
            expected = frechet_distance_from_statistics(mu1, s1, mu2, s2)
            if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
                passed.append(c + 1)
                continue
            line = f"case {c + 1} (d = {len(mu1)}): got {got:.6g}, expected {expected:.6g}"
            for wrong, why in slips(mu1, s1, mu2, s2):
                if np.isfinite(wrong) and math.isclose(got, float(wrong), rel_tol=1e-6, abs_tol=1e-9):
                    line += f": {why}"
                    break
            problems.append(line)
            if passed:
                problems.append("cases passed: " + ", ".join(str(k) for k in passed))
            return problems, ""
        return problems, f"matches gan_metrics.frechet_distance_from_statistics on {len(cases)} pairs of Gaussians"
    return _run("frechet_distance", ("the squared distance of the means, plus a trace term that needs a matrix square "
                                     "root of S1 S2",
                                     "d = mu1 - mu2; r = scipy.linalg.sqrtm(S1 @ S2).real; "
                                     "return float(d @ d + np.trace(S1) + np.trace(S2) - 2 * np.trace(r))"), body)


def _normalised(h, eps):
    hc = h - h.mean(-1, keepdims=True)
    return hc / np.sqrt((hc ** 2).mean(-1, keepdims=True) + eps)


def reference_sln_backward(h, gamma, beta, dy, eps):
    """(dh, dgamma, dbeta) of y = gamma[:, None] * LayerNorm(h) + beta[:, None]: lesson 22's exercise as the library
    computes it (the lesson runs on it while the exercise is open)."""
    per_sample = (h.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)
    tokens = tuple(range(1, h.ndim - 1))
    hhat = _normalised(h, eps)
    dh = _layer_norm_dx(h, 1.0, dy * gamma.reshape(per_sample), eps)
    return dh, (dy * hhat).sum(axis=tokens), dy.sum(axis=tokens)


def check_sln_backward(fn):
    """fn(h (B, T, D), gamma (B, D), beta (B, D), dy, eps) -> (dh, dgamma, dbeta) for the self-modulated LayerNorm
    y = gamma[:, None, :] * (h - mean) / sqrt(var + eps) + beta[:, None, :], one gamma and beta per sample."""
    rng = _rng(220)
    cases = [[rng.standard_normal((2, 3, 4)), 1 + 0.5 * rng.standard_normal((2, 4)), rng.standard_normal((2, 4))],
             [rng.standard_normal((3, 2, 5)) * 2 + 1, 1 + 0.5 * rng.standard_normal((3, 5)),
              rng.standard_normal((3, 5))]]

    def forward(h, gamma, beta):
        return gamma[:, None, :] * _normalised(h, 1e-6) + beta[:, None, :]

    def along_hhat(g, arrays, y):               # LayerNorm ignores a shift of a token and a rescale of it
        hc = arrays[0] - arrays[0].mean(-1, keepdims=True)
        return np.abs((g * hc).sum(-1) / np.sqrt((hc ** 2).sum(-1))).max()
    return _gate("sln_backward",
                 ("gamma and beta are per sample and shared by that sample's tokens: their gradients sum over the "
                  "tokens only; h's gradient is LayerNorm's backward with each sample's own gamma",
                  "hhat = (h - mean) / sqrt(var + eps); dgamma = sum over tokens of dy * hhat, dbeta = sum over "
                  "tokens of dy (shapes (B, D)); with g = dy * gamma[:, None, :]: dh = (g - mean(g) - hhat * "
                  "mean(g * hhat)) / sqrt(var + eps), means over the last axis"),
                 forward, lambda xs, y, dy: _call(fn, xs[0], xs[1], xs[2], dy, 1e-6), cases, ("h", "gamma", "beta"),
                 factors=lambda arrays: [(arrays[0].shape[1], "T (the tokens)"), (arrays[0].shape[-1], "D")],
                 invariants=[("h", "LayerNorm's dh sums to zero over each token's channels (shifting a token does "
                              "not change y)", _rows_sum()),
                             ("h", "LayerNorm's dh is orthogonal to h_hat for each token (scaling a token does not "
                              "change y)", along_hhat)],
                 mistakes=[("h", "dh is what it would be with gamma all ones: the gradient that reaches h_hat is "
                             "dy * gamma, each sample with its own gamma",
                            lambda a, y, dy: _layer_norm_dx(a[0], 1.0, dy)),
                           ("h", "dh uses the first sample's gamma for every sample: gamma[:, None, :] gives each "
                             "sample its own",
                            lambda a, y, dy: _layer_norm_dx(a[0], a[1][0], dy))])


def _spread_gradient(x, upstream, group_size, eps, ddof=0):
    """The spread column's part of dx: upstream (B/g,) = dL/ds_k, times ds_k/dx_id = c_id / (n D sigma_kd), with c
    the deviation from the group's mean, n = g - ddof and sigma_kd = sqrt(sum_i c_id^2 / n + eps)."""
    B, D = x.shape
    groups = x.reshape(B // group_size, group_size, D)
    centred = groups - groups.mean(axis=1, keepdims=True)
    n = group_size - ddof
    sigma = np.sqrt((centred ** 2).sum(axis=1, keepdims=True) / n + eps)    # (B/g, 1, D)
    return (np.reshape(upstream, (B // group_size, -1, 1)) * centred / (n * D * sigma)).reshape(B, D)


def reference_minibatch_std_backward(x, dy, group_size, eps):
    """dx of y = [x, s] (``MinibatchStd``): lesson 22's exercise as the library computes it."""
    upstream = dy[:, -1].reshape(-1, group_size).sum(axis=1)                 # dL/ds_k: s_k is in g rows
    return dy[:, :-1] + _spread_gradient(x, upstream, group_size, eps)


def check_minibatch_std_backward(fn):
    """fn(x (B, D), dy (B, D + 1), group_size, eps) -> dx for y = [x, s], s_k = mean_d sqrt(var_{i in k} x_id + eps)
    appended to every row of group k (consecutive rows)."""
    rng = _rng(221)
    cases = [[rng.standard_normal((6, 4)), np.array(3)], [rng.standard_normal((8, 5)) * 2 + 1, np.array(2)],
             [rng.standard_normal((4, 3)), np.array(4)]]

    def own_row_only(a, y, dy):                   # dL/ds_k taken from each row's own dy[:, -1]
        return dy[:, :-1] + _spread_gradient(a[0], dy[:, -1], int(a[1]), 1e-8)

    def upstream(a, dy):
        return dy[:, -1].reshape(-1, int(a[1])).sum(axis=1)
    return _gate("minibatch_std_backward",
                 ("the first D columns of y are x itself; the last, s_k, depends on every row of group k, and every "
                  "row of the group carries it, so its upstream gradient is the sum of those rows' dy[:, -1]",
                  "with c = x - (its group's mean), sigma_kd = sqrt(mean over the group of c_id^2 + eps) and S_k = "
                  "the sum of dy[i, -1] over group k's rows: dx = dy[:, :D] + S_k c / (g D sigma_kd)"),
                 lambda x, g: MinibatchStd(int(g))(x).data, lambda xs, y, dy: _call(fn, xs[0], dy, int(xs[1]), 1e-8),
                 cases, ("x",),
                 mistakes=[("x", "each row passes on only its own dy[:, -1]: s_k sits in all g rows of group k, so "
                             "dL/ds_k is the sum of their dy[:, -1]", own_row_only),
                           ("x", "the pass-through is missing: y's first D columns are x, so dx starts with "
                             "dy[:, :D]", lambda a, y, dy: _spread_gradient(a[0], upstream(a, dy), int(a[1]), 1e-8)),
                           ("x", "the spread's term is D times too large: s_k is the mean over the D features, a 1/D",
                            lambda a, y, dy: dy[:, :-1] + a[0].shape[1] * _spread_gradient(
                                a[0], upstream(a, dy), int(a[1]), 1e-8)),
                           ("x", "this is the gradient with the unbiased variance (1/(g - 1)); the layer's variance "
                             "divides by g", lambda a, y, dy: dy[:, :-1] + _spread_gradient(
                                 a[0], upstream(a, dy), int(a[1]), 1e-8, ddof=1))])


# ------------------------------------------------------------------------------------------------ lesson 23
def _kl_mean_and_grads(mu, logvar):
    """The batch mean of KL(N(mu, e^logvar) || N(0, I)), each image's KL summed over the latent axis, and its
    gradients: (kl, dmu, dlogvar)."""
    B, variance = mu.shape[0], np.exp(logvar)
    return 0.5 * (mu * mu + variance - logvar - 1).sum() / B, mu / B, 0.5 * (variance - 1) / B


def _kl_mistakes(mu, logvar):
    """(description, (kl, dmu, dlogvar)) for the slips the check names."""
    B, L = mu.shape
    kl, dmu, dlogvar = _kl_mean_and_grads(mu, logvar)
    sigma = logvar                                           # the log-variance read as a standard deviation
    return [
        ("the 1/2 in front is missing: KL = 1/2 sum(mu^2 + e^v - v - 1)", (2 * kl, 2 * dmu, 2 * dlogvar)),
        ("summed over the batch instead of averaged: divide by B, the batch size", (B * kl, B * dmu, B * dlogvar)),
        ("averaged over the latent axis too: the KL of one image is a sum over its L latent numbers; only the "
         "batch is averaged", (kl / L, dmu / L, dlogvar / L)),
        ("e^v is used as the standard deviation: v is the log-variance, so the variance is e^v and the standard "
         "deviation e^(v/2); with sigma = e^v the formula becomes 1/2 (mu^2 + e^(2v) - 2v - 1)",
         (0.5 * (mu * mu + np.exp(2 * logvar) - 2 * logvar - 1).sum() / B, dmu, (np.exp(2 * logvar) - 1) / B)),
        ("the second input is used as sigma, 1/2 (mu^2 + s^2 - log s^2 - 1) with s = logvar: it is the "
         "log-variance v, so s^2 = e^v and log s^2 = v",
         (0.5 * (mu * mu + sigma ** 2 - np.log(sigma ** 2) - 1).sum() / B, dmu, (sigma - 1 / sigma) / B)),
        ("the log-variance term has the wrong sign: log q(z) holds -1/2 log s^2 = -v/2 (a wider q has a lower "
         "density everywhere), so the bracket of the KL holds -v",
         (kl + logvar.sum() / B, dmu, 0.5 * (np.exp(logvar) + 1) / B)),
        ("the -1 is missing: it comes from E_q[(z - mu)^2] / s^2 = 1 in -log q, and makes the KL of q = p zero",
         (kl + 0.5 * L, dmu, dlogvar)),
        ("this is the gradient with respect to the variance s^2 = e^v, not the log-variance: multiply by "
         "ds^2/dv = e^v", (kl, dmu, 0.5 * (1 - np.exp(-logvar)) / B)),
        ("the derivative of the -v term (-1/2 per element, before the 1/B) is missing",
         (kl, dmu, 0.5 * np.exp(logvar) / B)),
    ]


def _kl_value_for_grad(mu, logvar):
    return _kl_mean_and_grads(mu, logvar)[0]


def check_gaussian_kl(fn):
    """fn(mu (B, L), logvar (B, L)) -> (kl, dmu, dlogvar): kl = mean over the batch of KL(N(mu, e^logvar) ||
    N(0, I)) summed over the latent axis (a float), and its gradients with respect to mu and logvar."""
    rng = _rng(23)
    cases = [(rng.standard_normal((4, 3)), rng.standard_normal((4, 3)) * 0.8),
             (rng.standard_normal((5, 2)) * 1.5, rng.standard_normal((5, 2)) - 0.5)]

    def body():
        problems, worst = [], 0.0
        for c, (mu, logvar) in enumerate(cases):
            got = _call(fn, mu.copy(), logvar.copy())
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                return [f"return three things, (kl, dmu, dlogvar); got {type(got).__name__}"
                        + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "")], ""
            B, L = mu.shape
            expected_value = _kl_value_for_grad(mu, logvar)
            expected = numeric_gradients(_kl_value_for_grad, [mu, logvar], np.array(1.0), 2)
            mistakes = _kl_mistakes(mu, logvar)
            label = f"case {c + 1} (B = {B}, L = {L})"
            value = _array(got[0])
            if value.size != 1:
                problems.append(f"{label}: kl has shape {value.shape}; it is one number, the mean over the batch "
                                f"of each image's KL (summed over the latent axis)")
            elif not math.isclose(float(value), expected_value, rel_tol=1e-6, abs_tol=1e-9):
                why = next((d for d, m in mistakes if math.isclose(float(value), m[0], rel_tol=1e-6)), None)
                problems.append(f"{label}: kl is {float(value):.6g}, expected {expected_value:.6g}"
                                + (f": {why}" if why else ""))
            for k, (name, e) in enumerate((("mu", expected[0]), ("logvar", expected[1]))):
                g = got[k + 1]
                if g is None:
                    problems.append(f"{label}: d{name} is None")
                    continue
                g = _array(g).astype(np.float64)
                if _close(g, e, rtol=1e-5, atol=1e-7):
                    worst = max(worst, float((np.abs(g - e) / np.maximum(np.abs(g) + np.abs(e), 1e-12)).max()))
                    continue
                why = next((d for d, m in mistakes if g.shape == e.shape and _close(g, m[k + 1], 1e-5, 1e-7)), None)
                why = why or diagnose(name, g, e, factors=[(B, "B"), (2, "2")])
                problems.append(f"{label}, d{name}: " + (why or _worst_line(f"d{name}", g, e)))
            if problems:
                return problems, ""
        return problems, (f"value and both gradients right on {len(cases)} cases (largest relative error of the "
                          f"gradients against finite differences {worst:.1e})")
    return _run("gaussian_kl", ("write KL = E_q[log q(z) - log p(z)] with both densities as Gaussians; "
                                "E_q[(z - mu)^2] = e^v and E_q[z^2] = mu^2 + e^v do the rest",
                                "kl = 0.5 * (mu**2 + exp(logvar) - logvar - 1).sum() / B, dmu = mu / B, "
                                "dlogvar = 0.5 * (exp(logvar) - 1) / B, with B = mu.shape[0]"), body)


# ------------------------------------------------------------------------------------------------ lesson 24
def _gram(tokens):
    return tokens.swapaxes(-1, -2) @ tokens / tokens.shape[-2]


def check_gram_backward(fn):
    """fn(tokens (B, N, D), dgram (B, D, D)) -> dtokens (B, N, D): the gradient of sum(dgram * G) with
    G = tokens^T tokens / N for each image of the batch (``minivit.art.gram_matrix``)."""
    rng = _rng(24)
    cases = [[rng.standard_normal((2, 5, 3))], [rng.standard_normal((3, 4, 6))]]     # N != D, B != D

    def n_tokens(arrays):
        return arrays[0].shape[-2]

    def one_half(arrays, y, dy):                         # only the T dG term, as if G were linear in T
        return arrays[0] @ dy / n_tokens(arrays)

    def other_half(arrays, y, dy):
        return arrays[0] @ dy.swapaxes(-1, -2) / n_tokens(arrays)

    def doubled(arrays, y, dy):                          # right only for a symmetric dG
        return 2 * arrays[0] @ dy / n_tokens(arrays)

    def over_width(arrays, y, dy):
        return arrays[0] @ (dy + dy.swapaxes(-1, -2)) / arrays[0].shape[-1]

    half = ("G = T^T T / N holds T twice, so its gradient has two terms: T dG^T / N and T dG / N; you have only "
            "one of them (they are equal only when dG is symmetric, and the upstream gradient need not be)")
    hints = ("write G[a, b] = 1/N sum_n T[n, a] T[n, b] and differentiate with respect to T[n, c]: c can be a or b; "
             "on a batch transpose the last two axes with swapaxes(-1, -2), not .T",
             "dtokens = tokens @ (dgram + dgram.swapaxes(-1, -2)) / N, with N = tokens.shape[-2]")

    def body():
        problems, worst = _gradient_gate(
            _gram, lambda xs, y, dy: fn(xs[0], dy), cases, ("tokens",),
            factors=lambda arrays: [(n_tokens(arrays), "N"), (2, "2")],
            mistakes=[("tokens", half, one_half), ("tokens", half, other_half),
                      ("tokens", "2 T dG / N is right only for a symmetric dG: the two terms are T dG^T / N and "
                       "T dG / N", doubled)])
        if problems:                                     # a ratio N / D is too odd for the general diagnosis
            tokens = cases[0][0]
            dy = np.random.default_rng(100).standard_normal((tokens.shape[0],) + (tokens.shape[-1],) * 2)
            got = _array(_call(fn, tokens.copy(), dy))
            if got.shape == tokens.shape and _close(got, over_width([tokens], None, dy)):
                problems.insert(0, "case 1: divided by D, the width of a token, instead of N, the number of "
                                   "tokens the Gram matrix averages over")
        return problems, (f"matches finite differences on {len(cases)} cases (largest relative error "
                          f"{worst:.1e})")
    return _run("gram_backward", hints, body)


# ------------------------------------------------------------------------------------------------ lesson 25
def reference_stitch_tiles(maps):
    """Lesson 25's exercise as the library computes it (``painters.tile_attention``): (rows, cols, h, w) ->
    (rows h, cols w)."""
    rows, cols, h, w = maps.shape
    return maps.transpose(0, 2, 1, 3).reshape(rows * h, cols * w)


def check_stitch_tiles(fn):
    """fn(maps (rows, cols, h, w)) -> (rows h, cols w): the map of tile (r, c) placed at rows r h .. (r + 1) h and
    columns c w .. (c + 1) w of one picture."""
    def body():
        rows, cols, h, w = 2, 3, 4, 5                         # every size different, so that no swap goes unseen
        maps = np.arange(rows * cols * h * w, dtype=np.float64).reshape(rows, cols, h, w)
        expected = reference_stitch_tiles(maps)
        got = _array(_call(fn, maps.copy()))
        if got.shape == expected.shape and np.array_equal(got, expected):
            return [], "each tile in its place, on a 2 x 3 grid of 4 x 5 tiles"
        slips = [(maps.reshape(rows * h, cols * w),
                  "a reshape alone reads the numbers in memory order, (row, col, y, x), so a line of your picture "
                  "holds several lines of one tile side by side instead of one line of each tile of the row; "
                  "bring the axes into the order (row, y, col, x) first (transpose), then reshape"),
                 (reference_stitch_tiles(maps).T,
                  "your picture is the right one transposed (its rows are the columns)"),
                 (maps.transpose(1, 2, 0, 3).reshape(cols * h, rows * w),
                  "the grid of tiles is transposed: tile (r, c) belongs in tile-row r and tile-column c")]
        for wrong, why in slips:
            if got.shape == wrong.shape and np.array_equal(got, wrong):
                return [f"on a grid of {rows} x {cols} tiles of {h} x {w}: {why}"], ""
        line = _compare(f"stitched map ({rows} x {cols} tiles of {h} x {w})", got, expected)
        named = diagnose("map", got, expected)
        named = named and named.replace("your gradient dmap", "your map").replace("dmap", "your map")
        return [line] + ([named] if named else []), ""
    return _run("stitch_tiles", ("tile (r, c) covers rows r h .. (r + 1) h and columns c w .. (c + 1) w; a "
                                 "reshape alone keeps the axes in the order (row, col, y, x)",
                                 "maps.transpose(0, 2, 1, 3).reshape(rows * h, cols * w)"), body)


# ------------------------------------------------------------------------------------------------ lesson 26
class _Gradients:
    """Just enough of an optimizer for ``GradScaler``: one parameter group whose parameters hold the gradients,
    and a ``step`` that only notes it was called."""

    def __init__(self, grads):
        from types import SimpleNamespace
        self.param_groups = [{"params": [SimpleNamespace(grad=np.array(g)) for g in grads]}]
        self.stepped = False

    def step(self):
        self.stepped = True


def reference_scaler_update(grads, scale, clean_steps, growth_interval):
    """Lesson 26's exercise done by ``minivit.GradScaler`` itself (factors 2 and 0.5): the lesson runs on it while
    the exercise is open. -> (unscaled float32 gradients, skip, new scale, new clean-step count)."""
    from minivit.amp import GradScaler
    scaler = GradScaler(init_scale=scale, growth_interval=growth_interval)
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": clean_steps})
    optimizer = _Gradients(grads)
    scaler.step(optimizer)
    scaler.update()
    unscaled = [p.grad for p in optimizer.param_groups[0]["params"]]
    return unscaled, not optimizer.stepped, scaler.get_scale(), scaler.state_dict()["_growth_tracker"]


def _scaler_steps(growth_interval):
    """A scripted run: (float16 gradients of a scaled loss, the scale they were made with, the clean-step count
    before the step) per step, with an Inf on two steps and a NaN on one, and gradients small enough that
    dividing them by the scale in float16 would flush them to zero."""
    from minivit.amp import GradScaler
    rng = _rng(26)
    scaler = GradScaler(init_scale=2.0**15, growth_interval=growth_interval)
    bad = {4: np.inf, 7: np.nan, 8: -np.inf}
    steps = []
    for t in range(13):
        true = [rng.standard_normal(6) * 10.0 ** rng.uniform(-9, -3, 6), rng.standard_normal(4) * 1e-5]
        scaled = [(g * scaler.get_scale()).astype(np.float16) for g in true]
        if t in bad:
            scaled[t % 2][t % 3] = bad[t]
        steps.append((scaled, scaler.get_scale(), scaler.state_dict()["_growth_tracker"]))
        optimizer = _Gradients(scaled)
        scaler.step(optimizer)
        scaler.update()
    return steps


def check_scaler_update(fn):
    """fn(grads, scale, clean_steps, growth_interval) -> (unscaled float32 grads, skip, new scale, new clean_steps):
    one step of a dynamic loss scaler with GradScaler's rules (growth factor 2, backoff factor 0.5)."""
    interval = 3

    def body():
        passed = []
        for t, (scaled, scale, clean) in enumerate(_scaler_steps(interval), start=1):
            overflow = not all(np.isfinite(g).all() for g in scaled)
            expected_grads, expected_skip, expected_scale, expected_clean = reference_scaler_update(
                scaled, scale, clean, interval)
            result = _call(fn, [g.copy() for g in scaled], scale, clean, interval)
            if not isinstance(result, (tuple, list)) or len(result) != 4:
                return ["return a tuple (grads, skip, scale, clean_steps)"], ""
            grads, skip, new_scale, new_clean = result
            where = (f"step {t} (scale {scale:g}, {clean} clean step{'' if clean == 1 else 's'} so far, "
                     f"growth_interval {interval}, "
                     f"{'an Inf or NaN in the gradients' if overflow else 'all gradients finite'})")
            problems = _scaler_step_problems(scaled, scale, overflow, (grads, skip, new_scale, new_clean),
                                             (expected_grads, expected_skip, expected_scale, expected_clean))
            if problems:
                return [f"{where}:"] + [f"  {p}" for p in problems] + (
                    [f"step{'s 1-' if t > 2 else ' '}{t - 1} {'were' if t > 2 else 'was'} right"] if passed else []), ""
            passed.append(t)
        return [], (f"{len(passed)} steps agree with minivit.GradScaler (two Infs and a NaN skipped, the scale "
                    f"halved after each and doubled after {interval} clean steps)")
    return _run("scaler_update", ("check the gradients for Inf/NaN first; the scale and the counter change "
                                  "differently on an overflow step and on a clean one",
                                  "found = any(not np.isfinite(g).all() for g in grads); grads = [g.astype("
                                  "np.float32) / scale for g in grads]; if found: return grads, True, scale * 0.5, "
                                  "0; clean_steps += 1; if clean_steps == growth_interval: return grads, False, "
                                  "scale * 2, 0; return grads, False, scale, clean_steps"), body)


def _scaler_step_problems(scaled, scale, overflow, got, expected):
    grads, skip, new_scale, new_clean = got
    expected_grads, expected_skip, expected_scale, expected_clean = expected
    problems = []
    if bool(skip) != expected_skip:
        if overflow:
            kinds = {"NaN" if np.isnan(g).any() else "Inf" for g in scaled if not np.isfinite(g).all()}
            problems.append(f"skip is False, but a gradient holds {', '.join(sorted(kinds))}: the step must be "
                            "skipped (its update would write Inf or NaN into the weights)"
                            + (" (np.isinf misses NaN: np.isfinite catches both)" if kinds == {"NaN"} else ""))
        else:
            problems.append("skip is True, but every gradient is finite: skip only on Inf or NaN")
    if not overflow:
        problems += _unscale_problems(grads, scaled, scale, expected_grads)
    if new_scale != expected_scale:
        if overflow and new_scale == scale * 2:
            problems.append(f"the scale grew to {new_scale:g} on an overflow step: an overflow halves it "
                            f"(to {expected_scale:g}), whatever the count of clean steps")
        elif overflow and new_scale == scale:
            problems.append(f"the scale stayed {scale:g} after an overflow: halve it, or the next step "
                            "overflows again")
        elif not overflow and new_scale == scale * 2:
            problems.append(f"the scale doubled after {expected_clean} clean steps; it grows only when the "
                            "count reaches growth_interval (an off-by-one in the comparison?)")
        elif not overflow and new_scale == scale and expected_scale == scale * 2:
            problems.append("this was the growth_interval-th clean step in a row: the scale should double now")
        elif not overflow and new_scale == scale * 0.5:
            problems.append("the scale was halved on a clean step: only an Inf or NaN halves it")
        else:
            problems.append(f"new scale {new_scale!r}, expected {expected_scale:g}")
    if new_clean != expected_clean:
        if overflow:
            problems.append(f"the clean-step count is {new_clean} after an overflow: reset it to 0, so that "
                            "the scale grows only after growth_interval clean steps in a row")
        elif expected_scale == scale * 2:
            problems.append(f"the clean-step count is {new_clean!r} after the scale grew: start counting again "
                            "from 0")
        else:
            problems.append(f"the clean-step count is {new_clean!r}, expected {expected_clean} (one more per "
                            "clean step, 0 after the scale grows or after an overflow)")
    return problems


def _unscale_problems(grads, scaled, scale, expected):
    """What is wrong with the unscaled gradients of a clean step, or []."""
    if not isinstance(grads, (list, tuple)) or len(grads) != len(expected):
        return [f"return the gradients as a list of {len(expected)} arrays, one per input gradient"]
    for i, (g, s, e) in enumerate(zip(grads, scaled, expected)):
        g = _array(g)
        if g.shape != e.shape:
            return [f"gradient {i} has shape {g.shape}, expected {e.shape}"]
        if np.allclose(g, s.astype(np.float32), rtol=1e-6, atol=0):
            return [f"gradient {i} is still the scaled one (S = {scale:g} times too large): divide by the scale "
                    "before the optimizer sees it"]
        if np.allclose(g, e * scale * scale, rtol=1e-3, atol=0):
            return [f"gradient {i} was multiplied by the scale again instead of divided by it"]
        if g.dtype != np.float32:
            flushed = int(((g == 0) & (e != 0)).sum())
            return [f"gradient {i} is {g.dtype}, not float32" + (
                f": dividing by {scale:g} in float16 flushed {flushed} of its {g.size} values to zero again "
                "(convert to float32 first, then divide)" if flushed else
                ": the optimizer works on float32 gradients")]
        line = _compare(f"gradient {i}", g, e, rtol=1e-6, atol=0)
        if line:
            return [line]
    return []


# ------------------------------------------------------------------------------------------------ lesson 27
def reference_ring_allreduce(arrays):
    """Lesson 27's exercise: the ring all-reduce of one 1-D array per rank, simulated (the lesson runs on it while
    the exercise is open). Chunk c of every array is ``np.array_split``'s piece c of N. -> one array per rank,
    each the sum of all of them."""
    n = len(arrays)
    buffers = [np.array(a, copy=True) for a in arrays]
    chunks = np.array_split(np.arange(len(buffers[0])), n)
    for step in range(n - 1):                               # reduce-scatter: after it rank r owns chunk r + 1
        sent = [buffers[r][chunks[(r - step) % n]].copy() for r in range(n)]
        for r in range(n):
            buffers[(r + 1) % n][chunks[(r - step) % n]] += sent[r]
    for step in range(n - 1):                               # all-gather: the finished chunks go round once
        sent = [buffers[r][chunks[(r + 1 - step) % n]].copy() for r in range(n)]
        for r in range(n):
            buffers[(r + 1) % n][chunks[(r + 1 - step) % n]] = sent[r]
    return buffers


def _ranks_in(coefficient, n):
    """The ranks whose arrays a sum holds, read from its coefficient (rank r's array is 2^r x the same base),
    or None when the coefficient is no such sum (a rank counted twice, a mean)."""
    k = int(round(coefficient))
    if abs(coefficient - k) > 1e-9 or not 0 <= k < 2 ** n:
        return None
    return [r for r in range(n) if k >> r & 1]


def check_ring_allreduce(fn):
    """fn(arrays) -> a list with one array per rank, each the element-wise sum of ``arrays`` (a list of N 1-D
    arrays of equal length), computed as a ring all-reduce: N - 1 reduce-scatter steps, N - 1 all-gather steps."""
    def body():
        rng = _rng(27)
        passed = []
        for n, length in [(2, 6), (3, 12), (4, 10), (5, 23), (1, 4)]:
            base = rng.integers(1, 10, length).astype(np.float64)
            arrays = [base * 2.0 ** r for r in range(n)]       # every subset of ranks sums to its own multiple
            expected = sum(arrays)
            given = [a.copy() for a in arrays]
            result = _call(fn, given)
            label = f"{n} ranks, arrays of {length}"
            if not isinstance(result, (list, tuple)) or len(result) != n:
                got = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
                return [f"{label}: return a list of {n} arrays (one per rank), got {got}"], ""
            result = [_array(r).astype(np.float64) for r in result]
            if not all(np.array_equal(g, a) for g, a in zip(given, arrays)):
                return [f"{label}: your function changed the arrays it was given: work on copies (the lesson "
                        "goes on using the gradients it passes in)"], ""
            problems = _ring_problems(result, expected, base, n, length)
            if problems:
                return [f"{label}:"] + [f"  {p}" for p in problems] + (
                    ["passed before it: " + "; ".join(passed)] if passed else []), ""
            passed.append(label)
        return [], f"every rank holds the sum, on {len(passed)} rings (1 to 5 ranks, lengths not divisible by N)"
    return _run("ring_allreduce", ("first pass partial sums round the ring so that each rank completes one chunk "
                                   "(reduce-scatter), then pass the completed chunks round (all-gather)",
                                   "chunks = np.array_split(np.arange(length), N); reduce-scatter, step s = 0..N-2: "
                                   "rank r sends chunk (r - s) % N to rank (r + 1) % N, which adds it; all-gather, "
                                   "step s = 0..N-2: rank r sends chunk (r + 1 - s) % N to rank (r + 1) % N, which "
                                   "stores it"), body)


def _ring_problems(result, expected, base, n, length):
    for r, got in enumerate(result):
        if got.shape != expected.shape:
            return [f"rank {r}'s array has shape {got.shape}, expected {expected.shape}"]
    if all(np.allclose(got, expected, rtol=1e-12, atol=0) for got in result):
        return []
    if all(np.allclose(got, expected / n, rtol=1e-12, atol=0) for got in result):
        return ["every rank holds the mean, not the sum: an all-reduce sums; the weights (1/N, or each shard's "
                "b_r / B) are applied to each rank's gradient before it"]
    chunks = np.array_split(np.arange(length), n)
    lines, finished = [], []
    for r, got in enumerate(result):
        complete = [c for c, idx in enumerate(chunks) if np.allclose(got[idx], expected[idx], rtol=1e-12, atol=0)]
        finished.append(len(complete))
        if len(complete) == n:
            continue
        described = []
        for c in (c for c in range(n) if c not in complete):
            coefficients = got[chunks[c]] / base[chunks[c]]
            ranks = _ranks_in(coefficients[0], n) if np.allclose(coefficients, coefficients[0]) else None
            described.append(f"chunk {c} holds " + (f"the sum of ranks {ranks}" if ranks is not None else
                                                     "values that are no sum of the ranks' own chunk: a piece "
                                                     "of another chunk was added in"))
        lines.append(f"rank {r} has the full sum in chunk(s) {complete if complete else 'none'}; "
                     + "; ".join(described))
    if finished == [1] * n:
        lines.append("each rank has finished exactly one chunk: that is where reduce-scatter ends; the all-gather "
                     "phase (N - 1 more steps passing the finished chunks round the ring) is missing")
    else:
        lines.append("some sums miss a rank or count one twice: at reduce-scatter step s, rank r sends chunk "
                     "(r - s) % N to rank r + 1, which adds it to its own; an off-by-one in the chunk index adds a "
                     "partial sum to the wrong chunk")
    return lines[:3] + lines[-1:] if len(lines) > 4 else lines
