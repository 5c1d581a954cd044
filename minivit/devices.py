"""Devices: NumPy always, CuPy when asked for, and moving arrays between them.

This is the only module that imports CuPy, and it does so lazily: nothing here touches CuPy until an array
or a device name asks for it, so a machine without CUDA never needs it installed.

Every op finds its array library with ``xp = get_array_module(x)`` and then writes ``xp.exp``, ``xp.zeros``, ...
so one backward serves both libraries.
"""

import numpy as np

_cupy = None


# Host <-> device copies made through this module; a training step on the GPU should add none.
transfers = {"to_device": 0, "to_host": 0}


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError(
                "device 'cuda' needs CuPy, which is not installed: pip install 'minivit[gpu]' "
                "(cupy-cuda12x) or pip install cupy-cuda13x for CUDA 13"
            ) from e
        _cupy = cupy
    return _cupy


def is_cupy_array(a):
    """True for a CuPy ndarray, decided without importing CuPy."""
    return type(a).__module__.partition(".")[0] == "cupy"


def get_array_module(*arrays):
    """The array library (``numpy`` or ``cupy``) that owns the given arrays."""
    for a in arrays:
        if is_cupy_array(a):
            return _import_cupy()
    return np


def device_of(a):
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if is_cupy_array(a) else "cpu"


def normalize_device(device):
    if device is None:
        return None
    name = str(device).lower()
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name == "gpu" or name.startswith("cuda:"):
        return "cuda"
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def cuda_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cupy = _import_cupy()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def to_device(a, device):
    """Return ``a`` as an array on ``device`` ('cpu' or 'cuda'); no copy when it is already there."""
    device = normalize_device(device)
    if device == "cuda":
        cupy = _import_cupy()
        if is_cupy_array(a):
            return a
        transfers["to_device"] += 1
        return cupy.asarray(a)
    return asnumpy(a)


def asnumpy(a):
    """A NumPy array with the values of ``a`` (copied from the GPU if it lives there)."""
    if is_cupy_array(a):
        transfers["to_host"] += 1
        return a.get()
    return np.asarray(a)


def synchronize(a):
    """Wait for the GPU to finish the work behind ``a`` (a no-op for NumPy arrays and None)."""
    if is_cupy_array(a):
        _import_cupy().cuda.get_current_stream().synchronize()


def check_same_device(arrays, op_name):
    """Raise a TypeError that names both kinds when NumPy and CuPy arrays meet in one op."""
    kinds = [device_of(a) for a in arrays]
    if len(set(kinds)) > 1:
        listing = ", ".join(f"input {i}: {type(a).__module__}.{type(a).__name__} on {k}"
                            for i, (a, k) in enumerate(zip(arrays, kinds)))
        raise TypeError(f"{op_name}: inputs live on different devices ({listing}); "
                        "move them with .to('cpu') or .to('cuda') first")
