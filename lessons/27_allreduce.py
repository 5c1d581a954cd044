"""Lesson 27 with two real processes: each rank computes the gradient of its shard of one batch, a single
all-reduce sums the weighted gradients, and every rank ends up holding the gradient of the whole batch.

    mpiexec -n 2 python lessons/27_allreduce.py

Rank 0 then computes the gradient of the whole batch in one process, as a check, and prints the largest difference.
The batch has 11 images, so the two shards have 6 and 5: each rank weights its gradient by its share b_r / B.
The exit status is 0 when the two gradients agree to 1e-12 (relative to the largest gradient entry).
"""

import sys

import numpy as np

try:
    from mpi4py import MPI
except ImportError:
    sys.exit("27_allreduce.py needs mpi4py and an MPI runtime: pip install mpi4py mpich (or 'minivit[mpi]')")
from threadpoolctl import threadpool_limits

from minivit import nn
from minivit import functional as F
from minivit.distributed import shard

BATCH = 11


def make_model(seed):
    """The small ViT of lesson 27, in float64 so that the comparison can be tight."""
    return nn.VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=2,
                                num_heads=2, mlp_ratio=2.0, seed=seed).double()


def flat_gradient(model, images, labels, weight=1.0):
    """``weight`` x the gradient of the mean loss on (images, labels), as one flat float64 array."""
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    return np.concatenate([weight * p.grad.ravel() for p in model.parameters()])


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    # 1. Every rank makes its own model, seeded by its rank: different weights. One broadcast of a flat buffer
    #    gives every rank rank 0's weights, as minivit.distributed does at the start of a run.
    model = make_model(seed=rank)
    params = model.parameters()
    weights = np.concatenate([p.data.ravel() for p in params])
    comm.Bcast(weights, root=0)
    offset = 0
    for p in params:
        p.data = weights[offset:offset + p.data.size].reshape(p.shape).copy()
        offset += p.data.size

    # 2. The same global batch on every rank (one generator, one seed); each rank takes its contiguous shard.
    data = np.random.default_rng(0)
    images, labels = data.standard_normal((BATCH, 1, 16, 16)), data.integers(0, 4, BATCH)
    mine = shard(BATCH, rank, size)
    share = (mine.stop - mine.start) / BATCH

    # 3. The gradient of this shard's mean loss, weighted by the shard's share of the batch, summed over the ranks.
    with threadpool_limits(limits=1, user_api="blas"):      # two ranks share the cores: one BLAS thread each
        gradient = flat_gradient(model, images[mine], labels[mine], weight=share)
        comm.Allreduce(MPI.IN_PLACE, gradient, op=MPI.SUM)

        # 4. Rank 0 checks the result against one process working on the whole batch.
        lines = comm.gather(f"rank {rank} of {size}: images {mine.start}-{mine.stop - 1} "
                            f"({mine.stop - mine.start} of {BATCH}), weight {share:.4f}", root=0)
        agree = None
        if rank == 0:
            whole = flat_gradient(model, images, labels)
            difference = float(np.abs(gradient - whole).max())
            agree = difference <= 1e-12 * float(np.abs(whole).max())
            print("\n".join(lines))
            print(f"all-reduced gradient of {gradient.size} numbers against the whole batch in one process: "
                  f"max difference {difference:.3e} (largest entry {np.abs(whole).max():.3e}): "
                  + ("equal to rounding" if agree else "NOT EQUAL"), flush=True)
    return 0 if comm.bcast(agree, root=0) else 1


if __name__ == "__main__":
    sys.exit(main())
