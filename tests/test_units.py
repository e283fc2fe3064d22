"""The absorption evidence in units (experiments/units.py, unit_report.py): every kind of unit runs on a tiny model,
a finished unit is reused (not recomputed), a repeated unit reproduces its numbers under the same seed, and the
report is the same whatever order the units are read in."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posthoc_sparse.errors import UserError
from posthoc_sparse.experiments.absorb import AbsorbConfig
from posthoc_sparse.experiments.unit_report import build_report, load_units, plateau, write_report
from posthoc_sparse.experiments.units import (SweepSettings, fingerprint, parse_unit, plan, recipe_of, run_unit,
                                              unit_training)

from .test_pretrain import phrase_corpus
from .tiny import tiny_tokenizer

UNITS = ["dense-s0", "soft-learned-s0", "soft-random-s0", "dense-s1", "soft-learned-s1", "soft-random-s1",
         "hard-topk-s0", "stochastic-s0", "sweep-s0"]
SWEEP = SweepSettings(fractions="0,0.5", steps=4, batch_size=2, warmup=1, eval_windows=2)


def _cfg(root, **kw):
    base = dict(dataset=str(root / "corpus.txt"), tokenizer=str(root / "tok"), output="unused", steps=12,
                eval_every=4, k=4, d_g=8, distill_steps=6, distill_every=3, distill_batch_size=4, distill_lr=1e-2,
                eval_windows=3, n_layer=2, d_model=32, n_head=2, d_ff=64, seq_len=32, batch_size=8, lr=3e-3,
                min_lr=3e-4, warmup=2, device="cpu")
    return AbsorbConfig(**(base | kw))


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """Every kind of unit, run once on a tiny GPT-2 into ``done/``."""
    root = tmp_path_factory.mktemp("units")
    tiny_tokenizer().save_pretrained(root / "tok")
    phrase_corpus(root / "corpus.txt")
    out = root / "done"
    out.mkdir()
    for name in UNITS:
        run_unit(name, _cfg(root), SWEEP, root / "work" / name, done=out)
    return root, out


def test_unit_names_and_the_plan():
    assert parse_unit("soft-learned-s2") == ("soft-learned", 2) and parse_unit("sweep-s0") == ("sweep", 0)
    for bad in ("dense", "dense-2", "softer-s0", "dense-s"):
        with pytest.raises(UserError, match="unknown unit"):
            parse_unit(bad)
    names = plan(3, 2)
    assert names[:3] == ["dense-s0", "soft-learned-s0", "soft-random-s0"] and len(names) == len(set(names)) == 15
    assert {"sweep-s0", "sweep-s1", "hard-topk-s0", "stochastic-s0", "hard-topk-s2"} <= set(names)


def test_every_unit_writes_its_record(done):
    root, out = done
    units = load_units(out)
    assert sorted(units) == sorted(UNITS)
    d = units["dense-s0"]
    assert [e["step"] for e in d["train"]["evals"]] == [0, 4, 8, 12]
    assert set(d["eval"]) == {"dense", "oracle@4", "random@4"} and 0 < d["eval"]["oracle@4"]["mass"] <= 1
    assert len(d["eval"]["dense"]["window_nll"]) == 3
    assert [p["step"] for p in d["distilled"]["posthoc_curve"]] == [0, 3, 6]
    s = units["soft-learned-s0"]
    assert s["train"]["mass_outside"]["last"] is not None and s["gate_moved"] > 0 and "distilled" in s
    assert units["soft-random-s0"]["gate_moved"] == 0 and "distilled" not in units["soft-random-s0"]
    assert units["hard-topk-s0"]["train"]["gate_grad"]["steps_with_gradient"] == 0
    assert [r["fraction"] for r in units["sweep-s0"]["sweep"]["table"]] == [0.0, 0.5]
    assert all(len(json.dumps(u)) < 200_000 for u in units.values())  # small: no weights


def test_a_finished_unit_is_reused_not_recomputed(done):
    root, out = done
    events = []
    again = run_unit("dense-s0", _cfg(root), SWEEP, root / "elsewhere", done=out,
                     on_event=lambda kind, info: events.append(kind))
    assert [k for k in events] == ["reused"] and not (root / "elsewhere").exists()
    assert again == json.loads((out / "dense-s0.json").read_text())
    # other settings: another fingerprint, so the stored record is not taken for it
    assert fingerprint("dense-s0", _cfg(root, steps=16), SWEEP) != again["fingerprint"]
    assert fingerprint("dense-s0", _cfg(root, device="cuda"), SWEEP) == again["fingerprint"]  # where it ran: no


def test_a_sweep_unit_borrows_the_dense_run_beside_it(done, tmp_path):
    """sweep-sN trains dense-sN's model and distills its gate again; run beside dense-sN (sibling folders, the same
    settings and data) it copies both instead, so one GPU call holds the two units."""
    root, _ = done
    dense = run_unit("dense-s0", _cfg(root), SWEEP, tmp_path / "dense-s0")
    events = []
    sweep = run_unit("sweep-s0", _cfg(root), SWEEP, tmp_path / "sweep-s0",
                     on_event=lambda kind, info: events.append((kind, info)))
    assert [i["what"] for k, i in events if k == "borrowed"] == ["runs", "distill"]
    assert not [k for k, _ in events if k.startswith(("pretrain:", "distill:"))]  # nothing trained again
    assert sweep["train"] == dense["train"] and len(sweep["sweep"]["table"]) == 2
    events.clear()  # beside a dense unit of other settings: its own model
    run_unit("sweep-s0", _cfg(root, steps=8), SWEEP, tmp_path / "sweep-s0",
             on_event=lambda kind, info: events.append((kind, info)))
    assert not [k for k, _ in events if k == "borrowed"] and [k for k, _ in events if k == "pretrain:done"]


def test_a_work_folder_left_by_other_settings_is_not_resumed(done, tmp_path):
    root, _ = done
    work, events = tmp_path / "work", []
    first = run_unit("stochastic-s0", _cfg(root), SWEEP, work)
    again = run_unit("stochastic-s0", _cfg(root), SWEEP, work, on_event=lambda kind, info: events.append((kind, info)))
    assert ("run", True) in [(k, i.get("cached")) for k, i in events]  # same settings: the trained model is resumed
    assert again["train"]["ppl_as_trained"] == first["train"]["ppl_as_trained"]
    events.clear()
    other = run_unit("stochastic-s0", _cfg(root, steps=8), SWEEP, work,
                     on_event=lambda kind, info: events.append((kind, info)))
    kinds = [(k, i.get("cached")) for k, i in events]
    assert ("restart", None) in kinds and ("run", False) in kinds  # other settings: trained again, from scratch
    assert [e["step"] for e in other["train"]["evals"]] == [0, 4, 8]


def test_units_of_another_recipe_are_left_out_of_the_findings(done):
    root, out = done
    units = load_units(out)
    other = json.loads(json.dumps(units["soft-random-s1"]))
    other["settings"] = other["settings"] | {"steps": 999}
    report = build_report(units | {"soft-random-s1": other})
    assert report["mixed_settings"] == ["soft-random-s1"]
    assert report["findings"]["soft"]["seeds"] == [0]  # seed 1 lost its random arm: no pair
    assert "soft-random-s1" in report["pending"]["soft"]
    # built for the other recipe, it is the rest that is left out
    want = recipe_of(other)
    assert "dense-s0" in build_report(units | {"soft-random-s1": other}, want=want)["mixed_settings"]
    # where it ran or wrote does not matter; the data it was trained on does
    moved = json.loads(json.dumps(units["soft-random-s1"]))
    moved["settings"] |= {"device": "cuda:1", "output": "/elsewhere", "dataset": "/other/path", "report_to": "wandb"}
    assert build_report(units | {"soft-random-s1": moved})["mixed_settings"] == []
    moved["data"] = {"train.jsonl": "another corpus"}
    assert build_report(units | {"soft-random-s1": moved})["mixed_settings"] == ["soft-random-s1"]


def test_a_repeated_unit_reproduces_its_numbers_under_the_same_seed(done):
    root, out = done
    first = json.loads((out / "soft-learned-s0.json").read_text())
    redo = run_unit("soft-learned-s0", _cfg(root), SWEEP, root / "redo")  # from scratch, nothing to reuse
    assert redo["train"]["ppl_as_trained"] == pytest.approx(first["train"]["ppl_as_trained"], rel=1e-5)
    assert redo["train"]["mass_outside"]["last"] == pytest.approx(first["train"]["mass_outside"]["last"], rel=1e-5)
    assert redo["eval"]["gate"]["ppl"] == pytest.approx(first["eval"]["gate"]["ppl"], rel=1e-5)
    assert redo["distilled"]["ppl_gate"] == pytest.approx(first["distilled"]["ppl_gate"], rel=1e-5)


def test_the_report_is_the_same_from_units_in_any_order(done, tmp_path):
    root, out = done
    units = load_units(out)
    reports = []
    for seed in range(3):
        names = list(units)
        random.Random(seed).shuffle(names)
        reports.append(json.dumps(build_report({n: units[n] for n in names}), sort_keys=True))
    assert reports[0] == reports[1] == reports[2]
    rep = write_report(units, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "absorb.json").read_text()) == json.loads(reports[0])
    f = rep["findings"]
    assert f["soft"]["seeds"] == [0, 1]  # seed 1 has no hard-topk, but finding 1 needs only dense and soft
    diffs = [r["random"]["ppl_as_trained"] - r["learned"]["ppl_as_trained"] for r in f["soft"]["per_seed"]]
    ci = f["soft"]["random_minus_learned"]["ppl_as_trained"]
    assert ci["mean"] == pytest.approx(sum(diffs) / 2) and ci["low"] < ci["mean"] < ci["high"]
    assert [r["model"] for r in f["coadapt"]] == ["soft-learned", "hard-topk", "dense"]
    assert f["coadapt"][0]["seeds"] == [0, 1] and f["coadapt"][1]["seeds"] == [0]
    assert f["hard"]["steps_with_gradient_total"] == 0 and f["sweep"]["seeds"] == [0]
    assert f["reference"]["plateau"]["curve"][-1][0] == 12
    assert rep["pending"]["soft"] == ["dense-s2", "soft-learned-s2", "soft-random-s2"]
    assert "sweep-s1" in rep["pending"]["sweep"] and "reference" not in rep["pending"]
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "Pending GPU units: dense-s2, soft-learned-s2, soft-random-s2." in summary
    assert "Learned beats random beyond noise" in summary and "(b) hard top-k" in summary
    assert build_report({})["settings"] is None


def test_finding_1_pairs_the_soft_arms_without_waiting_for_dense(done):
    """A seed with both soft arms enters learned − random even before its dense unit exists; the dense baseline and
    the arms against it use the seeds that have dense."""
    units = {n: u for n, u in load_units(done[1]).items() if n != "dense-s1"}
    soft = build_report(units)["findings"]["soft"]
    assert soft["seeds"] == [0, 1] and soft["dense_seeds"] == [0]
    assert soft["random_minus_learned"]["ppl_as_trained"]["n"] == 2
    assert soft["dense"]["n"] == soft["random_minus_dense"]["n"] == soft["learned_minus_dense"]["n"] == 1
    assert [r["dense"] is None for r in soft["per_seed"]] == [False, True]


def test_a_report_covers_only_its_findings(done, tmp_path):
    """A recipe that trains only the reference (paper-31m-plateau) reports the reference and the post-hoc curve:
    the other findings are neither reported nor pending, and its plan is dense-s0 alone."""
    root, out = done
    units = load_units(out)
    rep = write_report({"dense-s0": units["dense-s0"]}, tmp_path / "r", covers=("reference", "posthoc"))
    assert rep["pending"] == {} and rep["plan"] == ["dense-s0"] and rep["covers"] == ["reference", "posthoc"]
    assert rep["findings"]["reference"]["seed"] == 0 and rep["findings"]["posthoc"]["seeds"] == [0]
    assert all(rep["findings"][f] is None for f in ("soft", "hard", "coadapt", "stochastic", "sweep"))
    assert sorted(rep["plots"]) == ["absorb-plateau.png", "absorb-posthoc.png"]
    write_report({"soft-learned-s0": units["soft-learned-s0"]}, tmp_path / "r", covers=("reference", "posthoc"))
    assert not list((tmp_path / "r").glob("*.png"))  # rebuilt without dense-s0: its plots are gone
    write_report({"dense-s0": units["dense-s0"]}, tmp_path / "r", covers=("reference", "posthoc"))
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "## The reference model" in summary and "## Post hoc" in summary
    assert "Pending" not in summary and "## 1." not in summary and "unfreeze sweep" not in summary
    assert build_report({}, covers=("reference",))["plan"] == ["dense-s0"]
    with pytest.raises(ValueError, match="unknown findings"):
        build_report({}, covers=("reference", "plateau"))


def test_plateau_is_the_change_over_the_last_quarter():
    rec = {"train": {"evals": [{"step": s, "heldout_ppl": p} for s, p in
                               ((0, 900.0), (250, 120.0), (500, 100.0), (750, 99.0), (1000, 98.5))]}}
    p = plateau(rec)
    assert p["from_step"] == 750 and p["change_last_25pct"] == pytest.approx(0.5 / 99.0) and p["plateaued"]
    rec["train"]["evals"][-1]["heldout_ppl"] = 95.0
    assert not plateau(rec)["plateaued"]


def test_a_unit_trained_in_two_processes_equals_one_trained_in_one(done, tmp_path, monkeypatch):
    """gpu_units.py run --train-processes 2: the unit's training runs first under torchrun (gloo here, one GPU per
    process there) with half the batch each, the rest of the unit in this process; its numbers are the
    one-process unit's (the same global batches; gradients averaged across the two)."""
    import importlib.util

    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_units.py"
    spec = importlib.util.spec_from_file_location("gpu_units_driver", path)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, out = done
    cfg, work = _cfg(root), tmp_path / "work" / "soft-learned-s0"
    assert unit_training("soft-learned-s0", cfg, SWEEP, work, done=out) is None  # finished there: nothing to train
    driver.train_in_processes("soft-learned-s0", cfg, work, tmp_path / "none", 2, lambda kind, info: None)
    assert unit_training("soft-learned-s0", cfg, SWEEP, work) is None  # its run is finished now
    two = run_unit("soft-learned-s0", cfg, SWEEP, work)
    one = json.loads((out / "soft-learned-s0.json").read_text())
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    assert two["fingerprint"] == one["fingerprint"]
    for a, b in ((one["train"]["ppl_as_trained"], two["train"]["ppl_as_trained"]),
                 (one["eval"]["gate"]["ppl"], two["eval"]["gate"]["ppl"]),
                 (one["distilled"]["ppl_gate"], two["distilled"]["ppl_gate"])):
        assert b == pytest.approx(a, rel=1e-4)
    assert two["gate_moved"] == pytest.approx(one["gate_moved"], rel=1e-3)


