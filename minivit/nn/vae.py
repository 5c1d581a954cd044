"""A variational autoencoder made of two Vision Transformers: a ViT encoder, and the ViT-GAN's generator as decoder.

The model. An image x has a latent code z of L numbers. The prior is p(z) = N(0, I); the decoder gives the
likelihood p(x | z) (independent Bernoulli pixels with logits, or Gaussian pixels with a learned shared variance);
the encoder gives an approximate posterior q(z | x) = N(mu(x), diag exp(logvar(x))). Training maximises the
evidence lower bound (ELBO) on log p(x):

    log p(x) >= ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))

with the expectation estimated by one reparameterised sample z = mu + exp(logvar / 2) eps (``F.reparameterize``)
and the KL in closed form (``F.gaussian_kl``). The beta-VAE loss is -E_q[log p(x | z)] + beta KL; a KL warm-up
raises beta from 0 over the first steps, so that the decoder learns to use z before the KL pulls q to the prior.

In nats per image, and in bits per dimension: bits/dim = nats / (C H W ln 2).

For evaluation, the importance-weighted bound (Burda et al. 2016) with k samples z_i ~ q(z | x),

    log p(x) >= IWAE_k(x) = log 1/k sum_i p(x | z_i) p(z_i) / q(z_i | x)

is tighter than the ELBO (k = 1) and tends to log p(x) as k grows.

Shapes: B batch, C x H x W image, P patch, Np = (H/P)(W/P) patches, D token width, L latent size.

    encoder: images (B,C,H,W) -> VisionTransformer with a class token, head to 2L -> mu, logvar (B,L)
    decoder: ``ViTGenerator`` (minivit.nn.gan) with output='linear', the GAN's generator without its tanh:
             z (B,L) -> mapping MLP -> w (B,L)
             tokens: pos_embed (1,Np,D) + latent_proj(w) (B,1,D)
             -> depth x GeneratorBlock (LayerNorms self-modulated by w) -> SLN(x, w)
             -> head: each token to its patch (B,Np,C*P*P) -> unpatchify (B,C,H,W) logits (or means)

One decoder serves both generative models: the VAE trains it with the ELBO, the GAN with a discriminator.
"""

import math

import numpy as np

from minivit import devices, rng
from minivit import functional as F
from minivit.nn.gan import ViTGenerator
from minivit.nn.module import Module, Parameter
from minivit.nn.vit import VisionTransformer, _pair
from minivit.tensor import no_grad

LIKELIHOODS = ("bernoulli", "gaussian")


def kl_weight(step, beta=1.0, warmup_steps=0):
    """The weight of the KL term at a training step: beta, raised linearly from 0 over ``warmup_steps``."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def bits_per_dim(nats, dims):
    """A negative log-likelihood in nats per image as bits per pixel value: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


def binarize(images, generator):
    """Dynamic binarisation: each pixel value p in [0, 1] becomes 1 with probability p (a fresh draw each call)."""
    xp = devices.get_array_module(images)
    return (xp.asarray(generator.random(images.shape)) < images).astype(images.dtype)


