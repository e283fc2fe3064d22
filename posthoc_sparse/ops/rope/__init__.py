"""A "hidden" gate's rotary embedding: ``gate_rope`` (Triton, with its inverse for the gradient) beside the naive
``gate_rope_reference`` (which the gate module itself uses)."""

from __future__ import annotations

from .naive import gate_rope_reference, rope_tables, rotate, rotate_half
from .triton import gate_rope

__all__ = ["gate_rope", "gate_rope_reference", "rope_tables", "rotate", "rotate_half"]
