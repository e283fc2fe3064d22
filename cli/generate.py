"""`sparsify generate`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from posthoc_sparse.generate import GenerateConfig

from .common import fmt, make_config
from .app import app, out_console

Opt = typer.Option


@app.command()
def generate(
    gates: Annotated[Optional[str], Opt(help="Gate folder from `sparsify distill`.")] = None,
    model: Annotated[Optional[str], Opt(help="Model; default: the gate's base model.")] = None,
    prompt: Annotated[Optional[str], Opt(help="Text to continue.")] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help="Tokens to generate. Default 50.")] = None,
    k: Annotated[Optional[int], Opt(help="Keys kept per query. Default: the gate's k.")] = None,
    mode: Annotated[Optional[str], Opt(help="gate, random, oracle or dense. Default gate.")] = None,
    selection: Annotated[Optional[str], Opt(help="head (top-k per query head), group (per KV group) or block (key blocks per KV group and query block; Triton on GPUs). Default head.")] = None,
    block_size: Annotated[Optional[int], Opt(help="With --selection block: 16, 32, 64 or 128. Default 64.")] = None,
    compare_dense: Annotated[Optional[bool], Opt("--compare-dense", help="Also generate densely and compare.")] = None,
    do_sample: Annotated[Optional[bool], Opt("--sample", help="Sample instead of greedy decoding.")] = None,
    temperature: Annotated[Optional[float], Opt(help="Sampling temperature.")] = None,
    top_p: Annotated[Optional[float], Opt(help="Nucleus sampling threshold.")] = None,
    seed: Annotated[Optional[int], Opt(help="Sampling seed.")] = None,
    dtype: Annotated[Optional[str], Opt(help="auto, float32, bfloat16, float16.")] = None,
    device: Annotated[Optional[str], Opt(help="auto, cpu, cuda, cuda:N.")] = None,
    trust_remote_code: Annotated[Optional[bool], Opt("--trust-remote-code")] = None,
) -> None:
    """Generate text with the model's attention sparsified by a gate (KV cache, gate keys cached)."""
    from posthoc_sparse.generate import generate_text

    flags = {k_: v for k_, v in locals().items() if k_ != "generate_text"}
    cfg: GenerateConfig = make_config(GenerateConfig, None, None, flags)
    res = generate_text(cfg)
    out_console.print(f"[bold]{res.prompt}[/]{res.text}", highlight=False)
    if res.dense_text is not None:
        out_console.print(f"[dim]dense:[/] [bold]{res.prompt}[/]{res.dense_text}", highlight=False)
        table = Table(title="gated vs dense")
        for c in ("token agreement", "mean KL(dense || gated)", "s/token gated", "s/token dense"):
            table.add_column(c, justify="right")
        table.add_row(fmt(res.agreement, ".1%"), fmt(res.mean_kl, ".4f"), fmt(res.seconds_per_token, ".4f"),
                      fmt(res.dense_seconds_per_token, ".4f"))
        out_console.print(table)
