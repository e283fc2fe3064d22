"""`sparsify generate`."""

from __future__ import annotations

from posthoc_sparse.generate import GenerateConfig

from .common import esc, fmt, print_note, print_table
from .app import app, console, out_console
from .options import config_command

PROMPT_SHOWN = 300  # characters of a longer prompt shown before its continuation


@app.command()
@config_command(GenerateConfig, recipes=False)
def generate(cfg: GenerateConfig) -> None:
    """Generate text with the model's attention sparsified by a gate (KV cache, gate keys cached)."""
    from posthoc_sparse.generate import generate_text

    res = generate_text(cfg)
    label = "dense" if res.mode == "dense" else f"{res.mode}@{res.k}"
    width = max(len(label), len("dense")) + 1
    prompt = esc(res.prompt)
    if len(res.prompt) > PROMPT_SHOWN:  # a long context: its end, where the continuation starts
        prompt = f"[dim]({len(res.prompt):,} characters; the last {PROMPT_SHOWN:,}:)[/] " + esc(res.prompt[-PROMPT_SHOWN:])
    # soft-wrapped (app.py): the text is one line however long, for logs and pipes
    out_console.print(f"{label + ':':<{width}} [bold]{prompt}[/]{esc(res.text)}", highlight=False)
    if res.dense_text is not None:
        out_console.print(f"{'dense:':<{width}} [bold]{prompt}[/]{esc(res.dense_text)}", highlight=False)
    if res.dense_equivalent and res.mode != "dense":
        print_note({"message": f"k={res.k} >= the {res.context}-token context, so every query kept all its keys: "
                               "attention was dense. Use a longer prompt or a smaller --k to see the gate at work."})
    if res.dense_text is None:
        console.print(f"{label}: prefill {fmt(res.prefill_seconds, '.3f')} s, decode "
                      f"{fmt(res.tokens_per_second, ',.1f')} tokens/s", highlight=False)
    else:
        headers = ["token agreement", "mean KL(dense || gated)", f"decode tok/s {label}", "decode tok/s dense",
                   f"prefill s {label}", "prefill s dense"]
        row = [fmt(res.agreement, ".1%"), fmt(res.mean_kl, ".4f"), fmt(res.tokens_per_second, ",.1f"),
               fmt(res.dense_tokens_per_second, ",.1f"), fmt(res.prefill_seconds, ".3f"),
               fmt(res.dense_prefill_seconds, ".3f")]
        print_table(out_console, f"{label} vs dense", headers, [row], key_columns=0)
