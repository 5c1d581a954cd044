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

Without MPI, ``minivit train --processes N`` runs the same job on one machine: the command starts N - 1 copies
of itself (``start_processes``) and the ranks talk through pipes (``LocalGroup``). On a CPU whose cores one
process cannot keep busy (much of a step is NumPy work on one core at a time), N processes of one thread each do
more images per second than one process of N threads.

Without either (or with one rank) ``world()`` is a ``SingleProcess`` whose calls do nothing, so the training
loop reads the same either way. mpi4py comes with the extra ``pip install 'minivit[mpi]'``.
"""

import os
import pickle
import site
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minivit import devices, parallel

# Variables that the common MPI launchers set in each process they start (MPICH/Hydra, Open MPI, Slurm's PMI).
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")

# Seconds an MPI rank waits before ending the job: rank 0 for its message to reach the launcher, another rank for
# rank 0 to end the job with its own report first (see MPIGroup.abort).
ABORT_PAUSE_S = 0.5
ABORT_GRACE_S = 5.0


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

    def finish(self):
        """At the end of a job that went well: wait for the other ranks (nothing to do in one process)."""


class Group(SingleProcess):
    """What every group of several ranks does, built on two ways of moving a flat NumPy buffer that each kind of
    group provides: ``_from_main(flat)`` (rank 0's values to every rank) and ``_sum_in_place(flat)`` (the sum over
    the ranks, on every rank). Both replace ``flat``'s values in place and count their time in ``comm_seconds``."""

    def broadcast_parameters(self, params):
        """Give every rank rank 0's values of ``params`` (Tensors, in place), in one flat buffer per dtype."""
        for group in _by_dtype(params):
            flat = self._from_main(np.concatenate([devices.asnumpy(p.data).ravel() for p in group]))
            _scatter(flat, group, lambda p, value: setattr(p, "data", devices.to_device(value, p.device)))

    def allreduce_gradients(self, params, weight=1.0):
        """Replace each parameter's gradient by the sum over the ranks of ``weight`` x the rank's gradient.

        With ``weight`` = this rank's share of the global batch (b_r / B) the result is the gradient of the mean
        loss over the whole batch. A parameter without a gradient on this rank counts as a zero gradient.
        """
        params = [p for p in params if p.requires_grad]
        for group in _by_dtype(params):
            flat = self._sum_in_place(np.concatenate([(weight * devices.asnumpy(p.grad)).ravel()
                                                      if p.grad is not None else np.zeros(p.data.size, p.dtype)
                                                      for p in group]))
            _scatter(flat, group, lambda p, value: setattr(p, "grad", devices.to_device(value, p.device)))

    def sum(self, values):
        return self._sum_in_place(np.array(values, dtype=np.float64)).tolist()


class MPIGroup(Group):
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

    def _from_main(self, flat):
        self._timed(self.comm.Bcast, flat, 0)
        return flat

    def _sum_in_place(self, flat):
        self._timed(self.comm.Allreduce, self.MPI.IN_PLACE, flat, self.MPI.SUM)
        return flat

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable object) on every rank."""
        return self._timed(self.comm.bcast, obj, 0)

    def abort(self, code):
        """End every rank of the job (after this rank has said why).

        The launcher stops every process at once, and what a rank has printed but the launcher not yet read is
        lost, so each rank waits a moment for its words to leave. A rank other than 0 waits longer: the same
        Ctrl-C (or the same bad flag) has usually reached rank 0 too, whose report says what the run saved and
        whose abort then ends this rank. Only when rank 0 does not end the job (it waits in a collective call for
        this rank) does this rank end it. A second Ctrl-C cuts the wait short.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            time.sleep(ABORT_PAUSE_S if self.rank == 0 else ABORT_GRACE_S)
        except KeyboardInterrupt:
            pass
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
    """The processes of this job: an MPIGroup under mpiexec with more than one rank, a LocalGroup in a process that
    ``start_processes`` started, else a SingleProcess."""
    global _world
    if _world is None:
        _world = SingleProcess()
        if RANK_VARIABLE in os.environ:
            _world = LocalGroup.joined()
        elif launched_by_mpi():
            try:
                from mpi4py import MPI
            except ImportError:
                raise RuntimeError("started by mpiexec, but mpi4py is not installed: pip install 'minivit[mpi]'")
            if MPI.COMM_WORLD.Get_size() > 1:
                _world = MPIGroup(MPI.COMM_WORLD)
    return _world


