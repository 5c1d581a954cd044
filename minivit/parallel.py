"""Parallel execution: minivit's heavy ops cut their rows into blocks and run them on every core.

By default the engine uses every core it may run on (shared out among the ranks under ``mpiexec``, or
``MINIVIT_NUM_THREADS`` when set); ``set_num_threads(1)`` gives a single-threaded engine. ``parallel_rows`` is
what an op calls to share its rows out over the threads.

NumPy's BLAS starts threads of its own, and those spin on the cores for a while after each call: inside one of
our parallel sections they would take the cores from our threads. So while a section runs, NumPy's BLAS is held
at one thread, and its setting is put back when the section ends: NumPy code outside minivit keeps its BLAS
threads.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_threads = {"n": None, "pool": None, "blas": None}
_blas_lock = threading.Lock()


def default_num_threads():
    """``MINIVIT_NUM_THREADS`` if set, else the cores this process may run on, shared out among the ranks that
    ``mpiexec`` started on this machine (MPICH's ``MPI_LOCALNRANKS``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``)."""
    if os.environ.get("MINIVIT_NUM_THREADS"):
        return max(1, int(os.environ["MINIVIT_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or "1"
    return max(1, cores // max(1, int(ranks)))


def set_num_threads(n=None):
    """Run minivit's heavy ops on ``n`` CPU threads (``default_num_threads()`` when None; 1 turns it off).

    Each op then cuts its rows (tokens, images) into ``n`` blocks and works on them at once: NumPy releases the
    interpreter lock inside its loops and BLAS calls, so the threads really run in parallel, and the elementwise
    work that NumPy does on one core uses them all. Returns ``n``.
    """
    n = default_num_threads() if n is None else max(1, int(n))
    if _threads["pool"] is not None:
        _threads["pool"].shutdown(wait=False)
    _threads["n"] = n
    _threads["pool"] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="minivit") if n > 1 else None
    return n


def get_num_threads():
    """The number of threads the heavy ops use (settles the default on first call)."""
    if _threads["n"] is None:
        set_num_threads()
    return _threads["n"]


def _numpy_blas():
    """threadpoolctl's controller of the BLAS that NumPy links (None if there is none it can control)."""
    if _threads["blas"] is None:
        from threadpoolctl import ThreadpoolController
        found = [lib for lib in ThreadpoolController().lib_controllers
                 if lib.user_api == "blas" and "numpy" in lib.filepath]
        _threads["blas"] = found[0] if found else False
    return _threads["blas"] or None


class _BlasOnOneThread:
    """NumPy's BLAS on one thread for the duration of a parallel section, its setting restored afterwards
    (a few microseconds each way). Sections running at once in several threads share one hold."""
    holders = 0
    before = 1

    def __enter__(self):
        blas = _numpy_blas()
        with _blas_lock:
            if blas is not None and _BlasOnOneThread.holders == 0:
                _BlasOnOneThread.before = blas.get_num_threads()
                if _BlasOnOneThread.before > 1:
                    blas.set_num_threads(1)
            _BlasOnOneThread.holders += 1

    def __exit__(self, *exc):
        blas = _numpy_blas()
        with _blas_lock:
            _BlasOnOneThread.holders -= 1
            if blas is not None and _BlasOnOneThread.holders == 0 and _BlasOnOneThread.before > 1:
                blas.set_num_threads(_BlasOnOneThread.before)


def parallel_rows(n_rows, body, xp=np, block=None):
    """Call ``body(rows)`` for blocks of ``range(n_rows)`` (as slices), the blocks shared out over the threads;
    return the results in order.

    ``body`` writes its rows of the outputs in place and may return a partial result (a sum over its rows) for
    the caller to add up. Each thread takes one run of rows, cut into blocks of at most ``block`` rows when given
    (so that a block's temporaries stay in the core's cache). With one thread, or CuPy arrays (``xp`` is cupy),
    it is a single call on all rows.
    """
    if xp.__name__ != "numpy" or n_rows == 0:
        return [body(slice(0, n_rows))]

    def run(lo, hi):
        step = max(1, hi - lo if block is None else block)
        return [body(slice(i, min(i + step, hi))) for i in range(lo, hi, step)]
    parts = min(get_num_threads(), n_rows)
    if parts < 2:
        return run(0, n_rows)
    edges = [n_rows * i // parts for i in range(parts + 1)]
    with _BlasOnOneThread():
        futures = [_threads["pool"].submit(run, lo, hi) for lo, hi in zip(edges[1:-1], edges[2:])]
        return run(edges[0], edges[1]) + [r for f in futures for r in f.result()]
