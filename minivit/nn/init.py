"""Parameter initialisation, done on the host with a NumPy Generator so that a seed means the same weights
on every machine and backend; the values are then moved to the parameter's device."""

import numpy as np

from minivit import devices, rng


def _fill(p, values):
    p.data = devices.to_device(np.asarray(values, dtype=p.dtype), p.device)


def default_rng():
    """The library's host generator (seeded by ``minivit.manual_seed``), for layers built without ``rng``."""
    return rng.default_generator(np)


def trunc_normal_(p, std, rng, a=-2.0, b=2.0):
    """Normal(0, std^2) values, those outside [a, b] drawn again (timm's bounds: +-2 in absolute terms)."""
    values = rng.standard_normal(p.shape) * std
    outside = (values < a) | (values > b)
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum())) * std
        outside = (values < a) | (values > b)
    _fill(p, values)


def normal_(p, std, rng):
    _fill(p, rng.standard_normal(p.shape) * std)


def uniform_(p, bound, rng):
    """Uniform values in [-bound, bound)."""
    _fill(p, rng.uniform(-bound, bound, p.shape))


def zeros_(p):
    _fill(p, np.zeros(p.shape))


def ones_(p):
    _fill(p, np.ones(p.shape))


def sincos_2d(embed_dim, grid, temperature=10000.0):
    """Fixed 2-D sine-cosine position embedding, (gh * gw, embed_dim), rows in patch order.

    A quarter of the channels hold sin and cos of the row index at geometric frequencies, a quarter of the
    column index likewise: [sin(r w), cos(r w), sin(c w), cos(c w)], w_i = temperature^(-i / (D/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    quarter = embed_dim // 4
    omega = temperature ** (-np.arange(quarter) / quarter)                  # (D/4,)
    r = rows.reshape(-1, 1) * omega                                          # (gh*gw, D/4)
    c = cols.reshape(-1, 1) * omega
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)
