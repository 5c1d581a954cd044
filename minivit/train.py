"""Training and evaluation: the loop behind ``minivit train`` and ``minivit eval``.

One epoch: shuffled batches -> forward -> cross-entropy -> backward -> clip -> AdamW step -> schedule step; then
an evaluation on the test split, a checkpoint, a line in metrics.jsonl and the curves in curves.png, each written
atomically (the checkpoint first, so the metrics never run ahead of it). A run resumed from its checkpoint ends
with exactly the weights of an uninterrupted run.

Settings are checked before anything starts (``validate``: each against its range, then against each other), and
a run owns its folder while it works (``minivit.rundir``).
"""

import contextlib
import copy
import dataclasses
import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minivit import amp, checkpoint, data, devices, distributed, optim, rng, viz
from minivit import functional as F
from minivit.function import detect_anomaly
from minivit.nn import Dropout, VisionTransformer
from minivit.nn.vit import check_patch_kernel
from minivit.rundir import RunFolder
from minivit.tensor import no_grad


@dataclass
class TrainSettings:
    """Everything that defines a training run (saved in each checkpoint)."""
    preset: str = "tiny"
    dataset: str = "fashion-mnist-mini"
    data_dir: str = None
    epochs: int = 10
    minutes: float = 0.0      # a wall-time budget: as many epochs as fit in it (at most `epochs`), measured first
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    clip_grad: float = 1.0
    augment: bool = False
    crop_pad: int = -1        # zero padding before --augment's random crop (-1: an eighth of the side; 0: flips only)
    erase: float = 0.0        # with --augment: probability of random erasing of each image (0: off)
    patch_size: int = 7
    patch_kernel: int = 0     # side of overlapping patch windows centred on each patch (0: the patch itself)
    stem_channels: int = 0    # width of the convolutions (with GELU) before the patch projection (0: none)
    stem_depth: int = 1       # how many such convolutions, with --stem-channels
    stem_stride: int = 1      # 1: 3x3 convolutions keeping the size; 2: 4x4 windows with stride 2, halving it
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    global_pool: str = "token"
    pos_embed: str = "learn"
    drop_rate: float = 0.0
    seed: int = 0
    limit: int = 0            # use only the first `limit` train and test images (0: all)
    val_size: int = 0         # hold out the last `val_size` training images: evaluate on them each epoch, on the
                              # test set once at the end (0: evaluate on the test set each epoch)
    ema: float = 0.0          # decay of a moving average of the weights, which is evaluated and saved (0: off)
    # Test-time augmentation, in the evaluation after the last epoch (a run's result) and in minivit eval; the
    # evaluations after earlier epochs, which only follow the run, see each image once.
    flip_tta: bool = False    # average the class probabilities of each image and of its mirror image
    tta_shift: int = 0        # ... and of the image moved by 1..N pixels up, down, left and right
    processes: int = 1        # `minivit train` on this machine: processes sharing each batch (minivit.distributed)
    device: str = "cpu"
    anomaly: bool = False
    amp: bool = False         # mixed precision: autocast to float16 and a dynamic loss scaler (minivit.amp)
    verify: bool = True       # check data files against the published SHA-256 (False: your own files)


