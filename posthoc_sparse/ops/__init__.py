"""Compute operations, each with a naive fp32 reference and a fast path that tests hold equal to it.

One package per op: ``naive.py`` (the reference, its shapes documented), ``triton.py`` (the Triton kernels;
``aten.py`` for attention_lse, whose fast path is PyTorch's own cuDNN / flash attention ops) and
``__init__.py``, which says where the fast path serves (``kernels_ok``) and re-exports both paths.

    kl            the distillation KL per query row and its gradient to the gate (flash-style, no (T, T) tensor)
    rope          a "hidden" gate's rotary embedding of its raw projection, and its inverse (the gradient)
    attention_lse causal attention that also returns each row's log-sum-exp (the teacher's, for the KL)
    head_topk     per-head top-k selection and attention over the selected keys
    token_select  top-k per head or per KV group at any k (prefill), and attention over the selected keys
    mask_attention attention over the keys a per-row bitmask keeps, on key tiles (prefill at large k)
    block_sparse  block scores, block selection and attention over the selected key blocks
    decode        gated decoding: one query per sequence scores cached keys, keeps the top k, attends over them

This package is the bottom of the library: it imports nothing else of it.
"""

from __future__ import annotations

import importlib.util

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def tile_dims_ok(*dims: int) -> bool:
    """Whether the kernels take these head / gate dimensions: powers of two (``tl.arange``) of at least 16 (the
    least inner dimension of ``tl.dot`` on a GPU; the CPU interpreter takes less). Other sizes take the
    naive paths."""
    return all(n >= 16 and n & (n - 1) == 0 for n in dims)


def on_gpu(t) -> bool:
    """Whether the Triton path is chosen automatically for tensors like ``t``: CUDA, with Triton installed. (On
    the CPU the kernels run only when called directly under TRITON_INTERPRET=1, as the tests do.)"""
    return HAVE_TRITON and t.is_cuda
