"""The ViT generator and discriminator: shapes, options, errors, and whole-model float64 gradient checks."""

import numpy as np
import pytest

from minivit import gan, gradcheck, gradgradcheck, nn
from minivit.nn.gan import L2Attention, MinibatchStd

TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2)


def generator(**overrides):
    return nn.ViTGenerator(**{**TINY, "latent_dim": 6, **overrides})


def discriminator(**overrides):
    return nn.ViTDiscriminator(**{**TINY, **overrides})


def noise(n, dim=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def images(n, c=1, size=8, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, c, size, size)).astype(np.float32)


def test_the_generator_makes_images_in_the_tanh_range_that_differ_per_sample():
    g = generator(in_chans=3, img_size=(8, 12))
    x = g(noise(5)).data
    assert x.shape == (5, 3, 8, 12)
    assert np.abs(x).max() < 1
    assert np.abs(x[0] - x[1]).max() > 1e-4               # each sample its own image from the start
    assert g.pos_embed.shape == (1, 6, 8)                  # one learned token per patch (2 x 3 grid)
    assert g.head.weight.shape == (3 * 4 * 4, 8)           # a token to the pixels of its patch


def test_a_linear_output_is_the_tanh_output_before_its_tanh_and_is_unbounded():
    """output='linear' (the VAE's decoder) leaves the values unsquashed; 'tanh' (the GAN's) keeps them in (-1, 1)."""
    squashed, linear = generator(seed=4), generator(seed=4, output="linear")
    assert squashed.config["output"] == "tanh" and linear.config["output"] == "linear"
    for g in (squashed, linear):
        g.head.weight.data *= 200.0                        # a large head: values far outside (-1, 1) before tanh
    z = noise(3)
    raw, pixels = linear(z).data, squashed(z).data
    assert np.abs(raw).max() > 2.0
    assert np.abs(pixels).max() <= 1.0
    np.testing.assert_allclose(pixels, np.tanh(raw), rtol=1e-5, atol=1e-6)


def test_a_generator_config_without_output_builds_the_tanh_generator():
    """Checkpoints written before the option have no 'output' in their config; they rebuild as before."""
    config = dict(generator().config)
    del config["output"]
    assert nn.ViTGenerator(**config).output == "tanh"