PRESETS = {
    # The embedded Fashion-MNIST subset: trains offline in about a minute on two cores.
    "tiny": dict(dataset="fashion-mnist-mini", epochs=10, batch_size=64, lr=2e-3, warmup_epochs=1.0,
                 patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
    # Full Fashion-MNIST (and MNIST): 28x28 grey images.
    "fashion": dict(dataset="fashion-mnist", epochs=10, batch_size=128, lr=2e-3, warmup_epochs=1.0,
                    label_smoothing=0.1, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0),
    "mnist": dict(dataset="mnist", epochs=10, batch_size=128, lr=2e-3, warmup_epochs=1.0, label_smoothing=0.1,
                  patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0),
    # Full Fashion-MNIST within 15 minutes on two cores: a stem of two stride-2 convolutions of 64 channels
    # (28 -> 14 -> 7) under 3x3 patch windows, random flips, mean pooling, the moving average of the weights, and
    # after the last epoch each test image averaged over ten views: itself and moved by a pixel up, down, left and
    # right, each also mirrored (chosen on the last 5,000 training images; see the README's results); two
    # processes, each with its half of every batch (on two cores they do about 1.5x the images/s of one process).
    # As many epochs as this machine fits in 15 minutes, at most 20: by the sum of ``epochs_within``, 9 or 10 on
    # the 2-core Intel machines where the recipe was chosen; 5 on an AVX2 machine half as fast.
    "fashion15": dict(dataset="fashion-mnist", epochs=20, minutes=15.0, batch_size=128, lr=2e-3, warmup_epochs=1.0,
                      label_smoothing=0.1, augment=True, crop_pad=0, patch_size=4, stem_channels=64, stem_depth=2,
                      stem_stride=2, patch_kernel=3, global_pool="avg", ema=0.999, flip_tta=True, tta_shift=1,
                      embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, processes=2),
    # CIFAR-10: 32x32 colour images, random crops and flips.
    "cifar10": dict(dataset="cifar10", epochs=50, batch_size=128, lr=1e-3, warmup_epochs=5.0, label_smoothing=0.1,
                    augment=True, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


class StopRequest:
    """A stop asked for by a signal (Ctrl-C, ``kill``), honoured at the next step boundary.

    Python raises KeyboardInterrupt wherever the signal lands: inside an import (which then fails as an
    ImportError), a file write or a wait on the worker threads. While a training loop watches (``watching``), the
    command's handler only notes the request and the loop raises KeyboardInterrupt itself, between steps. A second
    signal, or one that comes while nothing watches, raises at once.
    """

    def __init__(self):
        self.watching = False
        self.asked = False

    def handler(self, signum, frame):
        if self.watching and not self.asked:
            self.asked = True
            return
        raise KeyboardInterrupt

    def check(self):
        """Raise KeyboardInterrupt if a stop was asked for."""
        if self.asked:
            self.asked = False
            raise KeyboardInterrupt


STOP = StopRequest()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what its folder holds."""


class SettingsError(ValueError):
    """Settings that cannot make a sound run; the message names each flag, its value and what it needs."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting: ``low`` to ``high``, each end included or not."""
    low: float
    high: float = math.inf
    low_included: bool = True
    high_included: bool = False

    def __contains__(self, value):  # written so that NaN is in no range
        above = value >= self.low if self.low_included else value > self.low
        below = value <= self.high if self.high_included else value < self.high
        return above and below

    def __str__(self):
        if self.high == math.inf:
            return f"{'>=' if self.low_included else '>'} {self.low}"
        return f"{'[' if self.low_included else '('}{self.low}, {self.high}{']' if self.high_included else ')'}"


# field -> the values it may take; a float range without an upper end still excludes Inf.
RANGES = {
    "epochs": Range(1), "batch_size": Range(1), "patch_size": Range(1), "embed_dim": Range(1), "depth": Range(1),
    "num_heads": Range(1), "limit": Range(0), "seed": Range(0, 2**32 - 1, high_included=True),
    "lr": Range(0, low_included=False), "min_lr": Range(0), "weight_decay": Range(0), "warmup_epochs": Range(0),
    "label_smoothing": Range(0, 1), "clip_grad": Range(0), "mlp_ratio": Range(0, low_included=False),
    "drop_rate": Range(0, 1), "val_size": Range(0), "ema": Range(0, 1), "patch_kernel": Range(0),
    "crop_pad": Range(-1), "erase": Range(0, 1, high_included=True), "stem_channels": Range(0),
    "stem_depth": Range(1), "stem_stride": Range(1, 2, high_included=True), "processes": Range(1),
    "tta_shift": Range(0), "minutes": Range(0),
}
CHOICES = {"global_pool": ("token", "avg"), "pos_embed": ("learn", "sincos")}


def flag(field):
    """The command-line flag of a TrainSettings field: ``min_lr`` -> ``--min-lr``."""
    return "--" + {"global_pool": "pool"}.get(field, field).replace("_", "-")


MIN_STEPS_PER_EPOCH = 250


def settings_for(preset, **overrides):
    """The settings of a preset with some fields replaced (None values are ignored).

    A preset's warmup is a share of its run: when only ``epochs`` is changed, ``warmup_epochs`` is scaled with it
    (the cifar10 preset warms up for 5 of 50 epochs, so ``epochs=1`` warms up for 0.1 epoch). Not so under a time
    budget (``minutes``), where ``epochs`` is only the most the run may take.

    A preset's batch size and warmup are made for its whole training set. When ``limit`` keeps fewer images than
    ``MIN_STEPS_PER_EPOCH`` batches of that size, and the batch size is not given, the batch shrinks (to no less
    than 32, a multiple of 8) so that an epoch, and so the warmup, keeps about that many steps, and the peak
    learning rate (unless given) shrinks with the square root of the batch. Measured on 8,000 Fashion-MNIST
    images, 10 epochs: batch 128 reaches 43%, 62%, 72% test accuracy after epochs 1-3 (63 steps an epoch);
    batch 32 at half the learning rate 60%, 70%, 75%.
    """
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = set(overrides) - fields
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**PRESETS[preset], **given, "preset": preset}
    base = {**dataclasses.asdict(TrainSettings()), **PRESETS[preset]}
    if "epochs" in given and "warmup_epochs" not in given and not values.get("minutes"):
        values["warmup_epochs"] = base["warmup_epochs"] * given["epochs"] / base["epochs"]
    full = data.dataset_info(values["dataset"]).train_size if values.get("dataset") in data.DATASETS else 0
    images = values.get("limit") or 0
    if 0 < images < full and "batch_size" not in given and images < MIN_STEPS_PER_EPOCH * values["batch_size"]:
        batch = max(32, images // MIN_STEPS_PER_EPOCH // 8 * 8)
        if batch < values["batch_size"]:
            if "lr" not in given:
                values["lr"] = values["lr"] * math.sqrt(batch / values["batch_size"])
            values["batch_size"] = batch
    return validate(TrainSettings(**values))


def validate(s):
    """Check settings before any work starts; raise SettingsError naming every flag that is wrong and why."""
    return check_settings(s, RANGES, CHOICES, lambda s: relations(s) + patch_kernel_problems(s))


def check_settings(s, ranges, choices, relations):
    """Check a settings dataclass: each field against its range or choices, then (if those hold) the fields
    against each other with ``relations(s)`` (a list of problems), then the device. Raise SettingsError naming
    every flag that is wrong and why; return ``s`` when all is well."""
    problems = []
    kinds = {f.name: numbers.Integral if f.type is int else numbers.Real for f in dataclasses.fields(s)}
    for name, allowed in ranges.items():
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, kinds[name]):
            kind = "a whole number" if kinds[name] is numbers.Integral else "a number"
            problems.append(f"{flag(name)} must be {kind}, got {value!r}")
        elif value not in allowed:
            problems.append(f"{flag(name)} {value} is out of range: expected {allowed}")
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            problems.append(f"{flag(name)} must be one of {', '.join(map(repr, allowed))}, got {getattr(s, name)!r}")
    if not problems:
        problems += relations(s)
    try:
        if devices.normalize_device(s.device) == "cuda" and not devices.cuda_available():
            problems.append("--device cuda needs CuPy and a CUDA device, and none is usable here "
                            "(pip install 'minivit[gpu]' on a machine with an NVIDIA GPU)")
    except ValueError as e:
        problems.append(f"--device: {e}")
    if problems:
        raise SettingsError("; ".join(problems))
    return s


def relations(s):
    """What one flag needs of another (and of the data set): the learning rates, the warmup, the patch size and the
    heads (the settings of ``minivit vae`` share these)."""
    try:
        H = data.dataset_info(s.dataset).shape[1]
    except ValueError as e:
        return [f"--dataset: {e}"]
    problems = []
    if s.min_lr > s.lr:
        problems.append(f"--min-lr {s.min_lr} is above --lr {s.lr}: the decay must end at or below the peak")
    if getattr(s, "erase", 0.0) and not s.augment:     # (the settings of minivit vae have neither)
        problems.append(f"--erase {s.erase} needs --augment: random erasing is one of its augmentations")
    if getattr(s, "tta_shift", 0) >= H:
        problems.append(f"--tta-shift {s.tta_shift} would move the {H}x{H} images of {s.dataset} out of sight")
    if s.warmup_epochs > s.epochs:
        problems.append(f"--warmup-epochs {s.warmup_epochs} is longer than the run (--epochs {s.epochs})")
    if H % s.patch_size:
        problems.append(f"--patch-size {s.patch_size} does not divide the {H}x{H} images of {s.dataset}")
    if s.embed_dim % s.num_heads:
        problems.append(f"--embed-dim {s.embed_dim} is not divisible by --num-heads {s.num_heads}")
    return problems


def crop_padding(s, info):
    """The zero padding of the random crops: ``s.crop_pad``, or an eighth of the image side when it is -1."""
    return info.shape[1] // 8 if s.crop_pad < 0 else s.crop_pad


def train_loader(s, ds):
    """The shuffled, augmented training batches of settings ``s`` over data set ``ds`` (a ``load_data`` result)."""
    info = ds.info
    return data.DataLoader(ds.train_images, ds.train_labels, s.batch_size, info.mean, info.std, shuffle=True,
                           seed=s.seed, augment=s.augment, pad=crop_padding(s, info), erase=s.erase)


def patch_kernel_problems(s):
    """An overlapping window must cover its patch and stick out equally on both sides (the rule of
    ``minivit.nn.vit.check_patch_kernel``), and a strided stem must divide the patch, said in flags. With a
    stem of stride 2 the projection's patch, and so the window, is measured on the stem's output."""
    layers = s.stem_depth if getattr(s, "stem_channels", 0) else 0        # (the settings of minivit gan: no stem)
    shrink = getattr(s, "stem_stride", 1) ** layers
    if s.patch_size % shrink:
        return [f"--patch-size {s.patch_size} is not divisible by {shrink}, the stride of {layers} stem layers "
                f"of --stem-stride {s.stem_stride}"]
    patch = s.patch_size // shrink
    try:
        check_patch_kernel(s.patch_kernel or None, patch)
    except ValueError:
        least = (f"--patch-size {s.patch_size}" if shrink == 1 else
                 f"{patch}, the patch on the stem's output (--patch-size {s.patch_size} / {shrink}),")
        return [f"--patch-kernel {s.patch_kernel} must be 0 (no overlap) or at least {least} with an even "
                "difference (windows centred on the patches)"]
    return []


def build_model(s, info):
    C, H, _ = info.shape
    return VisionTransformer(img_size=H, patch_size=s.patch_size, in_chans=C, num_classes=len(info.classes),
                             global_pool=s.global_pool, class_token=s.global_pool == "token", embed_dim=s.embed_dim,
                             depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, pos_embed=s.pos_embed,
                             drop_rate=s.drop_rate, patch_kernel=s.patch_kernel or None,
                             stem_channels=(s.stem_channels,) * s.stem_depth if s.stem_channels else (),
                             stem_stride=s.stem_stride, seed=s.seed)


def load_data(s, progress=True, val_size=0):
    """The data set of settings ``s`` (cut to ``s.limit``), with the last ``val_size`` training images held out as
    the validation split."""
    ds = data.load_dataset(s.dataset, s.data_dir, progress=progress, verify=s.verify)
    if s.limit:
        ds.train_images, ds.train_labels = ds.train_images[:s.limit], ds.train_labels[:s.limit]
        ds.test_images, ds.test_labels = ds.test_images[:s.limit], ds.test_labels[:s.limit]
    if val_size:
        if val_size >= len(ds.train_labels):
            raise SettingsError(f"--val-size {val_size} leaves no training images: the training set has "
                                f"{len(ds.train_labels)}")
        ds.val_images, ds.val_labels = ds.train_images[-val_size:], ds.train_labels[-val_size:]
        ds.train_images, ds.train_labels = ds.train_images[:-val_size], ds.train_labels[:-val_size]
    return ds


def _rng_state(model):
    states = {name: m._generators["numpy"].bit_generator.state for name, m in model.named_modules()
              if isinstance(m, Dropout) and "numpy" in m._generators}
    states["__default__"] = rng.default_generator(np).bit_generator.state
    return states


def _restore_rng_state(model, states):
    for name, m in model.named_modules():
        if isinstance(m, Dropout) and name in states:
            m.generator(np).bit_generator.state = states[name]
    if "__default__" in states:
        rng.default_generator(np).bit_generator.state = states["__default__"]


def evaluate(model, images, labels, mean, std, batch_size=256, device="cpu", flip=False, shift=0):
    """Loss, accuracy, predictions and the probability of each prediction on a labelled set.

    Test-time augmentation: a prediction averages the class probabilities of several views of the image,
    p = mean_v softmax(f(v(x))), kept as log p = logsumexp_v log softmax(f(v(x))) - log V so that the loss
    -log p[label] stays finite. With ``flip`` the views are the image and its mirror image (suits models trained
    with random flips, ``--augment``); with ``shift`` N they are also the image moved by 1..N pixels up, down,
    left and right, background (pixel 0) moved in: 1 + 4N positions, each mirrored too under ``flip``.
    """
    loader = data.DataLoader(images, labels, batch_size, mean, std)
    background = loader.normalize(np.zeros((1, images.shape[1], 1, 1), np.uint8))   # pixel 0, (1, C, 1, 1)
    moves = tta_moves(shift)
    model.eval()
    total_loss, predictions, confidences = 0.0, [], []
    with no_grad():
        for x, y in loader:
            x = devices.to_device(x, device)
            xp = devices.get_array_module(x)
            log_p = None
            for dy, dx in moves:
                v = x if (dy, dx) == (0, 0) else data.shift_images(x, dy, dx, background)
                for view in ([v, xp.ascontiguousarray(v[..., ::-1])] if flip else [v]):
                    log_pv = F.log_softmax(model(view), axis=1).data                 # (B, K)
                    log_p = log_pv if log_p is None else xp.logaddexp(log_p, log_pv)
            log_p = devices.asnumpy(log_p - math.log(len(moves) * (2 if flip else 1)))
            total_loss -= float(log_p[np.arange(len(y)), y].sum())
            predictions.append(log_p.argmax(1))
            confidences.append(np.exp(log_p.max(1)))
            STOP.check()
    model.train()
    predictions = np.concatenate(predictions)
    return {"loss": total_loss / len(labels), "acc": float((predictions == labels).mean()),
            "predictions": predictions, "confidences": np.concatenate(confidences)}


def tta_moves(shift):
    """The (down, right) pixel moves of ``evaluate``'s views for ``shift`` N: (0, 0), then 1..N up, down, left and
    right."""
    return [(0, 0)] + [(dy * d, dx * d) for d in range(1, shift + 1) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]


def tta_words(flip, shift):
    """How ``evaluate`` makes a prediction, in words for the logs ('' for the image alone)."""
    if not shift:
        return ", each image averaged with its mirror image" if flip else ""
    views = (1 + 4 * shift) * (2 if flip else 1)
    return (f", each image averaged over {views} views: moved by up to {plural(shift, 'pixel')} up, down, left "
            f"and right{', each also mirrored' if flip else ''}")


def evaluate_shared(model, images, labels, info, s, final=False):
    """(loss, accuracy) of ``evaluate`` on a labelled set, each rank of the job evaluating its share of it; with the
    test-time augmentation of ``s`` only in the ``final`` evaluation of a run."""
    world = distributed.world()
    part = distributed.shard(len(labels), world.rank, world.size)
    n = part.stop - part.start
    loss_sum, correct = 0.0, 0                                 # a set smaller than the job: some ranks get none
    if n:
        result = evaluate(model, images[part], labels[part], info.mean, info.std, device=s.device,
                          flip=s.flip_tta and final, shift=s.tta_shift if final else 0)
        loss_sum, correct = result["loss"] * n, int((result["predictions"] == labels[part]).sum())
    loss_sum, correct = world.sum([loss_sum, correct])
    return loss_sum / len(labels), correct / len(labels)


# ------------------------------------------------------------------------------ training to a time budget
# With ``minutes`` M (``--minutes``) a run takes as many epochs E as fit in M minutes on this machine, at most
# ``epochs``: the largest E with
#
#     spent + E (t_epoch + t_eval) + t_final <= BUDGET_SHARE * 60 M
#
# spent: the seconds already gone (reading the data, this measurement); t_epoch: one pass over the training
# images; t_eval: the evaluation after each epoch, each image seen once; t_final: what the last evaluation costs
# beyond that (its test-time views, and the test set too when the epochs are judged on a validation split). Each
# is measured before the run, on a throwaway model: a few training steps with the run's loader, augmentation and
# processes, and an evaluation of a slice of the images. Then the run is exactly the run of ``--epochs E``
# (the warmup kept): the throwaway model leaves no trace in its weights, batches or random numbers.
#
# A few steps can mislead by 10% or more on a shared machine, so the plan is made again once the first epoch has
# trained, from that epoch's own time (the evaluations scaled by the same factor). While the learning rate still
# warms up, the length of the run has not yet made any difference: when the warmup lasts at least that epoch, the
# run with the new E is still exactly the run of ``--epochs E``. (With a shorter warmup the first plan stands.)
BUDGET_SHARE = 0.93      # of the budget the estimate may fill: a run's speed drifts by a few percent as it goes
BUDGET_WARMUP = 3        # training steps run before the timed ones (first calls allocate and fill caches)
BUDGET_STEPS = 20        # training steps timed
BUDGET_EVAL_IMAGES = 2048


def estimated_seconds(spent_s, epochs, costs):
    """The left side of the sum above: the seconds a run of ``epochs`` takes, with ``costs`` (t_epoch, t_eval,
    t_final)."""
    t_epoch, t_eval, t_final = costs
    return spent_s + epochs * (t_epoch + t_eval) + t_final


def epochs_within(budget_s, spent_s, costs, most):
    """The most epochs (at most ``most``, at least 0) whose ``estimated_seconds`` fit within ``BUDGET_SHARE`` of
    ``budget_s`` seconds."""
    t_epoch, t_eval, t_final = costs
    room = BUDGET_SHARE * budget_s - spent_s - t_final
    return max(0, min(most, math.floor(room / (t_epoch + t_eval))))


def costs_after_first(costs, first_s):
    """The measured ``costs`` with the first epoch's own training time ``first_s`` in place of t_epoch, and the
    evaluations scaled by the same factor."""
    return tuple(c * first_s / costs[0] for c in costs)


def epochs_after_first(budget_s, elapsed_s, first_s, costs, most, least):
    """The plan made again after the first epoch's training (``first_s`` seconds; ``elapsed_s`` since the start):
    ``epochs_within`` with ``costs_after_first``, the first epoch counted among the E; at least ``least`` (the
    warmup already begun is kept)."""
    return max(least, epochs_within(budget_s, elapsed_s - first_s, costs_after_first(costs, first_s), most))


def measure_costs(s, ds):
    """(t_epoch, t_eval, t_final) of settings ``s`` on data set ``ds``, in seconds, measured on a throwaway model
    (every rank of a job takes part, as in training; each returns its own measurement)."""
    info = ds.info
    model = build_model(s, info).to(device=s.device)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, s.weight_decay), lr=s.lr)
    total = BUDGET_WARMUP + BUDGET_STEPS
    sched = optim.WarmupCosine(opt, total, total, s.min_lr)   # a small learning rate: only the time counts
    ema = build_model(s, info).to(device=s.device).eval() if s.ema else None
    scaler = amp.GradScaler(enabled=s.amp)
    seconds_per_image = None
    for steps in (BUDGET_WARMUP, BUDGET_STEPS):          # untimed, then timed: the last one counts
        sample = copy.copy(ds)
        sample.train_images = ds.train_images[:steps * s.batch_size]
        sample.train_labels = ds.train_labels[:steps * s.batch_size]
        row = train_epoch(model, opt, sched, train_loader(s, sample), 0, s, False, scaler, ema)
        seconds_per_image = 1.0 / row["images_per_s"]
    t_epoch = seconds_per_image * len(ds.train_labels)
    judged = model if ema is None else ema
    n = min(BUDGET_EVAL_IMAGES, len(ds.test_labels))
    t0 = time.perf_counter()
    evaluate_shared(judged, ds.test_images[:n], ds.test_labels[:n], info, s)
    per_view = (time.perf_counter() - t0) / n                      # seconds per image and view
    views = len(tta_moves(s.tta_shift)) * (2 if s.flip_tta else 1)
    n_val = len(ds.val_labels) if s.val_size else 0
    t_eval = per_view * (n_val or len(ds.test_labels))
    t_final = per_view * views * (n_val + len(ds.test_labels)) - t_eval
    return t_epoch, t_eval, t_final


