"""Training and evaluation: the loop behind ``minivit train`` and ``minivit eval``.

One epoch: shuffled batches -> forward -> cross-entropy -> backward -> clip -> AdamW step -> schedule step; then
an evaluation on the test split, a line in metrics.jsonl, the curves in curves.png and a checkpoint, each
written atomically. A run resumed from its checkpoint ends with exactly the weights of an uninterrupted run.
"""

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minivit import backend, checkpoint, data, optim, viz
from minivit import functional as F
from minivit.function import detect_anomaly
from minivit.nn import Dropout, VisionTransformer
from minivit.tensor import no_grad


@dataclass
class TrainSettings:
    """Everything that defines a training run (saved in each checkpoint)."""
    preset: str = "tiny"
    dataset: str = "fashion-mnist-mini"
    data_dir: str = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    clip_grad: float = 1.0
    augment: bool = False
    patch_size: int = 7
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    global_pool: str = "token"
    pos_embed: str = "learn"
    drop_rate: float = 0.0
    seed: int = 0
    limit: int = 0            # use only the first `limit` train and test images (0: all)
    device: str = "cpu"
    anomaly: bool = False


PRESETS = {
    # The embedded Fashion-MNIST subset: trains offline in about a minute on two cores.
    "tiny": dict(dataset="fashion-mnist-mini", epochs=10, batch_size=64, lr=2e-3, warmup_epochs=1.0,
                 patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    # Full Fashion-MNIST (and MNIST): 28x28 grey images.
    "fashion": dict(dataset="fashion-mnist", epochs=10, batch_size=128, lr=2e-3, warmup_epochs=1.0,
                    label_smoothing=0.1, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0),
    "mnist": dict(dataset="mnist", epochs=10, batch_size=128, lr=2e-3, warmup_epochs=1.0, label_smoothing=0.1,
                  patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0),
    # CIFAR-10: 32x32 colour images, random crops and flips.
    "cifar10": dict(dataset="cifar10", epochs=50, batch_size=128, lr=1e-3, warmup_epochs=5.0, label_smoothing=0.1,
                    augment=True, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def settings_for(preset, **overrides):
    """The settings of a preset with some fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    return validate(TrainSettings(**values))


def validate(s):
    """Check settings before any work starts; errors name the flag and what it needs."""
    info = data.dataset_info(s.dataset)
    H = info.shape[1]
    problems = []
    for name in ("epochs", "batch_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.lr <= 0:
        problems.append(f"--lr must be positive, got {s.lr}")
    if s.weight_decay < 0:
        problems.append(f"--weight-decay must be >= 0, got {s.weight_decay}")
    if s.warmup_epochs < 0 or s.warmup_epochs > s.epochs:
        problems.append(f"--warmup-epochs must be between 0 and --epochs ({s.epochs}), got {s.warmup_epochs}")
    if not 0 <= s.label_smoothing < 1:
        problems.append(f"--label-smoothing must be in [0, 1), got {s.label_smoothing}")
    if s.patch_size >= 1 and H % s.patch_size:
        problems.append(f"--patch-size {s.patch_size} does not divide the {H}x{H} images of {s.dataset}")
    if s.num_heads >= 1 and s.embed_dim % s.num_heads:
        problems.append(f"--embed-dim {s.embed_dim} is not divisible by --num-heads {s.num_heads}")
    if s.global_pool not in ("token", "avg"):
        problems.append(f"--pool must be 'token' or 'avg', got {s.global_pool!r}")
    if s.pos_embed not in ("learn", "sincos"):
        problems.append(f"--pos-embed must be 'learn' or 'sincos', got {s.pos_embed!r}")
    if s.limit < 0:
        problems.append(f"--limit must be >= 0, got {s.limit}")
    backend.normalize_device(s.device)
    if problems:
        raise ValueError("; ".join(problems))
    return s


def build_model(s, info):
    C, H, _ = info.shape
    return VisionTransformer(img_size=H, patch_size=s.patch_size, in_chans=C, num_classes=len(info.classes),
                             global_pool=s.global_pool, class_token=s.global_pool == "token", embed_dim=s.embed_dim,
                             depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, pos_embed=s.pos_embed,
                             drop_rate=s.drop_rate, seed=s.seed)


def load_data(s, progress=True):
    ds = data.load_dataset(s.dataset, s.data_dir, progress=progress)
    if s.limit:
        ds.train_images, ds.train_labels = ds.train_images[:s.limit], ds.train_labels[:s.limit]
        ds.test_images, ds.test_labels = ds.test_images[:s.limit], ds.test_labels[:s.limit]
    return ds


def _rng_state(model):
    states = {name: m._generators["numpy"].bit_generator.state for name, m in model.named_modules()
              if isinstance(m, Dropout) and "numpy" in m._generators}
    states["__default__"] = backend.default_generator(np).bit_generator.state
    return states


def _restore_rng_state(model, states):
    for name, m in model.named_modules():
        if isinstance(m, Dropout) and name in states:
            m.generator(np).bit_generator.state = states[name]
    if "__default__" in states:
        backend.default_generator(np).bit_generator.state = states["__default__"]


def evaluate(model, images, labels, mean, std, batch_size=256, device="cpu"):
    """Loss, accuracy, predictions and the probability of each prediction on a labelled set."""
    loader = data.DataLoader(images, labels, batch_size, mean, std)
    model.eval()
    total_loss, predictions, confidences = 0.0, [], []
    with no_grad():
        for x, y in loader:
            logits = model(backend.to_device(x, device))
            total_loss += F.cross_entropy(logits, backend.to_device(y, device), reduction="sum").item()
            probs = backend.asnumpy(F.softmax(logits, axis=1).data)
            predictions.append(probs.argmax(1))
            confidences.append(probs.max(1))
    model.train()
    predictions = np.concatenate(predictions)
    return {"loss": total_loss / len(labels), "acc": float((predictions == labels).mean()),
            "predictions": predictions, "confidences": np.concatenate(confidences)}


def _write_json_lines(path, rows):
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def train(s, out_dir, resume=None, progress=True, log=print):
    """Train a ViT as ``s`` says, writing metrics, curves and checkpoints into ``out_dir``.

    Args:
        s: TrainSettings (ignored when resuming: the checkpoint's own settings are used).
        out_dir: folder for checkpoint.safetensors, metrics.jsonl and curves.png.
        resume: a checkpoint to continue from.

    Returns:
        dict with the history (one dict per epoch), the final test accuracy and the output paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if resume is not None:
        ckpt = checkpoint.load_checkpoint(resume)
        saved = ckpt.train_settings
        s = validate(TrainSettings(**{**saved, "device": s.device, "data_dir": s.data_dir or saved.get("data_dir")}))
    ds = load_data(s, progress)
    info = ds.info
    train_loader = data.DataLoader(ds.train_images, ds.train_labels, s.batch_size, info.mean, info.std,
                                   shuffle=True, seed=s.seed, augment=s.augment, pad=info.shape[1] // 8)
    steps_per_epoch = len(train_loader)

    model = build_model(s, info).to(device=s.device)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, s.weight_decay), lr=s.lr)
    sched = optim.WarmupCosine(opt, round(s.warmup_epochs * steps_per_epoch), s.epochs * steps_per_epoch, s.min_lr)
    history, start_epoch = [], 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        opt.load_state_dict(ckpt.optimizer_state)
        sched.load_state_dict(ckpt.schedule_state)
        _restore_rng_state(model, ckpt.rng_state)
        history, start_epoch = list(ckpt.history), ckpt.epoch
        log(f"resuming {resume} after epoch {start_epoch} of {s.epochs}")
    else:
        backend.manual_seed(s.seed)
    log(f"{s.preset}: {s.dataset} from {ds.folder} ({len(ds.train_labels)} train / {len(ds.test_labels)} test images), "
        f"ViT patch {s.patch_size} width {s.embed_dim} depth {s.depth} heads {s.num_heads} "
        f"({model.num_parameters():,} parameters), {s.epochs} epochs of {steps_per_epoch} steps on {s.device}")

    paths = {"checkpoint": out_dir / "checkpoint.safetensors", "metrics": out_dir / "metrics.jsonl",
             "curves": out_dir / "curves.png"}
    anomaly = detect_anomaly() if s.anomaly else contextlib.nullcontext()
    from tqdm import tqdm
    with anomaly:
        for epoch in range(start_epoch, s.epochs):
            t0 = time.perf_counter()
            seen = correct = 0
            loss_sum = 0.0
            bar = tqdm(train_loader.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{s.epochs}",
                       disable=not progress, leave=False, unit="batch")
            for i, (x, y) in enumerate(bar):
                x, y_dev = backend.to_device(x, s.device), backend.to_device(y, s.device)
                logits = model(x)
                loss = F.cross_entropy(logits, y_dev, label_smoothing=s.label_smoothing)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"the loss became {value} at step {epoch * steps_per_epoch + i + 1} (epoch {epoch + 1}, "
                        f"batch {i + 1}); lower --lr, or add --anomaly to name the first op that went non-finite")
                opt.zero_grad()
                loss.backward()
                if s.clip_grad:
                    optim.clip_grad_norm_(model.parameters(), s.clip_grad)
                opt.step()
                sched.step()
                seen += len(y)
                loss_sum += value * len(y)
                correct += int((backend.asnumpy(logits.data.argmax(1)) == y).sum())
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.close()
            train_time = time.perf_counter() - t0
            result = evaluate(model, ds.test_images, ds.test_labels, info.mean, info.std, device=s.device)
            history.append({"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                            "train_loss": loss_sum / seen, "train_acc": correct / seen,
                            "test_loss": result["loss"], "test_acc": result["acc"],
                            "lr": opt.param_groups[0]["lr"], "epoch_time_s": train_time,
                            "images_per_s": seen / train_time})
            h = history[-1]
            log(f"epoch {epoch + 1:3d}/{s.epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}  "
                f"test loss {h['test_loss']:.4f} acc {h['test_acc']:.2%}  {train_time:.1f}s "
                f"({h['images_per_s']:.0f} img/s)")
            _write_json_lines(paths["metrics"], history)
            checkpoint.atomic_write(paths["curves"], lambda tmp: viz.plot_history(history).savefig(tmp, format="png"))
            checkpoint.save_checkpoint(paths["checkpoint"], model, opt, sched, rng_state=_rng_state(model),
                                       train_settings=dataclasses.asdict(s), epoch=epoch + 1, history=history)
    final = history[-1]
    total = sum(h["epoch_time_s"] for h in history)
    log(f"test accuracy {final['test_acc']:.2%} after {final['epoch']} epochs ({total:.0f}s of training); "
        f"checkpoint {paths['checkpoint']}, metrics {paths['metrics']}, curves {paths['curves']}")
    return {"history": history, "test_acc": final["test_acc"], "model": model, "paths": paths, "settings": s}


def evaluate_checkpoint(path, out_dir=None, data_dir=None, device="cpu", log=print, progress=True):
    """Accuracy, per-class accuracy, a confusion matrix and the most confident mistakes of a checkpoint."""
    model, ckpt = checkpoint.model_from_checkpoint(path)
    model.to(device=device)
    s = ckpt.train_settings
    settings = TrainSettings(**{**s, "data_dir": data_dir or s.get("data_dir"), "device": device})
    ds = load_data(settings, progress)
    info = ds.info
    result = evaluate(model, ds.test_images, ds.test_labels, info.mean, info.std, device=device)
    counts = viz.confusion_matrix(ds.test_labels, result["predictions"], len(info.classes))
    per_class = counts.diagonal() / np.maximum(counts.sum(1), 1)
    out_dir = Path(out_dir) if out_dir is not None else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"confusion": out_dir / "confusion.png", "mistakes": out_dir / "mistakes.png",
             "report": out_dir / "eval.json"}
    viz.plot_confusion(counts, info.classes, files["confusion"])
    viz.plot_mistakes(ds.test_images, ds.test_labels, result["predictions"], result["confidences"], info.classes,
                      files["mistakes"])
    report = {"checkpoint": str(path), "dataset": info.name, "images": int(len(ds.test_labels)),
              "accuracy": result["acc"], "loss": result["loss"],
              "per_class_accuracy": {c: float(a) for c, a in zip(info.classes, per_class)},
              "confusion_matrix": counts.tolist()}
    checkpoint.atomic_write(files["report"], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    width = max(len(c) for c in info.classes)
    log(f"{info.name} test set: accuracy {result['acc']:.2%} ({int(counts.diagonal().sum())}/{len(ds.test_labels)}), "
        f"loss {result['loss']:.4f}")
    for c, a, n in zip(info.classes, per_class, counts.sum(1)):
        log(f"  {c:<{width}}  {a:7.2%}  of {n}")
    log(f"confusion matrix {files['confusion']}, mistakes {files['mistakes']}, report {files['report']}")
    return report
