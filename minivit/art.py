"""Style transfer with ViT features: optimise the pixels of an image, not the weights of a network.

The picture x (a Parameter, 3 x H x W, pixels in [0, 1]) starts as the content image c and is changed by gradient
descent so that a fixed ViT sees in it the content of c and the style of a painting s (Gatys et al. 2016, with a
ViT's tokens in place of a CNN's feature maps):

    T_b(x)      the tokens (N, D) after block b of the ViT
    G_b(x)      = T_b(x)^T T_b(x) / N, the D x D Gram matrix: which token features occur together, wherever they
                  are in the picture; it keeps textures and colours and forgets the layout
    style       = sum over style blocks b of ||G_b(x) - G_b(s)||^2 / ||G_b(s)||^2
    content     = sum over content blocks b of ||T_b(x) - T_b(c)||^2 / ||T_b(c)||^2
    smoothness  = the squared total variation: mean of squared differences of neighbouring pixels
    S_b(x)      = the N x N cosine self-similarity of the attention keys of block b: S_ij = k_i.k_j / (|k_i| |k_j|)
                  (Tumanyan et al. 2022, "Splice"): how alike each pair of patches looks to the block, which keeps
                  the picture's structure and not its appearance
    structure   = ||S_b(x) - S_b(c)||^2 / ||S_b(c)||^2 for the structure block b
    loss        = style_weight style + content_weight content + tv_weight smoothness
                  + structure_weight structure

Each term is divided by the size of its target, so that the weights do not depend on the scale of the features.
The ViT may have random weights (random shallow networks already carry texture statistics) or be one trained by
``minivit train``. ``minivit stylize CONTENT STYLE --out PATH`` runs it; the embedded paintings (``paintings()``)
are named by their file stems.
"""

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minivit import devices, optim, viz
from minivit.nn import Parameter, VisionTransformer
from minivit.tensor import Tensor, no_grad

ART_DIR = Path(__file__).parent / "datasets" / "art"


class ArtError(Exception):
    """An image that cannot be read, or settings that cannot make a picture."""


# ------------------------------------------------------------------------------------------------- paintings
def paintings():
    """The embedded paintings, from the provenance table beside them: a list of dicts with file, painter, died,
    title, year and sha256."""
    rows = []
    for line in (ART_DIR / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].endswith(".jpg"):
            painter = re.match(r"(.+) \((\d{4})\)", cells[1])
            rows.append({"file": cells[0], "painter": painter[1], "died": int(painter[2]), "title": cells[2],
                         "year": cells[3], "sha256": cells[4]})
    return rows


def painting_path(name):
    """The file of an embedded painting named by its stem (``van_gogh_starry_night``), its SHA-256 checked."""
    by_stem = {Path(p["file"]).stem: p for p in paintings()}
    if name not in by_stem:
        raise ArtError(f"{name}: no such file, and not one of the embedded paintings ({', '.join(sorted(by_stem))})")
    entry = by_stem[name]
    path = ART_DIR / entry["file"]
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        raise ArtError(f"{path}: its SHA-256 differs from the provenance table; the file is damaged")
    return path


def load_image(source, size):
    """An image file (or an embedded painting's stem) as float32 pixels (3, size, size) in [0, 1]: the largest
    centred square, resized. Reading uses Pillow, which comes with matplotlib."""
    from PIL import Image, UnidentifiedImageError
    path = Path(source)
    if not path.exists():
        path = painting_path(str(source))
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            image = image.resize((size, size), Image.Resampling.LANCZOS, box=box)
            return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ArtError(f"{path}: not an image that can be read ({e})") from e


def save_image(pixels, path):
    """Pixels (3, H, W) in [0, 1] to an image file (the format from the suffix: .png, .jpg)."""
    from PIL import Image
    Image.fromarray(_as_uint8(pixels).transpose(1, 2, 0)).save(path)


def _as_uint8(pixels):
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------- losses
def gram_matrix(tokens):
    """G = T^T T / N for each image: the average outer product of the token features.

    Shapes: tokens (B, N, D) -> (B, D, D)
    """
    return tokens.transpose(-2, -1) @ tokens * (1.0 / tokens.shape[-2])


