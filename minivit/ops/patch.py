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

Channels last. A convolutional stem keeps its feature maps as (B, H, W, C), one row of C channels per pixel
(what a linear layer over the pixels gives). Its windows are flattened in (i, j, ch) order:

    y[b, r*gw + c, (i, j, ch)] = xpad[b, r*s + i, c*s + j, ch]             (B, gh*gw, k*k*C)

the same numbers as above in another order, so ``unfold(x) @ W.permute(0, 2, 3, 1).reshape(D, -1).T`` is the same
Conv2d. Each of the k*k slice copies then moves whole runs of C contiguous numbers, and the windows come out
contiguous, ready for the product; in the (C, k, k) order they come out transposed, and the product's forward
and backward each copy them again.
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


def _spatial(rows, cols, channels_last):
    """An index of rows and columns of (B, C, H, W) images, or of (B, H, W, C) ones with ``channels_last``."""
    return (slice(None), rows, cols) if channels_last else (slice(None), slice(None), rows, cols)


def _offset_index(i, j, grid, stride, channels_last=False):
    """Index of the pixel at offset (i, j) inside every window: a (gh, gw) strided slice of the padded image."""
    gh, gw = grid
    return _spatial(slice(i, i + stride * (gh - 1) + 1, stride), slice(j, j + stride * (gw - 1) + 1, stride),
                    channels_last)


def _inside_padding(image_size, padding, channels_last=False):
    """Index of the image inside its padded copy."""
    H, W = image_size
    return _spatial(slice(padding, padding + H), slice(padding, padding + W), channels_last)


def _image_size(x, channels_last):
    """(H, W) of (B, C, H, W) images, or of (B, H, W, C) ones with ``channels_last``."""
    return tuple(x.shape[1:3]) if channels_last else tuple(x.shape[2:])


# ------------------------------------------------------------------------------------------ readable version
def unfold_composed(x, kernel_size, stride, padding, channels_last=False):
    """Overlapping windows from primitives (zero padding, strided slices, stack, reshape, permute).

    Shapes: x (B, C, H, W) -> (B, gh*gw, C*k*k); channels_last: x (B, H, W, C) -> (B, gh*gw, k*k*C)
    """
    if channels_last:                                   # the (C, k, k) windows of x (B, C, H, W), reordered
        B, H, W, C = x.shape
        y = unfold_composed(_permute(x, (0, 3, 1, 2)), kernel_size, stride, padding)    # (B, gh*gw, C*k*k)
        n, kk = y.shape[1], kernel_size * kernel_size
        return _permute(y.reshape(B, n, C, kk), (0, 1, 3, 2)).reshape(B, n, kk * C)
    B, C, H, W = x.shape
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    xpad = IndexAddFn.apply(x, index=_inside_padding((H, W), p), shape=(B, C, H + 2 * p, W + 2 * p))  # zero border
    pieces = [xpad[_offset_index(i, j, (gh, gw), s)] for i in range(k) for j in range(k)]  # k*k of (B, C, gh, gw)
    y = StackFn.apply(*pieces, axis=2).reshape(B, C, k, k, gh, gw)
    return y.permute(0, 4, 5, 1, 2, 3).reshape(B, gh * gw, C * k * k)       # (B, gh, gw, C, k, k) flattened


def fold_composed(x, image_size, kernel_size, stride, padding, channels_last=False):
    """Windows added back into images (overlaps summed, padding cropped), from primitives.

    Shapes: x (B, gh*gw, C*k*k) -> (B, C, H, W); channels_last: x (B, gh*gw, k*k*C) -> (B, H, W, C)
    """
    H, W = image_size
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    B, C = x.shape[0], x.shape[2] // (k * k)
    if channels_last:                                   # reordered to (C, k, k) windows, folded, channels moved last
        x = _permute(x.reshape(B, gh * gw, k * k, C), (0, 1, 3, 2)).reshape(B, gh * gw, C * k * k)
        return _permute(fold_composed(x, image_size, k, s, p), (0, 2, 3, 1))
    windows = x.reshape(B, gh, gw, C, k, k).permute(0, 3, 4, 5, 1, 2)         # (B, C, k, k, gh, gw)
    padded_shape = (B, C, H + 2 * p, W + 2 * p)
    xpad = None
    for i in range(k):
        for j in range(k):
            piece = IndexAddFn.apply(windows[:, :, i, j], index=_offset_index(i, j, (gh, gw), s), shape=padded_shape)
            xpad = piece if xpad is None else xpad + piece
    return xpad[_inside_padding((H, W), p)]


