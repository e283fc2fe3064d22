"""Generation with a gate, and a comparison with dense generation (``sparsify generate``).

Letters: B batch (1 here), N new tokens, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import EMBEDDED_MODEL, SEED_MAX, check_fields, option
from .deploy import apply_gates
from .errors import UserError


DEFAULT_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class GenerateConfig:
    gates: str | None = option(None, "Gate folder from `sparsify distill`.")
    model: str | None = option(None, "Model; if not given, the gate's base model (else the embedded model).")
    prompt: str = option(DEFAULT_PROMPT, "Text to continue.")
    prompt_file: str | None = option(None, "Read the text to continue from this UTF-8 file instead of --prompt (a "
                                           "long context: a command line holds at most 128 KiB an argument).")
    max_new_tokens: int = option(50, "Tokens to generate.", gt=0)
    k: int | None = option(None, "Keys kept per query; if not given, the gate's k (else 64).", gt=0)
    mode: str = option("gate", "gate, random, oracle or dense.")
    selection: str = option("head", "head (top-k per query head), group (per KV group) or block (key blocks per KV "
                                    "group and query block; Triton on GPUs).")
    block_size: int = option(64, "With --selection block: 16, 32, 64 or 128.")
    compare_dense: bool = option(False, "Also generate densely; compare the texts (token agreement, mean KL), the "
                                        "decode tokens/s and the prefill seconds.")
    do_sample: bool = option(False, "Sample instead of greedy decoding.", flags="--sample")
    temperature: float = option(1.0, "Sampling temperature (with --sample).", gt=0)
    top_p: float = option(1.0, "Nucleus sampling threshold (with --sample).", gt=0, le=1)
    seed: int = option(0, "Sampling seed.", ge=0, le=SEED_MAX)
    cache: str = option("dynamic", "KV cache: dynamic (grows), or static (preallocated; on CUDA transformers then "
                                   "compiles the decode step).", choices=("dynamic", "static"))
    dtype: str = option("auto", "auto, float32, bfloat16, float16.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    trust_remote_code: bool = option(False, "Allow the model's own code.")


@dataclass
class GenerateResult:
    prompt: str
    text: str
    tokens: list[int]
    seconds_per_token: float  # the whole generate call (prefill included) per new token
    k: int = 0  # keys kept per query
    mode: str = "gate"
    context: int = 0  # keys the last query saw: prompt tokens + new tokens - 1
    dense_equivalent: bool = False  # every query kept all its keys (k >= context, or mode dense): nothing was sparse
    dense_text: str | None = None
    dense_tokens: list[int] | None = None
    dense_seconds_per_token: float | None = None
    # decoding speed: new tokens per second after the first (the prefill's), None with a single new token;
    # and the prefill's seconds (until the first new token's logits)
    tokens_per_second: float | None = None
    prefill_seconds: float | None = None
    dense_tokens_per_second: float | None = None
    dense_prefill_seconds: float | None = None
    agreement: float | None = None  # share of positions where the two greedy continuations agree
    mean_kl: float | None = None  # mean KL(dense || sparse) of next-token distributions along the sparse text
    per_token_kl: list[float] = field(default_factory=list)


class _StepClock:
    """A logits processor that changes nothing and notes when each step's logits reach it (waiting for the GPU,
    which generate's stopping check does at every step anyway): the first marks the end of the prefill."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


@dataclass
class _Timing:
    seconds_per_token: float
    tokens_per_second: float | None
    prefill_seconds: float


def _timed_generate(model, inputs, cfg: GenerateConfig, pad_id: int) -> tuple[torch.Tensor, _Timing]:
    from transformers import LogitsProcessorList

    torch.manual_seed(cfg.seed)
    clock = _StepClock(model.device)
    t0 = time.perf_counter()
    static = {"cache_implementation": "static"} if cfg.cache == "static" else {}
    out = model.generate(**inputs, **static, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                         temperature=cfg.temperature if cfg.do_sample else None,
                         top_p=cfg.top_p if cfg.do_sample else None, pad_token_id=pad_id,
                         logits_processor=LogitsProcessorList([clock]))
    clock(None, None)  # generate's return
    new = out[0, inputs["input_ids"].shape[1] :]
    first, last, end = clock.times[0], clock.times[-2], clock.times[-1]
    decoded = len(clock.times) - 2  # tokens whose logits came from a decode step (after the prefill's)
    return new, _Timing(seconds_per_token=(end - t0) / max(1, len(new)),
                        tokens_per_second=decoded / (last - first) if decoded > 0 and last > first else None,
                        prefill_seconds=first - t0)


