"""Every exercise check: it passes a right answer, fails two or three typical wrong ones with specific feedback,
and reports 'not attempted' for an untouched stub."""

import math

import numpy as np
import pytest
from scipy.special import erf

from minivit.lessons import exercises as ex
from minivit.lessons.exercises import ExerciseError


def stub(*args):
    return None


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ln_parts(x, eps):
    xc = x - x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((xc ** 2).mean(-1, keepdims=True) + eps)
    return xc * rstd, rstd


def ln_backward(x, w, dy, eps):
    xhat, rstd = _ln_parts(x, eps)
    g = dy * w
    lead = tuple(range(x.ndim - 1))
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(lead), dy.sum(lead)


def attn_backward(q, k, v, dy, scale_fix=True, mean_fix=True):
    d = q.shape[-1]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(d)
    p = _softmax(s)
    dv = p.swapaxes(-1, -2) @ dy
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) if mean_fix else p * dp
    ds = ds / math.sqrt(d) if scale_fix else ds
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def adamw(p, g, m, v, t, lr, betas, eps, wd, decay_first=True, correct=True):
    b1, b2 = betas
    if decay_first:
        p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if correct else (m, v)
    p = p - lr * mh / (np.sqrt(vh) + eps)
    if not decay_first:
        p = p - lr * wd * p
    return p, m, v


def rollout(layers, residual=True):
    out = None
    for a in layers:
        a = a.mean(1)
        if residual:
            a = 0.5 * (a + np.eye(a.shape[-1]))
            a = a / a.sum(-1, keepdims=True)
        out = a if out is None else a @ out
    return out


def topo(root):
    order, seen = [], set()

    def visit(t):
        if id(t) in seen:
            return
        seen.add(id(t))
        if t._ctx is not None:
            for p in t._ctx.parents:
                if p.requires_grad:
                    visit(p)
        order.append(t)
    visit(root)
    return order[::-1]


def sincos(D, grid):
    gh, gw = grid
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    w = 10000.0 ** (-np.arange(D // 4) / (D // 4))
    r, c = r.reshape(-1, 1) * w, c.reshape(-1, 1) * w
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], 1)


