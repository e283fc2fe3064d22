"""What the workflows' configs share, and DistillConfig.

``option`` declares a config field with its help text and the range of its values (the CLI builds each command's
options from the fields); ``build_config`` and ``load_recipe`` make a config from a recipe (TOML, mapping 1:1 onto
the config; unknown keys are errors), ``--set`` overrides and flags.

One validation layer for every value from any source: ``Rule`` (a type, finiteness, a range or choices) comes from
a field's annotation and ``option``; ``check_value`` checks one value against it and names the value's field and
source in its one-line UserError (``--lr``, ``--set lr``, ``lr in recipe X``, ``k in gate_config.json``).
``build_config`` checks each value where it comes from, ``check_fields`` a whole config (one made in Python);
gate files and checkpoints check their fields with the same rules. ``check_device_map``, ``_positive`` and
``_choice`` are older single checks. Each workflow's frozen config
dataclass lives beside its code: DistillConfig here, EvalConfig in evaluate/perplexity.py, SweepConfig, PretrainConfig
and AbsorbConfig in experiments/, CorpusConfig in corpus.py, GenerateConfig in generate.py.
"""

from __future__ import annotations

import dataclasses
import math
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
LOSS_RATIO_HELP = ("Divergence guard: stop (exit 2, nothing final written) when the loss averaged over 10 steps exceeds "
                   "this many times the loss of the first step (0: off; a NaN or inf loss always stops).")
SEED_MAX = 2**32 - 1  # seeds are combined with step numbers into torch seeds (< 2**64)
# Help of the fields every command that reads text or trains shares
TEXT_FIELD_HELP = "The field (JSON) or column (parquet, CSV, hub dataset) that holds the text."
REPORT_TO = ("none", "tensorboard", "wandb")
REPORT_TO_HELP = ("Track loss, recall and lr per step through Accelerate's trackers: none, tensorboard (event files "
                  "in OUTPUT/tensorboard) or wandb (needs the wandb package).")


@dataclass(frozen=True)
class Rule:
    """What one value must be: ``kind`` (int, float, bool or str; a float must be finite), whether None is
    allowed, bounds (``gt``, ``ge``, ``lt``, ``le``) and ``choices``."""

    kind: str
    optional: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple = ()

    def in_range(self, value) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe_range(self) -> str:
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
        high = (")", self.lt) if self.lt is not None else ("]", self.le) if self.le is not None else None
        if low and high:
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return {("(", 0): "a positive number", ("[", 0): "0 or more"}.get(
                low, f"{'greater than' if low[0] == '(' else 'at least'} {low[1]}")
        return f"{'less than' if high[0] == ')' else 'at most'} {high[1]}"


_KINDS = {"int": (int, "an integer"), "float": ((int, float), "a finite number"), "bool": (bool, "true or false"),
          "str": (str, "text")}


def check_value(value: Any, rule: Rule, where: str) -> Any:
    """``value`` as ``rule``'s type (a string is parsed, as from ``--set``), or a one-line UserError naming
    ``where`` the value comes from: ``WHERE must be <what>, got <value>``."""
    types, what = _KINDS[rule.kind]
    if isinstance(value, str) and rule.kind != "str":
        value = _parse(value, rule)
    if value is None:
        if rule.optional:
            return None
    elif isinstance(value, types) and (rule.kind == "bool" or not isinstance(value, bool)):
        if rule.kind == "float":
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{where} must be {what}, got {value}")
        if rule.choices and value not in rule.choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, rule.choices))}, got {value!r}")
        if rule.kind in ("int", "float") and not rule.in_range(value):
            raise UserError(f"{where} must be {rule.describe_range()}, got {value!r}")
        return value
    shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
    raise UserError(f"{where} must be {what}{' or none' if rule.optional else ''}, got {shown}")


def _parse(raw: str, rule: Rule) -> Any:
    """A string as typed after ``--set key=`` (or in a recipe where a number was meant); unparsable: unchanged."""
    text = raw.strip().lower()
    if rule.optional and text in ("none", "null"):
        return None
    if rule.kind == "bool":
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text, raw)
    try:
        return int(text) if rule.kind == "int" else float(text)
    except ValueError:
        return raw


