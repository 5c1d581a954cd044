"""Optimizers (SGD with momentum, AdamW), a warmup + cosine schedule and gradient clipping.

Updates run in place on the parameters' arrays with the arrays' own library, so they work on NumPy and CuPy
alike. Hyper-parameters stay Python floats, so float32 parameters stay float32.
"""

import math

from minivit import devices


class Optimizer:
    """Base class: parameter groups (each a dict with 'params' and its hyper-parameters) and per-parameter state."""

    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got no parameters to optimise")
        from minivit.tensor import Tensor
        name = type(self).__name__
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups, seen = [], set()
        for g, group in enumerate(groups):
            group = {**defaults, **group}
            group["params"] = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            self._check_hyperparameters(group)
            for p in group["params"]:
                if not isinstance(p, Tensor):
                    raise TypeError(f"{name}: parameters must be Tensors, got {type(p).__name__} in group {g}")
                if id(p) in seen:
                    raise ValueError(f"{name}: a parameter of shape {p.shape} is listed twice (group {g}); it "
                                     "would be stepped twice")
                seen.add(id(p))
            self.param_groups.append(group)
        self.state = {}  # index of the parameter (over all groups, in order) -> dict of arrays and numbers

    def _check_hyperparameters(self, group):
        """Raise ValueError on hyper-parameters PyTorch rejects (see each optimizer)."""

    def _indexed(self):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    def zero_grad(self):
        for _, _, p in self._indexed():
            p.grad = None

    def step(self):
        """One update of every parameter that has a gradient; parameters that do not require grad (a frozen
        position table) are skipped, as PyTorch skips those whose grad is None."""
        for i, group, p in self._indexed():
            if p.grad is not None and p.requires_grad:
                self.update(p, p.grad, group, self.state.setdefault(i, {}))

    def update(self, p, g, group, state):
        raise NotImplementedError

    def state_dict(self):
        """Hyper-parameters of each group and the per-parameter state, arrays as NumPy (host) copies."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"num_params": len(g["params"])}
                  for g in self.param_groups]
        state = {i: {k: devices.asnumpy(v).copy() if hasattr(v, "shape") else v for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [g["num_params"] for g in groups] != sizes:
            raise ValueError(f"{type(self).__name__}.load_state_dict: saved groups hold "
                             f"{[g['num_params'] for g in groups]} parameters, this optimizer {sizes}")
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "num_params"})
        params = [p for _, _, p in self._indexed()]
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[int(i)] = {k: devices.to_device(v, p.device).astype(p.dtype) if hasattr(v, "shape") else v
                                  for k, v in s.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    g <- g + wd * p ;  buf <- momentum * buf + g ;  p <- p - lr * buf   (nesterov: p <- p - lr (g + momentum buf))
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    def _check_hyperparameters(self, group):
        for key in ("lr", "momentum", "weight_decay"):
            if not group[key] >= 0.0:
                raise ValueError(f"SGD: {key} must be >= 0, got {group[key]}")
        if group["nesterov"] and not group["momentum"] > 0:
            raise ValueError("SGD: nesterov=True needs a momentum > 0 (PyTorch's rule)")

    def update(self, p, g, group, state):
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p.data
        if group["momentum"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.copy()
            else:
                buf = state["momentum_buffer"]
                buf *= group["momentum"]
                buf += g
            buf = state["momentum_buffer"]
            g = g + group["momentum"] * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    p <- p (1 - lr wd) ;  m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _check_hyperparameters(self, group):
        for key in ("lr", "eps", "weight_decay"):
            if not group[key] >= 0.0:
                raise ValueError(f"AdamW: {key} must be >= 0, got {group[key]}")
        betas = tuple(group["betas"])
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {group['betas']}")
        group["betas"] = betas

    def update(self, p, g, group, state):
        xp = devices.get_array_module(p.data)
        b1, b2 = group["betas"]
        lr = group["lr"]
        if "exp_avg" not in state:
            state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, xp.zeros_like(p.data), xp.zeros_like(p.data)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            p.data *= 1.0 - lr * group["weight_decay"]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = xp.sqrt(v)
        denom *= 1.0 / math.sqrt(1.0 - b2 ** t)
        denom += group["eps"]
        p.data -= (lr / (1.0 - b1 ** t)) * (m / denom)


def param_groups_weight_decay(model, weight_decay, no_weight_decay=("cls_token", "pos_embed")):
    """Two groups for AdamW: weights with decay, and biases, norm scales and the named tokens without.

    A parameter skips decay when it has at most one axis (biases, LayerNorm weights) or its name is listed.
    Parameters that do not require grad (a fixed sin-cos position embedding) are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name in no_weight_decay or name.split(".")[-1] in no_weight_decay
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """Learning rate: linear warmup to each group's base lr, then a cosine decay to ``min_lr``.

    At step t (0-based, the t-th optimizer step): lr = base (t + 1) / warmup for t < warmup, then
    min_lr + (base - min_lr) (1 + cos(pi (t - warmup) / (total - warmup))) / 2. Call ``step()`` after each
    optimizer step.
    """

    def __init__(self, optimizer, warmup_steps, total_steps, min_lr=0.0):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"WarmupCosine: need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                             f"got warmup_steps={warmup_steps}, total_steps={total_steps}")
        self.optimizer, self.warmup_steps, self.total_steps, self.min_lr = optimizer, warmup_steps, total_steps, min_lr
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.last_step = 0
        self._apply()

    def lr_at(self, step, base_lr):
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_step, group["base_lr"])

    def step(self):
        self.last_step += 1
        self._apply()

    def state_dict(self):
        return {"last_step": self.last_step, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr": self.min_lr}

    def load_state_dict(self, state):
        self.last_step, self.warmup_steps = int(state["last_step"]), int(state["warmup_steps"])
        self.total_steps, self.min_lr = int(state["total_steps"]), float(state["min_lr"])
        self._apply()


def ema_decay(decay, updates):
    """The decay of the ``updates``-th update of a moving average: min(decay, (1 + t) / (10 + t)), so that the
    average forgets its random start within the first few dozen steps instead of the 1 / (1 - decay) it would
    take at full decay."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, parameter by parameter (the two have the same architecture): the
    exponential moving average of the weights over the steps."""
    for average, p in zip(ema.parameters(), model.parameters()):
        average.data *= decay
        average.data += (1.0 - decay) * p.data


def clip_grad_norm_(parameters, max_norm, norm_type=2.0):
    """Scale all gradients in place so that their global norm is at most ``max_norm``, as PyTorch's.

    Args:
        parameters: Tensors (or one Tensor); those without a gradient are ignored.
        max_norm: the largest norm allowed.
        norm_type: p of the p-norm over all gradient entries together (2 by default; ``float('inf')`` or 'inf'
            for the largest absolute entry).

    Returns the norm before clipping as a 0-d array of the gradients' library (no device sync).
    """
    from minivit.tensor import Tensor
    parameters = [parameters] if isinstance(parameters, Tensor) else parameters
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 (or inf), got {norm_type}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    xp = devices.get_array_module(grads[0])
    if math.isinf(norm_type):
        total = xp.max(xp.stack([xp.abs(g).max() for g in grads])).astype(xp.float64)
    elif norm_type == 2.0:
        total = xp.sqrt(sum((g.astype(xp.float64) ** 2).sum() for g in grads))
    else:
        total = sum((xp.abs(g.astype(xp.float64)) ** norm_type).sum() for g in grads) ** (1.0 / norm_type)
    scale = xp.minimum(1.0, max_norm / (total + 1e-6)).astype(grads[0].dtype)
    for g in grads:
        g *= scale
    return total
