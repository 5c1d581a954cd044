"""Mixed precision (minivit.amp): the autocast policy against PyTorch's, the loss scaler against
torch.amp.GradScaler, loss scaling against float16 underflow, and ``minivit train --amp``."""

import numpy as np
import pytest

import minivit
from minivit import Tensor, checkpoint, cli, nn, optim
from minivit import functional as F
from minivit.amp import POLICY, GradScaler, autocast
from minivit.function import Function

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 8, 16)).astype(np.float32)
W = RNG.standard_normal((16, 16)).astype(np.float32)
LABELS = np.arange(4) % 16

# name -> (minivit on Tensors, PyTorch on tensors): the ViT's ops that both libraries have.
OPS = {
    "linear": (lambda x, w: F.linear(x, w), lambda x, w: torch.nn.functional.linear(x, w)),
    "matmul": (lambda x, w: x @ w, lambda x, w: x @ w),
    "softmax": (lambda x, w: F.softmax(x), lambda x, w: torch.softmax(x, -1)),
    "log_softmax": (lambda x, w: F.log_softmax(x), lambda x, w: torch.log_softmax(x, -1)),
    "layer_norm": (lambda x, w: F.layer_norm(x, Tensor(np.ones(16, np.float32)), Tensor(np.zeros(16, np.float32))),
                   lambda x, w: torch.nn.functional.layer_norm(x, (16,))),
    "cross_entropy": (lambda x, w: F.cross_entropy(x[:, 0], LABELS),
                      lambda x, w: torch.nn.functional.cross_entropy(x[:, 0], torch.as_tensor(LABELS))),
    "sum": (lambda x, w: x.sum(), lambda x, w: x.sum()),
    "mean": (lambda x, w: x.mean(), lambda x, w: x.mean()),
    "exp": (lambda x, w: x.exp(), lambda x, w: x.exp()),
    "gelu": (lambda x, w: F.gelu(x), lambda x, w: torch.nn.functional.gelu(x)),
    "add": (lambda x, w: x + x, lambda x, w: x + x),
    "attention": (lambda x, w: F.scaled_dot_product_attention(x, x, x),
                  lambda x, w: torch.nn.functional.scaled_dot_product_attention(x, x, x)),
}
# Where minivit chooses otherwise, and why (see minivit/amp.py): its attention computes the softmax inside, in
# its inputs' dtype, so it runs in float32.
DIFFERS = {"attention"}
torch = None


@pytest.mark.torch
@pytest.mark.parametrize("name", OPS)
def test_each_op_runs_in_the_dtype_that_torch_autocast_chooses(name):
    global torch
    torch = pytest.importorskip("torch")
    ours, theirs = OPS[name]
    with autocast(dtype="float16"):
        mine = ours(Tensor(X), Tensor(W)).dtype
    with torch.autocast("cpu", dtype=torch.float16):
        reference = str(theirs(torch.as_tensor(X), torch.as_tensor(W)).dtype).removeprefix("torch.")
    if name in DIFFERS:
        assert (str(mine), reference) == ("float32", "float16")
    else:
        assert str(mine) == reference


def test_outside_autocast_every_op_runs_in_float32_and_inside_the_weights_stay_float32():
    model = nn.Linear(16, 4)
    with autocast():
        y = model(Tensor(X))
        loss = F.cross_entropy(y[:, 0], LABELS[:4] % 4)
    assert (y.dtype, loss.dtype) == (np.float16, np.float32)
    loss.backward()
    assert all(p.dtype == p.grad.dtype == np.float32 for p in model.parameters())
    assert model(Tensor(X)).dtype == np.float32


def test_every_op_in_the_policy_is_an_op_and_autocast_refuses_other_dtypes():
    assert minivit.autocast is autocast and minivit.GradScaler is GradScaler
    assert all(issubclass(op, Function) for op in POLICY)
    for dtype in ("float64", "bfloat16", "int8"):
        with pytest.raises((ValueError, TypeError)):
            with autocast(dtype=dtype):
                pass


def _tiny_classifier():
    """fc1 -> GELU -> fc2 (16 -> 32 -> 16 classes), the same weights each time."""
    return nn.Mlp(16, 32, rng=np.random.default_rng(1))


