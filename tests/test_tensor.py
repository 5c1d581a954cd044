"""Autograd semantics: accumulation, broadcasting, graph order and freeing, no_grad, dtypes, errors."""

import numpy as np
import pytest

import minivit as mv
from minivit import Tensor
from minivit.autograd import _topological_order
from minivit.function import unbroadcast
from minivit.ops import all_ops


def test_a_tensor_used_twice_gets_the_sum_of_both_gradients():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    y = x * x + x  # dy/dx = 2x + 1
    y.backward(np.ones(3))
    np.testing.assert_allclose(x.grad, [3.0, 5.0, 7.0])


def test_x_plus_x_leaves_two_independent_copies_of_the_gradient():
    x = Tensor(np.ones(3), requires_grad=True)
    (x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2.0)
    y = Tensor(np.ones(3), requires_grad=True)
    z = Tensor(np.ones(3), requires_grad=True)
    (y + z).sum().backward()
    y.grad *= 5  # an optimizer may scale a gradient in place; the other one must not change
    np.testing.assert_allclose(z.grad, 1.0)


def test_gradients_accumulate_across_backward_calls_until_zeroed():
    x = Tensor(np.array([2.0]), requires_grad=True)
    (x * 3).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0])
    x.zero_grad()
    assert x.grad is None


def test_broadcasting_backward_sums_to_each_input_shape():
    a = Tensor(np.ones((2, 3, 4)), requires_grad=True)
    b = Tensor(np.ones((3, 1)), requires_grad=True)
    c = Tensor(np.ones(4), requires_grad=True)
    (a * b + c).sum().backward()
    assert a.grad.shape == (2, 3, 4) and b.grad.shape == (3, 1) and c.grad.shape == (4,)
    np.testing.assert_allclose(b.grad, 8.0)
    np.testing.assert_allclose(c.grad, 6.0)


def test_unbroadcast_sums_leading_and_stretched_axes():
    g = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2)).reshape(3, 1))
    np.testing.assert_allclose(unbroadcast(g, (4,)), g.sum(axis=(0, 1)))
    assert unbroadcast(g, (2, 3, 4)) is g


def test_deep_graphs_do_not_hit_the_recursion_limit():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(20000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 20000], rtol=1e-9)


def test_topological_order_is_deterministic_and_each_node_comes_before_its_inputs():
    x = Tensor(np.ones(2), requires_grad=True)
    a = x * 2
    b = x + a
    c = (a * b).sum()
    orders = []
    for _ in range(3):
        orders.append([id(n) for n in _topological_order([c])])
    assert orders[0] == orders[1] == orders[2]
    position = {i: k for k, i in enumerate(orders[0])}
    assert position[id(c)] < position[id(b)] < position[id(a)] < position[id(x)]


def test_the_graph_is_freed_after_backward_and_a_second_backward_raises():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()
    z = x * 3
    (z * 1).sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (z * 2).sum().backward()


def test_retain_graph_allows_a_second_backward():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x * 2).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4.0)


def test_saved_arrays_are_released_after_backward():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x.exp()
    ctx = y._ctx
    y.sum().backward()
    assert y._ctx is None and ctx.parents  # the op object is no longer reachable from the tensor


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with mv.no_grad():
        y = x * 2
        assert not mv.is_grad_enabled()
    assert mv.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_retain_grad_keeps_an_intermediate_gradient():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = (x * 3).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    np.testing.assert_allclose(x.grad, 18 * x.data)


def test_backward_without_grad_needs_a_scalar():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2).backward()
    with pytest.raises(ValueError, match=r"grad has shape \(2,\), expected \(3,\)"):
        (x * 2).backward(np.ones(2))


def test_dtypes_float32_by_default_float64_kept():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(1.5).dtype == np.float32
    assert Tensor([1, 2]).dtype.kind == "i"
    assert Tensor(np.ones(2)).dtype == np.float64
    x32 = Tensor(np.ones(2, np.float32), requires_grad=True)
    y = (x32 * 3.0 + 1.0) / 2.0 - 0.5
    assert y.dtype == np.float32
    y.sum().backward()
    assert x32.grad.dtype == np.float32
    with pytest.raises(TypeError, match="floating-point"):
        Tensor([1, 2], requires_grad=True)


