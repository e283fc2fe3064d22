"""The distillation loop: frozen model, dense forward, every layer's gate loss, AdamW (``distill()``).

Each step records every layer's q, k and gate inputs in a no-grad dense forward, then backpropagates each
layer's gate loss into that layer's gate alone (``step.py``, ``layer_loss.py``). The model never changes
(asserted at the end). Validation is open-loop recall@k on held-out windows (``validate.py``); checkpoints
hold the gate, AdamW and the data position (``checkpoint.py``), so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..attention.interface import SparseAttention, attention_modules
from ..attention.recording import RecordPolicy
from ..attention.routing import RoutingStats
from ..config import DistillConfig
from ..errors import UserError
from ..gates.io import gate_spec_for_model, save_gates
from ..gates.modules import GateBank, random_control
from ..io import atomic_write_json
from ..runs import OutputRun, output_run
from ..training import STATE_JSON, DivergenceGuard, Tracker, after_step, check_report_to, lr_at, resume_settings
from .checkpoint import describe_checkpoint, load_checkpoint, save_checkpoint
from .step import accumulate_gradients, gate_optimizer, step_graphs
from .validate import open_loop_recall

CHECKPOINT_DIR = "checkpoint"
HISTORY_NAME = "distill_log.json"
SNAPSHOT_DIR = "snapshots"  # --save-every: <output>/snapshots/step-<N>/, each a complete gate folder
# Config keys that must agree between a checkpoint and the run resuming it (and the dtype the run resolved).
_RESUME_KEYS = ("model", "revision", "dataset", "k", "seq_len", "batch_size", "grad_accum", "weight_decay", "d_g",
                "gate_input", "gate_init", "loss", "row_fraction", "seed", "max_train_windows")
# The learning rate and its schedule may change on resume (e.g. a lower --lr after a blow-up): an override that
# the run reports and records in distill_log.json ("overrides").
_SCHEDULE_KEYS = ("lr", "warmup", "steps")


@dataclass
class DistillResult:
    output: Path
    steps: int
    loss_first: float
    loss_last: float
    recall: float  # learned gate, open loop, held-out windows
    recall_random: float
    recall_init: float  # the learned gate before training
    seconds_per_step: float
    tokens_per_second: float
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def build_gate_bank(model, cfg: DistillConfig) -> GateBank:
    """The learned gate at step 0: the model's own q/k rows ("model") or the seeded random init."""
    bank = GateBank(gate_spec_for_model(model, cfg.d_g, cfg.gate_input)).reset_random(cfg.seed)
    if cfg.gate_init == "model":
        try:
            bank.init_from_model(attention_modules(model))
        except ValueError as e:
            raise UserError(f"{e}; use --gate-init random") from None
    return bank


def random_gate_bank(model, cfg: DistillConfig) -> GateBank:
    """The frozen random control of this run: same architecture, seed + 1."""
    return random_control(gate_spec_for_model(model, cfg.d_g, cfg.gate_input), cfg.seed + 1)


def distill(cfg: DistillConfig, on_event: Callable[[str, dict], None] | None = None) -> DistillResult:
    """Distill gates for ``cfg.model`` and write them to ``cfg.output``. ``on_event(kind, info)`` reports
    progress ("loaded", "step", "validate", "checkpoint", "note", "done") for a front end to render.

    The output folder is locked for the run (``runs.output_run``); a run that fails removes what it created but
    a checkpoint; Ctrl-C stops at the end of the step, after a checkpoint (``errors.Interrupted``); a loss that
    blows up stops the run before anything final is written (``training.DivergenceGuard``).

    Launched as several processes (``torchrun`` / ``accelerate launch``), each holds the frozen model on its
    own device and takes its slice of every global batch; gate gradients and losses are averaged across
    processes, validation windows are shared out and their sums added. Only the main process writes files
    and calls ``on_event``; every process returns the same result. With ``cfg.device_map`` one process
    spreads the model over its GPUs (then CPU, disk) and each gate layer lives beside its attention layer.
    """
    from ..parallel import Processes

    cfg.validate()
    check_report_to(cfg.report_to)  # the tracker's package is installed
    procs = Processes(cfg.device)
    procs.check_device_map(cfg.device_map)
    with output_run(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume, main=procs.is_main, barrier=procs.barrier,
                    resumable=lambda work: describe_checkpoint(work / CHECKPOINT_DIR)) as run:
        return _distill(cfg, run, procs, on_event)


