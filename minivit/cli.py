"""The command line: ``minivit train``, ``minivit eval`` and ``minivit export`` (also ``python -m minivit``).

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

from minivit import backend, checkpoint, data, distributed
from minivit.rundir import RunLocked
from minivit.train import (PRESETS, STOP, SettingsError, TrainingDiverged, TrainSettings, evaluate_checkpoint,
                           flag, settings_for, train)

# flag -> (TrainSettings field, type, help)
TRAIN_FLAGS = {
    "--dataset": ("dataset", str, f"one of {', '.join(data.DATASETS)}"),
    "--data-dir": ("data_dir", str, "folder with the dataset files (looked up first; it must exist)"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--batch-size": ("batch_size", int, "images per step"),
    "--lr": ("lr", float, "peak learning rate of AdamW"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine decay (at most --lr)"),
    "--weight-decay": ("weight_decay", float, "AdamW decoupled weight decay (not on norms, biases, tokens)"),
    "--warmup-epochs": ("warmup_epochs", float, "epochs of linear warmup (a preset scales its own with --epochs)"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing of the cross-entropy, in [0, 1)"),
    "--clip-grad": ("clip_grad", float, "clip the global gradient norm to this (0: off)"),
    "--patch-size": ("patch_size", int, "patch side in pixels"),
    "--embed-dim": ("embed_dim", int, "token width"),
    "--depth": ("depth", int, "number of transformer blocks"),
    "--num-heads": ("num_heads", int, "attention heads"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP width as a multiple of the token width"),
    "--pool": ("global_pool", str, "'token' (class token) or 'avg' (mean of patch tokens)"),
    "--pos-embed": ("pos_embed", str, "'learn' or 'sincos'"),
    "--drop-rate": ("drop_rate", float, "dropout before the head, in [0, 1)"),
    "--seed": ("seed", int, "seeds weights, shuffling and dropout (0 to 2**32 - 1)"),
    "--limit": ("limit", int, "use only the first N train and test images (0: all)"),
    "--device": ("device", str, "'cpu' or 'cuda'"),
}
# What --resume accepts besides the checkpoint's own settings.
RESUME_FLAGS = ("device", "data_dir", "anomaly", "verify", "epochs")


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
        f"{name} ({p['dataset']}, {p['epochs']} epochs)" for name, p in PRESETS.items())
        + ". The defaults shown are the tiny preset's; another preset sets its own.")
    t.add_argument("--preset", default="tiny", choices=list(PRESETS), help="starting settings (default: tiny, "
                   "the embedded Fashion-MNIST subset)")
    for name, (field, kind, text) in TRAIN_FLAGS.items():
        default = getattr(tiny, field)
        t.add_argument(name, type=kind, default=None,
                       help=text if default is None else f"{text} (default: {default})")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crops and flips (default: off; on in the cifar10 preset)")
    t.add_argument("--amp", action="store_true", default=None, help="mixed precision: matrix products in float16 "
                   "with loss scaling (fast on a GPU; on a CPU NumPy's float16 products are far slower)")
    t.add_argument("--anomaly", action="store_true", help="check every op for NaN/Inf and name the first one")
    t.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="use data files that differ from the published ones (your own data)")
    t.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<preset>-<time>)")
    t.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint (or a run folder) with its "
                   "own settings; with --epochs N, extend it to N epochs")
    t.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint or an exported .safetensors file: "
                       "accuracy, per class, confusion matrix, mistakes")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--data-dir", type=str, default=None, help="folder with the dataset files (it must exist)")
    e.add_argument("--no-verify", dest="verify", action="store_false", help="use data files that differ from "
                   "the published ones")
    e.add_argument("--out", type=Path, default=None, help="folder for the pictures (default: beside the checkpoint)")
    e.add_argument("--device", type=str, default="cpu", help="'cpu' or 'cuda' (default: cpu)")

    x = sub.add_parser("export", parents=[common], help="write a checkpoint's weights as a timm-named state dict "
                       "(.safetensors, with the model's config, or .npz)")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("output", type=Path)
    x.add_argument("--force", action="store_true", help="write over an existing file (never the checkpoint read)")
    return parser


def _checkpoint_path(path):
    path = Path(path)
    return path / checkpoint.CHECKPOINT_NAME if path.is_dir() else path


def run_train(args):
    overrides = {field: getattr(args, name[2:].replace("-", "_")) for name, (field, _, _) in TRAIN_FLAGS.items()}
    overrides.update(augment=args.augment, anomaly=args.anomaly or None, verify=args.verify, amp=args.amp)
    if args.resume is not None:
        extra = sorted(flag(k) for k, v in overrides.items() if v is not None and k not in RESUME_FLAGS)
        if extra:
            raise UsageError(f"--resume continues the saved run with its own settings; drop {', '.join(extra)} "
                             "(only --epochs, --device, --data-dir, --no-verify and --anomaly may change)")
        ckpt = _checkpoint_path(args.resume)
        settings = TrainSettings(**{k: overrides[k] for k in RESUME_FLAGS if overrides[k] is not None})
        return train(settings, args.out or ckpt.parent, resume=ckpt, epochs=overrides["epochs"],
                     overwrite=args.overwrite, progress=not args.no_progress)
    settings = settings_for(args.preset, **overrides)
    out = args.out or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train(settings, out, overwrite=args.overwrite, progress=not args.no_progress)


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


def main(argv=None):
    args = None
    try:
        args = _parser().parse_args(argv)
        backend.tune_malloc()
        distributed.set_num_threads()  # every core (shared out among the ranks under mpiexec)
        # `kill` stops a run as Ctrl-C does, at the next step: the lock is released, the message says what is saved
        signal.signal(signal.SIGTERM, STOP.handler)
        signal.signal(signal.SIGINT, STOP.handler)
        if args.command == "train":
            run_train(args)
        elif args.command == "eval":
            evaluate_checkpoint(_checkpoint_path(args.checkpoint), args.out, args.data_dir, args.device,
                                verify=args.verify)
        elif args.command == "export":
            run_export(args)
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
                        RunLocked)):
        return 1, str(err)
    if isinstance(err, OSError) and err.filename is not None:
        return 1, f"{err.filename}: {err.strerror}"
    return 1, f"{type(err).__name__}: {err} (run again with --debug to see where it happened)"


if __name__ == "__main__":
    sys.exit(main())
