"""Training and evaluating the ViT VAE: the loop behind ``minivit vae``.

One step: a shuffled batch with pixels in [0, 1] -> (Bernoulli likelihood) binarised afresh, each pixel 1 with
its intensity as probability -> encoder -> z = mu + exp(logvar / 2) eps -> decoder -> loss -log p(x | z) +
beta_t KL, with beta_t the KL warm-up -> backward -> clip -> AdamW -> schedule. Each epoch ends with the test
negative ELBO (one fixed binarisation of the test set and fixed noise, so that epochs compare), a checkpoint, a
line in metrics.jsonl and the curves; the run ends with the importance-weighted bound and the pictures
(``evaluate``).

The run folder, the lock, the checkpoint format, the stop signal and exact resume are those of ``minivit train``
(``minivit.train``): the random state of the binarisation and of the noise is saved with the checkpoint, so a
resumed run ends with exactly the weights of an uninterrupted one.
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minivit import checkpoint, data, devices, optim, rng, viz
from minivit.nn import ViTVAE
from minivit.nn.vae import LIKELIHOODS, binarize, bits_per_dim, kl_weight
from minivit.rundir import RunFolder
from minivit.tensor import no_grad
from minivit.train import (STOP, Range, SettingsError, TrainingDiverged, TrainingInterrupted, check_settings,
                           load_data, plural, relations, resumed_settings,
                           saved_state, start_run, write_reports)


@dataclass
class VAESettings:
    """Everything that defines a VAE run (saved in each checkpoint)."""
    preset: str = "tiny"
    dataset: str = "fashion-mnist-mini"
    data_dir: str = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_epochs: float = 0.5
    clip_grad: float = 1.0
    patch_size: int = 7
    latent_dim: int = 16
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    likelihood: str = "bernoulli"
    beta: float = 1.0
    kl_warmup_epochs: float = 1.0
    iwae_k: int = 100         # samples of the importance-weighted bound at the end of the run (0: skip it)
    seed: int = 0
    limit: int = 0            # use only the first `limit` train and test images (0: all)
    device: str = "cpu"
    verify: bool = True


PRESETS = {
    # The embedded Fashion-MNIST subset (5000 train / 1000 test images): offline, a few minutes on two cores.
    "tiny": dict(dataset="fashion-mnist-mini", epochs=10, batch_size=64, patch_size=7, latent_dim=16, embed_dim=64,
                 depth=2, num_heads=4),
    # Full Fashion-MNIST (60000 / 10000): 12 epochs took 30 minutes on two cores shared with another training run
    # (140-180 s each); the test -ELBO and the IWAE bound (k = 100) took 4 more.
    "fashion": dict(dataset="fashion-mnist", epochs=12, batch_size=128, patch_size=4, latent_dim=32, embed_dim=64,
                    depth=4, num_heads=4),
    "mnist": dict(dataset="mnist", epochs=12, batch_size=128, patch_size=4, latent_dim=32, embed_dim=64, depth=4,
                  num_heads=4),
}

RANGES = {
    "epochs": Range(1), "batch_size": Range(1), "patch_size": Range(1), "latent_dim": Range(1),
    "embed_dim": Range(1), "depth": Range(1), "num_heads": Range(1), "limit": Range(0), "iwae_k": Range(0),
    "seed": Range(0, 2**32 - 1, high_included=True), "lr": Range(0, low_included=False), "min_lr": Range(0),
    "weight_decay": Range(0), "warmup_epochs": Range(0), "clip_grad": Range(0),
    "mlp_ratio": Range(0, low_included=False), "beta": Range(0), "kl_warmup_epochs": Range(0),
}
CHOICES = {"likelihood": LIKELIHOODS}


def settings_for(preset, **overrides):
    """The settings of a preset with some fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise SettingsError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(VAESettings)}
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return validate(VAESettings(**{**PRESETS[preset], **given, "preset": preset}))


def validate(s):
    """Check settings before any work starts; raise SettingsError naming every flag that is wrong and why."""
    return check_settings(s, RANGES, CHOICES, relations)


def build_model(s, info):
    C, H, _ = info.shape
    return ViTVAE(img_size=H, patch_size=s.patch_size, in_chans=C, latent_dim=s.latent_dim, embed_dim=s.embed_dim,
                  depth=s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, likelihood=s.likelihood, seed=s.seed)


def pixels(images_uint8):
    """uint8 images -> float32 pixels in [0, 1]."""
    return images_uint8.astype(np.float32) / 255.0


