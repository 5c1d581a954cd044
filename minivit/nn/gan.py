"""A ViT that generates images and a ViT that tells real images from generated ones (after ViTGAN, Lee et al. 2022).

Shapes: B batch, C channels, H x W image, P patch, Np = (H/P)(W/P) patches, D = embed_dim, L = latent_dim.

The generator turns noise into an image through Transformer blocks:

    z (B, L) -> mapping MLP -> w (B, L)
    tokens: pos_embed (1, Np, D) + latent_proj(w) (B, 1, D)   one learned token per patch, plus the sample's w
      -> depth x GeneratorBlock: x = x + attn(norm1(x, w)); x = x + mlp(norm2(x, w))   (norms: SLN driven by w)
      -> norm(x, w) -> head: each token to the C*P*P pixels of its patch (B, Np, C*P*P)
      -> unpatchify (B, C, H, W) -> output='tanh': tanh, pixels in (-1, 1)
                                    output='linear': the values as they are (logits or means, for the VAE)

The self-modulated LayerNorms (``SelfModulatedLayerNorm``) let every block see w, not only the input. The same
class, with output='linear', is the decoder of the VAE (``minivit.nn.vae.ViTVAE``): one decoder for both models.

The discriminator is the classifier ViT with a one-logit head, with the options ViTGAN uses to keep it Lipschitz:

    attention='l2'        L2-distance attention with one shared projection for queries and keys (Kim et al. 2021)
    spectral_norm='plain' every Linear and the patch projection divided by its spectral norm (Miyato et al. 2018)
    spectral_norm='improved'  ... and multiplied by its spectral norm at initialisation (ViTGAN)

and the patches ViTGAN's discriminator cuts:

    patch_kernel=k        overlapping k x k windows centred on the P x P patches (the unfold op,
                          ``F.unfold_patches``), as many tokens as patches; None: the ViT's non-overlapping patches

and one option against mode collapse from ProGAN (Karras et al. 2018):

    minibatch_std=g       the head also reads how much the pooled features vary across each group of g images
                          (``MinibatchStd``): a generator that draws the same image for every z gives a group
                          spread near 0, which real images never do, so the discriminator can tell them apart
"""

import numpy as np

from minivit import devices
from minivit import functional as F
from minivit.nn import init
from minivit.nn.layers import GELU, Linear
from minivit.nn.modulation import SelfModulatedLayerNorm
from minivit.nn.module import Module, ModuleList, Parameter
from minivit.nn.utils import improved_spectral_norm, spectral_norm
from minivit.nn.vit import Attention, Mlp, PatchProjection, VisionTransformer, _pair
from minivit.tensor import Tensor, concat

__all__ = ["MappingNetwork", "GeneratorBlock", "ViTGenerator", "L2Attention", "MinibatchStd", "ViTDiscriminator"]


def _check_grid(name, img_size, patch_size, embed_dim, num_heads):
    H, W = _pair(img_size)
    if H % patch_size or W % patch_size:
        raise ValueError(f"{name}: image {H}x{W} is not divisible by patch_size {patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"{name}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    return H // patch_size, W // patch_size


def _trunc_normal_linears(module, rng):
    """timm's init for every Linear below ``module``: weights N(0, 0.02^2) truncated, biases zero."""
    for _, layer in module.named_modules():
        if isinstance(layer, Linear):
            init.trunc_normal_(layer.weight, 0.02, rng)
            if layer.bias is not None:
                init.zeros_(layer.bias)


# ------------------------------------------------------------------------------------------------ generator
class MappingNetwork(Module):
    """z -> w: ``depth`` Linear layers of width L with GELUs between them (StyleGAN's mapping, smaller)."""

    def __init__(self, latent_dim, depth=2, rng=None):
        super().__init__()
        self.layers = ModuleList(Linear(latent_dim, latent_dim, rng=rng) for _ in range(depth))
        self.act = GELU()

    def forward(self, z):
        for i, layer in enumerate(self.layers):
            z = layer(z if i == 0 else self.act(z))
        return z


class GeneratorBlock(Module):
    """A pre-norm Transformer block whose two LayerNorms are self-modulated by w:
    x + attn(SLN(x, w)), then x + mlp(SLN(x, w))."""

    def __init__(self, dim, num_heads, latent_dim, mlp_ratio=4.0, rng=None):
        super().__init__()
        self.norm1 = SelfModulatedLayerNorm(dim, latent_dim, rng=rng)
        self.attn = Attention(dim, num_heads, qkv_bias=True, rng=rng)
        self.norm2 = SelfModulatedLayerNorm(dim, latent_dim, rng=rng)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rng=rng)

    def forward(self, x, w):
        x = x + self.attn(self.norm1(x, w))                # (B, Np, D)
        return x + self.mlp(self.norm2(x, w))