# ------------------------------------------------------------------------ several processes on one machine, no MPI
# What start_processes tells each process it starts: its rank, the number of ranks, and its two pipes to rank 0.
RANK_VARIABLE, SIZE_VARIABLE, PIPES_VARIABLE = "MINIVIT_RANK", "MINIVIT_WORLD_SIZE", "MINIVIT_PIPES"
_HEADER = struct.Struct("<Q")  # every message starts with its length in bytes


class PartnerLost(RuntimeError):
    """Another rank of the job ended (saying why on its own, above) while this one was waiting for it."""


class LocalGroup(Group):
    """The processes of one job on one machine, joined by pipes: rank 0 (the process that ran the command) has a
    pipe to and a pipe from every other rank.

    A sum travels in to rank 0, which adds the ranks' buffers in rank order, and the total travels back out, so
    every rank holds the same bits; a broadcast travels out from rank 0. Nothing is shared but the pipes: a rank
    that ends for any reason closes them, and a partner waiting on one reads the end of the file and stops with
    PartnerLost instead of waiting forever.
    """

    def __init__(self, rank, size, links, children=()):
        self.rank, self.size, self.local_size = rank, size, size
        self.links = links              # rank 0: {rank: (read_fd, write_fd)} for every other rank; others: {0: ...}
        self.children = list(children)  # rank 0: the processes it started (subprocess.Popen)
        self.comm_seconds = 0.0

    @classmethod
    def joined(cls):
        """This process's place in a job that ``start_processes`` started (read from its environment)."""
        # popped: the processes that this one starts are not part of the job
        rank, size = int(os.environ.pop(RANK_VARIABLE)), int(os.environ.pop(SIZE_VARIABLE))
        read_fd, write_fd = (int(fd) for fd in os.environ.pop(PIPES_VARIABLE).split(","))
        for fd in (read_fd, write_fd):
            os.set_inheritable(fd, False)
        return cls(rank, size, {0: (read_fd, write_fd)})

    # -- messages: a length, then the bytes
    def _send(self, rank, payload):
        """Write ``payload`` (bytes or an array) to ``rank``'s pipe, after its length."""
        fd, view = self.links[rank][1], memoryview(payload).cast("B")
        try:
            os.write(fd, _HEADER.pack(len(view)))
            while len(view):
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            raise PartnerLost(f"rank {rank} of {self.size} has ended; rank {self.rank} stops too") from None

    def _receive(self, rank, into=None):
        """The next message from ``rank``: into the array ``into`` (which it must fill exactly), or as bytes."""
        fd = self.links[rank][0]
        (n,) = _HEADER.unpack(self._read(rank, fd, bytearray(_HEADER.size)))
        buffer = bytearray(n) if into is None else into
        if into is not None and into.nbytes != n:
            raise PartnerLost(f"rank {rank} sent {n} bytes where rank {self.rank} expected {into.nbytes}: the ranks "
                              "are not running the same model")
        return self._read(rank, fd, buffer)

    def _read(self, rank, fd, buffer):
        """Fill ``buffer`` from the pipe ``fd`` (a read may return part of it); PartnerLost at the end of the file."""
        view, got = memoryview(buffer).cast("B"), 0
        while got < len(view):
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise PartnerLost(f"rank {rank} of {self.size} ended before rank {self.rank} had its message "
                                  "(its own error, if it had one, is above)")
            got += n
        return buffer

    def _send_to_all(self, payload):
        """Rank 0: the same message to every other rank."""
        for rank in sorted(self.links):
            self._send(rank, payload)

    def _sum_in_place(self, flat):
        """Replace ``flat`` by its sum over the ranks: rank 0 adds them in rank order and sends the total back."""
        t0 = time.perf_counter()
        if self.rank == 0:
            part = np.empty_like(flat)
            for rank in sorted(self.links):
                flat += self._receive(rank, part)
            self._send_to_all(flat)
        else:
            self._send(0, flat)
            self._receive(0, flat)
        self.comm_seconds += time.perf_counter() - t0
        return flat

    def _from_main(self, flat):
        """Rank 0's values of ``flat`` on every rank (in place)."""
        t0 = time.perf_counter()
        if self.rank == 0:
            self._send_to_all(flat)
        else:
            self._receive(0, flat)
        self.comm_seconds += time.perf_counter() - t0
        return flat

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank. It travels pickled, as in mpi4py's ``bcast``: between the processes of
        one job, which this process started or was started by, never from a file."""
        t0 = time.perf_counter()
        if self.rank == 0:
            self._send_to_all(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            obj = pickle.loads(self._receive(0))
        self.comm_seconds += time.perf_counter() - t0
        return obj

    def _close(self):
        """Close this rank's pipe ends: a partner still waiting on them reads the end of the file."""
        for read_fd, write_fd in self.links.values():
            for fd in (read_fd, write_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.links = {}

    def abort(self, code):
        """End the job now: rank 0 stops the ranks it started; another rank closes its pipes, which rank 0 reads
        as the end of the job."""
        sys.stdout.flush()
        sys.stderr.flush()
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for child in self.children:
            child.wait()
        self._close()
        _forget_world()

    def finish(self):
        """At the end of a job that went well: rank 0 waits for the other ranks to end, and an error if one failed."""
        self._close()
        failed = [(rank, child.wait()) for rank, child in enumerate(self.children, start=1)]
        _forget_world()
        failed = [(rank, code) for rank, code in failed if code != 0]
        if failed:
            raise PartnerLost(", ".join(f"rank {rank} ended with exit code {code}" for rank, code in failed))


# A pipe holds 64 KiB on Linux unless asked for more: a gradient of 1.2 MB (a ViT of 300k parameters) then crosses
# it in about twenty hand-offs between writer and reader. At 1 MiB (what any process may ask for; the limit is
# /proc/sys/fs/pipe-max-size) it takes two: an all-reduce of 1.2 MB between two ranks measured 0.8-1.1 ms instead
# of 3.4-4.0.
PIPE_BYTES = 1 << 20


def pipe():
    """``os.pipe()`` holding ``PIPE_BYTES`` where the system allows it (Linux), its default elsewhere."""
    read_fd, write_fd = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass                                   # not Linux, or a lower limit: the default size works, more slowly
    return read_fd, write_fd


def start_processes(n, command):
    """Make this process rank 0 of ``n`` on this machine: start ranks 1 .. n-1 as ``python command...`` (the
    command this process runs: ``["-m", "minivit", "train", ...]`` or ``["script.py", ...]``), each joined to this
    one by two pipes, and return the LocalGroup. This process's threads become its share of the cores.

    Each rank then runs the command as it would under mpiexec: its share of every batch, one all-reduce per step;
    rank 0 alone writes. The other ranks run in a process group of their own, so Ctrl-C in the terminal reaches
    rank 0 alone: it stops at the next step, keeps what the run has saved, and ends them.
    """
    global _world
    if world().size > 1:
        raise RuntimeError(f"this process is already rank {world().rank} of {world().size}")
    package_root = str(Path(__file__).resolve().parents[1])  # the children import this minivit, wherever it is
    if package_root in site.getsitepackages() + [site.getusersitepackages()]:
        package_root = None                                    # installed: found there anyway, after the stdlib
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    links, children = {}, []
    try:
        for rank in range(1, n):
            down_read, down_write = pipe()     # rank 0 -> rank
            up_read, up_write = pipe()         # rank -> rank 0
            env = {**os.environ, RANK_VARIABLE: str(rank), SIZE_VARIABLE: str(n),
                   PIPES_VARIABLE: f"{down_read},{up_write}"}
            if path:
                env["PYTHONPATH"] = path
            links[rank] = (up_read, down_write)
            try:
                children.append(subprocess.Popen([sys.executable, *command], env=env, process_group=0,
                                                 pass_fds=(down_read, up_write)))
            finally:
                os.close(down_read)
                os.close(up_write)
    except BaseException:
        LocalGroup(0, n, links, children).abort(1)
        raise
    _world = LocalGroup(0, n, links, children)
    set_num_threads()
    return _world


def _forget_world():
    """After a LocalGroup has ended: this process is a world of one again, with its threads and BLAS as before."""
    global _world
    _world = None
    while _blas_limit:
        _blas_limit.pop().restore_original_limits()
    parallel.set_num_threads()


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


def finish_job():
    """After the command has done its work: rank 0 of a LocalGroup waits for the other ranks."""
    if _world is not None:
        _world.finish()
