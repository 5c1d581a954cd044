"""Style transfer with ViT features: the embedded paintings and their provenance, the losses, the tokens taken
from inside a ViT, the optimisation of pixels, and ``minivit stylize`` end to end with its errors."""

import hashlib

import numpy as np
import pytest

from minivit import Tensor, art
from minivit.gradcheck import gradcheck
from minivit.nn import VisionTransformer
from tests.test_cli import assert_one_line_error, run_cli


def test_every_painting_is_listed_with_its_provenance_and_its_hash():
    rows = art.paintings()
    files = sorted(p.name for p in art.ART_DIR.glob("*.jpg"))
    assert sorted(r["file"] for r in rows) == files and len(files) == 8
    for r in rows:
        assert r["died"] < 1930, r   # public domain
        assert hashlib.sha256((art.ART_DIR / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    assert sum((art.ART_DIR / f).stat().st_size for f in files) < 1_000_000   # the package stays small


def test_load_image_gives_square_pixels_in_the_unit_range():
    x = art.load_image("monet_charing_cross_bridge", 24)
    assert x.shape == (3, 24, 24) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1 and x.std() > 0.01


def test_an_unknown_name_or_an_unreadable_file_is_an_art_error(tmp_path):
    with pytest.raises(art.ArtError, match="not one of the embedded paintings"):
        art.load_image("mona_lisa", 16)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(art.ArtError, match="not an image that can be read"):
        art.load_image(bad, 16)


def test_gram_matrix_is_the_mean_outer_product_of_tokens():
    t = np.random.default_rng(0).standard_normal((2, 5, 3))
    expected = np.stack([sum(np.outer(row, row) for row in image) / 5 for image in t])
    np.testing.assert_allclose(art.gram_matrix(Tensor(t)).data, expected, rtol=1e-12)


def test_gram_matrix_forgets_where_tokens_are():
    t = np.random.default_rng(1).standard_normal((1, 6, 4))
    shuffled = t[:, [3, 0, 5, 1, 4, 2]]
    np.testing.assert_allclose(art.gram_matrix(Tensor(t)).data, art.gram_matrix(Tensor(shuffled)).data, rtol=1e-12)


def test_total_variation_is_zero_for_a_flat_image_and_grows_with_noise():
    flat = np.full((1, 3, 8, 8), 0.4)
    noisy = flat + np.random.default_rng(2).normal(0, 0.1, flat.shape)
    assert art.total_variation(Tensor(flat)).item() == 0.0
    assert art.total_variation(Tensor(noisy)).item() > 0.01


def small_vit():
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=0, embed_dim=8, depth=3,
                             num_heads=2, seed=0)


def test_block_outputs_are_the_tokens_after_each_block_and_leave_no_hooks():
    model = small_vit()
    images = np.random.default_rng(3).uniform(size=(2, 3, 16, 16)).astype(np.float32)
    first, last = art.block_outputs(model, images, [0, 2])
    x = model.patch_embed(images)
    from minivit.tensor import concat
    x = concat([model.cls_token * np.ones((2, 1, 1), np.float32), x], axis=1) + model.pos_embed
    expected = [model.blocks[0](x)]
    expected.append(model.blocks[2](model.blocks[1](expected[0])))
    np.testing.assert_allclose(first.data, expected[0].data, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last.data, expected[1].data, rtol=1e-5, atol=1e-6)
    assert all(not m._forward_pre_hooks for _, m in model.named_modules())
    with pytest.raises(art.ArtError, match=r"blocks \[3\] do not exist: the feature extractor has blocks 0..2"):
        art.block_outputs(model, images, [3])
    with pytest.raises(art.ArtError, match=r"blocks \[3, 4\] do not exist"):
        art.block_outputs(model, images, [0, 3, 4])


def test_the_style_loss_gradient_in_the_pixels_matches_finite_differences():
    model = small_vit().double()
    rng = np.random.default_rng(4)
    target = art.gram_matrix(art.block_outputs(model, rng.uniform(size=(1, 3, 16, 16)), [1])[0])
    report = gradcheck(lambda x: art.gram_loss(art.block_outputs(model, x, [1])[0], target) + art.total_variation(x),
                       [rng.uniform(size=(1, 3, 16, 16))], mode="directional")
    assert report.ok, str(report)


def test_self_similarity_is_the_cosine_of_every_pair_of_keys():
    keys = np.random.default_rng(5).standard_normal((2, 6, 4))
    S = art.self_similarity(Tensor(keys)).data
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    np.testing.assert_allclose(S, np.einsum("bid,bjd->bij", unit, unit), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.diagonal(S, axis1=1, axis2=2), 1.0, rtol=1e-6)
    scaled = keys * np.random.default_rng(6).uniform(0.5, 3.0, size=(2, 6, 1))   # the length of a key is ignored
    np.testing.assert_allclose(art.self_similarity(Tensor(scaled)).data, S, rtol=1e-6, atol=1e-7)


def test_block_keys_are_the_middle_third_of_the_blocks_qkv():
    model = small_vit()
    images = np.random.default_rng(7).uniform(size=(2, 3, 16, 16)).astype(np.float32)
    keys = art.block_keys(model, images, 1)
    x = art.block_outputs(model, images, [0])[0]                          # the input of block 1
    qkv = model.blocks[1].attn.qkv(model.blocks[1].norm1(x)).data
    np.testing.assert_allclose(keys.data, qkv[:, :, 8:16], rtol=1e-6)
    assert all(not m._forward_pre_hooks for _, m in model.named_modules())
    with pytest.raises(art.ArtError, match=r"blocks \[3\] do not exist"):
        art.block_keys(model, images, 3)


def test_the_structure_loss_gradient_in_the_pixels_matches_finite_differences():
    model = small_vit().double()
    rng = np.random.default_rng(8)
    target = art.self_similarity(art.block_keys(model, rng.uniform(size=(1, 3, 16, 16)), 2))
    report = gradcheck(lambda x: art.structure_loss(art.block_keys(model, x, 2), target),
                       [rng.uniform(size=(1, 3, 16, 16))], mode="directional")
    assert report.ok, str(report)


def test_the_structure_term_pulls_a_noise_start_towards_the_contents_layout():
    content = art.load_image("gauguin_te_fare", 16)
    style = art.load_image("van_gogh_starry_night", 16)
    settings = art.StyleSettings(size=16, steps=20, lr=0.05, style_weight=0.0, content_weight=0.0,
                                 structure_weight=1.0, structure_block=2, init="noise", style_blocks=(0,),
                                 content_blocks=(2,))
    model = small_vit()
    result, _ = art.stylize(content, style, model, settings, log=None)
    target = art.self_similarity(art.block_keys(model, Tensor(content[None] * 2 - 1), 2))
    start = np.random.default_rng(0).uniform(size=content.shape)

    def distance(pixels):
        return art.structure_loss(art.block_keys(model, Tensor(pixels[None].astype(np.float32) * 2 - 1), 2),
                                  target).item()
    assert distance(result) < 0.7 * distance(start)


def test_stylize_lowers_the_style_loss_and_keeps_pixels_in_range():
    style, content = art.load_image("van_gogh_starry_night", 16), art.load_image("gauguin_te_fare", 16)
    settings = art.StyleSettings(size=16, steps=15, lr=0.05, style_blocks=(0, 1), content_blocks=(2,))
    result, losses = art.stylize(content, style, small_vit(), settings, log=None)
    assert result.shape == (3, 16, 16) and result.min() >= 0 and result.max() <= 1
    assert losses[-1]["style"] < 0.7 * losses[0]["style"]


def test_stylize_command_writes_the_result_and_the_side_by_side_figure(capsys, tmp_path):
    out = tmp_path / "pictures" / "result.png"
    code, printed, err = run_cli(capsys, "stylize", "van_gogh_bedroom_in_arles", "monet_charing_cross_bridge",
                                 "--out", out, "--size", "16", "--steps", "3")
    assert code == 0, err
    assert out.exists() and (tmp_path / "pictures" / "result-side-by-side.png").exists()
    assert "16x16, 3 steps in" in printed
    code, _, err = run_cli(capsys, "stylize", "van_gogh_bedroom_in_arles", "monet_charing_cross_bridge",
                           "--out", out, "--size", "16", "--steps", "3")
    assert code == 2
    assert_one_line_error(err, "already exist(s); choose another --out, or pass --force")


@pytest.mark.parametrize("flags, code, message", [
    (["--size", "4"], 2, "--size 4 is too small"),
    (["--steps", "0"], 2, "--steps must be at least 1"),
    (["--style-blocks", "0,x"], 2, "expected block numbers separated by commas"),
    (["--tv-weight", "-1"], 2, "must not be negative"),
    (["--structure-weight", "-1"], 2, "must not be negative"),
    (["--style-blocks", "9", "--size", "16"], 1, "blocks [9] do not exist"),
])
def test_bad_stylize_flags_are_one_line_errors(capsys, tmp_path, flags, code, message):
    got, _, err = run_cli(capsys, "stylize", "gauguin_te_fare", "van_gogh_starry_night", "--out", tmp_path / "r.png",
                          *flags)
    assert got == code
    assert_one_line_error(err, message)
