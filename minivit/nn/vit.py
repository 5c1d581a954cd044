"""The Vision Transformer, with timm's parameter names, shapes and defaults.

Shapes: B batch, C channels, H x W image, P patch, Np = (H/P)(W/P) patches, N = Np + 1 tokens (with the class
token), D = embed_dim, nh heads, hd = D / nh, F = mlp width, K classes.

    images (B,C,H,W) -> patch_embed (B,Np,D) -> [cls_token; x] + pos_embed (B,N,D)
      -> depth x Block: x = x + attn(norm1(x)); x = x + mlp(norm2(x))
      -> norm -> pool: x[:, 0] or the mean of the patch tokens (B,D) -> head (B,K)

With ``patch_kernel=k`` the patch embedding projects overlapping k x k windows centred on the patches (same Np).
With ``stem_channels=(c1, c2, ...)`` convolutions with GELU run on the image before the patch projection: 3x3
with stride 1, or 4x4 windows with stride 2 (``stem_stride=2``), each halving the image.

Keys: patch_embed.stem.{j}.weight (c_j,c_{j-1},k,k) (k = 3, or 4 with stride 2) and .bias with a stem, patch_embed.proj.weight (D,C,P,P)
(or (D,C,k,k); C the last stem width with a stem), cls_token (1,1,D), pos_embed (1,N,D), blocks.{i}.norm1,
.attn.qkv, .attn.proj, .norm2, .mlp.fc1, .mlp.fc2, norm (fc_norm with mean pooling), head.
"""

import math

import numpy as np

from minivit import devices
from minivit import functional as F
from minivit.nn import init
from minivit.nn.layers import GELU, Dropout, Identity, LayerNorm, Linear
from minivit.nn.module import Module, ModuleList, Parameter
from minivit.tensor import concat


def _pair(n):
    return tuple(n) if isinstance(n, (tuple, list)) else (n, n)


class PatchProjection(Module):
    """A convolution with stride P (timm's ``patch_embed.proj``), computed as patchify (or unfold) then linear.

    With ``patch_kernel`` None the kernel is P x P: non-overlapping patches. With a kernel k > P each window of
    side k is centred on its P x P patch (zero padding (k - P)/2 on each side), so the windows overlap but the
    grid stays (H/P) x (W/P): PyTorch's ``Conv2d(C, D, k, stride=P, padding=(k - P)//2)``.

    weight (D, C, k, k), bias (D,); windows are flattened in (C, k, k) order, so weight.reshape(D, -1) is the
    matching (D, C*k*k) linear weight. With ``channels_last`` the input is (B, H, W, C) feature maps (a stem's
    layers), its windows flattened in (k, k, C) order and the weight permuted to (D, k, k, C) to match.
    """

    def __init__(self, in_chans, embed_dim, patch_size, rng, patch_kernel=None):
        super().__init__()
        self.patch_size = patch_size
        self.patch_kernel = check_patch_kernel(patch_kernel, patch_size, "PatchProjection")
        k = patch_size if self.patch_kernel is None else self.patch_kernel
        self.padding = (k - patch_size) // 2
        self.weight = Parameter(np.zeros((embed_dim, in_chans, k, k), dtype=np.float32))
        self.bias = Parameter(np.zeros(embed_dim, dtype=np.float32))
        bound = 1.0 / math.sqrt(in_chans * k * k)  # PyTorch's Conv2d default
        init.uniform_(self.weight, bound, rng)
        init.uniform_(self.bias, bound, rng)

    def forward(self, images, channels_last=False):
        D, k = self.weight.shape[0], self.weight.shape[2]
        if channels_last:                                                               # (B, H, W, C) input
            patches = F.unfold_patches(images, k, self.patch_size, self.padding, channels_last=True)  # (B, Np, k*k*C)
            return F.linear(patches, self.weight.permute(0, 2, 3, 1).reshape(D, -1), self.bias)
        if k == self.patch_size:                                                        # no overlap
            patches = F.patchify(images, self.patch_size)                               # (B, Np, C*P*P)
        else:
            patches = F.unfold_patches(images, k, self.patch_size, self.padding)        # (B, Np, C*k*k)
        return F.linear(patches, self.weight.reshape(D, -1), self.bias)                 # (B, Np, D)

    def extra_repr(self):
        return "" if self.patch_kernel is None else f"patch_kernel={self.patch_kernel}, padding={self.padding}"


