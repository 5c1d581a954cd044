"""Solutions to lesson 15."""


def softmax_double_backward(y, dy, v):
    """y = softmax(x) along the last axis, dy the upstream gradient of softmax's backward
    g = y * (dy - sum(dy * y)), v the upstream gradient of g -> (d sum(v * g) / dx, d sum(v * g) / d dy)."""
    s = (dy * y).sum(axis=-1, keepdims=True)
    r = (v * y).sum(axis=-1, keepdims=True)
    gy = v * (dy - s) - dy * r                       # d/dy: y in front, and y inside s
    dx = y * (gy - (gy * y).sum(axis=-1, keepdims=True))   # back through softmax's own backward
    ddy = y * (v - r)                                # softmax's backward applied to v (its Jacobian is symmetric)
    return dx, ddy
