"""What the workflows' configs share, and DistillConfig.

``option`` declares a config field with its help text (the CLI builds each command's options from the fields);
``build_config`` and ``load_recipe`` make a config from a recipe (TOML, mapping 1:1 onto the config; unknown keys are
errors) and overrides; ``check_device_map``, ``_positive`` and ``_choice`` check values. Each workflow's frozen config
dataclass lives beside its code: DistillConfig here, EvalConfig in evaluate/perplexity.py, SweepConfig, PretrainConfig
and AbsorbConfig in experiments/, CorpusConfig in corpus.py, GenerateConfig in generate.py.
"""

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
# Help of the placement fields that DistillConfig and EvalConfig share
DEVICE_HELP = "auto, cpu, cuda, cuda:N. Under torchrun / accelerate launch, auto gives each process its own GPU."
DEVICE_MAP_HELP = (f"{', '.join(DEVICE_MAPS)}: spread a model too large for one GPU over this process's GPUs "
                   "(then CPU, disk). One process only.")
MAX_MEMORY_HELP = "With --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB."
# Help of the fields every command that reads text or trains shares
TEXT_FIELD_HELP = "The field (JSON) or column (parquet, CSV, hub dataset) that holds the text."
REPORT_TO = ("none", "tensorboard", "wandb")
REPORT_TO_HELP = ("Track loss, recall and lr per step through Accelerate's trackers: none, tensorboard (event files "
                  "in OUTPUT/tensorboard) or wandb (needs the wandb package).")


def option(default: Any, help: str, *, flags: str | tuple[str, ...] = (), cli: bool = True) -> Any:
    """A config field that carries its help text in ``metadata["help"]``, as transformers' HfArgumentParser reads it.

    The CLI makes each field the option ``--field-name`` (a bool: ``--name`` if it defaults to False, else
    ``--name/--no-name``) and shows ``default`` in its help. ``flags`` names that option where it differs, e.g.
    ``("--output", "-o")``; ``cli=False`` leaves a field to recipes, ``--set`` and Python.
    """
    metadata: dict[str, Any] = {"help": help}
    if flags:
        metadata["flags"] = (flags,) if isinstance(flags, str) else tuple(flags)
    if not cli:
        metadata["cli"] = False
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DistillConfig:
    """``sparsify distill``: train per-layer gates against the frozen model's dense attention."""

    model: str = option(EMBEDDED_MODEL, "Hub id, local folder or .gguf file (embedded:smollm2-135m: SmolLM2-135M "
                        "from a Python package).")
    dataset: str = option(EMBEDDED_DATASET, "Hub dataset (name[:config]) or local .txt/.jsonl/.json/.parquet file or "
                          "folder (embedded:wiki-leads: Wikipedia lead paragraphs from a Python package).")
    text_field: str = option("text", TEXT_FIELD_HELP)
    output: str = option("gates/default", "Gate folder to write.", flags=("--output", "-o"))
    k: int = option(64, "Keys kept per query (top-k).")
    steps: int | None = option(None, f"Optimizer steps; if not given, 1000 ({EMBEDDED_STEPS} for the embedded "
                                     "model).")
    seq_len: int = option(512, "Tokens per window.")
    batch_size: int = option(1, "Windows per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per step.")
    lr: float = option(2e-3, "AdamW peak learning rate.")
    warmup: int = option(20, "Linear warm-up steps before cosine decay.")
    weight_decay: float = option(0.0, "AdamW weight decay of the gate weights.")
    d_g: int = option(32, "Gate dimension per head (even: rotary pairs).")
    gate_input: str = option("hidden", "hidden (the attention block's input, rotary on the gate dims) or qk (the "
                                       "model's post-rotary q, k).")
    gate_init: str = option("model", "model (the model's own q/k rows at the gate's rotary pairs) or random.")
    loss: str = option("kl", "kl (against dense attention) or bce (against the oracle top-k mask).")
    row_fraction: float = option(1.0, "Estimate each step's loss from a random share of each layer's 128-token query "
                                      "blocks (unbiased; cheaper at long --seq-len); 1: every query.")
    cuda_graph: bool = option(True, "On a GPU, replay each step's forward and losses as one CUDA graph after the "
                                    "first step, where it captures (KL, hidden gates, one GPU).")
    seed: int = option(0, "Seed for data order and gate init.")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    device: str = option("auto", DEVICE_HELP)
    device_map: str | None = option(None, DEVICE_MAP_HELP)
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    val_every: int = option(50, "Validate recall@k every N steps.")
    log_every: int = option(10, "When the output is not a terminal (a log file, CI, nohup): print a loss line every "
                                "N steps.")
    report_to: str = option("none", REPORT_TO_HELP)
    val_windows: int = option(8, "Held-out windows for validation.")
    checkpoint_every: int = option(50, "Checkpoint every N steps.")
    save_every: int = option(0, "Also write the gate at step 0 and every N steps to OUTPUT/snapshots/step-N (0: off).")
    max_train_windows: int | None = option(None, "Use at most N training windows (if not given: all).")
    resume: bool = option(False, "Continue from the checkpoint in --output.")
    overwrite: bool = option(False, "Replace an existing --output folder.")
    trust_remote_code: bool = option(False, "Allow the model's own code.")
    revision: str | None = option(None, "Hub revision of --model.")

    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return EMBEDDED_STEPS if self.model == EMBEDDED_MODEL else 1000

    def validate(self) -> None:
        _positive(self, "k", "steps", "seq_len", "batch_size", "grad_accum", "d_g", "val_every", "checkpoint_every",
                  "log_every")
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
        _choice("report-to", self.report_to, REPORT_TO)
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
