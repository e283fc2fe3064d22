"""How real token-level selections are laid out, measured on the CPU with the embedded SmolLM2-135M, a distilled gate
and held-out text (docs/performance.md, "Prefill"): what the prefill kernels' costs depend on beyond the machine.

    python benchmarks/selection_structure.py --gates gates/demo --out docs/data/selection-structure-smollm2.json
    python benchmarks/selection_structure.py --layers 15 --sweep-heads 1 --guess-step 0.05 --out ...  # a variant

For some layers of one held-out window of T tokens, with top-k of the distilled gate, the oracle (the model's own
scores) and a random gate at k = T / 16 and T / 4 (the shares of 2048 of 32768 and of 8192 keys), per head and per
KV group:

- the share of causal (64-row block, 64-key tile) pairs where some row keeps a key: the tiles that
  ``ops.mask_attention`` computes (it skips the rest); 1.0 means no tile is skipped; also for smaller and larger
  tiles;
- the counting sweeps ``ops.token_select`` takes per row block, with and without its normal guess at each row's k-th
  largest score (TUNING ``select_guess``), run through TRITON_INTERPRET=1 on the first heads: the sweeps depend on
  the scores, not on the machine; and whether its sets are the reference's (exactly, and by the scores they carry:
  group scores are sums of probabilities, which the kernel adds in another order, so sets may differ among scores
  equal within fp32 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on the CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from posthoc_sparse.attention.interface import SparseAttention  # noqa: E402
from posthoc_sparse.attention.policies import DensePolicy, GateSelector  # noqa: E402
from posthoc_sparse.config import EMBEDDED_DATASET, EMBEDDED_MODEL  # noqa: E402
from posthoc_sparse.data import build_windows  # noqa: E402
from posthoc_sparse.gates.io import load_gates  # noqa: E402
from posthoc_sparse.gates.modules import GateBank  # noqa: E402
from posthoc_sparse.loading import load_model  # noqa: E402
from posthoc_sparse.ops import mask_attention as ma  # noqa: E402
from posthoc_sparse.ops import token_select as ts  # noqa: E402


TILES = [(16, 32), (32, 32), (64, 64), (128, 64)]  # (rows, keys) of a tile, for the share of tiles kept


def _by_tile(bits) -> dict:
    return {f"{r}x{c}": ma.kept_tile_share(bits, r, c) for r, c in TILES}


class _Capture(DensePolicy):
    """Dense attention that keeps, for the layers asked, the selection inputs of each selector."""

    needs_inputs = True  # the hidden states and rotary tables the gates read

    def __init__(self, layers: set[int], selectors: dict):
        super().__init__()
        self.layers, self.selectors, self.got = layers, selectors, {}

    def __call__(self, call):
        if call.layer in self.layers:
            inputs = {"oracle": (call.query.float(), call.key.float(), call.scaling)}
            for name, sel in self.selectors.items():
                a, b = sel.prepare(call)
                inputs[name] = (a.float(), b.float(), 1.0)
            self.got[call.layer] = inputs
        return super().__call__(call)


def _sweeps(a, b, k: int, scale: float, group: int, guess: bool, heads: int) -> dict:
    """token_select's counting sweeps on the first ``heads`` query heads (whole groups), with the guess or not."""
    n_b = b.shape[1] * heads // a.shape[1] if b.shape[1] < a.shape[1] else heads
    saved = ts.TUNING["select_guess"]
    ts.TUNING["select_guess"] = guess
    try:
        idx, sw = ts.token_select(a[:, :heads].contiguous(), b[:, : max(n_b, 1)].contiguous(), k, scale, group,
                                  sweeps=True)
    finally:
        ts.TUNING["select_guess"] = saved
    a, b = a[:, :heads], b[:, : max(n_b, 1)]
    want = ts.token_select_reference(a, b, k, scale, group)
    same = torch.equal(idx.sort(-1).values, want.sort(-1).values)
    s = ts.selection_scores_reference(a, b, scale, group)
    carried = [s.gather(-1, i.long().clamp(min=0)).masked_fill(i < 0, float("-inf")).sort(-1).values
               for i in (idx, want)]
    return {"mean": sw.float().mean().item(), "max": int(sw.max()), "same_sets_as_reference": same,
            # sets that differ only among scores equal within fp32 rounding (sums in another order) carry the same
            # scores: each row's kept scores, sorted, equal within that rounding
            "same_score_as_reference": bool(torch.allclose(carried[0], carried[1], rtol=1e-5, atol=1e-6))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gates", default="gates/demo")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--layers", default="3,15,27")
    p.add_argument("--sweep-heads", type=int, default=3, help="query heads the interpreted kernel runs on")
    p.add_argument("--thresholds", type=int, default=ts.TUNING["select_cands"],
                   help="thresholds a counting sweep tests (2, 4 or 8)")
    p.add_argument("--guess-step", type=float, default=ts.TUNING["select_guess_step"],
                   help="the guessed first sweep's innermost thresholds, in sds of the row's scores")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ts.TUNING.update(select_cands=args.thresholds, select_guess_step=args.guess_step)
    torch.manual_seed(0)
    started = time.time()
    loaded = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu")
    model = loaded.model
    bank, config = load_gates(args.gates, model=model)
    rand = GateBank(bank.spec).reset_random(config.get("random_seed", 1))
    ids, prov = build_windows(loaded.tokenizer, EMBEDDED_DATASET, "heldout", args.seq_len, max_windows=1)
    layers = {int(x) for x in args.layers.split(",")}
    cap = _Capture(layers, {"gate": GateSelector(bank), "random": GateSelector(rand)})
    with torch.no_grad(), SparseAttention(model, cap):
        model(input_ids=ids, use_cache=False)
    t = args.seq_len
    rows = []
    for layer in sorted(layers):
        for name, (a, b, scale) in cap.got[layer].items():
            h, g = a.shape[1], model.config.num_key_value_heads
            for k in (t // 16, t // 4):
                for sel, group in (("head", 1), ("group", h // g)):
                    idx = ts.token_select_reference(a, b, k, scale, group)
                    bits = ma.bits_from_indices(idx, t)
                    row = {"layer": layer, "selector": name, "k": k, "selection": sel,
                           "tiles_kept_share": ma.kept_tile_share(bits, 64, 64),
                           "tiles_kept_share_by_tile": _by_tile(bits)}
                    if name != "random":
                        heads = args.sweep_heads if group == 1 else group
                        for guess in (False, True):
                            row[f"sweeps_{'guess' if guess else 'even'}"] = _sweeps(a, b, k, scale, group, guess,
                                                                                     heads)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        if layer == min(layers):  # scores with no structure, once, for comparison
            a, b, _ = cap.got[layer]["gate"]
            iid = torch.randn_like(a), torch.randn_like(b)
            for k in (t // 16, t // 4):
                bits = ma.bits_from_indices(ts.token_select_reference(*iid, k, 1.0, 1), t)
                rows.append({"layer": layer, "selector": "iid-normal", "k": k, "selection": "head",
                             "tiles_kept_share": ma.kept_tile_share(bits, 64, 64),
                             "tiles_kept_share_by_tile": _by_tile(bits)})
    report = {"model": EMBEDDED_MODEL, "gates": args.gates, "gate_config": {k: config.get(k) for k in (
        "k", "d_g", "steps", "gate_input", "dataset")}, "data": prov, "T": t, "tile": [64, 64],
              "token_select_tuning": {k: v for k, v in ts.TUNING.items() if k.startswith("select")},
              "versions": {"torch": torch.__version__}, "seconds": time.time() - started, "rows": rows}
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