def _train_small_gradients(steps, scaler, amp=True):
    """Train on a loss whose gradients are about 1e-9: below float16's smallest subnormal (6e-8), as deep in a
    network late in training. AdamW does not care about the size of its gradients, only whether they are there."""
    model = _tiny_classifier()
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = Tensor(RNG.standard_normal((64, 16)).astype(np.float32)), RNG.integers(0, 4, 64)
    losses, nonzero = [], []
    for _ in range(steps):
        with autocast(enabled=amp):
            loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        scaler.scale(loss * 1e-6).backward()
        nonzero.append(np.mean([np.count_nonzero(p.grad) / p.grad.size for p in model.parameters()]))
        scaler.step(opt)
        scaler.update()
    return losses, nonzero


def test_loss_scaling_trains_where_float16_gradients_underflow_to_zero():
    losses, nonzero = _train_small_gradients(20, GradScaler(enabled=False))
    assert max(nonzero) == 0 and losses[-1] == losses[0]          # float16 flushed every gradient to zero
    losses32, nonzero32 = _train_small_gradients(20, GradScaler(enabled=False), amp=False)
    assert min(nonzero32) > 0.5                                     # float32 keeps them
    losses, nonzero = _train_small_gradients(20, GradScaler())
    assert min(nonzero) > 0.5 and losses[-1] < 0.8 * losses[0]     # scaled by 2^16 they survive and it trains


def _step_with(scaler, opt, params, overflow):
    for p in params:
        p.grad = np.full(p.shape, np.inf if overflow else 0.5, np.float32) * scaler.get_scale()
    taken = scaler.step(opt)
    scaler.update()
    return taken


def test_an_overflow_skips_the_step_leaving_weights_and_optimizer_untouched_and_halves_the_scale():
    model = _tiny_classifier()
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    scaler = GradScaler()
    assert _step_with(scaler, opt, model.parameters(), overflow=False)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    state = {i: {k: np.copy(v) for k, v in s.items()} for i, s in opt.state.items()}
    assert not _step_with(scaler, opt, model.parameters(), overflow=True)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    assert all(np.array_equal(state[i][k], v) for i, s in opt.state.items() for k, v in s.items())
    assert scaler.get_scale() == 2.0**15


@pytest.mark.torch
def test_the_scale_follows_torch_grad_scaler_on_the_same_overflow_pattern():
    torch = pytest.importorskip("torch")
    pattern = [False, False, False, True, False, True, True, False, False, False, False, False, False, True]
    ours = GradScaler(init_scale=1024.0, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    w = Tensor(np.ones(3, np.float32), requires_grad=True)
    opt = optim.SGD([w], lr=0.1)
    tw = torch.ones(3, requires_grad=True)
    topt = torch.optim.SGD([tw], lr=0.1)
    scales, torch_scales = [], []
    for overflow in pattern:
        _step_with(ours, opt, [w], overflow)
        scales.append(ours.get_scale())
        theirs.scale(tw.sum()).backward()
        tw.grad.fill_(float("inf") if overflow else 0.5 * theirs.get_scale())
        theirs.step(topt)
        theirs.update()
        topt.zero_grad()
        torch_scales.append(theirs.get_scale())
    assert scales == torch_scales
    assert np.allclose(w.data, tw.detach().numpy())
    assert {k: ours.state_dict()[k] for k in ("scale", "_growth_tracker")} == {
        k: theirs.state_dict()[k] for k in ("scale", "_growth_tracker")}


def test_scaler_misuse_and_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="backoff_factor"):
        GradScaler(backoff_factor=2.0)
    model = _tiny_classifier()
    opt = optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler()
    with pytest.raises(RuntimeError, match="no step"):
        scaler.update()
    for p in model.parameters():
        p.grad = np.ones(p.shape, np.float32)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(opt)


def test_minivit_train_amp_saves_and_restores_the_scaler(tmp_path):
    small = ["--limit", "100", "--embed-dim", "8", "--depth", "1", "--num-heads", "2", "--batch-size", "50",
             "--no-progress"]
    assert cli.main(["train", "--amp", "--epochs", "1", "--out", str(tmp_path / "run")] + small) == 0
    ckpt = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ckpt.train_settings["amp"] is True
    assert ckpt.scaler_state["scale"] == 2.0**16 and ckpt.scaler_state["_growth_tracker"] == 2
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 0
    ckpt = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ckpt.scaler_state["_growth_tracker"] == 4
