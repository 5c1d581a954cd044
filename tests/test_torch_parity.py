"""Parity with PyTorch: every functional op and a whole ViT, in values and in every gradient.

Tolerances: 1e-10 relative in float64, 1e-4 in float32. Skipped when PyTorch is not installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from minivit import Tensor, functional as F, nn, optim  # noqa: E402
from minivit.testing.torch_reference import torch_vit_like  # noqa: E402

pytestmark = pytest.mark.torch
R = np.random.default_rng(21)
TOL = {np.float64: 1e-10, np.float32: 1e-4}


def _compare(ours, theirs, arrays, dtype, label_positions=()):
    arrays = [a if i in label_positions else a.astype(dtype) for i, a in enumerate(arrays)]
    mine = [Tensor(a, requires_grad=i not in label_positions) for i, a in enumerate(arrays)]
    ref = [torch.from_numpy(a) if i in label_positions else torch.tensor(a, requires_grad=True)
           for i, a in enumerate(arrays)]
    y, y_ref = ours(*mine), theirs(*ref)
    upstream = R.standard_normal(y.shape).astype(dtype)
    y.backward(upstream)
    y_ref.backward(torch.from_numpy(upstream))
    tol = TOL[dtype]
    np.testing.assert_allclose(y.data, y_ref.detach().numpy(), rtol=tol, atol=tol)
    for i, (a, b) in enumerate(zip(mine, ref)):
        if i not in label_positions:
            np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=tol, atol=tol, err_msg=f"input {i}")


OPS = {
    "linear": (F.linear, TF.linear, [R.standard_normal((2, 5, 4)), R.standard_normal((3, 4)), R.standard_normal(3)]),
    "gelu": (F.gelu, TF.gelu, [R.standard_normal((4, 6)) * 3]),
    "gelu_tanh": (lambda x: F.gelu(x, "tanh"), lambda x: TF.gelu(x, approximate="tanh"), [R.standard_normal(20) * 3]),
    "softmax": (lambda x: F.softmax(x, 1), lambda x: TF.softmax(x, 1), [R.standard_normal((3, 4, 5))]),
    "log_softmax": (F.log_softmax, lambda x: TF.log_softmax(x, -1), [R.standard_normal((3, 7)) * 5]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b, eps=1e-6),
                   lambda x, w, b: TF.layer_norm(x, (6,), w, b, eps=1e-6),
                   [R.standard_normal((2, 3, 6)), R.standard_normal(6), R.standard_normal(6)]),
    "attention": (F.scaled_dot_product_attention, TF.scaled_dot_product_attention,
                  [R.standard_normal((2, 3, 5, 4)), R.standard_normal((2, 3, 7, 4)), R.standard_normal((2, 3, 7, 6))]),
    "multi_head_attention": (
        lambda qkv: F.multi_head_self_attention(qkv, 3),
        lambda qkv: TF.scaled_dot_product_attention(*qkv.reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4))
        .transpose(1, 2).reshape(2, 5, 12),
        [R.standard_normal((2, 5, 36))]),
    "cross_entropy": (lambda x, t: F.cross_entropy(x, t), lambda x, t: TF.cross_entropy(x, t),
                      [R.standard_normal((8, 5)), R.integers(0, 5, 8)]),
    "cross_entropy_smoothing": (lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
                                lambda x, t: TF.cross_entropy(x, t, label_smoothing=0.1),
                                [R.standard_normal((8, 5)), R.integers(0, 5, 8)]),
    "cross_entropy_none": (lambda x, t: F.cross_entropy(x, t, reduction="none"),
                           lambda x, t: TF.cross_entropy(x, t, reduction="none"),
                           [R.standard_normal((6, 3)), R.integers(0, 3, 6)]),
    "patchify_conv": (lambda x, w, b: F.linear(F.patchify(x, 4), w.reshape(5, -1), b),
                      lambda x, w, b: TF.conv2d(x, w, b, stride=4).flatten(2).transpose(1, 2),
                      [R.standard_normal((2, 3, 8, 12)), R.standard_normal((5, 3, 4, 4)), R.standard_normal(5)]),
    "unpatchify": (lambda x: F.unpatchify(x, 2, grid=(2, 3)),
                   lambda x: TF.fold(x.transpose(1, 2), (4, 6), kernel_size=2, stride=2),
                   [R.standard_normal((2, 6, 12))]),
    # torch's unfold gives (B, C*k*k, L); ours (B, L, C*k*k)
    "unfold_overlapping": (lambda x: F.unfold_patches(x, 3, 2, 1),
                           lambda x: TF.unfold(x, 3, padding=1, stride=2).transpose(1, 2),
                           [R.standard_normal((2, 3, 7, 6))]),
    "unfold_stride_1": (lambda x: F.unfold_patches(x, 4, 1, 2),
                        lambda x: TF.unfold(x, 4, padding=2, stride=1).transpose(1, 2),
                        [R.standard_normal((1, 2, 5, 4))]),
    "unfold_gaps": (lambda x: F.unfold_patches(x, 2, 3),
                    lambda x: TF.unfold(x, 2, stride=3).transpose(1, 2), [R.standard_normal((2, 1, 7, 8))]),
    "unfold_conv": (lambda x, w, b: F.linear(F.unfold_patches(x, 8, 4, 2), w.reshape(5, -1), b),
                    lambda x, w, b: TF.conv2d(x, w, b, stride=4, padding=2).flatten(2).transpose(1, 2),
                    [R.standard_normal((2, 3, 8, 12)), R.standard_normal((5, 3, 8, 8)), R.standard_normal(5)]),
    # channels last: images (B, H, W, C), windows in (k, k, C) order, the Conv2d weight permuted to match
    "unfold_conv_channels_last": (
        lambda x, w, b: F.linear(F.unfold_patches(x, 4, 2, 1, channels_last=True), w.permute(0, 2, 3, 1).reshape(5, -1),
                                 b),
        lambda x, w, b: TF.conv2d(x.permute(0, 3, 1, 2), w, b, stride=2, padding=1).flatten(2).transpose(1, 2),
        [R.standard_normal((2, 8, 6, 3)), R.standard_normal((5, 3, 4, 4)), R.standard_normal(5)]),
    "fold_channels_last": (lambda x: F.fold_patches(x, (7, 6), 3, 2, 1, channels_last=True),
                           lambda x: TF.fold(x.reshape(2, 12, 9, 3).transpose(2, 3).reshape(2, 12, 27).transpose(1, 2),
                                             (7, 6), 3, padding=1, stride=2).permute(0, 2, 3, 1),
                           [R.standard_normal((2, 12, 27))]),
    "fold": (lambda x: F.fold_patches(x, (7, 6), 3, 2, 1),
             lambda x: TF.fold(x.transpose(1, 2), (7, 6), 3, padding=1, stride=2),
             [R.standard_normal((2, 12, 27))]),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", OPS)
def test_functional_op_matches_torch(name, dtype):
    ours, theirs, arrays = OPS[name]
    labels = {i for i, a in enumerate(arrays) if a.dtype.kind == "i"}
    _compare(ours, theirs, arrays, dtype, labels)


CONFIGS = {
    "token": dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2, num_heads=4,
                  mlp_ratio=2.0),
    "avg_tanh_nobias": dict(img_size=12, patch_size=4, in_chans=1, num_classes=4, embed_dim=12, depth=1, num_heads=3,
                            global_pool="avg", class_token=False, act_approximate="tanh", qkv_bias=False),
    "overlapping_patches": dict(img_size=12, patch_size=4, patch_kernel=8, in_chans=3, num_classes=3, embed_dim=8,
                                depth=1, num_heads=2, mlp_ratio=2.0),
    "conv_stem": dict(img_size=8, patch_size=4, stem_channels=(4, 5), in_chans=2, num_classes=3, embed_dim=8,
                      depth=1, num_heads=2, mlp_ratio=2.0, global_pool="avg"),
    "strided_stem": dict(img_size=16, patch_size=8, stem_channels=(3, 4), stem_stride=2, patch_kernel=4, in_chans=2,
                         num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, global_pool="avg",
                         class_token=False),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", CONFIGS)
def test_whole_vit_matches_torch_in_logits_and_every_parameter_gradient(config, dtype):
    model = nn.VisionTransformer(**CONFIGS[config], seed=3).to(dtype=dtype)
    ref = torch_vit_like(model, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    c = model.config
    x = R.standard_normal((4, c["in_chans"], c["img_size"], c["img_size"])).astype(dtype)
    y = R.integers(0, c["num_classes"], 4)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    ref_logits = ref(torch.from_numpy(x))
    TF.cross_entropy(ref_logits, torch.from_numpy(y)).backward()
    tol = TOL[dtype]
    np.testing.assert_allclose(logits.data, ref_logits.detach().numpy(), rtol=tol, atol=tol)
    ref_params = dict(ref.named_parameters())
    assert set(ref_params) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        g = ref_params[name].grad.numpy()
        scale = np.abs(g).max()
        np.testing.assert_allclose(p.grad, g, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_optimizers_match_torch_over_several_steps(which):
    w0 = R.standard_normal((4, 3))
    grads = [R.standard_normal((4, 3)) for _ in range(5)]
    p = nn.Parameter(w0.copy())
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    if which == "adamw":
        opt, topt = (optim.AdamW([p], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
                     torch.optim.AdamW([tp], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1))
    else:
        opt, topt = (optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
                     torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True))
    for g in grads:
        p.grad, tp.grad = g.copy(), torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_clip_grad_norm_matches_torch():
    gs = [R.standard_normal((3, 4)) * 5, R.standard_normal(7)]
    ps = [nn.Parameter(np.zeros_like(g)) for g in gs]
    tps = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in gs]
    for p, tp, g in zip(ps, tps, gs):
        p.grad, tp.grad = g.copy(), torch.from_numpy(g.copy())
    norm = optim.clip_grad_norm_(ps, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(tps, 1.0)
    np.testing.assert_allclose(float(norm), tnorm.item(), rtol=1e-12)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6)


def test_timm_vit_loads_into_minivit_and_matches_it():
    """With timm installed (the GPU machines have it): a timm ViT's state dict loads by name and agrees."""
    timm = pytest.importorskip("timm")
    config = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=24, depth=2, num_heads=3,
                  mlp_ratio=2.0)
    ref = timm.models.vision_transformer.VisionTransformer(**config).double()
    model = nn.VisionTransformer(**config).double()
    model.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = R.standard_normal((3, 3, 16, 16))
    y = R.integers(0, 5, 3)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    ref_logits = ref(torch.from_numpy(x))
    TF.cross_entropy(ref_logits, torch.from_numpy(y)).backward()
    np.testing.assert_allclose(model(x).data, ref_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    for name, p in ref.named_parameters():
        ours = dict(model.named_parameters())[name].grad
        np.testing.assert_allclose(ours, p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("norm_type", [1.0, 3.0, float("inf")])
def test_clip_grad_norm_with_a_norm_type_matches_torch(norm_type):
    gs = [R.standard_normal((3, 4)) * 5, R.standard_normal(7)]
    ps = [nn.Parameter(np.zeros_like(g)) for g in gs]
    tps = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in gs]
    for p, tp, g in zip(ps, tps, gs):
        p.grad, tp.grad = g.copy(), torch.from_numpy(g.copy())
    norm = optim.clip_grad_norm_(ps, 1.0, norm_type=norm_type)
    tnorm = torch.nn.utils.clip_grad_norm_(tps, 1.0, norm_type=norm_type)
    np.testing.assert_allclose(float(norm), tnorm.item(), rtol=1e-10)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-10)