# ---------------------------------------------------------------------------------------------- the ops
def unfold_windows(x, kernel_size, stride, padding, channels_last=False):
    """The unfold on arrays: k*k strided slices copied out.

    Shapes: x (B, C, H, W) -> (B, gh*gw, C*k*k); channels_last: x (B, H, W, C) -> (B, gh*gw, k*k*C), contiguous
    """
    xp = get_array_module(x)
    k, s, p = kernel_size, stride, padding
    H, W = _image_size(x, channels_last)
    gh, gw = window_grid((H, W), k, s, p)
    if channels_last:
        B, C = x.shape[0], x.shape[3]
        xpad = xp.zeros((B, H + 2 * p, W + 2 * p, C), dtype=x.dtype)
        y = xp.empty((B, gh, gw, k, k, C), dtype=x.dtype)
    else:
        B, C = x.shape[:2]
        xpad = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
        y = xp.empty((B, C, k, k, gh, gw), dtype=x.dtype)
    xpad[_inside_padding((H, W), p, channels_last)] = x
    lead = (slice(None),) * (3 if channels_last else 2)                     # the axes before y's (i, j)
    for i in range(k):
        for j in range(k):
            y[lead + (i, j)] = xpad[_offset_index(i, j, (gh, gw), s, channels_last)]
    if channels_last:
        return y.reshape(B, gh * gw, k * k * C)
    return y.transpose(0, 4, 5, 1, 2, 3).reshape(B, gh * gw, C * k * k)


def fold_windows(x, image_size, kernel_size, stride, padding, channels_last=False):
    """The fold on arrays: k*k strided slices added back.

    Shapes: x (B, gh*gw, C*k*k) -> (B, C, H, W); channels_last: x (B, gh*gw, k*k*C) -> (B, H, W, C)
    """
    xp = get_array_module(x)
    H, W = image_size
    k, s, p = kernel_size, stride, padding
    gh, gw = window_grid((H, W), k, s, p)
    B, C = x.shape[0], x.shape[2] // (k * k)
    if channels_last:
        windows = x.reshape(B, gh, gw, k, k, C)
        xpad = xp.zeros((B, H + 2 * p, W + 2 * p, C), dtype=x.dtype)
    else:
        windows = x.reshape(B, gh, gw, C, k, k).transpose(0, 3, 4, 5, 1, 2)   # (B, C, k, k, gh, gw)
        xpad = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=x.dtype)
    lead = (slice(None),) * (3 if channels_last else 2)                     # the axes before windows' (i, j)
    for i in range(k):
        for j in range(k):
            xpad[_offset_index(i, j, (gh, gw), s, channels_last)] += windows[lead + (i, j)]  # no pixel twice
    return xpad[_inside_padding((H, W), p, channels_last)]


class UnfoldFn(Function):
    """Cut each image into windows of side k every s pixels, after p zeros of padding on each side; each window
    flattened in (C, k, k) order, windows in row-major grid order (``torch.nn.functional.unfold``, transposed).
    With ``channels_last`` the images are (B, H, W, C) and each window is flattened in (k, k, C) order.

    The (C, k, k) order makes ``unfold(x) @ W.reshape(D, -1).T`` equal a Conv2d with weight W (D, C, k, k),
    stride s and padding p; the (k, k, C) order pairs with ``W.permute(0, 2, 3, 1).reshape(D, -1)``.

    Shapes: x (B, C, H, W) -> y (B, gh*gw, C*k*k),  gh = (H + 2p - k)//s + 1,  gw = (W + 2p - k)//s + 1
            channels_last: x (B, H, W, C) -> y (B, gh*gw, k*k*C)
    """

    def forward(self, x, *, kernel_size, stride, padding, channels_last=False):
        self.settings = dict(image_size=_image_size(x, channels_last), kernel_size=kernel_size, stride=stride,
                             padding=padding, channels_last=channels_last)
        return unfold_windows(x, kernel_size, stride, padding, channels_last)

    # dx = fold(dy): every window's gradient added back into its pixels, overlaps summed, padding cropped
    def backward(self, dy):
        return (fold_windows(dy, **self.settings),)

    def backward_graph(self, dy):
        return (FoldFn.apply(dy, **self.settings),)


class FoldFn(Function):
    """Add windows back into images: the adjoint of ``UnfoldFn`` (overlapping pixels get the sum, padding is
    cropped). Not its inverse where windows overlap: fold(unfold(x)) counts each pixel once per window holding it.

    Shapes: x (B, gh*gw, C*k*k) -> y (B, C, H, W); channels_last: x (B, gh*gw, k*k*C) -> y (B, H, W, C)
    """

    def forward(self, x, *, image_size, kernel_size, stride, padding, channels_last=False):
        self.settings = dict(kernel_size=kernel_size, stride=stride, padding=padding, channels_last=channels_last)
        return fold_windows(x, image_size, kernel_size, stride, padding, channels_last)

    # dx = unfold(dy): each window reads back the gradient of the pixels it was added to
    def backward(self, dy):
        return (unfold_windows(dy, **self.settings),)

    def backward_graph(self, dy):
        return (UnfoldFn.apply(dy, **self.settings),)
