"""`python -m sparsify_cli.lm_eval ...`: lm-evaluation-harness's own command line, with the model type `sparsify`
registered first (lm_eval's command line finds only the models it ships, so `lm_eval --model sparsify` alone cannot
see it)::

    python -m sparsify_cli.lm_eval --model sparsify \\
        --model_args pretrained=Qwen/Qwen3-1.7B,gates=gates/qwen3-1.7b-k64,k=64,mode=gate --tasks hellaswag

Every other argument is lm_eval's (``--tasks``, ``--num_fewshot``, ``--limit``, ``--include_path``, ``--output_path``).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import posthoc_sparse.evaluate.lm_eval_model  # noqa: F401  (registers the model type "sparsify")
    except ImportError as e:
        print(f"error: this needs lm-evaluation-harness ({e}): pip install 'posthoc-sparse[lm-eval]'", file=sys.stderr)
        sys.exit(2)
    cli_evaluate()


if __name__ == "__main__":
    main()
