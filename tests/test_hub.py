"""Gates on the hub, offline: a repository in a pre-populated cache resolves to its files, a missing one is one
clear error, and a push (stubbed) uploads only the gate files and a generated model card."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch

from posthoc_sparse.deploy import apply_gates
from posthoc_sparse.errors import UserError
from posthoc_sparse.gates.hub import is_hub_ref, model_card, push_gates
from posthoc_sparse.gates.io import gate_spec_for_model, load_gates, read_gate_config, save_gates
from posthoc_sparse.gates.modules import GateBank

from .tiny import random_ids, tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def gate_folder(tmp_path):
    model = tiny_model("llama")
    bank = GateBank(gate_spec_for_model(model, d_g=8)).reset_random(0)
    folder = save_gates(tmp_path / "gates", bank, {"base_model": "embedded:smollm2-135m", "k": 4,
                                                   "base_model_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.json").write_text("{}")
    return model, bank, folder


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, gate_folder):
    """The hub cache as huggingface_hub lays it out, holding user/tiny-gates at COMMIT (branch main)."""
    cache = tmp_path / "hub"
    repo = cache / "models--user--tiny-gates"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name in ("gate_config.json", "gates.safetensors"):
        (snap / name).write_bytes((gate_folder[2] / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_refs_and_local_folders_are_told_apart(gate_folder, tmp_path):
    assert is_hub_ref("user/repo") and is_hub_ref("user/repo@v1.0") and is_hub_ref("Org.x/my-gates@abc123")
    assert not is_hub_ref(str(gate_folder[2])) and not is_hub_ref("./gates/x") and not is_hub_ref("/abs/x")
    assert not is_hub_ref("just-a-name") and not is_hub_ref("a/b/c")


def test_a_cached_repository_loads_offline_as_a_folder_does(gate_folder, offline_cache):
    model, bank, folder = gate_folder
    for ref in ("user/tiny-gates", "user/tiny-gates@main", f"user/tiny-gates@{COMMIT}"):
        loaded, config = load_gates(ref)
        assert config == read_gate_config(folder)
        for a, b in zip(loaded.state_dict().values(), bank.state_dict().values()):
            torch.testing.assert_close(a, b)
    ids = random_ids(1, 12)
    with apply_gates(model, str(folder), k=4):
        ref = model(ids).logits
    with apply_gates(model, "user/tiny-gates", k=4):
        torch.testing.assert_close(model(ids).logits, ref)


def test_a_repository_not_in_the_cache_is_one_clear_error_offline(offline_cache):
    with pytest.raises(UserError, match=r"no gate folder user/other here, and the Hugging Face hub did not give"):
        load_gates("user/other")


def test_push_uploads_only_the_gate_files_and_a_model_card(gate_folder, monkeypatch):
    _, _, folder = gate_folder
    report = {"summary": [{"k": 4, "dense": 10.0, "oracle": 11.0, "gate": 11.5, "random": 90.0,
                           "gate_over_oracle": 11.5 / 11.0}], "setup": {"tokens_scored": 620, "seq_len": 32}}
    (folder / "eval.json").write_text(json.dumps(report))
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).rglob("*") if p.is_file())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_gates(folder, "user/tiny-gates", private=True)
    assert url == "https://huggingface.co/user/tiny-gates/commit/1"
    assert calls["create"] == ("user/tiny-gates", True, True)
    assert calls["files"] == ["README.md", "eval.json", "gate_config.json", "gates.safetensors"]  # no checkpoint/
    card = calls["card"]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "| k (keys kept per query) | 4 |" in card
    assert "| gate dimension d_g | 8 |" in card and "| 4 | 10.000 | 11.000 | 11.500 | 90.000 | 1.045 |" in card


def test_push_refuses_a_broken_folder_and_a_missing_report(gate_folder, tmp_path):
    _, _, folder = gate_folder
    with pytest.raises(UserError, match="eval report .* does not exist"):
        push_gates(folder, "user/x", eval_report=tmp_path / "none.json")
    (folder / "gates.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt or truncated"):
        push_gates(folder, "user/x")


def test_model_card_without_a_report_has_the_settings_only():
    card = model_card({"base_model": "./ckpt", "k": 64, "d_g": 32, "num_layers": 2, "num_heads": 4})
    assert card.startswith("---\nlibrary_name: posthoc-sparse") and "base_model:" not in card.split("---")[1]
    assert "| k (keys kept per query) | 64 |" in card and "Closed-loop" not in card


def test_cli_push_uploads_the_gate_files_with_the_eval_given(gate_folder, tmp_path, monkeypatch, capsys):
    from sparsify_cli.main import main

    _, _, folder = gate_folder
    report = tmp_path / "elsewhere" / "eval.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"summary": [{"k": 4, "dense": 10.0, "oracle": 11.0, "gate": 11.5, "random": 90.0,
                                               "gate_over_oracle": 11.5 / 11.0}], "setup": {"seq_len": 32}}))
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private)

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).rglob("*") if p.is_file())
            calls["revision"], calls["message"] = revision, commit_message
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/2"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    main(["push", "--gates", str(folder), "--repo", "user/tiny-gates", "--private", "--eval", str(report)])
    assert calls["create"] == ("user/tiny-gates", True)
    assert calls["files"] == ["README.md", "eval.json", "gate_config.json", "gates.safetensors"]
    assert calls["message"] == "Upload top-k gates (k=4)" and calls["revision"] is None
    assert "https://huggingface.co/user/tiny-gates/commit/2" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    ([], "--gates is required: the gate folder to push"),
    (["--gates", "GATES"], "--repo is required: the hub repository to push to, user/name (or org/name)"),
    (["--gates", "GATES", "--repo", "tiny-gates"], "--repo must be a hub repository user/name (or org/name), got "
                                                   "'tiny-gates'"),
    (["--gates", "GATES", "--repo", "user/x@v1"], "--repo takes no @revision, got 'user/x@v1'; pass --repo user/x "
                                                  "--revision v1"),
    (["--gates", "/no/such/folder", "--repo", "user/x"], "--gates /no/such/folder is not a folder; pass the folder "
                                                         "`sparsify distill` wrote"),
    (["--gates", "EMPTY", "--repo", "user/x"], "EMPTY/gate_config.json is missing; EMPTY is not a gate folder written "
                                               "by `sparsify distill`"),
], ids=["no gates", "no repo", "not user/name", "a revision", "no folder", "no gate_config.json"])
def test_cli_push_refuses_bad_arguments_in_one_line(gate_folder, args, message, tmp_path, capsys):
    from sparsify_cli.main import main

    (tmp_path / "empty").mkdir()
    names = {"GATES": str(gate_folder[2]), "EMPTY": str(tmp_path / "empty")}
    with pytest.raises(SystemExit) as stop:
        main(["push", *[names.get(a, a) for a in args]])
    assert (stop.value.code, capsys.readouterr().err) == (2, "error: " + message.replace("EMPTY", names["EMPTY"]) +
                                                          "\n")


def test_cli_push_offline_says_so_rather_than_to_log_in(gate_folder, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1: huggingface_hub refuses the request before any network use; no login would help."""
    from sparsify_cli.main import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")  # a login does not change it
    with pytest.raises(SystemExit) as stop:
        main(["push", "--gates", str(gate_folder[2]), "--repo", "user/tiny-gates"])
    assert (stop.value.code, capsys.readouterr().err) == (2, (
        "error: could not push to user/tiny-gates: the hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE "
        "is set) and a push needs the network; unset it, then push again\n"))
