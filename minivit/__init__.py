"""minivit: a Vision Transformer engine in NumPy with a hand-written backward for every op."""

from minivit.backend import manual_seed, set_num_threads
from minivit.tensor import Tensor, concat, is_grad_enabled, no_grad, stack
from minivit import functional, nn, optim
from minivit.gradcheck import gradcheck

__version__ = "0.1.0"

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "concat", "stack", "manual_seed", "set_num_threads", "functional",
           "nn", "optim", "gradcheck", "__version__"]