def plan_epochs(s, ds, started, log=print):
    """(settings ``s`` with the epochs that fit its ``minutes``, the measured costs (t_epoch, t_eval, t_final)), as
    rank 0 measured them for every rank of a job (see above). ``started``: the run's start
    (``time.perf_counter()``). SettingsError when not one epoch fits."""
    world = distributed.world()
    t0 = time.perf_counter()
    mine = measure_costs(s, ds)
    measured = time.perf_counter() - t0
    spent = time.perf_counter() - started
    found = epochs_within(60 * s.minutes, spent, mine, s.epochs)
    epochs, costs = world.broadcast((found, mine) if world.is_main else None)
    t_epoch, t_eval, t_final = costs
    words = (f"{t_epoch:.0f}s to train an epoch, {t_eval:.1f}s to evaluate it, {t_final:.0f}s more for the last "
             f"evaluation{tta_words(s.flip_tta, s.tta_shift)}, {spent:.0f}s spent before training "
             f"({measured:.0f}s of it measuring)")
    if epochs < 1:
        need = estimated_seconds(spent, 1, costs) / BUDGET_SHARE / 60
        raise SettingsError(f"--minutes {s.minutes:g}: not one epoch fits on this machine ({words}); one epoch needs "
                            f"a budget of about {need:.1f} minutes")
    planned = dataclasses.replace(s, epochs=epochs, warmup_epochs=min(s.warmup_epochs, epochs))
    log(f"time budget {s.minutes:g} min: {words}: {plural(epochs, 'epoch')}"
        + (" (the most --epochs allows)" if epochs == s.epochs else "")
        + _plan_words(planned, estimated_seconds(spent, epochs, costs)))
    return planned, costs


