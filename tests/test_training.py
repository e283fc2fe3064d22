"""The helpers every training loop shares: the schedule, the resume check, the finite-loss check, versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.errors import UserError
from posthoc_sparse.training import DivergenceGuard, check_finite, check_resume, lr_at, resume_settings, versions


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    assert lr_at(0, 1e-3, 10, 100, 1e-4) == pytest.approx(1e-4)
    assert lr_at(9, 1e-3, 10, 100, 1e-4) == pytest.approx(1e-3)
    assert lr_at(10, 1e-3, 10, 100, 1e-4) == pytest.approx(1e-3)
    assert lr_at(100, 1e-3, 10, 100, 1e-4) == pytest.approx(1e-4)
    assert all(lr_at(s, 1e-3, 10, 100, 1e-4) >= lr_at(s + 1, 1e-3, 10, 100, 1e-4) for s in range(10, 100))
    assert lr_at(55, 1e-3, 10, 100) == pytest.approx(0.5e-3)  # halfway through the decay, to 0 by default
    assert lr_at(0, 1e-3, 0, 100) == pytest.approx(1e-3)  # no warm-up


def test_resume_refuses_changed_settings_and_names_them():
    cfg = DistillConfig(k=32, lr=1e-3)
    saved = resume_settings(cfg, ("k", "lr"))
    assert saved == {"k": 32, "lr": 1e-3}
    check_resume(saved, cfg, ("k", "lr"), Path("ckpt"))
    with pytest.raises(UserError, match=r"cannot resume ckpt: settings differ \(k: checkpoint 16, now 32\)"):
        check_resume(saved | {"k": 16}, cfg, ("k", "lr"), Path("ckpt"))


def _checkpoint(folder: Path, step: int, value: float) -> Path:
    from posthoc_sparse.distill.checkpoint import save_checkpoint

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w])
    save_checkpoint(folder, {"w": torch.zeros(2)}, opt, {"step": step})
    if value != 0:  # a checkpoint another version wrote with NaN weights (save_checkpoint refuses them)
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "state.safetensors")
        save_file({**tensors, "params.w": torch.full((2,), value)}, folder / "state.safetensors")
    return folder


def test_finite_check_names_the_step_the_layer_and_a_checkpoint_that_exists_and_is_finite(tmp_path):
    """Changed with the divergence guard: the advice names a checkpoint only when it exists and is finite (it
    used to name the folder whatever it held)."""
    check_finite(1.5, 0)
    check_finite(torch.tensor([0.1, 0.2]), 3)
    with pytest.raises(UserError, match="the loss became non-finite at step 4; lower --lr"):
        check_finite(float("nan"), 3)
    with pytest.raises(UserError, match=r"at step 8 in layer 1; no checkpoint was saved before that; rerun with a "
                                        "lower --lr"):
        check_finite(torch.tensor([0.1, float("inf"), float("nan")]), 7, checkpoint=tmp_path / "none")
    good = _checkpoint(tmp_path / "good", 5, 0.0)
    with pytest.raises(UserError, match=r"the last good checkpoint \(step 5\) is in .*good: rerun with --resume and "
                                        "a lower --lr"):
        check_finite(float("nan"), 7, checkpoint=good)
    bad = _checkpoint(tmp_path / "bad", 5, float("nan"))
    with pytest.raises(UserError, match="holds non-finite weights; rerun with a lower --lr and --overwrite"):
        check_finite(float("nan"), 7, checkpoint=bad)


def test_checkpoints_refuse_non_finite_weights_naming_the_last_good_one(tmp_path):
    from posthoc_sparse.distill.checkpoint import save_checkpoint

    good = _checkpoint(tmp_path / "ckpt", 3, 0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(UserError, match=r"weights became non-finite by step 4 \(w\); the last good checkpoint "
                                        r"\(step 3\)"):
        save_checkpoint(good, {"w": torch.tensor([1.0, float("inf")])}, opt, {"step": 4})


def test_divergence_guard_stops_a_loss_far_above_its_start_and_survives_a_resume(tmp_path):
    guard = DivergenceGuard(10.0, tmp_path / "none")
    for step in range(10):
        guard.check(1.5 + 0.1 * step, step)  # the start: the first step's loss, 1.5
    for step in range(10, 30):
        guard.check(9.0, step)  # high, but under 10 x the start
    with pytest.raises(UserError, match=r"the loss diverged by step \d+: .* times its start \(1.5\); no "
                                        "checkpoint was saved"):
        for step in range(30, 45):
            guard.check(1e4, step)
    resumed = DivergenceGuard(10.0, start=guard.start)  # the start comes back from the checkpoint
    with pytest.raises(UserError, match="diverged"):
        for step in range(10):
            resumed.check(100.0, step)
    off = DivergenceGuard(0.0)
    for step in range(30):
        off.check(1.0 if step < 10 else 1e6, step)
    with pytest.raises(UserError, match="non-finite"):
        off.check(float("nan"), 30)


def test_resume_allows_a_recorded_learning_rate_override():
    cfg = DistillConfig(k=32, lr=1e-4)
    saved = resume_settings(DistillConfig(k=32, lr=1e-2), ("k", "lr"), dtype="float32")
    assert check_resume(saved, cfg, ("k",), Path("c"), resolved={"lr": cfg.lr, "dtype": "float32"},
                        overridable=("lr",)) == {"lr": [1e-2, 1e-4]}
    with pytest.raises(UserError, match=r"dtype: checkpoint 'float32', now 'bfloat16'\); rerun with the checkpoint's"):
        check_resume(saved, cfg, ("k",), Path("c"), resolved={"lr": cfg.lr, "dtype": "bfloat16"},
                     overridable=("lr",))


def test_versions_name_the_library_and_its_frameworks():
    assert set(versions()) == {"posthoc_sparse", "torch", "transformers"}


def test_a_nested_runs_error_names_the_flags_its_command_does_not_pass_on():
    from posthoc_sparse.training import nested_error

    passed = ("--k", "--seq-len")
    error = UserError("k=600 keeps every key; choose --k < --seq-len")
    assert nested_error(error, "sparsify distill", passed, "distill it there") is error  # the sweep has both flags
    error = UserError("d_g=32 needs 16 pairs; use --d-g 16, --lr 0.1 or --d-g 8 (in /tmp/a--b)")
    assert str(nested_error(error, "sparsify distill", passed, "distill it there")) == (
        "d_g=32 needs 16 pairs; use --d-g 16, --lr 0.1 or --d-g 8 (in /tmp/a--b) (--d-g, --lr are flags of "
        "`sparsify distill`: distill it there)")
