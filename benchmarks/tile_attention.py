"""The tile attention of token-level prefill (``ops.mask_attention``) against SDPA flash attention, one layer of the
Qwen3-1.7B shape (16 query heads, 8 KV heads, head_dim 128, gate d = 32, bf16, random inputs), side by side in one
run: under each launch setting (rows, keys per tile, warps, pipeline stages), on the kept sets of a top-k selection
per head and per KV group, and on every causal key kept (the work of SDPA itself). With ``--baseline FILE`` (an
earlier ``ops/mask_attention/triton.py``, e.g. ``git show REV:posthoc_sparse/ops/mask_attention/triton.py``), its
``mask_attention`` is timed beside, at its own defaults, and the two outputs compared.

    python benchmarks/tile_attention.py --out docs/data/tile-attention-h200.json           # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tile_attention.py --t 70 --k 9 --out x.json     # the same on the CPU

Prints one line per row and writes them as JSON (milliseconds, median of ``--reps``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from benchmarks.harness import kernel_device, load_baseline, timed, tuning  # noqa: E402
from posthoc_sparse.io import atomic_write_json  # noqa: E402
from posthoc_sparse.ops import mask_attention as ma  # noqa: E402
from posthoc_sparse.ops import token_select as ts  # noqa: E402

# (rows of all stacked heads, keys per tile, warps, pipeline stages); 128 x 128 at 3 stages needs 233 KB of smem
LAUNCHES = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 4, 2),
            (64, 128, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)]


def _ms(fn, device, reps) -> dict:
    try:
        return {"ms": 1e3 * timed(fn, device, reps)}
    except Exception as e:  # noqa: BLE001 - a launch the compiler rejects (shared memory, registers)
        return {"ms": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def measure(t: int, k: int, heads: int, kv_heads: int, head_dim: int, reps: int, launches, baseline=None) -> list:
    """Rows of milliseconds at one length ``t``: SDPA, then per kept-set kind ("head", "group", "all") the kernel
    under each launch and (with ``baseline``) the baseline's kernel at its defaults."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(1, heads, t, head_dim, generator=gen).to(device, dtype)
    key, v = (torch.randn(1, kv_heads, t, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    a, b = (torch.randn(1, heads, t, 32, generator=gen).to(device, dtype) for _ in range(2))
    scaling = head_dim**-0.5
    sdpa = 1e3 * timed(lambda: F.scaled_dot_product_attention(q, key, v, is_causal=True, enable_gqa=True), device,
                       reps)
    rows = []
    for kind in ("head", "group", "all"):
        group = heads // kv_heads if kind == "group" else 1
        if kind == "all":  # every causal key: SDPA's own work
            bits = ma.bits_from_keep(torch.ones(t, t, dtype=torch.bool, device=device).tril()).expand(1, heads, -1, -1)
            bits = bits.contiguous()
        else:
            bits = ts.token_select(a, b, k, 1.0, group, bits=True)
        base = {"T": t, "k": k if kind != "all" else t, "sets": kind, "sdpa_ms": sdpa}
        out = ma.mask_attention(q, key, v, bits, scaling).float()
        if kind == "all":
            want = F.scaled_dot_product_attention(q, key, v, is_causal=True, enable_gqa=True).transpose(1, 2)
            base["max_abs_diff_vs_sdpa"] = (out - want.float()).abs().max().item()
        if baseline is not None:
            row = base | {"kernel": "baseline", **_ms(lambda: baseline.mask_attention(q, key, v, bits, scaling),
                                                         device, reps)}
            row["max_abs_diff_vs_baseline"] = (out - baseline.mask_attention(q, key, v, bits, scaling).float()
                                               ).abs().max().item()
            rows.append(row)
        for n_rows, keys, warps, stages in launches:
            settings = dict(rows=n_rows, keys=keys, warps=warps, stages=stages)
            with tuning(ma.TUNING, **settings):
                row = base | {"kernel": "current", **settings,
                              **_ms(lambda: ma.mask_attention(q, key, v, bits, scaling), device, reps)}
            rows.append(row)
        bits = out = None  # free them before the next kind
    for row in rows:
        if row["ms"]:
            row["x_sdpa"] = row["sdpa_ms"] / row["ms"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", default="8192,32768", help="comma list of lengths")
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", help="an earlier ops/mask_attention/triton.py to time beside")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cuda = kernel_device("tile_attention.py").type == "cuda"
    if args.baseline and not Path(args.baseline).is_file():
        print(f"tile_attention.py: no baseline file {args.baseline}", file=sys.stderr)
        sys.exit(2)
    baseline = load_baseline(args.baseline, "posthoc_sparse.ops.mask_attention") if args.baseline else None
    launches = LAUNCHES if cuda else LAUNCHES[:2]
    rows = []
    for t in (int(x) for x in args.t.split(",")):
        for row in measure(t, args.k, args.heads, args.kv_heads, args.head_dim, args.reps, launches, baseline):
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)", "torch": torch.__version__,
              "triton": triton.__version__, "baseline": args.baseline, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "gate_dim": 32, "rows": rows}
    atomic_write_json(Path(args.out), report)  # never a half-written file


if __name__ == "__main__":
    main()
