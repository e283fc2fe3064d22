"""The import direction of STYLE.md, held by import-linter (contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_contracts_hold():
    # The script sits beside the interpreter in a venv (`make test` runs .venv/bin/python without the venv on PATH).
    beside = Path(sys.executable).with_name("lint-imports")
    exe = str(beside) if beside.is_file() else shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed")
    run = subprocess.run([exe], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 broken" in run.stdout


def test_importing_the_package_has_no_side_effects():
    code = ("import os, sys, warnings; env = dict(os.environ); warnings.simplefilter('error');"
            "import posthoc_sparse, sparsify_cli; assert dict(os.environ) == env;"
            "assert 'torch' not in sys.modules, 'importing the package must not import torch'")
    run = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
