"""The offline sample-quality metrics on cases with known answers."""

import numpy as np
import pytest

from minivit import checkpoint, nn
from minivit.gan_metrics import (Classifier, class_histogram, classifier_score, frechet_distance,
                                 frechet_distance_from_statistics, precision_recall, sample_quality)


def _random_covariance(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_of_two_gaussians_equals_the_closed_form():
    # 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (its eigenvalues are positive)
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
    s1, s2 = _random_covariance(rng, 2), _random_covariance(rng, 2)
    M = s1 @ s2
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(M)
                                                                                   + 2 * np.sqrt(np.linalg.det(M)))
    assert frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-10)
    # diagonal covariances: sum of (mu1 - mu2)^2 + (sd1 - sd2)^2 per axis
    sd1, sd2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    assert frechet_distance_from_statistics(mu1, np.diag(sd1 ** 2), mu2, np.diag(sd2 ** 2)) == pytest.approx(
        expected, rel=1e-10)


def test_frechet_distance_of_samples_approaches_that_of_their_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.standard_normal(3), rng.standard_normal(3), _random_covariance(rng, 3), \
        _random_covariance(rng, 3)
    a = rng.multivariate_normal(mu1, s1, 200_000)
    b = rng.multivariate_normal(mu2, s2, 200_000)
    exact = frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)


def test_identical_sets_are_at_distance_zero_and_a_shift_adds_its_squared_length():
    x = np.random.default_rng(2).standard_normal((300, 8))
    assert abs(frechet_distance(x, x)) < 1e-8
    assert frechet_distance(x, x + 0.5) == pytest.approx(8 * 0.25, rel=1e-8)


def test_a_set_against_itself_has_precision_and_recall_one():
    x = np.random.default_rng(3).standard_normal((200, 4))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_a_collapsed_set_has_high_precision_and_low_recall_and_a_far_one_has_neither():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((500, 2))
    collapsed = real[:5].repeat(40, axis=0) + 1e-3 * rng.standard_normal((200, 2))   # 5 modes of real data
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.1
    precision, recall = precision_recall(real, real[:200] + 10.0)
    assert precision == 0.0 and recall == 0.0


def test_classifier_score_is_the_number_of_evenly_used_confident_classes():
    K = 10
    confident_even = np.eye(K)[np.arange(100) % K]
    assert classifier_score(confident_even) == pytest.approx(K)
    assert classifier_score(np.eye(K)[np.zeros(100, int)]) == pytest.approx(1.0)   # one class only
    assert classifier_score(np.full((100, K), 1 / K)) == pytest.approx(1.0)        # unsure everywhere
    half = np.eye(K)[np.arange(100) % 5]                                           # 5 of the 10 classes
    assert classifier_score(half) == pytest.approx(5.0)


def test_class_histogram_counts_the_most_probable_class():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    assert class_histogram(probs).tolist() == [2, 1, 0]


def test_bad_inputs_get_named_errors():
    with pytest.raises(ValueError, match=r"expected features \(N, d\) with N >= 2, got shape \(5,\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"means \(2,\) and \(3,\)"):
        frechet_distance_from_statistics(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="real features have 2 dimensions, fake 3"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"k must be at least 1 and below the size of each set \(10 real, 3 fake\)"):
        precision_recall(np.zeros((10, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="each row summing to 1"):
        classifier_score(np.ones((4, 3)))


def test_a_classifier_checkpoint_gives_features_and_probabilities(tmp_path):
    model = nn.VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=8, depth=1,
                                 num_heads=2)
    path = checkpoint.save_checkpoint(tmp_path / "c.safetensors", model,
                                      train_settings={"dataset": "fashion-mnist-mini"})
    classifier = Classifier.from_checkpoint(path)
    images = np.random.default_rng(5).random((7, 1, 28, 28))
    features, probs = classifier(images, batch_size=3)
    assert features.shape == (7, 8) and probs.shape == (7, 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    report = sample_quality(classifier, images, images)
    assert report["precision"] == report["recall"] == 1.0 and abs(report["frechet_distance"]) < 1e-6
    assert sum(report["class_histogram"]) == 7
