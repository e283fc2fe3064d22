"""Long-context retrieval: the passkey test (a synthetic needle in a haystack) per mode, k and context length.

Each prompt is exactly L tokens (the context length): an instruction, filler sentences that say nothing ("The grass
is green. The sky is blue. ..."), and, at a depth d of the filler (0: its start, 1: its end, snapped to a sentence
boundary), the needle "The pass key is 71432. Remember it. 71432 is the pass key."; it ends in "What is the pass
key? The pass key is". This is the test of Mohtashami & Jaggi (Landmark Attention, 2023). The passkey is a random
number of ``digits`` digits, a new one for every prompt, drawn from ``seed``; every mode scores the same prompts.

Retrieval succeeds when greedy decoding continues the prompt with the passkey's tokens. One forward over the prompt
followed by the passkey decides it (teacher forcing): greedy decoding produces the passkey exactly when each of its
tokens is the argmax after the tokens before it. Closed loop, as in ``sparsify eval``: every layer is sparse at once
(the deployed top-k of ``apply_gates``). Letters: L prompt tokens, A passkey tokens, V vocabulary.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import EMBEDDED_MODEL, option
from ..errors import UserError
from ..config import int_list
from .modes import ModesConfig

REPORT_NAME = "passkey.json"
TABLE_NAME = "passkey.md"
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyConfig(ModesConfig):
    """``sparsify passkey``: retrieval accuracy of dense, oracle@k, gate@k and random@k attention."""

    lengths: str = option("512,1024,2048", "Context lengths in tokens (comma list); each prompt is exactly this long.")
    depths: int = option(5, "Needle depths per length, evenly spaced from the start (0) to the end (1) of the "
                            "filler.")
    trials: int = option(2, "Prompts per length and depth, each with its own passkey.")
    digits: int = option(5, "Digits of the passkey.")
    seed: int = option(0, "Seed of the passkeys.")
    output: str | None = option(None, "Folder for passkey.json and passkey.md; if not given, nothing is written.",
                                flags=("--output", "-o"))
    overwrite: bool = option(False, "Replace an existing --output folder.")

    def length_list(self) -> list[int]:
        return int_list(self.lengths, "--lengths")

    def validate(self) -> None:
        self.check_modes()
        self.length_list()
        for name in ("depths", "trials", "digits"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive number, got {getattr(self, name)}")
        if self.digits > 12:
            raise UserError(f"--digits must be at most 12, got {self.digits}")


@dataclass
class Prompt:
    """One prompt: ``ids`` (L,) the prompt's tokens, ``answer`` (A,) the passkey's tokens."""

    length: int
    depth: float
    key: str
    ids: list[int]
    answer: list[int]
    needle_at: int  # the index of the needle's first token in ``ids``


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer, length: int, depth: float, key: str) -> Prompt:
    """The prompt of ``length`` tokens with the needle of passkey ``key`` at ``depth`` (0..1) of the filler."""
    head = ([tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else [])
    head = head + _encode(tokenizer, INSTRUCTION)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION)
    full = _encode(tokenizer, QUESTION + " " + key)
    if full[: len(question)] != question:
        raise UserError("the tokenizer merges the question with the passkey; the passkey test cannot split them")
    answer = full[len(question):]
    unit = _encode(tokenizer, FILLER)
    n_fill = length - len(head) - len(needle) - len(question)
    if n_fill < len(unit):
        raise UserError(f"--lengths {length} is too short for the passkey prompt; use at least "
                        f"{length - n_fill + len(unit)} tokens")
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    at = round(depth * (n_fill // len(unit))) * len(unit)  # snapped to the start of a filler sentence group
    at = min(at, n_fill)
    ids = head + filler[:at] + needle + filler[at:] + question
    assert len(ids) == length
    return Prompt(length=length, depth=depth, key=key, ids=ids, answer=answer, needle_at=len(head) + at)


def build_prompts(tokenizer, cfg: PasskeyConfig) -> list[Prompt]:
    """Every prompt of the run: per length, ``depths`` depths x ``trials`` passkeys (seeded)."""
    rng = random.Random(cfg.seed)
    depths = [0.5] if cfg.depths == 1 else [i / (cfg.depths - 1) for i in range(cfg.depths)]
    prompts = []
    for length in cfg.length_list():
        for depth in depths:
            for _ in range(cfg.trials):
                key = str(rng.randrange(10 ** (cfg.digits - 1), 10 ** cfg.digits))
                prompts.append(build_prompt(tokenizer, length, depth, key))
    return prompts


@torch.no_grad()
def score_prompt(model, prompt: Prompt, device) -> dict:
    """Whether greedy decoding retrieves the passkey, the passkey's log-likelihood and the greedy tokens."""
    ids = torch.tensor([prompt.ids + prompt.answer[:-1]], device=device)  # (1, L + A - 1)
    n = len(prompt.answer)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n).logits[0, -n:].float()  # (A, V)
    target = torch.tensor(prompt.answer, device=logits.device)
    greedy = logits.argmax(-1)  # (A,)
    logp = logits.log_softmax(-1).gather(-1, target[:, None]).sum()
    return {"retrieved": bool((greedy == target).all()), "logprob": float(logp), "greedy": greedy.tolist()}


