"""The command line: ``minivit train``, ``minivit eval`` and ``minivit export`` (also ``python -m minivit``)."""

import argparse
import sys
import time
from pathlib import Path

from minivit import backend, checkpoint, data
from minivit.train import PRESETS, TrainingDiverged, TrainSettings, evaluate_checkpoint, settings_for, train

# flag -> (TrainSettings field, type, help)
TRAIN_FLAGS = {
    "--dataset": ("dataset", str, f"one of {', '.join(data.DATASETS)}"),
    "--data-dir": ("data_dir", str, "folder with the dataset files (looked up first)"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--batch-size": ("batch_size", int, "images per step"),
    "--lr": ("lr", float, "peak learning rate of AdamW"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine decay"),
    "--weight-decay": ("weight_decay", float, "AdamW decoupled weight decay (not on norms, biases, tokens)"),
    "--warmup-epochs": ("warmup_epochs", float, "epochs of linear warmup"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing of the cross-entropy"),
    "--clip-grad": ("clip_grad", float, "clip the global gradient norm to this (0: off)"),
    "--patch-size": ("patch_size", int, "patch side in pixels"),
    "--embed-dim": ("embed_dim", int, "token width"),
    "--depth": ("depth", int, "number of transformer blocks"),
    "--num-heads": ("num_heads", int, "attention heads"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP width as a multiple of the token width"),
    "--pool": ("global_pool", str, "'token' (class token) or 'avg' (mean of patch tokens)"),
    "--pos-embed": ("pos_embed", str, "'learn' or 'sincos'"),
    "--drop-rate": ("drop_rate", float, "dropout before the head"),
    "--seed": ("seed", int, "seeds weights, shuffling and dropout"),
    "--limit": ("limit", int, "use only the first N train and test images (quick trials)"),
    "--device": ("device", str, "'cpu' or 'cuda'"),
}


def _parser():
    parser = argparse.ArgumentParser(prog="minivit", description="Train and evaluate Vision Transformers "
                                     "written in NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a ViT", description="Train a ViT. Presets: " + "; ".join(
        f"{name} ({p['dataset']}, {p['epochs']} epochs)" for name, p in PRESETS.items()))
    t.add_argument("--preset", default="tiny", choices=list(PRESETS), help="starting settings (default: tiny, "
                   "the embedded Fashion-MNIST subset)")
    for flag, (_, kind, text) in TRAIN_FLAGS.items():
        t.add_argument(flag, type=kind, default=None, help=text)
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crops and flips (CIFAR-10)")
    t.add_argument("--anomaly", action="store_true", help="check every op for NaN/Inf and name the first one")
    t.add_argument("--out", type=Path, default=None, help="output folder (default runs/<preset>-<time>)")
    t.add_argument("--resume", type=Path, default=None,
                   help="continue from a checkpoint (or a run folder) with its own settings")
    t.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a checkpoint: accuracy, per class, confusion matrix, mistakes")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--data-dir", type=str, default=None)
    e.add_argument("--out", type=Path, default=None, help="folder for the pictures (default: beside the checkpoint)")
    e.add_argument("--device", type=str, default="cpu")

    x = sub.add_parser("export", help="write a checkpoint's weights as a timm-named state dict "
                       "(.safetensors or .npz)")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("output", type=Path)
    return parser


def _checkpoint_path(path):
    path = Path(path)
    return path / "checkpoint.safetensors" if path.is_dir() else path


def run_train(args, parser):
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in TRAIN_FLAGS.items()}
    overrides["augment"] = args.augment
    overrides["anomaly"] = args.anomaly or None
    if args.resume is not None:
        allowed = {"device", "data_dir", "anomaly"}
        extra = sorted(k for k, v in overrides.items() if v is not None and k not in allowed)
        if extra:
            parser.error(f"--resume continues the saved run with its own settings; drop {', '.join(extra)}")
        ckpt = _checkpoint_path(args.resume)
        out = args.out or ckpt.parent
        settings = TrainSettings(device=overrides["device"] or "cpu", data_dir=overrides["data_dir"])
        return train(settings, out, resume=ckpt, progress=not args.no_progress)
    try:
        settings = settings_for(args.preset, **overrides)
    except ValueError as err:
        parser.error(str(err))
    out = args.out or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "checkpoint.safetensors").exists() and not args.overwrite:
        parser.error(f"{out} already holds a run; continue it with --resume {out}, or pass --overwrite")
    return train(settings, out, progress=not args.no_progress)


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    backend.tune_malloc()
    backend.set_num_threads()  # every core
    try:
        if args.command == "train":
            run_train(args, parser)
        elif args.command == "eval":
            evaluate_checkpoint(_checkpoint_path(args.checkpoint), args.out, args.data_dir, args.device)
        elif args.command == "export":
            model, _ = checkpoint.model_from_checkpoint(_checkpoint_path(args.checkpoint))
            path = checkpoint.export_state_dict(model, args.output)
            print(f"wrote {len(model.state_dict())} tensors with timm's names to {path}")
    except (data.DataError, checkpoint.CheckpointError, TrainingDiverged, FloatingPointError) as err:
        print(f"minivit: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nminivit: interrupted; the last finished epoch is saved: continue with --resume <out folder>",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