class TestSet:
    """The test images as the model sees them in evaluation: binarised once with a fixed seed (Bernoulli), with
    fixed noise for the one-sample ELBO, so that every epoch is measured on the same draws."""

    def __init__(self, ds, s):
        rng = np.random.default_rng([s.seed, 1])
        x = pixels(ds.test_images)
        self.images = binarize(x, rng) if s.likelihood == "bernoulli" else x
        self.labels = ds.test_labels
        self.eps = rng.standard_normal((len(x), s.latent_dim)).astype(np.float32)


def evaluate_elbo(model, test, batch_size=256, device="cpu"):
    """Mean -ELBO, reconstruction term and KL over the test set, in nats per image."""
    model.eval()
    totals = np.zeros(3)
    with no_grad():
        for start in range(0, len(test.images), batch_size):
            x = devices.to_device(test.images[start:start + batch_size], device)
            eps = devices.to_device(test.eps[start:start + batch_size], device)
            _, rec, kl = model(x, eps=eps)
            rec, kl = devices.asnumpy(rec.data), devices.asnumpy(kl.data)
            totals += [(kl - rec).sum(), -rec.sum(), kl.sum()]
            STOP.check()
    model.train()
    nelbo, nrec, kl = totals / len(test.images)
    return {"nelbo": float(nelbo), "rec": float(nrec), "kl": float(kl)}


def evaluate_iwae(model, test, k, batch_size=50, seed=0, device="cpu"):
    """Mean IWAE_k bound over the test set, in nats per image (the negative: an upper bound on -log p(x))."""
    model.eval()
    generator = np.random.default_rng([seed, 2])
    bounds = []
    for start in range(0, len(test.images), batch_size):
        x = devices.to_device(test.images[start:start + batch_size], device)
        bounds.append(model.iwae_bound(x, k=k, generator=generator))
        STOP.check()
    model.train()
    return float(-np.concatenate(bounds).mean())


def _rng_state(generator):
    return {"vae": generator.bit_generator.state,
            "__default__": rng.default_generator(np).bit_generator.state}


