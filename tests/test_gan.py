"""GANs that learn: on a ring of eight Gaussians, a small MLP GAN with the non-saturating loss and a spectrally
normalised discriminator covers the modes; and the toy data and its mode counter do what they say."""

import time

import numpy as np
from threadpoolctl import threadpool_limits

import pytest

import minivit as mv
from minivit import functional as F, gan, gradcheck, gradgradcheck, nn, optim
from minivit.nn.utils import improved_spectral_norm

STD = 0.05


class _MLP(nn.Module):
    """Linear -> GELU -> Linear -> GELU -> Linear, each Linear optionally spectrally normalised."""

    def __init__(self, sizes, rng, normalise=None):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b, rng=rng) for a, b in zip(sizes[:-1], sizes[1:])])
        if normalise is not None:
            for layer in self.layers:
                normalise(layer, rng=rng)

    def forward(self, x):
        *hidden, last = self.layers
        for layer in hidden:
            x = F.gelu(layer(x))
        return last(x)


def test_ring_of_gaussians_and_mode_counts():
    rng = np.random.default_rng(0)
    x = gan.ring_of_gaussians(8000, rng, std=STD)
    centres = gan.ring_centres()
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 2.0)
    counts = gan.mode_counts(x, centres, 3 * STD)
    assert counts.sum() >= 0.98 * 8000 and counts.min() > 800   # 1 - e^(-9/2) = 98.9% within 3 std in 2-D
    assert gan.mode_counts(np.zeros((5, 2)), centres, 3 * STD).sum() == 0


def _train_gan(steps, rng, B=128, lr=3e-3):
    """The non-saturating GAN: a generator from 2-D noise, a discriminator with improved spectral norm."""
    generator = _MLP([2, 64, 64, 2], rng)
    discriminator = _MLP([2, 64, 64, 1], rng, normalise=improved_spectral_norm)
    opt_g = optim.AdamW(generator.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=0.0)
    opt_d = optim.AdamW(discriminator.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=0.0)
    for _ in range(steps):
        real = gan.ring_of_gaussians(B, rng, std=STD)
        fake = generator(rng.standard_normal((B, 2)).astype(np.float32))
        logits = discriminator(mv.concat([mv.Tensor(real), fake.detach()]))
        loss_d = gan.discriminator_loss(logits[:B], logits[B:])
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = gan.generator_loss_non_saturating(discriminator(fake))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    return generator


def test_a_small_gan_covers_the_modes_of_a_ring_of_gaussians():
    """The non-saturating loss with ViTGAN's improved spectral norm on every discriminator layer, 800 steps.

    Plain spectral norm makes this small discriminator nearly 1-Lipschitz with GELUs of slope about 1/2, too
    smooth to tell modes 0.15 wide apart in this budget (its loss stays at log 4); the improved variant keeps
    each layer's initial scale. BLAS runs on one thread: these matrices are small, and on a busy machine
    BLAS's worker threads only wait for each other (a tenfold slowdown was measured).
    """
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with threadpool_limits(limits=1, user_api="blas"):
        generator = _train_gan(800, rng)
        with mv.no_grad():
            samples = generator(rng.standard_normal((2000, 2)).astype(np.float32)).data
    counts = gan.mode_counts(samples, gan.ring_centres(), 3 * STD)
    covered = int((counts >= 20).sum())               # at least 1% of the samples within 3 std of the centre
    print(f"modes covered: {covered} of 8, counts {counts.tolist()}, {time.perf_counter() - start:.1f} s")
    assert covered >= 6, f"only {covered} of 8 modes covered: samples per mode {counts.tolist()}"
    assert counts.sum() >= 0.1 * len(samples)      # and the samples sit on the ring, not spread over the plane


# ------------------------------------------------------------------------------------------------ SLN
def test_self_modulated_layer_norm_starts_as_a_plain_layer_norm_and_modulates_per_sample():
    rng = np.random.default_rng(3)
    sln = nn.SelfModulatedLayerNorm(6, 4, rng=rng).double()
    h, w = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 4))
    plain = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(sln(h, w).data, plain, rtol=1e-12)
    for layer in (sln.gamma, sln.beta):
        layer.weight.data[...] = rng.standard_normal(layer.weight.shape)
    gamma = w @ sln.gamma.weight.data.T + sln.gamma.bias.data
    beta = w @ sln.beta.weight.data.T + sln.beta.bias.data
    np.testing.assert_allclose(sln(h, w).data, gamma[:, None] * plain + beta[:, None], rtol=1e-12)
    with pytest.raises(ValueError, match=r"expected h \(B, ..., 6\) and w \(B, 4\)"):
        sln(h, w[:1])


def test_self_modulated_layer_norm_passes_the_float64_gradient_checks():
    rng = np.random.default_rng(4)
    sln = nn.SelfModulatedLayerNorm(4, 3, rng=rng)
    for layer in (sln.gamma, sln.beta):
        layer.weight.data[...] = rng.standard_normal(layer.weight.shape)
    h, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3))
    assert gradcheck(sln, [h, w], params=sln).ok
    assert gradgradcheck(sln, [h, w], params=sln).ok
