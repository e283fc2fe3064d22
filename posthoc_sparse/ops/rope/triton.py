"""The Triton kernel of a "hidden" gate's rotary embedding (and its gradient); ``naive.py`` is its twin.

Letters: B batch (or L layers times B sequences), T tokens, H query heads, d gate dim.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None


if triton is not None:

    @triton.jit
    def _gate_rope(A, G, C, S, F, KD, POS, sab, sat, sah, sg0, sgb, sgh, sgt, scb, sct, skb, skh, sks, n_tab, per_f,
                   H, T, n_keys, scale, HALF: tl.constexpr, BLOCK_T: tl.constexpr, ROPE: tl.constexpr,
                   INVERSE: tl.constexpr, INTO: tl.constexpr):
        # A: the raw projection (B, T, 2H, d) (queries in heads 0..H-1, keys after); G: (2, B, H, T, d); C, S:
        # the model's rotary tables (n_tab, T, rotary_dim) (sequence b uses b % n_tab), of which the gate uses
        # columns F (sequence b uses row b // per_f of F, (rows, d/2)).
        # Forward: G = rotary(A) * scale. INVERSE: A = rotary^T(G) * scale, the gradient through the rotation.
        # INTO: the keys go to a static key cache KD (B, H, n_keys, d) at positions *POS + t (those past its end
        # dropped), not to G[1].
        pid_t = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // (2 * H)
        h2 = bh % (2 * H)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, HALF)
        m = offs_t[:, None] < T
        a = A + b * sab + h2 * sah + offs_t[:, None] * sat + offs_c[None, :]
        g = G + (h2 // H) * sg0 + b * sgb + (h2 % H) * sgh + offs_t[:, None] * sgt + offs_c[None, :]
        src, dst = (g, a) if INVERSE else (a, g)
        if INTO:
            if h2 >= H:
                pos = tl.load(POS) + offs_t
                dst = KD + b.to(tl.int64) * skb + (h2 - H).to(tl.int64) * skh + pos[:, None] * sks + offs_c[None, :]
                m = m & (pos[:, None] < n_keys)
        x1 = tl.load(src, mask=offs_t[:, None] < T, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=offs_t[:, None] < T, other=0.0).to(tl.float32)
        if ROPE:
            tab = (b % n_tab) * scb + offs_t[:, None] * sct + tl.load(F + (b // per_f) * HALF + offs_c)[None, :]
            c = tl.load(C + tab, mask=offs_t[:, None] < T, other=0.0).to(tl.float32)
            s = tl.load(S + tab, mask=offs_t[:, None] < T, other=0.0).to(tl.float32)
            if INVERSE:
                s = -s
            x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
        tl.store(dst, (x1 * scale).to(dst.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * scale).to(dst.dtype.element_ty), mask=m)


def gate_rope(a: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, freq_idx: torch.Tensor,
              g: torch.Tensor | None = None, inverse: bool = False, scale: float = 1.0,
              keys_into: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``gate_rope_reference`` as one kernel: a (B, T, 2H, d) rotated, times ``scale``, into (2, B, H, T, d).

    cos, sin (1 or B, T, rotary_dim) or None; freq_idx (d/2,) the columns the gate uses. ``inverse``: the
    gradient ``g`` (2, B, H, T, d) back through the rotation into ``a`` (overwritten, returned). For L layers at
    once, ``a`` holds L * B sequences (sequence i uses table i % the tables' batch) and freq_idx is (L, d/2).
    ``keys_into`` (cache (B, H, N, d), pos a 0-d int tensor on the device): the keys are written into the cache at
    positions pos .. pos + T - 1 (those from N on dropped) instead of into the result's [1], which is left
    unwritten; pos is read on the device and not advanced (a static cache's write without its own launches)."""
    b, t, h2, d = a.shape
    h = h2 // 2
    if a.stride(-1) != 1:
        raise ValueError("the projection's last dimension must be contiguous")
    kd, pos = keys_into if keys_into is not None else (a, a)
    if keys_into is not None and (inverse or kd.shape[:2] != (b, h) or kd.shape[-1] != d or kd.dtype != a.dtype
                                  or kd.stride(-1) != 1 or pos.numel() != 1):
        raise ValueError(f"a key cache of shape {tuple(kd.shape)} and {kd.dtype} does not take {b} x {h} keys of "
                         f"dim {d} in {a.dtype}")
    if g is None:
        g = torch.empty(2, b, h, t, d, dtype=a.dtype, device=a.device)
    rope = cos is not None and freq_idx.numel() > 0
    if rope:
        if cos.shape[-2] != t or b % cos.shape[0]:
            raise ValueError(f"rotary tables of shape {tuple(cos.shape)} do not fit {b} sequences of {t} positions")
        cos, sin = cos.contiguous(), sin.contiguous()
        freq_idx = freq_idx.to(a.device).contiguous()
        per_f = b // freq_idx.shape[0] if freq_idx.dim() == 2 else b
    else:
        cos = sin = freq_idx = a  # unused
        per_f = b
    block_t = 64
    kd_strides = kd.stride()[:2] + (kd.stride(2),) if keys_into is not None else (0, 0, 0)
    _gate_rope[(triton.cdiv(t, block_t), b * h2)](a, g, cos, sin, freq_idx, kd, pos, a.stride(0), a.stride(1),
                                                  a.stride(2), *g.stride()[:4], cos.stride(0), cos.stride(-2),
                                                  *kd_strides, cos.shape[0] if rope else 1, per_f, h, t,
                                                  kd.shape[2] if keys_into is not None else 0, float(scale),
                                                  HALF=d // 2, BLOCK_T=block_t, ROPE=rope, INVERSE=inverse,
                                                  INTO=keys_into is not None, num_warps=4)
    return a if inverse else g
