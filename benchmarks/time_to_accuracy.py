"""Time to accuracy: a training recipe in minivit and in PyTorch, test accuracy against wall time.

    python benchmarks/time_to_accuracy.py --preset fashion15          # both, one after the other (~30 minutes)
    python benchmarks/time_to_accuracy.py --preset fashion15 --only pytorch --limit 2000 --epochs 2

minivit trains with its command (``python -m minivit train --preset P``, at its library defaults and in as many
processes as the preset asks for: two for ``fashion15``, each with half of every batch); PyTorch trains the same
recipe, for as many epochs as minivit's run took (``fashion15`` takes as many as fit in 15 minutes), in one process
at its defaults (its own threads): the same model (TorchViT, with the minivit model's
initial weights copied by name), the same batches in the same order with the same augmentation (minivit's
DataLoader feeds both), the same AdamW parameter groups, the same learning rate at every step (minivit's
WarmupCosine), label smoothing, gradient clipping and moving average of the weights, evaluated on the test set
after each epoch as the command does (with the recipe's test-time augmentation, mirror images and shifted
views, after the last epoch).
Wall time runs from the start of a run (data loading included) to the end of each epoch's evaluation. Writes a
Markdown table and a plot.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minivit import data, optim, train, viz  # noqa: E402


def run_minivit(preset, out, epochs=None, limit=0, dataset=None):
    cmd = [sys.executable, "-m", "minivit", "train", "--preset", preset, "--out", str(out), "--overwrite",
           "--no-progress"] + (["--epochs", str(epochs)] if epochs else []) + (["--limit", str(limit)] if limit else [])
    cmd += ["--dataset", dataset] if dataset else []
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch": r["epoch"], "wall_s": r["wall_time_s"], "test_acc": r["test_acc"]} for r in rows]


def run_pytorch(preset, epochs=None, limit=0, dataset=None):
    """The recipe of ``preset`` trained by PyTorch; one row per epoch."""
    import torch
    from minivit.testing.torch_reference import torch_vit_like
    started = time.perf_counter()
    overrides = {k: v for k, v in {"epochs": epochs, "limit": limit, "dataset": dataset}.items() if v}
    s = train.settings_for(preset, **overrides)
    ds = train.load_data(s, progress=False, val_size=s.val_size)
    info = ds.info
    loader = train.train_loader(s, ds)
    ours = train.build_model(s, info)                         # the same initial weights, copied by name
    model = torch_vit_like(ours, dtype=torch.float32)
    ema = torch_vit_like(ours, dtype=torch.float32) if s.ema else None
    no_decay = ("cls_token", "pos_embed")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in no_decay]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.lr)
    sched = optim.WarmupCosine(optim.AdamW(ours.parameters(), lr=s.lr), round(s.warmup_epochs * len(loader)),
                               s.epochs * len(loader), s.min_lr)   # gives the learning rate of each step
    test_x = torch.from_numpy(loader.normalize(ds.test_images))
    test_y = torch.from_numpy(ds.test_labels)
    background = loader.normalize(np.zeros((1, info.shape[0], 1, 1), np.uint8))          # pixel 0, normalised
    rows = []
    for epoch in range(s.epochs):
        model.train()
        for x, y in loader.epoch(epoch):
            for group in opt.param_groups:
                group["lr"] = sched.optimizer.param_groups[0]["lr"]
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y),
                                                     label_smoothing=s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                d = optim.ema_decay(s.ema, sched.last_step - 1)
                with torch.no_grad():
                    for a, p in zip(ema.parameters(), model.parameters()):
                        a.mul_(d).add_(p, alpha=1 - d)
        judged = ema or model
        judged.eval()
        final = epoch + 1 == s.epochs                  # test-time augmentation after the last epoch, as minivit
        moves = train.tta_moves(s.tta_shift if final else 0)
        with torch.no_grad():
            correct = 0
            for i in range(0, len(test_y), 256):
                x, probs = test_x[i:i + 256], 0.0
                for dy, dx in moves:
                    v = x if (dy, dx) == (0, 0) else torch.from_numpy(data.shift_images(x.numpy(), dy, dx, background))
                    for view in ([v, v.flip(-1)] if s.flip_tta and final else [v]):
                        probs = probs + torch.softmax(judged(view), dim=1)
                correct += int((probs.argmax(1) == test_y[i:i + 256]).sum())
        rows.append({"epoch": epoch + 1, "wall_s": time.perf_counter() - started, "test_acc": correct / len(test_y)})
        print(f"pytorch epoch {epoch + 1}/{s.epochs}  test acc {rows[-1]['test_acc']:.2%}  {rows[-1]['wall_s']:.0f}s",
              file=sys.stderr, flush=True)
    return rows


def table(preset, runs):
    names = list(runs)
    lines = ["| epoch | " + " | ".join(f"{n} wall (min) | {n} test acc" for n in names) + " |",
             "|" + " --- |" * (1 + 2 * len(names))]
    for i in range(max(len(r) for r in runs.values())):
        cells = []
        for n in names:
            r = runs[n][i] if i < len(runs[n]) else None
            cells += ["-", "-"] if r is None else [f"{r['wall_s'] / 60:.1f}", f"{100 * r['test_acc']:.2f}%"]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, path, title):
    fig = viz.figure(6, 4)
    ax = fig.subplots()
    for name, rows in runs.items():
        ax.plot([r["wall_s"] / 60 for r in rows], [100 * r["test_acc"] for r in rows], marker="o", label=name)
    ax.set(xlabel="wall time (minutes)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion15", choices=list(train.PRESETS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N train and test images")
    parser.add_argument("--dataset", default=None, help="another data set for the recipe (default: the preset's)")
    parser.add_argument("--only", choices=["minivit", "pytorch"], help="train one of the two")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for time-to-accuracy-<preset>.md/.png/.json (the minivit run goes to runs/)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="folder of the minivit run (default: runs/time-to-accuracy-<preset>)")
    parser.add_argument("--pytorch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pytorch_worker:
        print(json.dumps(run_pytorch(args.preset, args.epochs, args.limit, args.dataset)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.only != "pytorch":
        runs["minivit"] = run_minivit(args.preset, args.run_dir or ROOT / "runs" / f"time-to-accuracy-{args.preset}",
                                      args.epochs, args.limit, args.dataset)
    epochs = args.epochs
    if "minivit" in runs:
        epochs = runs["minivit"][-1]["epoch"]    # under a time budget, the epochs minivit measured to fit
    elif train.PRESETS[args.preset].get("minutes") and not epochs:
        parser.error(f"--only pytorch: the {args.preset} preset trains as many epochs as fit in its time budget; "
                     "give --epochs (those of the minivit run to compare with)")
    if args.only != "minivit":
        cmd = [sys.executable, __file__, "--pytorch-worker", "--preset", args.preset, "--limit", str(args.limit)]
        cmd += ["--epochs", str(epochs)] if epochs else []
        cmd += ["--dataset", args.dataset] if args.dataset else []
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,   # its progress goes to stderr
                              env={**os.environ, "MINIVIT_TUNE_MALLOC": "0"})
        import torch
        runs[f"PyTorch {torch.__version__}"] = json.loads(done.stdout.strip().splitlines()[-1])
    stem = args.out / f"time-to-accuracy-{args.preset}"
    header = (f"# {args.preset}: test accuracy against wall time, {datetime.date.today()}, {os.cpu_count()} CPU cores, "
              "each framework alone at its library defaults")
    text = header + "\n\n" + table(args.preset, runs) + "\n"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    plot(runs, stem.with_suffix(".png"), f"{args.preset}: test accuracy against wall time")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
