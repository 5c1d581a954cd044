"""Training a ViT-GAN: the loop behind ``minivit gan`` and ``minivit sample``.

A step shows the discriminator D a batch of real images and a batch of the generator G's, and updates D on its
loss; every ``n_critic``-th step then updates G on its own loss through D:

    z ~ N(0, I) -> fake = G(z) (held constant) -> L_D(D(real), D(fake)) [+ gradient penalty] -> D's Adam step
    z ~ N(0, I) -> L_G(D(G(z))) -> G's Adam step -> the EMA generator follows G: E <- decay E + (1 - decay) G

The losses come from ``minivit.gan``: 'minimax' and 'non-saturating' (the cross-entropy game of Goodfellow et al.),
'hinge', and 'wgan-gp' (the Wasserstein critic with the gradient penalty). Each epoch ends with a grid of images
from a fixed batch of noise (samples/epoch-NNN.png, and samples.gif animating them over the epochs), a checkpoint
of both networks, their optimizers and the noise generator's state (a resumed run continues bit for bit),
metrics.jsonl and curves.png; with ``classifier`` set, the sample-quality metrics of ``minivit.gan_metrics`` are
measured too. Images are scaled to [-1, 1], the range of G's tanh. A non-finite loss or gradient stops the run,
naming the network and the step.

``minutes`` gives a run a budget of training time (the steps only: evaluation, grids and checkpoints are not
counted), so that losses of different cost can be compared at the same time spent: the epoch in progress when it
runs out ends there (its row says how many steps it took), is evaluated and saved like any other, and the run
stops. Resuming such a run with a larger ``minutes`` starts the next epoch.
"""

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minivit import checkpoint, data, devices, gan, optim, viz
from minivit.function import detect_anomaly
from minivit.gan_metrics import Classifier, sample_quality
from minivit.nn import ViTDiscriminator, ViTGenerator
from minivit.rundir import RunFolder
from minivit.tensor import no_grad
from minivit.train import (STOP, Range, SettingsError, TrainingDiverged, TrainingInterrupted, check_settings,
                           load_data, patch_kernel_problems, plural, saved_state)

FORMAT = "minivit.gan.v1"
LOSS_NAMES = ("minimax", "non-saturating", "hinge", "wgan-gp")


@dataclass
class GanSettings:
    """Everything that defines a GAN run (saved in each checkpoint)."""
    preset: str = "tiny"
    dataset: str = "fashion-mnist-mini"
    data_dir: str = None
    epochs: int = 5
    minutes: float = 0.0        # budget of training time; the run stops when it is spent (0: no budget)
    batch_size: int = 64
    loss: str = "non-saturating"
    n_critic: int = 1           # discriminator steps per generator step
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.99
    gp_weight: float = 10.0     # lambda of the gradient penalty (wgan-gp)
    spectral_norm: str = "improved"
    l2_attention: bool = True
    ema: float = 0.999          # decay of the generator's moving average (0: no EMA generator); see optim.ema_decay
    latent_dim: int = 64
    patch_size: int = 7
    patch_kernel: int = 0       # discriminator: side of overlapping windows centred on the patches (0: the patches)
    minibatch_std: int = 0      # discriminator: group size of the minibatch standard deviation feature (0: none)
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    grid: int = 64              # images in each epoch's sample grid
    classifier: str = None      # a `minivit train` checkpoint: measure sample quality each epoch
    eval_samples: int = 500     # generated (and real test) images for the sample-quality metrics
    seed: int = 0
    limit: int = 0              # use only the first `limit` train and test images (0: all)
    device: str = "cpu"
    anomaly: bool = False
    verify: bool = True


