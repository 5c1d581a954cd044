"""One ViT training step, minivit against PyTorch eager, in one run.

    python benchmarks/train_step.py                      # both presets, CPU
    python benchmarks/train_step.py --preset bench --batch 128 --profile
    python benchmarks/train_step.py --device cuda        # CuPy against PyTorch CUDA

Both models get the same weights (copied through the timm-named state dict), the same images and labels and
the same number of threads (minivit's own, see minivit.set_num_threads, with NumPy's BLAS on one thread inside
them; PyTorch's intra-op threads). A step is forward, cross-entropy, backward and an AdamW update. After a
warm-up the two contenders alternate, each time a pause, an untimed step and a timed step; the table gives
medians, their ratio (in brackets the quartiles of the ratios of each minivit step to the PyTorch step after
it: how much of the ratio is the machine's noise), images/s, achieved GFLOP/s (model FLOPs counted
analytically, backward = 2x forward), that as a share of the machine's GEMM peak (a large float32 matmul timed
in the same run), and the peak memory of a step (each framework measured in a fresh subprocess).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minivit import allocator, devices, nn, optim, parallel  # noqa: E402
from minivit import functional as F  # noqa: E402

PRESETS = {
    "bench": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
                  mlp_ratio=2.0, batches=(128, 256)),
    "cifar": dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, depth=6, num_heads=3,
                  mlp_ratio=2.0, batches=(128,)),
    "vit-s16": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=12, num_heads=6,
                    mlp_ratio=4.0, batches=(64,)),
}


def model_config(preset):
    return {k: v for k, v in PRESETS[preset].items() if k != "batches"}


def forward_flops(c, batch):
    """Multiply-adds x 2 of one forward pass: patch embedding, per block qkv/proj/fc1/fc2 and the two attention
    products, and the head."""
    P, D, C = c["patch_size"], c["embed_dim"], c["in_chans"]
    Np = (c["img_size"] // P) ** 2
    N = Np + 1
    hidden = int(D * c["mlp_ratio"])
    patch = 2 * Np * C * P * P * D
    block = 2 * N * (D * 3 * D + D * D + 2 * D * hidden) + 2 * 2 * N * N * D
    head = 2 * D * c["num_classes"]
    return batch * (patch + c["depth"] * block + head)


def gemm_peak(xp, n=2048, repeats=7, warmup_s=0.5):
    """GFLOP/s of an n x n float32 matmul (the machine's practical peak for this library): the median of
    ``repeats`` products, timed after ``warmup_s`` seconds of the same products so that every core is awake."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        devices.synchronize(a @ a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = a @ a
        devices.synchronize(c)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / np.median(times) / 1e9


def make_inputs(c, batch, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, c["in_chans"], c["img_size"], c["img_size"])).astype(np.float32)
    return images, rng.integers(0, c["num_classes"], batch)


