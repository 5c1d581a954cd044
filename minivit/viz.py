"""Pictures with matplotlib: training curves, confusion matrices, mistakes, patch grids and attention maps.

Each function draws on a new ``matplotlib.figure.Figure`` (no global pyplot state, so it works headless) and
returns it; pass ``path`` to also save it as a PNG.
"""

import io

import numpy as np

from minivit.devices import asnumpy

_notebook = {"registered": False}


def _show_in_notebooks():
    """Teach a running IPython kernel to draw these Figures as PNG: without pyplot (which these functions avoid,
    so that they work with no display) a Figure left last in a notebook cell would only print its repr."""
    _notebook["registered"] = True
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    def png(fig):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    shell.display_formatter.formatters["image/png"].for_type(Figure, png)


def figure(width, height):
    """A new matplotlib Figure (no pyplot state, works without a display); show it by leaving it last in a cell."""
    from matplotlib.figure import Figure
    if not _notebook["registered"]:
        _show_in_notebooks()
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def integer_ticks(ax):
    """Ticks only at whole numbers on both axes: rows and columns of a heat map are tokens, not fractions."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path):
    if path is not None:
        fig.savefig(path)
    return fig


def plot_history(history, path=None):
    """Loss and accuracy per epoch, train, validation (when held out) and test, from a list of metric dicts (as
    in metrics.jsonl)."""
    splits = [("train", "train"), ("val", "validation"), ("test", "test")]
    return plot_curves(history, [("loss", "cross-entropy", [(f"{k}_loss", label) for k, label in splits], 1),
                                 ("accuracy", "accuracy (%)", [(f"{k}_acc", label) for k, label in splits], 100)],
                       path)


def plot_curves(history, panels, path=None):
    """Metrics per epoch side by side, from a list of metric dicts (as in metrics.jsonl).

    Args:
        panels: per panel (title, y label, [(key, legend label), ...], scale): each key's values times scale.
    """
    from matplotlib.ticker import MaxNLocator
    fig = figure(5 * len(panels), 4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    epochs = [h["epoch"] for h in history]
    for ax, (title, ylabel, curves, scale) in zip(axes, panels):
        for key, label in curves:   # a metric only some epochs have (the test set at the end) is drawn where it is
            points = [(e, scale * h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for one epoch
        ax.set_xlim(min(epochs, default=1) - 0.5, max(epochs, default=1) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def confusion_matrix(labels, predictions, num_classes):
    """counts[i, j] = how many images of class i were predicted as class j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def plot_confusion(counts, classes, path=None):
    """A confusion matrix as a heat map: cell (i, j) shows, in colour and in figures, the percentage of the images
    of true class i that were predicted as class j (each row sums to 100)."""
    from matplotlib.ticker import PercentFormatter
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = figure(7, 6)
    ax = fig.subplots()
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (% of each true class)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                ax.text(j, i, f"{100 * shares[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, format=PercentFormatter(xmax=1))
    return _save(fig, path)


def _show_image(ax, image):
    image = np.asarray(image)
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray")
    else:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 255).astype(np.uint8))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_images(images, titles=None, cols=8, path=None):
    """A grid of images (N, C, H, W), uint8 or float, with optional titles."""
    images = asnumpy(images)
    rows = max(1, -(-len(images) // cols))
    fig = figure(1.3 * cols, 1.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes, images)):
        ax.axis("on")
        if image.dtype != np.uint8:  # show floats stretched to their own range
            lo, hi = image.min(), image.max()
            image = ((image - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
        _show_image(ax, image)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    return _save(fig, path)


def plot_mistakes(images, labels, predictions, confidences, classes, path=None, count=24):
    """The most confident wrong predictions: each image with its true and predicted class.

    Args:
        images: uint8 (N, C, H, W).
        labels, predictions: (N,) classes.
        confidences: (N,) probability given to the predicted class.
    """
    wrong = np.flatnonzero(labels != predictions)
    worst = wrong[np.argsort(-confidences[wrong])][:count]
    cols = 6
    rows = max(1, -(-len(worst) // cols))
    fig = figure(2 * cols, 2.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, worst):
        ax.axis("on")
        _show_image(ax, images[i])
        ax.set_title(f"true: {classes[labels[i]]}\npred: {classes[predictions[i]]} ({confidences[i]:.0%})",
                     fontsize=8)
    fig.suptitle("most confident mistakes")
    return _save(fig, path)


def plot_patch_grid(image, patch_size, path=None):
    """One image with the patch grid drawn over it, each patch numbered in the order the model reads it."""
    image = asnumpy(image)
    C, H, W = image.shape
    fig = figure(4, 4)
    ax = fig.subplots()
    _show_image(ax, image)
    for k in range(0, H + 1, patch_size):
        ax.axhline(k - 0.5, color="red", lw=0.8)
    for k in range(0, W + 1, patch_size):
        ax.axvline(k - 0.5, color="red", lw=0.8)
    for r in range(H // patch_size):
        for c in range(W // patch_size):
            ax.text(c * patch_size + patch_size / 2 - 0.5, r * patch_size + patch_size / 2 - 0.5,
                    r * (W // patch_size) + c, color="yellow", ha="center", va="center", fontsize=6)
    return _save(fig, path)


def plot_attention(probs, path=None, title="attention", labels=None):
    """Attention probabilities (nh, N, N) or (N, N) as heat maps, one per head (queries down, keys across)."""
    probs = asnumpy(probs)
    probs = probs[None] if probs.ndim == 2 else probs
    fig = figure(3 * len(probs), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(probs)))
    for h, ax in enumerate(axes):
        im = ax.imshow(probs[h], cmap="viridis", vmin=0)
        ax.set(title=f"head {h}", xlabel="key", ylabel="query")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
        else:
            integer_ticks(ax)
        fig.colorbar(im, ax=ax, fraction=0.046, label="probability")
    fig.suptitle(title)
    return _save(fig, path)


def plot_attention_on_image(image, attention, grid, path=None, title="class token attention"):
    """An image beside a map of how much one query (e.g. the class token) attends to each patch.

    Args:
        image: (C, H, W).
        attention: (Np,) weights over the patches.
        grid: (rows, cols) of patches.
    """
    image, attention = asnumpy(image), asnumpy(attention)
    fig = figure(6, 3)
    left, right = fig.subplots(1, 2)
    _show_image(left, image)
    im = right.imshow(attention.reshape(grid), cmap="inferno")
    right.set_xticks([])
    right.set_yticks([])
    right.set_title(title)
    fig.colorbar(im, ax=right, fraction=0.046, label="attention weight")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------ VAE
def plot_vae_history(history, path=None):
    """The negative ELBO (nats per image, train and test) and the KL term per epoch, from a VAE run's metrics."""
    return plot_curves(history, [
        ("-ELBO (lower is better)", "nats per image", [("train_nelbo", "train"), ("test_nelbo", "test")], 1),
        ("KL(q(z|x) || p(z))", "nats per image", [("train_kl", "train"), ("test_kl", "test")], 1)], path)


def tile(images, rows, cols):
    """rows * cols images (N, C, H, W) side by side as one image (C, rows H, cols W)."""
    images = asnumpy(images)
    N, C, H, W = images.shape
    if N != rows * cols:
        raise ValueError(f"tile: {N} images do not fill {rows} x {cols}")
    return images.reshape(rows, cols, C, H, W).transpose(2, 0, 3, 1, 4).reshape(C, rows * H, cols * W)


def plot_latent_manifold(images, grid_values, path=None, title="decoded latent plane"):
    """Images decoded from a square grid of 2-D latent points, drawn as one mosaic with the z values on the axes.

    Args:
        images: (n * n, C, H, W) in [0, 1], row-major, z2 decreasing down the rows and z1 increasing across.
        grid_values: the n values of each coordinate, increasing.
    """
    n = len(grid_values)
    mosaic = tile(images, n, n)
    fig = figure(6, 6)
    ax = fig.subplots()
    lo, hi = grid_values[0], grid_values[-1]
    step = (hi - lo) / max(n - 1, 1)
    extent = (lo - step / 2, hi + step / 2, lo - step / 2, hi + step / 2)
    picture = mosaic[0] if mosaic.shape[0] == 1 else mosaic.transpose(1, 2, 0)
    ax.imshow(np.clip(picture, 0, 1), cmap="gray", extent=extent, vmin=0, vmax=1)
    ax.set(xlabel="z1", ylabel="z2", title=title)
    return _save(fig, path)


def plot_latent_scatter(points, labels, classes, path=None, title="test set encoded (posterior means)"):
    """2-D points (N, 2) coloured by class, with a legend of class names."""
    points, labels = asnumpy(points), np.asarray(labels)
    fig = figure(7, 6)
    ax = fig.subplots()
    colours = [f"C{i}" for i in range(10)]
    for k, name in enumerate(classes):
        chosen = labels == k
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, color=colours[k % 10], label=name)
    ax.set(xlabel="z1", ylabel="z2", title=title)
    ax.legend(markerscale=3, fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------ GAN
def plot_gan_history(history, path=None):
    """A GAN's losses per epoch (discriminator and generator) and, when measured, its sample quality: the
    Frechet distance of features, precision, recall and the smallest class share."""
    from matplotlib.ticker import MaxNLocator
    quality = [key for key in ("frechet_distance", "precision", "recall", "smallest_class_share")
               if history and history[0].get(key) is not None]
    fig = figure(5 * (1 + bool(quality)), 4)
    axes = np.atleast_1d(fig.subplots(1, 1 + bool(quality)))
    epochs = [h["epoch"] for h in history]
    for key, label in (("loss_d", "discriminator"), ("loss_g", "generator")):
        axes[0].plot(epochs, [h[key] for h in history], marker="o", label=label)
    axes[0].set(xlabel="epoch", ylabel="loss", title="losses")
    if quality:
        fd_ax, share_ax = axes[1], axes[1].twinx()
        fd_ax.plot(epochs, [h["frechet_distance"] for h in history], marker="o", color="black",
                   label="Frechet distance")
        fd_ax.set(xlabel="epoch", ylabel="Frechet distance (minivit features)", title="sample quality")
        for key in quality[1:]:
            share_ax.plot(epochs, [h[key] for h in history], marker=".", linestyle="--", label=key.replace("_", " "))
        share_ax.set_ylim(0, 1)
        share_ax.legend(loc="upper right", fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _save(fig, path)


def animate_images(paths, out, seconds_per_frame=0.5):
    """An animated GIF of the pictures in ``paths`` in order (one frame each, the last held twice as long): how a
    generator's sample grid changes over training. Written atomically; returns ``out``."""
    from PIL import Image
    from minivit.checkpoint import atomic_write
    frames = [Image.open(p).convert("RGB") for p in paths]
    if not frames:
        raise ValueError("animate_images: no pictures to animate")
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    durations = [int(1000 * seconds_per_frame)] * len(frames)
    durations[-1] *= 2
    atomic_write(out, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                 duration=durations, loop=0))
    return out