def read_prompt(cfg: GenerateConfig) -> str:
    """The text to continue: ``cfg.prompt``, or the contents of ``cfg.prompt_file``; UserError if it is empty or
    the file cannot be read as UTF-8 text."""
    if cfg.prompt_file is None:
        if not cfg.prompt.strip():
            raise UserError("--prompt is empty; give the text to continue")
        return cfg.prompt
    if cfg.prompt != DEFAULT_PROMPT:
        raise UserError("give --prompt or --prompt-file, not both")
    path = Path(cfg.prompt_file).expanduser()
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise UserError(f"--prompt-file {cfg.prompt_file}: {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {cfg.prompt_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"--prompt-file {cfg.prompt_file} is empty; give the text to continue")
    return text


@torch.no_grad()
def generate_text(cfg: GenerateConfig) -> GenerateResult:
    """Generate under the gate; with ``compare_dense`` also dense, and score the difference."""
    from .gates.io import read_gate_config
    from .loading import load_model, positions_are_learned, text_config

    check_fields(cfg)
    prompt = read_prompt(cfg)
    gate_cfg = read_gate_config(cfg.gates) if cfg.gates else {}
    k = cfg.k or gate_cfg.get("k") or 64
    loaded = load_model(cfg.model or gate_cfg.get("base_model") or EMBEDDED_MODEL, dtype=cfg.dtype,
                        device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    inputs = tok(prompt, return_tensors="pt").to(model.device)
    limit, n = getattr(text_config(model.config), "max_position_embeddings", None), inputs["input_ids"].shape[1]
    if positions_are_learned(model) and limit and n + cfg.max_new_tokens > limit:  # refuse, not crash
        raise UserError(f"the prompt's {n} tokens and --max-new-tokens {cfg.max_new_tokens} exceed the model's "
                        f"{limit} learned positions; shorten the prompt or generate fewer tokens")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with apply_gates(model, cfg.gates, k=k, mode=cfg.mode, selection=cfg.selection, block_size=cfg.block_size):
        new, timing = _timed_generate(model, inputs, cfg, pad_id)
    context = inputs["input_ids"].shape[1] + len(new) - 1
    kept = -(-k // cfg.block_size) * cfg.block_size if cfg.selection == "block" else k  # block: whole blocks
    result = GenerateResult(prompt=prompt, text=tok.decode(new, skip_special_tokens=True),
                            tokens=new.tolist(), seconds_per_token=timing.seconds_per_token,
                            tokens_per_second=timing.tokens_per_second, prefill_seconds=timing.prefill_seconds,
                            k=k, mode=cfg.mode, context=context, dense_equivalent=cfg.mode == "dense" or kept >= context)
    if cfg.compare_dense:
        dense_new, dense = _timed_generate(model, inputs, cfg, pad_id)
        full = torch.cat([inputs["input_ids"][0], new]).unsqueeze(0)  # (1, prompt + N)
        # the logits that chose the N new tokens: the last N + 1 positions less the last (not the whole (T, V) of a
        # long prompt: 10 GB at 32k tokens and a 152k vocabulary)
        keep = {"use_cache": False, "logits_to_keep": len(new) + 1}
        logits_dense = model(full, **keep).logits[0, :-1].float()  # (N, V)
        with apply_gates(model, cfg.gates, k=k, mode=cfg.mode, selection=cfg.selection, block_size=cfg.block_size):
            logits_sparse = model(full, **keep).logits[0, :-1].float()
        logp, logq = logits_dense.log_softmax(-1), logits_sparse.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (N,)
        n = min(len(new), len(dense_new))
        result.dense_text = tok.decode(dense_new, skip_special_tokens=True)
        result.dense_tokens = dense_new.tolist()
        result.dense_seconds_per_token = dense.seconds_per_token
        result.dense_tokens_per_second = dense.tokens_per_second
        result.dense_prefill_seconds = dense.prefill_seconds
        result.agreement = float((new[:n] == dense_new[:n]).float().mean()) if n else float("nan")
        result.per_token_kl = kl.tolist()
        result.mean_kl = float(kl.mean())
    return result
