"""The process's memory allocator: keeping freed memory for the next training step."""



def tune_malloc():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees many arrays of a few MB. By default glibc serves each from fresh pages
    (mmap) or trims the heap after freeing, so every step pays page faults to get zeroed pages again: about a
    fifth of a small ViT's step time here. Raising the mmap and trim thresholds keeps that memory in the process.
    Returns True if the settings were applied (glibc only; elsewhere it does nothing).
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)       # the largest value glibc accepts
    ok &= mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    ok &= mallopt(M_TOP_PAD, 256 * 1024 * 1024)
    return bool(ok)