def _plan_words(s, seconds):
    """', about M min in all; the same run without the budget: ...' for a planned run of settings ``s``."""
    return (f", about {seconds / 60:.1f} min in all; the same run without the budget: --minutes 0 --epochs "
            f"{s.epochs} --warmup-epochs {s.warmup_epochs:g}")


def replan_epochs(s, run, elapsed, log=print):
    """Settings ``s`` with the epochs that fit, planned again after the first epoch's training (see above; at least
    the warmup, which has begun), and ``run``'s schedule stretched or cut to them; as rank 0 decided for every rank
    of a job (rank 0 logs its own times). ``elapsed``: seconds since the run's start."""
    world = distributed.world()
    if run.sched.warmup_steps < len(run.loader):
        return s                      # the learning rate has begun to decay: the length is settled
    first = run.history[0]["epoch_time_s"]
    found = epochs_after_first(60 * s.minutes, elapsed, first, run.costs, run.most_epochs,
                               math.ceil(s.warmup_epochs))
    epochs = world.broadcast(found if world.is_main else None)
    planned = dataclasses.replace(s, epochs=epochs)
    log(f"time budget {s.minutes:g} min, planned again after the first epoch's {first:.0f}s of training (measured "
        f"beforehand: {run.costs[0]:.0f}s): {plural(epochs, 'epoch')}"
        + ("" if epochs == s.epochs else f" instead of {s.epochs}")
        + _plan_words(planned, estimated_seconds(elapsed - first, epochs, costs_after_first(run.costs, first))))
    run.sched.total_steps = epochs * len(run.loader)
    return planned