def option(default: Any, help: str, *, flags: str | tuple[str, ...] = (), cli: bool = True,
           gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
           choices: tuple = ()) -> Any:
    """A config field that carries its help text in ``metadata["help"]``, as transformers' HfArgumentParser reads it,
    and the range of its values (``gt``, ``ge``, ``lt``, ``le``, ``choices``; see ``Rule``).

    The CLI makes each field the option ``--field-name`` (a bool: ``--name`` if it defaults to False, else
    ``--name/--no-name``) and shows ``default`` in its help. ``flags`` names that option where it differs, e.g.
    ``("--output", "-o")``; ``cli=False`` leaves a field to recipes, ``--set`` and Python.
    """
    metadata: dict[str, Any] = {"help": help}
    if flags:
        metadata["flags"] = (flags,) if isinstance(flags, str) else tuple(flags)
    if not cli:
        metadata["cli"] = False
    bounds: dict[str, Any] = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    if choices:
        bounds["choices"] = tuple(choices)
    if bounds:
        metadata["rule"] = bounds
    return dataclasses.field(default=default, metadata=metadata)


def rule_of(field: dataclasses.Field) -> Rule:
    """A config field's Rule: its annotation (``int | None`` under ``from __future__ import annotations``) and the
    bounds ``option`` recorded."""
    names = [t.strip() for t in str(field.type).split("|")]
    kind = next((t for t in names if t != "None"), "str")
    return Rule(kind if kind in _KINDS else "str", "None" in names, **field.metadata.get("rule", {}))


def _where(field: dataclasses.Field, source: str) -> str:
    """How a message names a field's value: its flag, ``--set key``, or ``key in recipe X``."""
    if source == "flag":
        return field.metadata.get("flags", ("--" + field.name.replace("_", "-"),))[0].split("/")[0]
    return f"--set {field.name}" if source == "--set" else f"{field.name} in {source}"


def check_fields(cfg) -> None:
    """Check every field of the config ``cfg`` against its Rule (a config made in Python or by ``build_config``)."""
    for f in dataclasses.fields(cfg):
        check_value(getattr(cfg, f.name), rule_of(f), _where(f, "flag"))


