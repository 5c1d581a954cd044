"""The command line: ``minivit train``, ``minivit eval``, ``minivit export``, ``minivit gan``, ``minivit sample``,
``minivit vae``, ``minivit stylize`` and ``minivit painters`` (also ``python -m minivit``).

Every failure ends in one line on stderr, ``minivit: error: ...``, and an exit code: 2 for a bad command line
(a flag out of range, flags that contradict each other, a file that must not be overwritten), 1 for a fault at run
time (missing or corrupt data, a damaged checkpoint, a full disk, a diverged run), 130 when interrupted. ``--debug``
shows the traceback instead. docs/errors.md lists what each bad input gets.
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from minivit import art, checkpoint, data, distributed, gan_train, painters, vae_train
from minivit.rundir import RunLocked
from minivit.train import (PRESETS, STOP, SettingsError, TrainingDiverged, TrainSettings, evaluate_checkpoint,
                           flag, settings_for, train)

# flag -> (TrainSettings field, type, help)
TRAIN_FLAGS = {
    "--dataset": ("dataset", str, f"one of {', '.join(data.DATASETS)}"),
    "--data-dir": ("data_dir", str, "folder with the dataset files (looked up first; it must exist)"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--minutes": ("minutes", float, "budget of wall time: first measure the step and evaluation times here, then "
                  "train as many epochs as fit, at most --epochs, the schedule ending with them (0: no budget)"),
    "--batch-size": ("batch_size", int, "images per step"),
    "--lr": ("lr", float, "peak learning rate of AdamW"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine decay (at most --lr)"),
    "--weight-decay": ("weight_decay", float, "AdamW decoupled weight decay (not on norms, biases, tokens)"),
    "--warmup-epochs": ("warmup_epochs", float, "epochs of linear warmup (a preset scales its own with --epochs)"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing of the cross-entropy, in [0, 1)"),
    "--clip-grad": ("clip_grad", float, "clip the global gradient norm to this (0: off)"),
    "--patch-size": ("patch_size", int, "patch side in pixels"),
    "--patch-kernel": ("patch_kernel", int, "side of overlapping windows centred on the patches, a convolutional "
                       "tokeniser (0: the patches themselves)"),
    "--stem-channels": ("stem_channels", int, "width of 3x3 convolutions (stride 1, GELU) run on the image before "
                        "the patch projection (0: none)"),
    "--stem-depth": ("stem_depth", int, "how many such convolutions (with --stem-channels)"),
    "--stem-stride": ("stem_stride", int, "1: 3x3 stem convolutions keeping the image's size; 2: 4x4 windows with "
                      "stride 2, each halving it (the patch projection then reads the smaller grid)"),
    "--embed-dim": ("embed_dim", int, "token width"),
    "--depth": ("depth", int, "number of transformer blocks"),
    "--num-heads": ("num_heads", int, "attention heads"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP width as a multiple of the token width"),
    "--pool": ("global_pool", str, "'token' (class token) or 'avg' (mean of patch tokens)"),
    "--pos-embed": ("pos_embed", str, "'learn' or 'sincos'"),
    "--drop-rate": ("drop_rate", float, "dropout before the head, in [0, 1)"),
    "--seed": ("seed", int, "seeds weights, shuffling and dropout (0 to 2**32 - 1)"),
    "--limit": ("limit", int, "use only the first N train and test images (0: all)"),
    "--crop-pad": ("crop_pad", int, "zero padding before --augment's random crops (-1: an eighth of the image "
                   "side; 0: flips only)"),
    "--erase": ("erase", float, "with --augment: the probability that a training image has a random rectangle (2%% "
                "to a third of it) overwritten with random pixels, random erasing (0: off)"),
    "--tta-shift": ("tta_shift", int, "the evaluation after the last epoch (and minivit eval) averages the class "
                    "probabilities of the image moved by 0..N pixels up, down, left and right (1 + 4N views, each "
                    "also mirrored with --flip-tta); earlier epochs' evaluations see each image once (0: off)"),
    "--val-size": ("val_size", int, "hold out the last N training images to evaluate on each epoch; the test set "
                   "is then evaluated once, at the end (0: the test set each epoch)"),
    "--ema": ("ema", float, "decay of a moving average of the weights, which is evaluated and saved (0: off)"),
    "--device": ("device", str, "'cpu' or 'cuda'"),
    "--processes": ("processes", int, "processes on this machine, each taking its share of every batch, the "
                    "gradients summed over them each step (1: this one; under mpiexec, mpiexec's ranks instead)"),
}
# What --resume accepts besides the checkpoint's own settings.
RESUME_FLAGS = ("device", "data_dir", "anomaly", "verify", "epochs", "processes")
# flag -> (VAESettings field, type, help), for minivit vae
VAE_FLAGS = {
    **{name: TRAIN_FLAGS[name] for name in ("--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--min-lr",
                                            "--weight-decay", "--warmup-epochs", "--clip-grad", "--patch-size",
                                            "--embed-dim", "--depth", "--num-heads", "--mlp-ratio", "--seed",
                                            "--limit", "--device")},
    "--latent-dim": ("latent_dim", int, "size of the latent code z (2: draw the latent plane)"),
    "--likelihood": ("likelihood", str, "'bernoulli' (binarised pixels) or 'gaussian' (one learned variance)"),
    "--beta": ("beta", float, "weight of the KL term (beta-VAE; 1: the ELBO)"),
    "--kl-warmup-epochs": ("kl_warmup_epochs", float, "epochs over which the KL weight rises from 0 to --beta"),
    "--iwae-k": ("iwae_k", int, "samples of the importance-weighted bound at the end (0: skip it)"),
}


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``minivit: error: argument --epochs: invalid int value: 'many'``."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser():
    parser = Parser(prog="minivit", description="Train and evaluate Vision Transformers written in NumPy.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = settings_for("tiny")
    t = sub.add_parser("train", parents=[common], help="train a ViT", description="Train a ViT. Presets: " + "; ".join(
        f"{name} ({p['dataset']}, " + (f"as many epochs as fit in {p['minutes']:g} minutes, at most {p['epochs']})"
                                       if p.get("minutes") else f"{p['epochs']} epochs)")
        for name, p in PRESETS.items())
        + ". The defaults shown are the tiny preset's; another preset sets its own.")
    t.add_argument("--preset", default="tiny", choices=list(PRESETS), help="starting settings (default: tiny, "
                   "the embedded Fashion-MNIST subset)")
    _add_settings_flags(t, TRAIN_FLAGS, tiny)
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crops and flips (default: off; on in the fashion15 and cifar10 presets)")
    t.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None, help="the evaluation after "
                   "the last epoch (and minivit eval) averages the class probabilities of each image and of its "
                   "mirror image; earlier epochs' evaluations see each image once (default: off; on in the "
                   "fashion15 preset)")
    t.add_argument("--amp", action="store_true", default=None, help="mixed precision: matrix products in float16 "
                   "with loss scaling (fast on a GPU; on a CPU NumPy's float16 products are far slower)")
    _add_run_flags(t, out="runs/<preset>-<time>", resume="a checkpoint (or a run folder)")

    e = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint or an exported .safetensors file: "
                       "accuracy, per class, confusion matrix, mistakes")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--data-dir", type=str, default=None, help="folder with the dataset files (it must exist)")
    e.add_argument("--no-verify", dest="verify", action="store_false", help="use data files that differ from "
                   "the published ones")
    e.add_argument("--out", type=Path, default=None, help="folder for the pictures (default: beside the checkpoint)")
    e.add_argument("--device", type=str, default="cpu", help="'cpu' or 'cuda' (default: cpu)")

    _add_vae_parser(sub, common)
    _add_stylize_parser(sub, common)
    pa = sub.add_parser("painters", parents=[common], help="tell the painters of the embedded paintings apart from "
                        "crops; held-out accuracy and attention figures")
    pa.add_argument("--out", type=Path, required=True, help="folder for report.json and the figures")
    pa.add_argument("--epochs", type=int, default=15, help="passes over the training crops (default: 15)")
    pa.add_argument("--seed", type=int, default=0, help="seeds the crops, the weights and the order")

    x = sub.add_parser("export", parents=[common], help="write a checkpoint's weights as a timm-named state dict "
                       "(.safetensors, with the model's config, or .npz)")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("output", type=Path)
    x.add_argument("--force", action="store_true", help="write over an existing file (never the checkpoint read)")
    _add_gan_parsers(sub, common)
    return parser


def _add_vae_parser(sub, common):
    tiny = vae_train.settings_for("tiny")
    v = sub.add_parser("vae", parents=[common], help="train a ViT variational autoencoder",
                       description="Train a VAE with a ViT encoder and a ViT decoder; report the test -ELBO and IWAE "
                       "bound, and draw reconstructions, samples and interpolations. Presets: " + "; ".join(
                           f"{name} ({p['dataset']}, {p['epochs']} epochs)" for name, p in vae_train.PRESETS.items())
                       + ". The defaults shown are the tiny preset's.")
    v.add_argument("--preset", default="tiny", choices=list(vae_train.PRESETS),
                   help="starting settings (default: tiny, the embedded Fashion-MNIST subset)")
    for name, (field, kind, text) in VAE_FLAGS.items():
        default = getattr(tiny, field)
        v.add_argument(name, type=kind, default=None, help=text if default is None else f"{text} (default: {default})")
    v.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="use data files that differ from the published ones (your own data)")
    v.add_argument("--out", type=Path, default=None, help="output folder (default: runs/vae-<preset>-<time>)")
    v.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint (or a run folder) with its "
                   "own settings; with --epochs N, extend it to N epochs")
    v.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_vae(args):
    overrides = {field: getattr(args, name[2:].replace("-", "_")) for name, (field, _, _) in VAE_FLAGS.items()}
    overrides.update(verify=args.verify)
    if args.resume is not None:
        allowed = ("device", "data_dir", "verify", "epochs")
        extra = sorted(f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None and k not in allowed)
        if extra:
            raise UsageError(f"--resume continues the saved run with its own settings; drop {', '.join(extra)} "
                             "(only --epochs, --device, --data-dir and --no-verify may change)")
        ckpt = _checkpoint_path(args.resume)
        settings = vae_train.VAESettings(**{k: overrides[k] for k in allowed if overrides[k] is not None})
        return vae_train.train_vae(settings, args.out or ckpt.parent, resume=ckpt, epochs=overrides["epochs"],
                                   overwrite=args.overwrite, progress=not args.no_progress)
    settings = vae_train.settings_for(args.preset, **overrides)
    out = args.out or Path("runs") / f"vae-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return vae_train.train_vae(settings, out, overwrite=args.overwrite, progress=not args.no_progress)


def _add_stylize_parser(sub, common):
    d = art.StyleSettings()
    names = ", ".join(Path(p["file"]).stem for p in art.paintings())
    st = sub.add_parser("stylize", parents=[common], help="paint an image in the style of another with ViT features",
                        description="Optimise the pixels of CONTENT so that a ViT's token Gram matrices match STYLE's "
                        f"and its tokens match CONTENT's. CONTENT and STYLE are image files or embedded paintings: "
                        f"{names}.")
    st.add_argument("content", help="image file, or an embedded painting's name")
    st.add_argument("style", help="image file, or an embedded painting's name")
    st.add_argument("--out", type=Path, required=True, help="the result (.png or .jpg); a side-by-side figure is "
                    "written beside it as <name>-side-by-side.png")
    st.add_argument("--size", type=int, default=d.size, help=f"picture side in pixels (default: {d.size}; with "
                    "--model, the model's image size)")
    st.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps (default: {d.steps})")
    st.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate on the pixels (default: {d.lr})")
    st.add_argument("--style-weight", type=float, default=d.style_weight, help=f"(default: {d.style_weight})")
    st.add_argument("--content-weight", type=float, default=d.content_weight, help=f"(default: {d.content_weight})")
    st.add_argument("--tv-weight", type=float, default=d.tv_weight, help=f"total variation (default: {d.tv_weight})")
    st.add_argument("--structure-weight", type=float, default=d.structure_weight, help="the self-similarity of "
                    f"the attention keys, which keeps the content's structure (Splice; default: {d.structure_weight})")
    st.add_argument("--structure-block", type=int, default=d.structure_block,
                    help=f"the block whose keys carry the structure (default: {d.structure_block})")
    st.add_argument("--style-blocks", type=_block_list, default=d.style_blocks,
                    help="blocks whose Gram matrices carry the style, e.g. 0,1,2,3 (default: all four of the random "
                    "ViT)")
    st.add_argument("--content-blocks", type=_block_list, default=d.content_blocks,
                    help=f"blocks whose tokens carry the content (default: {','.join(map(str, d.content_blocks))})")
    st.add_argument("--init", choices=("content", "noise"), default=d.init, help="start from the content image "
                    "or from noise")
    st.add_argument("--model", type=Path, default=None, help="a checkpoint of minivit train (or an export) as the "
                    "feature extractor (default: a ViT with random weights)")
    st.add_argument("--seed", type=int, default=d.seed, help="seeds the random ViT and the noise")
    st.add_argument("--force", action="store_true", help="write over existing output files")


def _block_list(text):
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers separated by commas, got {text!r}") from None
    return blocks


def run_stylize(args):
    if args.size < 8:
        raise UsageError(f"--size {args.size} is too small: at least 8 pixels")
    if args.steps < 1 or not args.lr > 0:
        raise UsageError(f"--steps must be at least 1 and --lr positive, got {args.steps} and {args.lr}")
    if min(args.style_weight, args.content_weight, args.tv_weight, args.structure_weight) < 0:
        raise UsageError("--style-weight, --content-weight, --tv-weight and --structure-weight must not be negative")
    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"{args.out}: the result is a .png or .jpg file")
    side = args.out.with_name(args.out.stem + "-side-by-side.png")
    existing = [str(p) for p in (args.out, side) if p.exists()]
    if existing and not args.force:
        raise UsageError(f"{' and '.join(existing)} already exist(s); choose another --out, or pass --force")
    model = checkpoint.model_from_checkpoint(_checkpoint_path(args.model))[0] if args.model else None
    settings = art.StyleSettings(size=args.size, steps=args.steps, lr=args.lr, style_weight=args.style_weight,
                                 content_weight=args.content_weight, tv_weight=args.tv_weight,
                                 structure_weight=args.structure_weight, structure_block=args.structure_block,
                                 style_blocks=args.style_blocks, content_blocks=args.content_blocks, init=args.init,
                                 seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return art.stylize_files(args.content, args.style, args.out, model=model, settings=settings)


def _add_settings_flags(parser, flags, defaults):
    """One option per entry of ``flags`` (flag -> (settings field, type, help)), its default shown from
    ``defaults``; each option's value is None unless given."""
    for name, (field, kind, text) in flags.items():
        default = getattr(defaults, field)
        parser.add_argument(name, type=kind, default=None,
                            help=text if default is None else f"{text} (default: {default})")