def write_reports(paths, history, plot=viz.plot_history):
    """metrics.jsonl and curves.png (drawn by ``plot(history)``) from the history so far, each written
    atomically."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    checkpoint.atomic_write(paths["metrics"], lambda tmp: Path(tmp).write_text(text))
    checkpoint.atomic_write(paths["curves"], lambda tmp: plot(history).savefig(tmp, format="png"))


def plural(count, word):
    """``plural(1, "epoch")`` is "1 epoch", ``plural(3, "epoch")`` is "3 epochs"."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def saved_state(path, epoch, total, out_dir, command="train"):
    """What an interrupted run of ``minivit <command>`` leaves, for the message that ends it."""
    if epoch == total:
        return f"{path} holds all {plural(total, 'epoch')}: the run is complete"
    if epoch is not None:
        return f"{path} holds epoch {epoch} of {total}: continue with  minivit {command} --resume {out_dir}"
    if path.exists():
        return f"nothing of this run was saved; {path} still holds the earlier run"
    return "nothing was saved: a run writes its first checkpoint when its first epoch ends"


def train(s, out_dir, resume=None, epochs=None, overwrite=True, progress=True, log=print):
    """Train a ViT as ``s`` says, writing metrics, curves and checkpoints into ``out_dir``.

    ``out_dir`` is locked while the run works in it (see ``minivit.rundir``): a second run on the same folder stops
    at once with RunLocked. Each epoch ends by writing the checkpoint, then metrics.jsonl and curves.png.

    Args:
        s: TrainSettings. When resuming, only ``device``, ``data_dir``, ``anomaly`` and ``verify`` are taken from
            it; everything else comes from the checkpoint.
        out_dir: folder for checkpoint.safetensors, metrics.jsonl and curves.png.
        resume: a checkpoint to continue from.
        epochs: with ``resume``, the run's new length. More epochs than the checkpoint holds extend a finished run:
            the warmup is kept and the cosine decay is stretched to the new end, so the learning rate continues
            from where an ``epochs``-long schedule is at this step.
        overwrite: let this run replace another run that ``out_dir`` holds (SettingsError otherwise).

    Returns:
        dict with the history (one dict per epoch), the final test accuracy and the output paths.

    Raises:
        TrainingInterrupted (a KeyboardInterrupt) on Ctrl-C, saying which epoch the checkpoint holds, if any.
    """
    out_dir = Path(out_dir)
    paths = {"checkpoint": out_dir / checkpoint.CHECKPOINT_NAME, "metrics": out_dir / "metrics.jsonl",
             "curves": out_dir / "curves.png"}
    world = distributed.world()  # under mpiexec: rank 0 owns the folder and writes; the others only compute
    if not world.is_main:
        log, progress = (lambda *args: None), False
    with RunFolder(out_dir, log) if world.is_main else contextlib.nullcontext():
        log(f"run folder: {out_dir}")
        # rank 0 checks the folder and reads the checkpoint; every rank gets what it found
        ckpt, saved_epoch = world.broadcast(start_run(out_dir, paths, resume, overwrite) if world.is_main else None)
        if ckpt is not None:
            s = validate(TrainSettings(**{**resumed_settings(ckpt, s, epochs, resume), "anomaly": s.anomaly}))
        started = time.perf_counter()
        try:
            run = _prepare(s, ckpt, progress, started, log)
            s = run.settings
            wall_before = run.history[-1].get("wall_time_s", 0.0) if run.history else 0.0
            if ckpt is not None:
                log(f"resuming {resume} after epoch {ckpt.epoch} of {s.epochs}")
            stem = (f"stem {s.stem_depth}x{s.stem_channels}" + (f" stride {s.stem_stride} " if s.stem_stride > 1
                                                                else " ")) if s.stem_channels else ""
            log(f"{s.preset}: {s.dataset} from {run.data.folder} ({len(run.data.train_labels)} train / "
                f"{len(run.data.test_labels)} test images), ViT {stem}patch {s.patch_size} width {s.embed_dim} "
                f"depth {s.depth} heads {s.num_heads} ({run.model.num_parameters():,} parameters), "
                f"{plural(s.epochs, 'epoch')} of {plural(len(run.loader), 'step')} on {s.device}"
                + (f", each batch shared by {world.size} processes" if world.size > 1 else ""))
            if s.amp and devices.normalize_device(s.device) == "cpu":
                log("--amp on the CPU: float16 is stored, but every product and activation converts it to float32 "
                    "and back; a step takes 3-4x a float32 step (AMP pays on a GPU; see docs/amp.md)")
            ds, info, model, history = run.data, run.data.info, run.model, run.history
            anomaly = detect_anomaly() if s.anomaly else contextlib.nullcontext()
            STOP.watching = True
            with anomaly:
                epoch = len(history)
                while epoch < s.epochs:
                    history.append(train_epoch(model, run.opt, run.sched, run.loader, epoch, s, progress,
                                                run.scaler, run.ema))
                    if run.costs is not None and epoch == 0:
                        s = replan_epochs(s, run, time.perf_counter() - started, log)
                    judged = model if run.ema is None else run.ema   # the moving average when the run keeps one
                    splits = ["val"] if s.val_size else ["test"]
                    if s.val_size and epoch + 1 == s.epochs:
                        splits.append("test")                      # the test set once, at the end
                    for split in splits:
                        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
                        loss, acc = evaluate_shared(judged, images, labels, info, s, final=epoch + 1 == s.epochs)
                        history[-1].update({f"{split}_loss": loss, f"{split}_acc": acc})
                    # wall time from the start of the run (data loading included) to the end of this evaluation
                    history[-1]["wall_time_s"] = wall_before + time.perf_counter() - started
                    STOP.check()
                    h = history[-1]
                    log(f"epoch {epoch + 1:3d}/{s.epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}  "
                        + "  ".join(f"{split} loss {h[split + '_loss']:.4f} acc {h[split + '_acc']:.2%}"
                                    for split in splits)
                        + f"  {h['epoch_time_s']:.1f}s ({h['images_per_s']:.0f} img/s)")
                    if world.is_main:
                        checkpoint.save_checkpoint(paths["checkpoint"], model, run.opt, run.sched,
                                                   rng_state=_rng_state(model), train_settings=dataclasses.asdict(s),
                                                   epoch=epoch + 1, history=history,
                                                   scaler=run.scaler if s.amp else None, ema=run.ema)
                        saved_epoch = epoch + 1
                        write_reports(paths, history)
                    STOP.check()
                    epoch += 1
        except KeyboardInterrupt:
            raise TrainingInterrupted(saved_state(paths["checkpoint"], saved_epoch, s.epochs, out_dir) if world.is_main
                                      else f"rank {world.rank} stopped (rank 0 saves the run)") from None
        finally:
            STOP.watching = STOP.asked = False
    final = history[-1]
    total = sum(h["epoch_time_s"] for h in history)
    log(f"test accuracy {final['test_acc']:.2%} after {plural(final['epoch'], 'epoch')}"
        f"{tta_words(s.flip_tta, s.tta_shift)} ({total:.0f}s of training, "
        f"{final.get('wall_time_s', total):.0f}s in all); "
        f"checkpoint {paths['checkpoint']}, metrics {paths['metrics']}, curves {paths['curves']}")
    return {"history": history, "test_acc": final["test_acc"], "model": model, "paths": paths, "settings": s}


