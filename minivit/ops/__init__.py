"""Every op of minivit: a Function subclass with a forward and a hand-written backward.

One file per op family; ``minivit.functional`` wraps them under PyTorch's names.
"""

from minivit.ops.arithmetic import AddFn, DivFn, ExpFn, LogFn, MatMulFn, MulFn, NegFn, PowFn, SubFn, TanhFn
from minivit.ops.shape import ConcatFn, GetItemFn, PermuteFn, ReshapeFn, StackFn
from minivit.ops.reduce import MaxFn, MeanFn, SumFn
from minivit.ops.linear import LinearFn
from minivit.ops.activation import DropoutFn, GELUFn
from minivit.ops.softmax import LogSoftmaxFn, SoftmaxFn
from minivit.ops.norm import LayerNormFn
from minivit.ops.attention import MultiHeadSelfAttentionFn, ScaledDotProductAttentionFn
from minivit.ops.loss import CrossEntropyFn
from minivit.ops.patch import PatchifyFn, UnpatchifyFn

__all__ = [
    "AddFn", "SubFn", "MulFn", "DivFn", "NegFn", "PowFn", "ExpFn", "LogFn", "TanhFn", "MatMulFn",
    "ReshapeFn", "PermuteFn", "GetItemFn", "ConcatFn", "StackFn",
    "SumFn", "MeanFn", "MaxFn",
    "LinearFn", "GELUFn", "DropoutFn", "SoftmaxFn", "LogSoftmaxFn", "LayerNormFn",
    "ScaledDotProductAttentionFn", "MultiHeadSelfAttentionFn", "CrossEntropyFn", "PatchifyFn", "UnpatchifyFn",
]