def _add_run_flags(parser, out, resume):
    """The options of a command that trains in a run folder: --anomaly, --no-verify, --out, --resume,
    --overwrite and --no-progress."""
    parser.add_argument("--anomaly", action="store_true", help="check every op for NaN/Inf and name the first one")
    parser.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                        help="use data files that differ from the published ones (your own data)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {out})")
    parser.add_argument("--resume", type=Path, default=None, help=f"continue from {resume} with its own settings; "
                        "with --epochs N, extend it to N epochs")
    parser.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _resume_settings(overrides, allowed):
    """The flags a resumed run takes (UsageError naming any other flag given)."""
    extra = sorted(flag(k) for k, v in overrides.items() if v is not None and k not in allowed)
    if extra:
        may = ([flag(k) for k in ("epochs", "minutes", "device", "data_dir", "processes") if k in allowed]
               + ["--no-verify", "--anomaly"])
        raise UsageError(f"--resume continues the saved run with its own settings; drop {', '.join(extra)} "
                         f"(only {', '.join(may[:-1])} and {may[-1]} may change)")
    return {k: overrides[k] for k in allowed if overrides[k] is not None}


def _checkpoint_path(path):
    path = Path(path)
    return path / checkpoint.CHECKPOINT_NAME if path.is_dir() else path


