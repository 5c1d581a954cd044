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