def test_operators_and_methods():
    a = Tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    np.testing.assert_allclose((2 - a).data, 2 - a.data)
    np.testing.assert_allclose((2 / a).data, 2 / a.data)
    np.testing.assert_allclose((-a).data, -a.data)
    np.testing.assert_allclose((a ** 2).data, a.data ** 2)
    np.testing.assert_allclose((a @ a).data, a.data @ a.data)
    np.testing.assert_allclose((np.eye(2) @ a).data, a.data)
    np.testing.assert_allclose(a.T.data, a.data.T)
    np.testing.assert_allclose(a.transpose(0, 1).data, a.data.T)
    np.testing.assert_allclose(a.permute(1, 0).data, a.data.T)
    np.testing.assert_allclose(a.reshape(4).data, a.data.ravel())
    np.testing.assert_allclose(a.reshape((1, 4)).data, a.data.reshape(1, 4))
    np.testing.assert_allclose(a[1].data, [3.0, 4.0])
    np.testing.assert_allclose(a.max(axis=0).data, [3.0, 4.0])
    np.testing.assert_allclose(a.mean().data, 2.5)
    np.testing.assert_allclose(a.sqrt().data, np.sqrt(a.data))
    np.testing.assert_allclose(a.log().exp().data, a.data)
    np.testing.assert_allclose(a.tanh().data, np.tanh(a.data))
    np.testing.assert_allclose(mv.concat([a, a], axis=1).data, np.hstack([a.data, a.data]))
    np.testing.assert_allclose(mv.stack([a, a]).data, np.stack([a.data, a.data]))
    with pytest.raises(ValueError, match="one element"):
        a.item()
    with pytest.raises(TypeError, match="Python number exponent"):
        a ** a


def test_indexing_with_a_tensor_and_repeated_indices_accumulates():
    x = Tensor(np.arange(4.0), requires_grad=True)
    idx = Tensor(np.array([0, 0, 3]))
    x[idx].sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 0.0, 0.0, 1.0])


def test_max_splits_the_gradient_between_ties():
    x = Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_allclose(x.grad, [0.0, 0.5, 0.5])


def test_a_wrong_backward_shape_is_reported_with_the_op_name():
    from minivit.function import Function

    class BadFn(Function):
        def forward(self, x):
            return x * 2

        def backward(self, dy):
            return (dy[:1],)

    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"BadFn.backward returned a gradient of shape \(1,\) for input 0"):
        BadFn.apply(x).sum().backward()
    assert BadFn not in all_ops()  # user ops are not library ops


def test_to_and_detach_make_new_leaves():
    x = Tensor(np.ones(2, np.float32), requires_grad=True)
    y = (x * 2).to(dtype=np.float64)
    assert y.dtype == np.float64 and y.is_leaf and y.device == "cpu"
    assert not (x * 2).detach().requires_grad
    assert "requires_grad=True" in repr(x)


def test_anomaly_mode_names_the_op_in_forward_and_in_backward():
    from minivit.function import Function, detect_anomaly

    class NanGrad(Function):
        def forward(self, x):
            return x * 1.0

        def backward(self, dy):
            return (dy * np.nan,)

    x = Tensor(np.array([1.0, -1.0]), requires_grad=True)
    with detect_anomaly():
        with np.errstate(invalid="ignore"), pytest.raises(FloatingPointError, match="anomaly: LogFn produced NaN"):
            x.log()
        y = NanGrad.apply(x).sum()
        with pytest.raises(FloatingPointError, match="anomaly: NanGrad.backward produced NaN or Inf in the "
                                                     "gradient of input 0"):
            y.backward()
    (x * 2).sum().backward()  # outside the block nothing is checked


