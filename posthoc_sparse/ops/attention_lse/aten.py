"""Causal attention that also returns each row's log-sum-exp, through the ATen ops of cuDNN and flash attention.

Letters: B batch, H query heads, Hkv key/value heads, T tokens, D head_dim.
"""

from __future__ import annotations

import torch

_CUDNN_OK: dict = {}  # (device, dtype, heads, kv heads, head dim) -> whether cuDNN attention took the call


def flash_lse_ok(q, k, v, mask, softcap, dropout: float, kwargs: dict) -> bool:
    """Whether ``flash_attention_lse`` computes this attention call exactly as the model's own SDPA call would:
    CUDA half precision, plain causal prefill (no mask, no soft-capping, no sliding window or sink logits), no
    dropout, head dims flash supports."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and mask is None and softcap is None and not dropout and q.shape[2] == k.shape[2] > 1
            and q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256 and q.shape[-1] % 8 == 0
            and kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None
            and kwargs.get("is_causal", True) is not False)


def flash_attention_lse(q, k, v, scaling: float, cudnn_in_capture: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention that also returns the rows' log-sum-exp: (out (B, T, H, D), lse (B, H, T) fp32).
    q (B, H, T, D); k, v (B, Hkv, T, D) (GQA passed as it is, as SDPA's enable_gqa does).

    Runs the kernel SDPA would pick, through its ATen op (which returns the log-sum-exp anyway): cuDNN where it
    takes the call, else flash attention. ``cudnn_in_capture=False``: flash attention while a stream captures a
    CUDA graph (cuDNN refuses capture in some torch builds; the graph helper then retries so)."""
    key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1])
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if (_CUDNN_OK.get(key, True) and torch.backends.cuda.cudnn_sdp_enabled()
            and not (capturing and not cudnn_in_capture)):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                          scale=scaling)[:2]
            _CUDNN_OK[key] = True
            return out.transpose(1, 2).contiguous(), lse.reshape(q.shape[:3])
        except RuntimeError:  # cuDNN (or this build) does not take the shape: flash attention does
            if capturing:  # the capture is spoiled: the caller retries it with cudnn_in_capture=False
                raise
            _CUDNN_OK[key] = False
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)[:2]
    return out.transpose(1, 2).contiguous(), lse[..., :q.shape[2]]


