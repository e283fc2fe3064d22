"""apply_gates: exact restoration, KV-cache decoding equals the full forward, k >= T generates like dense."""

from __future__ import annotations

import pytest
import torch

from posthoc_sparse.deploy import apply_gates
from posthoc_sparse.errors import GateMismatchError, UserError
from posthoc_sparse.gates.io import gate_spec_for_model, save_gates
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids, tiny_model


def _bank(model, gate_input="hidden", seed=0):
    return GateBank(gate_spec_for_model(model, d_g=8, gate_input=gate_input)).reset_random(seed)


def test_apply_and_remove_restores_logits_bitwise(model):
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = model(ids).logits
        handle = apply_gates(model, _bank(model), k=3)
        during = model(ids).logits
        handle.remove()
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.equal(before, during)


@pytest.mark.parametrize("gate_input", ["hidden", "qk"])
def test_decoding_with_cache_equals_full_forward(model, gate_input):
    ids = random_ids(1, 22)
    with torch.no_grad(), apply_gates(model, _bank(model, gate_input), k=4):
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(9, 22):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_generation_matches_single_rows():
    model = tiny_model("llama")
    bank = _bank(model)
    a, b = random_ids(1, 7, seed=3), random_ids(1, 4, seed=4)
    batch = torch.full((2, 7), 2)
    batch[0], batch[1, 3:] = a[0], b[0]
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.no_grad(), apply_gates(model, bank, k=3):
        together = model.generate(batch, attention_mask=mask, **kw)
        alone = model.generate(b, attention_mask=torch.ones_like(b), **kw)
    assert torch.equal(together[1, 3:], alone[0])


def test_k_at_least_length_generates_exactly_like_dense():
    model = tiny_model("qwen3")
    ids = random_ids(1, 6)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with apply_gates(model, _bank(model), k=64):
            sparse = model.generate(ids, **kw)
    assert torch.equal(dense, sparse)


def test_sampling_works_under_the_gate():
    model = tiny_model("llama")
    torch.manual_seed(0)
    with torch.no_grad(), apply_gates(model, _bank(model), k=2):
        out = model.generate(random_ids(1, 5), max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    assert out.shape == (1, 10)


def test_mismatched_gate_and_bad_arguments_are_refused(tmp_path):
    model = tiny_model("llama")
    save_gates(tmp_path / "g", _bank(tiny_model("llama", layers=3)), {"k": 4})
    with pytest.raises(GateMismatchError, match="num_layers"):
        apply_gates(model, tmp_path / "g", k=4)
    with pytest.raises(UserError, match="k must be"):
        apply_gates(model, _bank(model), k=0)
    with pytest.raises(UserError, match="mode"):
        apply_gates(model, _bank(model), k=4, mode="fancy")


@pytest.mark.parametrize("max_memory", ["cpu=200KB", "cpu=1KB"])
def test_apply_gates_on_a_model_offloaded_by_a_device_map(tmp_path, max_memory):
    """With Accelerate's device map putting layers (or everything) on disk, each gate layer goes where its
    attention computes and the gated logits equal those of the plain model (the whole model offloaded once
    failed with "Cannot copy out of meta tensor")."""
    from posthoc_sparse.loading import load_model

    from .tiny import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "m", sharpen=3.0)
    plain = load_model(str(tmp_path / "m")).model
    save_gates(tmp_path / "g", GateBank(gate_spec_for_model(plain, d_g=8)).reset_random(0), {"k": 4})
    ids = random_ids(1, 20)
    offloaded = load_model(str(tmp_path / "m"), device_map="auto", max_memory=max_memory).model
    assert "disk" in offloaded.hf_device_map.values()
    for mode in ("gate", "random"):
        with apply_gates(plain, str(tmp_path / "g"), k=4, mode=mode):
            ref = plain(ids).logits
        with apply_gates(offloaded, str(tmp_path / "g"), k=4, mode=mode):
            torch.testing.assert_close(offloaded(ids).logits, ref)
