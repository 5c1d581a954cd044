"""Who painted this patch? A small ViT told the painters of the embedded paintings apart from crops, and where it
looks over whole paintings.

Honest accuracy needs crops the model has never seen, nor any part of them: each painting is cut by a vertical
line into a training region (the left part) and a held-out region (the right part), and every crop lies wholly
inside one region. Chance is the share of the most frequent painter among the held-out crops (Van Gogh painted
three of the eight pictures), the accuracy of always answering him.

After training, each painting is covered by tiles the size of a crop; for each tile the attention rollout of the
class token (``minivit.trace.attention_rollout``) shows which patches the answer draws on, and the last block's
class-token attention is shown head by head. One figure per painting. A last figure projects the patch embeddings
of the held-out crops (the tokens the blocks start from) onto their first two principal components, coloured by
painter: how far the learned patch projection alone already sorts the painters' brushwork and colours.
"""

import json
from pathlib import Path

import numpy as np

from minivit import art, data, optim, trace, viz
from minivit.nn import VisionTransformer
from minivit.tensor import no_grad
from minivit.train import TrainSettings, evaluate, plural, train_epoch


def painters():
    """The painters of the embedded paintings, in a fixed order (the class indices)."""
    return sorted({p["painter"] for p in art.paintings()})


def load_painting(entry, height):
    """An embedded painting as uint8 pixels (3, height, W), its aspect ratio kept."""
    from PIL import Image
    with Image.open(art.painting_path(Path(entry["file"]).stem)) as image:
        w, h = image.size
        image = image.convert("RGB").resize((round(w * height / h), height), Image.Resampling.LANCZOS)
        return np.asarray(image).transpose(2, 0, 1).copy()


def random_crops(picture, left, right, count, crop, rng):
    """``count`` crops (count, 3, crop, crop) whose columns all lie in [left, right) of the picture."""
    _, H, W = picture.shape
    if right - left < crop:
        raise ValueError(f"a region {right - left} pixels wide cannot hold a {crop}-pixel crop")
    ys = rng.integers(0, H - crop + 1, count)
    xs = rng.integers(left, right - crop + 1, count)
    return np.stack([picture[:, y:y + crop, x:x + crop] for y, x in zip(ys, xs)])


HELD_OUT = 0.3   # the right-hand share of each painting kept for testing


def crop_sets(height=128, crop=32, train_per_painting=300, test_per_painting=60, held_out=HELD_OUT, seed=0):
    """Training crops from the left (1 - held_out) of each painting and test crops from the rest.

    Returns (train images, train labels, test images, test labels, the pictures) with uint8 images."""
    rng = np.random.default_rng(seed)
    names = painters()
    sets = {"train": ([], []), "test": ([], [])}
    pictures = []
    for entry in art.paintings():
        picture = load_painting(entry, height)
        pictures.append((entry, picture))
        border = round(picture.shape[2] * (1 - held_out))
        label = names.index(entry["painter"])
        for split, (left, right, count) in {"train": (0, border, train_per_painting),
                                            "test": (border, picture.shape[2], test_per_painting)}.items():
            sets[split][0].append(random_crops(picture, left, right, count, crop, rng))
            sets[split][1].append(np.full(count, label))
    (xtr, ytr), (xte, yte) = [(np.concatenate(a), np.concatenate(b)) for a, b in sets.values()]
    return xtr, ytr, xte, yte, pictures