# ------------------------------------------------------------------ dtype promotion (issue 17, item 8)
def test_mixed_float_dtypes_promote_to_the_widest_in_every_op_and_gradients_keep_each_inputs_dtype():
    """One rule: floating inputs of different precisions are promoted to the widest (NumPy's rule between
    arrays); each gradient comes back in its input's dtype. F.linear(float32, float64) used to return float32."""
    from minivit import functional as F
    from minivit.tensor import concat, stack
    rng = np.random.default_rng(0)
    cases = {
        "add": (lambda a, b: a + b, [(3, 4), (4,)]),
        "mul": (lambda a, b: a * b, [(3, 4), (3, 4)]),
        "div": (lambda a, b: a / b, [(3, 4), (3, 1)]),
        "matmul": (lambda a, b: a @ b, [(3, 4), (4, 2)]),
        "linear": (lambda a, b: F.linear(a, b), [(2, 3, 4), (5, 4)]),
        "layer_norm": (lambda a, b: F.layer_norm(a, b, b), [(3, 4), (4,)]),
        "attention": (lambda a, b: F.scaled_dot_product_attention(a, b, b), [(2, 3, 4), (2, 5, 4)]),
        "concat": (lambda a, b: concat([a, b], axis=0), [(2, 3), (1, 3)]),
        "stack": (lambda a, b: stack([a, b], axis=1), [(2, 3), (2, 3)]),
    }
    for name, (fn, shapes) in cases.items():
        arrays = [rng.standard_normal(s) for s in shapes]
        for low in (0, 1):
            mixed = [Tensor(a.astype(np.float32) if i == low else a, requires_grad=True) for i, a in enumerate(arrays)]
            wide = [Tensor(a.astype(np.float32).astype(np.float64) if i == low else a, requires_grad=True)
                    for i, a in enumerate(arrays)]
            y, y_ref = fn(*mixed), fn(*wide)
            assert y.dtype == np.float64, name
            np.testing.assert_allclose(y.data, y_ref.data, rtol=1e-12, err_msg=name)
            upstream = rng.standard_normal(y.shape)
            y.backward(upstream)
            y_ref.backward(upstream)
            for t, r in zip(mixed, wide):
                assert t.grad.dtype == t.dtype, name
                np.testing.assert_allclose(t.grad, r.grad.astype(t.dtype), rtol=1e-6, err_msg=name)
    logits = Tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    assert F.cross_entropy(logits, np.array([0, 1, 2, 0])).dtype == np.float32      # integer labels: no promotion
    assert (logits * 2.0).dtype == np.float32 and (logits * np.float64(2.0)).dtype == np.float32
    assert (logits + np.ones(3)).dtype == np.float64                                  # a float64 array promotes


def test_a_double_vit_fed_float32_images_computes_in_float64():
    from minivit import functional as F, nn
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                 num_heads=2).to(dtype=np.float64)
    images = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    logits = model(images)
    assert logits.dtype == np.float64
    np.testing.assert_array_equal(logits.data, model(images.astype(np.float64)).data)
    F.cross_entropy(logits, np.array([0, 2])).backward()
    assert all(p.grad.dtype == np.float64 for p in model.parameters())


def test_second_derivatives_through_a_promotion():
    import minivit
    a = Tensor(np.array([1.5, -0.5], np.float32), requires_grad=True)
    b = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    (ga,) = minivit.grad((a * b * b).sum(), [a], create_graph=True)
    assert ga.dtype == np.float32
    (gb,) = minivit.grad(ga.sum(), [b])
    np.testing.assert_allclose(gb.data, 2 * b.data)


# ------------------------------------------------------------------ PyTorch's spellings (issue 17, API list)
def test_number_to_the_power_of_a_tensor_and_numpy_scalar_exponents():
    x = Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    y = 2 ** x
    np.testing.assert_allclose(y.data, 2.0 ** x.data, rtol=1e-15)
    y.backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(x.grad, [1, 2, 3] * 2.0 ** x.data * np.log(2.0), rtol=1e-14)
    assert (np.float32(3) ** Tensor(np.ones(2, np.float32))).dtype == np.float32
    z = Tensor(np.array([1.5, -2.0]), requires_grad=True)
    for exponent in (np.int64(2), np.float64(2.0), np.int32(2)):
        out = z ** exponent
        np.testing.assert_array_equal(out.data, z.data ** 2)
    (z ** np.int64(3)).sum().backward()
    np.testing.assert_allclose(z.grad, 3 * z.data ** 2)
    t = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (0 ** t).sum().backward()
    np.testing.assert_array_equal(t.grad, [0.0, 0.0])                      # as PyTorch
    with pytest.raises(TypeError, match="Python number exponent"):
        z ** "2"


