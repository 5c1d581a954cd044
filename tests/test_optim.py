"""Optimizers, parameter groups, the learning-rate schedule, clipping, and exact resume from saved state."""

import math

import numpy as np
import pytest

from minivit import Tensor, functional as F, nn, optim


def test_sgd_step_by_hand():
    p = nn.Parameter(np.array([1.0, -2.0]))
    opt = optim.SGD([p], lr=0.1, momentum=0.5)
    p.grad = np.array([1.0, 1.0])
    opt.step()
    np.testing.assert_allclose(p.data, [0.9, -2.1])
    p.grad = np.array([1.0, 1.0])
    opt.step()  # buf = 0.5 * 1 + 1 = 1.5
    np.testing.assert_allclose(p.data, [0.75, -2.25])


def test_adamw_first_step_moves_each_weight_by_lr_and_decays_it():
    p = nn.Parameter(np.array([1.0, -1.0, 2.0]))
    opt = optim.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = np.array([3.0, -0.2, 0.0])
    opt.step()
    decayed = np.array([1.0, -1.0, 2.0]) * (1 - 0.1 * 0.5)
    np.testing.assert_allclose(p.data, decayed - 0.1 * np.array([1.0, -1.0, 0.0]), atol=1e-6)


def test_float32_parameters_stay_float32():
    p = nn.Parameter(np.ones(3, np.float32))
    opt = optim.AdamW([p], lr=1e-3)
    p.grad = np.ones(3, np.float32)
    opt.step()
    assert p.dtype == np.float32 and opt.state[0]["exp_avg"].dtype == np.float32


def test_param_groups_skip_decay_on_norms_biases_and_tokens():
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=8, depth=1,
                                 num_heads=2)
    decay, no_decay = optim.param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
         "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"])
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias"} <= {names[id(p)] for p in no_decay["params"]}
    opt = optim.AdamW([decay, no_decay], lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_warmup_then_cosine():
    p = nn.Parameter(np.zeros(1))
    opt = optim.SGD([p], lr=1.0)
    sched = optim.WarmupCosine(opt, warmup_steps=4, total_steps=14, min_lr=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == 1.0
    np.testing.assert_allclose(lrs[9], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.WarmupCosine(opt, warmup_steps=5, total_steps=3)


def test_clip_grad_norm_scales_only_when_needed():
    a, b = nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    norm = optim.clip_grad_norm_([a, b], 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0.0, 0.8], rtol=1e-6)
    norm = optim.clip_grad_norm_([a, b], 10.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0.0, 0.8], rtol=1e-5)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="no parameters"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="must be Tensors"):
        optim.SGD([np.ones(2)], lr=0.1)


def _train(model, opt, sched, steps, x, y):
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_saved_state_resumes_bit_for_bit(which):
    def build():
        model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                     num_heads=2, seed=0)
        groups = optim.param_groups_weight_decay(model, 0.05)
        opt = optim.AdamW(groups, lr=1e-2) if which == "adamw" else optim.SGD(groups, lr=0.1, momentum=0.9)
        return model, opt, optim.WarmupCosine(opt, 2, 8)

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 4)
    straight, opt, sched = build()
    _train(straight, opt, sched, 8, x, y)

    first, opt, sched = build()
    _train(first, opt, sched, 3, x, y)
    saved = (first.state_dict(), opt.state_dict(), sched.state_dict())
    resumed, opt2, sched2 = build()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    _train(resumed, opt2, sched2, 5, x, y)
    for k, v in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[k], v, err_msg=k)


def test_load_state_dict_rejects_another_layout():
    a = optim.SGD([nn.Parameter(np.zeros(2))], lr=0.1)
    b = optim.SGD([nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"saved groups hold \[1\] parameters, this optimizer \[2\]"):
        b.load_state_dict(a.state_dict())


# ------------------------------------------------------------------ validation as PyTorch (issue 17, item 9)
@pytest.mark.parametrize("make, message", [
    (lambda p: optim.SGD([p], lr=0.1, nesterov=True), "nesterov"),
    (lambda p: optim.SGD([p], lr=-0.1), "lr must be >= 0"),
    (lambda p: optim.SGD([p], lr=0.1, momentum=-0.5), "momentum must be >= 0"),
    (lambda p: optim.SGD([p], lr=0.1, weight_decay=-1e-4), "weight_decay must be >= 0"),
    (lambda p: optim.AdamW([p], lr=-1e-3), "lr must be >= 0"),
    (lambda p: optim.AdamW([p], eps=-1e-8), "eps must be >= 0"),
    (lambda p: optim.AdamW([p], betas=(1.0, 0.999)), "betas"),
    (lambda p: optim.AdamW([p], betas=(0.9, -0.1)), "betas"),
    (lambda p: optim.AdamW([p], weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda p: optim.AdamW([{"params": [p], "lr": -1.0}]), "lr must be >= 0"),
    (lambda p: optim.SGD([p, p], lr=0.1), "listed twice"),
    (lambda p: optim.AdamW([{"params": [p]}, {"params": [p], "lr": 0.1}]), "listed twice"),
])
def test_optimizers_reject_what_pytorch_rejects(make, message):
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match=message):
        make(p)


def test_rejections_agree_with_pytorch():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.zeros(2))
    for kwargs in (dict(lr=0.1, nesterov=True), dict(lr=-0.1), dict(lr=0.1, momentum=-0.5)):
        with pytest.raises(ValueError):
            torch.optim.SGD([w], **kwargs)
    for kwargs in (dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            torch.optim.AdamW([w], **kwargs)
    with pytest.raises(ValueError):
        torch.optim.AdamW([{"params": [w]}, {"params": [w]}])


def test_parameters_that_do_not_require_grad_are_accepted_and_never_stepped():
    """AdamW(model.parameters()) raised TypeError on a ViT with the fixed sin-cos position table."""
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1,
                                 num_heads=2, pos_embed="sincos")
    table = model.pos_embed.data.copy()
    opt = optim.AdamW(model.parameters(), lr=0.1)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    F.cross_entropy(model(x), np.array([0, 1])).backward()
    model.pos_embed.grad = np.ones_like(table)            # even a stray gradient does not move it
    before = model.head.weight.data.copy()
    opt.step()
    np.testing.assert_array_equal(model.pos_embed.data, table)
    assert not np.array_equal(model.head.weight.data, before)
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.step()
    np.testing.assert_array_equal(model.pos_embed.data, table)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf"), "inf"])
def test_clip_grad_norm_with_a_norm_type(norm_type):
    gs = [np.array([3.0, -4.0]), np.array([[1.0, 2.0], [0.5, -6.0]])]
    ps = [nn.Parameter(np.zeros_like(g)) for g in gs]
    for p, g in zip(ps, gs):
        p.grad = g.copy()
    flat = np.concatenate([g.ravel() for g in gs])
    p_ = float(norm_type)
    expected = np.abs(flat).max() if np.isinf(p_) else (np.abs(flat) ** p_).sum() ** (1 / p_)
    norm = optim.clip_grad_norm_(ps, 1.0, norm_type=norm_type)
    np.testing.assert_allclose(float(norm), expected, rtol=1e-12)
    got = np.concatenate([p.grad.ravel() for p in ps])
    np.testing.assert_allclose(got, flat / (expected + 1e-6), rtol=1e-12)
    with pytest.raises(ValueError, match="norm_type"):
        optim.clip_grad_norm_(ps, 1.0, norm_type=0)