@dataclass(frozen=True)
class DistillConfig:
    """``sparsify distill``: train per-layer gates against the frozen model's dense attention."""

    model: str = option(EMBEDDED_MODEL, "Hub id, local folder or .gguf file (embedded:smollm2-135m: SmolLM2-135M "
                        "from a Python package).")
    dataset: str = option(EMBEDDED_DATASET, "Hub dataset (name[:config]) or local .txt/.jsonl/.json/.parquet file or "
                          "folder (embedded:wiki-leads: Wikipedia lead paragraphs from a Python package).")
    text_field: str = option("text", TEXT_FIELD_HELP)
    output: str = option("gates/default", "Gate folder to write.", flags=("--output", "-o"))
    k: int = option(64, "Keys kept per query (top-k).", gt=0)
    steps: int | None = option(None, f"Optimizer steps; if not given, 1000 ({EMBEDDED_STEPS} for the embedded "
                                     "model).", gt=0)
    seq_len: int = option(512, "Tokens per window.", ge=2)
    batch_size: int = option(1, "Windows per micro-batch.", gt=0)
    grad_accum: int = option(1, "Micro-batches per step.", gt=0)
    lr: float = option(2e-3, "AdamW peak learning rate (may change on --resume: recorded in the log).", gt=0)
    warmup: int = option(20, "Linear warm-up steps before cosine decay.", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay of the gate weights.", ge=0)
    d_g: int = option(32, "Gate dimension per head (even: rotary pairs).", gt=0)
    gate_input: str = option("hidden", "hidden (the attention block's input, rotary on the gate dims) or qk (the "
                                       "model's post-rotary q, k).", choices=("hidden", "qk"))
    gate_init: str = option("model", "model (the model's own q/k rows at the gate's rotary pairs) or random.",
                            choices=("model", "random"))
    loss: str = option("kl", "kl (against dense attention) or bce (against the oracle top-k mask).",
                       choices=("kl", "bce"))
    row_fraction: float = option(1.0, "Estimate each step's loss from a random share of each layer's 128-token query "
                                      "blocks (unbiased; cheaper at long --seq-len); 1: every query.", gt=0, le=1)
    cuda_graph: bool = option(True, "On a GPU, replay each step's forward and losses as one CUDA graph after the "
                                    "first step, where it captures (KL, hidden gates, one GPU).")
    seed: int = option(0, "Seed for data order and gate init.", ge=0, le=SEED_MAX)
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    device: str = option("auto", DEVICE_HELP)
    device_map: str | None = option(None, DEVICE_MAP_HELP)
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    val_every: int = option(50, "Validate recall@k every N steps.", gt=0)
    log_every: int = option(10, "When the output is not a terminal (a log file, CI, nohup): print a loss line every "
                                "N steps.", gt=0)
    report_to: str = option("none", REPORT_TO_HELP, choices=REPORT_TO)
    val_windows: int = option(8, "Held-out windows for validation.", gt=0)
    checkpoint_every: int = option(50, "Checkpoint every N steps.", gt=0)
    save_every: int = option(0, "Also write the gate at step 0 and every N steps to OUTPUT/snapshots/step-N (0: off).",
                             ge=0)
    max_train_windows: int | None = option(None, "Use at most N training windows (if not given: all).", gt=0)
    max_loss_ratio: float = option(10.0, LOSS_RATIO_HELP, ge=0)
    resume: bool = option(False, "Continue from the checkpoint in --output, which must exist (Ctrl-C or SIGTERM "
                                  "checkpoints the step under way first).")
    overwrite: bool = option(False, "Replace an existing --output folder.")
    trust_remote_code: bool = option(False, "Allow the model's own code.")
    revision: str | None = option(None, "Hub revision of --model.")

    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return EMBEDDED_STEPS if self.model == EMBEDDED_MODEL else 1000

    def validate(self) -> None:
        check_fields(self)
        if self.k >= self.seq_len:
            raise UserError(
                f"--k {self.k} keeps every key of a {self.seq_len}-token window; choose k < --seq-len"
            )
        if self.d_g % 2:
            raise UserError(f"--d-g must be even (rotary pairs), got {self.d_g}")
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


def build_config(cls, base: dict | None = None, overrides: dict | None = None, *, flags: dict | None = None,
                 recipe: str | None = None):
    """Make ``cls`` from recipe values (``base``, read from ``recipe``), ``--set`` overrides and the ``flags`` a user
    typed, later ones winning. Unknown keys are errors naming the key; each value is checked (``check_value``)
    where it comes from, so that a bad one is named with its source."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for source, layer in ((f"recipe {recipe}" if recipe else "the recipe", base), ("--set", overrides),
                          ("flag", flags)):
        for key, raw in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"unknown {cls.__name__} key {key!r}; known keys: {', '.join(sorted(known))}")
            values[key] = check_value(raw, rule_of(known[key]), _where(known[key], source))
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
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text (a binary file?); pass a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None


def comma_items(text: str, flag: str) -> list[str]:
    """The stripped items of a comma list (none for blank text); an empty item (``16,,32``, ``16,32,``) is one
    UserError naming ``flag``, never silently dropped."""
    items = [x.strip() for x in str(text).split(",")]
    if items == [""]:
        return []
    if "" in items:
        raise UserError(f"{flag} has an empty item in {text!r}; separate the values with single commas")
    return items


def int_list(text: str, flag: str) -> list[int]:
    """Sorted distinct positive integers of a comma list (``--k 16,32,64``), or one UserError naming ``flag``."""
    items = comma_items(text, flag)
    try:
        values = sorted({int(x) for x in items})
    except ValueError:
        raise UserError(f"{flag} takes integers separated by commas, got {text!r}") from None
    if not values or values[0] <= 0:
        raise UserError(f"{flag} must be positive, got {text!r}")
    return values


def name_list(text: str, choices, flag: str) -> list[str]:
    """The names of a comma list, in the user's order, each one of ``choices``; or one UserError naming ``flag``."""
    names = comma_items(text, flag)
    if not names or any(n not in choices for n in names):
        raise UserError(f"{flag} takes a comma list of {', '.join(choices)}, got {text!r}")
    return names