def logsumexp(a, axis=0):
    """log sum exp(a) along an axis, shifted by the maximum so that no exponential overflows (arrays)."""
    xp = devices.get_array_module(a)
    top = a.max(axis=axis, keepdims=True)
    return (top + xp.log(xp.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


class ViTVAE(Module):
    """A VAE with a ViT encoder (class token -> mean and log-variance) and a ViT decoder, the ViT-GAN's
    ``ViTGenerator`` with output='linear' (z in, logits or means out).

    Args:
        img_size, patch_size, in_chans: the images (C x H x W) and their patches.
        latent_dim: L, the size of z (2 gives a latent plane that can be drawn).
        embed_dim, depth, num_heads, mlp_ratio: of both transformers (depth each); the decoder's mapping z -> w
            has the generator's default depth.
        likelihood: 'bernoulli' (pixels in {0, 1}; the decoder gives logits) or 'gaussian' (the decoder gives
            means; one learned log-variance shared by all pixels).
        seed: seeds the weights.
    """

    def __init__(self, img_size=28, patch_size=7, in_chans=1, latent_dim=16, embed_dim=64, depth=2, num_heads=4,
                 mlp_ratio=2.0, likelihood="bernoulli", seed=0):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"ViTVAE: likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        if latent_dim < 1:
            raise ValueError(f"ViTVAE: latent_dim must be positive, got {latent_dim}")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, latent_dim=latent_dim,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           likelihood=likelihood, seed=seed)
        self.latent_dim, self.likelihood = latent_dim, likelihood
        H, W = _pair(img_size)
        self.image_shape = (in_chans, H, W)
        self.encoder = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                         num_classes=2 * latent_dim, embed_dim=embed_dim, depth=depth,
                                         num_heads=num_heads, mlp_ratio=mlp_ratio, seed=seed)
        self.decoder = ViTGenerator(img_size, patch_size, in_chans, latent_dim, embed_dim, depth, num_heads,
                                    mlp_ratio, output="linear", seed=seed + 1)
        if likelihood == "gaussian":
            self.logvar_x = Parameter(np.full((1,), math.log(0.1 ** 2), dtype=np.float32))  # pixel std 0.1 at start

    @property
    def dims(self):
        """Pixel values per image, C H W (the denominator of bits per dimension)."""
        return int(np.prod(self.image_shape))

    def encode(self, images):
        """(B, C, H, W) -> mu, logvar, each (B, L)."""
        out = self.encoder(images)
        return out[:, :self.latent_dim], out[:, self.latent_dim:]

    def decode(self, z):
        """(B, L) -> (B, C, H, W): Bernoulli logits or Gaussian means."""
        return self.decoder(z)

    def log_likelihood(self, images, decoded):
        """log p(x | z) of each image, in nats.  Shapes: images, decoded (B, C, H, W) -> (B,)"""
        if self.likelihood == "bernoulli":
            return F.bernoulli_log_likelihood(decoded, images)
        return F.gaussian_log_likelihood(images, decoded, self.logvar_x)

    def mean_image(self, decoded):
        """The mean of p(x | z), the picture to show: sigmoid of the logits, or the Gaussian means (arrays)."""
        if self.likelihood == "bernoulli":
            return devices.asnumpy(F.sigmoid(decoded).data)
        return devices.asnumpy(decoded.data)

    def forward(self, images, beta=1.0, eps=None, generator=None):
        """The beta-VAE loss of a batch and its parts.

        Returns:
            loss: mean over the batch of -log p(x | z) + beta KL (a Tensor to back-propagate).
            rec: (B,) log p(x | z) of each image at its one sample z.
            kl: (B,) KL(q(z | x) || p(z)) of each image.
        """
        mu, logvar = self.encode(images)
        z = F.reparameterize(mu, logvar, eps=eps, generator=generator)
        rec = self.log_likelihood(images, self.decode(z))
        kl = F.gaussian_kl(mu, logvar)
        return (kl * beta - rec).mean(), rec, kl

    def iwae_bound(self, images, k=100, generator=None, chunk=20):
        """The importance-weighted bound log 1/k sum_i p(x | z_i) p(z_i) / q(z_i | x) of each image, in nats;
        k = 1 is an estimate of the ELBO.  Shapes: images (B, C, H, W) -> (B,) array.

        The k samples are decoded ``chunk`` at a time (k * B images at once would not fit for large batches).
        """
        if k < 1:
            raise ValueError(f"iwae_bound: k must be at least 1, got {k}")
        xp = devices.get_array_module(images)
        B, L = images.shape[0], self.latent_dim
        with no_grad():
            mu, logvar = self.encode(images)
            log_weights = []
            for start in range(0, k, chunk):
                n = min(chunk, k - start)
                z = F.reparameterize(mu, logvar, generator=generator, samples=n).data.reshape(n * B, L)
                repeat = lambda a: xp.broadcast_to(a, (n,) + a.shape).reshape((n * B,) + a.shape[1:])  # noqa: E731
                log_px = self.log_likelihood(repeat(images), self.decode(z)).data            # log p(x | z_i)
                log_pz = F.gaussian_log_likelihood(z, xp.zeros_like(z), xp.zeros(1, z.dtype)).data   # log p(z_i)
                log_qz = F.gaussian_log_likelihood(z, repeat(mu.data), repeat(logvar.data)).data      # log q(z_i | x)
                log_weights.append(devices.asnumpy(log_px + log_pz - log_qz).reshape(n, B))
        return logsumexp(np.concatenate(log_weights), axis=0) - math.log(k)

    def sample(self, n, generator=None):
        """n images drawn through the decoder from z ~ N(0, I), as the means of p(x | z): (n, C, H, W) array."""
        xp = np
        generator = generator or rng.default_generator(xp)
        z = generator.standard_normal((n, self.latent_dim)).astype(self.dtype)
        with no_grad():
            return self.mean_image(self.decode(devices.to_device(z, self.device)))

    def reconstruct(self, images):
        """The decoded posterior means, decode(mu(x)): (B, C, H, W) array."""
        with no_grad():
            mu, _ = self.encode(images)
            return self.mean_image(self.decode(mu))

    def extra_repr(self):
        c = self.config
        return (f"img_size={c['img_size']}, patch_size={c['patch_size']}, latent_dim={c['latent_dim']}, "
                f"embed_dim={c['embed_dim']}, depth={c['depth']}, likelihood={c['likelihood']}")
