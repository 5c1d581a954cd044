"""Check functions for the lessons' exercises: specific feedback, never just "wrong".

Each ``check_<exercise>(fn)`` calls the learner's function on a few inputs and compares with the engine (or,
for a backward, with central finite differences through ``minivit.gradcheck``). It returns a ``Feedback`` that
prints as a short report: passed; failed with which input, the worst element, expected against got, and a
hint; or "not attempted" when the function still returns None or raises NotImplementedError, so an unsolved
notebook runs on. With the environment variable ``MINIVIT_STRICT_CHECKS=1`` anything but a pass raises
``ExerciseError`` (the lessons' solved runs in CI use it).
"""

import math
import os

import numpy as np

from minivit import backend
from minivit.function import Function
from minivit.gradcheck import gradcheck
from minivit.nn import init as nn_init
from minivit.tensor import Tensor


class ExerciseError(AssertionError):
    """Raised by a check in strict mode when an exercise is not solved."""


class NotAttempted(Exception):
    pass


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
    return backend.asnumpy(value) if backend.is_cupy_array(value) else np.asarray(value)


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


def _run(exercise, hint, body):
    """Run ``body()`` (which returns a list of problem lines, empty when all is well) and wrap it in Feedback."""
    try:
        problems, summary = body()
    except NotAttempted:
        return Feedback(exercise, "not attempted", ["fill in the function (it still returns None); the lesson "
                                                    "goes on with the engine's own version"])
    except Exception as e:  # the learner's code raised: say so, with the message
        return Feedback(exercise, "failed", [f"your function raised {type(e).__name__}: {e}", f"hint: {hint}"])
    if problems:
        return Feedback(exercise, "failed", problems + [f"hint: {hint}"])
    return Feedback(exercise, "passed", [summary])


def _rng(seed=0):
    return np.random.default_rng(seed)


def _gradient_gate(forward, learner_backward, cases, names):
    """Gradient-check the learner's backward, paired with the engine's forward, on each case.

    forward(*arrays) -> y; learner_backward(arrays, y, dy) -> one gradient per checked input (in ``names``).
    Returns (problems, max relative error).
    """
    problems, worst = [], 0.0
    for c, arrays in enumerate(cases):
        class LearnerOp(Function):
            def forward(self, *xs):
                self.xs = xs
                self.y = forward(*xs)
                return self.y

            def backward(self, dy):
                grads = _call(learner_backward, self.xs, self.y, dy)
                grads = grads if isinstance(grads, tuple) else (grads,)
                if len(grads) != len(names):
                    raise ValueError(f"return {len(names)} gradients ({', '.join(names)}), got {len(grads)}")
                grads = tuple(_array(g) for g in grads)
                for name, g, x in zip(names, grads, self.xs):
                    if g.shape != x.shape:
                        raise ValueError(f"the gradient for {name} has shape {g.shape}, expected {x.shape} "
                                         f"(the shape of {name})")
                return grads + (None,) * (len(self.xs) - len(grads))

        report = gradcheck(lambda *ts: LearnerOp.apply(*ts), arrays, names=list(names) + [
            f"const {i}" for i in range(len(arrays) - len(names))], mode="full", seed=c)
        checked = [r for r in report.rows if r.name in names]
        worst = max([worst] + [r.max_rel for r in checked])
        for r in checked:
            if not r.passed:
                problems.append(f"case {c + 1}, d{r.name} {r.shape}: worst at {r.worst_index}: your gradient "
                                f"{r.analytic:+.6g}, finite differences {r.numeric:+.6g} "
                                f"(relative error {r.max_rel:.1e}, {r.verdict})")
    return problems, worst


