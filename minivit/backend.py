"""Array backends: NumPy always, CuPy when asked for.

This is the only module that imports CuPy, and it does so lazily: nothing here touches CuPy until an array
or a device name asks for it, so a machine without CUDA never needs it installed.

Every op finds its array library with ``xp = get_array_module(x)`` and then writes ``xp.exp``, ``xp.zeros``, ...
so one backward serves both libraries.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

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


# erf(x) ~= x P(x^2) / Q(x^2) on [-4, 4], a rational approximation fitted to minimise the relative error.
# Evaluated in float32 its error stays below 4e-7 (about 3 ulp); it is 5x faster than scipy.special.erf. It is
# used for |x| < 0.5 only: further out erf = +-(1 - erfc|x|) with erfc from _ERFC below, which stays accurate
# to the end (erf(+-4) and beyond round to exactly +-1 in float32).
_ERF_P = (1.1283791697918886, 0.1926883347311345, 0.05567128517710845, 0.004211649886721351,
          0.0004086557916471232, 6.695601502577491e-06)
_ERF_Q = (1.0, 0.5040990183965843, 0.11736978479064743, 0.016256923799364942, 0.0014147849473617577,
          7.187574017141514e-05, 2.5508169385203164e-07)

# erfc(a) = t exp(-a^2 + E(t)), t = 1 / (1 + a/2), for every a >= 0, with a relative error below 1.2e-7
# (Numerical Recipes' erfcc, a Chebyshev fit).
_ERFC_E = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
           -0.82215223, 0.17087277)
# The same for the normal tail, with u = |x|: Phi(-u) = exp(-u^2/2) t F(t), t = 1 / (1 + u / (2 sqrt 2)), F a
# polynomial of degree 8 fitted here (weighted least squares towards minimax) to the exact
# F(t) = erfcx(u / sqrt 2) / (2 t): relative error 2e-8 for u <= 3 (1.9e-7 when evaluated in float32), 2e-6 for
# u > 3, where Phi(-u) < 1.4e-3 only ever enters as 1 - Phi(-u) (GELU's inputs below -3 take the float64 path).
_PHI_F = (0.14104766908480731, 0.141054299509148, 0.122905233569933, 0.09476464751994466, 0.004427736508243139,
          0.11093476583609914, -0.21754464021692102, 0.1291808758412, -0.026770598066513857)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Below -3 the rounding of u^2 / 2 in float32 costs more than a few ulp of exp(-u^2/2) (its error grows as u^2),
# so GELU computes those few inputs (0.1% of a standard normal) in float64.
GELU_TAIL = -3.0


def _horner(t, coefficients, out=None):
    """c0 + t (c1 + t (c2 + ...)), evaluated in place from the highest coefficient down."""
    value = np.multiply(t, coefficients[-1], out=out)
    for c in reversed(coefficients[1:-1]):
        value += c
        value *= t
    value += coefficients[0]
    return value


def _erf_rational(x, out=None):
    z = np.clip(x, -4.0, 4.0)
    t = z * z
    num = _horner(t, _ERF_P)
    num *= z
    return np.divide(num, _horner(t, _ERF_Q), out=out)


def _erfc_positive(a):
    """erfc(a) for a >= 0 (float32 or float64), relative error below 1.2e-7 plus the rounding of a^2."""
    t = 1.0 / (1.0 + 0.5 * a)
    with np.errstate(over="ignore", invalid="ignore"):
        return t * np.exp(_horner(t, _ERFC_E) - a * a)


def erf(x, out=None):
    """The error function, written into ``out`` when given. Exact to float64 rounding (SciPy; cupyx.scipy on the
    GPU) except for NumPy float32 arrays, which get a rational approximation near 0 and 1 - erfc further out,
    within 2e-7 of the exact value (about 2 float32 ulp) everywhere."""
    if is_cupy_array(x):
        from cupyx.scipy.special import erf as cupy_erf
        return cupy_erf(x, out=out)
    if x.dtype == np.float32:
        near = _erf_rational(x)
        a = np.minimum(np.abs(x), np.float32(10.0))
        far = np.copysign(1.0 - _erfc_positive(a), x).astype(np.float32, copy=False)
        return np.where(a < 0.5, near, far, out=out) if out is not None else np.where(a < 0.5, near, far)
    from scipy.special import erf as scipy_erf
    return scipy_erf(x, out=out)


def erfc(x, out=None):
    """The complementary error function 1 - erf(x), without the cancellation of 1 - erf for large x (SciPy;
    cupyx.scipy on the GPU)."""
    if is_cupy_array(x):
        from cupyx.scipy.special import erfc as cupy_erfc
        return cupy_erfc(x, out=out)
    from scipy.special import erfc as scipy_erfc
    return scipy_erfc(x, out=out)


def gelu_float32(x, y, grad=None):
    """GELU of a float32 array, y = x Phi(x), written into ``y``; its derivative Phi(x) + x phi(x) into ``grad``
    when given. Within about 8 ulp of the exact values over the whole float32 range (the derivative: relative to
    the size of its two terms): GELU(+inf) = +inf, GELU(x) = -0.0 below about -14 and at -inf (the limit), with
    derivative 1 at +inf and 0 at -inf.

    With u = |x|, A = Phi(-u) = exp(-u^2/2) t F(t) (see _PHI_F) and h = 1 for x > 0, 0 for x <= 0, never as
    1 - something small for x < 0:

        Phi(x) = |h - A|      (A for x < 0, 1 - A for x > 0, 1/2 at 0)
        y = x Phi(x) ;  grad = Phi(x) + x exp(-u^2/2) / sqrt(2 pi)

    Inputs below GELU_TAIL (rare in a network) are recomputed in float64; finding them is the only extra pass.
    """
    # (np.clip rather than np.maximum / np.minimum: NumPy runs it several times faster.)
    xs = np.clip(x, np.float32(-20.0), np.float32(20.0))    # Phi(-20) = 0 in float32; keeps +-inf finite here
    u = np.abs(xs)
    t = np.multiply(u, np.float32(0.5 / math.sqrt(2.0)))
    t += np.float32(1.0)
    np.divide(np.float32(1.0), t, out=t)                    # t = 1 / (1 + u / (2 sqrt 2))
    a = _horner(t, _PHI_F, out=np.empty_like(x))            # F(t)
    a *= t
    gauss = np.multiply(u, u, out=u)
    gauss *= np.float32(-0.5)
    np.exp(gauss, out=gauss)                                # exp(-u^2/2)
    a *= gauss                                              # A = Phi(-u)
    np.clip(x, np.float32(0.0), np.float32(1.0), out=t)
    np.ceil(t, out=t)                                       # h
    t -= a
    cdf = np.abs(t, out=t)                                  # Phi(x)
    with np.errstate(invalid="ignore"):                     # -inf * 0: the tail below puts the limit there
        np.multiply(x, cdf, out=y)
    if grad is not None:
        gauss *= xs
        gauss *= np.float32(_INV_SQRT_2PI)                  # x phi(x)
        np.add(cdf, gauss, out=grad)
    tail = np.less(x, np.float32(GELU_TAIL))
    if tail.any():
        _gelu_tail(x, y, grad, tail)


def _gelu_tail(x, y, grad, tail):
    """Recompute the inputs below GELU_TAIL (and -inf) in float64, where the float32 formula loses ulps."""
    idx = np.nonzero(tail)
    x64 = np.maximum(x[idx].astype(np.float64), -40.0)      # Phi(-40) = 0 in float64 too: -inf gives -0.0
    from scipy.special import erfc
    cdf = 0.5 * erfc(-x64 / math.sqrt(2.0))
    y[idx] = x64 * cdf
    if grad is not None:
        grad[idx] = cdf + x64 * np.exp(-0.5 * x64 * x64) * _INV_SQRT_2PI


def sum_last(x, keepdims=True):
    """Sum over the last axis, computed as a product with a vector of ones.

    Same result as ``x.sum(axis=-1)``, but BLAS does it several times faster than NumPy's reduction over a short
    contiguous axis (0.17 ms instead of 0.78 ms for the (128, 4, 50, 50) attention scores of a small ViT).
    """
    xp = get_array_module(x)
    s = x @ xp.ones(x.shape[-1], dtype=x.dtype)
    return s[..., None] if keepdims else s


def sum_rows(x):
    """Sum over the first axis of a 2-D array, as a product with a vector of ones (faster than ``x.sum(0)``)."""
    xp = get_array_module(x)
    return xp.ones(x.shape[0], dtype=x.dtype) @ x


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


def scatter_add(target, index, values):
    """``target[index] += values`` that adds up repeated indices (unbuffered, unlike ``+=``)."""
    if is_cupy_array(target):
        import cupyx
        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


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


_generators = {}


def default_generator(xp):
    """The library-wide random generator of ``xp`` (seeded by ``minivit.manual_seed``)."""
    if xp.__name__ not in _generators:
        _generators[xp.__name__] = xp.random.default_rng(0)
    return _generators[xp.__name__]


def manual_seed(seed):
    """Reseed the default generators used by dropout and by layers built without an explicit ``rng``."""
    _generators.clear()
    _generators["numpy"] = np.random.default_rng(seed)
    if _cupy is not None:
        _generators["cupy"] = _cupy.random.default_rng(seed)
