"""Shared fixtures."""

from __future__ import annotations

import pytest

from .tiny import ARCHS, tiny_model, train_tiny_lm, write_corpus


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
