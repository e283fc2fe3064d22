"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of the test processes sharing the cores (pytest-xdist, `-n`):
    torch.set_num_threads(1)  # torch's threads would stall the other worker's (tiny matrices gain nothing from them)
    os.environ["OMP_NUM_THREADS"] = "1"  # nor in the commands the tests start

from .interpreted import patch_the_interpreter_dot, patch_the_interpreter_once_per_launch
from .tiny import ARCHS, tiny_model, train_tiny_lm, write_corpus


if os.environ.get("TRITON_INTERPRET") == "1":
    patch_the_interpreter_once_per_launch()
    patch_the_interpreter_dot()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(model folder, corpus file): a tiny Llama trained briefly on a small corpus (shared by the session)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.txt", n_docs=300)
    return train_tiny_lm(root / "model", corpus), corpus


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gates(trained_tiny, tmp_path_factory):
    """(model folder, corpus, gate folder): a k=4 gate distilled once on the trained tiny model."""
    from posthoc_sparse.config import DistillConfig
    from posthoc_sparse.distill.loop import distill

    model, corpus = trained_tiny
    gates = tmp_path_factory.mktemp("gates") / "gates"
    distill(DistillConfig(model=str(model), dataset=str(corpus), output=str(gates), k=4, steps=40, seq_len=32,
                          lr=3e-2, warmup=3, d_g=8, val_every=40, val_windows=2, gate_init="random"))
    return model, corpus, gates
