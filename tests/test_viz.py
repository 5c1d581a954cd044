"""Pictures: what they show matches what they say."""

import numpy as np
import pytest

from minivit import viz


def test_confusion_cells_show_the_percentages_the_colours_and_title_promise():
    counts = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 5]])
    fig = viz.plot_confusion(counts, ["a", "b", "c"])
    ax = fig.axes[0]
    assert "% of each true class" in ax.get_title()
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "80", (0, 1): "20", (1, 0): "25", (1, 1): "25", (1, 2): "50", (2, 2): "100"}
    np.testing.assert_allclose(ax.images[0].get_array(), counts / counts.sum(1, keepdims=True))


def test_curves_of_one_epoch_have_a_whole_epoch_axis():
    for epochs in (1, 2, 30):
        history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.1 / e, "train_acc": 0.5, "test_acc": 0.4}
                   for e in range(1, epochs + 1)]
        for ax in viz.plot_history(history).axes:
            low, high = ax.get_xlim()
            assert low <= 1 and high >= epochs and high - low >= 1
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_animate_images_makes_one_frame_per_picture_and_refuses_none(tmp_path):
    from PIL import Image
    paths = []
    for i, shade in enumerate((0, 128, 255)):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 6), (shade, shade, shade)).save(paths[-1])
    out = viz.animate_images(paths, tmp_path / "a.gif")
    with Image.open(out) as gif:
        assert gif.n_frames == 3 and gif.size == (8, 6)
    with pytest.raises(ValueError, match="no pictures"):
        viz.animate_images([], tmp_path / "b.gif")
