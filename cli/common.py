"""Shared CLI helpers: recipe + --set + flags -> a frozen config; rich progress rendering."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from posthoc_sparse.config import build_config, load_recipe
from posthoc_sparse.errors import UserError


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def make_config(cls, recipe: str | None, sets: list[str] | None, flags: dict[str, Any]):
    """Recipe values, then --set overrides, then the flags given (those not None) win; each value is checked where
    it comes from, so that an error names the flag, the --set pair or the recipe."""
    base = load_recipe(recipe) if recipe else {}
    return build_config(cls, base, parse_sets(sets), flags={k: v for k, v in flags.items() if v is not None},
                        recipe=recipe)


def progress_bar() -> Progress:
    from .app import console

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )


def is_main_process() -> bool:
    """False in the non-main processes of a `torchrun` / `accelerate launch` group (they print nothing)."""
    from posthoc_sparse.parallel import is_main_process as main

    return main()


def processes_note(info: dict) -> str:
    n = info.get("processes", 1)
    return f", {n} data-parallel processes" if n > 1 else ""


def fmt(x: float | None, spec: str = ".4f") -> str:
    if x is None or x != x:
        return "-"
    return format(x, spec)
