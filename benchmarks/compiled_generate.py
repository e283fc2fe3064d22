"""``model.generate(..., cache_implementation="static")`` compiled (transformers' default on CUDA), gated against
dense, as a user calls it: the first call (which compiles), then repeated calls, and how many graphs torch.compile
made (a step that recompiles at every new token would show here as many graphs and slow repeated calls).

    python benchmarks/compiled_generate.py --out x.json                      # on a GPU: Qwen3-1.7B shape
    python benchmarks/compiled_generate.py --size cpu --s 2048 --out x.json  # the small model, on a GPU

Random-init model (``harness.SIZES``), random gate (d = 32), random prompt ids of ``--s`` tokens, ``--new`` new
tokens, greedy, batch 1. Run with ``TORCH_LOGS=recompiles`` to see why a graph was remade.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import SIZES, build_model, ids_for  # noqa: E402
from posthoc_sparse.io import atomic_write_json  # noqa: E402


def _graphs() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="gpu")
    ap.add_argument("--s", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--modes", default="dense,gate")
    ap.add_argument("--out", default="compiled-generate.json")
    args = ap.parse_args(argv)
    from posthoc_sparse.deploy import apply_gates
    from posthoc_sparse.gates.io import gate_spec_for_model
    from posthoc_sparse.gates.modules import GateBank

    if not torch.cuda.is_available():
        ap.exit(2, "benchmarks/compiled_generate.py: needs a CUDA GPU (transformers compiles generate on CUDA only)\n")
    device = torch.device("cuda")
    model = build_model(args.size, device, torch.bfloat16)
    bank = GateBank(gate_spec_for_model(model, d_g=32)).reset_random(0).to(device)
    ids = ids_for(model, args.s, device)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    result = {"device": torch.cuda.get_device_name(device), "size": args.size, "s": args.s, "k": args.k,
              "new_tokens": args.new, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "modes": {}}
    for mode in [m for m in args.modes.split(",") if m]:
        torch._dynamo.reset()
        before = _graphs()
        calls = []
        with torch.no_grad(), apply_gates(model, bank, k=args.k, mode=mode):
            eager_t0 = time.perf_counter()
            model.generate(ids, disable_compile=True, **kw)
            torch.cuda.synchronize()
            eager = time.perf_counter() - eager_t0
            for _ in range(args.calls):
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                torch.cuda.synchronize()
                calls.append(time.perf_counter() - t0)
        after = _graphs()
        row = {"eager_call_s": eager, "compiled_calls_s": calls,
               "graphs_made": after["unique_graphs"] - before["unique_graphs"],
               "compiled_over_eager_last_call": calls[-1] / eager}
        result["modes"][mode] = row
        print(mode, row, flush=True)
        atomic_write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
