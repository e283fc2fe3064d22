"""The unfreeze sweep: what trains, what stays frozen, zero gate gradient under hard top-k, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import GateSelector, TopKPolicy
from posthoc_sparse.data import build_windows
from posthoc_sparse.errors import UserError
from posthoc_sparse.experiments.sweep import (SweepConfig, choose_layers, lm_train, loss_summary, run_sweep,
                                              trainable_parameters)
from posthoc_sparse.gates.io import load_gates
from posthoc_sparse.loading import load_model

from .tiny import random_ids, tiny_model

WIDE = {**os.environ, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def gated(tiny_gates):
    return tiny_gates


def test_choose_layers():
    assert choose_layers(28, 0.29, "spread") == [1, 5, 8, 12, 15, 19, 22, 26]
    assert choose_layers(10, 0.3, "first") == [0, 1, 2] and choose_layers(10, 0.3, "last") == [7, 8, 9]
    assert choose_layers(10, 0.0, "spread") == [] and choose_layers(10, 0.5, "0,5,9") == [0, 5, 9]


def test_hard_topk_gives_the_gate_exactly_zero_gradient():
    """The paper's second finding: a hard top-k mask passes no gradient to the gate that chose it."""
    model = tiny_model("llama")
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    bank = GateBank(gate_spec_for_model(model, d_g=8)).reset_random(0).requires_grad_(True)
    for p in trainable_parameters(model, [0, 1], "attention"):
        p.requires_grad_(True)
    ids = random_ids(2, 16)
    with SparseAttention(model, TopKPolicy(GateSelector(bank), 3)):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in bank.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_only_the_chosen_parameters_change_and_the_gate_never_does(gated):
    model_dir, corpus, gates = gated
    loaded = load_model(str(model_dir))
    model = loaded.model
    bank, _ = load_gates(gates)
    gate_before = {k: v.clone() for k, v in bank.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = trainable_parameters(model, [1], "attention")
    for p in params:
        p.requires_grad_(True)
    windows, _ = build_windows(loaded.tokenizer, str(corpus), "train", 32)
    cfg = SweepConfig(steps=3, lr=1e-2, batch_size=2)
    lm_train(model, params, TopKPolicy(GateSelector(bank), 4), windows, cfg, torch.device("cpu"))
    chosen = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in chosen:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
    assert all(torch.equal(v, gate_before[k]) for k, v in bank.state_dict().items())


def test_loss_summary_blocks_and_last_quarter():
    losses = [4.0] * 250 + [3.0] * 125 + [2.97] * 125  # 500 steps: flat at the end but for a 1% step
    got = loss_summary(losses)
    assert got["block"] == 25 and len(got["curve"]) == 20
    assert got["curve"][0] == 4.0 and got["curve"][-1] == pytest.approx(2.97)
    assert got["change_last_quarter"] == pytest.approx(-0.01)
    odd = loss_summary([float(i) for i in range(1, 42)])  # 41 steps: blocks of 3, the last one of 2
    assert odd["block"] == 3 and len(odd["curve"]) == 14 and odd["curve"][-1] == pytest.approx(40.5)
    assert odd["change_last_quarter"] == pytest.approx((sum(range(32, 42)) - sum(range(22, 32))) / sum(range(22, 32)))
    assert loss_summary([1.0, 2.0, 3.0])["change_last_quarter"] is None


def test_a_which_list_outside_the_model_is_refused_before_any_work(gated, tmp_path):
    model_dir, corpus, gates = gated
    for source in (dict(model=str(model_dir)), dict(gates=str(gates))):
        out = tmp_path / "s"
        with pytest.raises(UserError, match="outside 0..1"):
            run_sweep(SweepConfig(**source, dataset=str(corpus), which="0,5", distill_steps=1000, output=str(out)))
        assert not out.exists()


def test_the_sweeps_own_distillation_names_no_flag_the_sweep_lacks(gated, tmp_path, capsys):
    """Without --gates the sweep distills its gate with distill's defaults; an error whose advice names a flag of
    `sparsify distill` alone (d_g 32 on this model's 8 rotary pairs: --d-g 16) says whose flag it is, and what to do."""
    from sparsify_cli.main import main

    model_dir, corpus, _ = gated
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as stop:
        main(["unfreeze-sweep", "--model", str(model_dir), "--dataset", str(corpus), "--k", "4", "--seq-len", "32",
              "--output", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and lines[-1] == (
        "error: d_g=32 needs 16 rotary frequencies but the model has 8; use --d-g 16 (--d-g is a flag of "
        "`sparsify distill`: distill the gate there, pass it as --gates)"), lines
    assert not out.exists()


def test_sweep_points_gap_and_resume(gated, tmp_path):
    model_dir, corpus, gates = gated
    cfg = SweepConfig(gates=str(gates), dataset=str(corpus), layers="0,0.5", steps=4, lr=1e-2, eval_windows=3,
                      output=str(tmp_path / "s"))
    rep = run_sweep(cfg)
    assert [r["fraction"] for r in rep["table"]] == [0.0, 0.5]
    for row in rep["table"]:
        pts = {p["gate"]: p for p in rep["points"] if p["fraction"] == row["fraction"]}
        assert row["gap"] == pytest.approx(pts["random"]["ppl"] - pts["learned"]["ppl"])
    zero = [p for p in rep["points"] if p["fraction"] == 0.0]
    assert all(p["steps"] == 0 and p["n_params_trained"] == 0 for p in zero)
    assert all(p["train_loss"] is None for p in zero)
    for p in rep["points"]:  # a trained point keeps its loss curve: 4 steps -> 4 blocks of one, the quarters 1 step
        if p["steps"]:
            assert p["train_loss"]["curve"][0] == pytest.approx(p["train_loss_first"])
            assert p["train_loss"]["curve"][-1] == pytest.approx(p["train_loss_last"])
            c = p["train_loss"]["curve"]
            assert p["train_loss"]["change_last_quarter"] == pytest.approx((c[3] - c[2]) / c[2])
    assert (tmp_path / "s" / "sweep.json").exists() and (tmp_path / "s" / "sweep.png").exists()
    # The post-hoc point (f = 0): the distilled gate beats the random one on held-out text.
    assert rep["table"][0]["ppl_learned"] < rep["table"][0]["ppl_random"]

    events = []
    again = run_sweep(SweepConfig(**{**cfg.__dict__, "resume": True}), on_event=lambda k, i: events.append((k, i)))
    assert sum(1 for k, i in events if k == "point" and i.get("skipped")) == 4
    assert again["table"] == rep["table"]


def test_cli_unfreeze_sweep_end_to_end(gated, tmp_path):
    model_dir, corpus, gates = gated
    cmd = [sys.executable, "-m", "sparsify_cli", "unfreeze-sweep", "--gates", str(gates), "--dataset", str(corpus),
           "--layers", "0,0.5", "--steps", "2", "--eval-windows", "2", "--output", str(tmp_path / "cli")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=WIDE)
    assert run.returncode == 0, run.stderr
    assert "unfreeze sweep" in run.stdout and "gap (random - learned)" in run.stdout
    doc = json.loads((tmp_path / "cli" / "sweep.json").read_text())
    assert len(doc["points"]) == 4
    bad = subprocess.run(cmd[:-2] + ["--layers", "1.5", "--output", str(tmp_path / "bad")], capture_output=True,
                         text=True, env=WIDE)
    assert bad.returncode == 2 and "--layers" in bad.stderr


def test_a_points_dropout_comes_from_the_seed_and_the_step():
    """lm_train re-seeds torch every step (training.step_seed): a point's training does not depend on what drew random
    numbers before it (an earlier point, or none when a resumed sweep skips it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    from .tiny import VOCAB

    def losses(before: int, dropout: float = 0.3) -> list[float]:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                           resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
        model.requires_grad_(False)
        bank = GateBank(gate_spec_for_model(model, d_g=8)).reset_random(0)
        params = trainable_parameters(model, [1], "attention")
        for p in params:
            p.requires_grad_(True)
        torch.manual_seed(before)  # whatever drew random numbers before this point
        return lm_train(model, params, TopKPolicy(GateSelector(bank), 4), random_ids(6, 24), SweepConfig(
            steps=3, lr=1e-2, batch_size=2), torch.device("cpu"))

    assert losses(before=1) != losses(before=1, dropout=0.0)  # dropout is on and changes the losses
    assert losses(before=1) == losses(before=2)
