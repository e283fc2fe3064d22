"""`sparsify eval`: perplexity invariants, routing metrics, the JSON report and the real CLI."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys

import pytest
import torch

from posthoc_sparse.data import build_windows
from posthoc_sparse.errors import GateMismatchError, UserError
from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity
from posthoc_sparse.loading import load_model

from .tiny import save_tiny_checkpoint


WIDE = {**os.environ, "COLUMNS": "200"}  # rich wraps tables at 80 columns when not on a terminal


@pytest.fixture(scope="module")
def trained(tiny_gates):
    return tiny_gates


def _eval(trained, **kw):
    model, corpus, gates = trained
    base = dict(gates=str(gates), dataset=str(corpus), k="2,4", max_windows=6, seq_len=32)
    return evaluate_perplexity(EvalConfig(**(base | kw)))


def test_dense_perplexity_equals_the_models_own_loss(trained):
    model, corpus, _ = trained
    rep = _eval(trained, modes="dense")
    loaded = load_model(str(model))
    windows, _ = build_windows(loaded.tokenizer, str(corpus), "heldout", 32, max_windows=6)
    with torch.no_grad():
        loss = loaded.model(input_ids=windows, labels=windows).loss  # mean over all shifted tokens
    assert abs(rep.results[0].nll - float(loss)) < 1e-5
    assert rep.results[0].tokens == windows.shape[0] * 31


def test_each_windows_nll_is_reported_in_window_order(trained):
    """eval.json holds, per mode, every window's NLL sum (for bootstrap intervals over windows): they add up to
    the mode's NLL, and for dense each equals the model's own loss on that window alone."""
    model, corpus, _ = trained
    rep = _eval(trained, modes="dense,oracle", k="4", batch_size=4)  # batches of 4 and 2
    loaded = load_model(str(model))
    windows, _ = build_windows(loaded.tokenizer, str(corpus), "heldout", 32, max_windows=6)
    with torch.no_grad():
        own = [float(loaded.model(input_ids=w[None], labels=w[None]).loss) * 31 for w in windows]
    dense, oracle = rep.results
    assert dense.window_nll == pytest.approx(own, rel=1e-5)
    for r in (dense, oracle):
        assert len(r.window_nll) == 6 and sum(r.window_nll) / r.tokens == pytest.approx(r.nll, rel=1e-9)
    assert oracle.window_nll != pytest.approx(dense.window_nll, rel=1e-6)
    assert rep.to_json()["results"][1]["window_nll"] == oracle.window_nll


def test_oracle_with_k_at_least_t_equals_dense(trained):
    rep = _eval(trained, modes="dense,oracle", k="32")
    dense, oracle = rep.results
    assert abs(dense.perplexity - oracle.perplexity) < 1e-4 * dense.perplexity
    assert oracle.routing["recall"] == pytest.approx(1.0) and oracle.routing["mass"] == pytest.approx(1.0, abs=1e-5)


def test_modes_order_and_metrics_on_a_trained_gate(trained):
    rep = _eval(trained)
    by = {(r.mode, r.k): r for r in rep.results}
    for k in (2, 4):
        assert by[("oracle", k)].perplexity < by[("random", k)].perplexity
        assert by[("oracle", k)].routing["recall"] == pytest.approx(1.0)
        assert by[("gate", k)].routing["recall"] > by[("random", k)].routing["recall"]
        assert by[("gate", k)].routing["mass"] > by[("random", k)].routing["mass"]
        assert 0 < by[("gate", k)].routing["sparsity_causal"] < 1
    row = rep.summary[1]
    assert row["k"] == 4 and row["sparsity_all_keys"] == pytest.approx(1 - 4 / 32)
    gap = (row["random"] - row["gate"]) / (row["random"] - row["oracle"])
    assert row["gap_closed"] == pytest.approx(gap) and row["gate_over_oracle"] == pytest.approx(row["gate"] / row["oracle"])
    sink = by[("dense", None)].per_layer
    assert len(sink) == 2 and all(0 < r["first_token_share"] < 1 for r in sink)


def test_report_json_and_plot_have_every_field(trained, tmp_path):
    _eval(trained, output=str(tmp_path / "rep"))
    doc = json.loads((tmp_path / "rep" / "eval.json").read_text())
    setup = doc["setup"]
    for key in ("model", "gate_config", "data", "seq_len", "windows", "tokens_scored", "k", "modes", "versions",
                "random_seed", "closed_loop"):
        assert key in setup, key
    assert setup["data"]["split"] == "heldout" and setup["data"]["sha256"]
    assert {r["mode"] for r in doc["results"]} == {"dense", "oracle", "gate", "random"}
    for r in doc["results"]:
        if r["k"] is not None:
            assert {"recall", "f1", "mass", "sparsity_causal"} <= set(r["routing"]) and len(r["per_layer"]) == 2
    assert all(math.isfinite(r["perplexity"]) for r in doc["results"])
    assert (tmp_path / "rep" / "eval.png").stat().st_size > 1000


def test_gate_mismatch_and_bad_arguments(trained, tmp_path):
    model, corpus, gates = trained
    other = save_tiny_checkpoint(tmp_path / "other", "llama", layers=3)
    with pytest.raises(GateMismatchError, match="num_layers"):
        _eval(trained, model=str(other))
    with pytest.raises(UserError, match="--k"):
        _eval(trained, k="0")
    with pytest.raises(UserError, match="--modes"):
        _eval(trained, modes="dense,magic")
    with pytest.raises(UserError, match="needs --gates"):
        evaluate_perplexity(EvalConfig(model=str(model), dataset=str(corpus), modes="gate"))


def test_cli_eval_end_to_end(trained, tmp_path):
    model, corpus, gates = trained
    cmd = [sys.executable, "-m", "sparsify_cli", "eval", "--gates", str(gates), "--dataset", str(corpus),
           "--k", "2,4", "--max-windows", "3", "--output", str(tmp_path / "r")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=WIDE)
    assert run.returncode == 0, run.stderr
    assert "closed-loop perplexity" in run.stdout and "gap closed" in run.stdout
    doc = json.loads((tmp_path / "r" / "eval.json").read_text())
    gate4 = next(r for r in doc["results"] if r["mode"] == "gate" and r["k"] == 4)
    assert f"{gate4['perplexity']:.3f}" in run.stdout  # the CLI prints the library's numbers


def test_group_selection_shares_one_key_set_per_kv_group(trained):
    from posthoc_sparse.attention.interface import SparseAttention
    from posthoc_sparse.attention.policies import OracleSelector, TopKPolicy
    from posthoc_sparse.attention.reference import allowed_keys, group_scores, topk_keep

    sel = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    allowed = allowed_keys(None, 2, 8, 8, torch.device("cpu"))
    assert group_scores(sel, allowed, 1) is sel  # MHA: nothing to share
    keep = topk_keep(group_scores(sel, allowed, 2), allowed, 3)
    assert torch.equal(keep[:, 0], keep[:, 1]) and torch.equal(keep[:, 2], keep[:, 3])
    assert not torch.equal(keep[:, 0], keep[:, 2])
    assert (keep.sum(-1) == allowed.sum(-1).clamp(max=3)).all()  # still exactly min(k, allowed) per row

    model, corpus, _ = trained  # the tiny model: 4 query heads over 2 KV heads
    loaded = load_model(str(model))
    seen = []
    policy = TopKPolicy(OracleSelector(), 3, observer=lambda layer, s, allowed, keep: seen.append(keep),
                        selection="group")
    with torch.no_grad(), SparseAttention(loaded.model, policy):
        loaded.model(input_ids=torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1)))
    assert len(seen) == 2 and all(torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 2], k[:, 3]) for k in seen)


def test_group_selection_in_eval_costs_recall_and_equals_dense_at_full_k(trained):
    head = _eval(trained, modes="oracle,gate", k="4")
    group = _eval(trained, modes="dense,oracle,gate", k="4,32", selection="group")
    by = {(r.mode, r.k): r for r in group.results}
    assert group.setup["selection"] == "group" and head.setup["selection"] == "head"
    assert by[("oracle", 4)].routing["recall"] < 1.0  # a shared set misses some of each head's own top-k
    assert by[("oracle", 4)].routing["recall"] > head.results[1].routing["recall"] * 0.5
    dense = by[("dense", None)].perplexity
    assert by[("oracle", 32)].perplexity == pytest.approx(dense, rel=1e-4)
    with pytest.raises(UserError, match="--selection"):
        _eval(trained, modes="oracle", selection="blocks")


def test_windows_nll_through_shape_graphs_equals_the_eager_sum(trained):
    from posthoc_sparse.attention.graphs import ShapeGraphs
    from posthoc_sparse.attention.interface import SparseAttention
    from posthoc_sparse.attention.policies import OracleSelector, TopKPolicy
    from posthoc_sparse.evaluate.perplexity import windows_nll

    from .test_graphs import stand_in_capture

    model, corpus, _ = trained
    loaded = load_model(str(model))
    windows, _ = build_windows(loaded.tokenizer, str(corpus), "heldout", 32, max_windows=7)
    assert len(windows) == 7  # batches of 2, 2, 2 and a last one of 1 (its own shape)
    with SparseAttention(loaded.model, TopKPolicy(OracleSelector(), 4)):
        eager = windows_nll(loaded.model, windows, 2, torch.device("cpu"))
        graphs = ShapeGraphs(capture=stand_in_capture)
        replayed = windows_nll(loaded.model, windows, 2, torch.device("cpu"), graphs=graphs)
    assert replayed[1] == eager[1] == 7 * 31
    assert replayed[0] == pytest.approx(eager[0], rel=1e-6)
    assert graphs.replays == 2 and graphs.replayed_shapes == [[2, 32]]


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["head", "block"])
def test_eval_with_cuda_graphs_equals_eager_eval_on_gpu(trained, selection):
    """Every mode's perplexity with the forward replayed as CUDA graphs equals the eager eval's, and the report
    says which shapes were replayed (3 batches of 2: eager, captured, replayed)."""
    kw = dict(device="cuda", routing=False, batch_size=2, selection=selection, block_size=16)
    graphed = _eval(trained, **kw)
    eager = _eval(trained, cuda_graph=False, **kw)
    assert graphed.setup["cuda_graph"] and not eager.setup["cuda_graph"]
    for g, e in zip(graphed.results, eager.results, strict=True):
        assert (g.mode, g.k) == (e.mode, e.k)
        assert g.cuda_graph["failures"] == [] and g.cuda_graph["replayed_shapes"] == [[2, 32]], g.cuda_graph
        assert g.cuda_graph["replays"] == 2 and e.cuda_graph == {}
        assert g.perplexity == pytest.approx(e.perplexity, rel=1e-4)