@dataclass
class PasskeyReport:
    summary: list[dict]  # one row per (length, k): accuracy of each mode
    results: list[dict]  # one row per (mode, k, length, depth): accuracy, mean log-prob of the passkey
    samples: list[dict]  # one per (mode, k, prompt): retrieved, log-prob, greedy text
    setup: dict
    files: list[str] = field(default_factory=list)  # what was written (not in the JSON)

    def to_json(self) -> dict:
        return {"summary": self.summary, "results": self.results, "samples": self.samples, "setup": self.setup}


def passkey_table(report: PasskeyReport) -> tuple[str, list[str], list[list[str]]]:
    """(title, headers, rows) of the summary: retrieval accuracy per context length and k, one column per mode."""
    modes = report.setup["modes"]
    rows = []
    for row in report.summary:
        cells = [f"{row['length']:,}", "-" if row["k"] is None else str(row["k"])]
        cells += ["-" if row.get(m) is None else f"{row[m]:.0%}" for m in modes]
        rows.append(cells)
    s = report.setup
    title = (f"passkey retrieval, {s['model']}, {s['prompts_per_length']} prompts per length "
             f"({s['depths']} depths x {s['trials']})")
    return title, ["context", "k", *modes], rows


def run_passkey(cfg: PasskeyConfig, on_event: Callable[[str, dict], None] | None = None) -> PasskeyReport:
    """Score every prompt under every mode and k; write passkey.json and passkey.md if ``cfg.output``.
    ``on_event(kind, info)`` reports progress ("loaded", "result", "note")."""
    from ..runs import report_folder

    cfg.validate()
    with report_folder(cfg.output, cfg.overwrite) as out:
        return _passkey(cfg, on_event or (lambda kind, info: None), out)