def _distill(cfg: DistillConfig, run: OutputRun, procs, on_event) -> DistillResult:
    from ..data import WindowSampler, build_windows
    from ..devices import device_summary, execution_devices, input_device, onloaded
    from ..loading import assert_frozen, check_positions, load_model, model_fingerprint

    emit = on_event if on_event is not None and procs.is_main else (lambda kind, info: None)
    out = run.work  # the output folder, or (--overwrite) the new one swapped in at the end
    for note in run.notes:
        emit("note", {"message": note})
    total_steps = cfg.resolved_steps()

    loaded = load_model(cfg.model, dtype=cfg.dtype, device=procs.model_device(),
                        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, device_map=cfg.device_map,
                        max_memory=cfg.max_memory)
    model, tok = loaded.model, loaded.tokenizer
    check_positions(model, cfg.seq_len)
    device = input_device(model)
    attns = attention_modules(model)
    layer_devices = execution_devices(model, attns)  # one device per layer: several with a device map
    train, train_info = build_windows(tok, cfg.dataset, "train", cfg.seq_len, max_windows=cfg.max_train_windows,
                                      text_field=cfg.text_field)
    heldout, held_info = build_windows(tok, cfg.dataset, "heldout", cfg.seq_len, max_windows=cfg.val_windows,
                                       text_field=cfg.text_field)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.device.type != "meta"} \
        if total_steps <= 10_000 and sum(p.numel() for p in model.parameters()) < 5e8 else None

    with onloaded(attns):  # the model's q/k rows, also where a device map offloaded them
        bank = build_gate_bank(model, cfg)
    random_bank = random_gate_bank(model, cfg)
    for b in (bank, random_bank):
        for gate, dev in zip(b.layers, layer_devices, strict=True):
            gate.to(dev)
    opt = gate_optimizer(bank, cfg.lr, cfg.weight_decay)
    # --batch-size is per process and micro-batch (as in transformers' Trainer); the sampler deals out the
    # global batch, so 1 process x 4 windows and 2 processes x 2 windows see the same windows per step.
    sampler = WindowSampler(len(train), cfg.batch_size * cfg.grad_accum * procs.world,
                            seed=cfg.seed, rank=procs.rank, world_size=procs.world)
    step, history, overrides, loss_start = 0, [], [], None
    ckpt_dir = out / CHECKPOINT_DIR
    settings = resume_settings(cfg, _RESUME_KEYS + _SCHEDULE_KEYS[:2], dtype=loaded.dtype, steps=total_steps)
    if cfg.resume and (ckpt_dir / STATE_JSON).exists():
        params, state, changed = load_checkpoint(ckpt_dir, opt, bank.state_dict(), total_steps, settings,
                                                 _SCHEDULE_KEYS)
        bank.load_state_dict(params, strict=True)
        sampler.load_state_dict(state["sampler"])
        step, history = state["step"], state["history"]
        overrides, loss_start = state.get("overrides", []), state.get("loss_start")
        if changed:
            overrides.append({"step": step} | changed)
            emit("note", {"message": "resuming with " + ", ".join(f"{k} {v[1]} (the checkpoint's: {v[0]})" for k, v in
                                                                   changed.items()) + f", recorded in {HISTORY_NAME}"})
    resumed_from = step
    guard = DivergenceGuard(cfg.max_loss_ratio, ckpt_dir, loss_start)
    emit("loaded", {"model": loaded.source, "resolved": str(loaded.resolved), "device": device_summary(model),
                    "processes": procs.world, "dtype": loaded.dtype, "train": train_info, "heldout": held_info,
                    "spec": bank.spec.to_dict(), "steps": total_steps, "resumed_from": step})

    def validate(banks: dict[str, GateBank]) -> dict[str, RoutingStats]:
        """Open-loop recall on the held-out windows: each process scores its share, the sums are added."""
        stats = open_loop_recall(model, procs.shard(heldout), banks, cfg.k, cfg.batch_size, device)
        for s in stats.values():
            s.sums = procs.sum_tables(s.sums)
        return stats

    val = validate({"init": bank, "random": random_bank})
    recall_init, recall_random = val["init"].overall()["recall"], val["random"].overall()["recall"]
    recall = next((h["recall"] for h in reversed(history) if "recall" in h), recall_init)  # resumed: the last one
    emit("validate", {"step": step, "recall": recall_init, "recall_random": recall_random})
    tracker = Tracker(cfg.report_to, out, "posthoc-sparse-distill", asdict(cfg), enabled=procs.is_main)
    tracker.log({"recall": recall_init, "recall_random": recall_random}, step)

    meta = {"base_model": loaded.source, "base_model_revision": loaded.revision, "base_model_hub_id": loaded.hub_id,
            "model_fingerprint": model_fingerprint(model.config), "model_type": model.config.model_type,
            "architecture": type(model).__name__, "gate_init": cfg.gate_init, "k": cfg.k, "loss": cfg.loss,
            "seed": cfg.seed, "random_seed": cfg.seed + 1, "dataset": cfg.dataset, "seq_len": cfg.seq_len}
    if cfg.text_field != "text":  # recorded only where it matters, so that gate configs stay readable by older versions
        meta["text_field"] = cfg.text_field

    def snapshot(done: int) -> None:
        if procs.is_main and cfg.save_every and done % cfg.save_every == 0:
            save_gates(out / SNAPSHOT_DIR / f"step-{done}", copy.deepcopy(bank).cpu(), meta | {"steps": done})

    if step == 0:
        snapshot(0)

    def write_log(done: int, graph_info: dict | None = None) -> None:
        """distill_log.json: the history so far (at every checkpoint, so a log survives a crash) or the whole run."""
        atomic_write_json(out / HISTORY_NAME, {"config": asdict(cfg), "history": history, "train": train_info,
                                               "heldout": held_info, "library_version": __version__,
                                               "recall_start": {"step": resumed_from, "recall": recall_init,
                                                                "recall_random": recall_random},
                                               "processes": procs.world, "cuda_graph": graph_info,
                                               "overrides": overrides, "steps_done": done,
                                               "finished": done == total_steps})

    def checkpoint(done: int) -> None:
        if procs.is_main:
            save_checkpoint(ckpt_dir, bank.state_dict(), opt, {
                "step": done, "sampler": sampler.state_dict(), "history": history, "config": settings,
                "overrides": overrides, "loss_start": guard.start,
            })
            if done < total_steps:
                write_log(done)
        emit("checkpoint", {"step": done, "path": str(ckpt_dir)})

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * procs.world  # all processes together
    # the fused losses of "hidden" gates take all layers' inputs from one stack (fused_stacked_losses)
    policy = RecordPolicy(stack_layers=bank.spec.num_layers if (cfg.loss, cfg.gate_input) == ("kl", "hidden") else 0)
    batches = iter(sampler)
    t_start, steps_timed = time.perf_counter(), 0
    graphs = step_graphs(policy) if cfg.cuda_graph and torch.device(device).type == "cuda" else None
    # Ctrl-C during the steps: finish the step, checkpoint, stop (one process: a group would disagree on the step)
    run.defer_interrupts(procs.world == 1)
    with SparseAttention(model, policy):
        while step < total_steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup, total_steps)
            idx = next(batches)  # (batch_size * grad_accum,) window indices of this process
            micro = [train[i].to(device) for i in idx.split(cfg.batch_size)]
            failed = len(graphs.failures) if graphs is not None else 0
            layer_losses = accumulate_gradients(model, policy, bank, micro, cfg.loss, cfg.k, cfg.row_fraction,
                                                seed=cfg.seed * 1_000_003 + step, graphs=graphs)
            if graphs is not None and len(graphs.failures) > failed:
                emit("note", {"message": f"CUDA graph capture failed, steps of this shape run eagerly: "
                                         f"{graphs.failures[-1]}"})
            if procs.world > 1:  # the mean over processes = the gradient of the whole global batch
                (layer_losses,) = procs.average_gradients(bank.parameters(), layer_losses)
            guard.check(layer_losses, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            steps_timed += 1
            dt = time.perf_counter() - t0
            loss = float(layer_losses.mean())
            entry = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg.lr, cfg.warmup, total_steps), "seconds": dt,
                     "tokens_per_second": tokens_per_step / dt}
            if step % cfg.val_every == 0 or step == total_steps:
                recall = validate({"gate": bank})["gate"].overall()["recall"]
                entry["recall"] = recall
                emit("validate", {"step": step, "recall": recall, "recall_random": recall_random})
            history.append(entry)
            tracker.log({k: v for k, v in entry.items() if k != "step"}, step)
            snapshot(step)
            emit("step", entry | {"total": total_steps})
            after_step(step, total_steps, cfg.checkpoint_every, guard, run, checkpoint)
    run.defer_interrupts(False)

    if before is not None:
        changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert not changed, f"distillation changed base model parameters: {changed[:3]}"
    assert_frozen(model)
    elapsed = time.perf_counter() - t_start
    graph_info = None if graphs is None else {  # which step shapes replayed as CUDA graphs, and why others did not
        "replayed_shapes": graphs.replayed_shapes,
        "failures": graphs.failures, "retried": graphs.retried}
    tracker.close()
    if procs.is_main:
        save_gates(out, bank.cpu(), meta | {"steps": step})
        checkpoint(step)
        write_log(step, graph_info)
    procs.barrier()  # the gate folder is complete before any process returns (and, say, loads it)
    losses = [h["loss"] for h in history]
    result = DistillResult(
        output=Path(cfg.output), steps=step, loss_first=losses[0] if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"), recall=recall, recall_random=recall_random,
        recall_init=recall_init, seconds_per_step=elapsed / max(1, steps_timed),
        tokens_per_second=tokens_per_step * steps_timed / max(elapsed, 1e-9), resumed_from=resumed_from,
        history=history, data={"train": train_info, "heldout": held_info, "cuda_graph": graph_info},
    )
    emit("done", asdict(result))
    return result
