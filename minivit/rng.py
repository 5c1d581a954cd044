"""The library's default random generators (dropout, layers built without an explicit ``rng``)."""

import numpy as np

from minivit import devices

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
    if devices._cupy is not None:
        _generators["cupy"] = devices._cupy.random.default_rng(seed)
