"""The ViT VAE: whole-model gradient checks (float64, directional), the bounds it reports, its schedule and
helpers, and that a few steps of training raise the ELBO of a batch."""

import math

import numpy as np
import pytest

from minivit import optim
from minivit.gradcheck import gradcheck
from minivit.nn import ViTGenerator, ViTVAE
from minivit.nn.vae import binarize, bits_per_dim, kl_weight, logsumexp


def tiny_vae(**options):
    return ViTVAE(**{**dict(img_size=8, patch_size=4, latent_dim=3, embed_dim=8, depth=1, num_heads=2), **options})


def binary_images(n, seed=0):
    return (np.random.default_rng(seed).uniform(size=(n, 1, 8, 8)) < 0.4).astype(np.float64)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_whole_model_gradient_matches_finite_differences(likelihood):
    model = tiny_vae(likelihood=likelihood).double()
    eps = np.random.default_rng(3).standard_normal((2, 3))
    # h = 1e-5: the Gaussian loss starts near 1e3 nats (pixel std 0.1), so the rounding noise of a difference
    # quotient, about loss * 1e-16 / h, would reach 1e-8 with h = 1e-6 next to encoder gradients of 1e-4
    report = gradcheck(lambda x: model(x, beta=0.7, eps=eps)[0], [binary_images(2)], params=model,
                       mode="directional", eps=1e-5)
    assert report.ok, str(report)
    assert len(report.rows) == 1 + len(list(model.parameters()))   # every parameter reached, the images too


def test_loss_is_the_beta_weighted_negative_elbo_of_its_parts():
    model = tiny_vae()
    x = binary_images(3).astype(np.float32)
    eps = np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32)
    loss, rec, kl = model(x, beta=0.25, eps=eps)
    assert np.allclose(loss.item(), np.mean(-rec.data + 0.25 * kl.data), rtol=1e-6)
    assert (kl.data >= 0).all() and (rec.data <= 0).all()   # a KL is never negative; a Bernoulli probability <= 1


def test_iwae_bound_tightens_as_k_grows():
    """E[IWAE_k] rises with k (Burda et al. 2016): k = 50 beats the average of single-sample estimates."""
    model = tiny_vae()
    x = binary_images(4).astype(np.float32)
    g = np.random.default_rng(0)
    single = np.mean([model.iwae_bound(x, k=1, generator=g).mean() for _ in range(30)])
    many = model.iwae_bound(x, k=50, generator=g, chunk=7).mean()
    assert many > single


def test_iwae_with_one_sample_is_an_unbiased_estimate_of_the_elbo():
    model = tiny_vae(likelihood="gaussian")
    x = np.random.default_rng(2).uniform(size=(2, 1, 8, 8)).astype(np.float32)
    g = np.random.default_rng(4)
    estimates = np.stack([model.iwae_bound(x, k=1, generator=g) for _ in range(400)])
    elbos = []
    for _ in range(400):
        _, rec, kl = model(x, generator=g)
        elbos.append(rec.data - kl.data)
    elbos = np.stack(elbos)
    spread = np.sqrt(estimates.var(0) / 400 + elbos.var(0) / 400)
    assert (np.abs(estimates.mean(0) - elbos.mean(0)) < 4 * spread + 1e-3).all()


def test_a_few_steps_of_adam_raise_the_elbo_of_a_batch():
    model = tiny_vae()
    x = binary_images(8).astype(np.float32)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    eps = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    first = model(x, eps=eps)[0].item()
    for _ in range(30):
        loss = model(x, eps=eps)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x, eps=eps)[0].item() < first - 5.0


def test_decoder_and_samples_have_image_shapes():
    model = tiny_vae(in_chans=3)
    assert model.decode(np.zeros((5, 3), np.float32)).shape == (5, 3, 8, 8)
    samples = model.sample(4, generator=np.random.default_rng(0))
    assert samples.shape == (4, 3, 8, 8) and (samples > 0).all() and (samples < 1).all()
    assert model.reconstruct(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 3, 8, 8)


def test_the_decoder_is_the_gan_generator_without_its_tanh():
    """One decoder for both models: the VAE's is a ViTGenerator with output='linear', whose values (logits or
    means) are not squashed into (-1, 1)."""
    model = tiny_vae(in_chans=3)
    assert type(model.decoder) is ViTGenerator
    assert model.decoder.config["output"] == "linear" and model.decoder.config["seed"] == 1
    assert "decoder.mapping.layers.0.weight" in model.state_dict() and "decoder.head.weight" in model.state_dict()
    z = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    model.decoder.head.weight.data *= 200.0
    logits = model.decode(z).data
    assert np.abs(logits).max() > 1.0


def test_kl_warmup_rises_linearly_to_beta():
    assert [kl_weight(s, beta=2.0, warmup_steps=4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert kl_weight(0, beta=0.5, warmup_steps=0) == 0.5


def test_bits_per_dim_and_logsumexp():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    a = np.array([[1000.0, -1000.0], [1000.0, -1000.0]])
    np.testing.assert_allclose(logsumexp(a, axis=0), [1000 + math.log(2), -1000 + math.log(2)])


def test_binarize_keeps_each_pixel_with_its_intensity():
    images = np.full((200, 1, 8, 8), 0.3)
    b = binarize(images, np.random.default_rng(0))
    assert set(np.unique(b)) == {0.0, 1.0} and abs(b.mean() - 0.3) < 0.01


def test_bad_settings_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        tiny_vae(likelihood="poisson")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny_vae(img_size=10)
    with pytest.raises(ValueError, match="k must be at least 1"):
        tiny_vae().iwae_bound(binary_images(1), k=0)
