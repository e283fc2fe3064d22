"""The absorption experiments: the soft relaxation and the training policies (what receives a gradient, what stays
frozen), `pretrain --gate-mode` on a tiny model, and `sparsify absorb` end to end (report, resume, CLI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from posthoc_sparse.attention.interface import SparseAttention
from posthoc_sparse.attention.policies import TopKPolicy
from posthoc_sparse.attention.selectors import GateSelector, RandomScoreSelector
from posthoc_sparse.attention.soft import SoftGatePolicy
from posthoc_sparse.attention.reference import (allowed_keys, masked_softmax, mass_outside_topk, soft_topk_bias,
                                                 standardize_rows, topk_keep)
from posthoc_sparse.errors import UserError
from posthoc_sparse.experiments.absorb import AbsorbConfig, run_absorb
from posthoc_sparse.experiments.pretrain import GATE_DIR, PretrainConfig, pretrain
from posthoc_sparse.gates.io import gate_spec_for_model, load_gates
from posthoc_sparse.gates.modules import GateBank

from .test_pretrain import phrase_corpus
from .tiny import tiny_tokenizer

WIDE = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("absorb")
    tiny_tokenizer().save_pretrained(root / "tok")
    return root / "tok", phrase_corpus(root / "corpus.txt")


def _tiny_gpt2(seed=0):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


# --- the soft relaxation --------------------------------------------------------------------------------------

def test_soft_bias_keeps_short_rows_and_tends_to_hard_topk_as_tau_shrinks():
    torch.manual_seed(0)
    b, h, t, k = 2, 3, 12, 4
    s = 0.1 * torch.randn(b, h, t, t)
    g = torch.stack([torch.randperm(t).float() for _ in range(b * h * t)]).view(b, h, t, t)  # gaps of at least 1
    allowed = allowed_keys(None, b, t, t, torch.device("cpu"))  # causal (B, 1, T, T)
    a = allowed.expand(b, h, t, t)
    bias = soft_topk_bias(g, allowed, k, tau=1.0)
    assert torch.isinf(bias[~a]).all() and (bias[a] <= 0).all()
    assert (bias[:, :, :k][a[:, :, :k]] == 0).all()  # rows with at most k keys keep every key, untouched
    keep = topk_keep(g, allowed, k)
    outside = []
    for tau in (1.0, 0.2, 0.05):
        soft = torch.softmax(s + soft_topk_bias(g, allowed, k, tau), dim=-1)
        outside.append(float(soft.masked_fill(keep, 0).sum(-1).max()))  # mass on keys hard top-k drops
    assert outside[0] > outside[1] > outside[2] and outside[2] < 1e-6
    # the kept keys above the threshold get (almost) no bias: their relative weights are the dense ones
    hard = masked_softmax(s, keep)
    assert torch.isfinite(hard).all()


def test_soft_bias_gradient_flows_to_the_gate_scores():
    torch.manual_seed(1)
    g = torch.randn(1, 1, 10, 10, requires_grad=True)
    allowed = allowed_keys(None, 1, 10, 10, torch.device("cpu"))
    s = torch.randn(1, 1, 10, 10)
    p = torch.softmax(s + soft_topk_bias(g, allowed, 3, 0.5), dim=-1)
    (p * torch.randn_like(p)).sum().backward()
    assert g.grad is not None and float(g.grad.abs().sum()) > 0
    assert float(g.grad[..., :3, :].abs().sum()) == 0  # the first 3 rows keep every key: no gate involved


def test_standardized_bias_is_invariant_to_the_gates_scale_and_shift():
    """A gate cannot weaken (switch off) or sharpen its own selection by scaling its scores: the standardized
    relaxation sees a * G + b exactly as G, for any a > 0 and any per-row b; the raw one does not."""
    torch.manual_seed(2)
    b, h, t, k = 2, 2, 24, 5
    g = torch.randn(b, h, t, t)
    allowed = allowed_keys(None, b, t, t, torch.device("cpu"))
    z = standardize_rows(g, allowed)
    a = allowed.expand_as(z)
    rows = a.sum(-1) > 1
    assert torch.allclose(z.masked_fill(~a, 0).sum(-1)[rows], torch.zeros(()), atol=1e-5)  # mean 0 per row
    assert torch.allclose((z.pow(2).masked_fill(~a, 0).sum(-1) / a.sum(-1))[rows], torch.ones(()), atol=1e-4)
    ref = soft_topk_bias(g, allowed, k, 0.1, standardize=True)
    for scale, shift in ((1e-3, 0.0), (50.0, 3.0), (0.2, torch.randn(b, h, t, 1))):
        other = soft_topk_bias(scale * g + shift, allowed, k, 0.1, standardize=True)
        torch.testing.assert_close(other[a], ref[a], atol=2e-4, rtol=1e-4)
    shrunk = soft_topk_bias(1e-3 * g, allowed, k, 0.1)  # raw: a tiny scale flattens the bias toward log(1/2)
    long_rows = (allowed.sum(-1, keepdim=True) > k).expand_as(a) & a
    assert float(shrunk[long_rows].min()) > -0.75 and float(ref[long_rows].min()) < -20


def test_the_standardized_gate_cannot_switch_itself_off_in_a_model():
    """Scaling every gate weight down by 1000 leaves the soft-gated model's output unchanged (standardized scores),
    whereas with raw scores it drifts to dense attention: the loophole the standardization closes."""
    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    bank = _bank(model, requires_grad=False)
    small = _bank(model, requires_grad=False)
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(0.03)  # scores are bilinear in the weights: x 0.03^2 ~ 1e-3
        dense = model(input_ids=ids).logits
        out = {}
        for scores in ("standardized", "raw"):
            for name, b in (("gate", bank), ("small", small)):
                with SparseAttention(model, SoftGatePolicy(b, k=4, tau=0.05, scores=scores)):
                    out[scores, name] = model(input_ids=ids).logits
    torch.testing.assert_close(out["standardized", "small"], out["standardized", "gate"], atol=2e-4, rtol=1e-4)
    drift = lambda x: float((x - dense).abs().max())  # noqa: E731
    assert drift(out["raw", "small"]) < 0.2 * drift(out["raw", "gate"])  # raw: the shrunken gate is nearly dense


def test_mass_outside_topk_counts_only_rows_that_drop_keys_and_shrinks_with_tau():
    torch.manual_seed(3)
    b, h, t, k = 1, 2, 20, 4
    s, g = torch.randn(b, h, t, t), torch.randn(b, h, t, t)
    allowed = allowed_keys(None, b, t, t, torch.device("cpu"))
    dense = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    total, rows = mass_outside_topk(dense, g, allowed, k)
    assert int(rows) == b * h * (t - k)  # rows 0..k-1 keep every key
    keep = topk_keep(g, allowed, k)
    expected = dense.masked_fill(keep, 0).sum(-1)[..., k:, ].sum()
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    outside = []
    for tau in (1.0, 0.3, 0.05):
        p = torch.softmax(s + soft_topk_bias(g, allowed, k, tau, standardize=True), -1)
        m, n = mass_outside_topk(p, g, allowed, k)
        outside.append(float(m / n))
    assert outside[0] > outside[1] > outside[2] and outside[2] < 0.1


def test_soft_topk_gives_the_bias_and_the_keep_mask_of_one_topk():
    from posthoc_sparse.attention.reference import soft_topk, standardize_rows

    torch.manual_seed(4)
    b, h, t, k = 2, 3, 24, 5
    g = torch.randn(b, h, t, t)
    allowed = allowed_keys(None, b, t, t, torch.device("cpu"))
    for standardize in (False, True):
        bias, keep = soft_topk(g, allowed, k, 0.2, standardize)
        assert torch.equal(keep, topk_keep(g, allowed, k))  # the mass outside is measured against these keys
        z = standardize_rows(g, allowed) if standardize else g
        kth = z.masked_fill(~allowed, float("-inf")).sort(-1, descending=True).values[..., k - 1:k]
        full = allowed.sum(-1, keepdim=True) <= k
        expected = torch.nn.functional.logsigmoid((z - kth) / 0.2).masked_fill(full, 0.0)
        mask = allowed.expand_as(bias)
        assert torch.allclose(bias[mask], expected[mask], atol=1e-6)
        assert torch.isinf(bias[~mask]).all()
    bad = g.clone()
    bad[0, 0, t - 1, 3] = float("nan")  # a NaN score is not hidden: its row's bias is not a clean 0
    bias, _ = soft_topk(bad, allowed, k, 0.2)
    assert torch.isnan(bias[0, 0, t - 1]).any() and torch.isfinite(bias[0, 1, t - 1, :t]).all()


# --- the training policies ------------------------------------------------------------------------------------

def _bank(model, requires_grad=True):
    bank = GateBank(gate_spec_for_model(model, 8, "hidden")).reset_random(0)
    return bank.requires_grad_(requires_grad)


def _loss(model, policy, ids):
    with SparseAttention(model, policy):
        return model(input_ids=ids, labels=ids, use_cache=False).loss


def test_soft_policy_sends_gradient_to_the_gate_and_the_model():
    model = _tiny_gpt2()
    bank = _bank(model)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    _loss(model, SoftGatePolicy(bank, k=4), ids).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bank.parameters())
    q_rows = model.transformer.h[0].attn.c_attn.weight.grad  # the model's Q/K/V projection
    assert q_rows is not None and float(q_rows.abs().sum()) > 0


def test_the_compiled_relaxation_equals_the_eager_one_and_compiles_once_for_every_tau():
    """--gate-compile: the same loss, mass outside top-k and gradients (gate and model) as the eager relaxation,
    within fp32 rounding, at two temperatures; the second temperature reuses the first one's graph."""
    import torch._dynamo

    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    torch._dynamo.reset()
    for compiled in (False, True):
        bank = _bank(model)
        policy = SoftGatePolicy(bank, k=4, tau=0.5, compile=compiled)
        runs[compiled] = []
        for tau in (0.5, 0.1):
            policy.tau = tau
            torch.manual_seed(1)  # the same dropout masks in both runs
            with torch._dynamo.config.patch(error_on_recompile=compiled and tau == 0.1):
                loss = _loss(model, policy, ids)
                params = list(bank.parameters()) + [model.transformer.h[0].attn.c_attn.weight]
                grads = torch.autograd.grad(loss, params)
            runs[compiled].append((loss.detach(), policy.take_mass_outside(), *grads))
    for eager, fused in zip(runs[False], runs[True]):
        for a, b in zip(eager, fused):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert not torch.equal(runs[False][0][0], runs[False][1][0])  # the two temperatures do differ
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once, used at both