def gram_loss(tokens, target_gram):
    """||G(tokens) - target||^2 / ||target||^2, summed over the batch.  Shapes: (B, N, D), (B, D, D) -> ()"""
    diff = gram_matrix(tokens) - target_gram
    return (diff * diff).sum() * (1.0 / float((target_gram.data ** 2).sum()))


def feature_loss(tokens, target):
    """||tokens - target||^2 / ||target||^2.  Shapes: (B, N, D), (B, N, D) -> ()"""
    diff = tokens - target
    return (diff * diff).sum() * (1.0 / float((target.data ** 2).sum()))


def total_variation(images):
    """The squared total variation: the mean squared difference between vertical neighbours plus that between
    horizontal neighbours.  Shapes: (B, C, H, W) -> ()"""
    down = images[:, :, 1:, :] - images[:, :, :-1, :]
    across = images[:, :, :, 1:] - images[:, :, :, :-1]
    return (down * down).mean() + (across * across).mean()


def self_similarity(keys, eps=1e-8):
    """S_ij = k_i . k_j / (|k_i| |k_j|), the cosine similarity of every pair of tokens' keys.

    Shapes: keys (B, N, D) -> (B, N, N)
    """
    unit = keys * ((keys * keys).sum(axis=-1, keepdims=True) + eps) ** -0.5
    return unit @ unit.transpose(-2, -1)


def structure_loss(keys, target):
    """||S(keys) - target||^2 / ||target||^2, ``target`` a self-similarity (B, N, N).  Shapes: (B, N, D) -> ()"""
    diff = self_similarity(keys) - target
    return (diff * diff).sum() * (1.0 / float((target.data ** 2).sum()))


