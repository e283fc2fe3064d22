"""Closed-loop perplexity of dense, oracle@k, gate@k and random@k attention, with routing metrics.

Letters: B batch, T window length, V vocabulary. Every mode scores the same held-out windows and tokens.
Closed loop: every layer is sparse at once and selects from its own inputs as they are under sparsity; the
routing metrics of a layer compare its selection with the oracle top-k of that same layer's scores.
Launched as several processes, each scores its share of the windows and the sums (NLL, tokens, routing) are
added across processes, so the numbers equal a one-process run's; only the main process writes and reports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.graphs import ShapeGraphs
from ..attention.interface import SparseAttention
from ..attention.policies import DEFAULT_BLOCK, MODES, check_selection, policy_for
from ..config import (DEVICE_HELP, DEVICE_MAP_HELP, EMBEDDED_DATASET, EMBEDDED_MODEL, MAX_MEMORY_HELP, SEED_MAX,
                      TEXT_FIELD_HELP, check_fields, int_list, option)
from ..gates.io import default_d_g, gate_spec_for_model, load_gates, read_gate_config
from ..gates.modules import random_control
from ..attention.routing import RoutingStats
from ..parallel import Processes
from ..training import versions
from .modes import mode_names

REPORT_NAME = "eval.json"
TABLE_NAME = "eval.md"  # the summary table as markdown, whole at any terminal width
PLOT_NAME = "eval.png"


@dataclass(frozen=True)
class EvalConfig:
    """``sparsify eval``. Unset model / dataset / seq_len come from the gate's config when a gate is given."""

    gates: str | None = option(None, "Gate folder from `sparsify distill` (its config names model and data).")
    model: str | None = option(None, "Hub id, local folder or .gguf file; if not given, the gate's base model (else "
                                     "the embedded model).")
    dataset: str | None = option(None, "Held-out text (the held-out split is used); if not given, the gate's "
                                       "dataset (else the embedded one).")
    text_field: str | None = option(None, f"{TEXT_FIELD_HELP} If not given, the gate's (else text).")
    k: str = option("64", "Keys kept per query; several as a comma list: 16,32,64.")
    modes: str = option(",".join(MODES), f"Comma list of {', '.join(MODES)}.")
    seq_len: int | None = option(None, "Window length; if not given, the gate's, else 512.", ge=2)
    max_windows: int = option(16, "Held-out windows to score.", gt=0)
    max_tokens: int | None = option(None, "Bound the tokens scored (rounded down to whole windows).", gt=0)
    batch_size: int = option(1, "Windows per forward.", gt=0)
    output: str | None = option(None, "Folder for eval.json and eval.png; if not given, nothing is written.",
                                flags=("--output", "-o"))
    random_seed: int | None = option(None, "Seed of the random gate; if not given, the gate config's random_seed "
                                           "(its seed + 1), else 1.", ge=0, le=SEED_MAX)
    d_g: int | None = option(None, "Gate dimension per head of the random gate when no --gates is given; if not "
                                   "given, 32, or the model's rotary width if smaller.", gt=0)
    gate_input: str = option("hidden", "Input of the random gate when no --gates is given: hidden or qk (as for "
                                       "`sparsify distill`).", choices=("hidden", "qk"))
    selection: str = option("head", "head: top-k per query head (the method); group: one top-k shared by the query "
                                    "heads of each KV group (GQA); block: ceil(k/B) key blocks of B positions per KV "
                                    "group and query block (the Triton-kernel deployed path, fast on GPUs).")
    block_size: int = option(DEFAULT_BLOCK, "With --selection block: positions per key / query block, 16, 32, 64 "
                                            "or 128.")
    block_score: str = option("bound", "With --selection block: how the gate scores a block. bound: an upper bound "
                                       "of its largest gate score (fast); exact: the gate's softmax mass on it (closer "
                                       "to per-head quality, O(T^2) like dense attention).")
    routing: bool = option(True, "Compute the recall / mass / sink metrics (about one more attention pass; "
                                 "--no-routing is faster).")
    cuda_graph: bool = option(True, "Without routing metrics on one GPU, replay each batch shape's forward as a CUDA "
                                    "graph after its first batch (every mode alike).")
    dtype: str = option("auto", "auto, float32, bfloat16, float16.")
    device: str = option("auto", DEVICE_HELP)
    device_map: str | None = option(None, DEVICE_MAP_HELP)
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    overwrite: bool = option(False, "Replace an existing --output folder.")
    trust_remote_code: bool = option(False, "Allow the model's own code.")
    revision: str | None = option(None, "Hub revision of --model.")

    def k_list(self) -> list[int]:
        return int_list(self.k, "--k")

    def mode_list(self) -> list[str]:
        return mode_names(self.modes, self.gates)


