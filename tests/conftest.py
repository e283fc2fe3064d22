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

from .tiny import ARCHS, tiny_model, train_tiny_lm, write_corpus


def _patch_the_interpreter_once_per_launch() -> None:
    """Triton's interpreter patches the language modules a function sees (``_patch_lang``: ``inspect.getmembers``
    over ``triton.language`` or its ``core``, and their tensor class) at each launch, then again at every call of a
    ``@triton.jit`` helper inside the kernel, and those repeats are never undone. Our kernels call helpers in their
    loops (``_tile`` at every tile), so a bitmask test spent about 30% of its time there (cProfile: 100,929 calls).
    Within a launch, a helper that sees only modules already patched in it skips the repeat; the launch's own
    patch, undone when the launch ends, is kept. Left as it is where the interpreter lacks these names (another
    Triton version)."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang", None)
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if patch is None or launch is None or getattr(patch, "once_per_launch", False):
        return
    patched: set[int] = set()  # the language modules patched in the launch under way
    state = {"launching": False}

    class _Nothing:  # the scope of a skipped repeat: nothing to undo
        def restore(self) -> None:
            pass

    def once(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if state["launching"] and patched and langs <= patched:
            return _Nothing()
        if state["launching"]:
            patched.update(langs)
        return patch(fn)

    def counted_launch(self, *args, **kwargs):  # a launch: its first patch is its own, undone at its end
        state["launching"] = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["launching"] = False
            patched.clear()

    once.once_per_launch = True
    interpreter._patch_lang = once
    interpreter.GridExecutor.__call__ = counted_launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_interpreter_once_per_launch()


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
