"""A plain PyTorch ViT with timm's module names and layouts: the reference for parity tests and benchmarks.

It needs PyTorch, which minivit itself never requires: import this module only where torch is installed. timm
cannot be installed on CPU-only machines, so this small twin stands in for it; where timm is present the tests
compare against timm itself as well.
"""

import torch
import torch.nn.functional as TF
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = TF.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, approximate):
        super().__init__()
        self.fc1, self.fc2, self.approximate = nn.Linear(dim, hidden), nn.Linear(hidden, dim), approximate

    def forward(self, x):
        return self.fc2(TF.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, approximate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch_size, patch_kernel=None, stem_channels=(), stem_stride=1):
        super().__init__()
        widths = (in_chans, *stem_channels)
        if stem_stride == 1:
            self.stem = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(widths, widths[1:]))
        else:
            self.stem = nn.ModuleList(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
                                      for c_in, c_out in zip(widths, widths[1:]))
        patch = patch_size // stem_stride ** len(stem_channels)
        k = patch if patch_kernel is None else patch_kernel
        self.proj = nn.Conv2d(widths[-1], dim, k, stride=patch, padding=(k - patch) // 2)

    def forward(self, x):
        for conv in self.stem:
            x = TF.gelu(conv(x))
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
    """Same computation and parameter names as ``minivit.nn.VisionTransformer`` for a given config dict."""

    def __init__(self, img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio=4.0,
                 qkv_bias=True, global_pool="token", class_token=True, act_approximate="none", patch_kernel=None,
                 stem_channels=(), stem_stride=1, **_):
        super().__init__()
        self.global_pool, self.prefix = global_pool, 1 if class_token else 0
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, patch_kernel, tuple(stem_channels),
                                      stem_stride)
        n = (img_size // patch_size) ** 2 + self.prefix
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, act_approximate)
                                    for _ in range(depth))
        if global_pool == "avg":
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        if self.prefix:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if self.global_pool == "avg":
            return self.head(self.fc_norm(x[:, self.prefix:].mean(1)))
        return self.head(self.norm(x)[:, 0])


def torch_vit_like(model, dtype=torch.float64, device="cpu"):
    """A TorchViT with the config and weights of a minivit VisionTransformer (copied through state_dict)."""
    ref = TorchViT(**model.config).to(dtype=dtype, device=device)
    state = {k: torch.from_numpy(v).to(dtype=dtype, device=device) for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    return ref
