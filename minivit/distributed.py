"""Data-parallel training over MPI: every rank holds the whole model and works on its share of each batch.

    mpiexec -n 2 python -m minivit train ...            # two processes on this machine
    mpiexec -n 4 -f hosts python -m minivit train ...   # four, spread over the machines listed in ``hosts``

The idea in four lines. With a global batch of B images split into shards of b_r images (sum of b_r = B), the
mean loss over the batch is  L = sum_r (b_r / B) L_r,  where L_r is the mean loss of shard r. Its gradient is the
same weighted sum of the shards' gradients, so each rank scales its gradient by b_r / B and one all-reduce (a sum
over the ranks, delivered to every rank) gives every rank the gradient of the whole batch. Every rank then makes
the same optimizer step from the same weights (broadcast from rank 0 at the start), and the weights stay equal.

The gradients travel as one flat buffer per dtype (one MPI call per step, not one per tensor). Ranks are told
apart only by ``rank``: rank 0 writes the logs, metrics and checkpoints. An error on one rank must end the job
(``abort``): its partners would otherwise wait for it in the next all-reduce forever.

Without mpiexec (or with one rank) ``world()`` is a ``SingleProcess`` whose calls do nothing, so the training
loop reads the same either way. mpi4py comes with the extra ``pip install 'minivit[mpi]'``.
"""

import os
import sys
import time

import numpy as np

from minivit import devices, parallel

# Variables that the common MPI launchers set in each process they start (MPICH/Hydra, Open MPI, Slurm's PMI).
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class SingleProcess:
    """One process and no communication: what ``world()`` is without mpiexec."""
    rank, size, local_size = 0, 1, 1
    comm_seconds = 0.0

    @property
    def is_main(self):
        return self.rank == 0

    def broadcast_parameters(self, params):
        pass

    def allreduce_gradients(self, params, weight=1.0):
        pass

    def broadcast(self, obj):
        return obj

    def sum(self, values):
        """The element-wise sum over the ranks of a list of numbers."""
        return list(values)

    def abort(self, code):
        pass


class MPIGroup(SingleProcess):
    """The processes of one ``mpiexec`` job, talking through an mpi4py communicator."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()  # ranks sharing this machine's cores
        self.comm_seconds = 0.0

    def _timed(self, call, *args):
        t0 = time.perf_counter()
        result = call(*args)
        self.comm_seconds += time.perf_counter() - t0
        return result

    def broadcast_parameters(self, params):
        """Give every rank rank 0's values of ``params`` (Tensors, in place), in one flat buffer per dtype."""
        for group in _by_dtype(params):
            flat = np.concatenate([devices.asnumpy(p.data).ravel() for p in group])
            self._timed(self.comm.Bcast, flat, 0)
            _scatter(flat, group, lambda p, value: setattr(p, "data", devices.to_device(value, p.device)))

    def allreduce_gradients(self, params, weight=1.0):
        """Replace each parameter's gradient by the sum over the ranks of ``weight`` x the rank's gradient.

        With ``weight`` = this rank's share of the global batch (b_r / B) the result is the gradient of the mean
        loss over the whole batch. A parameter without a gradient on this rank counts as a zero gradient.
        """
        params = [p for p in params if p.requires_grad]
        for group in _by_dtype(params):
            flat = np.concatenate([(weight * devices.asnumpy(p.grad)).ravel() if p.grad is not None
                                   else np.zeros(p.data.size, p.dtype) for p in group])
            self._timed(self.comm.Allreduce, self.MPI.IN_PLACE, flat, self.MPI.SUM)
            _scatter(flat, group, lambda p, value: setattr(p, "grad", devices.to_device(value, p.device)))

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable object) on every rank."""
        return self._timed(self.comm.bcast, obj, 0)

    def sum(self, values):
        flat = np.asarray(values, dtype=np.float64)
        self._timed(self.comm.Allreduce, self.MPI.IN_PLACE, flat, self.MPI.SUM)
        return flat.tolist()

    def abort(self, code):
        """End every rank of the job now (after this rank has said why)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _by_dtype(params):
    """The parameters in groups of one dtype each, in their order (one buffer per group)."""
    groups = {}
    for p in params:
        groups.setdefault(np.dtype(p.dtype), []).append(p)
    return list(groups.values())


def _scatter(flat, params, assign):
    """Cut ``flat`` back into the shapes of ``params`` and hand each piece to ``assign(p, piece)``."""
    offset = 0
    for p in params:
        assign(p, flat[offset:offset + p.data.size].reshape(p.shape))
        offset += p.data.size


def launched_by_mpi():
    """Whether this process was started by an MPI launcher (mpiexec, mpirun, srun)."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


_world = None


def world():
    """The processes of this job: an MPIGroup under mpiexec with more than one rank, else a SingleProcess."""
    global _world
    if _world is None:
        _world = SingleProcess()
        if launched_by_mpi():
            try:
                from mpi4py import MPI
            except ImportError:
                raise RuntimeError("started by mpiexec, but mpi4py is not installed: pip install 'minivit[mpi]'")
            if MPI.COMM_WORLD.Get_size() > 1:
                _world = MPIGroup(MPI.COMM_WORLD)
    return _world


def shard(n, rank, size):
    """The slice of a batch of ``n`` items that rank ``rank`` of ``size`` works on: contiguous, sizes differing
    by at most one (the first ``n % size`` ranks take one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def threads_per_rank():
    """This machine's cores shared out among the ranks that run on it (all of them without mpiexec)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world().local_size)


_blas_limit = []


def set_num_threads(n=None):
    """``minivit.set_num_threads`` for a rank: ``n`` threads (default: its share of the machine's cores), and,
    when several ranks share the machine, NumPy's BLAS kept to one thread. A BLAS that starts a thread per core
    in every rank oversubscribes the cores: measured here, 2 ranks x 1 thread ran 4x slower than 1 x 2 without
    this limit and faster with it. Returns the number of threads."""
    n = parallel.set_num_threads(n or threads_per_rank())
    if world().local_size > 1 and not _blas_limit:
        from threadpoolctl import threadpool_limits
        _blas_limit.append(threadpool_limits(limits=1, user_api="blas"))
    return n


def end_job_on_error(code):
    """After a rank has reported its error: end the whole job with ``code`` (nothing to do in one process)."""
    if _world is not None:
        _world.abort(code)
