"""Solutions to lesson 1."""


def central_difference(f, x, h):
    """(f(x + h) - f(x - h)) / 2h"""
    return (f(x + h) - f(x - h)) / (2 * h)
