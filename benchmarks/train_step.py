"""One ViT training step, minivit against PyTorch, as users run them.

    python benchmarks/train_step.py                      # bench and cifar presets, CPU, separate processes
    python benchmarks/train_step.py --preset bench --batch 128 --profile
    python benchmarks/train_step.py --paired             # both in one process, alternating steps
    python benchmarks/train_step.py --malloc-check       # NumPy code outside minivit, with and without minivit
    python benchmarks/train_step.py --device cuda        # CuPy against PyTorch CUDA

A step is forward, cross-entropy, backward and an AdamW update; both models get the same weights (copied through
the timm-named state dict), images and labels.

Default mode: each framework runs alone in a fresh process at its library defaults (``import minivit`` and
nothing else; PyTorch with its default threads), steps back to back as in a training loop; the processes
alternate (minivit, PyTorch, minivit, ...) for ``--rounds`` rounds so that drifts of the machine's speed hit
both. The table gives the median of the steady-state steps (after ``--warmup`` steps) with the quartiles in
brackets, their ratio (in brackets the lowest and highest ratio of the rounds' medians), images/s, achieved
GFLOP/s (model FLOPs counted analytically, backward = 2x forward) as a share of the machine's GEMM peak (a large
float32 matmul at NumPy's defaults), and the peak memory of the steps in the same processes (resident memory
above what the process held before it built the model). A second row for the first preset times minivit set up
as the ``minivit`` command sets itself up (``minivit.cli.setup_process``), against the import-only process.

``--paired`` keeps the older mode: both frameworks in one process with the same threads, alternating single
steps, each after a pause and an untimed step.
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

from minivit import devices, nn, optim, parallel  # noqa: E402
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


def worker(framework, setup, preset, batch, device, steps, warmup):
    """One contender alone in this process: ``warmup + steps`` steps back to back; prints the step times (ms) and
    the peak memory as JSON. ``setup``: 'defaults' (nothing but the import) or 'cli' (as the minivit command)."""
    if setup == "cli":
        from minivit import cli
        cli.setup_process()
    c = model_config(preset)
    images, labels = make_inputs(c, batch)
    base = peak_rss_mb()
    if framework == "minivit":
        step = MinivitStep(c, images, labels, device)
    else:
        step = TorchStep(nn.VisionTransformer(**c, seed=0), images, labels, device)
    if device == "cuda" and framework == "pytorch":
        import torch
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    if device == "cuda":
        if framework == "minivit":
            peak = devices._import_cupy().get_default_memory_pool().total_bytes() / 2 ** 20
        else:
            import torch
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = peak_rss_mb() - base
    threads = parallel.get_num_threads() if framework == "minivit" else step.torch.get_num_threads()
    print(json.dumps({"ms": times[warmup:], "peak_mb": peak, "threads": threads}))


def run_worker(framework, setup, preset, batch, device, steps, warmup):
    """Start a fresh process for one contender and return what it measured."""
    env = dict(os.environ)
    if framework == "pytorch":
        env["MINIVIT_TUNE_MALLOC"] = "0"   # PyTorch at its own defaults: minivit only lends it the weights
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--setup", setup, "--preset", preset,
           "--batch", str(batch), "--device", device, "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"the {framework} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(times, batch, flops):
    ms = float(np.median(times))
    q1, q3 = (float(q) for q in np.percentile(times, [25, 75]))
    return {"ms": ms, "q1": q1, "q3": q3, "images_per_s": batch / ms * 1e3, "gflops": flops / ms / 1e6}


def bench_separate(preset, batch, device, steps, warmup, rounds, with_torch, setups=("defaults",)):
    """Each contender in its own fresh processes, alternating, ``rounds`` processes each."""
    c = model_config(preset)
    contenders = [("minivit", setup) for setup in setups] + ([("pytorch", "defaults")] if with_torch else [])
    runs = {k: [] for k in contenders}
    for _ in range(rounds):
        for framework, setup in contenders:
            runs[(framework, setup)].append(run_worker(framework, setup, preset, batch, device, steps, warmup))
    flops = 3 * forward_flops(c, batch)
    result = {"preset": preset, "batch": batch}
    for (framework, setup), done in runs.items():
        key = framework if setup == "defaults" else f"{framework}-{setup}"
        result[key] = summary([t for r in done for t in r["ms"]], batch, flops)
        result[key]["peak_mb"] = max(r["peak_mb"] for r in done)
        result[key]["threads"] = done[0]["threads"]
        result[key]["round_medians"] = [float(np.median(r["ms"])) for r in done]
    if with_torch:
        ratios = [a / b for a, b in zip(result["minivit"]["round_medians"], result["pytorch"]["round_medians"])]
        result["ratio_range"] = [min(ratios), max(ratios)]
    return result


def bench_paired(preset, batch, device, steps, warmup, with_torch, profile, pause=0.2):
    """Both contenders in this process, alternating single steps, each after a pause and an untimed step."""
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
        for name, step in contenders.items():
            # Worker threads of BLAS and OpenMP spin for a while after each call; a pause lets the other
            # library's threads go to sleep so that they do not compete for the cores during this step. Cores
            # left idle come back slowly (here the first tens of milliseconds after a pause run at half speed),
            # so an untimed step wakes them before the timed one.
            time.sleep(pause)
            step()
            t0 = time.perf_counter()
            step()
            times[name].append(1e3 * (time.perf_counter() - t0))
    flops = 3 * forward_flops(c, batch)
    result = {"preset": preset, "batch": batch}
    for name, ts in times.items():
        result[name] = summary(ts, batch, flops)
    if "pytorch" in times:
        # each minivit step against the PyTorch step right after it: how much of the ratio is the machine's noise
        paired = np.array(times["minivit"]) / np.array(times["pytorch"])
        result["ratio_range"] = [float(q) for q in np.percentile(paired, [25, 75])]
    if profile:
        from minivit.profile import profile_step
        result["profile"] = profile_step(ours.model, ours.images, ours.labels, ours.opt, steps=3).table()
    return result


def _cell(x, key, fmt):
    return format(x[key], fmt) if x is not None and key in x else "-"


def _ms(x):
    return "-" if x is None else f"{x['ms']:.1f} ({x['q1']:.0f}-{x['q3']:.0f})"


def table_row(r, peak, name="minivit", reference="pytorch", label=None):
    """One markdown row: times, their ratio, images/s, GFLOP/s with the share of the GEMM peak, peak memory."""
    m, t = r[name], r.get(reference)
    ratio = f"{m['ms'] / t['ms']:.2f}x" if t else "-"
    if t and "ratio_range" in r and reference == "pytorch":
        ratio += " ({:.2f}-{:.2f})".format(*r["ratio_range"])

    def share(x):
        return "-" if x is None else f"{x['gflops']:.0f} ({100 * x['gflops'] / peak:.0f}%)"
    return (f"| {label or r['preset']} | {r['batch']} | {_ms(m)} | {_ms(t)} | {ratio} | "
            f"{m['images_per_s']:.0f} | {_cell(t, 'images_per_s', '.0f')} | {share(m)} | {share(t)} | "
            f"{_cell(m, 'peak_mb', '.0f')} | {_cell(t, 'peak_mb', '.0f')} |")


NUMPY_WORKLOAD = """
import os, sys, time, json
import numpy as np
if os.environ.get("WITH_MINIVIT") == "1":
    import minivit  # noqa: F401
