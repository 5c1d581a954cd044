"""The composed twins of the fused ops, gathered in one place: each is built from primitives (+, *, exp, sum,
@, ...) and differentiated by autograd.

Each twin lives in its op's file, above the fused op, as that file's readable version of the math; this module
only collects them under the names of ``minivit.functional``. They are slower and hungrier for memory than the
fused ops (every intermediate is kept for backward), but each line is a line of the math. The lessons start
from them, and the tests check that fused and composed agree in values and in gradients.
"""

from minivit.ops.activation import gelu_composed as gelu, gelu_tanh_composed as gelu_tanh
from minivit.ops.attention import multi_head_self_attention_composed as multi_head_self_attention
from minivit.ops.attention import scaled_dot_product_attention_composed as scaled_dot_product_attention
from minivit.ops.l2attention import l2_distance_attention_composed as l2_distance_attention
from minivit.ops.linear import linear_composed as linear
from minivit.ops.logistic import binary_cross_entropy_with_logits_composed as binary_cross_entropy_with_logits
from minivit.ops.logistic import logsigmoid_composed as logsigmoid, sigmoid_composed as sigmoid
from minivit.ops.logistic import softplus_composed as softplus
from minivit.ops.loss import cross_entropy_composed as cross_entropy
from minivit.ops.norm import layer_norm_composed as layer_norm
from minivit.ops.patch import fold_composed, from_patches, to_patches, unfold_composed
from minivit.ops.softmax import log_softmax_composed as log_softmax, softmax_composed as softmax

__all__ = ["linear", "softmax", "log_softmax", "layer_norm", "gelu", "gelu_tanh", "scaled_dot_product_attention",
           "multi_head_self_attention", "cross_entropy", "patchify", "unpatchify", "unfold_patches", "fold_patches",
           "sigmoid", "softplus", "logsigmoid", "binary_cross_entropy_with_logits", "l2_distance_attention"]


def patchify(images, patch_size):
    """Images as flattened patches, by reshape and permute.  Shapes: (B, C, H, W) -> (B, H/P * W/P, C*P*P)"""
    return to_patches(images, patch_size)


def unpatchify(patches, patch_size, grid):
    """Patches back into images, by reshape and permute.  Shapes: (B, gh*gw, C*P*P) -> (B, C, gh*P, gw*P)"""
    return from_patches(patches, patch_size, grid)


def unfold_patches(images, kernel_size, stride=None, padding=0, channels_last=False):
    """Overlapping windows, by padding and strided slicing.  Shapes: (B, C, H, W) -> (B, gh*gw, C*k*k);
    channels_last: (B, H, W, C) -> (B, gh*gw, k*k*C)"""
    return unfold_composed(images, kernel_size, kernel_size if stride is None else stride, padding, channels_last)


def fold_patches(patches, image_size, kernel_size, stride=None, padding=0, channels_last=False):
    """Windows added back into images, by strided index-adds and a crop.  Shapes: (B, gh*gw, C*k*k) -> (B, C, H, W);
    channels_last: (B, gh*gw, k*k*C) -> (B, H, W, C)"""
    return fold_composed(patches, tuple(image_size), kernel_size, kernel_size if stride is None else stride, padding,
                         channels_last)