@pytest.mark.gpu
def test_a_soft_step_never_makes_the_host_wait_for_the_gpu():
    """Forward and backward of a soft-gated model on CUDA with no device sync in the policy (the training loop reads
    its numbers back only every few steps, so a sync inside the policy would serialize host and GPU at every layer).
    The forward is checked inside the policy's calls only: transformers' mask building syncs once per forward, by
    its own choice (``find_packed_sequence_indices`` reads a flag back), which is not ours to remove. The whole
    backward is checked."""

    class Strict(SoftGatePolicy):
        def __call__(self, call):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return super().__call__(call)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    model = _tiny_gpt2().cuda()
    bank = _bank(model).cuda()
    policy = Strict(bank, k=4)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    _loss(model, SoftGatePolicy(bank, k=4), ids).backward()  # warm-up: first-call allocations and lazy inits may sync
    torch.cuda.synchronize()
    loss = _loss(model, policy, ids)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
        mass = policy.take_mass_outside()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mass is not None and 0 <= float(mass[0]) <= float(mass[1])


def test_hard_topk_policy_gives_the_gate_no_gradient_but_trains_the_model():
    model = _tiny_gpt2()
    bank = _bank(model)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = _loss(model, TopKPolicy(GateSelector(bank), k=4), ids)
    grads = torch.autograd.grad(loss, list(bank.parameters()) + [model.transformer.h[0].attn.c_attn.weight],
                                allow_unused=True)
    assert all(g is None for g in grads[:-1])  # no path from the loss through the hard mask to the gate
    assert grads[-1] is not None and float(grads[-1].abs().sum()) > 0


