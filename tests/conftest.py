"""Shared fixtures."""

from __future__ import annotations

import pytest

from .tiny import ARCHS, tiny_model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)
