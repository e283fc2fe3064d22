"""Frozen dataclasses, one per workflow. Recipes (TOML) map onto them 1:1; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m"
EMBEDDED_DATASET = "embedded:wiki-leads"
EMBEDDED_STEPS = 100  # distillation steps of the embedded default on 2 CPU cores (a few minutes)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # Accelerate's big-model placements


@dataclass(frozen=True)
class DistillConfig:
    """``sparsify distill``: train per-layer gates against the frozen model's dense attention."""

    model: str = EMBEDDED_MODEL
    dataset: str = EMBEDDED_DATASET
    output: str = "gates/default"
    k: int = 64
    steps: int | None = None  # None: 1000, or EMBEDDED_STEPS for the embedded model
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    d_g: int = 32
    gate_input: str = "hidden"  # "hidden" (attention block input) or "qk" (the model's post-rotary q, k)
    gate_init: str = "model"  # "model" (the model's own q/k rows at the gate's rotary pairs) or "random"
    loss: str = "kl"  # "kl" or "bce"
    row_fraction: float = 1.0  # < 1: each step's loss from a random share of each layer's 128-row query blocks
    cuda_graph: bool = True  # on a GPU, replay each step's forward and losses as a CUDA graph (where it captures)
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # one of DEVICE_MAPS: spread one model over this process's GPUs (one process)
    max_memory: str | None = None  # with device_map: "0=20GiB,1=20GiB,cpu=64GiB"
    val_every: int = 50
    val_windows: int = 8
    checkpoint_every: int = 50
    save_every: int = 0  # also write the gate at step 0 and every N steps to <output>/snapshots/step-N (0: off)
    max_train_windows: int | None = None
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    revision: str | None = None

    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return EMBEDDED_STEPS if self.model == EMBEDDED_MODEL else 1000

    def validate(self) -> None:
        _positive(self, "k", "steps", "seq_len", "batch_size", "grad_accum", "d_g", "val_every", "checkpoint_every")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.row_fraction <= 1:
            raise UserError(f"--row-fraction must be in (0, 1], got {self.row_fraction}")
        if self.save_every < 0:
            raise UserError(f"--save-every must be 0 (off) or positive, got {self.save_every}")
        if self.k >= self.seq_len:
            raise UserError(
                f"--k {self.k} keeps every key of a {self.seq_len}-token window; choose k < --seq-len"
            )
        if self.d_g % 2:
            raise UserError(f"--d-g must be even (rotary pairs), got {self.d_g}")
        _choice("gate-input", self.gate_input, ("hidden", "qk"))
        _choice("gate-init", self.gate_init, ("model", "random"))
        _choice("loss", self.loss, ("kl", "bce"))
        check_device_map(self.device_map, self.max_memory)


def check_device_map(device_map: str | None, max_memory: str | None) -> None:
    """--device-map is one of DEVICE_MAPS; --max-memory needs it."""
    if device_map is not None:
        _choice("device-map", device_map, DEVICE_MAPS)
    elif max_memory is not None:
        raise UserError("--max-memory only applies with --device-map (e.g. --device-map auto)")


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def _choice(flag: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"--{flag} must be one of {', '.join(options)}, got {value!r}")


def _coerce(field: dataclasses.Field, raw: Any) -> Any:
    kind = str(field.type)
    if not isinstance(raw, str):
        return raw
    if "bool" in kind:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"{field.name} must be true or false, got {raw!r}")
    if raw.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise UserError(f"{field.name} must be a {kind.split(' ')[0]}, got {raw!r}") from None
    return raw


def build_config(cls, base: dict | None = None, overrides: dict | None = None):
    """Make ``cls`` from recipe values and overrides; unknown keys are errors naming the key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for source in (base or {}, overrides or {}):
        for key, raw in source.items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"unknown {cls.__name__} key {key!r}; known keys: {', '.join(sorted(known))}")
            values[key] = _coerce(known[key], raw)
    return cls(**values)


def load_recipe(name_or_path: str) -> dict:
    """Read a recipe TOML (a path, or a name in the packaged ``recipes/``)."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.is_file():  # a name (which may hold dots: qwen3-1.7b-distill)
        from importlib.resources import files

        path = Path(str(files("posthoc_sparse_recipes") / f"{name_or_path}.toml"))
    if not path.is_file():
        raise UserError(f"recipe {name_or_path!r} not found (looked for {path})")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
