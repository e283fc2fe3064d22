"""--report-to tensorboard, offline: distill, pretrain and the unfreeze sweep write Accelerate's TensorBoard events
holding, step by step, the numbers of their own logs; absorb hands the setting to its runs; wandb is never needed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")

from posthoc_sparse.config import DistillConfig  # noqa: E402
from posthoc_sparse.errors import UserError  # noqa: E402
from posthoc_sparse.training import TENSORBOARD_DIR, check_report_to  # noqa: E402


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``folder`` (all event files), as (step, value) sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(set(points)) for tag, points in series.items()}


def test_distill_logs_loss_lr_and_recall_per_step(trained_tiny, tmp_path):
    from posthoc_sparse.distill.loop import HISTORY_NAME, distill

    model, corpus = trained_tiny
    out = tmp_path / "g"
    distill(DistillConfig(model=str(model), dataset=str(corpus), output=str(out), k=4, steps=4, seq_len=32, d_g=8,
                          val_every=2, val_windows=2, report_to="tensorboard"))
    history = json.loads((out / HISTORY_NAME).read_text())["history"]
    got = _scalars(out / TENSORBOARD_DIR)
    assert [s for s, _ in got["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in got["loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [v for _, v in got["lr"]] == pytest.approx([h["lr"] for h in history], rel=1e-6)
    assert [s for s, _ in got["recall"]] == [0, 2, 4]
    assert [v for _, v in got["recall"][1:]] == pytest.approx([h["recall"] for h in history if "recall" in h])


def test_pretrain_logs_loss_lr_and_heldout_perplexity(trained_tiny, tmp_path):
    from posthoc_sparse.experiments.pretrain import LOG_NAME, PretrainConfig, pretrain

    _, corpus = trained_tiny
    out = tmp_path / "m"
    pretrain(PretrainConfig(dataset=str(corpus), output=str(out), tokenizer=str(trained_tiny[0]), n_layer=1,
                            d_model=32, n_head=2, d_ff=64, seq_len=32, steps=3, batch_size=2, warmup=1, eval_every=3,
                            eval_windows=2, log_every=1, report_to="tensorboard", device="cpu"))
    log = json.loads((out / LOG_NAME).read_text())
    got = _scalars(out / TENSORBOARD_DIR)
    assert [v for _, v in got["loss"]] == pytest.approx([h["loss"] for h in log["history"]], rel=1e-6)
    assert [s for s, _ in got["lr"]] == [1, 2, 3]
    assert [v for _, v in got["heldout_perplexity"]] == pytest.approx([e["heldout_ppl"] for e in log["evals"]],
                                                                       rel=1e-6)


def test_the_sweep_logs_each_points_training(tiny_gates, tmp_path):
    from posthoc_sparse.experiments.sweep import SweepConfig, run_sweep

    model, corpus, gates = tiny_gates
    out = tmp_path / "s"
    report = run_sweep(SweepConfig(gates=str(gates), dataset=str(corpus), layers="0.5", steps=2, eval_windows=2,
                                   output=str(out), report_to="tensorboard", device="cpu"))
    got = _scalars(out / TENSORBOARD_DIR)
    for gate in ("learned", "random"):
        assert [s for s, _ in got[f"f0.50-{gate}/loss"]] == [1, 2]
        point = next(p for p in report["points"] if p["gate"] == gate)
        assert got[f"f0.50-{gate}/loss"][-1][1] == pytest.approx(point["train_loss_last"], rel=1e-6)
        assert got[f"f0.50-{gate}/perplexity"] == [(2, pytest.approx(point["ppl"], rel=1e-6))]


def test_absorb_hands_report_to_and_text_field_to_its_runs():
    from posthoc_sparse.experiments.absorb import AbsorbConfig

    cfg = AbsorbConfig(report_to="tensorboard", text_field="body")
    run = cfg.pretrain_config("dense", 0, "x")
    assert (run.report_to, run.text_field) == ("tensorboard", "body")


def test_unknown_or_missing_trackers_are_user_errors(monkeypatch):
    import accelerate.utils

    check_report_to("none")
    check_report_to("tensorboard")
    with pytest.raises(UserError, match="--report-to must be one of none, tensorboard, wandb"):
        check_report_to("mlflow")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match="needs the wandb package"):
        check_report_to("wandb")
    with pytest.raises(UserError, match="--report-to"):
        DistillConfig(report_to="comet").validate()