def patchify(x, P):
    B, C, H, W = x.shape
    return x.reshape(B, C, H // P, P, W // P, P).transpose(0, 2, 4, 1, 3, 5).reshape(B, -1, C * P * P)


def patchify_back(dy, shape, P):
    B, C, H, W = shape
    return dy.reshape(B, H // P, W // P, C, P, P).transpose(0, 3, 1, 4, 2, 5).reshape(shape)


def merge(dq, dk, dv):
    g = np.stack([dq, dk, dv])                               # (3, B, nh, N, hd)
    B, N = g.shape[1], g.shape[3]
    return g.transpose(1, 3, 0, 2, 4).reshape(B, N, -1)


def tokens_back(dy):
    return dy[:, :1].sum(0, keepdims=True), dy[:, 1:], dy.sum(0, keepdims=True)


def rms_backward(x, w, dy, eps):
    r = 1 / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    xhat, g = x * r, dy * w
    return r * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(tuple(range(x.ndim - 1)))


def log_softmax_back(logp, dy):
    return dy - np.exp(logp) * dy.sum(-1, keepdims=True)


def smoothed_ce(x, t, smoothing):
    K = x.shape[1]
    return (_softmax(x) - ((1 - smoothing) * np.eye(K)[t] + smoothing / K)) / len(t)


C = math.sqrt(2 / math.pi)


def gelu_tanh_back(x, dy, inner=True, product=True):
    t = np.tanh(C * (x + 0.044715 * x ** 3))
    du = C * (1 + 3 * 0.044715 * x ** 2) if inner else C
    return dy * (0.5 * (1 + t) + (0.5 * x * (1 - t * t) * du if product else 0))


def causal_attn_backward(q, k, v, dy, mask=True, rowsum=True, scale_fix=True):
    d = q.shape[-1]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(d)
    if mask:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    p = _softmax(s)
    dv = p.swapaxes(-1, -2) @ dy
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) if rowsum else p * dp
    ds = ds / math.sqrt(d) if scale_fix else ds
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def engine_block(changes=None, drop=()):
    """The engine's block gradients with some of them replaced (changes: {key: fn(grads) -> array}) or dropped."""
    def backward(x, params, dy, nh):
        grads = ex.block_gradients(x, params, dy, nh)
        grads.update({key: change(grads) for key, change in (changes or {}).items()})
        return {k: v for k, v in grads.items() if k not in drop}
    return backward


EXERCISES = {
    # name: (check, right answer, [wrong answers])
    "accuracy": (ex.check_accuracy, lambda lo, la: (lo.argmax(1) == la).mean(),
                 [lambda lo, la: (lo.argmin(1) == la).mean(), lambda lo, la: (lo.argmax(0)[:len(la)] == la).mean()]),
    "central_difference": (ex.check_central_difference, lambda f, x, h: (f(x + h) - f(x - h)) / (2 * h),
                           [lambda f, x, h: (f(x + h) - f(x)) / h, lambda f, x, h: (f(x + h) - f(x - h)) / h]),
    "topological_order": (ex.check_topological_order, topo,
                          [lambda root: topo(root)[::-1], lambda root: topo(root)[:-1]]),
    "sigmoid_backward": (ex.check_sigmoid_backward, lambda y, dy: dy * y * (1 - y),
                         [lambda y, dy: dy * y, lambda y, dy: dy * (1 - y), lambda y, dy: y * (1 - y)]),
    "split_heads_backward": (ex.check_split_heads_backward, merge,
                             [lambda dq, dk, dv: np.stack([dq, dk, dv]).reshape(dq.shape[0], dq.shape[2], -1),
                              lambda dq, dk, dv: np.stack([dq, dk, dv]).transpose(1, 3, 2, 0, 4).reshape(
                                  dq.shape[0], dq.shape[2], -1)]),
    "tokens_backward": (ex.check_tokens_backward, tokens_back,
                        [lambda dy: (dy[:1, :1], dy[:, 1:], dy.sum(0, keepdims=True)),
                         lambda dy: (dy[:, :1].sum(0, keepdims=True), dy[:, 1:], dy[:1]),
                         lambda dy: (dy[:, :1].mean(0, keepdims=True), dy[:, 1:], dy.sum(0, keepdims=True))]),
    "relative_error": (ex.check_relative_error, lambda a, n: np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), 1e-12),
                       [lambda a, n: np.abs(a - n) / (np.abs(a) + np.abs(n)), lambda a, n: np.abs(a - n) / np.abs(n)]),
    "linear_backward": (ex.check_linear_backward, lambda x, w, dy: (dy @ w, dy.T @ x, dy.sum(0)),
                        [lambda x, w, dy: (dy @ w, x.T @ dy, dy.sum(0)),
                         lambda x, w, dy: (dy @ w, dy.T @ x, dy.mean(0)),
                         lambda x, w, dy: (dy @ w.T, dy.T @ x, dy.sum(0))]),
    "softmax_backward": (ex.check_softmax_backward, lambda y, dy: y * (dy - (dy * y).sum(-1, keepdims=True)),
                         [lambda y, dy: y * dy, lambda y, dy: y * (1 - y) * dy,
                          lambda y, dy: y * (dy - (dy * y).sum())]),
    "cross_entropy_backward": (
        ex.check_cross_entropy_backward,
        lambda x, t: (_softmax(x) - np.eye(x.shape[1])[t]) / len(t),
        [lambda x, t: _softmax(x) - np.eye(x.shape[1])[t], lambda x, t: (_softmax(x) - 1) / len(t),
         lambda x, t: (np.eye(x.shape[1])[t] - _softmax(x)) / len(t)]),
    "layer_norm_backward": (ex.check_layer_norm_backward, ln_backward,
                            [lambda x, w, dy, eps: (dy * w * _ln_parts(x, eps)[1],) + ln_backward(x, w, dy, eps)[1:],
                             lambda x, w, dy, eps: ln_backward(x, w, dy, eps)[:2] + (dy.mean(tuple(range(x.ndim - 1))),),
                             lambda x, w, dy, eps: ln_backward(x, np.ones_like(w), dy, eps)]),
    "gelu_backward": (ex.check_gelu_backward,
                      lambda x, dy: dy * (0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
                      [lambda x, dy: dy * 0.5 * (1 + erf(x / math.sqrt(2))),
                       lambda x, dy: dy * (0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2))]),
    "patchify": (ex.check_patchify, patchify,
                 [lambda x, P: x.reshape(x.shape[0], -1, x.shape[1] * P * P),
                  lambda x, P: patchify(x.transpose(0, 1, 3, 2), P)]),
    "patchify_backward": (ex.check_patchify_backward, patchify_back,
                          [lambda dy, shape, P: dy.reshape(shape),
                           lambda dy, shape, P: patchify_back(dy, shape, P).transpose(0, 1, 3, 2).reshape(shape)]),
    "attention_backward": (ex.check_attention_backward, attn_backward,
                           [lambda q, k, v, dy: attn_backward(q, k, v, dy, scale_fix=False),
                            lambda q, k, v, dy: attn_backward(q, k, v, dy, mean_fix=False),
                            lambda q, k, v, dy: attn_backward(q, k, v, dy)[::-1]]),
    "split_heads": (ex.check_split_heads,
                    lambda qkv, nh: tuple(qkv.reshape(qkv.shape[0], qkv.shape[1], 3, nh, -1).transpose(2, 0, 3, 1, 4)),
                    [lambda qkv, nh: tuple(qkv.reshape(qkv.shape[0], qkv.shape[1], nh, 3, -1).transpose(3, 0, 2, 1, 4)),
                     lambda qkv, nh: tuple(qkv.reshape(qkv.shape[0], qkv.shape[1], 3, nh, -1).transpose(2, 0, 1, 3, 4))]),
    "sincos_2d": (ex.check_sincos_2d, sincos,
                  [lambda D, g: sincos(D, g[::-1]), lambda D, g: np.concatenate([np.sin(sincos(D, g)[:, :D // 2]),
                                                                                  sincos(D, g)[:, D // 2:]], 1)]),
    "adamw_update": (ex.check_adamw_update, adamw,
                     [lambda *a: adamw(*a, decay_first=False), lambda *a: adamw(*a, correct=False)]),
    "attention_rollout": (ex.check_attention_rollout, rollout,
                          [lambda layers: rollout(layers, residual=False), lambda layers: rollout(layers[::-1])]),
    "get_array_module": (ex.check_get_array_module, lambda x: np, [lambda x: math, lambda x: type(x)]),
    "layer_scale_backward": (ex.check_layer_scale_backward, lambda x, g, dy: (dy * g, (dy * x).sum((0, 1))),
                             [lambda x, g, dy: (dy * g, (dy * x).sum(0)), lambda x, g, dy: (dy, (dy * x).sum((0, 1)))]),
    "log_softmax_backward": (ex.check_log_softmax_backward, log_softmax_back,
                             [lambda lp, dy: dy, lambda lp, dy: dy - np.exp(lp) * dy.sum()]),
    "smoothed_cross_entropy_backward": (ex.check_smoothed_cross_entropy_backward, smoothed_ce,
                                        [lambda x, t, s: smoothed_ce(x, t, 0.0), lambda x, t, s: smoothed_ce(x, t, s) * len(t)]),
    "rms_norm_backward": (ex.check_rms_norm_backward, rms_backward,
                          [lambda x, w, dy, eps: (dy * w / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps),
                                                  rms_backward(x, w, dy, eps)[1]),
                           lambda x, w, dy, eps: ln_backward(x, w, dy, eps)[:2]]),
    "gelu_tanh_backward": (ex.check_gelu_tanh_backward, gelu_tanh_back,
                           [lambda x, dy: gelu_tanh_back(x, dy, inner=False),
                            lambda x, dy: gelu_tanh_back(x, dy, product=False)]),
    "momentum_update": (ex.check_momentum_update, lambda p, g, b, lr, mu: (p - lr * (mu * b + g), mu * b + g),
                        [lambda p, g, b, lr, mu: (p - lr * g, mu * b + g),
                         lambda p, g, b, lr, mu: (p - lr * (mu * b + (1 - mu) * g), mu * b + (1 - mu) * g)]),
    "rmsprop_update": (ex.check_rmsprop_update,
                       lambda p, g, s, lr, a, eps: (p - lr * g / (np.sqrt(a * s + (1 - a) * g * g) + eps),
                                                    a * s + (1 - a) * g * g),
                       [lambda p, g, s, lr, a, eps: (p - lr * g / (a * s + (1 - a) * g * g + eps), a * s + (1 - a) * g * g),
                        lambda p, g, s, lr, a, eps: (p - lr * g / (np.sqrt(s) + eps), a * s + (1 - a) * g * g)]),
    "adam_update": (ex.check_adam_update, lambda p, g, m, v, t, lr, b, eps: adamw(p, g, m, v, t, lr, b, eps, 0.0),
                    [lambda p, g, m, v, t, lr, b, eps: adamw(p, g, m, v, t, lr, b, eps, 0.0, correct=False),
                     lambda p, g, m, v, t, lr, b, eps: adamw(p, g, m, v, t, lr, b, eps, 0.1)]),
    "integrated_gradients": (ex.check_integrated_gradients, ex.reference_integrated_gradients,
                             [lambda gf, x, b, n: sum(gf(b + (k + 0.5) / n * (x - b)) for k in range(n)) / n,
                              lambda gf, x, b, n: (x - b) * sum(gf(b + k / n * (x - b)) for k in range(n)) / n,
                              lambda gf, x, b, n: (x - b) * gf(x)]),
    "update_ratio": (ex.check_update_ratio, lambda b, a: np.log10(np.std(a - b) / np.std(b)),
                     [lambda b, a: np.std(a - b) / np.std(b), lambda b, a: np.log10(np.std(b) / np.std(a - b)),
                      lambda b, a: np.log10(np.std(a - b) / np.std(a))]),
    "block_backward": (ex.check_block_backward, engine_block(),
                       [engine_block({"dx1": lambda g: g["dx1"] - g["dm"]}), engine_block(drop=("dx",))]),
    "causal_attention_backward": (ex.check_causal_attention_backward, causal_attn_backward,
                                  [lambda q, k, v, dy: causal_attn_backward(q, k, v, dy, mask=False),
                                   lambda q, k, v, dy: causal_attn_backward(q, k, v, dy, scale_fix=False)]),
}


@pytest.mark.parametrize("name", EXERCISES)
def test_right_answer_passes(name):
    check, right, _ = EXERCISES[name]
    feedback = check(right)
    assert feedback.passed, str(feedback)
    assert "[PASSED]" in str(feedback)


@pytest.mark.parametrize("name", EXERCISES)
def test_wrong_answers_fail_with_specific_feedback(name):
    check, _, wrongs = EXERCISES[name]
    assert len(wrongs) >= 2
    for wrong in wrongs:
        feedback = check(wrong)
        assert feedback.status == "failed", f"{name}: a wrong answer passed:\n{feedback}"
        text = str(feedback)
        assert "[FAILED]" in text and "hint:" in text


@pytest.mark.parametrize("name", EXERCISES)
def test_a_stub_is_not_attempted_and_strict_mode_raises(name, monkeypatch):
    check = EXERCISES[name][0]
    assert check(stub).status == "not attempted"
    monkeypatch.setenv("MINIVIT_STRICT_CHECKS", "1")
    with pytest.raises(ExerciseError, match=name):
        check(stub)


def test_every_check_is_exercised_here():
    checks = {n[len("check_"):] for n in dir(ex) if n.startswith("check_")}
    assert checks == set(EXERCISES)


def test_gradient_feedback_names_the_input_and_the_worst_element():
    text = str(ex.check_linear_backward(EXERCISES["linear_backward"][2][1]))
    assert "case 1, db (4,): 4 of 4 elements wrong; worst at (" in text
    assert "your gradient" in text and "finite differences" in text


def test_a_gradient_of_the_wrong_shape_is_explained():
    text = str(ex.check_linear_backward(lambda x, w, dy: (dy @ w, dy.T @ x, dy.sum())))
    assert "the gradient for b has shape () , expected (4,)".replace(" ,", ",") in text


def test_a_forward_difference_gets_its_own_hint():
    text = str(ex.check_central_difference(lambda f, x, h: (f(x + h) - f(x)) / h))
    assert "forward difference" in text


# The typical mistakes of each backward, planted: (what was done wrong, the wrong answer, words the feedback must use)
def _ce(x, t):
    return (_softmax(x) - np.eye(x.shape[1])[t]) / len(t)


def _gelu_grad(x):
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _softmax_grad(y, dy):
    return y * (dy - (dy * y).sum(-1, keepdims=True))


PLANTED = {
    "sigmoid_backward": [
        ("sign", lambda y, dy: -dy * y * (1 - y), "opposite sign: a sign flip"),
        ("factor", lambda y, dy: 2 * dy * y * (1 - y), "2.00x the expected everywhere"),
        ("missing term", lambda y, dy: dy * y, "elements wrong")],
    "linear_backward": [
        ("transpose", lambda x, w, dy: (dy @ w, x.T @ dy, dy.sum(0)), "dw has shape (3, 4), expected (4, 3): it is "
                                                                       "the expected gradient transposed"),
        ("sign", lambda x, w, dy: (-(dy @ w), dy.T @ x, dy.sum(0)), "dx has the right size everywhere but the "
                                                                     "opposite sign"),
        ("factor", lambda x, w, dy: (dy @ w, dy.T @ x, dy.mean(0)), "0.20x the expected everywhere: an extra 1/B"),
        ("order", lambda x, w, dy: (dy.T @ x, dy @ w, dy.sum(0)), "what you return as dx is dw")],
    "softmax_backward": [
        ("missing term", lambda y, dy: y * dy, "sums to zero along each row"),
        ("sign", lambda y, dy: -_softmax_grad(y, dy), "opposite sign"),
        ("factor", lambda y, dy: 0.5 * _softmax_grad(y, dy), "0.50x the expected everywhere")],
    "cross_entropy_backward": [
        ("factor", lambda x, t: _ce(x, t) * len(t), "4.00x the expected everywhere: a missing 1/B?"),
        ("sign", lambda x, t: -_ce(x, t), "a sign flip"),
        ("missing term", lambda x, t: _softmax(x) / len(t), "each row of the gradient sums to zero")],
    "layer_norm_backward": [
        ("missing term", lambda x, w, dy, eps: (dy * w * _ln_parts(x, eps)[1],) + ln_backward(x, w, dy, eps)[1:],
         "dx sums to zero along each row"),
        ("missing term", lambda x, w, dy, eps: (_ln_parts(x, eps)[1] * (dy * w - (dy * w).mean(-1, keepdims=True)),)
         + ln_backward(x, w, dy, eps)[1:], "dx is orthogonal to x_hat along each row"),
        ("factor", lambda x, w, dy, eps: ln_backward(x, w, dy, eps)[:2] + (dy.mean(tuple(range(x.ndim - 1))),),
         "0.25x the expected everywhere"),
        ("sign", lambda x, w, dy, eps: (ln_backward(x, w, dy, eps)[0], -ln_backward(x, w, dy, eps)[1],
                                        ln_backward(x, w, dy, eps)[2]), "dw has the right size everywhere but the "
                                                                        "opposite sign"),
        ("missing factor w", lambda x, w, dy, eps: ln_backward(x, np.ones_like(w), dy, eps)[:1]
         + ln_backward(x, w, dy, eps)[1:], "if w were all ones")],
    "gelu_backward": [
        ("missing term", lambda x, dy: dy * 0.5 * (1 + erf(x / math.sqrt(2))), "second term, x phi(x), is missing"),
        ("sign", lambda x, dy: -dy * _gelu_grad(x), "a sign flip"),
        ("factor", lambda x, dy: 3 * dy * _gelu_grad(x), "3.00x the expected everywhere")],
    "patchify_backward": [
        ("transpose", lambda dy, shape, P: patchify_back(dy, shape, P).swapaxes(-1, -2),
         "right numbers in the wrong places: it is the expected gradient transposed"),
        ("axis order", lambda dy, shape, P: dy.reshape(shape), "right numbers in the wrong places"),
        ("sign", lambda dy, shape, P: -patchify_back(dy, shape, P), "a sign flip"),
        ("factor", lambda dy, shape, P: patchify_back(dy, shape, P) * P * P, "4.00x the expected everywhere")],
    "attention_backward": [
        ("factor", lambda q, k, v, dy: attn_backward(q, k, v, dy, scale_fix=False), "2.00x the expected "
                                                                                  "everywhere: a missing 1/sqrt(d)?"),
        ("missing term", lambda q, k, v, dy: attn_backward(q, k, v, dy, mean_fix=False), "dk sums to zero over the "
                                                                                       "keys"),
        ("missing term", lambda q, k, v, dy: attn_backward(q, k, v, dy, mean_fix=False), "lacks its second term"),
        ("transpose", lambda q, k, v, dy: attn_backward(q, k, v, dy)[:2] + (
            attn_backward(q, k, v, dy)[2].swapaxes(-1, -2),), "dv has shape (2, 5), expected (5, 2): it is the "
                                                               "expected gradient transposed"),
        ("sign", lambda q, k, v, dy: (-attn_backward(q, k, v, dy)[0],) + attn_backward(q, k, v, dy)[1:],
         "dq has the right size everywhere but the opposite sign"),
        ("order", lambda q, k, v, dy: attn_backward(q, k, v, dy)[::-1], "return the gradients in the order dq, dk, "
                                                                        "dv")],
    "split_heads_backward": [
        ("axis order", lambda dq, dk, dv: np.stack([dq, dk, dv]).reshape(dq.shape[0], dq.shape[2], -1),
         "right numbers in the wrong places"),
        ("sign", lambda dq, dk, dv: -merge(dq, dk, dv), "a sign flip"),
        ("factor", lambda dq, dk, dv: merge(dq, dk, dv) / 3, "0.33x the expected everywhere")],
    "tokens_backward": [
        ("factor", lambda dy: (dy[:, :1].mean(0, keepdims=True), dy[:, 1:], dy.sum(0, keepdims=True)),
         "dcls is 0.33x the expected everywhere: an extra 1/B"),
        ("missing terms", lambda dy: (dy[:1, :1], dy[:, 1:], dy.sum(0, keepdims=True)),
         "gradient of the first image only"),
        ("sign", lambda dy: (dy[:, :1].sum(0, keepdims=True), -dy[:, 1:], dy.sum(0, keepdims=True)),
         "dpatches has the right size everywhere but the opposite sign"),
        ("missing terms", lambda dy: tokens_back(dy)[:2] + (dy[:1],), "dpos is the gradient of the first image")],
    "layer_scale_backward": [
        ("missing sum", lambda x, g, dy: (dy * g, (dy * x).sum(0)), "the gradient for gamma has shape (3, 4), "
                                                                     "expected (4,)"),
        ("factor", lambda x, g, dy: (dy * g, (dy * x).mean((0, 1))), "an extra 1/(B N)"),
        ("sign", lambda x, g, dy: (-dy * g, (dy * x).sum((0, 1))), "dx has the right size everywhere but the "
                                                                    "opposite sign"),
        ("missing factor", lambda x, g, dy: (dy, (dy * x).sum((0, 1))), "dx (2, 3, 4): 24 of 24 elements wrong")],
    "log_softmax_backward": [
        ("missing term", lambda lp, dy: dy, "sums to zero along each row"),
        ("wrong op", lambda lp, dy: _softmax_grad(np.exp(lp), dy), "softmax's backward applied to dy"),
        ("sign", lambda lp, dy: -log_softmax_back(lp, dy), "a sign flip"),
        ("factor", lambda lp, dy: 2 * log_softmax_back(lp, dy), "2.00x the expected everywhere")],
    "smoothed_cross_entropy_backward": [
        ("missing smoothing", lambda x, t, s: smoothed_ce(x, t, 0.0), "the gradient without smoothing"),
        ("factor", lambda x, t, s: smoothed_ce(x, t, s) * len(t), "4.00x the expected everywhere: a missing 1/B?"),
        ("sign", lambda x, t, s: -smoothed_ce(x, t, s), "a sign flip"),
        ("missing term", lambda x, t, s: _softmax(x) / len(t), "each row of the gradient sums to zero")],
    "rms_norm_backward": [
        ("missing term", lambda x, w, dy, eps: (dy * w / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps),
                                                rms_backward(x, w, dy, eps)[1]), "orthogonal to x along each row"),
        ("missing factor w", lambda x, w, dy, eps: (rms_backward(x, np.ones_like(w), dy, eps)[0],
                                                    rms_backward(x, w, dy, eps)[1]), "if w were all ones"),
        ("factor", lambda x, w, dy, eps: (rms_backward(x, w, dy, eps)[0], rms_backward(x, w, dy, eps)[1] / 4),
         "0.25x the expected everywhere"),
        ("sign", lambda x, w, dy, eps: (-rms_backward(x, w, dy, eps)[0], rms_backward(x, w, dy, eps)[1]),
         "a sign flip")],
    "gelu_tanh_backward": [
        ("missing term", lambda x, dy: gelu_tanh_back(x, dy, product=False), "product rule's second term"),
        ("missing factor", lambda x, dy: gelu_tanh_back(x, dy, inner=False), "misses its polynomial part"),
        ("sign", lambda x, dy: -gelu_tanh_back(x, dy), "a sign flip"),
        ("factor", lambda x, dy: 0.5 * gelu_tanh_back(x, dy), "0.50x the expected everywhere")],
    "causal_attention_backward": [
        ("missing mask", lambda q, k, v, dy: causal_attn_backward(q, k, v, dy, mask=False), "without the mask"),
        ("factor", lambda q, k, v, dy: causal_attn_backward(q, k, v, dy, scale_fix=False),
         "x the expected everywhere: a missing 1/sqrt(d)?"),
        ("missing term", lambda q, k, v, dy: causal_attn_backward(q, k, v, dy, rowsum=False), "dk sums to zero "
                                                                                               "over the keys"),
        ("sign", lambda q, k, v, dy: causal_attn_backward(q, k, v, dy)[:2] + (-causal_attn_backward(q, k, v, dy)[2],),
         "dv has the right size everywhere but the opposite sign"),
        ("order", lambda q, k, v, dy: causal_attn_backward(q, k, v, dy)[::-1], "return the gradients in the order")],
    "block_backward": [
        ("missing term", engine_block({"dx1": lambda g: g["dx1"] - g["dm"]}),
         "the first wrong gradient is dx1; dh2 is right, so the mistake is in the backward of: h2 = norm2(x1) (and "
         "x1 also receives dy directly)"),
        ("sign", engine_block({"df1": lambda g: -g["df1"]}), "df1                    WRONG: df1 has the right size "
                                                             "everywhere but the opposite sign"),
        ("factor", engine_block({"dqkv": lambda g: 2 * g["dqkv"]}), "dqkv is 2.00x the expected everywhere"),
        ("transpose", engine_block({"dattn.proj.weight": lambda g: g["dattn.proj.weight"].T}),
         "the intermediate gradients are right but dattn.proj.weight is not"),
        ("missing factor", engine_block({"dmlp.fc1.bias": lambda g: g["dmlp.fc1.bias"] / 10}),
         "an extra 1/(B N)"),
        ("missing gradient", engine_block(drop=("dnorm2.weight",)), "missing from your dict: dnorm2.weight")],
}


@pytest.mark.parametrize("name", PLANTED)
def test_each_planted_mistake_gets_its_diagnosis(name):
    check = EXERCISES[name][0]
    for what, wrong, words in PLANTED[name]:
        text = str(check(wrong))
        assert "your function raised" not in text, f"{name}: the planted mistake ({what}) raised:\n{text}"
        assert "[FAILED]" in text, f"{name}: the planted mistake ({what}) passed"
        assert words in text, f"{name}: the planted mistake ({what}) was not named {words!r}:\n{text}"


def test_every_backward_exercise_has_planted_mistakes():
    # the double backward of lesson 15 has its own planted slips (test_softmax_double_backward_names_the_slip)
    backward = {name for name in EXERCISES if name.endswith("_backward") and name != "softmax_double_backward"}
    assert backward == set(PLANTED)
    for name, planted in PLANTED.items():
        kinds = {what for what, _, _ in planted}
        assert "sign" in kinds and kinds & {"factor", "missing factor w"}, name


def test_the_diagnosis_of_a_ratio_names_the_forgotten_constant():
    grad = np.random.default_rng(0).standard_normal((3, 4))
    assert "4.00x the expected everywhere: a missing 1/B?" in ex.diagnose("x", 4 * grad, grad, [(4, "B")])
    assert "an extra 1/B" in ex.diagnose("x", grad / 4, grad, [(4, "B")])
    assert ex.diagnose("x", grad + 0.1 * grad ** 2, grad) is None      # no pattern: nothing is claimed


def test_a_reversed_topological_order_is_named():
    text = str(ex.check_topological_order(lambda root: topo(root)[::-1]))
    assert "your order is reversed" in text


def test_when_the_learner_code_raises_the_feedback_shows_their_line_and_what_passed():
    def backward(x, w, dy):
        if x.shape[0] == 2:                                   # the second case only
            return dy @ w, dy.T @ x, dy.sum(axis=1)[None]     # a deliberate mistake in the shape arithmetic
        return dy @ w, dy.T @ x, dy.sum(0)

    text = str(ex.check_linear_backward(backward))
    assert "case 2, db (2,): the gradient for b has shape (1, 2), expected (2,)" in text
    assert "case 2: dx, dw right" in text and "cases passed: 1" in text
    calls = []

    def raising(x, w, dy):
        calls.append(1)
        if len(calls) > 1:
            dw = dy @ x.T                                      # raises: (B, out) @ (in, B)
        return dy @ w, dy.T @ x, dy.sum(0)

    text = str(ex.check_linear_backward(raising))
    assert "your function raised ValueError" in text
    assert "dw = dy @ x.T" in text and "of your code (raising)" in text
    assert "cases passed before it: 1" in text


def test_hints_come_in_steps():
    feedback = ex.check_softmax_backward(lambda y, dy: y * dy)
    text = str(feedback)
    nudge, formula = ex.HINTS["softmax_backward"]
    assert f"hint: {nudge}" in text and formula not in text and ".hint(2)" in text
    assert formula in feedback.hint(2) and formula in ex.hint("softmax_backward", 2)
    assert nudge in ex.hint("softmax_backward", 1) and formula not in ex.hint("softmax_backward", 1)
    with pytest.raises(ValueError, match="no exercise named"):
        ex.hint("no_such_exercise")


def test_the_update_rule_references_agree_with_minivit_optim():
    from minivit import optim
    from minivit.nn import Parameter
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(4)
    for make, reference, state in (
            (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9), lambda p, g, s, t: ex.reference_rule("momentum_update")(
                p, g, s[0], 0.1, 0.9), [np.zeros(4)]),
            (lambda ps: optim.AdamW(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
             lambda p, g, s, t: ex.reference_rule("adam_update")(p, g, s[0], s[1], t, 0.01, (0.9, 0.999), 1e-8),
             [np.zeros(4), np.zeros(4)])):
        param = Parameter(p0.copy())
        opt, p = make([param]), p0.copy()
        for t in range(1, 4):
            g = rng.standard_normal(4)
            param.grad = g.copy()
            opt.step()
            p, *state = reference(p, g, state, t)
            assert np.allclose(p, param.data, rtol=1e-12, atol=1e-14)


def test_an_update_rule_mistake_is_named():
    def damped(p, g, buf, lr, momentum):
        buf = momentum * buf + (1 - momentum) * g
        return p - lr * buf, buf

    assert "an average of the gradients" in str(ex.check_momentum_update(damped))

    def uncorrected(p, g, m, v, t, lr, betas, eps):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        return p - lr * m / (np.sqrt(v) + eps), m, v

    assert "not bias-corrected" in str(ex.check_adam_update(uncorrected))


def test_integrated_gradients_mistakes_are_named():
    text = str(ex.check_integrated_gradients(lambda gf, x, b, n: sum(gf(b + (k + 0.5) / n * (x - b))
                                                                     for k in range(n)) / n))
    assert "the mean gradient alone: multiply by (x - baseline)" in text
    text = str(ex.check_integrated_gradients(lambda gf, x, b, n: (x - b) * sum(gf(b + k / n * (x - b))
                                                                               for k in range(n)) / n))
    assert "the left ends of the intervals" in text


def test_update_ratio_mistakes_are_named():
    assert "take its log10" in str(ex.check_update_ratio(lambda b, a: np.std(a - b) / np.std(b)))
    assert "upside down" in str(ex.check_update_ratio(lambda b, a: np.log10(np.std(b) / np.std(a - b))))
    assert "divide by std(after)" in str(ex.check_update_ratio(lambda b, a: np.log10(np.std(a - b) / np.std(a))))


# ------------------------------------------------------------------------------------------------ lesson 15
def softmax_double_backward(y, dy, v, slip=None):
    """(dx, ddy) of sum(v * y * (dy - sum(dy * y))), y = softmax(x); ``slip`` plants one typical mistake."""
    s, r = (dy * y).sum(-1, keepdims=True), (v * y).sum(-1, keepdims=True)
    gy = {"missing s term": v * (dy - s), "sign": v * (dy - s) + dy * r,
          "missing front term": v * dy - dy * r}.get(slip, v * (dy - s) - dy * r)
    dx = y * (gy - (gy * y).sum(-1, keepdims=True))
    if slip == "constant y":
        dx = np.zeros_like(y)
    if slip == "no chain":
        dx = gy
    ddy = v * y if slip == "ddy without sum" else y * (v - r)
    return dx, ddy


SOFTMAX_DOUBLE_BACKWARD_SLIPS = {               # planted slip: words its feedback must contain
    "missing s term": "misses the term from s = sum(dy * y)",
    "sign": "sign error",
    "missing front term": "misses the term from the y in front",
    "constant y": "y was treated as a constant",
    "no chain": "pass it back through softmax's backward",
    "ddy without sum": "ddy misses the sum",
}

# Added to the table after the parametrized tests above: they read EXERCISES when pytest collects them.
EXERCISES["softmax_double_backward"] = (
    ex.check_softmax_double_backward, softmax_double_backward,
    [lambda y, dy, v, slip=slip: softmax_double_backward(y, dy, v, slip) for slip in SOFTMAX_DOUBLE_BACKWARD_SLIPS])


@pytest.mark.parametrize("slip", SOFTMAX_DOUBLE_BACKWARD_SLIPS)
def test_softmax_double_backward_names_the_slip(slip):
    feedback = ex.check_softmax_double_backward(lambda y, dy, v: softmax_double_backward(y, dy, v, slip))
    text = str(feedback)
    assert feedback.status == "failed" and SOFTMAX_DOUBLE_BACKWARD_SLIPS[slip] in text, text
    assert "against the engine's double backward" in text and "finite differences" in text


def test_softmax_double_backward_passes_tensors_and_explains_a_missing_gradient():
    from minivit import Tensor
    assert ex.check_softmax_double_backward(
        lambda y, dy, v: tuple(Tensor(g) for g in softmax_double_backward(y, dy, v))).passed
    text = str(ex.check_softmax_double_backward(lambda y, dy, v: softmax_double_backward(y, dy, v)[0]))
    assert "return 2 gradients (dx, ddy), got 1" in text


# ------------------------------------------------------------------------------------------------ lesson 20
def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def discriminator_loss_backward(real, fake, slip=None):
    """(dreal, dfake) of L_D = -mean(log sigmoid(real)) - mean(log(1 - sigmoid(fake))); ``slip`` plants a mistake."""
    dreal, dfake = (_sigmoid(real) - 1) / len(real), _sigmoid(fake) / len(fake)
    if slip == "sign":
        return -dreal, -dfake
    if slip == "factor":
        return dreal * len(real), dfake * len(fake)
    if slip == "sigmoid for real":
        return _sigmoid(real) / len(real), dfake
    if slip == "probabilities":
        return -1 / (len(real) * _sigmoid(real)), 1 / (len(fake) * (1 - _sigmoid(fake)))
    return dreal, dfake


DISCRIMINATOR_LOSS_SLIPS = {            # planted slip: words its feedback must contain
    "sign": "opposite sign: a sign flip",
    "factor": "a missing 1/B_real?",
    "sigmoid for real": "dreal is sigmoid(l) / B, the fake term's gradient",
    "probabilities": "the gradient with respect to the probabilities D = sigmoid(l)",
}

EXERCISES["discriminator_loss_backward"] = (
    ex.check_discriminator_loss_backward, discriminator_loss_backward,
    [lambda r, f, slip=slip: discriminator_loss_backward(r, f, slip) for slip in DISCRIMINATOR_LOSS_SLIPS])
PLANTED["discriminator_loss_backward"] = [
    (slip, lambda r, f, slip=slip: discriminator_loss_backward(r, f, slip), words)
    for slip, words in DISCRIMINATOR_LOSS_SLIPS.items()]


def test_discriminator_loss_backward_names_both_terms_and_accepts_tensors():
    from minivit import Tensor
    assert ex.check_discriminator_loss_backward(
        lambda r, f: tuple(Tensor(g) for g in discriminator_loss_backward(r, f))).passed
    # one 1/B for both terms: the second case has batches of 4 real and 7 fake logits
    text = str(ex.check_discriminator_loss_backward(
        lambda r, f: ((_sigmoid(r) - 1) / len(r), _sigmoid(f) / len(r))))
    assert "case 2, dfake" in text and "case 2: dreal right" in text, text
    text = str(ex.check_discriminator_loss_backward(lambda r, f: discriminator_loss_backward(r, f)[0]))
    assert "return 2 gradients (dreal, dfake), got 1" in text


# ------------------------------------------------------------------------------------------------ lesson 21
def spectral_norm_backward(W, u, v, dy, slip=None):
    """dW of sum(dy * W / sigma), sigma = u^T W v (u, v constants); ``slip`` plants one typical mistake."""
    sigma = u @ W @ v
    through = ((dy * W).sum() / sigma ** 2) * np.outer(u, v)
    if slip == "sign":
        return -(dy / sigma - through)
    if slip == "factor":
        return (dy / sigma - through) * sigma
    if slip == "constant sigma":
        return dy / sigma
    if slip == "sigma once":
        return dy / sigma - through * sigma
    if slip == "term sign":
        return dy / sigma + through
    return dy / sigma - through


SPECTRAL_NORM_SLIPS = {                 # planted slip: words its feedback must contain
    "sign": "opposite sign: a sign flip",
    "factor": "a missing 1/sigma?",
    "constant sigma": "sigma was treated as a constant",
    "sigma once": "needs sigma^2",
    "term sign": "the term through sigma has the wrong sign",
}

EXERCISES["spectral_norm_backward"] = (
    ex.check_spectral_norm_backward, spectral_norm_backward,
    [lambda W, u, v, dy, slip=slip: spectral_norm_backward(W, u, v, dy, slip) for slip in SPECTRAL_NORM_SLIPS])
PLANTED["spectral_norm_backward"] = [
    (slip, lambda W, u, v, dy, slip=slip: spectral_norm_backward(W, u, v, dy, slip), words)
    for slip, words in SPECTRAL_NORM_SLIPS.items()]


def gradient_penalty(critic, real, fake, a, lam=10.0, slip=None):
    """The WGAN-GP penalty at x_hat = a real + (1 - a) fake; ``slip`` plants one typical mistake."""
    import minivit
    from minivit import Tensor
    x_hat = Tensor(a * real + (1 - a) * fake, requires_grad=True)
    (g,) = minivit.grad(critic(x_hat).sum(), x_hat, create_graph=slip != "no create_graph")
    norms = ((g * g).sum(axis=tuple(range(1, g.ndim)))) ** 0.5
    if slip == "last axis":
        norms = ((g * g).sum(axis=-1)) ** 0.5
    if slip == "no minus one":
        return lam * (norms ** 2).mean()
    if slip == "squared norm":
        return lam * ((norms * norms - 1) ** 2).mean()
    if slip == "item":
        return (lam * ((norms - 1) ** 2).mean()).item()
    return lam * ((norms - 1) ** 2).mean()


GRADIENT_PENALTY_SLIPS = {              # planted slip: words its feedback must contain
    "no create_graph": "create_graph=True",
    "last axis": "the norm is taken over the last axis only",
    "no minus one": "WGAN-GP pulls its norm towards 1",
    "squared norm": "you use the squared norm",
    "item": "return the penalty as a Tensor",
}

EXERCISES["gradient_penalty"] = (
    ex.check_gradient_penalty, gradient_penalty,
    [lambda c, r, f, a, lam=10.0, slip=slip: gradient_penalty(c, r, f, a, lam, slip)
     for slip in GRADIENT_PENALTY_SLIPS])


@pytest.mark.parametrize("slip", GRADIENT_PENALTY_SLIPS)
def test_gradient_penalty_names_the_slip(slip):
    text = str(ex.check_gradient_penalty(lambda c, r, f, a, lam=10.0: gradient_penalty(c, r, f, a, lam, slip)))
    assert "[FAILED]" in text and GRADIENT_PENALTY_SLIPS[slip] in text, text


# ------------------------------------------------------------------------------------------------ lesson 22
def frechet_distance(mu1, s1, mu2, s2, slip=None):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); ``slip`` plants one typical mistake."""
    import scipy.linalg
    d = mu1 - mu2
    root = scipy.linalg.sqrtm(s1 @ s2).real
    if slip == "product of roots":
        root = scipy.linalg.sqrtm(s1).real @ scipy.linalg.sqrtm(s2).real
    if slip == "no 2":
        return float(d @ d + np.trace(s1) + np.trace(s2) - np.trace(root))
    if slip == "no mean term":
        return float(np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


FRECHET_SLIPS = {                       # planted slip: words its feedback must contain
    "product of roots": "only when S1 and S2 commute",
    "no 2": "needs its factor 2",
    "no mean term": "||mu1 - mu2||^2 is missing",
}

EXERCISES["frechet_distance"] = (
    ex.check_frechet_distance, frechet_distance,
    [lambda m1, s1, m2, s2, slip=slip: frechet_distance(m1, s1, m2, s2, slip) for slip in FRECHET_SLIPS])


@pytest.mark.parametrize("slip", FRECHET_SLIPS)
def test_frechet_distance_names_the_slip(slip):
    text = str(ex.check_frechet_distance(lambda m1, s1, m2, s2: frechet_distance(m1, s1, m2, s2, slip)))
    assert "[FAILED]" in text and FRECHET_SLIPS[slip] in text, text


def sln_backward(h, gamma, beta, dy, eps, slip=None):
    """(dh, dgamma, dbeta) of the self-modulated LayerNorm; ``slip`` plants one typical mistake."""
    hc = h - h.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((hc ** 2).mean(-1, keepdims=True) + eps)
    hhat = hc * rstd
    g = dy * (1.0 if slip == "no gamma" else gamma[:, None, :])
    dh = rstd * (g - g.mean(-1, keepdims=True) - hhat * (g * hhat).mean(-1, keepdims=True))
    dgamma, dbeta = (dy * hhat).sum(1), dy.sum(1)
    if slip == "sign":
        return -dh, -dgamma, -dbeta
    if slip == "factor":
        return dh, dgamma / h.shape[1], dbeta
    if slip == "sum over batch":
        return dh, (dy * hhat).sum((0, 1)), dbeta
    return dh, dgamma, dbeta


SLN_SLIPS = {                           # planted slip: words its feedback must contain
    "sign": "opposite sign: a sign flip",
    "factor": "an extra 1/T (the tokens) (a mean where the formula has a sum?)",
    "no gamma": "dh is what it would be with gamma all ones",
    "sum over batch": "the gradient for gamma has shape (4,), expected (2, 4)",
}

EXERCISES["sln_backward"] = (
    ex.check_sln_backward, sln_backward,
    [lambda h, g, b, dy, eps, slip=slip: sln_backward(h, g, b, dy, eps, slip) for slip in SLN_SLIPS])
PLANTED["sln_backward"] = [
    (slip, lambda h, g, b, dy, eps, slip=slip: sln_backward(h, g, b, dy, eps, slip), words)
    for slip, words in SLN_SLIPS.items()]


def test_sln_backward_agrees_with_its_reference_and_the_engine():
    from minivit import Tensor
    from minivit import functional as F
    rng = np.random.default_rng(0)
    h, gamma, beta, dy = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4)), \
        rng.standard_normal((2, 3, 4))
    ht, gt, bt = (Tensor(a, requires_grad=True) for a in (h, gamma, beta))
    y = F.layer_norm(ht, Tensor(np.ones(4)), Tensor(np.zeros(4))) * gt.reshape(2, 1, 4) + bt.reshape(2, 1, 4)
    y.backward(dy)
    for mine, engine in zip(ex.reference_sln_backward(h, gamma, beta, dy, 1e-6), (ht.grad, gt.grad, bt.grad)):
        np.testing.assert_allclose(mine, engine, rtol=1e-6, atol=1e-9)


def minibatch_std_backward(x, dy, group_size, eps, slip=None):
    """dx of y = [x, s] (the minibatch standard deviation), written row by row; ``slip`` plants one mistake."""
    B, D = x.shape
    dx = np.zeros_like(x) if slip == "no pass-through" else dy[:, :D].copy()
    for start in range(0, B, group_size):
        rows = slice(start, start + group_size)
        deviation = x[rows] - x[rows].mean(axis=0)
        n = group_size - 1 if slip == "unbiased" else group_size
        sigma = np.sqrt((deviation ** 2).sum(axis=0) / n + eps)
        ds = dy[rows, D][:, None] if slip == "own row" else dy[rows, D].sum()
        dx[rows] += ds * deviation / (n * (1 if slip == "no 1/D" else D) * sigma)
    return -dx if slip == "sign" else 2 * dx if slip == "factor" else dx


MBSTD_SLIPS = {                         # planted slip: words its feedback must contain
    "sign": "opposite sign: a sign flip",
    "factor": "2.00x the expected everywhere",
    "own row": "each row passes on only its own dy[:, -1]",
    "no pass-through": "the pass-through is missing",
    "no 1/D": "D times too large",
    "unbiased": "unbiased variance",
}

EXERCISES["minibatch_std_backward"] = (
    ex.check_minibatch_std_backward, minibatch_std_backward,
    [lambda x, dy, g, eps, slip=slip: minibatch_std_backward(x, dy, g, eps, slip) for slip in MBSTD_SLIPS])
PLANTED["minibatch_std_backward"] = [
    (slip, lambda x, dy, g, eps, slip=slip: minibatch_std_backward(x, dy, g, eps, slip), words)
    for slip, words in MBSTD_SLIPS.items()]


def test_minibatch_std_backward_agrees_with_its_reference_and_the_engine():
    from minivit import Tensor
    from minivit.nn.gan import MinibatchStd
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((6, 4)), rng.standard_normal((6, 5))
    xt = Tensor(x, requires_grad=True)
    MinibatchStd(3)(xt).backward(dy)
    np.testing.assert_allclose(ex.reference_minibatch_std_backward(x, dy, 3, 1e-8), xt.grad, rtol=1e-10, atol=1e-12)


# lesson 26: one step of a dynamic loss scaler; each slip -> the words its feedback must contain
def scaler_update(grads, scale, clean_steps, interval, slip=None):
    found = any(not np.isfinite(g).all() for g in grads) if slip != "isinf only" else \
        any(np.isinf(g).any() for g in grads)
    unscaled = [g.astype(np.float32) for g in grads] if slip == "no unscale" else \
        [g / np.float16(scale) for g in grads] if slip == "float16" else [g.astype(np.float32) / scale for g in grads]
    if found:
        return (unscaled, slip != "no skip", scale * (2 if slip == "grow on overflow" else 0.5),
                clean_steps + 1 if slip == "counter kept" else 0)
    clean_steps += 1
    if clean_steps >= interval - (slip == "early growth"):
        return unscaled, False, scale * 2, clean_steps if slip == "counter after growth" else 0
    return unscaled, False, scale, clean_steps


SCALER_SLIPS = {
    "no skip": "skip is False, but a gradient holds Inf",
    "isinf only": "np.isinf misses NaN",
    "no unscale": "is still the scaled one",
    "float16": "flushed",
    "grow on overflow": "grew to 131072 on an overflow step",
    "counter kept": "after an overflow: reset it to 0",
    "early growth": "an off-by-one in the comparison",
    "counter after growth": "after the scale grew: start counting again from 0",
}
EXERCISES["scaler_update"] = (ex.check_scaler_update, scaler_update,
                              [lambda *a, slip=slip: scaler_update(*a, slip=slip) for slip in SCALER_SLIPS])


def test_the_reference_scaler_update_is_grad_scaler_and_each_slip_is_named():
    from minivit import GradScaler, optim
    from minivit.tensor import Tensor
    w = Tensor(np.ones(3, np.float32), requires_grad=True)
    scaler, opt = GradScaler(init_scale=8.0, growth_interval=2), optim.SGD([w], lr=0.1)
    w.grad = np.array([8.0, np.inf, 0.0], np.float32)
    assert not scaler.step(opt)
    scaler.update()
    grads, skip, scale, clean = ex.reference_scaler_update([np.array([8.0, np.inf, 0.0], np.float16)], 8.0, 1, 2)
    assert skip and scale == scaler.get_scale() == 4.0 and clean == 0 and grads[0].dtype == np.float32
    for slip, words in SCALER_SLIPS.items():
        text = str(ex.check_scaler_update(lambda *a, slip=slip: scaler_update(*a, slip=slip)))
        assert "[FAILED]" in text and words in text, f"{slip}: not named {words!r}:\n{text}"


# lesson 27: the ring all-reduce, simulated; each slip -> the words its feedback must contain
def ring_allreduce(arrays, slip=None):
    n = len(arrays)
    buffers = arrays if slip == "in place" else [np.array(a, copy=True) for a in arrays]
    chunks = np.array_split(np.arange(len(buffers[0])), n)
    shift = 1 if slip == "off by one" else 0
    for step in range(n - 1):
        sent = [buffers[r][chunks[(r - step - shift) % n]].copy() for r in range(n)]
        for r in range(n):
            buffers[(r + 1) % n][chunks[(r - step - shift) % n]] += sent[r]
    for step in range(n - 1 if slip != "no all-gather" else 0):
        sent = [buffers[r][chunks[(r + 1 - step) % n]].copy() for r in range(n)]
        for r in range(n):
            buffers[(r + 1) % n][chunks[(r + 1 - step) % n]] = sent[r]
    return [b / n for b in buffers] if slip == "mean" else buffers


RING_SLIPS = {
    "mean": "every rank holds the mean, not the sum",
    "off by one": "an off-by-one in the chunk index",
    "no all-gather": "the all-gather phase (N - 1 more steps passing the finished chunks round the ring) is missing",
    "in place": "changed the arrays it was given",
}
EXERCISES["ring_allreduce"] = (ex.check_ring_allreduce, ring_allreduce,
                               [lambda a, slip=slip: ring_allreduce(a, slip) for slip in RING_SLIPS])


def test_the_reference_ring_allreduce_sums_and_each_slip_is_named():
    arrays = [np.random.default_rng(r).standard_normal(11) for r in range(4)]
    for got in ex.reference_ring_allreduce(arrays):
        assert np.allclose(got, sum(arrays), rtol=1e-14, atol=1e-14)
    for slip, words in RING_SLIPS.items():
        text = str(ex.check_ring_allreduce(lambda a, slip=slip: ring_allreduce(a, slip)))
        assert "[FAILED]" in text and words in text, f"{slip}: not named {words!r}:\n{text}"


# ------------------------------------------------------------------------------------------------ lessons 23-25
def gaussian_kl(mu, logvar, slip=None):
    B = mu.shape[0]
    variance = np.exp(logvar)
    half = 1.0 if slip == "no half" else 0.5
    per = B if slip != "batch sum" else 1
    kl = half * (mu ** 2 + variance - logvar - 1).sum() / per
    return kl, 2 * half * mu / per, half * (variance - 1) / per


def gram_backward(tokens, dgram, slip=None):
    N = tokens.shape[-2]
    if slip == "sign":
        return -gram_backward(tokens, dgram)
    if slip == "no symmetrisation":
        return 2 * tokens @ dgram / N
    return tokens @ (dgram + np.swapaxes(dgram, -1, -2)) / (1 if slip == "no 1/N" else N)


def stitch_tiles(maps, slip=None):
    rows, cols, h, w = maps.shape
    if slip == "reshape only":
        return maps.reshape(rows * h, cols * w)
    picture = np.transpose(maps, (0, 2, 1, 3)).reshape(rows * h, cols * w)
    return picture.T if slip == "transposed" and picture.shape[0] == picture.shape[1] else (
        np.transpose(maps, (1, 3, 0, 2)).reshape(cols * w, rows * h) if slip == "transposed" else picture)


EXERCISES["gaussian_kl"] = (ex.check_gaussian_kl, gaussian_kl,
                            [lambda m, v, slip=slip: gaussian_kl(m, v, slip) for slip in ("no half", "batch sum")])
EXERCISES["gram_backward"] = (ex.check_gram_backward, gram_backward,
                              [lambda t, g, slip=slip: gram_backward(t, g, slip)
                               for slip in ("no symmetrisation", "no 1/N")])
EXERCISES["stitch_tiles"] = (ex.check_stitch_tiles, stitch_tiles,
                             [lambda m, slip=slip: stitch_tiles(m, slip) for slip in ("reshape only", "transposed")])

PLANTED["gram_backward"] = [("sign", lambda t, g: gram_backward(t, g, "sign"), "sign"),
                            ("factor", lambda t, g: gram_backward(t, g, "no 1/N"), "1/N")]


@pytest.mark.parametrize("name, slip, named", [
    ("gaussian_kl", "no half", "1/2"), ("gram_backward", "no symmetrisation", "symmetr"),
    ("stitch_tiles", "reshape only", "transpose")])
def test_lessons_23_to_25_name_the_slip(name, slip, named):
    check, right, _ = EXERCISES[name]
    text = str(check(lambda *a: right(*a, slip=slip)))
    assert "[FAILED]" in text and named in text, text
