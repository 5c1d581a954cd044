"""The painter classifier: crops never cross from the training region into the held-out one, and a short run
reports its held-out accuracy against chance and draws one attention figure per painting."""

import json

import numpy as np
import pytest

from minivit import art, painters


def test_crops_stay_inside_their_region():
    picture = np.zeros((3, 40, 100), np.uint8)
    picture[:, :, 70:] = 255                      # the held-out region is white
    rng = np.random.default_rng(0)
    train = painters.random_crops(picture, 0, 70, 200, 16, rng)
    test = painters.random_crops(picture, 70, 100, 200, 16, rng)
    assert train.max() == 0 and test.min() == 255
    with pytest.raises(ValueError, match="cannot hold"):
        painters.random_crops(picture, 90, 100, 1, 16, rng)


def test_crop_sets_label_each_painting_with_its_painter():
    xtr, ytr, xte, yte, pictures = painters.crop_sets(height=64, crop=16, train_per_painting=5, test_per_painting=3)
    names = painters.painters()
    assert len(names) == len({p["painter"] for p in art.paintings()}) == 5
    assert xtr.shape == (40, 3, 16, 16) and xte.shape == (24, 3, 16, 16) and xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [5 * sum(p["painter"] == n for p in art.paintings()) for n in names]


def test_a_short_run_reports_held_out_accuracy_and_draws_every_painting(tmp_path, monkeypatch):
    small = painters.crop_sets
    monkeypatch.setattr(painters, "crop_sets", lambda height, crop, seed: small(64, crop, 20, 10, seed=seed))
    report, _ = painters.train_classifier(tmp_path, epochs=1, crop=16, height=64, log=lambda *a: None)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["held_out_crops"] == 80 and 0 <= saved["held_out_accuracy"] <= 1
    assert saved["chance"] == pytest.approx(3 / 8)   # Van Gogh painted three of the eight
    assert len(list(tmp_path.glob("attention-*.png"))) == 8 and (tmp_path / "confusion.png").exists()
    assert (tmp_path / "embeddings-pca.png").exists()
    first, second = saved["pca_explained_variance"]
    assert 0 < second <= first <= 1


def test_pca_finds_the_plane_points_lie_in():
    rng = np.random.default_rng(0)
    plane = np.linalg.qr(rng.standard_normal((6, 2)))[0]                  # an orthonormal basis of a plane in 6-D
    coords = rng.standard_normal((200, 2)) * [3.0, 1.0]
    xy, explained = painters.pca_2d(coords @ plane.T + 5.0)
    np.testing.assert_allclose(explained.sum(), 1.0, atol=1e-12)         # all the variance is in the plane
    assert explained[0] > explained[1]
    # the coordinates are the points' own, up to a rotation within the plane: same pairwise distances
    d = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)           # noqa: E731
    np.testing.assert_allclose(d(xy), d(coords), atol=1e-9)
