"""Parallel execution: minivit's heavy ops cut their rows into blocks and run them on every core.

``set_num_threads(n)`` turns it on (the ``minivit`` command does so for every core); ``parallel_rows`` is what an
op calls to share its rows out over the threads.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_threads = {"n": 1, "pool": None, "blas_limit": None}


def set_num_threads(n=None):
    """Run minivit's heavy ops on ``n`` CPU threads (all cores when None; 1 turns it off, the default).

    Each op then cuts its rows (tokens, images) into ``n`` blocks and works on them at once: NumPy releases the
    interpreter lock inside its loops and BLAS calls, so the threads really run in parallel, and the elementwise
    work that NumPy does on one core uses them all. NumPy's own BLAS is set to one thread meanwhile (with
    threadpoolctl), because its idle worker threads spin on the cores for a while after each call and would take
    them from ours. Other libraries' BLAS (PyTorch's, say) are left alone.
    """
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = max(1, int(n))
    if _threads["blas_limit"] is not None:
        _threads["blas_limit"].restore_original_limits()
        _threads["blas_limit"] = None
    if n > 1:
        from threadpoolctl import ThreadpoolController
        numpy_blas = [lib.filepath for lib in ThreadpoolController().lib_controllers
                      if lib.user_api == "blas" and "numpy" in lib.filepath]
        if numpy_blas:
            _threads["blas_limit"] = ThreadpoolController().select(filepath=numpy_blas).limit(limits=1)
    if _threads["pool"] is not None:
        _threads["pool"].shutdown(wait=False)
    _threads["n"] = n
    _threads["pool"] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="minivit") if n > 1 else None
    return n


def get_num_threads():
    return _threads["n"]


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
    parts = min(_threads["n"], n_rows)
    if parts < 2:
        return run(0, n_rows)
    edges = [n_rows * i // parts for i in range(parts + 1)]
    futures = [_threads["pool"].submit(run, lo, hi) for lo, hi in zip(edges[1:-1], edges[2:])]
    return run(edges[0], edges[1]) + [r for f in futures for r in f.result()]