def _gate(exercise, hint, forward, backward, cases, names):
    def body():
        problems, worst = _gradient_gate(forward, backward, cases, names)
        return problems, (f"matches finite differences on {len(cases)} cases (largest relative error "
                          f"{worst:.1e})")
    return _run(exercise, hint, body)


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
    return _run("accuracy", "compare logits.argmax(axis=1) with the labels and take the mean", body)


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
    return _run("central_difference", "evaluate f on both sides of x and divide by 2h", body)


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
        else:
            position = {i: k for k, i in enumerate(ids)}
            for node in _all_nodes(root):
                for parent in (node._ctx.parents if node._ctx else ()):
                    if parent.requires_grad and position[id(parent)] < position[id(node)]:
                        problems.append("an input comes before a tensor computed from it: walk from the root "
                                        "and append a node only after everything that uses it")
                        break
        return problems, "every tensor once, each before its inputs"
    return _run("topological_order", "a depth-first search that appends a node after its inputs, then reversed",
                body)


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
    return _gate("sigmoid_backward", "dy/dx = y (1 - y): write it with the output y, then multiply by dy",
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
    return _run("relative_error", "divide |a - n| by max(|a| + |n|, 1e-12)", body)


# ------------------------------------------------------------------------------------------------ lesson 4
def check_linear_backward(fn):
    """fn(x (B, in), w (out, in), dy (B, out)) -> (dx, dw, db) for y = x w^T + b."""
    rng = _rng(4)
    cases = [[rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)],
             [rng.standard_normal((2, 6)), rng.standard_normal((2, 6)), rng.standard_normal(2)]]
    return _gate("linear_backward", "dx = dy w, dw = dy^T x, db = dy summed over the batch",
                 lambda x, w, b: x @ w.T + b, lambda xs, y, dy: fn(xs[0], xs[1], dy), cases, ("x", "w", "b"))


# ------------------------------------------------------------------------------------------------ lesson 5
def check_softmax_backward(fn):
    """fn(y, dy) -> dx for y = softmax(x) along the last axis."""
    rng = _rng(5)
    cases = [[rng.standard_normal((3, 5))], [rng.standard_normal((2, 2, 4)) * 3]]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return _gate("softmax_backward", "dx = y * (dy - sum(dy * y, last axis, keepdims=True))", softmax,
                 lambda xs, y, dy: fn(y, dy), cases, ("x",))


def check_cross_entropy_backward(fn):
    """fn(logits (B, K), labels (B,)) -> dlogits of the mean cross-entropy: (softmax(logits) - onehot) / B."""
    rng = _rng(6)
    cases = [[rng.standard_normal((4, 3)), rng.integers(0, 3, 4)], [rng.standard_normal((6, 5)), rng.integers(0, 5, 6)]]

    def loss(x, t):
        shifted = x - x.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        return -logp[np.arange(len(t)), t].mean()
    return _gate("cross_entropy_backward", "softmax(logits), subtract 1 at each label, divide by the batch size",
                 loss, lambda xs, y, dy: _array(_call(fn, xs[0], xs[1])) * dy, cases, ("logits",))


# ------------------------------------------------------------------------------------------------ lesson 6
def check_layer_norm_backward(fn):
    """fn(x (..., D), w (D,), dy, eps) -> (dx, dw, db) for y = (x - mean) / sqrt(var + eps) * w + b."""
    rng = _rng(7)
    cases = [[rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal(6)],
             [rng.standard_normal((2, 3, 5)) * 2 + 1, rng.standard_normal(5), rng.standard_normal(5)]]

    def forward(x, w, b):
        xc = x - x.mean(-1, keepdims=True)
        return xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + 1e-6) * w + b
    return _gate("layer_norm_backward",
                 "with g = dy * w and xhat the normalised x: dx = (g - mean(g) - xhat * mean(g * xhat)) / "
                 "sqrt(var + eps); dw = sum(dy * xhat), db = sum(dy) over all but the last axis",
                 forward, lambda xs, y, dy: fn(xs[0], xs[1], dy, 1e-6), cases, ("x", "w", "b"))


