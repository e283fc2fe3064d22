"""Distillation end to end on a tiny checkpoint: learning, frozen base, artifacts, resume, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.distill.loop import distill
from posthoc_sparse.errors import UserError
from posthoc_sparse.gates.io import load_gates



WIDE = {**os.environ, "COLUMNS": "200"}  # rich wraps tables at 80 columns when not on a terminal


@pytest.fixture(scope="module")
def assets(trained_tiny):
    return trained_tiny


def _cfg(assets, out, **kw):
    model, corpus = assets
    base = dict(model=str(model), dataset=str(corpus), output=str(out), k=4, steps=60, seq_len=32, lr=3e-2,
                warmup=3, d_g=8, val_every=10, val_windows=4, checkpoint_every=10, gate_init="random")
    return DistillConfig(**(base | kw))


def test_distillation_lifts_recall_clearly_above_the_random_gate(assets, tmp_path):
    res = distill(_cfg(assets, tmp_path / "g"))
    assert res.loss_last < 0.7 * res.loss_first
    assert res.recall > res.recall_random + 0.15, (res.recall, res.recall_random)
    assert res.recall > res.recall_init + 0.1
    bank, cfg = load_gates(tmp_path / "g")
    assert cfg["k"] == 4 and cfg["steps"] == 60 and cfg["gate_input"] == "hidden" and cfg["num_layers"] == 2
    log = json.loads((tmp_path / "g" / "distill_log.json").read_text())
    assert len(log["history"]) == 60 and log["train"]["n_windows"] > 0
    assert log["recall_start"] == {"step": 0, "recall": res.recall_init, "recall_random": res.recall_random}
    assert log["history"][-1]["recall"] == res.recall


def test_distillation_on_sampled_query_blocks_learns(assets, tmp_path):
    """--row-fraction 0.5 on 256-token windows (each layer's loss from 1 of its 2 query blocks per step)."""
    res = distill(_cfg(assets, tmp_path / "g", seq_len=256, steps=30, k=16, row_fraction=0.5, val_every=30))
    assert res.loss_last < 0.7 * res.loss_first
    assert res.recall > res.recall_random + 0.1, (res.recall, res.recall_random)
    with pytest.raises(UserError, match="row-fraction"):
        _cfg(assets, tmp_path / "h", row_fraction=0.0).validate()


def test_resume_after_a_stop_gives_the_same_gate(assets, tmp_path):
    full = distill(_cfg(assets, tmp_path / "full", steps=20))
    # A run that stops after 10 steps (its checkpoint), then resumes to 20.
    cfg = _cfg(assets, tmp_path / "resumed", steps=20, checkpoint_every=10)
    _stop_after(cfg, 10)
    resumed = distill(_cfg(assets, tmp_path / "resumed", steps=20, checkpoint_every=10, resume=True))
    assert resumed.resumed_from == 10
    a, _ = load_gates(tmp_path / "full")
    b, _ = load_gates(tmp_path / "resumed")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    assert abs(full.loss_last - resumed.loss_last) < 1e-5


def _stop_after(cfg, n):
    class Stop(Exception):
        pass

    def on_event(kind, info):
        if kind == "checkpoint" and info["step"] == n:
            raise Stop

    with pytest.raises(Stop):
        distill(cfg, on_event=on_event)


def test_bad_inputs_are_user_errors(assets, tmp_path):
    with pytest.raises(UserError, match="k"):
        distill(_cfg(assets, tmp_path / "a", k=0))
    with pytest.raises(UserError, match="does not exist"):
        distill(_cfg(assets, tmp_path / "b", model=str(tmp_path / "missing")))
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        distill(_cfg(assets, tmp_path / "exists"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        distill(_cfg(assets, tmp_path / "c", dataset=str(empty)))


def test_cli_distill_end_to_end(assets, tmp_path):
    model, corpus = assets
    out = tmp_path / "cli-gates"
    cmd = [sys.executable, "-m", "sparsify_cli", "distill", "--model", str(model), "--dataset", str(corpus),
           "--k", "4", "--steps", "4", "--seq-len", "32", "--d-g", "8", "--output", str(out), "--val-every", "2",
           "--val-windows", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=WIDE)
    assert run.returncode == 0, run.stderr
    assert "distilled gates" in run.stdout and (out / "gates.safetensors").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=WIDE)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run(cmd[:-6] + ["--k", "0", "--output", str(tmp_path / "z")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--k must be a positive" in bad.stderr


@pytest.mark.gpu
def test_distillation_on_gpu_replays_cuda_graphs(assets, tmp_path):
    """On a GPU the steps replay as a CUDA graph (the log says which shapes did); the run learns as the eager
    one (--no-cuda-graph) does."""
    runs = {}
    for graph in (True, False):
        out = tmp_path / f"g{int(graph)}"
        runs[graph] = distill(_cfg(assets, out, device="cuda", seq_len=256, steps=20, k=16, d_g=16, val_every=20,
                                   cuda_graph=graph))
        log = json.loads((out / "distill_log.json").read_text())
        if graph:
            assert log["cuda_graph"]["replayed_shapes"] == [[1, 256]] and log["cuda_graph"]["failures"] == []
        else:
            assert log["cuda_graph"] is None
    # a gate dim the kernels do not take (8) runs the reference path on the GPU
    assert distill(_cfg(assets, tmp_path / "d8", device="cuda", seq_len=256, steps=3, k=16, d_g=8)).steps == 3
    assert runs[True].loss_last < runs[True].loss_first
    assert abs(runs[True].loss_last - runs[False].loss_last) < 0.05 * runs[False].loss_last
    assert abs(runs[True].recall - runs[False].recall) < 0.05


def test_a_failed_micro_batch_leaves_no_records_behind(monkeypatch):
    """_micro_batch clears the recording policy even when its losses fail part-way (a refused CUDA-graph capture
    must not leave a half-filled stack for the eager run that follows)."""
    from posthoc_sparse.attention.interface import SparseAttention
    from posthoc_sparse.attention.recording import RecordPolicy
    from posthoc_sparse.distill import layer_loss, step
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    from .tiny import random_ids, tiny_model

    model = tiny_model("qwen3", layers=2)
    bank = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0)
    policy = RecordPolicy(stack_layers=2)

    def refuse(*args, **kwargs):
        raise RuntimeError("refused")

    monkeypatch.setattr(layer_loss, "layer_loss_backward", refuse)
    with SparseAttention(model, policy), pytest.raises(RuntimeError, match="refused"):
        step._micro_batch(model, policy, bank, random_ids(1, 40), "kl", 4, 1.0, None, lambda *a: None)
    assert policy.records == {} and policy.stack is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_in_loop_recall_is_the_saved_gates_recall(assets, tmp_path, device):
    """The last validation of the loop scores the trained gate, not its initial weights: its recall equals a
    fresh open-loop recall of the saved gate on the same held-out windows. (On CUDA the fused AdamW step does
    not bump the weights' version counters, which a cached weight layout once missed.)"""
    from posthoc_sparse.data import build_windows
    from posthoc_sparse.distill.validate import open_loop_recall
    from posthoc_sparse.loading import load_model

    kw = dict(device=device, steps=12, val_every=12, seq_len=256, k=16, d_g=16) if device == "cuda" else \
        dict(steps=12, val_every=12)
    res = distill(_cfg(assets, tmp_path / "g", **kw))
    loaded = load_model(str(assets[0]), device=device)
    cfg = _cfg(assets, tmp_path / "g", **kw)
    windows, _ = build_windows(loaded.tokenizer, cfg.dataset, "heldout", cfg.seq_len, max_windows=cfg.val_windows)
    bank, _ = load_gates(tmp_path / "g", device=loaded.model.device)
    fresh = open_loop_recall(loaded.model, windows, {"gate": bank}, cfg.k, cfg.batch_size, loaded.model.device)
    assert res.recall == pytest.approx(fresh["gate"].overall()["recall"], abs=1e-6)
    assert res.recall != pytest.approx(res.recall_init, abs=1e-3)