_W5 = R.uniform(0.5, 2.0, 5)
_LABELS = np.array([0, 4, -100, 2, 2, 1, -100, 3])
_PROBS = R.dirichlet(np.ones(5), 8)
CROSS_ENTROPY = {
    "weight": (dict(weight=_W5), _LABELS.clip(0)),
    "ignore_index": (dict(), _LABELS),
    "weight_ignore_smoothing": (dict(weight=_W5, label_smoothing=0.2), _LABELS),
    "ignore_smoothing": (dict(label_smoothing=0.1), _LABELS),
    "ignore_other_index_sum": (dict(ignore_index=2, reduction="sum"), _LABELS.clip(0)),
    "weight_none": (dict(weight=_W5, reduction="none"), _LABELS),
    "probabilities": (dict(), _PROBS),
    "probabilities_weight_smoothing": (dict(weight=_W5, label_smoothing=0.15), _PROBS),
    "probabilities_none": (dict(reduction="none", weight=_W5), _PROBS),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", CROSS_ENTROPY)
def test_cross_entropy_weight_ignore_index_and_probabilities_match_torch(name, dtype):
    kwargs, target = CROSS_ENTROPY[name]
    x = R.standard_normal((8, 5))
    ours = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    theirs = {k: (torch.from_numpy(v.astype(dtype)) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    if target.dtype.kind == "f":
        _compare(lambda a, t: F.cross_entropy(a, t, **ours), lambda a, t: TF.cross_entropy(a, t, **theirs),
                 [x, target], dtype)                              # the gradient in the probabilities too
    else:
        _compare(lambda a, t: F.cross_entropy(a, t, **ours), lambda a, t: TF.cross_entropy(a, t, **theirs),
                 [x, target], dtype, label_positions={1})


_MASK_Q, _MASK_K = R.standard_normal((2, 3, 5, 4)), R.standard_normal((2, 3, 7, 4))
_MASK_V = R.standard_normal((2, 3, 7, 6))
_BOOL_MASK = R.random((3, 5, 7)) < 0.7
_BOOL_MASK[..., 0] = True                                       # every query sees at least one key
ATTENTION_MASKS = {
    "bool": dict(attn_mask=_BOOL_MASK),
    "float": dict(attn_mask=R.standard_normal((2, 1, 5, 7))),
    "causal": dict(is_causal=True),
    "causal_scale": dict(is_causal=True, scale=0.3),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ATTENTION_MASKS)
def test_attention_with_a_mask_matches_torch(name, dtype):
    kwargs = ATTENTION_MASKS[name]
    ours = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v) for k, v in kwargs.items()}
    theirs = {k: (torch.from_numpy(ours[k]) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    _compare(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **ours),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, **theirs), [_MASK_Q, _MASK_K, _MASK_V], dtype)
