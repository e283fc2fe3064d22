"""Speed and memory ratios, measured side by side in one run (docs/performance.md, issue 7 targets).

    python benchmarks/perf.py --size gpu --out perf.json      # Qwen3-1.7B shape, random init, bf16, one GPU
    python benchmarks/perf.py --size cpu --out perf-cpu.json  # a small model, to check the parts on a CPU
    python benchmarks/perf.py --help                          # the parts (--parts), each in a line

The harness (registry, timing, model, JSON) is ``benchmarks/harness.py``; the parts are registered by
``parts_distill.py`` (distill, distill_sampled, memory, sweep), ``parts_eval.py`` (eval, model, host) and
``parts_attention.py`` (attention, kernel, head_tuning, attention_tuning,
prefill_topk, prefill_tuning), ``parts_decode.py`` (decode_attention,
decode_model) and ``parts_decode_profile.py`` (decode_profile).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from benchmarks import (  # noqa: F401 - registers the parts
        parts_attention, parts_decode, parts_decode_profile, parts_distill, parts_eval)
    from benchmarks.harness import main as run

    return run(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `benchmarks` and the library
    main()
