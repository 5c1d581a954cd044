"""Run a few data-parallel training steps and save the weights: the script behind tests/test_distributed.py.

    mpiexec -n 2 python tests/mpi/train_steps.py OUT.npz --dtype float64 --steps 4 --batch 24

Every rank builds the same small ViT, takes its shard of each global batch (minivit.distributed.shard), averages
the gradients over the ranks and makes an AdamW (or SGD) step with gradient clipping, as ``minivit train`` does. Rank 0
writes the final weights. With ``--fail-rank R`` rank R raises an error at the second step instead.
"""

import argparse

import numpy as np

from minivit import distributed, nn, optim
from minivit import functional as F


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    world = distributed.world()
    model = nn.VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2,
                                 num_heads=2, mlp_ratio=2.0, seed=world.rank)  # different seeds: the broadcast
    model.to(dtype=args.dtype)                                                # must make them equal
    world.broadcast_parameters(model.parameters())
    opt = (optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05) if args.optimizer == "adamw"
           else optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    rng = np.random.default_rng(0)  # the same global batches on every rank
    try:
        for step in range(args.steps):
            x = rng.standard_normal((args.batch, 1, 8, 8)).astype(args.dtype)
            y = rng.integers(0, 3, args.batch)
            if step == 1 and world.rank == args.fail_rank:
                raise RuntimeError(f"rank {world.rank} failed on purpose")
            part = distributed.shard(args.batch, world.rank, world.size)
            loss = F.cross_entropy(model(x[part]), y[part])
            opt.zero_grad()
            loss.backward()
            world.allreduce_gradients(model.parameters(), (part.stop - part.start) / args.batch)
            optim.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    except Exception as err:
        print(f"rank {world.rank}: {err}", flush=True)
        distributed.end_job_on_error(1)
        raise
    if world.is_main:
        np.savez(args.out, **{k: v for k, v in model.state_dict().items()})


if __name__ == "__main__":
    main()
