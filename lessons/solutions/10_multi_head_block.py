"""Solutions to lesson 10."""


def split_heads(qkv, num_heads):
    """qkv (B, N, 3D) -> q, k, v each (B, nh, N, hd)"""
    B, N, three_d = qkv.shape
    hd = three_d // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    return q, k, v
