"""Data parallel runs equal one-process runs; --device-map spreads one model and changes no number.

Two processes are started the way users start them, `torchrun --standalone --nproc_per_node 2 -m sparsify_cli`
(gloo on the CPU), with half the per-process batch of the one-process reference, so the global batch is the
same. (`accelerate launch --cpu --num_processes 2` starts a single process on this kind of machine.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.distill.loop import distill
from posthoc_sparse.errors import UserError
from posthoc_sparse.evaluate.perplexity import EvalConfig, evaluate_perplexity

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "POSTHOC_SPARSE_DEBUG": "1"}
DISTILL = dict(k=4, steps=6, seq_len=32, lr=3e-2, warmup=2, d_g=8, val_every=3, val_windows=3, checkpoint_every=3,
               gate_init="random")
EVAL = dict(k="4,8", max_windows=3)  # 3 windows over 2 processes: uneven shares


def _flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sparsify_cli", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def runs(trained_tiny, tmp_path_factory):
    """The same distillation and evaluation on 2 processes x batch 1 (CLI) and 1 process x batch 2 (library)."""
    model, corpus = trained_tiny
    root = tmp_path_factory.mktemp("multiprocess")
    one, two = root / "one", root / "two"
    base = dict(model=str(model), dataset=str(corpus)) | DISTILL
    distill(DistillConfig(**base, output=str(one / "gates"), batch_size=2))
    distilled = torchrun("distill", *_flags(base | {"output": two / "gates", "batch_size": 1}))
    evaluate_perplexity(EvalConfig(gates=str(one / "gates"), output=str(one / "eval"), **EVAL))
    evaluated = torchrun("eval", *_flags({"gates": one / "gates", "output": two / "eval"} | EVAL))
    return one, two, distilled, evaluated


def test_two_processes_distill_the_same_gate_as_one(runs):
    one, two, _, _ = runs
    a, b = load_file(one / "gates" / "gates.safetensors"), load_file(two / "gates" / "gates.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    log1 = json.loads((one / "gates" / "distill_log.json").read_text())
    log2 = json.loads((two / "gates" / "distill_log.json").read_text())
    assert log2["processes"] == 2 and log1["processes"] == 1
    for h1, h2 in zip(log1["history"], log2["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h2.get("recall") == pytest.approx(h1.get("recall"), abs=1e-9)  # held-out windows shared out
    state = json.loads((two / "gates" / "checkpoint" / "state.json").read_text())["meta"]
    assert state["step"] == DISTILL["steps"] and state["sampler"]["batch_size"] == 2  # the global batch


def test_two_processes_evaluate_like_one(runs):
    one, two, _, _ = runs
    r1 = json.loads((one / "eval" / "eval.json").read_text())
    r2 = json.loads((two / "eval" / "eval.json").read_text())
    assert r2["setup"]["processes"] == 2 and r2["setup"]["windows"] == 3
    for a, b in zip(r1["results"], r2["results"], strict=True):
        assert (a["mode"], a["k"], a["tokens"]) == (b["mode"], b["k"], b["tokens"]) == (a["mode"], a["k"], 3 * 31)
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-9)  # each window scored once, by one process
        for key, value in a["routing"].items():
            assert b["routing"][key] == pytest.approx(value, rel=1e-9), key


def test_only_the_main_process_reports(runs):
    _, two, distilled, evaluated = runs
    assert distilled.stderr.count("2 data-parallel processes") == 1
    assert distilled.stdout.count("distilled gates ->") == 1
    assert evaluated.stdout.count("closed-loop perplexity") == 1
    assert not [p.name for p in (two / "gates").iterdir() if p.name.startswith(".")]  # no stray temporary files


@pytest.mark.slow
def test_two_processes_sweep_like_one(runs, tmp_path):
    """Unfreeze-sweep: LM training on half the batch per process (gradients averaged), shared-out evaluation."""
    from posthoc_sparse.experiments.sweep import SweepConfig, run_sweep

    one, _, _, _ = runs
    settings = dict(gates=one / "gates", layers="0.5", steps=2, eval_windows=3, lr=1e-3)
    ref = run_sweep(SweepConfig(**{k: str(v) if k == "gates" else v for k, v in settings.items()}, batch_size=2,
                                output=str(tmp_path / "one")))
    torchrun("unfreeze-sweep", *_flags(settings | {"batch_size": 1, "output": tmp_path / "two"}))
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert two["processes"] == 2
    for a, b in zip(ref["points"], two["points"], strict=True):
        assert (a["gate"], a["tokens"]) == (b["gate"], b["tokens"])
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
        assert b["dense_ppl_after"] == pytest.approx(a["dense_ppl_after"], rel=1e-5)
        assert b["train_loss_last"] == pytest.approx(a["train_loss_last"], rel=1e-5)


def test_two_processes_pretrain_like_one_with_a_gate_in_the_loop(tmp_path):
    """Pretrain: DDP averages the model's gradients, the gate outside DDP is averaged by hand; both end equal."""
    from posthoc_sparse.experiments.pretrain import GATE_DIR, PretrainConfig, pretrain

    from .test_pretrain import phrase_corpus
    from .tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    settings = dict(dataset=phrase_corpus(tmp_path / "corpus.txt"), tokenizer=tmp_path / "tok", n_layer=2, d_model=32,
                    n_head=2, d_ff=64, seq_len=32, steps=6, lr=3e-3, warmup=2, eval_every=3, eval_windows=3,
                    checkpoint_every=3, gate_mode="soft-learned", gate_k=4, gate_d_g=8, device="cpu")
    pretrain(PretrainConfig(**{k: str(v) if k in ("dataset", "tokenizer") else v for k, v in settings.items()},
                            batch_size=4, output=str(tmp_path / "one")))
    torchrun("pretrain", *_flags(settings | {"batch_size": 2, "output": tmp_path / "two"}))
    for name in ("model.safetensors", f"{GATE_DIR}/gates.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    log = json.loads((tmp_path / "two" / "pretrain_log.json").read_text())
    assert log["processes"] == 2 and log["gate_grad"]["steps_with_gradient"] == 6


def test_device_map_spreads_the_model_and_changes_no_number(trained_tiny, tmp_path):
    """A 200 KB budget leaves room for the embeddings only: the layers go to disk and run through hooks."""
    from posthoc_sparse.attention.interface import attention_modules
    from posthoc_sparse.devices import execution_devices, input_device
    from posthoc_sparse.loading import load_model

    model, corpus = trained_tiny
    split = dict(device_map="auto", max_memory="cpu=200KB")
    loaded = load_model(str(model), **split)
    assert {"cpu", "disk"} <= set(loaded.model.hf_device_map.values()), loaded.model.hf_device_map
    assert any(p.device.type == "meta" for p in loaded.model.parameters())  # really offloaded
    assert input_device(loaded.model).type == "cpu"
    assert {d.type for d in execution_devices(loaded.model, attention_modules(loaded.model))} == {"cpu"}

    base = dict(model=str(model), dataset=str(corpus)) | DISTILL | {"steps": 3, "gate_init": "model"}
    plain = distill(DistillConfig(**base, output=str(tmp_path / "plain")))
    mapped = distill(DistillConfig(**base, output=str(tmp_path / "mapped"), **split))
    assert mapped.recall_init == pytest.approx(plain.recall_init)  # the model-initialised gate, from offloaded q/k
    a, b = load_file(tmp_path / "plain" / "gates.safetensors"), load_file(tmp_path / "mapped" / "gates.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
    e_plain = evaluate_perplexity(EvalConfig(gates=str(tmp_path / "plain"), k="4", max_windows=2))
    e_mapped = evaluate_perplexity(EvalConfig(gates=str(tmp_path / "plain"), k="4", max_windows=2, **split))
    assert e_mapped.setup["device"].startswith("device map:")
    for x, y in zip(e_plain.results, e_mapped.results, strict=True):
        assert y.nll == pytest.approx(x.nll, rel=1e-6) and y.routing == pytest.approx(x.routing, rel=1e-6)


def test_device_map_settings_are_checked(trained_tiny, tmp_path):
    from posthoc_sparse.devices import parse_max_memory
    from posthoc_sparse.parallel import Processes

    model, corpus = trained_tiny
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(UserError, match="DEVICE=SIZE"):
        parse_max_memory("cpu")
    with pytest.raises(UserError, match="--device-map must be one of"):
        distill(DistillConfig(model=str(model), dataset=str(corpus), output=str(tmp_path / "a"), device_map="gpu"))
    with pytest.raises(UserError, match="only applies with --device-map"):
        evaluate_perplexity(EvalConfig(model=str(model), dataset=str(corpus), modes="dense", max_memory="cpu=1GB"))
    procs = Processes("cpu")
    assert procs.world == 1 and procs.is_main and procs.shard(list(range(5))) == [0, 1, 2, 3, 4]
    procs.world = 2  # as if launched with two processes
    with pytest.raises(UserError, match="one process"):
        procs.check_device_map("auto")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_map_over_two_gpus(trained_tiny, tmp_path):
    model, corpus = trained_tiny
    split = dict(device_map="auto", max_memory="0=200KB,1=10GB")  # the embeddings on GPU 0, layers on GPU 1
    base = dict(model=str(model), dataset=str(corpus), dtype="float32") | DISTILL | {"steps": 3}
    plain = distill(DistillConfig(**base, output=str(tmp_path / "plain")))
    mapped = distill(DistillConfig(**base, output=str(tmp_path / "mapped"), **split))
    assert mapped.loss_last == pytest.approx(plain.loss_last, rel=1e-3)
    report = evaluate_perplexity(EvalConfig(gates=str(tmp_path / "mapped"), k="4", max_windows=2, **split))
    assert report.setup["device"].startswith("device map:")