def _passkey(cfg: PasskeyConfig, emit: Callable[[str, dict], None], out: Path | None) -> PasskeyReport:
    from ..deploy import apply_gates
    from ..devices import device_summary, input_device
    from ..gates.io import load_gates, read_gate_config
    from ..io import write_report
    from ..loading import load_model, positions_are_learned, text_config
    from ..training import versions

    ks, modes, lengths, runs = cfg.k_list(), cfg.mode_list(), cfg.length_list(), cfg.runs()
    gate_cfg = read_gate_config(cfg.gates) if cfg.gates else {}
    loaded = load_model(cfg.model or gate_cfg.get("base_model") or EMBEDDED_MODEL, dtype=cfg.dtype,
                        device=cfg.device, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    model, device = loaded.model, input_device(loaded.model)
    prompts = build_prompts(loaded.tokenizer, cfg)
    trained = getattr(text_config(model.config), "max_position_embeddings", None)
    if positions_are_learned(model) and trained and max(lengths) + cfg.digits > trained:  # refuse, not crash
        raise UserError(f"--lengths {max(lengths)} and the answer's {cfg.digits} digits exceed the model's {trained} "
                        f"learned positions; use --lengths {trained - cfg.digits} or less")
    if trained and max(lengths) + cfg.digits > trained:
        emit("note", {"message": f"lengths above {trained} tokens exceed the model's max_position_embeddings"})
    emit("loaded", {"model": loaded.source, "device": device_summary(model), "dtype": loaded.dtype,
                    "prompts": len(prompts), "runs": len(runs) * len(lengths)})
    random_seed = cfg.random_seed if cfg.random_seed is not None else gate_cfg.get("random_seed", 1)
    bank = None  # a gate that does not fit the model, or a corrupt one, refused before any run
    if any(cfg.gates_for(mode) is not None for mode, _ in runs):
        bank = load_gates(cfg.gates, model=model)[0]
    samples = []
    for mode, k in runs:
        with apply_gates(model, bank if cfg.gates_for(mode) is not None else None, k=k or 1, mode=mode,
                         random_seed=random_seed, selection=cfg.selection, block_size=cfg.block_size):
            for length in lengths:
                t0 = time.perf_counter()
                mine = [p for p in prompts if p.length == length]
                for p in mine:
                    s = score_prompt(model, p, device)
                    samples.append({"mode": mode, "k": k, "length": length, "depth": p.depth, "key": p.key,
                                    "needle_at": p.needle_at, "retrieved": s["retrieved"], "logprob": s["logprob"],
                                    "greedy": loaded.tokenizer.decode(s["greedy"])})
                done = [s for s in samples if (s["mode"], s["k"], s["length"]) == (mode, k, length)]
                acc = sum(s["retrieved"] for s in done) / len(done)
                emit("result", {"mode": mode, "k": k, "length": length, "accuracy": acc,
                                "seconds": time.perf_counter() - t0})
    report = _report(samples, cfg, modes, ks, lengths)
    report.setup |= {"model": loaded.source, "model_resolved": str(loaded.resolved), "gates": cfg.gates,
                     "gate_config": gate_cfg, "random_seed": random_seed, "selection": cfg.selection,
                     "block_size": cfg.block_size if cfg.selection == "block" else None,
                     "max_position_embeddings": trained, "device": device_summary(model), "dtype": loaded.dtype,
                     "answer_tokens": sorted({len(p.answer) for p in prompts}), "closed_loop": True,
                     "template": {"instruction": INSTRUCTION, "filler": FILLER, "needle": NEEDLE,
                                  "question": QUESTION},
                     "versions": versions()}
    if out is not None:
        report.files = write_report(out, REPORT_NAME, report.to_json(), TABLE_NAME, passkey_table(report),
                                    Path(cfg.output))
    return report


def _report(samples: list[dict], cfg: PasskeyConfig, modes: list[str], ks: list[int],
            lengths: list[int]) -> PasskeyReport:
    def acc(rows: list[dict]) -> float | None:
        return sum(r["retrieved"] for r in rows) / len(rows) if rows else None

    results = []
    for s in samples:
        key = (s["mode"], s["k"], s["length"], s["depth"])
        if not results or (results[-1]["mode"], results[-1]["k"], results[-1]["length"], results[-1]["depth"]) != key:
            results.append({"mode": s["mode"], "k": s["k"], "length": s["length"], "depth": s["depth"], "rows": []})
        results[-1]["rows"].append(s)
    for r in results:
        rows = r.pop("rows")
        r |= {"accuracy": acc(rows), "prompts": len(rows), "mean_logprob": sum(x["logprob"] for x in rows) / len(rows)}
    summary = []
    for length in lengths:
        at = [s for s in samples if s["length"] == length]
        for k in ks if any(m != "dense" for m in modes) else [None]:
            row = {"length": length, "k": k}
            for m in modes:
                row[m] = acc([s for s in at if s["mode"] == m and (m == "dense" or s["k"] == k)])
            summary.append(row)
    per_length = len(samples) // max(1, len(lengths) * len({(s["mode"], s["k"]) for s in samples}))
    setup = {"k": ks, "modes": modes, "lengths": lengths, "depths": cfg.depths, "trials": cfg.trials,
             "digits": cfg.digits, "seed": cfg.seed, "prompts_per_length": per_length,
             "accuracy": "share of prompts whose passkey greedy decoding reproduces exactly (teacher-forced check)"}
    return PasskeyReport(summary=summary, results=results, samples=samples, setup=setup)


__all__ = ["PasskeyConfig", "PasskeyReport", "build_prompt", "passkey_table", "run_passkey", "score_prompt"]