class MinivitStep:
    def __init__(self, c, images, labels, device):
        self.model = nn.VisionTransformer(**c, seed=0).to(device=device)
        self.opt = optim.AdamW(optim.param_groups_weight_decay(self.model, 0.05), lr=1e-3)
        self.images, self.labels = devices.to_device(images, device), devices.to_device(labels, device)

    def __call__(self):
        loss = F.cross_entropy(self.model(self.images), self.labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        devices.synchronize(loss.data)


class TorchStep:
    def __init__(self, model, images, labels, device):
        import torch
        from minivit.testing.torch_reference import torch_vit_like
        self.torch = torch
        self.model = torch_vit_like(model, dtype=torch.float32, device=device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1 and n not in ("cls_token", "pos_embed")]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim > 1 and n not in ("cls_token", "pos_embed"))]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                     lr=1e-3)
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.device = device

    def __call__(self):
        loss = self.torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def peak_memory_mb(framework, preset, batch, device, steps=3):
    """Peak memory of training steps, measured in a fresh subprocess (host RSS on the CPU, device memory on CUDA)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", framework, "--preset", preset,
           "--batch", str(batch), "--device", device, "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def peak_rss_mb():
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(framework, preset, batch, device, steps):
    allocator.tune_malloc()
    parallel.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    c = model_config(preset)
    images, labels = make_inputs(c, batch)
    base = peak_rss_mb()
    if framework == "minivit":
        step = MinivitStep(c, images, labels, device)
    else:
        import torch
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
        step = TorchStep(nn.VisionTransformer(**c, seed=0), images, labels, device)
    if device == "cuda":
        if framework == "minivit":
            pool = devices._import_cupy().get_default_memory_pool()
            for _ in range(steps):
                step()
            peak = pool.total_bytes() / 2 ** 20
        else:
            import torch
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                step()
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        for _ in range(steps):
            step()
        peak = peak_rss_mb() - base
    print(json.dumps({"peak_mb": peak}))


def bench(preset, batch, device, steps, warmup, with_torch, profile, pause=0.2):
    c = model_config(preset)
    images, labels = make_inputs(c, batch)
    ours = MinivitStep(c, images, labels, device)
    contenders = {"minivit": ours}
    if with_torch:
        contenders["pytorch"] = TorchStep(ours.model, images, labels, device)
    for _ in range(warmup):
        for step in contenders.values():
            step()
    times = {name: [] for name in contenders}
    for _ in range(steps):
        for name, step in contenders.items():  # alternate, so drifts in machine speed hit both
            # Worker threads of BLAS and OpenMP spin for a while after each call; a pause lets the other
            # library's threads go to sleep so that they do not compete for the cores during this step. But
            # cores left idle come back slowly (on this virtual machine the first tens of milliseconds after a
            # pause run at half speed), so an untimed step wakes them before the timed one: a steady state, as
            # in training, where steps follow each other.
            time.sleep(pause)
            step()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    flops = 3 * forward_flops(c, batch)
    result = {"preset": preset, "batch": batch}
    for name, ts in times.items():
        ms = 1e3 * float(np.median(ts))
        result[name] = {"ms": ms, "images_per_s": batch / ms * 1e3, "gflops": flops / ms / 1e6}
    if "pytorch" in times:
        # Each minivit step against the PyTorch step right after it: the quartiles of these paired ratios show
        # how much of the ratio is the machine's noise.
        paired = np.array(times["minivit"]) / np.array(times["pytorch"])
        result["paired_ratio_quartiles"] = [float(q) for q in np.percentile(paired, [25, 75])]
    if profile:
        from minivit.profile import profile_step
        result["profile"] = profile_step(ours.model, ours.images, ours.labels, ours.opt, steps=3).table()
    return result


def _cell(x, key, fmt):
    return format(x[key], fmt) if x is not None and key in x else "-"


def table_row(r, peak):
    """One markdown row: times, their ratio, images/s, GFLOP/s with the share of the GEMM peak, peak memory."""
    m, t = r["minivit"], r.get("pytorch")
    ratio = f"{m['ms'] / t['ms']:.2f}x" if t else "-"
    if "paired_ratio_quartiles" in r:
        ratio += " ({:.2f}-{:.2f})".format(*r["paired_ratio_quartiles"])

    def share(x):
        return "-" if x is None else f"{x['gflops']:.0f} ({100 * x['gflops'] / peak:.0f}%)"
    return (f"| {r['preset']} | {r['batch']} | {m['ms']:.1f} | {_cell(t, 'ms', '.1f')} | {ratio} | "
            f"{m['images_per_s']:.0f} | {_cell(t, 'images_per_s', '.0f')} | {share(m)} | {share(t)} | "
            f"{_cell(m, 'peak_mb', '.0f')} | {_cell(t, 'peak_mb', '.0f')} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), action="append",
                        help="bench (28x28, width 64), cifar (32x32, width 192), vit-s16 (224x224, width 384); "
                             "default: bench and cifar on the CPU, cifar and vit-s16 on CUDA")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default: the preset's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of rest before each timed step")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both libraries")
    parser.add_argument("--no-torch", action="store_true", help="time minivit alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", action="store_true", help="print minivit's time per op for each case")
    parser.add_argument("--json", type=str, help="also write the results to this file")
    parser.add_argument("--memory-probe", choices=["minivit", "pytorch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ["BENCH_THREADS"] = str(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.preset[0], args.batch[0], args.device, args.steps)
        return 0
    allocator.tune_malloc()
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            print("PyTorch is not installed (pip install torch==2.13.0): timing minivit alone", file=sys.stderr)
            with_torch = False
    xp = devices.get_array_module(devices.to_device(np.zeros(1), args.device))
    presets = args.preset or (["bench", "cifar"] if args.device == "cpu" else ["cifar", "vit-s16"])
    peak = gemm_peak(xp)  # with BLAS's own threads, before minivit takes it to one thread per worker
    parallel.set_num_threads(args.threads)
    device_name = platform.processor() or platform.machine()
    if args.device == "cuda":
        device_name = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print("# minivit vs PyTorch, one training step (forward, cross-entropy, backward, AdamW)")
    print(f"# {datetime.date.today()}, {device_name}, {os.cpu_count()} CPU cores, {args.threads} threads, "
          f"NumPy {np.__version__}" + (f", PyTorch {torch.__version__}" if with_torch else "")
          + f"; float32 GEMM peak {peak:.0f} GFLOP/s")
    header = ("| preset | batch | minivit ms | PyTorch ms | ratio | minivit img/s | PyTorch img/s | minivit GFLOP/s "
              "(% peak) | PyTorch GFLOP/s (% peak) | minivit peak MB | PyTorch peak MB |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    results = []
    for preset in presets:
        for batch in args.batch or PRESETS[preset]["batches"]:
            r = bench(preset, batch, args.device, args.steps, args.warmup, with_torch, args.profile, args.pause)
            if not args.no_memory:
                r["minivit"]["peak_mb"] = peak_memory_mb("minivit", preset, batch, args.device)
                if with_torch:
                    r["pytorch"]["peak_mb"] = peak_memory_mb("pytorch", preset, batch, args.device)
            results.append(r)
            print(table_row(r, peak), flush=True)
            if args.profile:
                print("\n" + r["profile"] + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm_peak_gflops": peak, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
