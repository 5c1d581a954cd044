"""Mixed precision on this backend: time and peak memory of one training step, float32 against --amp.

    python benchmarks/amp_step.py --preset bench --batch 32 --steps 3

Each mode runs in a fresh subprocess (so that its peak memory is its own): the ViT of train_step.py's preset, one
step = forward, cross-entropy, backward, AdamW, as ``minivit train`` runs it (under ``autocast`` with a
``GradScaler`` for AMP). Prints a Markdown table: median step time (min-max), images/s, peak memory of the steps
(host RSS above what the process held before the model was built; on CUDA, CuPy's pool).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minivit import allocator, amp, devices, nn, optim, parallel  # noqa: E402
from minivit import functional as F  # noqa: E402
from train_step import make_inputs, model_config, peak_rss_mb  # noqa: E402


def probe(args):
    """One mode in this process: print {"times": [...], "peak_mb": ...}."""
    allocator.tune_malloc()
    parallel.set_num_threads(args.threads)
    c = model_config(args.preset)
    images, labels = make_inputs(c, args.batch)
    images, labels = devices.to_device(images, args.device), devices.to_device(labels, args.device)
    base = peak_rss_mb()
    model = nn.VisionTransformer(**c, seed=0).to(device=args.device)
    opt = optim.AdamW(optim.param_groups_weight_decay(model, 0.05), lr=1e-3)
    scaler = amp.GradScaler(enabled=args.probe == "amp")
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with amp.autocast(enabled=args.probe == "amp"):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        devices.synchronize(loss.data)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = devices._import_cupy().get_default_memory_pool().total_bytes() / 2**20
    else:
        peak = peak_rss_mb() - base
    print(json.dumps({"times": times, "peak_mb": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--probe", choices=["float32", "amp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args)
    print(f"| {args.preset}, batch {args.batch}, {args.device}, {args.threads} threads | step ms (min-max) | img/s "
          "| peak MB |\n|---|---|---|---|")
    for mode in ("float32", "amp"):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--probe", mode]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        t = np.array(r["times"]) * 1e3
        print(f"| {mode} | {np.median(t):.0f} ({t.min():.0f}-{t.max():.0f}) | {args.batch / np.median(t) * 1e3:.0f} "
              f"| {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
