"""Cutting images into patches and putting them back."""

from minivit.function import Function


class PatchifyFn(Function):
    """Cut each image into non-overlapping P x P patches, each flattened in (C, P, P) order, row-major grid.

    The (C, P, P) order makes ``patchify(x) @ W.reshape(D, -1).T`` equal a Conv2d with weight W (D, C, P, P)
    and stride P.

    Shapes: x (B, C, H, W) -> y (B, H/P * W/P, C*P*P)
    """

    def forward(self, x, *, patch_size):
        B, C, H, W = x.shape
        P = patch_size
        self.x_shape, self.P = x.shape, P
        y = x.reshape(B, C, H // P, P, W // P, P)  # (B, C, gh, P, gw, P)
        y = y.transpose(0, 2, 4, 1, 3, 5)           # (B, gh, gw, C, P, P)
        return y.reshape(B, (H // P) * (W // P), C * P * P)

    # dx = unpatchify(dy): the same values moved back to their pixels
    def backward(self, dy):
        B, C, H, W = self.x_shape
        P = self.P
        dx = dy.reshape(B, H // P, W // P, C, P, P).transpose(0, 3, 1, 4, 2, 5)  # (B, C, gh, P, gw, P)
        return (dx.reshape(B, C, H, W),)

    def backward_graph(self, dy):
        B, C, H, W = self.x_shape
        return (UnpatchifyFn.apply(dy, patch_size=self.P, grid=(H // self.P, W // self.P)),)


class UnpatchifyFn(Function):
    """Put flattened (C, P, P) patches back into images: the inverse of ``PatchifyFn``.

    Shapes: x (B, gh*gw, C*P*P) -> y (B, C, gh*P, gw*P)
    """

    def forward(self, x, *, patch_size, grid):
        B, Np, CPP = x.shape
        P = patch_size
        gh, gw = grid
        C = CPP // (P * P)
        self.x_shape, self.P = x.shape, P
        y = x.reshape(B, gh, gw, C, P, P).transpose(0, 3, 1, 4, 2, 5)  # (B, C, gh, P, gw, P)
        return y.reshape(B, C, gh * P, gw * P)

    # dx = patchify(dy)
    def backward(self, dy):
        B, C, H, W = dy.shape
        P = self.P
        dx = dy.reshape(B, C, H // P, P, W // P, P).transpose(0, 2, 4, 1, 3, 5)
        return (dx.reshape(self.x_shape),)

    def backward_graph(self, dy):
        return (PatchifyFn.apply(dy, patch_size=self.P),)
