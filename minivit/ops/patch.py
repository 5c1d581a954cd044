"""Cutting images into patches and putting them back.

The math. Patchify only moves values: image (B, C, H, W) -> grid of P x P patches -> each patch flattened in
(C, P, P) order, the patches in row-major grid order. Its derivative moves the gradient back the same way, so
the backward of patchify is unpatchify and the other way round:

    x (B, C, gh*P, gw*P) -> reshape (B, C, gh, P, gw, P) -> axes (B, gh, gw, C, P, P) -> (B, gh*gw, C*P*P)

``to_patches`` and ``from_patches`` below are that one line each way, for arrays and Tensors alike: the
readable version and the fast one are the same.

Overlapping windows (unfold, also called im2col). Windows of side k taken every s pixels (the stride) from the
image with p zeros added on each side, each window flattened in (C, k, k) order, windows in row-major grid order:

    xpad = x with p zeros on each side of H and W                          (B, C, H+2p, W+2p)
    y[b, r*gw + c, (ch, i, j)] = xpad[b, ch, r*s + i, c*s + j]             (B, gh*gw, C*k*k)
        for r < gh, c < gw, i < k, j < k,   gh = (H + 2p - k)//s + 1,  gw = (W + 2p - k)//s + 1,
        the window's entries (ch, i, j) at ch*k*k + i*k + j

With k == s and p == 0 this is patchify. Every output is one input pixel (or a padding zero), so unfold is
linear, y = U x, and its derivative is the adjoint U^T, called fold (col2im): each window's gradient is added
back into the pixels it was cut from, a pixel inside several windows gets the sum of their gradients, and the
padding is cropped off:

    dxpad[b, ch, r*s + i, c*s + j] += dy[b, r*gw + c, (ch, i, j)]          for every r, c, i, j
    dx = dxpad[:, :, p:p+H, p:p+W]                                         (B, C, H, W)

A pixel that no window reaches (the last rows or columns when the windows do not end at the edge, or the gaps
when k < s) gets a zero gradient.

For one kernel offset (i, j) the pixels r*s + i, c*s + j of all windows form one strided slice,
xpad[:, :, i::s, j::s] cut to gh x gw, so both directions are k*k slices: copied out (unfold) or added back
(fold). Fold is the backward of unfold and unfold the backward of fold, as for patchify and unpatchify.
"""

from minivit.devices import get_array_module
from minivit.function import Function
from minivit.ops.shape import IndexAddFn, StackFn


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


# ---------------------------------------------------------------------------------- overlapping windows
def window_grid(image_size, kernel_size, stride, padding):
    """(gh, gw): how many windows fit down and across the padded image."""
    H, W = image_size
    return (H + 2 * padding - kernel_size) // stride + 1, (W + 2 * padding - kernel_size) // stride + 1


def _offset_index(i, j, grid, stride):
    """Index of the pixel at offset (i, j) inside every window: a (gh, gw) strided slice of the padded image."""
    gh, gw = grid
    return (slice(None), slice(None), slice(i, i + stride * (gh - 1) + 1, stride),
            slice(j, j + stride * (gw - 1) + 1, stride))


def _inside_padding(image_size, padding):
    """Index of the image inside its padded copy."""
    H, W = image_size
    return (slice(None), slice(None), slice(padding, padding + H), slice(padding, padding + W))


# ------------------------------------------------------------------------------------------ readable version
def unfold_composed(x, kernel_size, stride, padding):
    """Overlapping windows from primitives (zero padding, strided slices, stack, reshape, permute).

    Shapes: x (B, C, H, W) -> (B, gh*gw, C*k*k)
    """
    B, C, H, W = x.shape
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    xpad = IndexAddFn.apply(x, index=_inside_padding((H, W), p), shape=(B, C, H + 2 * p, W + 2 * p))  # zero border
    pieces = [xpad[_offset_index(i, j, (gh, gw), s)] for i in range(k) for j in range(k)]  # k*k of (B, C, gh, gw)
    y = StackFn.apply(*pieces, axis=2).reshape(B, C, k, k, gh, gw)
    return y.permute(0, 4, 5, 1, 2, 3).reshape(B, gh * gw, C * k * k)       # (B, gh, gw, C, k, k) flattened


