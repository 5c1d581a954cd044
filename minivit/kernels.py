"""CPU kernels: erf, erfc and the float32 GELU, and the float16 matrix product, evaluated with NumPy.

On the GPU the normal distribution's functions come from cupyx.scipy.special; on the CPU SciPy's are exact but
slow in float32, so float32 arrays get the fitted approximations below (their accuracy is stated beside each).
The ops that use them are ``minivit.ops.erf.ErfFn`` and ``minivit.ops.activation.GELUFn``.

``matmul`` is the product the linear and matmul ops run: NumPy's own, except for float16 operands on the CPU
(see its docstring); ``astype`` is the dtype conversion of mixed precision, shared out over the threads.
"""

import math

import numpy as np

from minivit.devices import get_array_module, is_cupy_array
from minivit.parallel import parallel_rows

# erf(x) ~= x P(x^2) / Q(x^2) on [-4, 4], a rational approximation fitted to minimise the relative error.
# Evaluated in float32 its error stays below 4e-7 (about 3 ulp); it is 5x faster than scipy.special.erf. It is
# used for |x| < 0.5 only: further out erf = +-(1 - erfc|x|) with erfc from _ERFC below, which stays accurate
# to the end (erf(+-4) and beyond round to exactly +-1 in float32).
_ERF_P = (1.1283791697918886, 0.1926883347311345, 0.05567128517710845, 0.004211649886721351,
          0.0004086557916471232, 6.695601502577491e-06)
_ERF_Q = (1.0, 0.5040990183965843, 0.11736978479064743, 0.016256923799364942, 0.0014147849473617577,
          7.187574017141514e-05, 2.5508169385203164e-07)


# erfc(a) = t exp(-a^2 + E(t)), t = 1 / (1 + a/2), for every a >= 0: E a polynomial of degree 9 in t, fitted here
# (least squares on Chebyshev nodes of t in (0, 1], reweighted towards minimax) to E(t) = log(erfcx(a) / t):
# relative error below 1.01e-7 for 0 <= a <= 26, where erfc underflows float64.
_ERFC_E = (-1.2655122202657105, 1.0000226613856302, 0.3741248036827946, 0.09639023624562613, -0.1839760740864289,
           0.2713780877321008, -1.1211413569328024, 1.4732925081661439, -0.8133429461408048, 0.1687642147891925)


# The same for the normal tail, with u = |x|: Phi(-u) = exp(-u^2/2) t F(t), t = 1 / (1 + u / (2 sqrt 2)), F a
# polynomial of degree 8 fitted here (weighted least squares towards minimax) to the exact
# F(t) = erfcx(u / sqrt 2) / (2 t): relative error 2e-8 for u <= 3 (1.9e-7 when evaluated in float32), 2e-6 for
# u > 3, where Phi(-u) < 1.4e-3 only ever enters as 1 - Phi(-u) (GELU's inputs below -3 take the float64 path).
_PHI_F = (0.14104766908480731, 0.141054299509148, 0.122905233569933, 0.09476464751994466, 0.004427736508243139,
          0.11093476583609914, -0.21754464021692102, 0.1291808758412, -0.026770598066513857)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

_CONVERT_BLOCK = 2 ** 16   # elements a thread converts at once (astype)


def astype(x, dtype):
    """x converted to ``dtype`` (a new array), the conversion shared out over the engine's threads on the CPU.

    NumPy converts between float16 and float32 element by element, at about 2.5 ns each on one core; mixed
    precision converts every weight and many activations in each step, so the threads share it.

    Shapes: x -> same
    """
    xp = get_array_module(x)
    if xp is not np or x.size < _CONVERT_BLOCK:
        return x.astype(dtype)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, dtype=dtype)

    def part(r):
        out[r] = flat[r]
    parallel_rows(len(flat), part, np, block=_CONVERT_BLOCK)
    return out.reshape(x.shape)


def matmul(a, b, out=None, keep_float32=False):
    """a @ b, as NumPy's ``matmul`` (``out`` as there).

    float16 operands on the CPU: NumPy has no float16 BLAS, and its own float16 loop (which converts every element
    to float32, multiplies and accumulates in float32, and rounds each output once to float16) is about 190x
    slower than a float32 product. Here the operands are converted to float32 once, multiplied by BLAS and the
    product rounded to float16 once: the same numbers up to the order of the float32 sums, and the numerics of a
    GPU's tensor cores (float16 inputs, float32 accumulation, float16 output). The price is the two conversions.
``keep_float32=True`` returns such a product unrounded, in float32: for partial sums that are added up before
the one rounding.

    Shapes: as ``numpy.matmul``: a (..., n, k), b (..., k, m) -> (..., n, m)
    """
    xp = get_array_module(a)
    if xp is not np or a.dtype != np.float16 or b.dtype != np.float16:
        return xp.matmul(a, b, out=out)
    product = np.matmul(a.astype(np.float32), b.astype(np.float32))
    if keep_float32:
        return product
    if out is None:
        return product.astype(np.float16)
    out[...] = product
    return out


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
    """erfc(a) for a >= 0 (float32 or float64), relative error below 1.01e-7 plus the rounding of a^2."""
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
