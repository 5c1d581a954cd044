"""The attention trace reproduces the engine's attention; rollout and the pictures work."""

import numpy as np
import pytest

from minivit import nn, no_grad, viz
from minivit.trace import attention_rollout, attention_trace, block_attention_trace


def small_vit():
    return nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2,
                                num_heads=2, seed=1)


def test_trace_of_a_block_equals_the_models_own_attention():
    model = small_vit()
    images = np.random.default_rng(0).standard_normal((3, 1, 8, 8))
    model.double()
    for block in model.blocks:
        block.attn.keep_attn = True
    with no_grad():
        model(images)
    for i, block in enumerate(model.blocks):
        trace = block_attention_trace(model, images, block=i)
        np.testing.assert_allclose(trace["probs"], block.attn.attn_probs, rtol=1e-10)
        np.testing.assert_allclose(trace["probs"].sum(-1), 1.0)
    assert trace.names() == ["x", "qkv", "q", "k", "v", "scores", "scaled", "probs", "out", "merged"]
    text = str(trace)
    assert "scores / sqrt(hd)" in text and "(3, 2, 5, 5)" in text


def test_trace_checks_its_inputs():
    with pytest.raises(ValueError, match=r"w_qkv must be \(3D, D\) = \(18, 6\)"):
        attention_trace(np.zeros((1, 4, 6)), np.zeros((6, 6)), None, 2)
    with pytest.raises(ValueError, match="not divisible by num_heads 4"):
        attention_trace(np.zeros((1, 4, 6)), np.zeros((18, 6)), None, 4)
    with pytest.raises(KeyError, match="no step 'logits'"):
        attention_trace(np.zeros((1, 4, 6)), np.zeros((18, 6)), None, 2)["logits"]


def test_rollout_of_identity_attention_is_identity_and_rows_sum_to_one():
    eye = np.broadcast_to(np.eye(4), (2, 3, 4, 4))
    np.testing.assert_allclose(attention_rollout([eye, eye]), np.broadcast_to(np.eye(4), (2, 4, 4)))
    rng = np.random.default_rng(0)
    layers = [rng.random((2, 3, 4, 4)) for _ in range(3)]
    layers = [a / a.sum(-1, keepdims=True) for a in layers]
    np.testing.assert_allclose(attention_rollout(layers).sum(-1), 1.0)
    manual = 0.5 * (layers[1].mean(1) + np.eye(4)) @ (0.5 * (layers[0].mean(1) + np.eye(4)))
    np.testing.assert_allclose(attention_rollout(layers[:2]), manual)


def test_pictures_are_written(tmp_path):
    model = small_vit()
    images = np.random.default_rng(0).integers(0, 255, (4, 1, 8, 8)).astype(np.uint8)
    trace = block_attention_trace(model, images.astype(np.float32), 0)
    for name, fig in {
        "trace": trace.plot(),
        "patches": viz.plot_patch_grid(images[0], 4),
        "attention": viz.plot_attention(trace["probs"][0]),
        "on_image": viz.plot_attention_on_image(images[0], trace["probs"][0, 0, 0, 1:], (2, 2)),
        "images": viz.plot_images(images, ["a", "b", "c", "d"]),
        "history": viz.plot_history([{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5,
                                      "test_acc": 0.4}]),
        "confusion": viz.plot_confusion(viz.confusion_matrix([0, 1, 1], [0, 1, 0], 2), ["a", "b"]),
        "mistakes": viz.plot_mistakes(images, np.array([0, 1, 2, 0]), np.array([1, 1, 0, 0]),
                                      np.array([0.9, 0.8, 0.7, 0.6]), ["a", "b", "c"]),
    }.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.stat().st_size > 2000, name
    np.testing.assert_array_equal(viz.confusion_matrix([0, 1, 1], [0, 1, 0], 2), [[1, 0], [1, 1]])