def fold_composed(x, image_size, kernel_size, stride, padding):
    """Windows added back into images (overlaps summed, padding cropped), from primitives.

    Shapes: x (B, gh*gw, C*k*k) -> (B, C, H, W)
    """
    H, W = image_size
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    B, C = x.shape[0], x.shape[2] // (k * k)
    windows = x.reshape(B, gh, gw, C, k, k).permute(0, 3, 4, 5, 1, 2)         # (B, C, k, k, gh, gw)
    padded_shape = (B, C, H + 2 * p, W + 2 * p)
    xpad = None
    for i in range(k):
        for j in range(k):
            piece = IndexAddFn.apply(windows[:, :, i, j], index=_offset_index(i, j, (gh, gw), s), shape=padded_shape)
            xpad = piece if xpad is None else xpad + piece
    return xpad[_inside_padding((H, W), p)]


# ---------------------------------------------------------------------------------------------- the ops
def unfold_windows(x, kernel_size, stride, padding):
    """The unfold on arrays: k*k strided slices copied out.  Shapes: x (B, C, H, W) -> (B, gh*gw, C*k*k)"""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    xpad = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
    xpad[_inside_padding((H, W), p)] = x
    y = xp.empty((B, C, k, k, gh, gw), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            y[:, :, i, j] = xpad[_offset_index(i, j, (gh, gw), s)]
    return y.transpose(0, 4, 5, 1, 2, 3).reshape(B, gh * gw, C * k * k)


def fold_windows(x, image_size, kernel_size, stride, padding):
    """The fold on arrays: k*k strided slices added back.  Shapes: x (B, gh*gw, C*k*k) -> (B, C, H, W)"""
    xp = get_array_module(x)
    H, W = image_size
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    B, C = x.shape[0], x.shape[2] // (k * k)
    windows = x.reshape(B, gh, gw, C, k, k).transpose(0, 3, 4, 5, 1, 2)     # (B, C, k, k, gh, gw)
    xpad = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            xpad[_offset_index(i, j, (gh, gw), s)] += windows[:, :, i, j]   # one slice holds no pixel twice
    return xpad[_inside_padding((H, W), p)]


class UnfoldFn(Function):
    """Cut each image into windows of side k every s pixels, after p zeros of padding on each side; each window
    flattened in (C, k, k) order, windows in row-major grid order (``torch.nn.functional.unfold``, transposed).

    The (C, k, k) order makes ``unfold(x) @ W.reshape(D, -1).T`` equal a Conv2d with weight W (D, C, k, k),
    stride s and padding p.

    Shapes: x (B, C, H, W) -> y (B, gh*gw, C*k*k),  gh = (H + 2p - k)//s + 1,  gw = (W + 2p - k)//s + 1
    """

    def forward(self, x, *, kernel_size, stride, padding):
        self.settings = dict(image_size=tuple(x.shape[2:]), kernel_size=kernel_size, stride=stride, padding=padding)
        return unfold_windows(x, kernel_size, stride, padding)

    # dx = fold(dy): every window's gradient added back into its pixels, overlaps summed, padding cropped
    def backward(self, dy):
        return (fold_windows(dy, **self.settings),)

    def backward_graph(self, dy):
        return (FoldFn.apply(dy, **self.settings),)


class FoldFn(Function):
    """Add windows back into images: the adjoint of ``UnfoldFn`` (overlapping pixels get the sum, padding is
    cropped). Not its inverse where windows overlap: fold(unfold(x)) counts each pixel once per window holding it.

    Shapes: x (B, gh*gw, C*k*k) -> y (B, C, H, W)
    """

    def forward(self, x, *, image_size, kernel_size, stride, padding):
        self.settings = dict(kernel_size=kernel_size, stride=stride, padding=padding)
        return fold_windows(x, image_size, kernel_size, stride, padding)

    # dx = unfold(dy): each window reads back the gradient of the pixels it was added to
    def backward(self, dy):
        return (unfold_windows(dy, **self.settings),)

    def backward_graph(self, dy):
        return (UnfoldFn.apply(dy, **self.settings),)
