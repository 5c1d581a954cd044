"""Data-parallel scaling: images/s of training steps on N ranks, and the share of the time spent communicating.

    python benchmarks/data_parallel.py --threads 2                 # 1 rank x 2 threads
    mpiexec -n 2 python benchmarks/data_parallel.py --threads 1    # 2 ranks x 1 thread, over MPI
    python -m minivit.launch -n 2 benchmarks/data_parallel.py --threads 1   # the same over minivit's pipes

The model, global batch and step are those of train_step.py's preset (forward, cross-entropy, backward, AdamW);
under mpiexec each rank runs its shard of the global batch and the gradients are all-reduced as in
``minivit train``. Rank 0 prints one JSON line: median step time, images/s, and the median share of a step spent
communicating (which includes waiting for the slower rank).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minivit import distributed, nn, optim  # noqa: E402
from minivit import functional as F  # noqa: E402
from train_step import make_inputs, model_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks)")
    args = parser.parse_args()
    world = distributed.world()
    threads = distributed.set_num_threads(args.threads)
    c = model_config(args.preset)
    images, labels = make_inputs(c, args.batch)
    part = distributed.shard(args.batch, world.rank, world.size)
    images, labels, share = images[part], labels[part], (part.stop - part.start) / args.batch
    model = nn.VisionTransformer(**c, seed=0)
    world.broadcast_parameters(model.parameters())
    opt = optim.AdamW(optim.param_groups_weight_decay(model, 0.05), lr=1e-3)
    times, comm = [], []
    for step in range(args.warmup + args.steps):
        world.sum([0])  # start the step together
        t0, c0 = time.perf_counter(), world.comm_seconds
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        world.allreduce_gradients(model.parameters(), share)
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            comm.append((world.comm_seconds - c0) / times[-1])
    if world.is_main:
        step_s = float(np.median(times))
        print(json.dumps({"preset": args.preset, "global_batch": args.batch, "ranks": world.size,
                          "launcher": type(world).__name__,
                          "threads_per_rank": threads, "step_s": step_s, "images_per_s": args.batch / step_s,
                          "step_s_quartiles": np.percentile(times, [25, 75]).tolist(),
                          "comm_share": float(np.median(comm))}))


if __name__ == "__main__":
    main()