def test_a_partial_run_of_another_batch_per_process_starts_over(done, tmp_path):
    """A unit stopped part way on one GPU and retried over two (or the reverse) cannot resume its checkpoint (the
    batch per process differs): unit_training and run_unit start that run over instead of failing at every try."""
    root, _ = done
    cfg, work = _cfg(root), tmp_path / "dense-s0"
    events = []
    p = unit_training("dense-s0", cfg, SWEEP, work, processes=2, on_event=lambda k, i: events.append((k, i)))
    assert p.batch_size == cfg.batch_size and p.resume  # the full config; the caller splits the batch
    state = Path(p.output) / "checkpoint" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"meta": {"step": 4, "config": {"batch_size": cfg.batch_size}}}))  # one process's
    assert unit_training("dense-s0", cfg, SWEEP, work, processes=2, on_event=lambda k, i: events.append((k, i)))
    assert not Path(p.output).exists() and events[-1][0] == "restart" and "now 4" in events[-1][1]["why"]
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"meta": {"step": 4, "config": {"batch_size": 4}}}))  # two processes' half batch
    assert unit_training("dense-s0", cfg, SWEEP, work, processes=2) and state.is_file()  # resumable: kept
    record = run_unit("dense-s0", cfg, SWEEP, work)  # one process now: that checkpoint cannot resume, so it restarts
    assert record["train"]["processes"] == 1 and [e["step"] for e in record["train"]["evals"]] == [0, 4, 8, 12]
