"""Property-based tests: hypothesis draws shapes for broadcasting and reductions; values and gradients are checked
against NumPy and finite differences."""

import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from minivit import Tensor, ops
from minivit.gradcheck import gradcheck

FAST = settings(max_examples=40, deadline=None)


def _arrays(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


@FAST
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=3),
       op=st.sampled_from(["add", "sub", "mul", "div"]), seed=st.integers(0, 2 ** 16))
def test_broadcasting_binary_ops(shapes, op, seed):
    a_shape, b_shape = shapes.input_shapes
    a, b = _arrays(a_shape, seed), _arrays(b_shape, seed + 1)
    if op == "div":
        b = np.abs(b) + 0.5
    fn = {"add": ops.AddFn, "sub": ops.SubFn, "mul": ops.MulFn, "div": ops.DivFn}[op]
    expected = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](a, b)
    y = fn.apply(Tensor(a), Tensor(b))
    assert y.shape == shapes.result_shape
    np.testing.assert_allclose(y.data, expected)
    report = gradcheck(lambda x, z: fn.apply(x, z), [a, b])
    assert report.ok, report


@st.composite
def shape_and_axis(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4))
    axes = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                          st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True)
                          .map(tuple)))
    return shape, axes, draw(st.booleans())


@FAST
@given(case=shape_and_axis(), op=st.sampled_from(["sum", "mean", "max"]), seed=st.integers(0, 2 ** 16))
def test_reductions(case, op, seed):
    shape, axis, keepdims = case
    x = _arrays(shape, seed)
    fn = {"sum": ops.SumFn, "mean": ops.MeanFn, "max": ops.MaxFn}[op]
    expected = getattr(np, {"sum": "sum", "mean": "mean", "max": "max"}[op])(x, axis=axis, keepdims=keepdims)
    y = fn.apply(Tensor(x), axis=axis, keepdims=keepdims)
    assert y.shape == np.shape(expected)
    np.testing.assert_allclose(y.data, expected)
    report = gradcheck(lambda t: fn.apply(t, axis=axis, keepdims=keepdims), [x])
    assert report.ok, report


@FAST
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), seed=st.integers(0, 2 ** 16))
def test_softmax_rows_sum_to_one_and_gradients_check(shape, seed):
    x = _arrays(shape, seed) * 5
    y = ops.SoftmaxFn.apply(x)
    np.testing.assert_allclose(y.data.sum(-1), 1.0)
    assert gradcheck(lambda t: ops.SoftmaxFn.apply(t), [x]).ok


@FAST
@given(batch=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), n=st.integers(1, 4), k=st.integers(1, 4),
       m=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_batched_matmul_against_a_shared_matrix(batch, n, k, m, seed):
    a, b = _arrays(batch + (n, k), seed), _arrays((k, m), seed + 1)
    np.testing.assert_allclose(ops.MatMulFn.apply(a, b).data, a @ b)
    assert gradcheck(lambda x, w: ops.MatMulFn.apply(x, w), [a, b]).ok


# ------------------------------------------------------------------ out-of-range axes (issue 17, item 1)
@st.composite
def shape_and_bad_axis(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=3))
    n = len(shape)
    return shape, draw(st.one_of(st.integers(n, n + 5), st.integers(-n - 5, -n - 1)))


AXIS_OPS = {
    "sum": lambda t, a: t.sum(a),
    "mean": lambda t, a: t.mean(a),
    "max": lambda t, a: t.max(a),
    "sum_tuple": lambda t, a: t.sum((0, a)) if a not in (0, -t.ndim) else t.sum(a),
    "softmax": lambda t, a: ops.SoftmaxFn.apply(t, axis=a),
    "log_softmax": lambda t, a: ops.LogSoftmaxFn.apply(t, axis=a),
    "permute": lambda t, a: t.permute(*([a] + list(range(1, t.ndim)))),
    "transpose0": lambda t, a: t.transpose(a, 0),
    "transpose1": lambda t, a: t.transpose(0, a),
    "concat": lambda t, a: ops.ConcatFn.apply(t, t, axis=a),
    "stack": lambda t, a: ops.StackFn.apply(t, t, axis=a + 1 if a >= 0 else a - 1),   # stack allows ndim + 1 axes
}


@FAST
@given(case=shape_and_bad_axis(), op=st.sampled_from(sorted(AXIS_OPS)))
def test_an_out_of_range_axis_raises_naming_the_axis_and_the_ndim(case, op):
    """NumPy and PyTorch raise on an axis outside [-ndim, ndim); so does every minivit op that takes an axis
    (before the fix, reductions, permute, concat and stack took the axis modulo ndim)."""
    import pytest
    shape, axis = case
    t = Tensor(_arrays(shape, 0), requires_grad=True)
    with pytest.raises(ValueError, match=r"axis -?\d+ is out of range for a tensor with \d+ dimensions"):
        AXIS_OPS[op](t, axis)


@FAST
@given(case=shape_and_axis(), seed=st.integers(0, 2 ** 16))
def test_an_in_range_axis_of_concat_stack_and_softmax_matches_numpy(case, seed):
    shape, axis, _ = case
    if not isinstance(axis, int):
        axis = 0
    x = _arrays(shape, seed)
    np.testing.assert_array_equal(ops.ConcatFn.apply(x, x, axis=axis).data, np.concatenate([x, x], axis=axis))
    np.testing.assert_array_equal(ops.StackFn.apply(x, x, axis=axis).data, np.stack([x, x], axis=axis))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(ops.SoftmaxFn.apply(x, axis=axis).data, e / e.sum(axis=axis, keepdims=True))