def train_classifier(out_dir, epochs=15, crop=32, height=128, seed=0, log=print, progress=False):
    """Train the painter classifier, report held-out accuracy against chance, and draw the attention figures.

    Writes into ``out_dir``: report.json, confusion.png and attention-<painting>.png for each painting."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte, pictures = crop_sets(height, crop, seed=seed)
    names = painters()
    mean = tuple(float(m) for m in (xtr / 255.0).mean(axis=(0, 2, 3)))
    std = tuple(float(s) for s in (xtr / 255.0).std(axis=(0, 2, 3)))
    s = TrainSettings(preset="painters", dataset="paintings", epochs=epochs, batch_size=64, lr=1e-3,
                      label_smoothing=0.1, seed=seed)
    loader = data.DataLoader(xtr, ytr, s.batch_size, mean, std, shuffle=True, seed=seed, augment=True, pad=2)
    model = VisionTransformer(img_size=crop, patch_size=4, in_chans=3, num_classes=len(names), embed_dim=64,
                              depth=4, num_heads=4, mlp_ratio=2.0, seed=seed)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, s.weight_decay), lr=s.lr)
    sched = optim.WarmupCosine(opt, len(loader), epochs * len(loader), s.min_lr)
    log(f"{len(ytr)} training crops from the left {1 - HELD_OUT:.0%} of each painting, {len(yte)} held-out crops "
        f"from the right; {len(names)} painters; {plural(epochs, 'epoch')}")
    for epoch in range(epochs):
        row = train_epoch(model, opt, sched, loader, epoch, s, progress)
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            log(f"epoch {epoch + 1:3d}/{epochs}  train loss {row['train_loss']:.3f} acc {row['train_acc']:.1%}")
    result = evaluate(model, xte, yte, mean, std)
    chance = float(np.bincount(yte).max() / len(yte))
    counts = viz.confusion_matrix(yte, result["predictions"], len(names))
    viz.plot_confusion(counts, names, out_dir / "confusion.png")
    report = {"painters": names, "train_crops": int(len(ytr)), "held_out_crops": int(len(yte)),
              "held_out_accuracy": result["acc"], "chance": chance, "confusion_matrix": counts.tolist()}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    log(f"held-out accuracy {result['acc']:.1%} against chance {chance:.1%} (always the most frequent painter)")
    for entry, picture in pictures:
        path = out_dir / f"attention-{Path(entry['file']).stem}.png"
        plot_painting_attention(model, picture, entry, names, mean, std, crop, path)
    explained = plot_embedding_pca(model, xte, yte, names, mean, std, out_dir / "embeddings-pca.png")
    report["pca_explained_variance"] = explained
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    log(f"figures in {out_dir}")
    return report, model


def pca_2d(points):
    """Principal component analysis to two dimensions.

    The principal directions of the centred points X (n, D) are the right singular vectors of X = U S V^T; the
    coordinates along the first two are X V[:2]^T = U[:, :2] S[:2], and component i explains S_i^2 / sum S^2 of
    the variance. Returns (coordinates (n, 2), explained share of each of the two)."""
    centred = points - points.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    return centred @ directions[:2].T, variance[:2] / variance.sum()


def plot_embedding_pca(model, crops, labels, names, mean, std, path, per_crop=8, seed=0):
    """The patch embeddings of ``crops`` (``per_crop`` random patches of each) in the plane of their first two
    principal components, one colour per painter. Returns the explained variance of the two components."""
    x = data.DataLoader(crops, labels, len(crops), mean, std).normalize(crops)
    with no_grad():
        tokens = model.patch_embed(x).data                                  # (B, Np, D), before position
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, tokens.shape[1], size=(len(crops), per_crop))
    points = np.take_along_axis(tokens, pick[:, :, None], axis=1).reshape(-1, tokens.shape[2])
    owners = np.repeat(labels, per_crop)
    xy, explained = pca_2d(points.astype(np.float64))
    fig = viz.figure(6, 5)
    ax = fig.subplots()
    for i, name in enumerate(names):
        ax.scatter(*xy[owners == i].T, s=4, alpha=0.5, label=name)
    ax.set(xlabel=f"PC 1 ({explained[0]:.0%} of the variance)", ylabel=f"PC 2 ({explained[1]:.0%})",
           title="patch embeddings of held-out crops")
    ax.legend(fontsize=7, markerscale=3)
    fig.savefig(path)
    return [float(e) for e in explained]


def tile_attention(model, picture, mean, std, crop):
    """Cover the picture with crop x crop tiles and read the model on each: the rollout of the class token over
    the patches, the last block's class-token attention per head, and the predicted painter per tile.

    Returns (rollout (H', W'), heads (nh, H', W'), predictions (rows, cols)) with H', W' the tiled part."""
    _, H, W = picture.shape
    rows, cols = H // crop, W // crop
    tiles = np.stack([picture[:, r * crop:(r + 1) * crop, c * crop:(c + 1) * crop]
                      for r in range(rows) for c in range(cols)])
    x = data.DataLoader(tiles, np.zeros(len(tiles), np.int64), len(tiles), mean, std).normalize(tiles)
    for block in model.blocks:
        block.attn.keep_attn = True
    model.eval()
    with no_grad():
        logits = model(x)
    model.train()
    attentions = [block.attn.attn_probs for block in model.blocks]
    for block in model.blocks:
        block.attn.keep_attn, block.attn.attn_probs = False, None
    g = model.patch_embed.grid_size
    rollout = trace.attention_rollout(attentions)[:, 0, 1:].reshape(rows, cols, *g)        # class token row
    heads = attentions[-1][:, :, 0, 1:].reshape(rows, cols, -1, *g)                          # (rows, cols, nh, gh, gw)
    rollout = rollout.transpose(0, 2, 1, 3).reshape(rows * g[0], cols * g[1])
    heads = heads.transpose(2, 0, 3, 1, 4).reshape(heads.shape[2], rows * g[0], cols * g[1])
    return rollout, heads, logits.data.argmax(1).reshape(rows, cols)


def plot_painting_attention(model, picture, entry, names, mean, std, crop, path):
    """The painting, the rollout over its tiles with each tile's predicted painter, and the last block's heads."""
    rollout, heads, predictions = tile_attention(model, picture, mean, std, crop)
    rows, cols = predictions.shape
    shown = picture[:, :rows * crop, :cols * crop]
    fig = viz.figure(3.2 * (2 + len(heads)), 3.6)
    axes = fig.subplots(1, 2 + len(heads))
    axes[0].imshow(shown.transpose(1, 2, 0))
    axes[0].set_title(f"{entry['painter']}, {entry['title']}", fontsize=7)
    axes[1].imshow(rollout, cmap="inferno")
    axes[1].set_title("rollout per tile; predicted painter", fontsize=7)
    scale = rollout.shape[0] / rows
    for r in range(rows):
        for c in range(cols):
            axes[1].text((c + 0.5) * scale - 0.5, (r + 0.5) * scale - 0.5, names[predictions[r, c]].split()[-1],
                         color="cyan", ha="center", va="center", fontsize=5)
    for h, ax in enumerate(axes[2:]):
        ax.imshow(heads[h], cmap="viridis")
        ax.set_title(f"last block, head {h}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path)
    return fig
