"""Solutions to lesson 27."""

import numpy as np


def ring_allreduce(arrays):
    """-> a list of N arrays, each the sum of the N input arrays, by reduce-scatter then all-gather on a ring"""
    n = len(arrays)
    buffers = [np.array(a, copy=True) for a in arrays]         # each rank's own buffer
    chunks = np.array_split(np.arange(len(buffers[0])), n)
    for step in range(n - 1):                                  # reduce-scatter
        sending = [(r - step) % n for r in range(n)]           # rank r sends chunk (r - step) to rank r + 1
        messages = [buffers[r][chunks[c]].copy() for r, c in enumerate(sending)]
        for r, (c, message) in enumerate(zip(sending, messages)):
            buffers[(r + 1) % n][chunks[c]] += message
    for step in range(n - 1):                                  # all-gather: rank r finished chunk r + 1
        sending = [(r + 1 - step) % n for r in range(n)]
        messages = [buffers[r][chunks[c]].copy() for r, c in enumerate(sending)]
        for r, (c, message) in enumerate(zip(sending, messages)):
            buffers[(r + 1) % n][chunks[c]] = message
    return buffers
