"""Gate artifacts, PEFT-style: a folder with ``gate_config.json`` and ``gates.safetensors``.

The config records the base model (id or path, revision, a fingerprint of its config), the gate's shapes and
how it was trained; keys are sorted. Loading is strict: unknown or missing keys, a value of the wrong type or
range (checked with the config's rules), missing or unexpected tensors and wrong shapes are errors, and
``check_gate_matches`` refuses a gate made for another model. Nothing is allocated from a gate file before its
shapes are checked: against the model when one is given, and against the weights file's header.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..config import Rule, check_value
from ..errors import GateMismatchError, UserError, first_line
from ..loading import text_config
from ..io import atomic_write_json, write_safetensors
from .modules import GATE_INPUTS, GateBank, GateSpec

GATE_CONFIG_NAME = "gate_config.json"
GATE_WEIGHTS_NAME = "gates.safetensors"
FORMAT_VERSION = 1

_SPEC_KEYS = {f.name for f in fields(GateSpec)}
# Keys a gate_config.json may carry besides the spec; all are written by save_gates.
_META_KEYS = {
    "format_version", "library_version", "base_model", "base_model_revision", "base_model_hub_id",
    "model_fingerprint", "model_type",
    "architecture", "gate_init", "k", "loss", "steps", "seed", "dataset", "seq_len", "random_seed",
    "text_field",  # written only when not "text"
}


_POSITIVE, _NAME = Rule("int", gt=0), Rule("str", optional=True)
# The type and range of every gate_config.json key (a spec key is required, the others optional).
_CONFIG_RULES = {
    "num_layers": _POSITIVE, "num_heads": _POSITIVE, "num_kv_heads": _POSITIVE, "head_dim": _POSITIVE,
    "hidden_size": _POSITIVE, "d_g": _POSITIVE, "gate_input": Rule("str", choices=GATE_INPUTS), "rotary": Rule("bool"),
    "rotary_dim": Rule("int", ge=0), "format_version": Rule("int"), "library_version": _NAME, "base_model": _NAME,
    "base_model_revision": _NAME, "base_model_hub_id": _NAME, "model_fingerprint": _NAME, "model_type": _NAME,
    "architecture": _NAME, "gate_init": _NAME, "k": _POSITIVE, "loss": _NAME, "steps": Rule("int", ge=0),
    "seed": Rule("int", ge=0), "dataset": _NAME, "seq_len": Rule("int", ge=2, optional=True),
    "random_seed": Rule("int", ge=0), "text_field": _NAME,
}


def default_d_g(model: nn.Module, preferred: int = 32) -> int:
    """``preferred`` (32), or less when the model has fewer rotary dims (tiny or partial-rotary models)."""
    spec = gate_spec_for_model(model, d_g=2)
    width = spec.rotary_dim if spec.rotary else spec.head_dim
    return max(2, min(preferred, width - width % 2))


def check_rotary_width(d_g: int, rotary_dim: int, flag: str = "--d-g") -> None:
    """A "hidden" gate of ``d_g`` dims reads d_g / 2 rotary frequencies: one UserError when the heads have fewer,
    its advice naming ``flag``, the flag of ``d_g`` in the command that set it."""
    if rotary_dim // 2 < d_g // 2:
        raise UserError(f"d_g={d_g} needs {d_g // 2} rotary frequencies but the model has {rotary_dim // 2}; "
                        f"use {flag} {rotary_dim}")


def gate_spec_for_model(model: nn.Module, d_g: int = 32, gate_input: str = "hidden", *, flag: str = "--d-g"
                        ) -> GateSpec:
    """The gate shapes for ``model``: layers, heads, head_dim, hidden size and its rotary width (``flag``: the flag
    of ``d_g``, for the advice when the model's heads are too small for it)."""
    if d_g <= 0 or d_g % 2:
        raise UserError(f"d_g must be a positive even number, got {d_g}")
    if gate_input not in GATE_INPUTS:
        raise UserError(f"gate input must be one of {', '.join(GATE_INPUTS)}, got {gate_input!r}")
    cfg = text_config(model.config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rotary = any("RotaryEmbedding" in type(m).__name__ for m in model.modules())
    rot_dim = int(head_dim * getattr(cfg, "partial_rotary_factor", 1.0)) if rotary else 0
    if rotary and gate_input == "hidden":
        check_rotary_width(d_g, rot_dim, flag)
    return GateSpec(
        num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        hidden_size=cfg.hidden_size, d_g=d_g, gate_input=gate_input, rotary=rotary, rotary_dim=rot_dim,
    )


def save_gates(path: str | Path, bank: GateBank, meta: dict) -> Path:
    """Write the gate folder; ``meta`` holds the non-spec keys.

    Each file is written to a temporary name and renamed; the weights go first and the config last, so a
    folder with a config always has complete weights. Other files in the folder (checkpoints, logs) stay.
    """
    unknown = set(meta) - _META_KEYS
    if unknown:
        raise ValueError(f"unknown gate metadata keys: {sorted(unknown)}")
    config = {**meta, **bank.spec.to_dict(), "format_version": FORMAT_VERSION, "library_version": __version__}
    path = Path(path)
    write_safetensors(path / GATE_WEIGHTS_NAME, bank.state_dict(), metadata={"format": "pt"})
    atomic_write_json(path / GATE_CONFIG_NAME, config)
    return path


def read_gate_config(path: str | Path) -> dict:
    """Read and validate ``gate_config.json`` of a gate folder (or of a hub repository ``user/repo[@rev]``)."""
    from .hub import resolve_gates

    path = resolve_gates(path)
    cfg_path = path / GATE_CONFIG_NAME
    if not path.is_dir():
        raise UserError(f"gate folder {path} does not exist; pass the --output folder of `sparsify distill`")
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing; {path} is not a gate folder written by `sparsify distill`")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); the gate folder is corrupt") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} must hold a JSON object; the gate folder is corrupt")
    unknown = set(config) - _SPEC_KEYS - _META_KEYS
    if unknown:
        raise UserError(
            f"{cfg_path} has keys this version ({__version__}) does not know: {', '.join(sorted(unknown))}; "
            "upgrade posthoc-sparse"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{cfg_path} has format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    missing = {f.name for f in fields(GateSpec)} - set(config)
    if missing:
        raise UserError(f"{cfg_path} lacks {', '.join(sorted(missing))}; the gate folder is corrupt")
    return {key: check_value(value, _CONFIG_RULES[key], f"{key} in {cfg_path}") for key, value in config.items()}


def load_gates(path: str | Path, device: str | torch.device = "cpu", model: nn.Module | None = None
               ) -> tuple[GateBank, dict]:
    """Load a gate folder (or a hub repository ``user/repo[@rev]``) strictly; returns the bank (frozen, eval
    mode) and its config dict. With ``model``, the gate is checked against it (``check_gate_matches``) first.
    Nothing is allocated before the shapes are checked, against the model and the weights file's header."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .hub import resolve_gates

    path = resolve_gates(path)
    config = read_gate_config(path)
    if model is not None:
        from ..loading import model_fingerprint

        check_gate_matches(config, model, model_fingerprint(model.config) if "model_fingerprint" in config else None)
    weights = Path(path) / GATE_WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{weights} is missing; the gate folder is incomplete")
    try:
        with safe_open(str(weights), "pt") as f:  # the header only: its tensor count bounds what may be built
            names = list(f.keys())
        if len(names) != 3 * config["num_layers"]:  # wq, wk and freq_idx per layer
            raise UserError(f"{weights} holds {len(names)} tensors, but {GATE_CONFIG_NAME} describes "
                            f"{config['num_layers']} layers; the gate folder is corrupt")
        spec = GateSpec(**{k: config[k] for k in _SPEC_KEYS})
        with torch.device("meta"):  # the expected names and shapes, without allocating them
            expected = GateBank(spec).state_dict()
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{Path(path) / GATE_CONFIG_NAME} describes impossible gate shapes ({e})") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({first_line(e)}); it is corrupt or truncated") from None
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({first_line(e)}); it is corrupt or truncated") from None
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise UserError(
            f"{weights} does not match its config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise UserError(
                f"{weights}: tensor {name} has shape {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(expected[name].shape)} {expected[name].dtype}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{weights}: tensor {name} holds NaN or inf; the gate is corrupt")
    bank = GateBank(spec)
    bank.load_state_dict(state, strict=True)
    bank.requires_grad_(False).eval()
    return bank.to(device), config


def check_gate_matches(config: dict, model: nn.Module, fingerprint: str | None = None) -> None:
    """Refuse a gate made for another model, saying what differs."""
    spec = gate_spec_for_model(model, d_g=config["d_g"], gate_input=config["gate_input"])
    diffs = [
        f"{key} {config[key]} != model's {getattr(spec, key)}"
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "rotary", "rotary_dim")
        if config[key] != getattr(spec, key)
    ]
    if fingerprint is not None and config.get("model_fingerprint") not in (None, fingerprint):
        diffs.append(f"model config fingerprint {config['model_fingerprint']} != model's {fingerprint}")
    if diffs:
        raise GateMismatchError(
            f"gate made for {config.get('base_model', 'another model')} does not match this model: " + "; ".join(diffs)
        )