PRESETS = {
    # The embedded Fashion-MNIST subset (5000 images): a small GAN, offline.
    "tiny": dict(dataset="fashion-mnist-mini", epochs=5, batch_size=64, patch_size=7, embed_dim=64, depth=2),
    # Full Fashion-MNIST and MNIST: 28x28 grey images cut into 16 patches of 7x7, the discriminator reading
    # overlapping 11x11 windows around them, Adam at 5e-4, 30 minutes of training. Chosen on Fashion-MNIST in
    # 6-minute trials on one core each, non-saturating loss (Frechet distance of the classifier's features at the
    # end): 4x4 patches with 8x8 windows 82.1 (2 epochs), 7x7 patches with 11x11 windows 12.2 (4 epochs), the same
    # at lr 2e-4 37.9 (lesson 22 shows the generator with a windowless discriminator: blobs on the 7x7 grid).
    # The minibatch standard deviation (groups of 4) then raised recall at 30 minutes (5,000 samples): minimax
    # 0.06 -> 0.21, non-saturating 0.04 -> 0.10 (its Frechet distance 10.6 -> 6.7); see the README's table.
    "fashion": dict(dataset="fashion-mnist", epochs=100, minutes=30.0, batch_size=64, patch_size=7, patch_kernel=11,
                    minibatch_std=4, latent_dim=32, lr_g=5e-4, lr_d=5e-4, embed_dim=64, depth=2),
    "mnist": dict(dataset="mnist", epochs=100, minutes=30.0, batch_size=64, patch_size=7, patch_kernel=11,
                  minibatch_std=4, latent_dim=32, lr_g=5e-4, lr_d=5e-4, embed_dim=64, depth=2),
}

RANGES = {
    "epochs": Range(1), "minutes": Range(0), "batch_size": Range(2), "n_critic": Range(1),
    "lr_g": Range(0, low_included=False), "lr_d": Range(0, low_included=False), "beta1": Range(0, 1),
    "beta2": Range(0, 1), "gp_weight": Range(0), "ema": Range(0, 1), "latent_dim": Range(1), "patch_size": Range(1),
    "patch_kernel": Range(0), "minibatch_std": Range(0), "embed_dim": Range(1), "depth": Range(1),
    "num_heads": Range(1), "mlp_ratio": Range(0, low_included=False), "grid": Range(1), "eval_samples": Range(4),
    "seed": Range(0, 2**32 - 1, high_included=True), "limit": Range(0),
}
CHOICES = {"loss": LOSS_NAMES, "spectral_norm": ("none", "plain", "improved")}
# What --resume accepts besides the checkpoint's own settings.
RESUME_FIELDS = ("device", "data_dir", "anomaly", "verify", "epochs", "minutes")


def _relations(s):
    """What one flag needs of another (and of the data set)."""
    try:
        info = data.dataset_info(s.dataset)
    except ValueError as e:
        return [f"--dataset: {e}"]
    H = info.shape[1]
    problems = []
    if H % s.patch_size:
        problems.append(f"--patch-size {s.patch_size} does not divide the {H}x{H} images of {s.dataset}")
    problems += patch_kernel_problems(s)
    if s.embed_dim % s.num_heads:
        problems.append(f"--embed-dim {s.embed_dim} is not divisible by --num-heads {s.num_heads}")
    if s.minibatch_std == 1 or (s.minibatch_std and s.batch_size % s.minibatch_std):
        problems.append(f"--minibatch-std {s.minibatch_std} must be 0 (off) or a group size >= 2 that divides "
                        f"--batch-size {s.batch_size}")
    if s.loss == "wgan-gp" and s.gp_weight == 0:
        problems.append("--loss wgan-gp needs a positive --gp-weight (the penalty is what makes the critic "
                        "Lipschitz)")
    if s.classifier is not None and not Path(s.classifier).exists():
        problems.append(f"--classifier {s.classifier}: no such file (train one with  minivit train)")
    return problems


def validate_gan(s):
    """Check GAN settings; raise SettingsError naming every flag that is wrong and why."""
    return check_settings(s, RANGES, CHOICES, _relations)


