"""What a token-level selection sweep's time goes to: probe kernels that each do one more piece of the bitmask
write's per-tile work (docs/performance.md, "What bounds the prefill targets"), timed side by side with the real
counting and write kernels of ``ops.token_select``, per head, one layer of the Qwen3-1.7B shape (16 heads, gate
d = 32, bf16, random inputs).

    python benchmarks/sweep_probe.py --out docs/data/sweep-probe-h200.json          # on a GPU: T = 32768, k = 2048
    TRITON_INTERPRET=1 python benchmarks/sweep_probe.py --t 96 --k 16 --out x.json   # the same on the CPU (tests)
    git show REV:posthoc_sparse/ops/token_select/triton.py > old.py
    python benchmarks/sweep_probe.py --baseline old.py --out x.json                  # and REV's counting beside
                                                                    # (per head, and per group of 2 heads)
(since the scoring moved to scores.py, a baseline triton.py of this tree imports this tree's scores.py.) With
--baseline it also times the counting with the guess's moments from every tile (``select_moments_every`` and
``select_moments_every_group`` 1).

Every probe scores each causal (row, key) pair of 64-row blocks and 64-key tiles as the real kernels do
(``_tile``), against the rows' real brackets (``token_bracket``), then per tile:

    score        only a row max of the scores (the least any sweep does)
    compares     two compares (above the bracket, in it) and their row sums: a counting sweep's kind of work
    words        the compares, and the kept keys' bitmask words stored (the write's output)
    guard        the compares, and a test across the block's rows of whether any row has a band key in the tile
                 (the reduction the write's band handling runs in every tile), with a trivial body
    atomic       the guard, and under it the band keys put by atomic slots on the tile flattened to one
                 dimension, as the write does by default (``TUNING["bits_band"]`` "atomic"), storing each key's
                 score where the write stores a word packed from score and index (one less tile-wide step)

The probes compute nothing the product uses: their outputs only keep the compiler from dropping the work. Prints
and writes one JSON row of milliseconds (median of ``--reps``). ``--bits-launches``: also the bitmask selection
with band keys as words (the default) under each launch of ``BITS_LAUNCHES`` (rows, keys per tile, warps of its
sweep), each with whether it kept the default launch's sets (tile products of another shape may round otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.harness import kernel_device, load_baseline, timed, timed_result, tuning, written_words  # noqa: E402
from posthoc_sparse.errors import first_line  # noqa: E402
from posthoc_sparse.io import atomic_write_json  # noqa: E402
from posthoc_sparse.ops import token_select as ts  # noqa: E402
from posthoc_sparse.ops.token_select import triton as ts_triton  # noqa: E402
from posthoc_sparse.ops.token_select.scores import _tile  # noqa: E402
from posthoc_sparse.ops.token_select.triton import _block, _thresholds, _unmono  # noqa: E402

MODES = ("score", "compares", "words", "guard", "atomic")
BITS_LAUNCHES = [(64, 64, 4), (128, 64, 8), (64, 64, 8), (128, 64, 4), (32, 64, 4), (64, 32, 4), (64, 128, 8)]


@triton.jit
def _probe(A, Bk, BR, OUT, NB, WORDS, sab, sah, sat, sbb, sbh, sbt, G, T, W, n_rep_b, k,
           DS: tl.constexpr, BLOCK_M: tl.constexpr, NC: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr):
    rb, bz, g, rows, row_ok, a, end = _block(A, sab, sah, sat, G, T, DS, BLOCK_M)
    lo, hi, cnt_hi, quota, band_n = _thresholds(BR, T, rows, row_ok, k)
    lval, hval = _unmono(lo), _unmono(hi)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    n = tl.zeros([BLOCK_M], tl.int32)
    out = OUT + (tl.program_id(1) * T + rows).to(tl.int64) * W
    wbase = WORDS + (tl.program_id(1) * T + rows) * 64
    for start in range(0, end, NC):
        cols = start + tl.arange(0, NC)
        s = _tile(A, Bk, A, a, bz, g, rows, row_ok, start, rb * BLOCK_M, cols, sab, sah, sat, sbb, sbh, sbt, G, T,
                  n_rep_b, 1.0, 1.0, DS, 1, False, IEEE, BLOCK_M, NC)
        if MODE == 0:
            best = tl.maximum(best, tl.max(s, 1))
        else:
            above = s >= hval[:, None]
            band = (s >= lval[:, None]) & ~above & row_ok[:, None]
            n += tl.sum(above.to(tl.int32), 1) + tl.sum(band.to(tl.int32), 1)
            if MODE == 2:
                wcols = start // 32 + tl.arange(0, NC // 32)
                words = tl.sum(tl.reshape((above | band).to(tl.int32) << (cols % 32)[None, :], [BLOCK_M, NC // 32, 32]),
                               2)
                tl.store(out[:, None] + wcols[None, :], words, mask=row_ok[:, None] & (wcols * 32 < T)[None, :])
            if MODE >= 3:
                if tl.max(band.to(tl.int32)) > 0:
                    if MODE == 3:
                        n += 1
                    else:
                        put = tl.reshape(band, [BLOCK_M * NC])
                        ctr = tl.broadcast_to((NB + tl.program_id(1) * T + rows)[:, None], [BLOCK_M, NC])
                        slot = tl.atomic_add(tl.reshape(ctr, [BLOCK_M * NC]), 1, mask=put, sem="relaxed")
                        val = tl.reshape(s, [BLOCK_M * NC])
                        dst = tl.reshape(tl.broadcast_to(wbase[:, None], [BLOCK_M, NC]), [BLOCK_M * NC]) + slot
                        tl.store(dst, val, mask=put & (slot < 64))
    if MODE != 2:
        tl.store(out, n + tl.where(best > -1.0e30, best, 0.0).to(tl.int32), mask=row_ok)


def probe(a: torch.Tensor, b: torch.Tensor, bracket: torch.Tensor, k: int, mode: str, rows: int = 64,
          keys: int = 64, warps: int = 4) -> None:
    """One probe sweep (``MODES``) per head over a (B, H, T, d) and b (B, H or G, T, d), with ``token_bracket``'s
    brackets for k."""
    bsz, h, t, ds = a.shape
    w = (t + 31) // 32
    out = torch.empty(bsz * h, t, w, dtype=torch.int32, device=a.device)
    nb = torch.zeros(bsz * h, t, dtype=torch.int32, device=a.device)
    words = torch.empty(bsz * h, t, 64, dtype=torch.float32, device=a.device)
    _probe[(triton.cdiv(t, rows), bsz * h)](
        a, b, bracket, out, nb, words, *a.stride()[:3], *b.stride()[:3], h, t, w, h // b.shape[1], k, DS=ds,
        BLOCK_M=rows, NC=keys, MODE=MODES.index(mode), IEEE=a.dtype == torch.float32, num_warps=warps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", type=int, default=32768)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", help="an earlier ops/token_select/triton.py whose counting to time beside")
    p.add_argument("--bits-launches", action="store_true", help="also time the words write under BITS_LAUNCHES")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = kernel_device("sweep_probe.py")
    if args.baseline and not Path(args.baseline).is_file():
        print(f"sweep_probe.py: no baseline file {args.baseline}", file=sys.stderr)
        sys.exit(2)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, args.heads, args.t, 32, generator=gen).to(device, torch.bfloat16 if cuda else torch.float32)
    b = torch.randn(1, args.heads, args.t, 32, generator=gen).to(device, a.dtype)
    bracket = ts_triton.token_bracket(a, b, args.k)[0]
    row = {"T": args.t, "k": args.k, "heads": args.heads, "gate_dim": 32, "dtype": str(a.dtype).replace("torch.", ""),
           "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)", "triton": triton.__version__,
           "counting_ms": 1e3 * timed(lambda: ts_triton.token_bracket(a, b, args.k), device, args.reps)}
    if args.baseline:  # the earlier counting, then this one's again: each side of it, in one run; per head, then
        old = load_baseline(args.baseline, "posthoc_sparse.ops.token_select")  # per pair of heads (group selection)
        row["baseline"] = args.baseline
        for group, tag in ((1, ""), (2, "_group")):
            def count(module, group=group):
                return module.token_bracket(a, b, args.k, scale=32**-0.5 if group > 1 else 1.0, group=group)

            if group > 1:
                row["counting_group_ms"] = 1e3 * timed(lambda: count(ts_triton), device, args.reps)
            row[f"counting{tag}_baseline_ms"] = 1e3 * timed(lambda: count(old), device, args.reps)
            row[f"counting{tag}_again_ms"] = 1e3 * timed(lambda: count(ts_triton), device, args.reps)
            with tuning(ts.TUNING, select_moments_every=1, select_moments_every_group=1):  # moments of every tile
                row[f"counting{tag}_all_moments_ms"] = 1e3 * timed(lambda: count(ts_triton), device, args.reps)
            row[f"same{tag}_brackets_as_baseline"] = bool(torch.equal(count(old)[0], count(ts_triton)[0]))
    for band in ("atomic", "extract", "words"):
        with tuning(ts.TUNING, bits_kernel="reduce", bits_band=band):
            row[f"bitmask_selection_{band}_ms"] = 1e3 * timed(lambda: ts.token_select(a, b, args.k, bits=True),
                                                              device, args.reps)
    for mode in MODES:
        row[f"probe_{mode}_ms"] = 1e3 * timed(lambda: probe(a, b, bracket, args.k, mode), device, args.reps)
    row["write_alone_atomic_ms"] = row["bitmask_selection_atomic_ms"] - row["counting_ms"]
    row["write_alone_words_ms"] = row["bitmask_selection_words_ms"] - row["counting_ms"]
    if args.bits_launches:
        launches, first, causal = [], None, written_words(args.t, device)
        for rows, keys, warps in BITS_LAUNCHES:
            entry = {"rows": rows, "keys": keys, "warps": warps}
            with tuning(ts.TUNING, bits_kernel="reduce", bits_band="words", bits_rows=rows, bits_keys=keys,
                        bits_warps=warps):
                try:
                    sec, got = timed_result(lambda: ts.token_select(a, b, args.k, bits=True), device, args.reps)
                except Exception as e:  # noqa: BLE001 - a launch the compiler rejects: recorded, the others run
                    entry["error"] = f"{type(e).__name__}: {first_line(e, 160)}"
                    got = None
            if got is not None:
                first = got if first is None else first
                entry |= {"bitmask_selection_words_ms": 1e3 * sec,
                          "same_sets_as_first": not bool(((got != first) & causal).any())}
                del got
            launches.append(entry)
        row["bits_launches"] = launches
    atomic_write_json(Path(args.out), row)  # never a half-written file
    print(json.dumps(row))


if __name__ == "__main__":
    main()
