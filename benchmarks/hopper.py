"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU: Triton's own compiler lowers them to a
cubin (ptxas ships with the triton wheel), which the interpreter never does, and cuobjdump (shipped too) reads the
registers and local memory each kernel needs. It runs in a subprocess, because a test session imports the kernels
under TRITON_INTERPRET=1, where ``@triton.jit`` makes interpreted functions that do not compile.

    python benchmarks/hopper.py --out docs/data/kernel-registers-sm90.json   # the selection kernels' registers

The registers a thread needs bound how many programs share an SM (65,536 registers an SM): a kernel at 255 fits
two 4-warp programs, one at 128 four.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    # as a launch specializes: pointers 16-byte aligned (torch's allocations), the named ints multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in const and (sig[a].startswith("*") or a in spec["aligned"])}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    fd, path = tempfile.mkstemp(suffix=".cubin")
    os.write(fd, kernel.asm["cubin"])
    os.close(fd)
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    fields = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    out.append({"kernel": name, "constexprs": const, "regs": int(fields["REG"]), "local": int(fields["LOCAL"]),
                "async_copies": kernel.asm["ttgir"].count("ttg.async_copy_global_to_local")})
print(json.dumps(out))
"""


def compile_for_hopper(tmp_path: Path, module: str, cases: list[tuple[str, dict, int]],
                       types: dict[str, str], aligned: tuple[str, ...] = ()) -> list[dict]:
    """Each (kernel name in ``module``, constexprs, warps) compiled for sm_90: [{"kernel", "regs", "local",
    "async_copies"}, ...] (async_copies: the loads the compiler pipelined, as copies to shared memory).
    ``types``: the Triton type of each non-constexpr argument that is not an i32 ("*fp32", "fp32", ...).
    Specialized as a launch on the GPU is: every pointer 16-byte aligned, and the ints named in ``aligned``
    multiples of 16 (strides and lengths of a typical launch). Unspecialized, the compiler cannot vectorize the
    loads, so it does not pipeline them, and the registers and instructions differ from the GPU's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    spec = json.dumps({"module": module, "cases": cases, "types": types, "aligned": list(aligned)})
    run = subprocess.run([sys.executable, "-c", _SCRIPT, spec], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"compiling for sm_90 failed: {run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])


TOKEN_SELECT_TYPES = {"A": "*bf16", "Bk": "*bf16", "LSE": "*fp32", "IDX": "*i32", "WORDS": "*i64", "SWEEPS": "*i32",
                      "BR": "*i64", "OUT": "*i32", "NB": "*i32", "KEYS": "*i64",
                      "scale": "fp32", "softcap": "fp32", "guess_step": "fp32"}
# the ints of a token-level prefill launch that are multiples of 16 there (T = 32768, k = 2048, 16 heads, d = 32)
TOKEN_SELECT_ALIGNED = ("sab", "sah", "sat", "sbb", "sbh", "sbt", "sib", "sih", "sit", "H", "T", "k")
DECODE_TYPES = ({n: "*fp32" for n in ("SRC", "SC", "PM", "PL", "GS")}
                | {n: "*i32" for n in ("HSUM", "H3", "A24", "IDX")} | {"ST": "*i64"})


def token_select_cases(launches, chunks=(8, 1), groups=(1, 2)) -> list[tuple[str, dict, int]]:
    """``_token_bracket`` (the counting sweeps) at each (rows, keys per tile, warps) of ``launches`` and group size,
    then ``_token_write`` (the write and the ranking) at the same and each ranking chunk, with 8 candidates, the
    guess's moments from every tile per head and every fourth per group (the defaults), band 64, gate dim 32, bf16
    inputs."""
    common = dict(DS=32, SOFTCAP=False, IEEE=False, BAND=64)
    return ([("_token_bracket", common | dict(BLOCK_M=m, NC=nc, R=8, GROUP=g, GUESS=True, EVERY=4 if g > 1 else 1), w)
             for m, nc, w in launches for g in groups]
            + [("_token_write", common | dict(BLOCK_M=m, NC=nc, GROUP=g, RC=rc, BITS=False), w) for m, nc, w in launches
               for rc in chunks for g in groups])


def token_bits_cases(launches, groups=(1, 2), atomic: bool = False, rows: bool = False,
                     words: bool = False) -> list[tuple[str, dict, int]]:
    """``bits.py``'s ``_token_bits`` (the bitmask write's sweep) at each (rows, keys per tile, warps) of ``launches``
    and group size, then ``_bits_rank`` (its ranking) at 16 rows and 4 warps per head, band 64, gate dim 32, bf16
    inputs; ``atomic`` / ``rows`` / ``words``: the sweep that puts band keys by atomic slots / by row reductions /
    as words, whose keys the ranking scores again (``TUNING["bits_band"]``; else best first)."""
    common = dict(DS=32, SOFTCAP=False, IEEE=False, BAND=64, ATOMIC=atomic, ROWS=rows, BAND_WORDS=words)
    return ([("_token_bits", common | dict(BLOCK_M=m, NC=nc, GROUP=g, LOG_NC=nc.bit_length() - 1), w)
             for m, nc, w in launches for g in groups]
            + [("_bits_rank", dict(BLOCK_M=16, BAND=64, RC=1, DS=32, GROUP=1, SOFTCAP=False, BAND_WORDS=words), 4)])


MASK_ATTENTION_TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "BITS": "*i32", "O": "*bf16", "scaling": "fp32",
                        "softcap": "fp32"}


