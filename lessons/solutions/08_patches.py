"""Solutions to lesson 8."""


def patchify(images, P):
    """(B, C, H, W) -> (B, H/P * W/P, C*P*P)"""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // P, P, W // P, P).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // P) * (W // P), C * P * P)


def patchify_backward(dy, image_shape, P):
    """dy (B, Np, C*P*P) -> d images (B, C, H, W)"""
    B, C, H, W = image_shape
    return dy.reshape(B, H // P, W // P, C, P, P).transpose(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
