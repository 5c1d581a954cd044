"""Step through one attention computation and keep every intermediate by name.

    t = attention_trace(x, w_qkv, b_qkv, num_heads=2)      # or block_attention_trace(model, images, block=0)
    print(t)                                                 # each step: formula, shape, values
    t.plot()                                                 # heat maps of scores and probabilities

The steps follow the math of ``minivit.nn.Attention``: x -> qkv = x W^T + b -> q, k, v per head ->
scores = q k^T -> scaled = scores / sqrt(hd) -> probs = softmax(scaled) -> out = probs v -> heads side by side.
Everything is computed in plain NumPy here, independently of the engine's fused op, so the trace can be compared
with it.
"""

import math
from dataclasses import dataclass

import numpy as np

from minivit.devices import asnumpy
from minivit.ops.attention import merge_heads, split_heads


@dataclass
class Step:
    name: str
    formula: str
    value: np.ndarray


class AttentionTrace:
    """The named intermediates of one multi-head self-attention, in order."""

    def __init__(self, steps, num_heads):
        self.steps, self.num_heads = steps, num_heads

    def __getitem__(self, name):
        for s in self.steps:
            if s.name == name:
                return s.value
        raise KeyError(f"no step {name!r}; steps: {', '.join(s.name for s in self.steps)}")

    def names(self):
        return [s.name for s in self.steps]

    def __str__(self, max_values=6):
        lines = []
        for i, s in enumerate(self.steps):
            values = np.array2string(s.value.ravel()[:max_values], precision=4, suppress_small=True)
            more = " ..." if s.value.size > max_values else ""
            lines.append(f"{i:2d}. {s.name:<8} {str(tuple(s.value.shape)):<18} {s.formula}\n"
                         f"    first values: {values}{more}")
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, image=0, path=None):
        """Scores, scaled scores and probabilities of one image, one row per head."""
        from minivit.viz import _save, figure, integer_ticks
        names = ("scores", "scaled", "probs")
        fig = figure(3.2 * len(names), 3 * self.num_heads)
        axes = np.array(fig.subplots(self.num_heads, len(names))).reshape(self.num_heads, len(names))
        for h in range(self.num_heads):
            for j, name in enumerate(names):
                ax = axes[h, j]
                im = ax.imshow(self[name][image, h], cmap="viridis")
                ax.set(title=f"{name}, head {h}", xlabel="key", ylabel="query")
                integer_ticks(ax)
                fig.colorbar(im, ax=ax, fraction=0.046)
        return _save(fig, path)


def attention_trace(x, w_qkv, b_qkv, num_heads):
    """Trace self-attention on tokens x (B, N, D) with a packed qkv projection (3D, D) and bias (3D,) or None."""
    x, w = asnumpy(getattr(x, "data", x)), asnumpy(getattr(w_qkv, "data", w_qkv))
    b = None if b_qkv is None else asnumpy(getattr(b_qkv, "data", b_qkv))
    B, N, D = x.shape
    if w.shape != (3 * D, D):
        raise ValueError(f"attention_trace: w_qkv must be (3D, D) = ({3 * D}, {D}) for x {x.shape}, got {w.shape}")
    if D % num_heads:
        raise ValueError(f"attention_trace: width {D} is not divisible by num_heads {num_heads}")
    hd = D // num_heads
    qkv = x @ w.T + (0 if b is None else b)
    q, k, v = split_heads(qkv, num_heads)                               # (B, nh, N, hd) each
    scores = q @ k.swapaxes(-1, -2)
    scaled = scores / math.sqrt(hd)
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    out = probs @ v
    merged = merge_heads(out)                                           # (B, N, D)
    steps = [Step("x", "the input tokens", x),
             Step("qkv", "x W_qkv^T + b_qkv: queries, keys and values side by side", qkv),
             Step("q", "queries per head: qkv[..., :D] split into heads (B, nh, N, hd)", q),
             Step("k", "keys per head", k),
             Step("v", "values per head", v),
             Step("scores", "q k^T: how well each query matches each key", scores),
             Step("scaled", f"scores / sqrt(hd) = scores / {math.sqrt(hd):.3f}", scaled),
             Step("probs", "softmax over keys: each row sums to 1", probs),
             Step("out", "probs v: a weighted average of the values, per head", out),
             Step("merged", "heads side by side again (B, N, D), before attn.proj", merged)]
    return AttentionTrace(steps, num_heads)


def block_attention_trace(model, images, block=0):
    """Trace the attention of ``model.blocks[block]`` on real images, with the model's own weights.

    The input to the attention is norm1 of the tokens that reach that block, as in the model's forward.
    """
    from minivit.tensor import no_grad
    with no_grad():
        x = model.patch_embed(images)
        if model.num_prefix_tokens:
            from minivit import devices
            from minivit.tensor import concat
            xp = devices.get_array_module(x.data)
            x = concat([model.cls_token * xp.ones((x.shape[0], 1, 1), dtype=x.dtype), x], axis=1)
        x = x + model.pos_embed
        for b in model.blocks[:block]:
            x = b(x)
        attn = model.blocks[block].attn
        tokens = model.blocks[block].norm1(x)
    return attention_trace(tokens, attn.qkv.weight, attn.qkv.bias, attn.num_heads)


def attention_rollout(attentions, residual=True):
    """Attention rollout: how much each output token draws on each input token through all layers.

    Args:
        attentions: per layer, probabilities (B, nh, N, N) (e.g. ``Attention.attn_probs`` with keep_attn).
        residual: add the identity for the residual connection, A' = (A + I) / 2, before multiplying.

    Returns:
        (B, N, N): the product of the head-averaged layer matrices, first layer rightmost.
    """
    result = None
    for probs in attentions:
        a = asnumpy(probs).mean(axis=1)                                 # (B, N, N), heads averaged
        if residual:
            a = 0.5 * (a + np.eye(a.shape[-1]))
            a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else a @ result
    return result
