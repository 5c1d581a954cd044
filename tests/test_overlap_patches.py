"""Overlapping patches: the ViT's ``patch_kernel`` option (a Conv2d with kernel k > P, stride P, padding (k-P)/2)
in the classifier, the GAN discriminator and checkpoints, and the named errors of the unfold op and the option;
the convolutional stem (``stem_channels``: 3x3 convolutions with GELU before the patch projection, or 4x4 windows
with stride 2 with ``stem_stride=2``).
The PyTorch parity of the unfold op and of a ViT with overlapping patches is in tests/test_torch_parity.py."""

import math

import numpy as np
import pytest

from minivit import Tensor, checkpoint, functional as F, nn
from minivit.gradcheck import gradcheck, gradgradcheck

TINY = dict(img_size=8, patch_size=4, in_chans=2, num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0)


def images(n, c=2, size=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, size, size))


def conv2d_loop(x, w, b, stride, padding):
    """A plain convolution, one output pixel at a time: (B, C, H, W) -> (B, gh*gw, D)."""
    B, C, H, W = x.shape
    D, _, k, _ = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    rows = []
    for r in range(0, H + 2 * padding - k + 1, stride):
        for c in range(0, W + 2 * padding - k + 1, stride):
            rows.append(np.einsum("bcij,dcij->bd", xpad[:, :, r:r + k, c:c + k], w) + b)
    return np.stack(rows, axis=1)


def test_overlapping_patch_embedding_is_a_strided_padded_convolution_with_the_same_grid():
    embed = nn.PatchEmbed(8, 4, 2, 5, rng=np.random.default_rng(0), patch_kernel=8).to(dtype=np.float64)
    w, b = embed.proj.weight.data, embed.proj.bias.data
    assert w.shape == (5, 2, 8, 8) and embed.num_patches == 4 and embed.grid_size == (2, 2)
    assert np.abs(w).max() <= 1 / math.sqrt(2 * 8 * 8)                       # PyTorch's Conv2d default bound
    x = images(3)
    np.testing.assert_allclose(embed(x).data, conv2d_loop(x, w, b, stride=4, padding=2), rtol=1e-12, atol=1e-12)


def test_without_patch_kernel_or_with_kernel_equal_to_the_patch_nothing_changes():
    plain, same = nn.VisionTransformer(**TINY, seed=1), nn.VisionTransformer(**TINY, seed=1, patch_kernel=4)
    assert "patch_kernel" not in plain.config and plain.patch_embed.proj.weight.shape == (8, 2, 4, 4)
    for k, v in plain.state_dict().items():
        np.testing.assert_array_equal(same.state_dict()[k], v)
    x = images(2).astype(np.float32)
    np.testing.assert_array_equal(plain(x).data, same(x).data)


