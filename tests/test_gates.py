"""Gate modules and their files: init from the model, save/load strictness, corrupt files, the weight cache."""

from __future__ import annotations

import json

import pytest
import torch

from posthoc_sparse.attention.interface import SparseAttention, attention_modules
from posthoc_sparse.attention.recording import RecordPolicy
from posthoc_sparse.attention.reference import scores
from posthoc_sparse.distill.layer_loss import kl_rows
from posthoc_sparse.errors import GateMismatchError, UserError
from posthoc_sparse.gates.io import (
    GATE_CONFIG_NAME,
    GATE_WEIGHTS_NAME,
    check_gate_matches,
    gate_spec_for_model,
    load_gates,
    read_gate_config,
    save_gates,
)
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids, tiny_model



def _record(model, t=16, b=2):
    policy = RecordPolicy()
    with SparseAttention(model, policy), torch.no_grad():
        model(input_ids=random_ids(b, t), use_cache=False)
    return policy.records


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_gate_init_from_model_with_full_width_reproduces_the_scores(arch):
    """With d_g = head_dim the model-initialised gate equals the true scores: KL ~ 0.

    Exact for the "qk" input everywhere, and for the "hidden" input on models without QK-norm or
    projection bias (Llama); a check of the gate's rotary phi against the model's own rotary.
    """
    model = tiny_model(arch)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else 16
    recs = _record(model)
    inputs = ["qk", "hidden"] if arch == "llama" else ["qk"]
    for gate_input in inputs:
        bank = GateBank(gate_spec_for_model(model, d_g=head_dim, gate_input=gate_input))
        bank.init_from_model(attention_modules(model))
        for layer, rec in recs.items():
            gq, gk = bank.layers[layer].project(rec.x, rec.query, rec.key, rec.cos, rec.sin)
            g = gq @ gk.transpose(-1, -2)
            s = scores(rec.query, rec.key, rec.scaling, rec.softcap)
            kl, _ = kl_rows(s, g, rec.allowed())
            assert float(kl) < 1e-6, (arch, gate_input, layer)


def _bank(model, seed=0):
    return GateBank(gate_spec_for_model(model, d_g=8)).reset_random(seed)


def test_save_load_round_trip_and_strictness(tmp_path):
    model = tiny_model("llama")
    bank = _bank(model)
    save_gates(tmp_path / "g", bank, {"base_model": "tiny-llama", "k": 4})
    cfg = json.loads((tmp_path / "g" / GATE_CONFIG_NAME).read_text())
    assert list(cfg) == sorted(cfg) and cfg["num_layers"] == 2 and cfg["d_g"] == 8
    loaded, cfg2 = load_gates(tmp_path / "g")
    for a, b in zip(bank.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.parameters())
    check_gate_matches(cfg2, model)

    other = tiny_model("llama", layers=3)
    with pytest.raises(GateMismatchError, match="num_layers 2 != model's 3"):
        check_gate_matches(cfg2, other)
    with pytest.raises(GateMismatchError, match="fingerprint"):
        check_gate_matches({**cfg2, "model_fingerprint": "abc"}, model, fingerprint="def")


def test_corrupt_and_incomplete_gate_folders_are_user_errors(tmp_path):
    model = tiny_model("llama")
    path = save_gates(tmp_path / "g", _bank(model), {"k": 4})
    weights = path / GATE_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_gates(path)
    cfg = json.loads((path / GATE_CONFIG_NAME).read_text())
    (path / GATE_CONFIG_NAME).write_text(json.dumps({**cfg, "from_the_future": 1}))
    with pytest.raises(UserError, match="from_the_future"):
        read_gate_config(path)
    (path / GATE_CONFIG_NAME).unlink()
    with pytest.raises(UserError, match="missing"):
        load_gates(path)
    with pytest.raises(UserError, match="does not exist"):
        load_gates(tmp_path / "nowhere")


def test_bad_d_g_is_a_user_error():
    model = tiny_model("llama")
    for bad in (0, -2, 7):
        with pytest.raises(UserError, match="d_g"):
            gate_spec_for_model(model, d_g=bad)


def test_hidden_projection_keeps_its_weight_until_the_parameters_change():
    """A frozen (deployed) gate's laid-out weight is reused between calls and refreshed after an in-place
    update or a load; a trainable gate's is laid out at every call, so an update that does not bump the
    parameters' version (CUDA's fused AdamW; here through .data) is seen, and gradients flow."""
    model = tiny_model("qwen3")
    gate = GateBank(gate_spec_for_model(model, d_g=16)).reset_random(0).requires_grad_(False).layers[0]
    x = torch.randn(1, 5, model.config.hidden_size)

    def fresh():
        return torch.matmul(x, gate.hidden_weight().detach()).view(1, 5, -1, 16)

    first = gate.hidden_projection(x)
    assert gate.hidden_projection(x).data_ptr() != first.data_ptr()
    kept = gate.__dict__["_weight_cache"][1]
    gate.hidden_projection(x)
    assert gate.__dict__["_weight_cache"][1] is kept
    torch.testing.assert_close(first, fresh())
    gate.wq.mul_(2.0)  # in place
    torch.testing.assert_close(gate.hidden_projection(x), fresh())
    gate.load_state_dict(GateBank(gate.spec).reset_random(1).layers[0].state_dict())
    torch.testing.assert_close(gate.hidden_projection(x), fresh())
    assert gate.hidden_projection(x, torch.float64).dtype == torch.float64

    gate.requires_grad_(True)
    gate.__dict__.pop("_weight_cache")
    with torch.no_grad():  # as validation during distillation runs
        gate.hidden_projection(x)
        version = gate.wq._version
        gate.wq.data.add_(1.0)  # an update the version counter does not see
        assert gate.wq._version == version and "_weight_cache" not in gate.__dict__
        torch.testing.assert_close(gate.hidden_projection(x), fresh())
    y = gate.hidden_projection(x)  # with grad: through the parameters
    y.sum().backward()
    assert gate.wq.grad is not None and gate.wq.grad.abs().sum() > 0
