"""Run a model with a gate: ``apply_gates(model, gates, k)`` for forward passes and ``model.generate``.

Prefill selects the top-k keys per query as in eval; each decode step's query selects its top-k among all
cached keys. For the "hidden" gate input the gate's key projections are cached per layer beside the model's
KV cache, so scoring a decode step costs O(S * d_g), not a recomputation over the prefix.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .attention.interface import SparseAttention, attention_modules
from .attention.policies import DEFAULT_BLOCK, MODES, check_selection, policy_for
from .devices import execution_devices
from .errors import UserError
from .gates.io import check_gate_matches, default_d_g, gate_spec_for_model, load_gates
from .gates.modules import GateBank, random_control



def apply_gates(model: nn.Module, gates: str | Path | GateBank | None, k: int, mode: str = "gate",
                random_seed: int | None = None, selection: str = "head", block_size: int = DEFAULT_BLOCK,
                block_score: str = "bound") -> SparseAttention:
    """Route ``model``'s attention through top-k selection until the returned handle is removed.

    ``gates``: a gate folder or a loaded ``GateBank`` (validated against the model; may be None for the
    "oracle" and "dense" modes). ``mode``: "gate" (the learned gate), "random" (the random control with the
    gate's shapes and ``random_seed``), "oracle" (true top-k) or "dense". ``selection``: "head" (top-k per
    query head, the method), "group" (one set per KV group) or "block" (``block_size``-position key blocks per
    KV group and query block; the Triton kernel serves CUDA prefill; ``block_score`` "bound" or "exact", see
    ``GateSelector.block_mass``). Use as a context manager or call
    ``.remove()``; removal restores the model's attention exactly.
    """
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k <= 0:
        raise UserError(f"--k must be a positive number of keys, got {k}")
    check_selection(selection, block_size, block_score)
    bank, config = None, {}
    if isinstance(gates, GateBank):
        bank = gates
        config = {**bank.spec.to_dict()}
        check_gate_matches(config, model)
    elif gates is not None:
        bank, config = load_gates(gates, model=model)  # checked against the model before it is built
    if mode == "random":
        spec = bank.spec if bank is not None else gate_spec_for_model(model, default_d_g(model))
        bank = random_control(spec, random_seed if random_seed is not None else config.get("random_seed", 1))
    elif mode == "gate" and bank is None:
        raise UserError("mode 'gate' needs gates: a folder written by `sparsify distill` or a GateBank")
    if mode in ("gate", "random"):  # each layer's gate where its attention computes (a device map may offload)
        for gate, device in zip(bank.layers, execution_devices(model, attention_modules(model)), strict=True):
            gate.to(device)
    return SparseAttention(model, policy_for(mode, k, bank, selection=selection, block_size=block_size,
                                             block_score=block_score))
