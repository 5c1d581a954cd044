import numpy as np
import pytest

from minivit import devices


def _backends():
    params = [pytest.param("numpy", id="numpy")]
    params.append(pytest.param("cupy", id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not devices.cuda_available(), reason="CuPy with a CUDA device is not available")]))
    return params


@pytest.fixture(params=_backends())
def xp(request):
    """The array library under test: NumPy always, CuPy where a GPU is present."""
    import importlib
    return importlib.import_module(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def to_xp(xp, *arrays):
    out = tuple(xp.asarray(a) if isinstance(a, np.ndarray) else a for a in arrays)
    return out if len(out) > 1 else out[0]