# ------------------------------------------------------------------------------------------------ lesson 7
def check_gelu_backward(fn):
    """fn(x, dy) -> dx for y = x * Phi(x) (exact GELU)."""
    from scipy.special import erf
    rng = _rng(8)
    cases = [[rng.standard_normal((4, 5)) * 2], [np.linspace(-4, 4, 17)]]
    return _gate("gelu_backward", "d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)",
                 lambda x: x * 0.5 * (1 + erf(x / math.sqrt(2))), lambda xs, y, dy: fn(xs[0], dy), cases, ("x",))


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
    return _run("patchify", "reshape to (B, C, H/P, P, W/P, P), move the grid axes forward: transpose(0, 2, 4, 1, "
                "3, 5), then flatten each patch", body)


def check_patchify_backward(fn):
    """fn(dy (B, Np, C*P*P), image_shape (B, C, H, W), P) -> dimages: the gradients put back at their pixels."""
    rng = _rng(10)
    cases = [[rng.standard_normal((2, 1, 4, 4))], [rng.standard_normal((1, 3, 4, 6))]]
    return _gate("patchify_backward", "patchify only moves values: undo its reshape and transpose on dy",
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
    return _gate("attention_backward", "recompute p; dv = p^T dy; dp = dy v^T; ds = p * (dp - rowsum(dp * p)); "
                 "dq = ds k / sqrt(d); dk = ds^T q / sqrt(d)", forward, lambda xs, y, dy: fn(*xs, dy), cases,
                 ("q", "k", "v"))


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
    return _run("split_heads", "reshape to (B, N, 3, nh, hd), then transpose(2, 0, 3, 1, 4)", body)


def check_split_heads_backward(fn):
    """fn(dq, dk, dv) -> dqkv (B, N, 3D): the gradients of the heads put back in qkv's layout."""
    rng = _rng(15)
    nh = 3
    cases = [[rng.standard_normal((2, 5, 3 * nh * 4))], [rng.standard_normal((1, 3, 3 * nh * 2))]]

    def forward(qkv):                                        # (3, B, nh, N, hd): q, k and v stacked
        B, N, three_d = qkv.shape
        return qkv.reshape(B, N, 3, nh, three_d // (3 * nh)).transpose(2, 0, 3, 1, 4)
    return _gate("split_heads_backward", "undo the forward: stack (dq, dk, dv), transpose(1, 3, 0, 2, 4) to (B, N, 3, "
                 "nh, hd), reshape to (B, N, 3D)", forward, lambda xs, y, dy: fn(dy[0], dy[1], dy[2]), cases, ("qkv",))


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
    return _run("sincos_2d", "w_i = 10000^(-i/(D/4)); concatenate sin(row w), cos(row w), sin(col w), cos(col w)",
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
    return _gate("tokens_backward", "the class token and the position embedding were copied to every image: sum their "
                 "gradients over the batch (keepdims); the patches get the rest of dy", forward,
                 lambda xs, y, dy: fn(dy), cases, ("cls", "patches", "pos"))


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
    return _run("adamw_update", "decay p by (1 - lr wd) first; bias-correct m and v with 1 - beta^t", body)


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
    return _run("attention_rollout", "average the heads, A' = (A + I) / 2 renormalised, multiply the layers with "
                "the first one rightmost", body)


# ------------------------------------------------------------------------------------------------ lesson 14
def check_get_array_module(fn):
    """fn(array) -> the module (numpy or cupy) that owns the array."""
    def body():
        problems = []
        if _call(fn, np.zeros(2)) is not np:
            problems.append("a NumPy array should give the numpy module")
        if backend.cuda_available():
            import cupy
            if _call(fn, cupy.zeros(2)) is not cupy:
                problems.append("a CuPy array should give the cupy module")
        return problems, "numpy for NumPy arrays" + (", cupy for CuPy arrays" if backend.cuda_available() else "")
    return _run("get_array_module", "look at type(x).__module__, or use cupy.get_array_module", body)


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
    return _run("softmax_double_backward", "differentiate sum(v * y * (dy - s)), s = sum(dy * y), with respect to y "
                "first (y appears twice: in front and inside s), then pass that back through softmax's backward; "
                "ddy is softmax's backward applied to v", body)


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
