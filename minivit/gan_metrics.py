"""Offline sample quality: how close generated images are to real ones, seen through a minivit classifier.

The usual FID embeds images with an Inception network whose weights are downloaded at run time. Offline, and for
MNIST-like data as papers do there, the embedding comes from a classifier trained on the same data set
(``minivit train``): its pooled pre-head features phi(x) and its class probabilities p(y|x). The numbers are
therefore comparable with each other (same classifier, same data), never with published Inception FIDs.

    Frechet distance    ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)): the 2-Wasserstein distance between
                        Gaussians fitted to the real and the generated features (Heusel et al. 2017); 0 for equal
                        statistics, lower is better.
    precision, recall   (Kynkaanniemi et al. 2019) each real feature owns a ball reaching to its k-th nearest real
                        neighbour (k = 3); precision is the share of generated samples inside some real ball
                        (quality), recall the share of real samples inside some generated ball (coverage: a
                        collapsed generator has low recall).
    classifier score    exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) (the Inception Score's formula):
                        high when each sample is one confident class and the classes are used evenly; at most
                        the number of classes.
    class histogram     how many samples the classifier puts in each class; the smallest share shows a
                        missing mode (1/K for perfectly even classes).
"""

from pathlib import Path

import numpy as np

from minivit import backend, checkpoint
from minivit import functional as F
from minivit.tensor import no_grad

__all__ = ["frechet_distance", "frechet_distance_from_statistics", "feature_statistics", "precision_recall",
           "classifier_score", "class_histogram", "Classifier", "sample_quality"]


def _features(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected features (N, d) with N >= 2, got shape {x.shape}")
    return x


# ------------------------------------------------------------------------------------------------ Frechet distance
def feature_statistics(features):
    """The mean (d,) and covariance (d, d) (unbiased, as NumPy's and the FID's) of features (N, d)."""
    features = _features(features, "feature_statistics")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet (2-Wasserstein) distance of two Gaussians.

    (S1 S2)^(1/2) comes from ``scipy.linalg.sqrtm``; for singular covariances (fewer samples than features) a
    small multiple of the identity is added first, as in the reference FID code; its tiny imaginary part from
    rounding is dropped.
    """
    import scipy.linalg  # here, not at the top: it takes a noticeable part of a second to import
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and "
                         f"{sigma2.shape}; expected ({d},) and ({d}, {d})")
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = 1e-6 * np.eye(d)
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    root = root.real
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def frechet_distance(features1, features2):
    """The Frechet distance between Gaussians fitted to two sets of features (N1, d) and (N2, d)."""
    return frechet_distance_from_statistics(*feature_statistics(features1), *feature_statistics(features2))


# ------------------------------------------------------------------------------------------------ precision, recall
def _squared_distances(a, b):
    """||a_i - b_j||^2 for all pairs: (len(a), len(b)), from |a|^2 - 2 a.b + |b|^2 (clipped at 0)."""
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _radii(features, k):
    """Each feature's squared distance to its k-th nearest neighbour in the same set (itself not counted)."""
    d = _squared_distances(features, features)
    return np.partition(d, k, axis=1)[:, k]           # column 0 of the sorted row is the point itself


def _coverage(points, centres, radii):
    """The share of ``points`` inside at least one ball (centre, radius) of the other set."""
    inside = _squared_distances(points, centres) <= radii[None, :]
    return float(inside.any(axis=1).mean())


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated features against real ones.

    Args:
        real: (N, d) features of real images.
        fake: (M, d) features of generated images.
        k: the k-th nearest neighbour sets each ball's radius (3 in the paper).

    Returns:
        (precision, recall), each in [0, 1].
    """
    real, fake = _features(real, "precision_recall: real"), _features(fake, "precision_recall: fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: real features have {real.shape[1]} dimensions, fake {fake.shape[1]}")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"precision_recall: k must be at least 1 and below the size of each set "
                         f"({len(real)} real, {len(fake)} fake), got {k}")
    precision = _coverage(fake, real, _radii(real, k))
    recall = _coverage(real, fake, _radii(fake, k))
    return precision, recall


# ------------------------------------------------------------------------------------------------ classes
def _probabilities(probs):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or not np.allclose(probs.sum(1), 1.0, atol=1e-4) or (probs < 0).any():
        raise ValueError(f"expected class probabilities (N, K), each row summing to 1; got shape {probs.shape}")
    return probs


def classifier_score(probs):
    """exp(E_x KL(p(y|x) || p(y))) for class probabilities (N, K), p(y) their mean over the samples."""
    probs = _probabilities(probs)
    marginal = probs.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):   # 0 log 0 = 0
        kl = np.where(probs > 0, probs * (np.log(probs) - np.log(marginal)), 0.0).sum(axis=1)
    return float(np.exp(kl.mean()))


def class_histogram(probs):
    """How many samples the classifier assigns to each class (its most probable one): (K,) integers."""
    probs = _probabilities(probs)
    return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])


# ------------------------------------------------------------------------------------------------ the classifier
class Classifier:
    """A minivit ViT classifier used as the feature extractor: pooled pre-head features and probabilities.

    Args:
        model: a ``VisionTransformer`` trained on the data set the samples imitate.
        mean, std: the per-channel pixel statistics it was trained with (inputs are normalised as in training).
    """

    def __init__(self, model, mean, std):
        self.model, self.mean, self.std = model.eval(), np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @classmethod
    def from_checkpoint(cls, path):
        """The classifier of a ``minivit train`` checkpoint (or a .safetensors export), with its data set's
        pixel statistics."""
        from minivit import data
        model, ckpt = checkpoint.model_from_checkpoint(Path(path))
        if "dataset" not in ckpt.train_settings:
            raise checkpoint.CheckpointError(f"{path}: does not record the data set it was trained on")
        info = data.dataset_info(ckpt.train_settings["dataset"])
        return cls(model, info.mean, info.std)

    def __call__(self, images, batch_size=256):
        """Features (N, D) and probabilities (N, K) of images (N, C, H, W) with pixels in [0, 1]."""
        images = np.asarray(images, dtype=np.float32)
        features, probs = [], []
        scale, shift = (1 / self.std).reshape(1, -1, 1, 1), (self.mean / self.std).reshape(1, -1, 1, 1)
        with no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size] * scale - shift
                pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)   # (B, D)
                features.append(backend.asnumpy(pooled.data))
                probs.append(backend.asnumpy(F.softmax(self.model.head(pooled), axis=1).data))
        return np.concatenate(features).astype(np.float64), np.concatenate(probs).astype(np.float64)


def sample_quality(classifier, real_images, fake_images, k=3):
    """Every metric of this module for generated images against real ones (both (N, C, H, W) in [0, 1]).

    Returns a dict: frechet_distance, precision, recall, classifier_score, class_histogram (a list) and
    smallest_class_share.
    """
    real_features, _ = classifier(real_images)
    fake_features, fake_probs = classifier(fake_images)
    precision, recall = precision_recall(real_features, fake_features, k)
    histogram = class_histogram(fake_probs)
    return {"frechet_distance": frechet_distance(real_features, fake_features), "precision": precision,
            "recall": recall, "classifier_score": classifier_score(fake_probs),
            "class_histogram": histogram.tolist(), "smallest_class_share": float(histogram.min() / histogram.sum())}