@dataclass
class ModeResult:
    mode: str
    k: int | None
    perplexity: float
    nll: float
    tokens: int
    seconds: float
    routing: dict = field(default_factory=dict)
    per_layer: list[dict] = field(default_factory=list)
    cuda_graph: dict = field(default_factory=dict)  # replayed_shapes, replays, failures; empty when not used
    # each window's NLL summed over its T - 1 predictions, in window order (setup["windows"] of them): the
    # per-window numbers behind bootstrap intervals over windows
    window_nll: list[float] = field(default_factory=list)


@dataclass
class EvalReport:
    results: list[ModeResult]
    summary: list[dict]
    setup: dict
    files: list[str] = field(default_factory=list)  # the files written (eval.json, eval.md, eval.png if plotted)

    def to_json(self) -> dict:
        return {"results": [asdict(r) for r in self.results], "summary": self.summary, "setup": self.setup}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def summary_table(report: EvalReport) -> tuple[str, list[str], list[list[str]]]:
    """(title, headers, rows) of the summary: one row per k (dense alone when no sparse mode ran). The CLI prints
    it and eval.md holds it, so both show the same numbers."""
    headers = ["k", "dense", "oracle", "gate", "random", "gate/oracle", "gap closed", "gate recall", "gate mass",
               "random recall", "sparsity (all / causal)"]
    rows = [[str(row["k"]), *(_fmt(row.get(m), ".3f") for m in ("dense", "oracle", "gate", "random",
                                                                  "gate_over_oracle")),
             _fmt(row.get("gap_closed"), ".1%"), *(_fmt(row.get(m), ".3f") for m in ("gate_recall", "gate_mass",
                                                                                     "random_recall")),
             f"{_fmt(row.get('sparsity_all_keys'), '.1%')} / {_fmt(row.get('sparsity_causal'), '.1%')}"]
            for row in report.summary]
    if not report.summary and report.results:
        rows.append(["-", _fmt(report.results[0].perplexity, ".3f"), *["-"] * (len(headers) - 2)])
    title = f"closed-loop perplexity, T={report.setup['seq_len']}, {report.setup['tokens_scored']} tokens"
    return title, headers, rows