def settings_for(preset, **overrides):
    """The settings of a preset with some fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GanSettings)}
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return validate_gan(GanSettings(**{**PRESETS[preset], **given, "preset": preset}))


# ------------------------------------------------------------------------------------------------ networks
def build_generator(s, info):
    C, H, _ = info.shape
    return ViTGenerator(img_size=H, patch_size=s.patch_size, in_chans=C, latent_dim=s.latent_dim,
                        embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio,
                        seed=s.seed)


def build_discriminator(s, info):
    C, H, _ = info.shape
    return ViTDiscriminator(img_size=H, patch_size=s.patch_size, in_chans=C, embed_dim=s.embed_dim, depth=s.depth,
                            num_heads=s.num_heads, mlp_ratio=s.mlp_ratio,
                            attention="l2" if s.l2_attention else "dot", spectral_norm=s.spectral_norm,
                            patch_kernel=s.patch_kernel or None, minibatch_std=s.minibatch_std, seed=s.seed + 1)


def losses(name):
    """(discriminator loss(real logits, fake logits), generator loss(fake logits)) of a --loss name."""
    return gan.LOSSES["wasserstein" if name == "wgan-gp" else name]


def to_pixels(images):
    """Generator outputs in [-1, 1] -> uint8 pixels in [0, 255]."""
    return np.clip(np.round((devices.asnumpy(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def generate(generator, z, batch_size=256):
    """Images (N, C, H, W) in [-1, 1] from noise (N, L), in eval mode and without a graph."""
    generator.eval()
    with no_grad():
        out = [devices.asnumpy(generator(z[i:i + batch_size]).data) for i in range(0, len(z), batch_size)]
    generator.train()
    return np.concatenate(out)


def write_grid(images, path):
    """A PNG grid (8 columns) of generated images in [-1, 1], written atomically."""
    checkpoint.atomic_write(path, lambda tmp: viz.plot_images(to_pixels(images), cols=8).savefig(tmp, format="png"))
    return Path(path)


# ------------------------------------------------------------------------------------------------ one run
@dataclass
class _GanRun:
    """What a GAN run works with."""
    data: data.Dataset
    loader: data.DataLoader
    generator: ViTGenerator
    discriminator: ViTDiscriminator
    ema: ViTGenerator          # None without EMA
    opt_g: optim.AdamW
    opt_d: optim.AdamW
    rng: np.random.Generator   # draws the noise and the penalty's interpolation weights
    fixed_noise: np.ndarray    # the grid's noise, the same every epoch
    history: list

    def models(self):
        nets = {"generator": self.generator, "discriminator": self.discriminator}
        return nets if self.ema is None else {**nets, "generator_ema": self.ema}

    def optimizers(self):
        return {"generator_optimizer": self.opt_g, "discriminator_optimizer": self.opt_d}

    def sampler(self):
        """The generator that makes the pictures: the EMA one when there is one."""
        return self.ema if self.ema is not None else self.generator


def _prepare(s, state, progress):
    """Data, networks, optimizers and generators as ``s`` says, in the saved ``state`` if there is one."""
    ds = load_data(s, progress)
    info = ds.info
    half = (0.5,) * info.shape[0]                              # x / 255 -> (x - 0.5) / 0.5, in [-1, 1]
    loader = data.DataLoader(ds.train_images, ds.train_labels, s.batch_size, half, half, shuffle=True, seed=s.seed,
                             drop_last=True)
    if len(loader) == 0:
        raise SettingsError(f"--batch-size {s.batch_size} is more than the {len(ds.train_labels)} training images")
    G, D = build_generator(s, info).to(device=s.device), build_discriminator(s, info).to(device=s.device)
    ema = build_generator(s, info).to(device=s.device).eval() if s.ema else None
    if ema is not None:
        ema.load_state_dict(G.state_dict())
    betas = (s.beta1, s.beta2)
    opt_g = optim.AdamW(G.parameters(), lr=s.lr_g, betas=betas, weight_decay=0.0)
    opt_d = optim.AdamW(D.parameters(), lr=s.lr_d, betas=betas, weight_decay=0.0)
    rng = np.random.default_rng(s.seed)
    fixed = np.random.default_rng([s.seed, 1]).standard_normal((s.grid, s.latent_dim)).astype(np.float32)
    run = _GanRun(ds, loader, G, D, ema, opt_g, opt_d, rng, fixed, [])
    if state is not None:
        for name, model in run.models().items():
            model.load_state_dict(state.models[name])
        for name, opt in run.optimizers().items():
            opt.load_state_dict(state.optimizers[name])
        rng.bit_generator.state = state.metadata["rng"]
        run.history = list(state.metadata["history"])
    return run


def _noise(run, n, s):
    return devices.to_device(run.rng.standard_normal((n, s.latent_dim)).astype(np.float32), s.device)


def _stop_if_not_finite(loss, network, model, step, epoch, batch):
    """TrainingDiverged naming the network, the step and what went non-finite: its loss, or a gradient."""
    where = f"at step {step} (epoch {epoch + 1}, batch {batch + 1})"
    hint = ("lower --lr-g and --lr-d, try --spectral-norm improved or --loss wgan-gp, or add --anomaly to name "
            "the first op that went non-finite")
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"the {network}'s loss became {value} {where}; {hint}")
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(devices.get_array_module(p.grad).isfinite(p.grad).all()):
            raise TrainingDiverged(f"the {network}'s gradient of {name} holds NaN or Inf {where}; {hint}")
    return value


def _training_seconds(history):
    """Training time spent so far (the steps of every epoch, without evaluation or saving)."""
    return sum(row["epoch_time_s"] for row in history)


def _train_epoch(run, epoch, s, progress, seconds_left=math.inf):
    """One pass over the training set, or its first steps (at least one) when ``seconds_left`` runs out first;
    returns the epoch's row of metrics."""
    from tqdm import tqdm
    d_loss_fn, g_loss_fn = losses(s.loss)
    G, D = run.generator, run.discriminator
    t0 = time.perf_counter()
    steps = len(run.loader)
    sums = {"loss_d": 0.0, "loss_g": 0.0}
    counts = {"loss_d": 0, "loss_g": 0}
    bar = tqdm(run.loader.epoch(epoch), total=steps, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not progress,
               leave=False, unit="batch")
    done = 0
    for i, (real, _) in enumerate(bar):
        step = epoch * steps + i + 1
        real = devices.to_device(real, s.device)
        B = len(real)
        # the discriminator: real and fake in one batch (one power iteration of its spectral norms per step)
        with no_grad():
            fake = G(_noise(run, B, s)).data
        xp = devices.get_array_module(real)
        logits = D(xp.concatenate([real, fake]))
        loss_d = d_loss_fn(logits[:B], logits[B:])
        if s.loss == "wgan-gp":
            loss_d = loss_d + gan.gradient_penalty(D, real, fake, lam=s.gp_weight, generator=run.rng)
        run.opt_d.zero_grad()
        loss_d.backward()
        sums["loss_d"] += _stop_if_not_finite(loss_d, "discriminator", D, step, epoch, i)
        counts["loss_d"] += 1
        run.opt_d.step()
        # the generator, every n_critic steps, through the discriminator
        if step % s.n_critic == 0:
            loss_g = g_loss_fn(D(G(_noise(run, B, s))))
            run.opt_g.zero_grad()
            loss_g.backward()
            sums["loss_g"] += _stop_if_not_finite(loss_g, "generator", G, step, epoch, i)
            counts["loss_g"] += 1
            run.opt_g.step()
            if run.ema is not None:
                optim.update_ema(run.ema, G, optim.ema_decay(s.ema, step // s.n_critic))
        bar.set_postfix(loss_d=f"{sums['loss_d'] / max(counts['loss_d'], 1):.3f}",
                        loss_g=f"{sums['loss_g'] / max(counts['loss_g'], 1):.3f}")
        done = i + 1
        STOP.check()
        if time.perf_counter() - t0 >= seconds_left:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    return {"epoch": epoch + 1, "step": epoch * steps + done, "steps": done,
            **{k: sums[k] / counts[k] if counts[k] else None for k in sums},
            "epoch_time_s": seconds, "images_per_s": done * s.batch_size / seconds,
            "training_time_s": _training_seconds(run.history) + seconds}


def _measure(run, classifier, s):
    """The sample-quality metrics of ``s.eval_samples`` generated images against as many test images."""
    n = min(s.eval_samples, len(run.data.test_labels))
    z = np.random.default_rng([s.seed, 2]).standard_normal((n, s.latent_dim)).astype(np.float32)
    fake = (generate(run.sampler(), devices.to_device(z, s.device)) + 1.0) / 2.0   # [0, 1], as the classifier reads
    real = run.data.test_images[:n].astype(np.float32) / 255.0
    return sample_quality(classifier, real, fake)


def _number(value):
    return "-" if value is None else f"{value:.4f}"


def _write_reports(paths, history):
    text = "".join(json.dumps(row) + "\n" for row in history)
    checkpoint.atomic_write(paths["metrics"], lambda tmp: Path(tmp).write_text(text))
    checkpoint.atomic_write(paths["curves"], lambda tmp: viz.plot_gan_history(history).savefig(tmp, format="png"))


def _resumed_settings(state, s, epochs, minutes, resume):
    """The checkpoint's settings with what a resumed run may change; SettingsError if there is nothing to do."""
    saved, done = state.metadata["settings"], state.metadata["epoch"]
    if epochs is not None and epochs <= done:
        raise SettingsError(f"--epochs {epochs}: {resume} already holds {plural(done, 'epoch')}; to extend the "
                            f"run, ask for more than {done}")
    total = epochs or saved["epochs"]
    if done >= total:
        raise SettingsError(f"{resume} has finished all {plural(total, 'epoch')}; extend it with --epochs N "
                            f"(N > {total})")
    minutes = saved.get("minutes", 0.0) if minutes is None else minutes
    spent = _training_seconds(state.metadata["history"]) / 60
    if minutes and spent >= minutes:
        raise SettingsError(f"{resume} has spent its training time ({spent:.1f} of --minutes {minutes:g}); "
                            f"continue it with a larger --minutes (or 0 for no budget)")
    return validate_gan(GanSettings(**{**saved, "device": s.device, "data_dir": s.data_dir or saved["data_dir"],
                                       "anomaly": s.anomaly, "verify": s.verify and saved["verify"],
                                       "epochs": total, "minutes": minutes}))


def train_gan(s, out_dir, resume=None, epochs=None, minutes=None, overwrite=True, progress=True, log=print):
    """Train a ViT-GAN as ``s`` says, writing checkpoints, sample grids, metrics and curves into ``out_dir``.

    Args:
        s: GanSettings; when resuming, only the fields of RESUME_FIELDS are taken from it.
        out_dir: the run folder (locked while the run works in it).
        resume: a GAN checkpoint (or run folder) to continue from; ``epochs`` extends it, ``minutes`` replaces its
            budget of training time.
        overwrite: let this run replace another run that ``out_dir`` holds (SettingsError otherwise).

    Returns:
        dict with the history, the networks (``run``), the settings and the output paths.
    """
    out_dir = Path(out_dir)
    paths = {"checkpoint": out_dir / checkpoint.CHECKPOINT_NAME, "metrics": out_dir / "metrics.jsonl",
             "curves": out_dir / "curves.png", "samples": out_dir / "samples",
             "animation": out_dir / "samples.gif"}
    with RunFolder(out_dir, log):
        log(f"run folder: {out_dir}")
        continues_here = resume is not None and Path(resume).resolve() == paths["checkpoint"].resolve()
        if not overwrite and not continues_here and paths["checkpoint"].exists():
            raise SettingsError(f"{out_dir} already holds a run; continue it with --resume {out_dir}, "
                                "or pass --overwrite")
        state = None
        if resume is not None:
            state = checkpoint.load_training_state(resume, FORMAT)
            s = _resumed_settings(state, s, epochs, minutes, resume)
        saved_epoch = state.metadata["epoch"] if continues_here else None
        try:
            run = _prepare(s, state, progress)
            classifier = Classifier.from_checkpoint(s.classifier) if s.classifier else None
            if state is not None:
                log(f"resuming {resume} after epoch {state.metadata['epoch']} of {s.epochs}")
            log(f"{s.preset}: {s.dataset} ({len(run.data.train_labels)} images), loss {s.loss}, n_critic "
                f"{s.n_critic}, spectral norm {s.spectral_norm}, {'L2' if s.l2_attention else 'dot-product'} "
                f"attention in D, generator {run.generator.num_parameters():,} / discriminator "
                f"{run.discriminator.num_parameters():,} parameters, {plural(s.epochs, 'epoch')} of "
                f"{plural(len(run.loader), 'step')} on {s.device}")
            anomaly = detect_anomaly() if s.anomaly else contextlib.nullcontext()
            STOP.watching = True
            with anomaly:
                for epoch in range(len(run.history), s.epochs):
                    seconds_left = s.minutes * 60 - _training_seconds(run.history) if s.minutes else math.inf
                    if seconds_left <= 0:
                        log(f"the --minutes {s.minutes:g} budget is spent: the run ends after epoch {epoch}")
                        break
                    row = _train_epoch(run, epoch, s, progress, seconds_left)
                    if classifier is not None:
                        row.update(_measure(run, classifier, s))
                    run.history.append(row)
                    STOP.check()
                    quality = (f"  FD {row['frechet_distance']:.2f} precision {row['precision']:.2f} recall "
                               f"{row['recall']:.2f} score {row['classifier_score']:.2f} smallest class "
                               f"{row['smallest_class_share']:.1%}" if classifier is not None else "")
                    short = len(run.loader) - row["steps"]
                    log(f"epoch {epoch + 1:3d}/{s.epochs}  loss D {_number(row['loss_d'])} G "
                        f"{_number(row['loss_g'])}  {row['epoch_time_s']:.1f}s{quality}"
                        + (f"  (the --minutes {s.minutes:g} budget ran out after {row['steps']} of "
                           f"{len(run.loader)} steps: the run ends here)" if short else ""))
                    checkpoint.save_training_state(
                        paths["checkpoint"], run.models(), run.optimizers(), kind=FORMAT,
                        metadata={"settings": dataclasses.asdict(s), "epoch": epoch + 1, "history": run.history,
                                  "rng": run.rng.bit_generator.state})
                    saved_epoch = epoch + 1
                    write_grid(generate(run.sampler(), devices.to_device(run.fixed_noise, s.device)),
                               paths["samples"] / f"epoch-{epoch + 1:03d}.png")
                    viz.animate_images(sorted(paths["samples"].glob("epoch-*.png")), paths["animation"])
                    _write_reports(paths, run.history)
                    STOP.check()
                    if short:
                        break
        except KeyboardInterrupt:
            raise TrainingInterrupted(saved_state(paths["checkpoint"], saved_epoch, s.epochs, out_dir, "gan")) from None
        finally:
            STOP.watching = STOP.asked = False
    log(f"checkpoint {paths['checkpoint']}, samples in {paths['samples']}, metrics {paths['metrics']}, "
        f"curves {paths['curves']}")
    return {"history": run.history, "run": run, "paths": paths, "settings": s}


# ------------------------------------------------------------------------------------------------ sampling
def load_sampler(path):
    """The generator of a GAN checkpoint (its EMA generator when it has one), in eval mode."""
    state = checkpoint.load_training_state(path, FORMAT)
    name = "generator_ema" if "generator_ema" in state.configs else "generator"
    try:
        generator = ViTGenerator(**state.configs[name])
        generator.load_state_dict(state.models[name])
    except (TypeError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{path}: its config does not fit its tensors ({type(e).__name__}: "
                                         f"{e})") from e
    return generator.eval()


def sample(path, n=64, seed=0, out=None, log=print):
    """Write a grid of ``n`` images from the generator of a GAN checkpoint; returns the PNG's path."""
    generator = load_sampler(path)
    z = np.random.default_rng(seed).standard_normal((n, generator.latent_dim)).astype(np.float32)
    out = Path(out) if out is not None else Path(path).parent / f"sample-{n}-seed{seed}.png"
    write_grid(generate(generator, z), out)
    log(f"wrote {plural(n, 'image')} to {out}")
    return out