GENERATOR_OUTPUTS = ("tanh", "linear")


class ViTGenerator(Module):
    """Noise (B, latent_dim) -> images (B, C, H, W) through Transformer blocks: pixels in (-1, 1) (tanh), or
    unbounded values (linear).

    Args:
        img_size: image side (int) or (H, W).
        patch_size: P; each output token becomes one P x P patch.
        in_chans: C, the channels of the images made.
        latent_dim: L, the size of z and w.
        embed_dim, depth, num_heads, mlp_ratio: the blocks, as in the ViT.
        mapping_depth: Linear layers of the mapping z -> w.
        output: 'tanh' (a GAN's pixels in (-1, 1)) or 'linear' (no squashing: the values are the logits of a
            Bernoulli likelihood or the means of a Gaussian one, as the VAE's decoder).
        seed: seeds the weights.

    Keys: mapping.layers.{i}, latent_proj, pos_embed (1, Np, D), blocks.{i}.norm1.gamma/.beta, .attn.qkv,
    .attn.proj, .norm2, .mlp.fc1, .mlp.fc2, norm.gamma/.beta, head (C*P*P, D).
    """

    def __init__(self, img_size=28, patch_size=7, in_chans=1, latent_dim=64, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=2.0, mapping_depth=2, output="tanh", seed=0):
        super().__init__()
        if output not in GENERATOR_OUTPUTS:
            raise ValueError(f"ViTGenerator: output must be one of {', '.join(GENERATOR_OUTPUTS)}, got {output!r}")
        self.grid_size = _check_grid("ViTGenerator", img_size, patch_size, embed_dim, num_heads)
        self.patch_size, self.in_chans, self.latent_dim = patch_size, in_chans, latent_dim
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, latent_dim=latent_dim,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           mapping_depth=mapping_depth, output=output, seed=seed)
        self.output = output
        rng = np.random.default_rng(seed)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.mapping = MappingNetwork(latent_dim, mapping_depth, rng=rng)
        self.latent_proj = Linear(latent_dim, embed_dim, rng=rng)
        self.pos_embed = Parameter(np.zeros((1, num_patches, embed_dim), dtype=np.float32))
        self.blocks = ModuleList(GeneratorBlock(embed_dim, num_heads, latent_dim, mlp_ratio, rng=rng)
                                 for _ in range(depth))
        self.norm = SelfModulatedLayerNorm(embed_dim, latent_dim, rng=rng)
        self.head = Linear(embed_dim, in_chans * patch_size * patch_size, rng=rng)
        # distinct tokens from the start: N(0, 1), as large as the latent's part, so that patches differ (a
        # sine-cosine table barely varies over a grid of 4 x 4 patches)
        init.normal_(self.pos_embed, 1.0, rng)
        # timm's small init in the blocks and the head (the SLNs keep their identity start); the mapping and
        # latent_proj keep PyTorch's default, so that w moves the tokens as much as their positions differ
        for name in ("blocks", "head"):
            _trunc_normal_linears(getattr(self, name), rng)

    def forward(self, z):
        z = z if isinstance(z, Tensor) else Tensor(z)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"ViTGenerator: expected noise z (B, {self.latent_dim}), got shape {z.shape}")
        w = self.mapping(z)                                                   # (B, L)
        x = self.pos_embed + self.latent_proj(w).reshape(z.shape[0], 1, -1)   # (B, Np, D)
        for block in self.blocks:
            x = block(x, w)
        patches = self.head(self.norm(x, w))                                  # (B, Np, C*P*P)
        images = F.unpatchify(patches, self.patch_size, self.grid_size)       # (B, C, H, W)
        return images.tanh() if self.output == "tanh" else images

    def extra_repr(self):
        c = self.config
        return (f"img_size={c['img_size']}, patch_size={c['patch_size']}, latent_dim={c['latent_dim']}, "
                f"embed_dim={c['embed_dim']}, depth={c['depth']}, num_heads={c['num_heads']}, output={c['output']}")