def check_patch_kernel(patch_kernel, patch_size, owner="PatchEmbed"):
    """patch_kernel itself, or a ValueError: None, or an integer k >= P with k - P even (windows centred on the
    patches)."""
    if patch_kernel is None:
        return None
    if isinstance(patch_kernel, bool) or not isinstance(patch_kernel, (int, np.integer)):
        raise ValueError(f"{owner}: patch_kernel must be None or an integer >= patch_size {patch_size}, got "
                         f"{patch_kernel!r}")
    if patch_kernel < patch_size:
        raise ValueError(f"{owner}: patch_kernel must be >= patch_size {patch_size} (windows cover their patch), "
                         f"got {patch_kernel}")
    if (patch_kernel - patch_size) % 2:
        raise ValueError(f"{owner}: patch_kernel - patch_size must be even so the window is centred on its patch "
                         f"(expected {patch_size}, {patch_size + 2}, {patch_size + 4}, ...), got {patch_kernel}")
    return int(patch_kernel)


def check_stem_stride(stem_stride, owner="PatchEmbed"):
    """stem_stride itself, or a ValueError: 1 (3x3 convolutions that keep the size) or 2 (4x4 windows with stride
    2 and zero padding 1, which halve it)."""
    if isinstance(stem_stride, bool) or stem_stride not in (1, 2):
        raise ValueError(f"{owner}: stem_stride must be 1 (3x3 convolutions, the size kept) or 2 (4x4 windows, "
                         f"stride 2), got {stem_stride!r}")
    return int(stem_stride)


def stem_kernel(stem_stride):
    """The window side of a stem convolution of this stride: 3 for stride 1, 4 for stride 2 (padding 1 both)."""
    return 3 if stem_stride == 1 else 2 * stem_stride


def check_stem_channels(stem_channels, owner="PatchEmbed"):
    """stem_channels as a tuple of positive integers (empty: no stem), or a ValueError."""
    try:
        channels = tuple(stem_channels or ())
    except TypeError:                                   # a single number: a tuple of widths was expected
        channels = (None,)
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ValueError(f"{owner}: stem_channels must be positive integers (the widths of the 3x3 convolutions), "
                         f"got {stem_channels!r}")
    return tuple(int(c) for c in channels)


