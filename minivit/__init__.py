"""minivit: a Vision Transformer engine in NumPy with a hand-written backward for every op."""

from minivit import allocator
from minivit.parallel import get_num_threads, set_num_threads
from minivit.rng import manual_seed
from minivit.tensor import Tensor, concat, enable_grad, is_grad_enabled, no_grad, set_grad_enabled, stack
from minivit.autograd import grad, hvp
from minivit import functional, nn, optim
from minivit.gradcheck import gradcheck, gradgradcheck
from minivit.amp import GradScaler, autocast

__version__ = "0.1.0"

allocator.tune_on_import()   # keep freed memory for the next step: see minivit/allocator.py

__all__ = ["Tensor", "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled", "concat", "stack", "grad",
           "hvp", "manual_seed", "set_num_threads", "get_num_threads", "functional", "nn", "optim", "gradcheck",
           "gradgradcheck", "autocast", "GradScaler", "__version__"]
