"""Triton kernels (each beside its naive PyTorch reference)."""


def tile_dims_ok(*dims: int) -> bool:
    """Whether the kernels take these head / gate dimensions: powers of two (``tl.arange``) of at least 16 (the
    least inner dimension of ``tl.dot`` on a GPU; the CPU interpreter takes less). Other sizes take the
    reference paths."""
    return all(n >= 16 and n & (n - 1) == 0 for n in dims)
