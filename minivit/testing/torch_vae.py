"""A plain PyTorch twin of ``minivit.nn.ViTVAE``: the same architecture, parameter names and loss, for parity
tests and benchmarks.

It needs PyTorch, which minivit itself never requires: import this module only where torch is installed.
The encoder is ``TorchViT`` (timm's names); the decoder mirrors ``ViTDecoder``. The noise eps of the
reparameterised sample is passed in, so that both models can be fed the same draws.
"""

import math

import torch
import torch.nn.functional as TF
from torch import nn

from minivit.testing.torch_reference import Block, TorchViT


class TorchViTDecoder(nn.Module):
    """z (B, L) -> to_tokens -> (B, Np, D) + pos_embed -> blocks -> norm -> to_patch -> unpatchify (B, C, H, W)."""

    def __init__(self, img_size, patch_size, out_chans, latent_dim, embed_dim, depth, num_heads, mlp_ratio):
        super().__init__()
        self.patch_size, self.grid = patch_size, (img_size // patch_size, img_size // patch_size)
        self.num_patches, self.embed_dim, self.out_chans = self.grid[0] * self.grid[1], embed_dim, out_chans
        self.to_tokens = nn.Linear(latent_dim, self.num_patches * embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, True, "none") for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.to_patch = nn.Linear(embed_dim, out_chans * patch_size * patch_size)

    def forward(self, z):
        x = self.to_tokens(z).reshape(z.shape[0], self.num_patches, self.embed_dim) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.to_patch(self.norm(x))                         # (B, Np, C*P*P), each patch flattened (C, P, P)
        B, (gh, gw), P, C = z.shape[0], self.grid, self.patch_size, self.out_chans
        return patches.reshape(B, gh, gw, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * P, gw * P)


class TorchViTVAE(nn.Module):
    """Same computation and parameter names as ``minivit.nn.ViTVAE`` for a given config dict."""

    def __init__(self, img_size, patch_size, in_chans, latent_dim, embed_dim, depth, num_heads, mlp_ratio,
                 likelihood="bernoulli", **_):
        super().__init__()
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.encoder = TorchViT(img_size, patch_size, in_chans, 2 * latent_dim, embed_dim, depth, num_heads,
                                mlp_ratio)
        self.decoder = TorchViTDecoder(img_size, patch_size, in_chans, latent_dim, embed_dim, depth, num_heads,
                                       mlp_ratio)
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
