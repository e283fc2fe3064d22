"""The helpers every training loop shares: the schedule, the resume check, the finite-loss check, versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posthoc_sparse.config import DistillConfig
from posthoc_sparse.errors import UserError
from posthoc_sparse.training import check_finite, check_resume, lr_at, resume_settings, versions


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


def test_finite_check_names_the_step_the_layer_and_the_checkpoint():
    check_finite(1.5, 0)
    check_finite(torch.tensor([0.1, 0.2]), 3)
    with pytest.raises(UserError, match="the loss became non-finite at step 4; lower --lr"):
        check_finite(float("nan"), 3)
    with pytest.raises(UserError, match=r"at step 8 in layer 1; the last good checkpoint is in out/ckpt"):
        check_finite(torch.tensor([0.1, float("inf"), float("nan")]), 7, checkpoint=Path("out/ckpt"))


def test_versions_name_the_library_and_its_frameworks():
    assert set(versions()) == {"posthoc_sparse", "torch", "transformers"}
