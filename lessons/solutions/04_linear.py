"""Solutions to lesson 4."""


def layer_scale_backward(x, gamma, dy):
    """x (B, N, D), gamma (D,), dy (B, N, D) -> dx (B, N, D), dgamma (D,)"""
    # y[b, n, d] = x[b, n, d] * gamma[d]: gamma was copied to every (b, n), so its gradient sums over them
    return dy * gamma, (dy * x).sum(axis=(0, 1))