def batch_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per window, the sum of the next-token negative log-likelihoods of one batch of windows (B, T): a (B,)
    fp32 tensor on the logits' device."""
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    targets = ids[:, 1:].to(logits.device)  # a device map may leave the logits on another device
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*(T-1),)
    return nll.view(ids.shape[0], -1).sum(1)  # (B,)


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor, batch_size: int, device, procs: Processes | None = None,
                graphs: ShapeGraphs | None = None, per_window: list[float] | None = None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (fp32 per batch, fp64 sums) over all windows, and the token
    count. With ``procs`` (several processes), this process scores only its share of the windows and the
    two sums are added across processes: every window counts once, and every process gets the totals.
    The sums stay on the device until the end (one wait for the GPU, not one per batch). With ``graphs``
    (``ShapeGraphs``, one GPU, nothing observed per call) each batch shape's forward replays as a CUDA graph.
    ``per_window`` (a list) is extended with each window's NLL sum over its T - 1 predictions, in window
    order, whichever process scored it (for bootstrap intervals over windows)."""
    n_all = len(windows)
    if procs is not None:
        windows = procs.shard(windows)
    sums, count = [], 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(device)  # (B, T)
        nll = batch_nll(model, ids) if graphs is None else graphs(
            (tuple(ids.shape), ids.dtype, ids.device), lambda x: batch_nll(model, x), ids)
        sums.append(nll.double().to(sums[0].device) if sums else nll.double())  # (B,)
        count += ids.numel() - ids.shape[0]
    mine = torch.cat(sums).tolist() if sums else []  # this process's windows, in its order
    nll = float(sum(mine))
    world = procs.world if procs is not None else 1
    if world > 1:
        nll, count = procs.sum_floats([nll, float(count)])
        count = int(count)
    if per_window is not None:
        full = [0.0] * n_all
        rank = procs.rank if procs is not None else 0
        for j, value in zip(range(rank, n_all, world), mine):  # procs.shard takes every world-th from rank
            full[j] = value
        per_window.extend(procs.sum_floats(full) if world > 1 else full)
    return nll, count


def summarize(results: list[ModeResult], seq_len: int) -> list[dict]:
    """Per k: perplexities side by side, gate/oracle ratio, gap closed, sparsity against all T keys."""
    dense = next((r.perplexity for r in results if r.mode == "dense"), None)
    out = []
    for k in sorted({r.k for r in results if r.k is not None}):
        row = {"k": k, "dense": dense, "sparsity_all_keys": 1 - k / seq_len}
        for r in results:
            if r.k == k:
                row[r.mode] = r.perplexity
                if r.routing:
                    row[f"{r.mode}_recall"] = r.routing.get("recall")
                    row[f"{r.mode}_mass"] = r.routing.get("mass")
                    row["sparsity_causal"] = r.routing.get("sparsity_causal")
        if "gate" in row and "oracle" in row:
            row["gate_over_oracle"] = row["gate"] / row["oracle"]
            if "random" in row and row["random"] != row["oracle"]:
                row["gap_closed"] = (row["random"] - row["gate"]) / (row["random"] - row["oracle"])
        out.append(row)
    return out


def evaluate_perplexity(cfg: EvalConfig, on_event: Callable[[str, dict], None] | None = None) -> EvalReport:
    """Run every requested mode and k on the same held-out windows; write eval.json, eval.md (+ PNG) if ``output``.

    The output folder is written whole or not at all: the report is built in a new folder beside it and swapped
    in at the end (``runs.output_run`` with ``stage``), so a failed or interrupted eval leaves it as it was."""
    from ..config import check_device_map
    from ..runs import report_folder

    check_fields(cfg)
    ks, modes = cfg.k_list(), cfg.mode_list()
    check_selection(cfg.selection, cfg.block_size, cfg.block_score, ("--selection", "--block-size", "--block-score"))
    check_device_map(cfg.device_map, cfg.max_memory)
    procs = Processes(cfg.device)
    procs.check_device_map(cfg.device_map)
    emit = on_event if on_event is not None and procs.is_main else (lambda kind, info: None)
    with report_folder(cfg.output, cfg.overwrite, main=procs.is_main, barrier=procs.barrier) as out:
        return _evaluate(cfg, ks, modes, procs, emit, out)


def _evaluate(cfg: EvalConfig, ks: list[int], modes: list[str], procs: Processes, emit, out: Path | None
              ) -> EvalReport:
    from ..attention.interface import attention_modules
    from ..data import build_windows
    from ..devices import device_summary, execution_devices, input_device
    from ..io import write_report
    from ..loading import check_positions, load_model, model_fingerprint

    gate_cfg = read_gate_config(cfg.gates) if cfg.gates else {}
    model_id = cfg.model or gate_cfg.get("base_model") or EMBEDDED_MODEL
    dataset = cfg.dataset or gate_cfg.get("dataset") or EMBEDDED_DATASET
    seq_len = cfg.seq_len or gate_cfg.get("seq_len") or 512
    loaded = load_model(model_id, dtype=cfg.dtype, device=procs.model_device(),
                        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, device_map=cfg.device_map,
                        max_memory=cfg.max_memory)
    model = loaded.model
    check_positions(model, seq_len)
    device = input_device(model)
    layer_devices = execution_devices(model, attention_modules(model))
    max_windows = cfg.max_windows
    if cfg.max_tokens:
        max_windows = max(1, min(max_windows, cfg.max_tokens // seq_len))
    text_field = cfg.text_field or gate_cfg.get("text_field") or "text"
    windows, data_info = build_windows(loaded.tokenizer, dataset, "heldout", seq_len, max_windows=max_windows,
                                       text_field=text_field)
    fingerprint = model_fingerprint(model.config)

    gate_bank = None
    if cfg.gates:
        gate_bank, _ = load_gates(cfg.gates, model=model)  # checked against the model before it is built
    random_seed = cfg.random_seed if cfg.random_seed is not None else gate_cfg.get("random_seed", 1)
    spec = gate_bank.spec if gate_bank is not None else gate_spec_for_model(
        model, cfg.d_g or default_d_g(model), cfg.gate_input)
    random_bank = random_control(spec, random_seed)
    for bank in (gate_bank, random_bank):  # each layer's gate beside its attention layer
        for gate, dev in zip(bank.layers if bank is not None else [], layer_devices):
            gate.to(dev)

    n_layers = spec.num_layers
    emit("loaded", {"model": loaded.source, "device": device_summary(model), "processes": procs.world,
                    "dtype": loaded.dtype, "data": data_info,
                    "runs": sum(1 if m == "dense" else len(ks) for m in modes)})
    # CUDA graphs where the whole model sits on one GPU (no device map) and no routing observer sees each call
    use_graphs = (cfg.cuda_graph and not cfg.routing and device.type == "cuda"
                  and not getattr(model, "hf_device_map", None))
    results = []
    for mode in modes:
        for k in [None] if mode == "dense" else ks:
            stats = RoutingStats(k or 1, n_layers) if cfg.routing else None
            observer = stats.observe if stats is not None else None
            policy = policy_for(mode, k, {"gate": gate_bank, "random": random_bank}.get(mode),
                                selection=cfg.selection, block_size=cfg.block_size, block_score=cfg.block_score,
                                observer=observer)
            graphs = ShapeGraphs() if use_graphs else None
            t0 = time.perf_counter()
            window_nll: list[float] = []
            with SparseAttention(model, policy):
                nll, count = windows_nll(model, windows, cfg.batch_size, device, procs, graphs, window_nll)
            res = ModeResult(mode=mode, k=k, perplexity=math.exp(nll / count), nll=nll / count, tokens=count,
                             seconds=time.perf_counter() - t0, window_nll=window_nll)
            if graphs is not None:
                res.cuda_graph = {"replayed_shapes": graphs.replayed_shapes, "replays": graphs.replays,
                                  "failures": graphs.failures}
                if graphs.failures:
                    emit("note", {"message": f"{mode}: CUDA graph capture failed, those batches ran eagerly: "
                                          f"{graphs.failures[0]}"})
                del graphs  # its memory pool
            if stats is not None:
                stats.sums = procs.sum_tables(stats.sums)  # this process saw only its windows
                res.routing, res.per_layer = stats.overall(), stats.per_layer()
            results.append(res)
            emit("result", asdict(res))

    setup = {
        "model": loaded.source, "model_resolved": str(loaded.resolved), "model_fingerprint": fingerprint,
        "architecture": type(model).__name__, "gates": cfg.gates, "gate_config": gate_cfg,
        "random_seed": random_seed, "data": data_info, "seq_len": seq_len, "windows": len(windows),
        "tokens_scored": results[0].tokens if results else 0, "k": ks, "modes": modes,
        "selection": cfg.selection, "block_size": cfg.block_size if cfg.selection == "block" else None,
        "block_score": cfg.block_score if cfg.selection == "block" else None,
        "device": device_summary(model), "processes": procs.world, "dtype": loaded.dtype, "closed_loop": True,
        "cuda_graph": use_graphs,
        "versions": versions(),
    }
    report = EvalReport(results=results, summary=summarize(results, seq_len), setup=setup)
    if out is not None and procs.is_main:
        final = Path(cfg.output)  # where the folder ``out`` is swapped in when this returns
        report.files = write_report(out, REPORT_NAME, report.to_json(), TABLE_NAME, summary_table(report), final)
        from .plots import plot_eval

        if plot_eval(report, out / PLOT_NAME):
            report.files.append(str(final / PLOT_NAME))
        emit("written", {"files": report.files})
    procs.barrier()  # the report is on disk before any process returns
    return report