@pytest.mark.torch
@pytest.mark.parametrize("output", ["tanh", "linear"])
def test_the_generator_matches_its_pytorch_twin_in_values_and_gradients(output):
    """minivit.testing.torch_vae.TorchViTGenerator (the VAE twin's decoder) computes what ViTGenerator does, in
    float64, with every weight (the SLNs' modulation included) moved off its initial value."""
    torch = pytest.importorskip("torch")
    from minivit.testing.torch_vae import TorchViTGenerator

    g = generator(depth=2, in_chans=3, output=output, seed=5).double()
    r = np.random.default_rng(1)
    for _, p in g.named_parameters():
        p.data += 0.3 * r.standard_normal(p.shape)
    twin = TorchViTGenerator(**{k: v for k, v in g.config.items() if k != "seed"}).double()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in g.state_dict().items()}, strict=True)
    z, upstream = r.standard_normal((4, 6)), r.standard_normal((4, 3, 8, 8))
    out = g(z)
    (out * upstream).sum().backward()
    t_out = twin(torch.from_numpy(z))
    (t_out * torch.from_numpy(upstream)).sum().backward()
    np.testing.assert_allclose(out.data, t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    theirs = dict(twin.named_parameters())
    for name, p in g.named_parameters():
        np.testing.assert_allclose(p.grad, theirs[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_the_generator_s_norms_are_modulated_by_the_latent():
    g = generator(depth=2)
    names = g.state_dict()
    for i in range(2):
        for norm in ("norm1", "norm2"):
            assert f"blocks.{i}.{norm}.gamma.weight" in names and f"blocks.{i}.{norm}.beta.bias" in names
    assert "norm.gamma.weight" in names and "mapping.layers.1.weight" in names
    assert isinstance(g.blocks[0].norm1, nn.SelfModulatedLayerNorm)


@pytest.mark.parametrize("attention", ["dot", "l2"])
@pytest.mark.parametrize("spectral", ["none", "plain", "improved"])
def test_the_discriminator_gives_one_logit_per_image_with_every_option(attention, spectral):
    d = discriminator(attention=attention, spectral_norm=spectral)
    logits = d(images(3))
    assert logits.shape == (3,)
    assert d.head.out_features == 1
    names = set(d.state_dict())
    assert ("blocks.0.attn.qk.weight" in names or "blocks.0.attn.qk.weight_orig" in names) == (attention == "l2")
    assert ("head.weight_orig" in names and "patch_embed.proj.weight_u" in names) == (spectral != "none")
    assert ("head.weight_sigma_init" in names) == (spectral == "improved")


def test_spectral_norm_bounds_each_layer_of_the_discriminator():
    d = discriminator(spectral_norm="plain")
    for _ in range(30):                                    # power iteration runs once per training forward
        d(images(2))
    for layer in (d.head, d.blocks[0].mlp.fc1, d.blocks[0].attn.qkv):
        assert np.linalg.norm(layer.weight.data.astype(np.float64), 2) == pytest.approx(1.0, abs=1e-3)


def test_l2_attention_with_tied_projections_matches_its_formula():
    rng = np.random.default_rng(1)
    attn = L2Attention(8, num_heads=2, qkv_bias=True, rng=rng).double()
    x = rng.standard_normal((2, 5, 8))
    W, Wv = attn.qk.weight.data, attn.v.weight.data
    q = (x @ W.T + attn.qk.bias.data).reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    v = (x @ Wv.T + attn.v.bias.data).reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    scores = -((q[:, :, :, None] - q[:, :, None]) ** 2).sum(-1) / 2.0   # -||q_i - q_j||^2 / sqrt(4)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = (p @ v).transpose(0, 2, 1, 3).reshape(2, 5, 8) @ attn.proj.weight.data.T + attn.proj.bias.data
    np.testing.assert_allclose(attn(x).data, expected, rtol=1e-12, atol=1e-12)


def test_whole_generator_passes_the_directional_gradient_check():
    assert gradcheck(generator(depth=2), [noise(2)], mode="directional").ok


@pytest.mark.parametrize("options", [dict(), dict(attention="l2", spectral_norm="improved"),
                                     dict(spectral_norm="plain", global_pool="avg"),
                                     dict(attention="l2", spectral_norm="improved", minibatch_std=2)])
def test_whole_discriminator_passes_the_gradient_and_second_derivative_checks(options):
    d = discriminator(**options)
    batch = images(4 if "minibatch_std" in options else 2)
    assert gradcheck(d, [batch], mode="directional").ok
    assert gradgradcheck(d, [batch], mode="directional").ok


def test_minibatch_std_appends_each_group_s_mean_feature_spread():
    """s_k = mean_d sqrt(var_{i in group k} x_id + eps), the same for every image of group k (consecutive images)."""
    x = np.random.default_rng(2).standard_normal((6, 5))
    out = MinibatchStd(3)(x).data
    assert out.shape == (6, 6)
    np.testing.assert_array_equal(out[:, :5], x)
    groups = x.reshape(2, 3, 5)
    spread = np.sqrt(((groups - groups.mean(axis=1, keepdims=True)) ** 2).mean(axis=1) + 1e-8).mean(axis=1)
    np.testing.assert_allclose(out[:, 5], np.repeat(spread, 3), rtol=1e-12)
    # a batch that is 4 real images and then 4 copies of one fake: the fakes' groups have no spread, the reals' do
    real_then_fake = np.concatenate([x[:4], np.repeat(x[4:5], 4, axis=0)])
    column = MinibatchStd(2)(real_then_fake).data[:, -1]
    assert column[:4].min() > 0.1 and column[4:].max() < 1e-3
    # fewer images than the group size: one group of them all
    np.testing.assert_allclose(MinibatchStd(4)(x[:3]).data[:, -1], np.repeat(MinibatchStd(3)(x[:3]).data[0, -1], 3))


def test_minibatch_std_passes_the_gradient_and_second_derivative_checks_and_couples_a_group():
    layer = MinibatchStd(2)
    x = np.random.default_rng(3).standard_normal((4, 3))
    assert gradcheck(layer, [x]).ok
    assert gradgradcheck(layer, [x]).ok
    # an image's spread column depends on its neighbour in the group and on nobody else
    from minivit import Tensor
    xt = Tensor(x, requires_grad=True)
    layer(xt)[0, 3].backward()
    assert np.abs(xt.grad[:2]).min() > 0 and not np.any(xt.grad[2:])


def test_a_discriminator_with_minibatch_std_reads_one_more_feature_and_rebuilds_from_its_config():
    d = discriminator(minibatch_std=2, spectral_norm="improved")
    assert d.config["minibatch_std"] == 2 and d.head.weight.shape == (1, 9)   # D = 8 features + the spread
    assert d(images(4)).shape == (4,)
    twin = nn.ViTDiscriminator(**d.config)
    twin.load_state_dict(d.state_dict())
    np.testing.assert_array_equal(twin(images(4)).data, d(images(4)).data)
    plain = discriminator()
    assert "minibatch_std" not in plain.config and plain.minibatch_std is None   # old configs: no such key
    assert "minibatch_std=2" in repr(d)


def test_the_gradient_penalty_reaches_every_discriminator_parameter():
    d = discriminator(attention="l2", spectral_norm="plain")
    fake = generator()(noise(3)).data
    penalty = gan.gradient_penalty(d, images(3), fake, generator=np.random.default_rng(0))
    penalty.backward()
    missing = [n for n, p in d.named_parameters() if p.grad is None or not np.any(p.grad)]
    # the input gradient does not depend on the last shifts: the final norm's bias and the head's bias
    assert set(missing) == {"norm.bias", "head.bias"}, missing


def test_bad_configurations_and_inputs_get_named_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size 3"):
        generator(patch_size=3)
    with pytest.raises(ValueError, match="embed_dim 8 is not divisible by num_heads 3"):
        generator(num_heads=3)
    with pytest.raises(ValueError, match="output must be one of tanh, linear, got 'sigmoid'"):
        generator(output="sigmoid")
    with pytest.raises(ValueError, match=r"expected noise z \(B, 6\), got shape \(2, 5\)"):
        generator()(noise(2, dim=5))
    with pytest.raises(ValueError, match="attention must be 'dot' or 'l2', got 'cosine'"):
        discriminator(attention="cosine")
    with pytest.raises(ValueError, match="spectral_norm must be one of none, plain, improved, got 'yes'"):
        discriminator(spectral_norm="yes")
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\), got shape \(2, 3, 8, 8\)"):
        discriminator()(images(2, c=3))
    with pytest.raises(ValueError, match="group_size must be an integer >= 2, got 1"):
        discriminator(minibatch_std=1)
    with pytest.raises(ValueError, match=r"group size 2 or 2 <= B <= 2 \(one group\), got shape \(3, 8\)"):
        discriminator(minibatch_std=2)(images(3))
