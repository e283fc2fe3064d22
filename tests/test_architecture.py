"""The import direction of docs/architecture.md, held by import-linter (contracts in pyproject.toml)."""

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


ROOT = Path(__file__).resolve().parents[1] / "posthoc_sparse"


def test_no_library_module_exceeds_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_op_has_a_naive_reference_beside_its_fast_path():
    """ops/<op>/: naive.py, the fast path (triton.py; aten.py where PyTorch's own ops are the fast path) and
    __init__.py."""
    ops = [p for p in (ROOT / "ops").iterdir() if p.is_dir() and not p.name.startswith("__")]
    assert {p.name for p in ops} >= {"kl", "rope", "attention_lse", "head_topk", "block_sparse"}
    for op in ops:
        files = {f.name for f in op.glob("*.py")}
        assert {"__init__.py", "naive.py"} <= files and files & {"triton.py", "aten.py"}, (op.name, files)