def _check_blocks(model, blocks):
    depth = len(model.blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ArtError(f"blocks {bad} do not exist: the feature extractor has blocks 0..{depth - 1}")


def _after(model, block):
    """The module that block ``block``'s output enters: the next block, or the final norm."""
    return model.blocks[block + 1] if block + 1 < len(model.blocks) else model.norm


def _inputs_of(model, images, modules):
    """The tokens entering each of ``modules`` (blocks or the final norm of ``model``), from one forward pass,
    caught by forward pre-hooks that are removed afterwards."""
    found, hooks = {}, []
    for module in {id(m): m for m in modules}.values():
        hook = module.register_forward_pre_hook(lambda m, args: found.__setitem__(id(m), args[0]))
        hooks.append((module, hook))
    try:
        model.forward_features(images)
    finally:
        for module, hook in hooks:
            module._forward_pre_hooks.remove(hook)
    return [found[id(m)] for m in modules]


def attention_keys(block, x):
    """The attention keys (B, N, D) of ``block`` for its input x (B, N, D), all heads side by side: the middle
    third of qkv(norm1(x))."""
    D = x.shape[-1]
    return block.attn.qkv(block.norm1(x))[:, :, D:2 * D]


def block_keys(model, images, block):
    """The attention keys (B, N, D) of block ``block`` (0-based), from one forward pass of a ViT."""
    _check_blocks(model, [block])
    return attention_keys(model.blocks[block], _inputs_of(model, images, [model.blocks[block]])[0])


def block_outputs(model, images, blocks):
    """The tokens (B, N, D) after each block in ``blocks`` (0-based), from one forward pass of a ViT: the output
    of block i is the input of the module after it (block i + 1, or the final norm)."""
    _check_blocks(model, blocks)
    return _inputs_of(model, images, [_after(model, b) for b in blocks])


# ------------------------------------------------------------------------------------------ the optimisation
@dataclass
class StyleSettings:
    size: int = 64
    steps: int = 200
    lr: float = 0.02
    style_weight: float = 1.0
    content_weight: float = 0.5
    tv_weight: float = 1.0
    structure_weight: float = 0.0   # the keys' self-similarity (Splice); 0 leaves it out
    structure_block: int = 3
    style_blocks: tuple = (0, 1, 2, 3)
    content_blocks: tuple = (3,)
    init: str = "content"      # start from the content image, or 'noise'
    seed: int = 0


def random_feature_extractor(size, seed=0):
    """A ViT with random weights for a size x size colour picture: 16 x 16 patches (patch side size / 16, at least
    1), width 64, 4 blocks."""
    patch = max(1, size // 16)
    return VisionTransformer(img_size=size, patch_size=patch, in_chans=3, num_classes=0, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=2.0, seed=seed)


def _model_input(pixels, model):
    """Pixels in [0, 1] (B, 3, H, W) as the model reads them: centred to [-1, 1], grey for a one-channel model."""
    x = pixels * 2.0 - 1.0
    if model.patch_embed.in_chans == 1:
        x = x.mean(axis=1, keepdims=True)
    return x


def stylize(content, style, model=None, settings=None, log=print):
    """Pixels (3, H, W) in [0, 1] with the content of ``content`` and the style of ``style`` (both (3, H, W) in
    [0, 1], of the model's image size), and the loss per step.

    ``model``: the fixed feature extractor (a VisionTransformer for H x W pictures); a random one when None.
    """
    s = settings or StyleSettings()
    model = model or random_feature_extractor(content.shape[-1], s.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    dtype = model.dtype
    _check_blocks(model, list(s.style_blocks) + list(s.content_blocks)
                  + ([s.structure_block] if s.structure_weight else []))
    structure = model.blocks[s.structure_block] if s.structure_weight else None
    wanted = [_after(model, b) for b in list(s.style_blocks) + list(s.content_blocks)]
    wanted += [structure] if structure is not None else []

    def features(pixels):
        """Style tokens, content tokens and the structure block's keys (None without the term): one forward pass."""
        tokens = _inputs_of(model, _model_input(pixels, model), wanted)
        n = len(s.style_blocks)
        keys = attention_keys(structure, tokens[-1]) if structure is not None else None
        return tokens[:n], tokens[n:n + len(s.content_blocks)], keys

    with no_grad():
        style_targets = [gram_matrix(t) for t in features(Tensor(style[None].astype(dtype)))[0]]
        _, content_targets, content_keys = features(Tensor(content[None].astype(dtype)))
        structure_target = self_similarity(content_keys) if structure is not None else None
    start = content if s.init == "content" else np.random.default_rng(s.seed).uniform(size=content.shape)
    picture = Parameter(start[None].astype(dtype))
    opt = optim.AdamW([picture], lr=s.lr, weight_decay=0.0)
    losses = []
    for step in range(s.steps):
        style_tokens, content_tokens, keys = features(picture)
        style_loss = sum(gram_loss(t, g) for t, g in zip(style_tokens, style_targets))
        content_loss = sum(feature_loss(t, c) for t, c in zip(content_tokens, content_targets))
        loss = style_loss * s.style_weight + content_loss * s.content_weight + total_variation(picture) * s.tv_weight
        if structure is not None:
            loss = loss + structure_loss(keys, structure_target) * s.structure_weight
        opt.zero_grad()
        loss.backward()
        opt.step()
        picture.data = devices.get_array_module(picture.data).clip(picture.data, 0.0, 1.0)  # stay a picture
        losses.append({"step": step + 1, "loss": loss.item(), "style": float(style_loss.item()),
                       "content": float(content_loss.item())})
        if log and (step + 1) % max(1, s.steps // 5) == 0:
            h = losses[-1]
            log(f"step {step + 1:4d}/{s.steps}  loss {h['loss']:.4f} (style {h['style']:.4f}, content "
                f"{h['content']:.4f})")
    return devices.asnumpy(picture.data[0]), losses


def stylize_files(content_source, style_source, out_path, model=None, settings=None, log=print):
    """``stylize`` on two image files (or embedded paintings' stems): writes the result to ``out_path`` and a
    side-by-side figure (content, style, result) beside it as <name>-side-by-side.png. Returns the paths and the
    wall time in seconds."""
    s = settings or StyleSettings()
    size = model.patch_embed.img_size[0] if model is not None else s.size
    content, style = load_image(content_source, size), load_image(style_source, size)
    t0 = time.perf_counter()
    result, losses = stylize(content, style, model, s, log)
    seconds = time.perf_counter() - t0
    out_path = Path(out_path)
    side = out_path.with_name(out_path.stem + "-side-by-side.png")
    save_image(result, out_path)
    viz.plot_images(_as_uint8(np.stack([content, style, result])), cols=3, path=side,
                    titles=["content", "style", f"result ({s.steps} steps)"])
    log(f"{size}x{size}, {s.steps} steps in {seconds:.1f}s; wrote {out_path} and {side}")
    return {"result": out_path, "side_by_side": side, "seconds": seconds, "losses": losses}
