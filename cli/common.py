"""Shared CLI helpers: recipe + --set + flags -> a frozen config; rich progress rendering; user text escaped for
rich; tables that keep every number whole at any width."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
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


class _Bar(Progress):
    """A progress bar whose ``stop`` does nothing unless it was started: out of a terminal rich ends a stopped bar
    with a newline, which before an error that came first was a blank line above the one-line message."""

    def stop(self) -> None:
        if self.live.is_started:
            super().stop()


def progress_bar() -> Progress:
    from .app import console

    return _Bar(
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


def esc(value: Any) -> str:
    """``value`` as text that rich prints literally: a prompt, path or name with ``[red]`` or ``[/x]`` in it is the
    user's text, not markup."""
    return escape(str(value))


def print_table(console, title: str, headers: list[str], rows: list[list[str]], key_columns: int = 1) -> None:
    """Print a table whose cells stay whole at the console's width (80 in a pipe or CI log). If it does not fit
    with its headers on one line, the headers wrap at spaces; if it still does not fit, a one-row table is printed
    transposed (a name and a value per line) and a longer one is split over several tables, each repeating the
    first ``key_columns`` columns. Cells and titles are plain text (escaped), never markup."""
    import textwrap

    from rich.table import Table

    width = max(20, console.width - 1)  # - 1: the table's last border

    def need(i: int, wrap: bool) -> int:  # a column's width (its widest cell, or header) + padding and border
        header = max(len(w) for w in headers[i].split()) if wrap and headers[i].strip() else len(headers[i])
        return max([len(r[i]) for r in rows] + [header]) + 3

    def show(cols: list[int], part: str, wrap: bool) -> None:
        table = Table(title=esc(title + part))
        for i in cols:
            header = "\n".join(textwrap.wrap(headers[i], need(i, wrap) - 3)) if wrap else headers[i]
            table.add_column(esc(header), justify="left" if i == 0 and i < key_columns else "right",
                             min_width=need(i, wrap) - 3, overflow="fold")
        for r in rows:
            table.add_row(*(esc(r[i]) for i in cols))
        console.print(table)

    every = list(range(len(headers)))
    for wrap in (False, True):
        if sum(need(i, wrap) for i in every) <= width:
            return show(every, "", wrap)
    if len(rows) == 1:  # transposed: one line per column
        table = Table(title=esc(title), show_header=False)
        table.add_column(justify="left")
        table.add_column(justify="right", overflow="fold")
        for name, value in zip(headers, rows[0]):
            table.add_row(esc(name), esc(value))
        return console.print(table)
    keys, groups, current = every[:key_columns], [], []
    for i in every[key_columns:]:
        if current and sum(need(j, True) for j in keys + current + [i]) > width:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    for n, group in enumerate(groups):
        show(keys + group, f" ({n + 1}/{len(groups)})", True)


def print_report(table: tuple[str, list[str], list[list[str]]], files: list[str], key_columns: int = 1) -> None:
    """A report's table (``(title, headers, rows)`` from the library) on stdout, then the files it wrote, if any:
    only what is on disk is named."""
    from .app import out_console

    print_table(out_console, *table, key_columns=key_columns)
    if files:
        out_console.print(f"written: {esc(', '.join(files))}")


def log_step(info: dict, every: int) -> None:
    """When stderr is not a terminal (a log file, CI, nohup): a plain loss line every ``every`` training steps and
    at the last one (a progress bar's redraws would fill the log)."""
    from .app import console

    if not console.is_terminal and (info["step"] % every == 0 or info["step"] == info["total"]):
        console.print(f"step {info['step']}/{info['total']}: loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                      f"{info['tokens_per_second']:,.0f} tok/s", highlight=False)


def print_note(info: dict) -> None:
    """A library's "note" event (a warning the run goes on after)."""
    from .app import console

    console.print(f"[yellow]note[/]: {esc(info['message'])}")


def run_reporting(call, progress, on_event):
    """Return ``call(handler)``: the handler prints the library's notes and hands every other event to
    ``on_event(kind, info)``; the progress display stops however the call ends."""
    def handler(kind: str, info: dict) -> None:
        if kind == "note" or kind.endswith(".note"):
            print_note(info)
        else:
            on_event(kind, info)

    try:
        return call(handler)
    finally:
        progress.stop()


class RunProgress:
    """A progress bar over a command's runs (mode and k), and, when stderr is not a terminal (a log), one plain
    line per finished run instead of the bar's redraws."""

    def __init__(self, name: str):
        self.name, self.bar, self.task = name, progress_bar(), None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task(self.name, total=total, info="")

    def done(self, line: str) -> None:
        """One run finished; ``line`` (plain text) says what it gave."""
        from .app import console

        if self.task is not None:
            self.bar.update(self.task, advance=1, info=esc(line))
        if not console.is_terminal:
            console.print(esc(line), highlight=False)

    def stop(self) -> None:
        self.bar.stop()