def run_train(args, argv):
    overrides = {field: getattr(args, name[2:].replace("-", "_")) for name, (field, _, _) in TRAIN_FLAGS.items()}
    overrides.update(augment=args.augment, flip_tta=args.flip_tta, anomaly=args.anomaly or None, verify=args.verify,
                     amp=args.amp)
    if args.resume is not None:
        settings = TrainSettings(**_resume_settings(overrides, RESUME_FLAGS))
        ckpt = _checkpoint_path(args.resume)
        if overrides["processes"] is None and ckpt.exists() and distributed.world().size == 1:
            # the run goes on in as many processes as it ran in
            settings.processes = checkpoint.load_checkpoint(ckpt).train_settings.get("processes", 1)
        start_processes(settings.processes, argv)
        return train(settings, args.out or ckpt.parent, resume=ckpt, epochs=overrides["epochs"],
                     overwrite=args.overwrite, progress=not args.no_progress)
    settings = settings_for(args.preset, **overrides)
    out = args.out or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    start_processes(settings.processes, argv)
    return train(settings, out, overwrite=args.overwrite, progress=not args.no_progress)


def start_processes(n, argv):
    """``--processes N``: start the other N - 1 ranks of this command (minivit.distributed.start_processes), with
    this machine's cores shared out among the N. Under mpiexec, or in a rank already started, nothing to do."""
    if n > 1 and distributed.world().size == 1 and not distributed.launched_by_mpi():
        distributed.start_processes(n, ["-m", "minivit", *argv])