rng = np.random.default_rng(0)
a = rng.standard_normal((1024, 1024)).astype(np.float32)
def work():
    x = rng.standard_normal((128, 64, 256)).astype(np.float32)     # 8 MB arrays: the sizes a training step frees
    y = np.tanh(x) * 2.0 + x ** 2
    z = (y.reshape(-1, 256) @ y.reshape(-1, 256)[:256].T).sum()
    s = np.sort(x, axis=-1)
    return float(z) + float(s[0, 0, 0]) + float((a @ a)[0, 0])
times = []
for i in range(60):
    t0 = time.perf_counter(); work(); times.append(time.perf_counter() - t0)
print(json.dumps({"ms": float(np.median(times[10:])) * 1e3}))
"""


def malloc_check(rounds=3):
    """NumPy code that never calls minivit, in processes that import minivit (its allocator setting) and in
    processes that do not, alternating; the medians of each and their ratio."""
    got = {"without": [], "with": []}
    for _ in range(rounds):
        for key, flag in (("without", "0"), ("with", "1")):
            out = subprocess.run([sys.executable, "-c", NUMPY_WORKLOAD], capture_output=True, text=True, check=True,
                                 env={**os.environ, "WITH_MINIVIT": flag}).stdout
            got[key].append(json.loads(out.strip().splitlines()[-1])["ms"])
    print("# NumPy code outside minivit (8 MB elementwise arrays, a sort, matmuls), ms per iteration, median of "
          f"50 iterations per process, {rounds} processes each")
    print(f"without import minivit: {' '.join(f'{t:.1f}' for t in got['without'])}")
    print(f"with import minivit:    {' '.join(f'{t:.1f}' for t in got['with'])}")
    print(f"ratio (with / without, medians): {np.median(got['with']) / np.median(got['without']):.2f}")
    return got


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), action="append",
                        help="bench (28x28, width 64), cifar (32x32, width 192), vit-s16 (224x224, width 384); "
                             "default: bench and cifar on the CPU, cifar and vit-s16 on CUDA")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default: the preset's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process (per contender: --paired)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="processes per contender, alternating")
    parser.add_argument("--paired", action="store_true", help="both in this process, alternating single steps")
    parser.add_argument("--pause", type=float, default=0.2, help="--paired: seconds of rest before each step")
    parser.add_argument("--threads", type=int, help="--paired: threads for both libraries (default: every core)")
    parser.add_argument("--no-torch", action="store_true", help="time minivit alone")
    parser.add_argument("--no-cli-row", action="store_true", help="skip the row of minivit set up as its command")
    parser.add_argument("--malloc-check", action="store_true", help="time NumPy code with and without minivit")
    parser.add_argument("--profile", action="store_true", help="--paired: print minivit's time per op")
    parser.add_argument("--json", type=str, help="also write the results to this file")
    parser.add_argument("--worker", choices=["minivit", "pytorch"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", choices=["defaults", "cli"], default="defaults", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, args.setup, args.preset[0], args.batch[0], args.device, args.steps, args.warmup)
        return 0
    if args.malloc_check:
        malloc_check()
        return 0
    with_torch = not args.no_torch
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed (pip install torch==2.13.0): timing minivit alone", file=sys.stderr)
        with_torch = False
    xp = devices.get_array_module(devices.to_device(np.zeros(1), args.device))
    presets = args.preset or (["bench", "cifar"] if args.device == "cpu" else ["cifar", "vit-s16"])
    peak = gemm_peak(xp)  # NumPy's BLAS at its defaults
    device_name = platform.processor() or platform.machine()
    if args.device == "cuda":
        device_name = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    if args.paired:
        threads = args.threads or parallel.default_num_threads()
        parallel.set_num_threads(threads)
        if with_torch:
            torch.set_num_threads(threads)
        how = (f"both in one process, {threads} threads each, alternating steps after a {args.pause} s pause and an "
               f"untimed step, {args.steps} steps each")
    else:
        how = (f"each alone in fresh processes at its library defaults, {args.rounds} alternating processes each, "
               f"{args.steps} steps back to back after {args.warmup} untimed ones")
    print("# minivit vs PyTorch, one training step (forward, cross-entropy, backward, AdamW): " + how)
    print(f"# {datetime.date.today()}, {device_name}, {os.cpu_count()} CPU cores, NumPy {np.__version__}"
          + (f", PyTorch {torch.__version__}" if with_torch else "") + f"; float32 GEMM peak {peak:.0f} GFLOP/s")
    header = ("| preset | batch | minivit ms (quartiles) | PyTorch ms (quartiles) | ratio (range) | minivit img/s | "
              "PyTorch img/s | minivit GFLOP/s (% peak) | PyTorch GFLOP/s (% peak) | minivit peak MB | "
              "PyTorch peak MB |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    results, cli_row = [], None
    for preset in presets:
        for batch in args.batch or PRESETS[preset]["batches"]:
            if args.paired:
                r = bench_paired(preset, batch, args.device, args.steps, args.warmup, with_torch, args.profile,
                                 args.pause)
            else:
                setups = ("defaults",) if args.no_cli_row or results else ("defaults", "cli")
                r = bench_separate(preset, batch, args.device, args.steps, args.warmup, args.rounds, with_torch,
                                   setups)
                if "minivit-cli" in r:
                    cli_row = r
            results.append(r)
            print(table_row(r, peak), flush=True)
            if args.profile and "profile" in r:
                print("\n" + r["profile"] + "\n")
    if cli_row is not None:
        m, c = cli_row["minivit"], cli_row["minivit-cli"]
        print(f"\n# {cli_row['preset']}, batch {cli_row['batch']}: minivit after `import minivit` only "
              f"({m['threads']} threads) {m['ms']:.1f} ms ({m['q1']:.0f}-{m['q3']:.0f}); set up as the `minivit` "
              f"command ({c['threads']} threads) {c['ms']:.1f} ms ({c['q1']:.0f}-{c['q3']:.0f}); "
              f"import-only / command = {m['ms'] / c['ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm_peak_gflops": peak, "how": how, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