@dataclass
class _Run:
    """What a training run works with."""
    data: data.Dataset
    loader: data.DataLoader
    model: VisionTransformer
    opt: optim.AdamW
    sched: optim.WarmupCosine
    history: list             # one row of metrics per finished epoch
    scaler: amp.GradScaler    # a pass-through unless --amp
    ema: VisionTransformer    # the moving average of the weights (None unless --ema)
    settings: TrainSettings   # the run's settings (with a time budget: the epochs that fit)
    costs: tuple              # a new run with a time budget: the measured (t_epoch, t_eval, t_final) in seconds
    most_epochs: int          # ... and the most epochs it may take (--epochs before the plan)


def _prepare(s, ckpt, progress, started, log):
    """Data, model, optimizer and schedule as ``s`` says, in the state of checkpoint ``ckpt`` if there is one. A new
    run with a time budget (``s.minutes``) first measures how many epochs fit (``plan_epochs``; ``started``: when
    the run began, ``time.perf_counter()``; ``log``: where its plan is told)."""
    world = distributed.world()
    if not world.is_main:
        world.broadcast(None)       # wait for rank 0 to find (or download) the files, then read them
    ds = load_data(s, progress, s.val_size)
    if world.is_main:
        world.broadcast(None)
    info = ds.info
    _check_split(s, len(ds.train_labels), world.size)
    costs, most = None, s.epochs
    if ckpt is None and s.minutes:
        s, costs = plan_epochs(s, ds, started, log)
    loader = train_loader(s, ds)
    model = build_model(s, info).to(device=s.device)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, s.weight_decay), lr=s.lr)
    total_steps = s.epochs * len(loader)
    sched = optim.WarmupCosine(opt, round(s.warmup_epochs * len(loader)), total_steps, s.min_lr)
    scaler = amp.GradScaler(enabled=s.amp)
    ema = build_model(s, info).to(device=s.device).eval() if s.ema else None
    if ckpt is None:
        rng.manual_seed(s.seed)
        world.broadcast_parameters(model.parameters())  # every rank starts from rank 0's weights
        if ema is not None:
            ema.load_state_dict(model.state_dict())
        return _Run(ds, loader, model, opt, sched, [], scaler, ema, s, costs, most)
    model.load_state_dict(ckpt.model_state)
    opt.load_state_dict(ckpt.optimizer_state)
    sched.load_state_dict({**ckpt.schedule_state, "total_steps": total_steps})  # stretched when the run is extended
    _restore_rng_state(model, ckpt.rng_state)
    scaler.load_state_dict(ckpt.scaler_state)
    if ema is not None:
        ema.load_state_dict(ckpt.ema_state)
    return _Run(ds, loader, model, opt, sched, list(ckpt.history), scaler, ema, s, costs, most)


