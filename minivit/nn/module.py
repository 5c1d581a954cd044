"""Module and Parameter: containers that name their parameters the way PyTorch and timm do."""

from collections import OrderedDict

import numpy as np

from minivit import devices
from minivit.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad=True unless told otherwise)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class of layers and models.

    Assigning a Parameter or a Module to an attribute registers it under that name, in order, so that
    ``named_parameters()`` yields dotted names such as ``blocks.0.attn.qkv.weight``.
    Subclasses call ``super().__init__()`` first and define ``forward``.

    Buffers (``register_buffer``) are Tensors that the module keeps and saves in its state dict but that no
    optimizer updates, such as spectral norm's power-iteration vectors. Forward pre-hooks
    (``register_forward_pre_hook``) run before every forward, as ``hook(module, args)``.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_forward_pre_hooks", [])
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before setting "
                               f"attribute {name!r}")
        if name in self._buffers:
            if not isinstance(value, Tensor) or isinstance(value, Parameter):
                raise TypeError(f"{type(self).__name__}.{name} is a buffer: assign a Tensor (not a Parameter), "
                                f"got {type(value).__name__}")
            self._buffers[name] = value
            object.__setattr__(self, name, value)
            return
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        self._buffers.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name, tensor):
        """Keep ``tensor`` as ``self.<name>``: saved in the state dict and moved by ``to()``, never optimised."""
        if not isinstance(tensor, Tensor) or isinstance(tensor, Parameter):
            raise TypeError(f"register_buffer({name!r}): expected a Tensor (not a Parameter), got "
                            f"{type(tensor).__name__}")
        if name in self._parameters or name in self._modules:
            raise KeyError(f"register_buffer({name!r}): {type(self).__name__} already has a parameter or module "
                           "of that name")
        self._buffers[name] = tensor
        object.__setattr__(self, name, tensor)

    def register_forward_pre_hook(self, hook):
        """Call ``hook(module, args)`` before every forward; returns the hook (remove it from
        ``_forward_pre_hooks`` to stop it)."""
        self._forward_pre_hooks.append(hook)
        return hook

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        for hook in self._forward_pre_hooks:
            hook(self, args)
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------------------------ traversal
    def named_modules(self, prefix=""):
        """(name, module) for this module and every submodule, depth first, in registration order."""
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def named_parameters(self):
        """(dotted name, Parameter) for every parameter, in registration order."""
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        """(dotted name, Tensor) for every buffer, in registration order."""
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), b

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    def _named_state(self):
        """(dotted name, Tensor) for the parameters and then the buffers of each module, as PyTorch orders them."""
        for prefix, module in self.named_modules():
            for name, t in list(module._parameters.items()) + list(module._buffers.items()):
                yield (f"{prefix}.{name}" if prefix else name), t

    def children(self):
        return list(self._modules.values())

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ------------------------------------------------------------------------------------ state
    def state_dict(self):
        """Parameter and buffer name -> NumPy array (a copy, on the host), readable by any tool."""
        return OrderedDict((name, devices.asnumpy(p.data).copy()) for name, p in self._named_state())

    def load_state_dict(self, state_dict, strict=True):
        """Copy values into the parameters and buffers by name, converting to each parameter's dtype and device.

        With ``strict``, every missing, unexpected and mis-shaped key is listed in one ValueError and nothing
        is loaded. Without it, matching keys are loaded and the lists are returned.
        """
        own = OrderedDict(self._named_state())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(np.shape(v))}, model {own[k].shape}"
                      for k, v in state_dict.items() if k in own and tuple(np.shape(v)) != own[k].shape]
        if strict and (missing or unexpected or mismatched):
            problems = []
            if missing:
                problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            if mismatched:
                problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
            raise ValueError(f"load_state_dict into {type(self).__name__} failed:\n  " + "\n  ".join(problems))
        bad = {m.split(":")[0] for m in mismatched}
        for name, p in own.items():
            if name in state_dict and name not in bad:
                value = devices.asnumpy(state_dict[name]).astype(p.dtype)
                p.data = devices.to_device(value, p.device)
        return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}

    # ------------------------------------------------------------------------------------ modes
    def train(self, mode=True):
        for _, module in self.named_modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # ------------------------------------------------------------------------------------ devices
    @property
    def dtype(self):
        params = self.parameters()
        return params[0].dtype if params else np.dtype(np.float32)

    @property
    def device(self):
        params = self.parameters()
        return params[0].device if params else "cpu"

    def to(self, device=None, dtype=None):
        """Move every parameter and buffer to ``device`` and/or convert it to ``dtype`` (floating ones only: an
        integer buffer such as a step count keeps its dtype), in place; returns self."""
        for p in self.parameters() + self.buffers():
            if device is not None:
                p.data = devices.to_device(p.data, device)
            if dtype is not None and p.dtype.kind == "f":
                p.data = p.data.astype(dtype, copy=False)
            if p.grad is not None:
                grad = p.grad if device is None else devices.to_device(p.grad, device)
                p.grad = grad.astype(p.dtype, copy=False)
        return self

    def double(self):
        return self.to(dtype=np.float64)

    def float(self):
        return self.to(dtype=np.float32)

    # ------------------------------------------------------------------------------------ printing
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules registered under '0', '1', ... (timm's ``blocks.0``, ``blocks.1``, ...)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        return list(self._modules.values())[i]
