"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU: Triton's own compiler lowers them to a
cubin (ptxas ships with the triton wheel), which the interpreter never does, and cuobjdump (shipped too) reads the
registers and local memory each kernel needs. It runs in a subprocess, because the test session imports the
kernels under TRITON_INTERPRET=1, where ``@triton.jit`` makes interpreted functions that do not compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
mod = importlib.import_module(spec["module"])
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for name, const, warps in spec["cases"]:
    fn = getattr(mod, name)
    sig = {a: "constexpr" if a in const else spec["types"].get(a, "i32") for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    fd, path = tempfile.mkstemp(suffix=".cubin")
    os.write(fd, kernel.asm["cubin"])
    os.close(fd)
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    out.append({"kernel": name, "constexprs": const, "regs": int(fields["REG"]), "local": int(fields["LOCAL"])})
print(json.dumps(out))
"""


def compile_for_hopper(tmp_path: Path, module: str, cases: list[tuple[str, dict, int]],
                       types: dict[str, str]) -> list[dict]:
    """Each (kernel name in ``module``, constexprs, warps) compiled for sm_90: [{"kernel", "regs", "local"}, ...].
    ``types``: the Triton type of each non-constexpr argument that is not an i32 ("*fp32", "fp32", ...)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    spec = json.dumps({"module": module, "cases": cases, "types": types})
    run = subprocess.run([sys.executable, "-c", _SCRIPT, spec], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])
