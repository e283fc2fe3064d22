"""Causal attention that also returns each row's log-sum-exp (the distillation teacher's, so the KL needs no
teacher pass of its own): ``flash_attention_lse`` (cuDNN / flash attention through ATen) beside the naive
``attention_lse_reference``."""

from __future__ import annotations

from .aten import flash_attention_lse, flash_lse_ok
from .naive import attention_lse_reference

__all__ = ["attention_lse_reference", "flash_attention_lse", "flash_lse_ok"]