def test_a_vit_with_overlapping_patches_trains_and_round_trips_through_checkpoints(tmp_path):
    model = nn.VisionTransformer(**TINY, patch_kernel=6)
    assert model.config["patch_kernel"] == 6 and model.patch_embed.proj.weight.shape == (8, 2, 6, 6)
    x, y = images(4).astype(np.float32), np.array([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and np.any(p.grad) for _, p in model.named_parameters() if p.requires_grad)
    for path in (checkpoint.save_checkpoint(tmp_path / "c.safetensors", model),
                 checkpoint.export_state_dict(model, tmp_path / "e.safetensors")):
        rebuilt, ckpt = checkpoint.model_from_checkpoint(path)
        assert ckpt.config == model.config and rebuilt.patch_embed.patch_kernel == 6
        np.testing.assert_array_equal(rebuilt(x).data, model(x).data)


def test_a_config_without_patch_kernel_still_loads(tmp_path):
    model = nn.VisionTransformer(**TINY)
    path = checkpoint.save_checkpoint(tmp_path / "old.safetensors", model)
    rebuilt, ckpt = checkpoint.model_from_checkpoint(path)
    assert "patch_kernel" not in ckpt.config and rebuilt.patch_embed.patch_kernel is None


def test_the_discriminator_with_overlapping_patches_passes_the_gradient_checks():
    d = nn.ViTDiscriminator(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                            patch_kernel=6)
    assert d.config["patch_kernel"] == 6 and d.patch_embed.proj.weight.shape == (8, 1, 6, 6)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    images_in = Tensor(x, requires_grad=True)
    d(images_in).sum().backward()
    assert images_in.grad.shape == x.shape and np.all(np.isfinite(images_in.grad))
    assert gradcheck(d, [x[:1]], mode="directional").ok
    assert gradgradcheck(d, [x[:1]], mode="directional").ok
    sn = nn.ViTDiscriminator(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                             patch_kernel=6, spectral_norm="improved", attention="l2")
    assert sn(x).shape == (2,)


@pytest.mark.parametrize("kernel, message", [
    (2, "patch_kernel must be >= patch_size 4 .*got 2"),
    (7, r"patch_kernel - patch_size must be even .*expected 4, 6, 8, \.\.\.\), got 7"),
    (6.0, "patch_kernel must be None or an integer >= patch_size 4, got 6.0"),
    (True, "patch_kernel must be None or an integer >= patch_size 4, got True")])
def test_bad_patch_kernels_get_named_errors(kernel, message):
    with pytest.raises(ValueError, match="PatchEmbed: " + message):
        nn.VisionTransformer(**TINY, patch_kernel=kernel)
    with pytest.raises(ValueError, match="PatchEmbed: " + message):
        nn.ViTDiscriminator(img_size=8, patch_size=4, patch_kernel=kernel)


def test_bad_unfold_and_fold_settings_get_named_errors():
    x = images(1, c=1, size=5)
    for name, args, message in [
            ("kernel_size", (0,), "kernel_size must be an integer >= 1, got 0"),
            ("kernel_size", (2.5,), "kernel_size must be an integer >= 1, got 2.5"),
            ("stride", (3, 1.5), "stride must be an integer >= 1, got 1.5"),
            ("padding", (3, 1, -1), "padding must be an integer >= 0, got -1"),
            ("too big", (8, 1, 1), r"expected an image of at least 8x8 after padding \(kernel_size 8\), got 5x5 "
                                   r"with padding 1, 7x7 padded")]:
        with pytest.raises(ValueError, match="unfold_patches: " + message):
            F.unfold_patches(x, *args)
    with pytest.raises(ValueError, match=r"unfold_patches: images must be \(B, C, H, W\), got shape \(5, 5\)"):
        F.unfold_patches(x[0, 0], 3)
    with pytest.raises(ValueError, match=r"unfold_patches: images must be \(B, H, W, C\), got shape \(5, 5\)"):
        F.unfold_patches(x[0, 0], 3, channels_last=True)
    with pytest.raises(ValueError, match=r"fold_patches: expected patches \(B, 4, C\*9\) for a 5x5 image with "
                                         r"kernel_size 3, stride 2, padding 0, got shape \(1, 5, 9\)"):
        F.fold_patches(np.zeros((1, 5, 9)), (5, 5), 3, 2)


# ------------------------------------------------------------------ the convolutional stem
def test_the_stem_is_3x3_convolutions_with_gelu_before_the_patch_projection():
    embed = nn.PatchEmbed(8, 4, 2, 5, rng=np.random.default_rng(0), stem_channels=(3, 4)).to(dtype=np.float64)
    assert [conv.weight.shape for conv in embed.stem] == [(3, 2, 3, 3), (4, 3, 3, 3)]
    assert embed.proj.weight.shape == (5, 4, 4, 4) and embed.num_patches == 4
    x = images(3)
    h = x
    for conv in embed.stem:                             # by hand: a padded convolution, one pixel at a time
        B, _, H, W = h.shape
        out = conv2d_loop(h, conv.weight.data, conv.bias.data, stride=1, padding=1)         # (B, H*W, c)
        h = out.transpose(0, 2, 1).reshape(B, -1, H, W)
        h = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))                      # exact GELU
    expected = conv2d_loop(h, embed.proj.weight.data, embed.proj.bias.data, stride=4, padding=0)
    np.testing.assert_allclose(embed(x).data, expected, rtol=1e-10, atol=1e-12)


def test_the_stem_passes_gradcheck_and_gradgradcheck_through_a_whole_vit():
    # (its weight gradients against PyTorch's Conv2d: the conv_stem case of tests/test_torch_parity.py)
    model = nn.VisionTransformer(**TINY, stem_channels=(3,), seed=2).to(dtype=np.float64)
    upstream = np.random.default_rng(5).standard_normal((2, 3))
    report = gradcheck(lambda x: (model(x) * upstream).sum(), [images(2)])
    assert report.ok, report
    report = gradgradcheck(lambda x: (model.patch_embed(x) ** 2).sum(), [images(1)])
    assert report.ok, report