def train_vae(s, out_dir, resume=None, epochs=None, overwrite=True, progress=True, log=print):
    """Train a ViT VAE as ``s`` says, writing checkpoints, metrics, curves and pictures into ``out_dir``.

    As ``minivit.train.train``: ``resume`` continues a checkpoint (only ``device``, ``data_dir`` and ``verify`` are
    taken from ``s``; ``epochs`` may extend the run); a second process on the same folder stops with RunLocked.

    Returns:
        dict with the history (one dict per epoch), the evaluation report, the model and the output paths.
    """
    out_dir = Path(out_dir)
    paths = {"checkpoint": out_dir / checkpoint.CHECKPOINT_NAME, "metrics": out_dir / "metrics.jsonl",
             "curves": out_dir / "curves.png"}
    with RunFolder(out_dir, log):
        log(f"run folder: {out_dir}")
        ckpt, saved_epoch = start_run(out_dir, paths, resume, overwrite)
        if ckpt is not None:
            if "latent_dim" not in ckpt.train_settings:
                raise checkpoint.CheckpointError(f"{resume}: not a checkpoint of minivit vae (resume it with "
                                                 "minivit train)")
            s = validate(VAESettings(**resumed_settings(ckpt, s, epochs, resume)))
        try:
            ds = load_data(s, progress)
            info = ds.info
            loader = data.DataLoader(ds.train_images, ds.train_labels, s.batch_size, (0.0,) * info.shape[0],
                                     (1.0,) * info.shape[0], shuffle=True, seed=s.seed)
            model = build_model(s, info).to(device=s.device)
            opt = optim.AdamW(optim.param_groups_weight_decay(model, s.weight_decay), lr=s.lr)
            total_steps = s.epochs * len(loader)
            sched = optim.WarmupCosine(opt, round(s.warmup_epochs * len(loader)), total_steps, s.min_lr)
            generator = np.random.default_rng([s.seed, 0])        # binarisation and noise of the training steps
            history = []
            if ckpt is None:
                rng.manual_seed(s.seed)
            else:
                model.load_state_dict(ckpt.model_state)
                opt.load_state_dict(ckpt.optimizer_state)
                sched.load_state_dict({**ckpt.schedule_state, "total_steps": total_steps})
                generator.bit_generator.state = ckpt.rng_state["vae"]
                rng.default_generator(np).bit_generator.state = ckpt.rng_state["__default__"]
                history = list(ckpt.history)
                log(f"resuming {resume} after epoch {ckpt.epoch} of {s.epochs}")
            test = TestSet(ds, s)
            log(f"{s.preset}: {s.dataset} from {ds.folder} ({len(ds.train_labels)} train / {len(ds.test_labels)} "
                f"test images), ViT VAE patch {s.patch_size} width {s.embed_dim} depth {s.depth} latent "
                f"{s.latent_dim}, {s.likelihood} likelihood ({model.num_parameters():,} parameters), "
                f"{plural(s.epochs, 'epoch')} of {plural(len(loader), 'step')} on {s.device}")
            STOP.watching = True
            for epoch in range(len(history), s.epochs):
                history.append(_train_epoch(model, opt, sched, loader, generator, epoch, s, progress))
                result = evaluate_elbo(model, test, device=s.device)
                history[-1].update(test_nelbo=result["nelbo"], test_rec=result["rec"], test_kl=result["kl"],
                                   test_bits_per_dim=bits_per_dim(result["nelbo"], model.dims))
                STOP.check()
                h = history[-1]
                log(f"epoch {epoch + 1:3d}/{s.epochs}  train -ELBO {h['train_nelbo']:.2f} (KL {h['train_kl']:.2f}, "
                    f"beta {h['beta']:.2f})  test -ELBO {h['test_nelbo']:.2f} nats = "
                    f"{h['test_bits_per_dim']:.4f} bits/dim (KL {h['test_kl']:.2f})  {h['epoch_time_s']:.1f}s")
                checkpoint.save_checkpoint(paths["checkpoint"], model, opt, sched, rng_state=_rng_state(generator),
                                           train_settings=dataclasses.asdict(s), epoch=epoch + 1, history=history)
                saved_epoch = epoch + 1
                write_reports(paths, history, plot=viz.plot_vae_history)
                STOP.check()
            report = evaluate(model, ds, test, s, out_dir, log=log)
        except KeyboardInterrupt:
            raise TrainingInterrupted(saved_state(paths["checkpoint"], saved_epoch, s.epochs, out_dir,
                                                  command="vae")) from None
        finally:
            STOP.watching = STOP.asked = False
    return {"history": history, "report": report, "model": model, "paths": paths, "settings": s}


