"""Every op of minivit: a Function subclass with a forward, a hand-written backward and its graph twin.

One file per op family; ``minivit.functional`` wraps them under PyTorch's names. ``all_ops()`` lists the op
classes defined here (the tests check each one's first and second derivatives).
"""

import importlib
import inspect
import pkgutil

from minivit.ops.arithmetic import (AddFn, CastFn, DivFn, ExpFn, LogFn, MatMulFn, MulFn, NegFn, PowFn, RPowFn,
                                   SubFn, TanhFn)
from minivit.ops.erf import ErfFn
from minivit.ops.shape import ConcatFn, GetItemFn, IndexAddFn, PermuteFn, ReshapeFn, StackFn
from minivit.ops.reduce import BroadcastToFn, MaxFn, MeanFn, SumFn
from minivit.ops.linear import LinearFn
from minivit.ops.activation import DropoutFn, GELUFn
from minivit.ops.softmax import LogSoftmaxFn, SoftmaxFn
from minivit.ops.norm import LayerNormFn
from minivit.ops.attention import MultiHeadSelfAttentionFn, ScaledDotProductAttentionFn
from minivit.ops.loss import CrossEntropyFn
from minivit.ops.patch import FoldFn, PatchifyFn, UnfoldFn, UnpatchifyFn
from minivit.ops.logistic import BinaryCrossEntropyWithLogitsFn, LogSigmoidFn, SigmoidFn, SoftplusFn
from minivit.ops.l2attention import L2AttentionFn
from minivit.ops.vae import BernoulliLogLikelihoodFn, GaussianKLFn, GaussianLogLikelihoodFn, ReparameterizeFn

__all__ = [
    "AddFn", "SubFn", "CastFn", "MulFn", "DivFn", "NegFn", "PowFn", "RPowFn", "ExpFn", "LogFn", "TanhFn", "ErfFn",
    "MatMulFn",
    "ReshapeFn", "PermuteFn", "GetItemFn", "IndexAddFn", "ConcatFn", "StackFn",
    "SumFn", "MeanFn", "MaxFn", "BroadcastToFn",
    "LinearFn", "GELUFn", "DropoutFn", "SoftmaxFn", "LogSoftmaxFn", "LayerNormFn",
    "ScaledDotProductAttentionFn", "MultiHeadSelfAttentionFn", "CrossEntropyFn", "PatchifyFn", "UnpatchifyFn",
    "UnfoldFn", "FoldFn",
    "SigmoidFn", "SoftplusFn", "LogSigmoidFn", "BinaryCrossEntropyWithLogitsFn", "L2AttentionFn",
    "ReparameterizeFn", "GaussianKLFn", "BernoulliLogLikelihoodFn", "GaussianLogLikelihoodFn",
    "all_ops",
]


def all_ops():
    """Every op class defined in a module of this package, found by walking its files (not from a list)."""
    from minivit.function import Function

    found = []
    for info in pkgutil.iter_modules(__path__, __name__ + "."):
        module = importlib.import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, Function) and cls.__module__ == module.__name__]
    return found