def test_a_vit_with_a_stem_saves_its_widths_and_loads_back(tmp_path):
    model = nn.VisionTransformer(**TINY, stem_channels=(3, 4), seed=1)
    assert model.config["stem_channels"] == [3, 4]
    assert "stem_channels" not in nn.VisionTransformer(**TINY).config    # old configs: no stem
    path = checkpoint.save_checkpoint(tmp_path / "m.safetensors", model)
    rebuilt, _ = checkpoint.model_from_checkpoint(path)
    assert rebuilt.patch_embed.stem_channels == (3, 4)
    x = images(2).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(x).data, model(x).data)


def test_a_stride_2_stem_halves_the_image_per_layer_and_the_tokens_keep_their_footprint():
    # 16x16 images, patch 8: two stride-2 layers (16 -> 8 -> 4), then 2x2 patches of the 4x4 grid in 4x4 windows
    embed = nn.PatchEmbed(16, 8, 2, 5, rng=np.random.default_rng(0), stem_channels=(3, 4), stem_stride=2,
                          patch_kernel=4).to(dtype=np.float64)
    assert [conv.weight.shape for conv in embed.stem] == [(3, 2, 4, 4), (4, 3, 4, 4)]
    assert embed.proj.weight.shape == (5, 4, 4, 4) and embed.proj_patch == 2
    assert embed.grid_size == (2, 2) and embed.num_patches == 4
    x = images(3, size=16)
    h = x
    for conv in embed.stem:                             # by hand: Conv2d(k=4, stride=2, padding=1), then GELU
        B, _, H, W = h.shape
        out = conv2d_loop(h, conv.weight.data, conv.bias.data, stride=2, padding=1)         # (B, H*W/4, c)
        h = out.transpose(0, 2, 1).reshape(B, -1, H // 2, W // 2)
        h = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    expected = conv2d_loop(h, embed.proj.weight.data, embed.proj.bias.data, stride=2, padding=1)
    np.testing.assert_allclose(embed(x).data, expected, rtol=1e-10, atol=1e-12)


def test_a_stride_2_stem_passes_gradcheck_and_gradgradcheck_and_loads_back(tmp_path):
    config = dict(TINY, stem_channels=(3,), stem_stride=2)
    model = nn.VisionTransformer(**config, seed=2).to(dtype=np.float64)
    assert model.config["stem_stride"] == 2 and "stem_stride" not in nn.VisionTransformer(**TINY).config
    upstream = np.random.default_rng(5).standard_normal((2, 3))
    report = gradcheck(lambda x: (model(x) * upstream).sum(), [images(2)])
    assert report.ok, report
    report = gradgradcheck(lambda x: (model.patch_embed(x) ** 2).sum(), [images(1)])
    assert report.ok, report
    model32 = nn.VisionTransformer(**config, seed=1)
    rebuilt, _ = checkpoint.model_from_checkpoint(checkpoint.save_checkpoint(tmp_path / "m.safetensors", model32))
    assert rebuilt.patch_embed.stem_stride == 2
    x = images(2).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(x).data, model32(x).data)


@pytest.mark.parametrize("kwargs,message", [
    (dict(stem_channels=(3,), stem_stride=3), "stem_stride must be 1 .* or 2 .*, got 3"),
    (dict(stem_channels=(3,), stem_stride=True), "stem_stride must be 1"),
    (dict(stem_channels=(3, 3, 3), stem_stride=2), "patch_size 4 is not divisible by 8, the stride of 3 stem layers"),
    (dict(stem_channels=(3,), stem_stride=2, patch_kernel=3), "patch_kernel - patch_size must be even"),
])
def test_bad_stem_strides_get_named_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nn.VisionTransformer(**TINY, **kwargs)


@pytest.mark.parametrize("channels", [(0,), (3, -1), (2.5,), (True,), 32])
def test_bad_stem_widths_get_named_errors(channels):
    with pytest.raises(ValueError, match="stem_channels must be positive integers"):
        nn.VisionTransformer(**TINY, stem_channels=channels)