def test_soft_policy_with_k_at_least_t_is_dense_attention():
    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with SparseAttention(model, SoftGatePolicy(_bank(model), k=16)):
            soft = model(input_ids=ids).logits
    torch.testing.assert_close(soft, dense, atol=1e-5, rtol=1e-5)


def test_random_selector_draws_a_fresh_mask_per_forward_and_repeats_under_a_seed():
    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    policy = TopKPolicy(RandomScoreSelector(), k=3)
    with torch.no_grad(), SparseAttention(model, policy):
        torch.manual_seed(5)
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
        torch.manual_seed(5)
        c = model(input_ids=ids).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


# --- pretrain --gate-mode -------------------------------------------------------------------------------------

def _moved(bank, init) -> float:
    with torch.no_grad():
        return max(float((a - b).abs().max()) for a, b in zip(bank.parameters(), init.parameters(), strict=True))


def _pcfg(assets, out, mode, **kw):
    tok, corpus = assets
    base = dict(dataset=str(corpus), tokenizer=str(tok), output=str(out), n_layer=2, d_model=32, n_head=2, d_ff=64,
                seq_len=32, steps=12, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=12, eval_windows=2,
                checkpoint_every=6, log_every=3, gate_mode=mode, gate_k=4, gate_d_g=8)
    return PretrainConfig(**(base | kw))


