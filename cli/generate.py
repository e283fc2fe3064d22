"""`sparsify generate`."""

from __future__ import annotations

from rich.table import Table

from posthoc_sparse.generate import GenerateConfig

from .common import fmt
from .app import app, out_console
from .options import config_command


@app.command()
@config_command(GenerateConfig, recipes=False)
def generate(cfg: GenerateConfig) -> None:
    """Generate text with the model's attention sparsified by a gate (KV cache, gate keys cached)."""
    from posthoc_sparse.generate import generate_text

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