# ------------------------------------------------------------------------------------------------ discriminator
class L2Attention(Module):
    """Multi-head self-attention scored by distance, with tied queries and keys (Kim et al. 2021):
    q = k = x W_qk, v = x W_v, y = proj(softmax_j(-||q_i - q_j||^2 / sqrt(hd)) v) per head. Lipschitz, unlike
    dot-product attention. Keys: qk (D, D), v (D, D), proj (D, D)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, rng=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"L2Attention: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qk = Linear(dim, dim, bias=qkv_bias, rng=rng)
        self.v = Linear(dim, dim, bias=qkv_bias, rng=rng)
        self.proj = Linear(dim, dim, rng=rng)

    def _heads(self, x):
        """(B, N, D) -> (B, nh, N, hd)"""
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x):
        B, N, D = x.shape
        q, v = self._heads(self.qk(x)), self._heads(self.v(x))
        out = F.l2_distance_attention(q, q, v)                           # (B, nh, N, hd)
        return self.proj(out.permute(0, 2, 1, 3).reshape(B, N, D))

    def extra_repr(self):
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class MinibatchStd(Module):
    """The minibatch standard deviation (ProGAN, Karras et al. 2018): features (B, D) -> (B, D + 1), the last
    column the spread of the features within each image's group of ``group_size`` consecutive images:

        s_k = mean_d sqrt(var_{i in group k}(x_id) + eps)        (the variance over the group, one per feature)

    and every image of group k gets s_k. Groups are consecutive images, so that a batch that is real images
    followed by as many generated ones (B/2 each, both multiples of the group size) never mixes the two in a group.
    The gradient flows through s_k into every image of the group: an image's logit depends on its neighbours.

    Shapes: x (B, D) -> (B, D + 1); B a multiple of group_size, or smaller (then the whole batch is one group).
    """

    def __init__(self, group_size=4, eps=1e-8):
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 2:
            raise ValueError(f"MinibatchStd: group_size must be an integer >= 2, got {group_size!r}")
        self.group_size, self.eps = int(group_size), eps

    def forward(self, x):
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.ndim != 2 or (x.shape[0] > self.group_size and x.shape[0] % self.group_size) or x.shape[0] < 2:
            raise ValueError(f"MinibatchStd: expected features (B, D) with B a multiple of the group size "
                             f"{self.group_size} or 2 <= B <= {self.group_size} (one group), got shape {x.shape}")
        B, D = x.shape
        g = min(self.group_size, B)
        groups = x.reshape(B // g, g, D)
        centred = groups - groups.mean(axis=1, keepdims=True)
        spread = ((centred * centred).mean(axis=1) + self.eps).sqrt().mean(axis=1, keepdims=True)   # (B/g, 1)
        xp = devices.get_array_module(x.data)
        per_image = (spread.reshape(B // g, 1, 1) * Tensor(xp.ones((1, g, 1), dtype=x.dtype))).reshape(B, 1)
        return concat([x, per_image], axis=1)

    def extra_repr(self):
        return f"group_size={self.group_size}"


SPECTRAL_NORMS = {"none": None, "plain": spectral_norm, "improved": improved_spectral_norm}


class ViTDiscriminator(VisionTransformer):
    """A ViT classifier with one logit per image, l(x) in D(x) = sigmoid(l(x)) (or a critic's score).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, global_pool, seed: as
            ``VisionTransformer``.
        attention: 'dot' (the ViT's) or 'l2' (``L2Attention``, tied queries and keys).
        spectral_norm: 'none', 'plain' or 'improved', applied to every Linear and to the patch projection.
        patch_kernel: None, or a window side k > patch_size (k - patch_size even) for overlapping patches, as
            ``VisionTransformer``; the patch projection's weight is then (D, C, k, k).
        minibatch_std: 0, or a group size g >= 2: the head reads the pooled features and their spread within
            each group of g consecutive images (``MinibatchStd``); ``head`` is then (1, D + 1) and batches must be
            multiples of g (or 2 to g images, one group).

    Returns logits (B,) for images (B, C, H, W). Keys as the ViT's (``head`` has one row); with 'l2' attention
    ``blocks.{i}.attn.qk`` and ``.attn.v`` replace ``.attn.qkv``; with spectral norm each weight is stored as
    ``weight_orig``, ``weight_u`` and ``weight_v``.
    """

    def __init__(self, img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                 global_pool="token", attention="dot", spectral_norm="none", seed=0, patch_kernel=None,
                 minibatch_std=0):
        if attention not in ("dot", "l2"):
            raise ValueError(f"ViTDiscriminator: attention must be 'dot' or 'l2', got {attention!r}")
        if spectral_norm not in SPECTRAL_NORMS:
            raise ValueError(f"ViTDiscriminator: spectral_norm must be one of {', '.join(SPECTRAL_NORMS)}, "
                             f"got {spectral_norm!r}")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=1,
                         global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, class_token=global_pool == "token", seed=seed, patch_kernel=patch_kernel)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, global_pool=global_pool,
                           attention=attention, spectral_norm=spectral_norm, seed=seed)
        if patch_kernel is not None:
            self.config["patch_kernel"] = patch_kernel
        rng = np.random.default_rng([seed, 1])
        if attention == "l2":
            for block in self.blocks:
                block.attn = L2Attention(embed_dim, num_heads, qkv_bias=True, rng=rng)
                _trunc_normal_linears(block.attn, rng)
        self.minibatch_std = None
        if minibatch_std:  # configs (and checkpoints) without the key have no minibatch_std
            self.minibatch_std = MinibatchStd(minibatch_std)
            self.config["minibatch_std"] = self.minibatch_std.group_size
            self.head = Linear(embed_dim + 1, 1, rng=rng)
            _trunc_normal_linears(self.head, rng)
        register = SPECTRAL_NORMS[spectral_norm]
        if register is not None:
            for _, module in list(self.named_modules()):
                if isinstance(module, (Linear, PatchProjection)):
                    register(module, rng=rng)

    def forward_head(self, x, pre_logits=False):
        """(B, N, D) tokens -> (B, 1) logits; with minibatch_std the pooled features (B, D) get their group
        spread as one more column before the head."""
        if self.minibatch_std is None:
            return super().forward_head(x, pre_logits)
        features = self.minibatch_std(super().forward_head(x, pre_logits=True))      # (B, D + 1)
        return features if pre_logits else self.head(features)

    def forward(self, images):
        return super().forward(images).reshape(-1)                   # (B, 1) -> (B,)

    def extra_repr(self):
        c = self.config
        extra = "".join(f", {k}={c[k]}" for k in ("patch_kernel", "minibatch_std") if k in c)
        return (f"img_size={c['img_size']}, patch_size={c['patch_size']}, embed_dim={c['embed_dim']}, "
                f"depth={c['depth']}, num_heads={c['num_heads']}, attention={c['attention']}, "
                f"spectral_norm={c['spectral_norm']}{extra}")