@pytest.mark.parametrize("mode", ["soft-learned", "soft-random", "hard-topk", "stochastic"])
def test_pretrain_gate_modes_train_the_model_and_only_the_soft_learned_gate(assets, tmp_path, mode):
    from safetensors.torch import load_file

    res = pretrain(_pcfg(assets, tmp_path / mode, mode))
    assert res.loss_last < res.loss_first
    weights = load_file(str(tmp_path / mode / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    if mode == "stochastic":
        assert res.gate_grad is None and not (tmp_path / mode / GATE_DIR).exists()
        return
    bank, cfg = load_gates(tmp_path / mode / GATE_DIR)
    init = GateBank(bank.spec).reset_random(0)
    moved = _moved(bank, init)
    assert res.gate_grad["steps"] == 12
    if mode == "soft-learned":
        assert res.gate_grad["steps_with_gradient"] == 12 and res.gate_grad["max_norm"] > 0 and moved > 0
    else:  # frozen (soft-random) or behind the hard mask (hard-topk): nothing reaches it, it never moves
        assert res.gate_grad["steps_with_gradient"] == 0 and res.gate_grad["max_norm"] == 0.0 and moved == 0.0
    assert cfg["loss"] == f"lm:{mode}" and cfg["k"] == 4


def test_reading_the_step_numbers_back_every_few_steps_changes_none_of_them(assets, tmp_path):
    """The loop reads its per-step numbers back every log_every steps (step_records): every step's loss, gradient
    norms and mass outside top-k, and their order, are those of a read per step; so are the trained weights."""
    from safetensors.torch import load_file

    steps = {}
    for every in (1, 5):
        events = []
        pretrain(_pcfg(assets, tmp_path / str(every), "soft-learned", steps=11, log_every=every, checkpoint_every=4),
                 on_event=lambda kind, info, events=events: events.append(info) if kind == "step" else None)
        steps[every] = [{k: v for k, v in e.items() if k not in ("seconds", "tokens_per_second")} for e in events]
    assert [e["step"] for e in steps[5]] == list(range(1, 12))
    assert steps[5] == steps[1] and all(e["gate_grad_norm"] > 0 and 0 < e["mass_outside"] < 1 for e in steps[5])
    a, b = (load_file(str(tmp_path / str(every) / "model.safetensors")) for every in (1, 5))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_diverged_loss_read_back_late_is_caught_at_its_own_step_and_saves_nothing(assets, tmp_path):
    from posthoc_sparse.errors import UserError

    messages = []
    for every in (1, 7):  # read back at every step, and every 7 steps: the same step is named
        with pytest.raises(UserError) as err:
            pretrain(_pcfg(assets, tmp_path / str(every), "dense", lr=500.0, warmup=0, steps=40, log_every=every,
                           checkpoint_every=40, max_loss_ratio=1.5))
        messages.append(str(err.value))
        assert not (tmp_path / str(every) / "model.safetensors").exists()
    assert messages[0] == messages[1] and re.search(r"(non-finite at|diverged by) step [1-6]\b", messages[1])


@pytest.mark.parametrize("mode", ["soft-learned", "soft-random"])
def test_soft_runs_log_the_mass_outside_top_k_and_end_below_the_bound(assets, tmp_path, mode):
    """Every step logs the attention mass outside the gate's top-k and the annealed tau; with the default
    relaxation (standardized scores, tau annealed to 0.05) it ends below 0.1, for the learned and the random gate."""
    res = pretrain(_pcfg(assets, tmp_path / mode, mode, steps=24, eval_every=24, log_every=1))
    hist = res.history
    assert [h["step"] for h in hist] == list(range(1, 25)) and all(h["mass_outside"] is not None for h in hist)
    assert hist[0]["tau"] == pytest.approx(0.5) and hist[-1]["tau"] == pytest.approx(0.05)
    assert all(a["tau"] > b["tau"] for a, b in zip(hist, hist[1:]))
    summary = json.loads((tmp_path / mode / "pretrain_log.json").read_text())["mass_outside"]
    assert summary["last"] == hist[-1]["mass_outside"] and len(summary["curve"]) == 24
    assert summary["last"] < 0.1 < summary["first"]


def test_gate_mode_runs_resume_exactly(assets, tmp_path):
    from safetensors.torch import load_file

    full = pretrain(_pcfg(assets, tmp_path / "full", "soft-learned"))

    class Stop(Exception):
        pass

    def stop_at_6(kind, info):
        if kind == "checkpoint" and info["step"] == 6:
            raise Stop

    with pytest.raises(Stop):
        pretrain(_pcfg(assets, tmp_path / "cut", "soft-learned"), on_event=stop_at_6)
    resumed = pretrain(_pcfg(assets, tmp_path / "cut", "soft-learned", resume=True))
    assert resumed.resumed_from == 6 and resumed.gate_grad["steps"] == 12
    for name in ("model.safetensors", f"{GATE_DIR}/gates.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert full.gate_grad["steps_with_gradient"] == 12


def test_bad_gate_settings_are_user_errors(assets, tmp_path):
    for kw, match in (({"gate_mode": "soft"}, "gate-mode"), ({"gate_k": 32}, "gate-k"), ({"gate_tau": 0.0}, "tau")):
        with pytest.raises(UserError, match=match):
            _pcfg(assets, tmp_path / "x", "soft-learned", **kw).validate()


# --- sparsify absorb ------------------------------------------------------------------------------------------

def _acfg(assets, out, **kw):
    tok, corpus = assets
    base = dict(dataset=str(corpus), tokenizer=str(tok), output=str(out), seeds=2, steps=16, k=4, d_g=8,
                distill_steps=6, distill_every=3, distill_batch_size=4, distill_lr=1e-2, eval_windows=3, n_layer=2,
                d_model=32, n_head=2, d_ff=64, seq_len=32, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=2)
    return AbsorbConfig(**(base | kw))


def test_bad_gate_settings_of_absorb_are_refused_before_the_dense_arm_trains(assets, tmp_path):
    for kw in ({"d_g": 7}, {"tau": 0.0}):
        with pytest.raises(UserError, match="--d-g must be even and --tau positive"):
            run_absorb(_acfg(assets, tmp_path / "r", **kw))
        assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def absorbed(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("absorb-run") / "report"
    events = []
    report = run_absorb(_acfg(assets, out), on_event=lambda kind, info: events.append((kind, info)))
    return out, report, events


def test_absorb_writes_every_experiment_with_consistent_numbers(absorbed):
    out, report, _ = absorbed
    res = report["results"]
    assert set(res) == {"soft", "hard", "coadapt", "stochastic", "posthoc"}
    assert json.loads((out / "absorb.json").read_text())["results"]["hard"] == res["hard"]
    summary = (out / "summary.md").read_text()
    for title in ("Soft gating", "Hard top-k", "co-adapted", "Stochastic", "Post hoc"):
        assert title in summary
    assert {p.rsplit("/", 1)[1] for p in report["plots"]} == {f"absorb-{e}.png" for e in
                                                             ("soft", "hard", "coadapt", "stochastic", "posthoc")}
    # soft: two seeds, learned and random, and the summary statistics are those of the per-seed values
    rows = res["soft"]["per_seed"]
    assert len(rows) == 2
    mean = sum(r["learned"]["ppl_as_trained"] for r in rows) / 2
    assert res["soft"]["stats"]["ppl_as_trained"]["learned"]["mean"] == pytest.approx(mean)
    assert all(r["learned"]["gate_moved"] > 0 and r["random"]["gate_moved"] == 0 for r in rows)
    assert all(r["learned"]["gate_grad_mean"] > 0 and r["random"]["gate_grad_mean"] == 0 for r in rows)
    # hard: measured at every step, never a gradient, the gate never moved
    h = res["hard"]
    assert h["steps_measured"] == 16 and h["steps_with_gradient"] == 0 and h["max_gate_grad_norm"] == 0.0
    assert h["gate_moved"] == 0.0 and h["soft_learned_gate_grad_mean"] > 0
    # coadapt: one row per model, each with the four perplexities of the same windows
    assert [r["model"] for r in res["coadapt"]] == ["dense", "coadapted"]
    for r in res["coadapt"]:
        assert 0 < r["recall"] <= 1 and r["gate_over_oracle"] == pytest.approx(r["ppl_gate"] / r["ppl_oracle"])
    # the dense model's numbers agree wherever they appear
    dense = res["coadapt"][0]["ppl_dense"]
    assert res["stochastic"]["dense_baseline"]["ppl_dense"] == pytest.approx(dense)
    assert res["posthoc"]["ppl_dense"] == pytest.approx(dense)
    assert res["stochastic"]["dense_ratio"] == pytest.approx(res["stochastic"]["stochastic"]["ppl_dense"] / dense)
    # posthoc: a point at step 0 and every distill_every steps
    assert [p["step"] for p in res["posthoc"]["curve"]] == [0, 3, 6]


def test_absorb_resume_reuses_finished_pieces(assets, absorbed):
    out, report, _ = absorbed
    events = []
    again = run_absorb(_acfg(assets, out, resume=True), on_event=lambda kind, info: events.append(kind))
    assert "pretrain:step" not in events and "distill:step" not in events and "eval" not in events
    assert json.loads(json.dumps(again["results"])) == json.loads(json.dumps(report["results"]))


def test_the_top_level_api_names_the_experiments():
    import posthoc_sparse
    from posthoc_sparse.experiments.sweep import SweepConfig, run_sweep

    assert posthoc_sparse.run_absorb is run_absorb and posthoc_sparse.AbsorbConfig is AbsorbConfig
    assert posthoc_sparse.run_sweep is run_sweep and posthoc_sparse.SweepConfig is SweepConfig


def test_absorb_refuses_bad_settings(assets, tmp_path):
    for kw, match in (({"experiments": "soft,nope"}, "experiments"), ({"k": 32}, "--k"),
                      ({"distill_every": 10}, "distill-every"), ({"seeds": 0}, "seeds")):
        with pytest.raises(UserError, match=match):
            run_absorb(_acfg(assets, tmp_path / "bad", **kw))
    assert not (tmp_path / "bad").exists()


def test_cli_absorb_runs_one_experiment_and_exits_2_on_errors(assets, tmp_path):
    tok, corpus = assets
    cmd = [sys.executable, "-m", "sparsify_cli", "absorb", "--dataset", str(corpus), "--tokenizer", str(tok),
           "--experiments", "hard", "--steps", "6", "--k", "4", "--d-g", "8", "--n-layer", "1", "--d-model", "32",
           "--n-head", "2", "--d-ff", "64", "--seq-len", "32", "--batch-size", "4", "--eval-windows", "2",
           "--warmup", "2", "--output", str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=WIDE, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Hard top-k" in done.stdout and "absorb.json" in done.stdout
    hard = json.loads((tmp_path / "r" / "absorb.json").read_text())["results"]["hard"]
    assert hard["steps_measured"] == 6 and hard["steps_with_gradient"] == 0
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "r2"), "--experiments", "nope"], capture_output=True, text=True,
                         env=WIDE, timeout=120)
    assert bad.returncode == 2 and "experiments" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("command, flags, flag", [
    ("pretrain", ["--gate-mode", "hard-topk", "--gate-k", "4"], "--gate-d-g"),
    ("absorb", ["--experiments", "hard", "--k", "4"], "--d-g"),
], ids=["pretrain", "absorb"])
def test_a_gate_wider_than_the_heads_is_refused_naming_the_commands_own_flag(assets, tmp_path, capsys, command,
                                                                              flags, flag):
    """A llama model of d_model 32 and 2 heads has 8 rotary frequencies; the default gate (32 dims) needs 16. The
    advice names the flag of that command (pretrain's --gate-d-g, absorb's --d-g), before any data is read or run
    trained; the run in the loop (``training_gate``) names pretrain's flag as well."""
    from sparsify_cli.main import main

    from posthoc_sparse.experiments.in_loop import training_gate
    from posthoc_sparse.experiments.lm import build_model

    tok, corpus = assets
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main([command, "--dataset", str(corpus), "--tokenizer", str(tok), "--arch", "llama", "--n-layer", "1",
              "--d-model", "32", "--n-head", "2", "--d-ff", "64", "--seq-len", "32", "--steps", "2", *flags,
              "--output", str(out)])
    assert (stop.value.code, capsys.readouterr().err) == (
        2, f"error: d_g=32 needs 16 rotary frequencies but the model has 8; use {flag} 16\n")
    assert not out.exists()
    cfg = PretrainConfig(arch="llama", n_layer=1, d_model=32, n_head=2, d_ff=64, seq_len=32, gate_mode="hard-topk")
    with pytest.raises(UserError, match="; use --gate-d-g 16$"):
        training_gate(cfg, build_model(cfg, vocab_size=50))
