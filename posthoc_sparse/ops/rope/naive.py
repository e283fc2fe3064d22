"""A "hidden" gate's rotary embedding, the naive twin of ``triton.py``.

Letters: B batch, T tokens, H query heads, X any number of heads, d gate dim. The gate reuses the model's
rotary tables (B or 1, T, rotary_dim) at d/2 of their columns (``freq_idx``), rotating pairs (i, i + d/2).
"""

from __future__ import annotations

import torch


def rope_tables(cos: torch.Tensor | None, sin: torch.Tensor | None, freq_idx: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gate's cos and sin, (B, T, d/2) each in ``dtype``, from the model's (B, T, rotary_dim); None when
    there is no rotary embedding (no tables, or no frequencies)."""
    if cos is None or freq_idx.numel() == 0:
        return None
    c = cos.index_select(-1, freq_idx.to(cos.device)).to(dtype)
    s = sin.index_select(-1, freq_idx.to(sin.device)).to(dtype)
    return c, s


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(t: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, freq_idx: torch.Tensor) -> torch.Tensor:
    """t (B, T, X, d) rotated by the gate's tables (heads third, so the broadcast runs on contiguous memory)."""
    tables = rope_tables(cos, sin, freq_idx, t.dtype)
    if tables is None:
        return t
    c = torch.cat((tables[0], tables[0]), dim=-1).unsqueeze(2)  # (B, T, 1, d)
    s = torch.cat((tables[1], tables[1]), dim=-1).unsqueeze(2)
    return t * c + rotate_half(t) * s


def gate_rope_reference(a: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, freq_idx: torch.Tensor,
                        scale: float = 1.0) -> torch.Tensor:
    """The raw projection a (B, T, 2H, d) (queries in heads 0..H-1, keys after) rotated and times ``scale``:
    (2, B, H, T, d), [0] the gate queries, [1] the gate keys. ``freq_idx`` (d/2,)."""
    b, t, h2, d = a.shape
    y = rotate(a, cos, sin, freq_idx) * scale  # (B, T, 2H, d)
    return y.view(b, t, 2, h2 // 2, d).permute(2, 0, 3, 1, 4)  # (2, B, H, T, d)
