"""Cutting images into patches and putting them back.

The math. Patchify only moves values: image (B, C, H, W) -> grid of P x P patches -> each patch flattened in
(C, P, P) order, the patches in row-major grid order. Its derivative moves the gradient back the same way, so
the backward of patchify is unpatchify and the other way round:

    x (B, C, gh*P, gw*P) -> reshape (B, C, gh, P, gw, P) -> axes (B, gh, gw, C, P, P) -> (B, gh*gw, C*P*P)

``to_patches`` and ``from_patches`` below are that one line each way, for arrays and Tensors alike: the
readable version and the fast one are the same.
"""

from minivit.function import Function


def _permute(a, axes):
    return a.permute(*axes) if hasattr(a, "permute") else a.transpose(axes)


def to_patches(x, P):
    """Shapes: x (B, C, gh*P, gw*P) -> (B, gh*gw, C*P*P), arrays or Tensors."""
    B, C, H, W = x.shape
    y = _permute(x.reshape(B, C, H // P, P, W // P, P), (0, 2, 4, 1, 3, 5))   # (B, gh, gw, C, P, P)
    return y.reshape(B, (H // P) * (W // P), C * P * P)


def from_patches(x, P, grid):
    """Shapes: x (B, gh*gw, C*P*P) -> (B, C, gh*P, gw*P), arrays or Tensors."""
    B, _, CPP = x.shape
    gh, gw = grid
    C = CPP // (P * P)
    y = _permute(x.reshape(B, gh, gw, C, P, P), (0, 3, 1, 4, 2, 5))           # (B, C, gh, P, gw, P)
    return y.reshape(B, C, gh * P, gw * P)


class PatchifyFn(Function):
    """Cut each image into non-overlapping P x P patches, each flattened in (C, P, P) order, row-major grid.

    The (C, P, P) order makes ``patchify(x) @ W.reshape(D, -1).T`` equal a Conv2d with weight W (D, C, P, P)
    and stride P.

    Shapes: x (B, C, H, W) -> y (B, H/P * W/P, C*P*P)
    """

    def forward(self, x, *, patch_size):
        self.P, self.grid = patch_size, (x.shape[2] // patch_size, x.shape[3] // patch_size)
        return to_patches(x, patch_size)

    # dx = unpatchify(dy): the same values moved back to their pixels
    def backward(self, dy):
        return (from_patches(dy, self.P, self.grid),)

    def backward_graph(self, dy):
        return (UnpatchifyFn.apply(dy, patch_size=self.P, grid=self.grid),)


class UnpatchifyFn(Function):
    """Put flattened (C, P, P) patches back into images: the inverse of ``PatchifyFn``.

    Shapes: x (B, gh*gw, C*P*P) -> y (B, C, gh*P, gw*P)
    """

    def forward(self, x, *, patch_size, grid):
        self.P = patch_size
        return from_patches(x, patch_size, grid)

    # dx = patchify(dy)
    def backward(self, dy):
        return (to_patches(dy, self.P),)

    def backward_graph(self, dy):
        return (PatchifyFn.apply(dy, patch_size=self.P),)