def _train_epoch(model, opt, sched, loader, generator, epoch, s, progress):
    """One pass over the training set; returns the epoch's row of metrics (without the test set's)."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    steps = len(loader)
    seen, nelbo_sum, kl_sum = 0, 0.0, 0.0
    bar = tqdm(loader.epoch(epoch), total=steps, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not progress,
               leave=False, unit="batch")
    for i, (x, _) in enumerate(bar):
        step = epoch * steps + i
        if s.likelihood == "bernoulli":
            x = binarize(x, generator)
        eps = generator.standard_normal((len(x), s.latent_dim)).astype(np.float32)
        beta = kl_weight(step, s.beta, round(s.kl_warmup_epochs * steps))
        loss, rec, kl = model(devices.to_device(x, s.device), beta=beta, eps=devices.to_device(eps, s.device))
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at step {step + 1} (epoch {epoch + 1}, batch {i + 1}); "
                                   "lower --lr")
        opt.zero_grad()
        loss.backward()
        if s.clip_grad:
            optim.clip_grad_norm_(model.parameters(), s.clip_grad)
        opt.step()
        sched.step()
        rec, kl = devices.asnumpy(rec.data), devices.asnumpy(kl.data)
        seen += len(x)
        nelbo_sum += float((kl - rec).sum())
        kl_sum += float(kl.sum())
        bar.set_postfix(nelbo=f"{nelbo_sum / seen:.1f}", kl=f"{kl_sum / seen:.1f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        STOP.check()
    bar.close()
    train_time = time.perf_counter() - t0
    return {"epoch": epoch + 1, "step": (epoch + 1) * steps, "train_nelbo": nelbo_sum / seen,
            "train_kl": kl_sum / seen, "beta": beta, "lr": opt.param_groups[0]["lr"], "epoch_time_s": train_time,
            "images_per_s": seen / train_time}


# ------------------------------------------------------------------------------------------------- evaluation
def _as_uint8(images):
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def evaluate(model, ds, test, s, out_dir, log=print, count=8, steps=10, manifold=15):
    """The test bounds and the pictures of a trained VAE, written into ``out_dir``:

        eval.json             test -ELBO and IWAE bound in nats and bits per dimension
        reconstructions.png   test images (odd rows) above their reconstructions decode(mu(x)) (even rows)
        samples.png           decoder means at z ~ N(0, I)
        interpolations.png    decode((1 - t) mu(a) + t mu(b)) from one test image to another, t in [0, 1]
        manifold.png          (2-D latent) decoded images over a grid of z spanning the prior's 5%..95% quantiles
        latent.png            (2-D latent) the test set's posterior means coloured by class
    """
    out_dir = Path(out_dir)
    device = s.device
    elbo = evaluate_elbo(model, test, device=device)
    report = {"dataset": ds.info.name, "images": len(test.images), "likelihood": s.likelihood,
              "test_nelbo_nats": elbo["nelbo"], "test_rec_nats": elbo["rec"], "test_kl_nats": elbo["kl"],
              "test_nelbo_bits_per_dim": bits_per_dim(elbo["nelbo"], model.dims)}
    if s.iwae_k:
        iwae = evaluate_iwae(model, test, s.iwae_k, seed=s.seed, device=device)
        report.update(iwae_k=s.iwae_k, test_iwae_nats=iwae, test_iwae_bits_per_dim=bits_per_dim(iwae, model.dims))
    files = {name: out_dir / f"{name}.png" for name in ("reconstructions", "samples", "interpolations")}
    originals = pixels(ds.test_images[:count])
    shown = devices.to_device(originals, device)
    rec = model.reconstruct(shown)
    pairs = np.stack([originals, rec], axis=1).reshape((-1,) + originals.shape[1:])   # original, reconstruction, ...
    order = np.concatenate([np.arange(0, 2 * count, 2), np.arange(1, 2 * count, 2)])
    viz.plot_images(_as_uint8(pairs[order]), cols=count, path=files["reconstructions"])
    viz.plot_images(_as_uint8(model.sample(4 * count, generator=np.random.default_rng([s.seed, 3]))), cols=count,
                    path=files["samples"])
    with no_grad():
        mu = devices.asnumpy(model.encode(shown)[0].data)
        t = np.linspace(0, 1, steps, dtype=np.float32)[:, None]
        paths = np.concatenate([(1 - t) * mu[i] + t * mu[i + 1] for i in range(0, min(count, 8) - 1, 2)])
        between = model.mean_image(model.decode(devices.to_device(paths, device)))
    viz.plot_images(_as_uint8(between), cols=steps, path=files["interpolations"])
    if s.latent_dim == 2:
        files.update(manifold=out_dir / "manifold.png", latent=out_dir / "latent.png")
        values = _normal_quantiles(manifold)
        z1, z2 = np.meshgrid(values, values[::-1])
        grid = np.stack([z1.ravel(), z2.ravel()], axis=1).astype(np.float32)
        with no_grad():
            decoded = model.mean_image(model.decode(devices.to_device(grid, device)))
        viz.plot_latent_manifold(decoded, values, path=files["manifold"])
        with no_grad():
            points = np.concatenate([devices.asnumpy(model.encode(devices.to_device(test.images[i:i + 256],
                                                                                    device))[0].data)
                                     for i in range(0, len(test.images), 256)])
        viz.plot_latent_scatter(points, test.labels, ds.info.classes, path=files["latent"])
    files["report"] = out_dir / "eval.json"
    checkpoint.atomic_write(files["report"], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    iwae_text = (f", IWAE (k = {s.iwae_k}) {report['test_iwae_nats']:.2f} nats = "
                 f"{report['test_iwae_bits_per_dim']:.4f} bits/dim" if s.iwae_k else "")
    log(f"{ds.info.name} test set ({len(test.images)} images): -ELBO {elbo['nelbo']:.2f} nats = "
        f"{report['test_nelbo_bits_per_dim']:.4f} bits/dim (reconstruction {elbo['rec']:.2f}, KL {elbo['kl']:.2f})"
        + iwae_text)
    pictures = ", ".join(str(p) for name, p in files.items() if name != "report")
    log(f"pictures: {pictures}; report {files['report']}")
    return report


def _normal_quantiles(n, low=0.05, high=0.95):
    """n points of N(0, 1) at evenly spaced probabilities from low to high (the inverse of its CDF)."""
    from scipy.special import ndtri
    return ndtri(np.linspace(low, high, n)).astype(np.float32)