def _check_split(s, images, ranks):
    """Every batch, the last one too, must give each of the ``ranks`` processes at least one image."""
    last = images % s.batch_size or s.batch_size
    if min(s.batch_size, last) < ranks:
        raise SettingsError(f"--batch-size {s.batch_size} over {images} images leaves a batch of "
                            f"{plural(min(s.batch_size, last), 'image')}, too few to split among {ranks} ranks: "
                            "choose a --batch-size (or --limit), or fewer --processes, that leaves at least one image per "
                            "rank in every batch")


def start_run(out_dir, paths, resume, overwrite):
    """What a run checks first in its locked folder: that it replaces no other run unless ``overwrite``; then it
    reads the checkpoint to resume. Returns (Checkpoint or None, the epoch the folder's own checkpoint holds when
    the run continues it in place, else None)."""
    continues_here = resume is not None and Path(resume).resolve() == paths["checkpoint"].resolve()
    if not overwrite and not continues_here and paths["checkpoint"].exists():
        raise SettingsError(f"{out_dir} already holds a run; continue it with --resume {out_dir}, "
                            "or pass --overwrite")
    ckpt = checkpoint.load_checkpoint(resume) if resume is not None else None
    return ckpt, (ckpt.epoch if continues_here else None)


def resumed_settings(ckpt, s, epochs, resume):
    """The checkpoint's settings (a dict) with what a resumed run may change: the device, the data folder, the
    check of the data files, the number of epochs and of processes; SettingsError if there is nothing left to do."""
    saved = ckpt.train_settings
    if epochs is not None and epochs <= ckpt.epoch:
        raise SettingsError(f"--epochs {epochs}: {resume} already holds {plural(ckpt.epoch, 'epoch')}; "
                            f"to extend the run, ask for more than {ckpt.epoch}")
    total = epochs or saved["epochs"]
    if ckpt.epoch >= total:
        raise SettingsError(f"{resume} has finished all {plural(total, 'epoch')}; extend it with --epochs N "
                            f"(N > {total})")
    resumed = {**saved, "device": s.device, "data_dir": s.data_dir or saved.get("data_dir"),
               "verify": s.verify and saved.get("verify", True), "epochs": total}
    if hasattr(s, "processes"):  # TrainSettings (the VAE's settings share this function and have no processes)
        resumed["processes"] = s.processes
    return resumed


