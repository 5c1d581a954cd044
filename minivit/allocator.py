"""The process's memory allocator: keeping freed memory for the next training step.

A training step allocates and frees many arrays of a few MB. With glibc's default settings each of them is
served from fresh pages (mmap) or the heap is trimmed after it is freed, so every step pays page faults to get
zeroed pages again: on the bench-preset ViT a quarter to a third of a step's time here (measured in
benchmarks/results/cpu-train-step.md). ``import minivit`` therefore calls ``tune_malloc()`` once, which raises
glibc's mmap and trim thresholds so that freed memory stays in the process for the next step. It is a
process-wide setting:

- it applies to every library in the process (NumPy code outside minivit keeps its speed or gains: measured in
  ``benchmarks/train_step.py --malloc-check``);
- the process keeps up to its largest working set of arrays under 32 MB after they are freed, rather than
  returning it to the system (arrays of 32 MB and more are still mapped and unmapped one by one);
- ``MINIVIT_TUNE_MALLOC=0`` in the environment stops ``import minivit`` from applying it, and ``restore_malloc()``
  puts glibc's documented defaults back.
"""

import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3

TUNED = {M_MMAP_THRESHOLD: 32 * 1024 * 1024,   # the largest value glibc accepts
         M_TRIM_THRESHOLD: 2 ** 31 - 1,
         M_TOP_PAD: 256 * 1024 * 1024}
# glibc's defaults (mallopt(3)); once set by hand, the mmap threshold no longer adapts to freed blocks
GLIBC_DEFAULTS = {M_MMAP_THRESHOLD: 128 * 1024, M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024}

_state = {"tuned": False}


def _mallopt():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def _apply(settings):
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all([bool(mallopt(param, value)) for param, value in settings.items()])


def tune_malloc():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    Returns True if the settings were applied (glibc only; elsewhere it does nothing and returns False).
    """
    _state["tuned"] = _apply(TUNED)
    return _state["tuned"]


def restore_malloc():
    """Put glibc's default thresholds back (undoes ``tune_malloc``); returns True if applied."""
    ok = _apply(GLIBC_DEFAULTS)
    if ok:
        _state["tuned"] = False
    return ok


def is_tuned():
    """Whether ``tune_malloc`` is in effect."""
    return _state["tuned"]


def tune_on_import():
    """What ``import minivit`` does: ``tune_malloc()`` unless ``MINIVIT_TUNE_MALLOC=0``."""
    if os.environ.get("MINIVIT_TUNE_MALLOC", "1").strip() not in ("0", "false", "no", "off"):
        tune_malloc()
