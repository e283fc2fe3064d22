"""posthoc-sparse: post-hoc top-k attention gates for Hugging Face causal LMs."""

from __future__ import annotations

from ._version import __version__  # noqa: F401


def __getattr__(name: str):
    # Lazy top-level API: `from posthoc_sparse import apply_gates` without importing torch at package import.
    if name == "apply_gates":
        from .deploy import apply_gates

        return apply_gates
    if name in ("save_gates", "load_gates"):
        from .gates import io

        return getattr(io, name)
    if name in ("distill_gates", "DistillConfig"):  # not "distill": that name is the subpackage
        from .config import DistillConfig
        from .distill.loop import distill

        return {"distill_gates": distill, "DistillConfig": DistillConfig}[name]
    if name in ("evaluate_perplexity", "EvalConfig"):
        from .evaluate import perplexity

        return getattr(perplexity, name)
    if name in ("pretrain", "PretrainConfig"):
        from .experiments import pretrain

        return getattr(pretrain, name)
    if name in ("run_sweep", "SweepConfig"):
        from .experiments import sweep

        return getattr(sweep, name)
    if name in ("run_absorb", "AbsorbConfig"):
        from .experiments import absorb

        return getattr(absorb, name)
    if name in ("build_corpus", "CorpusConfig"):
        from . import corpus

        return getattr(corpus, name)
    raise AttributeError(f"module 'posthoc_sparse' has no attribute {name!r}")