def train_epoch(model, opt, sched, loader, epoch, s, progress, scaler=None, ema=None):
    """One pass over the training set; returns the epoch's row of metrics (without the test set's).

    Under mpiexec each rank takes its shard of every batch and the gradients are averaged over the ranks
    (``minivit.distributed``): the step is the one a single process makes on the whole batch. With ``s.amp`` the
    forward runs under autocast and ``scaler`` (an amp.GradScaler) scales the loss and skips a step whose
    gradients overflowed. ``ema`` (a model like ``model``, or None) follows the weights after each step.
    """
    from tqdm import tqdm
    scaler = scaler or amp.GradScaler(enabled=False)
    world = distributed.world()
    comm_start = world.comm_seconds
    t0 = time.perf_counter()
    seen = correct = 0
    loss_sum = 0.0
    steps = len(loader)
    bar = tqdm(loader.epoch(epoch), total=steps, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not progress,
               leave=False, unit="batch")
    for i, (x, y) in enumerate(bar):
        part = distributed.shard(len(y), world.rank, world.size)
        share = (part.stop - part.start) / len(y)  # this rank's weight in the mean loss of the whole batch
        x, y = x[part], y[part]
        x, y_dev = devices.to_device(x, s.device), devices.to_device(y, s.device)
        with amp.autocast(enabled=s.amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y_dev, label_smoothing=s.label_smoothing)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the loss became {value} at step {epoch * steps + i + 1} (epoch {epoch + 1}, "
                f"batch {i + 1}); lower --lr, or add --anomaly to name the first op that went non-finite")
        opt.zero_grad()
        scaler.scale(loss).backward()
        world.allreduce_gradients(model.parameters(), share)
        scaler.unscale_(opt)
        if s.clip_grad:
            optim.clip_grad_norm_(model.parameters(), s.clip_grad)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if ema is not None:
            optim.update_ema(ema, model, optim.ema_decay(s.ema, sched.last_step - 1))
        seen += len(y)
        loss_sum += value * len(y)
        correct += int((devices.asnumpy(logits.data.argmax(1)) == y).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        STOP.check()
    bar.close()
    seen, loss_sum, correct = world.sum([seen, loss_sum, correct])
    train_time = time.perf_counter() - t0
    row = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "train_loss": loss_sum / seen,
           "train_acc": correct / seen, "test_loss": None, "test_acc": None, "lr": opt.param_groups[0]["lr"],
           "epoch_time_s": train_time, "images_per_s": seen / train_time}
    if world.size > 1:
        row.update(ranks=world.size, comm_time_s=world.comm_seconds - comm_start)
    return row


def evaluate_checkpoint(path, out_dir=None, data_dir=None, device="cpu", log=print, progress=True, verify=True):
    """Accuracy, per-class accuracy, a confusion matrix and the most confident mistakes of a checkpoint (or of a
    .safetensors export, which records the model's config and the data set)."""
    model, ckpt = checkpoint.model_from_checkpoint(path)
    s = ckpt.train_settings
    if "dataset" not in s:
        raise checkpoint.CheckpointError(f"{path}: does not record the data set it was trained on, so it cannot be "
                                         "evaluated here")
    settings = validate(TrainSettings(**{**s, "data_dir": data_dir or s.get("data_dir"), "device": device,
                                         "verify": verify and s.get("verify", True)}))
    model.to(device=device)
    ds = load_data(settings, progress)
    info = ds.info
    result = evaluate(model, ds.test_images, ds.test_labels, info.mean, info.std, device=device,
                      flip=settings.flip_tta, shift=settings.tta_shift)
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
              "accuracy": result["acc"], "loss": result["loss"], "flip_tta": settings.flip_tta,
              "tta_shift": settings.tta_shift,
              "per_class_accuracy": {c: float(a) for c, a in zip(info.classes, per_class)},
              "confusion_matrix": counts.tolist()}
    checkpoint.atomic_write(files["report"], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    width = max(len(c) for c in info.classes)
    log(f"{info.name} test set: accuracy {result['acc']:.2%} ({int(counts.diagonal().sum())}/{len(ds.test_labels)}), "
        f"loss {result['loss']:.4f}" + tta_words(settings.flip_tta, settings.tta_shift))
    for c, a, n in zip(info.classes, per_class, counts.sum(1)):
        log(f"  {c:<{width}}  {a:7.2%}  of {n}")
    log(f"confusion matrix {files['confusion']}, mistakes {files['mistakes']}, report {files['report']}")
    return report