class PatchEmbed(Module):
    """Split images into patches and project each patch to an embed_dim vector.

    ``patch_kernel`` (None or an integer k >= P, k - P even): project overlapping k x k windows centred on the
    patches instead of the patches themselves (see ``PatchProjection``); the number of tokens is unchanged.

    ``stem_channels`` (c1, c2, ...): a convolutional stem before the projection, one layer per width, each
    followed by GELU. With ``stem_stride=1`` a layer is a 3x3 convolution with zero padding 1 (the image keeps its
    size); with ``stem_stride=2`` it reads 4x4 windows with stride 2 and padding 1 (PyTorch's ``Conv2d(c, c', 4,
    stride=2, padding=1)``), halving the image, so that the projection then takes patches of P / 2^L pixels of
    the stem's output (L layers) and the tokens keep their P x P footprint and their number; ``patch_kernel`` is
    then a window side on that grid. Each pixel the projection reads carries its neighbourhood, an
    early-convolution inductive bias (Xiao et al., 2021, "Early convolutions help transformers see better", whose
    stems use stride 2 and BatchNorm; here no norm). Each layer is a ``PatchProjection`` (patch = stride, kernel 3
    or 4), so it is unfold and linear: no new op.

    Shapes: images (B, C, H, W) -> stem (B, H / s^L, W / s^L, c_last) -> tokens (B, Np, D)
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, rng=None, patch_kernel=None,
                 stem_channels=(), stem_stride=1):
        super().__init__()
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
            raise ValueError(f"PatchEmbed: patch_size must be a positive integer, got {patch_size!r}")
        self.img_size, self.patch_size, self.in_chans = _pair(img_size), patch_size, in_chans
        H, W = self.img_size
        if H % patch_size or W % patch_size:
            raise ValueError(f"PatchEmbed: image {H}x{W} is not divisible by patch_size {patch_size}")
        self.stem_channels = check_stem_channels(stem_channels)
        self.stem_stride = check_stem_stride(stem_stride)
        shrink = self.stem_stride ** len(self.stem_channels)                    # image side / stem output side
        if patch_size % shrink:
            raise ValueError(f"PatchEmbed: patch_size {patch_size} is not divisible by {shrink}, the stride of "
                             f"{len(self.stem_channels)} stem layers of stride {self.stem_stride}")
        self.proj_patch = patch_size // shrink                                  # in pixels of the stem's output
        self.patch_kernel = check_patch_kernel(patch_kernel, self.proj_patch)
        self.grid_size = (H // patch_size, W // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        rng = rng or init.default_rng()
        widths = (in_chans, *self.stem_channels)
        self.stem = ModuleList(PatchProjection(c_in, c_out, self.stem_stride, rng,
                                               patch_kernel=stem_kernel(self.stem_stride))
                               for c_in, c_out in zip(widths[:-1], widths[1:]))
        self.proj = PatchProjection(widths[-1], embed_dim, self.proj_patch, rng, patch_kernel)

    def forward_stem(self, images):
        """(B, C, H, W) images -> (B, H / s^L, W / s^L, c_last) features of the convolutional stem, channels last:
        each layer's linear map gives one row of channels per pixel, which the next layer reads as it is (see
        ``minivit.ops.patch``). Without a stem: the images, unchanged."""
        x = images
        B, _, H, W = images.shape
        for j, conv in enumerate(self.stem):
            H, W = H // self.stem_stride, W // self.stem_stride
            x = F.gelu(conv(x, channels_last=j > 0))                           # (B, H*W, c): one row per pixel
            x = x.reshape(B, H, W, x.shape[2])                                  # (B, H, W, c)
        return x

    def forward(self, images):
        if not hasattr(images, "dtype") or not hasattr(images, "ndim"):
            raise TypeError(f"PatchEmbed: images must be an array or a Tensor (B, C, H, W), got "
                            f"{type(images).__name__}; wrap a list with np.asarray(..., dtype=np.float32)")
        if images.dtype.kind != "f":
            raise TypeError(f"PatchEmbed: images must be floating-point, got dtype {images.dtype}; convert "
                            "8-bit images with images.astype(np.float32) / 255 (and normalise as in training)")
        expected = (self.in_chans, *self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"PatchEmbed: expected images (B, {', '.join(map(str, expected))}), "
                             f"got shape {tuple(images.shape)}")
        return self.proj(self.forward_stem(images), channels_last=bool(self.stem))

    def extra_repr(self):
        kernel = "" if self.patch_kernel is None else f", patch_kernel={self.patch_kernel}"
        kernel += f", stem_channels={self.stem_channels}" if self.stem_channels else ""
        kernel += f", stem_stride={self.stem_stride}" if self.stem_stride != 1 else ""
        return f"img_size={self.img_size}, patch_size={self.patch_size}{kernel}, in_chans={self.in_chans}"


class Attention(Module):
    """Multi-head self-attention: one qkv projection, nh heads of width hd = D / nh, an output projection.

    Set ``keep_attn = True`` to keep the last attention probabilities (B, nh, N, N) in ``attn_probs``.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_drop=0.0, rng=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        rng = rng or init.default_rng()
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias, rng=rng)
        self.proj = Linear(dim, dim, rng=rng)
        self.proj_drop = Dropout(proj_drop)
        self.keep_attn, self.attn_probs = False, None

    def forward(self, x):
        # One fused op for: qkv.reshape(B, N, 3, nh, hd) -> q, k, v (B, nh, N, hd) -> softmax(q k^T / sqrt(hd)) v
        # -> heads side by side (B, N, D); see F.multi_head_self_attention.
        qkv = self.qkv(x)                                                             # (B, N, 3D)
        if self.keep_attn:
            out, probs = F.multi_head_self_attention(qkv, self.num_heads, return_attn=True)  # (B, N, D)
            self.attn_probs = probs.data                                              # (B, nh, N, N), a copy
        else:
            out = F.multi_head_self_attention(qkv, self.num_heads)
        return self.proj_drop(self.proj(out))

    def extra_repr(self):
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class Mlp(Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, applied to every token."""

    def __init__(self, in_features, hidden_features, drop=0.0, approximate="none", rng=None):
        super().__init__()
        rng = rng or init.default_rng()
        self.fc1 = Linear(in_features, hidden_features, rng=rng)
        self.act = GELU(approximate)
        self.drop1 = Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features, rng=rng)
        self.drop2 = Dropout(drop)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, F)
        return self.drop2(self.fc2(x))         # (B, N, D)


class Block(Module):
    """A pre-norm transformer encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_drop=0.0, approximate="none",
                 rng=None):
        super().__init__()
        rng = rng or init.default_rng()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, rng=rng)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, approximate=approximate, rng=rng)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # (B, N, D)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(Module):
    """A ViT classifier with timm's names and defaults (ViT-B/16 when called with no arguments).

    Args:
        img_size: image side (int) or (H, W).
        patch_size: patch side P; the image must divide into whole patches.
        in_chans: image channels C.
        num_classes: K, the width of the head; 0 for no head (as timm): the model then returns the pooled
            (B, D) features.
        global_pool: 'token' (the class token's output) or 'avg' (mean of the patch tokens, then fc_norm).
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads; must divide embed_dim.
        mlp_ratio: MLP width F = mlp_ratio * D.
        qkv_bias: a bias in the qkv projection.
        class_token: prepend a learned class token (needed for 'token' pooling).
        pos_embed: 'learn' (learned, initialised N(0, 0.02^2)) or 'sincos' (fixed 2-D sine-cosine).
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout after the attention and MLP projections.
        act_approximate: 'none' for exact GELU, 'tanh' for its tanh form.
        patch_kernel: None for non-overlapping P x P patches; an integer k > P (k - P even) for overlapping
            k x k windows centred on the patches (a Conv2d with kernel k, stride P, padding (k - P)/2); the
            number of tokens is the same. patch_embed.proj.weight is then (D, C, k, k).
        stem_channels: widths of convolutions (each followed by GELU) before the patch projection (see
            ``PatchEmbed``); empty for none.
        stem_stride: 1 for 3x3 stem convolutions that keep the image's size, 2 for 4x4 windows with stride 2
            (each layer halves the image; patch_size counts pixels of the image, patch_kernel of the stem's
            output).
        seed: seeds the weights (drawn on the host with NumPy, identical on every backend).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                 pos_embed="learn", drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, act_approximate="none",
                 seed=0, patch_kernel=None, stem_channels=(), stem_stride=1):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"VisionTransformer: global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("VisionTransformer: global_pool='token' needs class_token=True")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"VisionTransformer: pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        if embed_dim % num_heads:
            raise ValueError(f"VisionTransformer: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
            raise ValueError(f"VisionTransformer: num_classes must be an integer >= 0 (0: no head, pooled "
                             f"features out), got {num_classes!r}")
        rng = np.random.default_rng(seed)
        self.num_classes, self.global_pool, self.embed_dim = num_classes, global_pool, embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                           global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=class_token, pos_embed=pos_embed,
                           drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                           act_approximate=act_approximate, seed=seed)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, rng=rng,
                                      patch_kernel=patch_kernel, stem_channels=stem_channels,
                                      stem_stride=stem_stride)
        if patch_kernel is not None:  # configs (and checkpoints) without the key mean non-overlapping patches
            self.config["patch_kernel"] = self.patch_embed.patch_kernel
        if self.patch_embed.stem_channels:  # (and without this one, no stem)
            self.config["stem_channels"] = list(self.patch_embed.stem_channels)
        if self.patch_embed.stem_stride != 1:  # (and without this one, stride 1)
            self.config["stem_stride"] = self.patch_embed.stem_stride
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        if class_token:
            self.cls_token = Parameter(np.zeros((1, 1, embed_dim), dtype=np.float32))
            init.normal_(self.cls_token, 1e-6, rng)
        self.pos_embed = Parameter(np.zeros((1, num_tokens, embed_dim), dtype=np.float32),
                                   requires_grad=pos_embed == "learn")
        if pos_embed == "learn":
            init.trunc_normal_(self.pos_embed, 0.02, rng)
        else:
            table = init.sincos_2d(embed_dim, self.patch_embed.grid_size)              # (Np, D)
            prefix = np.zeros((self.num_prefix_tokens, embed_dim))                      # the class token: no position
            self.pos_embed.data = np.concatenate([prefix, table])[None].astype(np.float32)
        self.pos_drop = Dropout(pos_drop_rate, seed=seed + 1)

        self.blocks = ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                       proj_drop=proj_drop_rate, approximate=act_approximate, rng=rng)
                                 for _ in range(depth))
        # timm: the final norm sits before pooling for 'token', after pooling (as fc_norm) for 'avg'.
        if global_pool == "avg":
            self.norm, self.fc_norm = Identity(), LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm, self.fc_norm = LayerNorm(embed_dim, eps=1e-6), Identity()
        self.head_drop = Dropout(drop_rate, seed=seed + 2)
        self.head = Linear(embed_dim, num_classes, rng=rng) if num_classes > 0 else Identity()

        # timm's init: every Linear weight N(0, 0.02^2) truncated, biases zero; the patch projection keeps
        # PyTorch's Conv2d default.
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                init.trunc_normal_(module.weight, 0.02, rng)
                if module.bias is not None:
                    init.zeros_(module.bias)
        for i, block in enumerate(self.blocks):
            for layer, seed_offset in ((block.attn.proj_drop, 0), (block.mlp.drop1, 1), (block.mlp.drop2, 2)):
                layer.seed = seed + 100 + 3 * i + seed_offset

    def forward_features(self, images):
        """(B, C, H, W) images -> (B, N, D) normalised tokens."""
        x = self.patch_embed(images)                                          # (B, Np, D)
        if self.num_prefix_tokens:
            xp = devices.get_array_module(x.data)
            ones = xp.ones((x.shape[0], 1, 1), dtype=x.dtype)
            x = concat([self.cls_token * ones, x], axis=1)                    # (B, N, D); one token per image
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        """(B, N, D) tokens -> (B, K) logits (or the pooled (B, D) features with ``pre_logits`` or without a head,
        num_classes=0)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(axis=1)                    # (B, D)
        else:
            x = x[:, 0]                                                       # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images):
        return self.forward_head(self.forward_features(images))

    def extra_repr(self):
        c = self.config
        return (f"img_size={c['img_size']}, patch_size={c['patch_size']}, embed_dim={c['embed_dim']}, "
                f"depth={c['depth']}, num_heads={c['num_heads']}, num_classes={c['num_classes']}")