def run_export(args):
    source, target = _checkpoint_path(args.checkpoint), args.output
    if target.suffix not in (".safetensors", ".npz"):
        raise UsageError(f"{target}: an export is a .safetensors file (with the model's config) or a .npz file")
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise UsageError(f"{target} is the checkpoint being exported; choose another file name")
    if target.exists() and not args.force:
        raise UsageError(f"{target} already exists; choose another file name, or pass --force to replace it")
    model, ckpt = checkpoint.model_from_checkpoint(source)
    path = checkpoint.export_state_dict(model, target, train_settings=ckpt.train_settings)
    print(f"wrote {len(model.state_dict())} tensors with timm's names to {path}")


# ------------------------------------------------------------------------------------------------ minivit gan, sample
# flag -> (GanSettings field, type, help)
GAN_FLAGS = {
    "--dataset": ("dataset", str, f"one of {', '.join(data.DATASETS)}"),
    "--data-dir": ("data_dir", str, "folder with the dataset files (looked up first; it must exist)"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--minutes": ("minutes", float, "budget of training time: the run stops when it is spent, ending the epoch "
                  "in progress (0: none; with --resume, a new budget)"),
    "--batch-size": ("batch_size", int, "real (and as many generated) images per step"),
    "--loss": ("loss", str, f"one of {', '.join(gan_train.LOSS_NAMES)}"),
    "--n-critic": ("n_critic", int, "discriminator steps per generator step"),
    "--lr-g": ("lr_g", float, "Adam learning rate of the generator"),
    "--lr-d": ("lr_d", float, "Adam learning rate of the discriminator"),
    "--beta1": ("beta1", float, "Adam's beta1 for both networks"),
    "--beta2": ("beta2", float, "Adam's beta2 for both networks"),
    "--gp-weight": ("gp_weight", float, "lambda of the gradient penalty (--loss wgan-gp)"),
    "--spectral-norm": ("spectral_norm", str, "on the discriminator's layers: 'none', 'plain' or 'improved'"),
    "--ema": ("ema", float, "decay of the generator's moving average, which draws the samples (0: off)"),
    "--latent-dim": ("latent_dim", int, "size of the noise z"),
    "--patch-size": ("patch_size", int, "patch side in pixels (both networks)"),
    "--patch-kernel": ("patch_kernel", int, "the discriminator's overlapping windows centred on the patches "
                       "(0: the patches themselves)"),
    "--minibatch-std": ("minibatch_std", int, "the discriminator's head also reads the spread of its features "
                        "within groups of this many images, against mode collapse (0: off)"),
    "--embed-dim": ("embed_dim", int, "token width (both networks)"),
    "--depth": ("depth", int, "transformer blocks (both networks)"),
    "--num-heads": ("num_heads", int, "attention heads"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP width as a multiple of the token width"),
    "--grid": ("grid", int, "images in each epoch's sample grid"),
    "--classifier": ("classifier", str, "a minivit train checkpoint: measure Frechet distance, precision, recall, "
                     "classifier score and class shares each epoch"),
    "--eval-samples": ("eval_samples", int, "generated and real images for those measurements"),
    "--seed": ("seed", int, "seeds weights, noise and shuffling (0 to 2**32 - 1)"),
    "--limit": ("limit", int, "use only the first N train and test images (0: all)"),
    "--device": ("device", str, "'cpu' or 'cuda'"),
}


def _add_gan_parsers(sub, common):
    tiny = gan_train.settings_for("tiny")
    g = sub.add_parser("gan", parents=[common], help="train a ViT-GAN", description="Train a ViT generator against "
                       "a ViT discriminator. Presets: " + "; ".join(
                           f"{name} ({p['dataset']}, " + (f"{p['minutes']:g} minutes of training)" if p.get("minutes")
                                                          else f"{p['epochs']} epochs)")
                           for name, p in gan_train.PRESETS.items())
                       + ". The defaults shown are the tiny preset's.")
    g.add_argument("--preset", default="tiny", choices=list(gan_train.PRESETS),
                   help="starting settings (default: tiny, the embedded Fashion-MNIST subset)")
    _add_settings_flags(g, GAN_FLAGS, tiny)
    g.add_argument("--l2-attention", action=argparse.BooleanOptionalAction, default=None,
                   help=f"L2-distance attention with tied queries and keys in the discriminator (default: "
                   f"{'on' if tiny.l2_attention else 'off'})")
    _add_run_flags(g, out="runs/gan-<preset>-<time>", resume="a GAN checkpoint (or its run folder)")

    s = sub.add_parser("sample", parents=[common], help="write a grid of images from a GAN run's generator")
    s.add_argument("run", type=Path, help="a GAN run folder or its checkpoint")
    s.add_argument("--n", type=int, default=64, help="images in the grid (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="seeds the noise (default: 0)")
    s.add_argument("--out", type=Path, default=None, help="the PNG to write (default: beside the checkpoint)")


def run_gan(args):
    overrides = {field: getattr(args, name[2:].replace("-", "_")) for name, (field, _, _) in GAN_FLAGS.items()}
    overrides.update(l2_attention=args.l2_attention, anomaly=args.anomaly or None, verify=args.verify)
    if args.resume is not None:
        settings = gan_train.GanSettings(**_resume_settings(overrides, gan_train.RESUME_FIELDS))
        ckpt = _checkpoint_path(args.resume)
        return gan_train.train_gan(settings, args.out or ckpt.parent, resume=ckpt, epochs=overrides["epochs"],
                                   minutes=overrides["minutes"], overwrite=args.overwrite,
                                   progress=not args.no_progress)
    settings = gan_train.settings_for(args.preset, **overrides)
    out = args.out or Path("runs") / f"gan-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return gan_train.train_gan(settings, out, overwrite=args.overwrite, progress=not args.no_progress)


def run_sample(args):
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.out is not None and args.out.suffix != ".png":
        raise UsageError(f"--out {args.out}: the grid is written as a .png file")
    return gan_train.sample(_checkpoint_path(args.run), n=args.n, seed=args.seed, out=args.out)


def setup_process():
    """What the command sets up before any work, beyond what ``import minivit`` already does (the allocator, and
    threads on every core): under mpiexec, each rank's share of the cores, with NumPy's BLAS on one thread."""
    distributed.set_num_threads()


def main(argv=None):
    args = None
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = _parser().parse_args(argv)
        setup_process()
        # `kill` stops a run as Ctrl-C does, at the next step: the lock is released, the message says what is saved
        # ...except in the ranks that --processes started: rank 0 ends them (Ctrl-C reaches it alone anyway)
        world = distributed.world()
        stop = signal.SIG_IGN if isinstance(world, distributed.LocalGroup) and world.rank else STOP.handler
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if args.command == "train":
            run_train(args, argv)
        elif args.command == "eval":
            evaluate_checkpoint(_checkpoint_path(args.checkpoint), args.out, args.data_dir, args.device,
                                verify=args.verify)
        elif args.command == "export":
            run_export(args)
        elif args.command == "vae":
            run_vae(args)
        elif args.command == "stylize":
            run_stylize(args)
        elif args.command == "painters":
            if args.epochs < 1:
                raise UsageError(f"--epochs {args.epochs}: at least 1")
            painters.train_classifier(args.out, epochs=args.epochs, seed=args.seed)
        elif args.command == "gan":
            run_gan(args)
        elif args.command == "sample":
            run_sample(args)
        distributed.finish_job()  # rank 0 of --processes N waits for the others
    except KeyboardInterrupt as err:
        print(f"\nminivit: interrupted; {err or 'the command did not finish'}", file=sys.stderr)
        distributed.end_job_on_error(130)  # ranks may stop at different steps: end them all
        return 130
    except Exception as err:
        if args is not None and args.debug:
            raise
        code, text = _describe(err)
        one_line = " ".join(line.strip() for line in text.splitlines())
        print(f"minivit: error: {one_line}", file=sys.stderr)
        distributed.end_job_on_error(code)  # under mpiexec the other ranks would wait for this one forever
        return code
    return 0


def _describe(err):
    """(exit code, one-line message) for an error that ends a command."""
    if isinstance(err, (UsageError, SettingsError)):
        return 2, str(err)
    if isinstance(err, (data.DataError, checkpoint.CheckpointError, TrainingDiverged, FloatingPointError,
                        RunLocked, art.ArtError, distributed.PartnerLost)):
        return 1, str(err)
    if isinstance(err, OSError) and err.filename is not None:
        return 1, f"{err.filename}: {err.strerror}"
    return 1, f"{type(err).__name__}: {err} (run again with --debug to see where it happened)"


if __name__ == "__main__":
    sys.exit(main())
