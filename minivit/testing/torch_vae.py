"""A plain PyTorch twin of ``minivit.nn.ViTVAE``: the same architecture, parameter names and loss, for parity
tests and benchmarks.

It needs PyTorch, which minivit itself never requires: import this module only where torch is installed.
The encoder is ``TorchViT`` (timm's names); the decoder mirrors ``ViTGenerator`` with output='linear', the
ViT-GAN's generator that minivit's VAE uses as its decoder. The noise eps of the reparameterised sample is passed
in, so that both models can be fed the same draws.
"""

import math

import torch
import torch.nn.functional as TF
from torch import nn

from minivit.testing.torch_reference import Attention, Mlp, TorchViT


class TorchSelfModulatedLayerNorm(nn.Module):
    """SLN(h, w) = gamma(w) * LayerNorm(h) + beta(w), the LayerNorm without its own affine (eps 1e-6), gamma and
    beta Linear maps of w broadcast over the tokens: ``minivit.nn.SelfModulatedLayerNorm``."""

    def __init__(self, dim, latent_dim, eps=1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gamma = nn.Linear(latent_dim, dim)
        self.beta = nn.Linear(latent_dim, dim)

    def forward(self, h, w):
        normalized = TF.layer_norm(h, (self.dim,), eps=self.eps)         # (B, N, D)
        return normalized * self.gamma(w)[:, None, :] + self.beta(w)[:, None, :]


class TorchGeneratorBlock(nn.Module):
    """x + attn(SLN(x, w)), then x + mlp(SLN(x, w)): ``minivit.nn.gan.GeneratorBlock``."""

    def __init__(self, dim, num_heads, latent_dim, mlp_ratio):
        super().__init__()
        self.norm1 = TorchSelfModulatedLayerNorm(dim, latent_dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = TorchSelfModulatedLayerNorm(dim, latent_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), "none")

    def forward(self, x, w):
        x = x + self.attn(self.norm1(x, w))
        return x + self.mlp(self.norm2(x, w))


class TorchMappingNetwork(nn.Module):
    """z -> w: Linear layers of width L with exact GELUs between them: ``minivit.nn.gan.MappingNetwork``."""

    def __init__(self, latent_dim, depth):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(latent_dim, latent_dim) for _ in range(depth))

    def forward(self, z):
        for i, layer in enumerate(self.layers):
            z = layer(z if i == 0 else TF.gelu(z))
        return z


class TorchViTGenerator(nn.Module):
    """``minivit.nn.ViTGenerator``, the GAN's generator and (output='linear') the VAE's decoder:
    z (B, L) -> mapping -> w; pos_embed + latent_proj(w) (B, Np, D) -> blocks(x, w) -> norm(x, w) -> head
    (B, Np, C*P*P) -> unpatchify (B, C, H, W) -> tanh, or nothing with output='linear'."""

    def __init__(self, img_size, patch_size, in_chans, latent_dim, embed_dim, depth, num_heads, mlp_ratio,
                 mapping_depth=2, output="tanh"):
        super().__init__()
        self.patch_size, self.grid = patch_size, (img_size // patch_size, img_size // patch_size)
        self.in_chans, self.output = in_chans, output
        self.mapping = TorchMappingNetwork(latent_dim, mapping_depth)
        self.latent_proj = nn.Linear(latent_dim, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.blocks = nn.ModuleList(TorchGeneratorBlock(embed_dim, num_heads, latent_dim, mlp_ratio)
                                    for _ in range(depth))
        self.norm = TorchSelfModulatedLayerNorm(embed_dim, latent_dim)
        self.head = nn.Linear(embed_dim, in_chans * patch_size * patch_size)

    def forward(self, z):
        w = self.mapping(z)                                             # (B, L)
        x = self.pos_embed + self.latent_proj(w)[:, None, :]            # (B, Np, D)
        for block in self.blocks:
            x = block(x, w)
        patches = self.head(self.norm(x, w))                            # (B, Np, C*P*P), each patch flattened (C, P, P)
        B, (gh, gw), P, C = z.shape[0], self.grid, self.patch_size, self.in_chans
        images = patches.reshape(B, gh, gw, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * P, gw * P)
        return torch.tanh(images) if self.output == "tanh" else images


class TorchViTVAE(nn.Module):
    """Same computation and parameter names as ``minivit.nn.ViTVAE`` for a given config dict."""

    def __init__(self, img_size, patch_size, in_chans, latent_dim, embed_dim, depth, num_heads, mlp_ratio,
                 likelihood="bernoulli", **_):
        super().__init__()
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.encoder = TorchViT(img_size, patch_size, in_chans, 2 * latent_dim, embed_dim, depth, num_heads,
                                mlp_ratio)
        self.decoder = TorchViTGenerator(img_size, patch_size, in_chans, latent_dim, embed_dim, depth, num_heads,
                                         mlp_ratio, output="linear")
        if likelihood == "gaussian":
            self.logvar_x = nn.Parameter(torch.full((1,), math.log(0.1 ** 2)))

    def log_likelihood(self, images, decoded):
        if self.likelihood == "bernoulli":
            return -TF.binary_cross_entropy_with_logits(decoded, images, reduction="none").flatten(1).sum(1)
        diff = images - decoded
        log_p = -0.5 * (diff * diff * torch.exp(-self.logvar_x) + self.logvar_x + math.log(2 * math.pi))
        return log_p.flatten(1).sum(1)

    def forward(self, images, eps, beta=1.0):
        """(loss, rec, kl) as ``ViTVAE.forward``: mean of beta KL - log p(x | z), z = mu + exp(logvar / 2) eps."""
        out = self.encoder(images)
        mu, logvar = out[:, :self.latent_dim], out[:, self.latent_dim:]
        z = mu + torch.exp(0.5 * logvar) * eps
        rec = self.log_likelihood(images, self.decoder(z))
        kl = 0.5 * (mu * mu + logvar.exp() - logvar - 1).sum(-1)
        return (kl * beta - rec).mean(), rec, kl


def torch_vae_like(model, dtype=torch.float64, device="cpu"):
    """A TorchViTVAE with the config and weights of a minivit ViTVAE (copied by name through state_dict)."""
    ref = TorchViTVAE(**model.config).to(dtype=dtype, device=device)
    state = {k: torch.from_numpy(v).to(dtype=dtype, device=device) for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    return ref