def test_comparisons_give_boolean_tensors_without_gradient():
    a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = Tensor(np.array([3.0, 2.0, 1.0]))
    for op, ref in ((a < b, [1, 0, 0]), (a <= b, [1, 1, 0]), (a > b, [0, 0, 1]), (a >= b, [0, 1, 1]),
                    (a == b, [0, 1, 0]), (a != b, [1, 0, 1]), (a > 1.5, [0, 1, 1]), (a == np.array(3.0), [0, 0, 1]),
                    (2.0 < a, [0, 0, 1])):
        assert isinstance(op, Tensor) and op.dtype == np.bool_ and not op.requires_grad
        np.testing.assert_array_equal(op.data, np.array(ref, bool))
    assert len({a, b}) == 2 and {a: 1}[a] == 1                              # still hashable, by identity


def test_float_int_bool_and_item_of_one_element_tensors():
    t = Tensor(np.array([[2.5]]))
    assert float(t) == 2.5 and int(t) == 2 and bool(t) is True and t.item() == 2.5
    assert bool(Tensor(np.zeros(1))) is False
    assert float(Tensor(np.float32(1.5))) == 1.5
    for f in (float, int, bool):
        with pytest.raises(ValueError, match="ambiguous"):
            f(Tensor(np.ones(3)))
    with pytest.raises(ValueError, match="one element"):
        Tensor(np.ones(2)).item()


def test_dim_and_keepdim_beside_axis_and_keepdims():
    from minivit import functional as F
    from minivit.tensor import concat, stack
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    t = Tensor(x, requires_grad=True)
    np.testing.assert_array_equal(t.sum(dim=1).data, x.sum(1))
    np.testing.assert_array_equal(t.sum(dim=(0, 2), keepdim=True).data, x.sum((0, 2), keepdims=True))
    np.testing.assert_array_equal(t.mean(dim=-1, keepdim=True).data, x.mean(-1, keepdims=True))
    np.testing.assert_array_equal(t.max(axis=2).data, x.max(2))
    values, indices = t.max(dim=1)
    np.testing.assert_array_equal(values.data, x.max(1))
    np.testing.assert_array_equal(indices.data, x.argmax(1))
    assert t.max(dim=1, keepdim=True).values.shape == (2, 1, 4) and t.max(dim=1, keepdim=True).indices.shape == (2, 1, 4)
    values.sum().backward()
    np.testing.assert_array_equal(t.grad, (x == x.max(1, keepdims=True)).astype(float))
    np.testing.assert_allclose(F.softmax(t, dim=1).data, F.softmax(t, axis=1).data)
    np.testing.assert_allclose(F.log_softmax(t, dim=0).data, F.log_softmax(t, axis=0).data)
    assert concat([t, t], dim=2).shape == (2, 3, 8) and stack([t, t], dim=1).shape == (2, 2, 3, 4)
    with pytest.raises(TypeError, match="not both"):
        t.sum(axis=1, dim=1)
    with pytest.raises(TypeError, match="not both"):
        F.softmax(t, axis=1, dim=1)


def test_dim_spellings_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((3, 4))
    t, r = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ours = t.sum(dim=0, keepdim=True) * t.mean(dim=1, keepdim=True) + t.max(dim=1, keepdim=True).values + 2 ** t
    ref = r.sum(dim=0, keepdim=True) * r.mean(dim=1, keepdim=True) + r.max(dim=1, keepdim=True).values + 2 ** r
    upstream = np.random.default_rng(2).standard_normal((3, 4))
    ours.backward(upstream)
    ref.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(ours.data, ref.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(t.grad, r.grad.numpy(), rtol=1e-10)
    np.testing.assert_array_equal(t.max(dim=1).indices.data, r.max(dim=1).indices.numpy())
    np.testing.assert_array_equal((t > 0).data, (r > 0).numpy())


def test_the_out_of_range_axes_of_issue_17_raise():
    """Item 1's reproductions: each used to answer with another axis (axis % ndim)."""
    from minivit.tensor import concat, stack
    t = Tensor(np.arange(12.0).reshape(3, 4))
    for attempt in (lambda: t.sum(2), lambda: t.max(5), lambda: t.mean(-3), lambda: concat([t, t], axis=2),
                    lambda: stack([t, t], axis=3), lambda: t.permute(3, 0)):
        with pytest.raises(ValueError, match="out of range for a tensor with"):
            attempt()


def test_integer_logits_get_a_named_error():
    from minivit import functional as F
    with pytest.raises(TypeError, match="logits must be floating-point"):
        F.cross_entropy(np.zeros((2, 3), np.int64), np.array([0, 1]))