def mask_attention_cases(launches, stacked=(1, 2)) -> list[tuple[str, dict, int]]:
    """``_mask_attn_fwd`` at each (rows of all stacked heads, keys per tile, warps) of ``launches`` and heads sharing a
    kept set (1, or 2 as under group selection in Qwen3-1.7B), head_dim 128, bf16, tiles tested for skipping."""
    return [("_mask_attn_fwd", dict(D=128, HP=hp, BLOCK_M=m // hp, BLOCK_N=n, SOFTCAP=False, SKIP=True, IEEE=False), w)
            for m, n, w in launches for hp in stacked]


def main() -> None:
    import argparse
    import tempfile

    import triton

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    launches = [(64, 64, 4), (64, 32, 4), (128, 64, 8), (32, 64, 4), (16, 64, 4), (16, 32, 4)]
    cases = token_select_cases(launches)
    bits = (token_bits_cases([(64, 64, 4), (32, 64, 4), (64, 64, 8)]) + token_bits_cases([(64, 64, 4)], atomic=True)[:2]
            + token_bits_cases([(64, 64, 4)], words=True))  # the band as words, and its ranking (BAND_WORDS)
    with tempfile.TemporaryDirectory() as tmp:
        rows = compile_for_hopper(Path(tmp), "posthoc_sparse.ops.token_select.triton", cases, TOKEN_SELECT_TYPES,
                                  TOKEN_SELECT_ALIGNED)
        rows += compile_for_hopper(Path(tmp), "posthoc_sparse.ops.token_select.bits", bits, TOKEN_SELECT_TYPES,
                                   TOKEN_SELECT_ALIGNED)
    cases += bits
    for row, (_, _, warps) in zip(rows, cases):
        row |= {"warps": warps, "programs_per_sm_by_registers": 65536 // (row["regs"] * 32 * warps)}
    report = {"target": "sm_90 (H100/H200), compiled on the CPU", "triton": triton.__version__,
              "specialized": "pointers 16-byte aligned; " + ", ".join(TOKEN_SELECT_ALIGNED) + " multiples of 16",
              "kernel": "ops.token_select _token_bracket, _token_write, _token_bits and _bits_rank", "rows": rows}
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, a.out)  # never a half-written file
    for r in rows:
        c = r["constexprs"]
        print(f"{r['kernel']:<15} rows {c['BLOCK_M']:>3} keys {c.get('NC', '-'):>2} warps {r['warps']} group "
              f"{c.get('GROUP', '-')} rank chunk {c.get('RC', '-')} band words {c.get('BAND_WORDS', '-')}: "
              f"{r['regs']} registers, local {r['local']} B, "
              f"{r['programs_per_sm_by_registers']} programs an SM (by registers), {r['async_copies']} async copies")

if __name__ == "__main__":
    main()
