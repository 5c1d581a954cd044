"""The ViT-GAN's losses side by side at the same training time: sample quality, curves and grids.

    python benchmarks/gan_variants.py --classifier runs/fashion15/checkpoint.safetensors --minutes 30
    python benchmarks/gan_variants.py --classifier C --minutes 1 --limit 2000 --only hinge   # a quick look

Each variant is ``python -m minivit gan --preset P --minutes M`` in a process of its own (``--jobs`` at a time),
with the flags below; every epoch (and the last, cut short when the budget runs out) is measured with the
classifier: Frechet distance of its features, precision and recall (k = 3), classifier score and the smallest
class share (``minivit.gan_metrics``). The real-data floor is the same measurement of real images against real
images (the first test images against as many training images), and the target's reference is the classifier
score of the real test images. Writes a Markdown table, a JSON file, the Frechet distance against training time
with the floor, and each variant's last sample grid into ``--out``.

    minimax          Goodfellow et al.'s game as written (the generator minimises log(1 - D(G(z))))
    non-saturating   the generator maximises log D(G(z)) instead
    hinge + SN       hinge losses, the discriminator's layers spectrally normalised (plain, as SN-GAN: with the
                     improved variant the discriminator meets the hinge margin on every image within ten steps,
                     its loss and gradient become exactly 0, it stops learning and the generator stalls; plain
                     spectral norm avoided that with seed 0 but not with seed 1)
    wgan-gp          the Wasserstein critic with the gradient penalty, no spectral norm, 5 critic steps per
                     generator step, Adam(1e-4, betas (0.5, 0.9)) as in Gulrajani et al.'s code

The first two keep the preset's discriminator (its improved spectral norm included), so that only the loss differs.
``--jobs 2`` trains two variants at once, each on one core.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivit import gan_train, viz  # noqa: E402
from minivit.gan_metrics import Classifier, classifier_score, sample_quality  # noqa: E402

VARIANTS = {
    "minimax": ["--loss", "minimax"],
    "non-saturating": ["--loss", "non-saturating"],
    "hinge": ["--loss", "hinge", "--spectral-norm", "plain"],
    "wgan-gp": ["--loss", "wgan-gp", "--spectral-norm", "none", "--n-critic", "5", "--lr-g", "1e-4", "--lr-d",
                "1e-4", "--beta1", "0.5", "--beta2", "0.9"],
}
LABELS = {"minimax": "minimax", "non-saturating": "non-saturating", "hinge": "hinge + SN", "wgan-gp": "WGAN-GP"}


def variant_command(name, args, run_dir):
    """The ``minivit gan`` command line of one variant."""
    cmd = [sys.executable, "-m", "minivit", "gan", "--preset", args.preset, "--minutes", str(args.minutes),
           "--classifier", str(args.classifier), "--out", str(run_dir / name), "--overwrite", "--no-progress",
           *VARIANTS[name]]
    cmd += ["--limit", str(args.limit)] if args.limit else []
    cmd += ["--dataset", args.dataset] if args.dataset else []
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    return cmd


def threads_per_job(jobs):
    """Each of ``jobs`` processes' share of the cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def read_metrics(run_dir, names):
    """{name: the metrics rows of run_dir/name}."""
    return {name: [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
            for name in names}


def train_variants(args, run_dir):
    """Train each variant in a process of its own, ``args.jobs`` at a time, each on its share of the cores (the
    engine's threads, ``MINIVIT_NUM_THREADS``, and NumPy's BLAS threads); {name: metrics rows}. With more than
    one job at a time each process writes its output to ``run_dir/<name>.log``."""
    threads = threads_per_job(args.jobs)
    env = ({**os.environ, **{name: str(threads) for name in ("MINIVIT_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                               "OMP_NUM_THREADS")}} if args.jobs > 1 else None)
    waiting, running = list(args.only), []
    while waiting or running:
        while waiting and len(running) < args.jobs:
            name = waiting.pop(0)
            cmd = variant_command(name, args, run_dir)
            print(" ".join(cmd[1:]) + (f"   ({threads} thread(s), log {run_dir / name}.log)" if env else ""),
                  flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / f"{name}.log", "w") if env else None
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
        name, process, log = running.pop(0)
        if process.wait() != 0:
            raise SystemExit(f"variant {name} failed (exit {process.returncode})"
                             + (f"; see {run_dir / name}.log" if log else ""))
        if log:
            log.close()
    return read_metrics(run_dir, args.only)


def real_reference(ds, classifier, n):
    """The floor (n real test images against n real training images), the real test set's score, and those
    test images."""
    n = min(n, len(ds.test_labels), len(ds.train_labels))
    real = ds.test_images[:n].astype(np.float32) / 255.0
    other = ds.train_images[:n].astype(np.float32) / 255.0
    floor = sample_quality(classifier, real, other)
    floor["real_test_score"] = classifier_score(classifier(real)[1])
    floor["n"] = n
    return floor, real


def final_measurement(ds, classifier, names, run_dir, n):
    """Each variant's last (EMA) generator measured once more with ``n`` images (the epochs' 500 make class
    shares uncertain by about +-1 point); {name: metrics}, the floor with as many images."""
    floor, real = real_reference(ds, classifier, n)
    final = {}
    for name in names:
        generator = gan_train.load_sampler(run_dir / name / "checkpoint.safetensors")
        z = np.random.default_rng(12345).standard_normal((len(real), generator.latent_dim)).astype(np.float32)
        fake = (gan_train.generate(generator, z) + 1.0) / 2.0                    # [-1, 1] -> [0, 1]
        final[name] = sample_quality(classifier, real, fake)
    return final, floor


def table(results, floor, minutes, final=None, final_floor=None):
    """The Markdown table: each variant's last epoch (and, with ``final``, the final measurement with more
    images, which the targets are judged on)."""
    ref = final_floor or floor
    target = 0.8 * ref["real_test_score"]
    lines = [f"| variant | epochs (steps) | training min | Frechet distance | precision | recall | classifier score "
             f"(target >= {target:.2f}) | smallest class share (target >= 5%) |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        last, best = rows[-1], min(r["frechet_distance"] for r in rows)
        m = final[name] if final else last
        lines.append(f"| {LABELS[name]} | {last['epoch']} ({last['step']}) | {last['training_time_s'] / 60:.1f} | "
                     f"{m['frechet_distance']:.2f} (best epoch {best:.2f}) | {m['precision']:.2f} | "
                     f"{m['recall']:.2f} | {m['classifier_score']:.2f} | {m['smallest_class_share']:.1%} |")
    lines.append(f"| real data (floor) | - | - | {ref['frechet_distance']:.2f} | {ref['precision']:.2f} | "
                 f"{ref['recall']:.2f} | {ref['real_test_score']:.2f} (real test images) | "
                 f"{ref['smallest_class_share']:.1%} |")
    if final:
        note = (f"Each variant's last EMA generator measured with {ref['n']} generated images against {ref['n']} test "
                f"images (the floor: {ref['n']} test against {ref['n']} training images); \"best epoch\" is the lowest "
                f"of the per-epoch measurements ({floor['n']} images each), which the curve shows.")
    else:
        note = f"{floor['n']} generated and {floor['n']} real images per measurement."
    return "\n".join(lines) + f"\n\n{note} Budget {minutes:g} minutes of training per variant.\n"


def plot(results, floor, path):
    fig = viz.figure(6, 4)
    ax = fig.add_subplot()
    for name, rows in results.items():
        ax.plot([r["training_time_s"] / 60 for r in rows], [r["frechet_distance"] for r in rows], marker="o",
                label=LABELS[name])
    ax.axhline(floor["frechet_distance"], color="black", linestyle="--", label="real data (floor)")
    ax.set(xlabel="training time (minutes)", ylabel="Frechet distance (minivit features)", yscale="log",
           title="sample quality against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, required=True, help="a minivit train checkpoint of the data set")
    parser.add_argument("--preset", default="fashion", choices=list(gan_train.PRESETS))
    parser.add_argument("--minutes", type=float, default=30.0, help="training time of each variant")
    parser.add_argument("--epochs", type=int, default=0, help="at most this many epochs (0: the preset's)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N train and test images")
    parser.add_argument("--dataset", default=None, help="another data set than the preset's")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--final-samples", type=int, default=5000, help="images for the final measurement of each "
                        "variant's last generator (0: none, the table shows the last epoch's)")
    parser.add_argument("--no-train", action="store_true", help="measure and tabulate the runs already in --run-dir")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, the cores shared among them "
                        "(default 1: one after the other, each on every core)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "gan-variants")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gan-variants")
    args = parser.parse_args()
    if not args.classifier.exists():
        parser.error(f"--classifier {args.classifier}: no such file (train one: minivit train --preset fashion15)")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = read_metrics(args.run_dir, args.only) if args.no_train else train_variants(args, args.run_dir)
    s = gan_train.settings_for(args.preset, limit=args.limit or None, dataset=args.dataset)
    ds = gan_train.load_data(s, progress=False)
    classifier = Classifier.from_checkpoint(args.classifier)
    floor, _ = real_reference(ds, classifier, s.eval_samples)             # as each epoch measures
    final, final_floor = (final_measurement(ds, classifier, args.only, args.run_dir, args.final_samples)
                          if args.final_samples else ({}, None))
    text = (f"ViT-GAN losses at the same training time: `minivit gan --preset {args.preset} --minutes "
            f"{args.minutes:g}`, {datetime.date.today()}, {os.cpu_count()} CPU cores"
            + (f", {args.jobs} variants at a time on {threads_per_job(args.jobs)} thread(s) each"
               if args.jobs > 1 else "") + "\n\n"
            + table(results, floor, args.minutes, final, final_floor))
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"floor": floor, "runs": results, "final": final,
                                                       "final_floor": final_floor}, indent=1))
    plot(results, floor, args.out / "frechet-distance.png")
    for name, rows in results.items():
        shutil.copyfile(args.run_dir / name / "samples" / f"epoch-{rows[-1]['epoch']:03d}.png",
                        args.out / f"samples-{name}.png")
    print(text)


if __name__ == "__main__":
    main()
