"""The CLI's options come from the config dataclasses (sparsify_cli/options.py): every field is an option of its
command (EXCLUDED lists the exceptions) with the field's default and help; a flag given reaches the config, a flag
not given leaves a recipe's value alone; the flags the docs show exist."""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from posthoc_sparse.config import DistillConfig, option, rule_of
from posthoc_sparse.corpus import CorpusConfig
from posthoc_sparse.evaluate.harness import TasksConfig
from posthoc_sparse.evaluate.passkey import PasskeyConfig
from posthoc_sparse.evaluate.perplexity import EvalConfig
from posthoc_sparse.experiments.absorb import AbsorbConfig
from posthoc_sparse.experiments.pretrain import PretrainConfig
from posthoc_sparse.experiments.sweep import SweepConfig
from posthoc_sparse.gates.hub import PushConfig
from posthoc_sparse.generate import GenerateConfig
from sparsify_cli.main import main
from sparsify_cli.options import config_command

ROOT = Path(__file__).resolve().parents[1]
# command -> its config and the library function the command hands the config to (module, name)
COMMANDS = {
    "distill": (DistillConfig, "posthoc_sparse.distill.loop", "distill"),
    "eval": (EvalConfig, "posthoc_sparse.evaluate.perplexity", "evaluate_perplexity"),
    "generate": (GenerateConfig, "posthoc_sparse.generate", "generate_text"),
    "unfreeze-sweep": (SweepConfig, "posthoc_sparse.experiments.sweep", "run_sweep"),
    "pretrain": (PretrainConfig, "posthoc_sparse.experiments.pretrain", "pretrain"),
    "corpus": (CorpusConfig, "posthoc_sparse.corpus", "build_corpus"),
    "absorb": (AbsorbConfig, "posthoc_sparse.experiments.absorb", "run_absorb"),
    "passkey": (PasskeyConfig, "posthoc_sparse.evaluate.passkey", "run_passkey"),
    "lm-eval": (TasksConfig, "posthoc_sparse.evaluate.harness", "evaluate_tasks"),
    "push": (PushConfig, "posthoc_sparse.gates.hub", "push"),
}
# The fields that are no CLI option (declared with option(..., cli=False)); recipes and --set still reach them.
EXCLUDED: dict[str, set[str]] = {}
NO_RECIPES = {"generate", "push"}  # the commands without --recipe and --set


def _command(name: str):
    from sparsify_cli.app import app
    from sparsify_cli.main import _register_commands

    _register_commands()
    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == name)
    return typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=None)


def _shown_default(field: dataclasses.Field, param) -> str | None:
    """What `--help` must show as the default: the field's default (a bool pair names the flag that is on)."""
    if field.default is None or (field.default is False and not param.secondary_opts):
        return None  # not given = the help text's "if not given" (or a plain flag that is off)
    if isinstance(field.default, bool):
        return (param.opts if field.default else param.secondary_opts)[0].lstrip("-")
    return str(field.default)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_is_an_option_with_the_fields_default_and_help(name):
    cls = COMMANDS[name][0]
    cmd = _command(name)
    params = {p.name: p for p in cmd.params}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    excluded = {n for n, f in fields.items() if not f.metadata.get("cli", True)}
    assert excluded == EXCLUDED.get(name, set())
    assert set(params) - set(fields) == (set() if name in NO_RECIPES else {"recipe", "set_"})
    assert set(fields) - set(params) == excluded
    ctx = cmd.context_class(cmd)
    for fname in set(fields) - excluded:
        field, param = fields[fname], params[fname]
        assert param.default == field.default, fname
        assert field.metadata["help"] and param.help == field.metadata["help"], fname
        assert not re.search(r"\bDefault\b", param.help), f"{fname}: the default shows from the field"
        help_line = param.get_help_record(ctx)[1]
        shown = _shown_default(field, param)
        if shown is None:
            assert "default:" not in help_line, (fname, help_line)
        else:
            assert f"[default: {shown}]" in help_line, (fname, help_line)


def _toy_config(count_default: int):
    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        count: int = option(count_default, "How many.")
        limit: int | None = option(None, "A bound; if not given, none.")
        name: str = option("toy", "A name.", flags=("--name", "-n"))
        fast: bool = option(True, "Go fast.")
        verbose: bool = option(False, "Say more.")
        loud: bool = option(False, "Shout.", flags="--shout")
        secret: str = option("s", "Recipes and --set only.", cli=False)

    return ToyConfig


def _toy_app(cls, seen: list):
    app = typer.Typer(rich_markup_mode=None)

    @app.command()
    @config_command(cls)
    def toy(cfg) -> None:
        """A toy command."""
        seen.append(cfg)

    return app


@pytest.mark.parametrize("count_default", [3, 7])
def test_the_builder_shows_the_dataclass_default_and_passes_only_the_flags_given(count_default, tmp_path):
    cls, seen = _toy_config(count_default), []
    app, runner = _toy_app(cls, seen), CliRunner()
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert f"How many.  [default: {count_default}]" in shown
    assert "A bound; if not given, none.\n" in shown  # no default shown for None
    assert "-n, --name <str>" in shown and "--fast / --no-fast" in shown and "[default: fast]" in shown
    assert "--shout" in shown and "--loud" not in shown and "--verbose" in shown and "--no-verbose" not in shown
    assert "--secret" not in shown and "--recipe" in shown and "--set" in shown
    assert "A toy command." in shown

    args = ["--count", "5", "--limit", "2", "-n", "x", "--no-fast", "--verbose", "--shout"]
    assert runner.invoke(app, args).exit_code == 0
    assert seen.pop() == cls(count=5, limit=2, name="x", fast=False, verbose=True, loud=True)
    assert runner.invoke(app, []).exit_code == 0
    assert seen.pop() == cls()

    recipe = tmp_path / "toy.toml"
    recipe.write_text("count = 11\nfast = false\nsecret = \"r\"\n")
    assert runner.invoke(app, ["--recipe", str(recipe)]).exit_code == 0
    assert seen.pop() == cls(count=11, fast=False, secret="r")  # absent flags leave the recipe's values
    args = ["--recipe", str(recipe), "--count", str(count_default), "--fast", "--set", "secret=t", "--set", "limit=4"]
    assert runner.invoke(app, args).exit_code == 0
    assert seen.pop() == cls(count=count_default, fast=True, secret="t", limit=4)  # a flag = the default still wins


def _other_value(field: dataclasses.Field, kind, param) -> tuple[object, list[str]]:
    """A value unlike the field's default (of type ``kind``) that its rule allows (values are checked when the
    config is built), and the arguments that give it."""
    flag = next(o for o in param.opts if o.startswith("--"))
    rule = rule_of(field)
    if kind is bool:
        return not field.default, [flag if not field.default else param.secondary_opts[0]]
    if rule.choices:
        value = next(c for c in rule.choices if c != field.default)
    elif kind in (int, int | None):
        value = next(v for v in ((field.default or 0) + 3, (field.default or 0) - 1) if rule.in_range(v))
    elif kind in (float, float | None):
        value = next(v for v in ((field.default or 0) + 0.25, (field.default or 1) / 2) if rule.in_range(v))
    else:
        value = f"{field.default or ''}-other"
    return value, [flag, str(value)]


def _capture(monkeypatch, name: str) -> list:
    """Replace the library function of command ``name`` by one that keeps the config and ends the command."""
    _, module, function = COMMANDS[name]
    seen = []

    def handed(cfg, *args, **kwargs):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module(module), function, handed)
    return seen


def _run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_reaches_the_config_and_no_flag_gives_the_defaults(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a --resume needs its --output folder to exist (made here, not in the repository)
    cls = COMMANDS[name][0]
    seen = _capture(monkeypatch, name)
    _run([name])
    assert seen.pop() == cls()
    params, kinds = {p.name: p for p in _command(name).params}, typing.get_type_hints(cls)
    values, argv = {}, [name]
    for field in dataclasses.fields(cls):
        if field.name in params:
            values[field.name], args = _other_value(field, kinds[field.name], params[field.name])
            argv += args
    if values.get("resume"):
        Path(values["output"]).mkdir(parents=True)
    _run(argv)
    assert seen.pop() == cls(**values)


def test_a_recipe_value_stays_unless_a_flag_or_set_overrides_it(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "distill")
    recipe = tmp_path / "r.toml"
    recipe.write_text("k = 16\nseq_len = 128\ncuda_graph = false\noverwrite = true\nlr = 0.01\n")
    _run(["distill", "--recipe", str(recipe)])
    cfg = seen.pop()
    assert (cfg.k, cfg.seq_len, cfg.cuda_graph, cfg.overwrite, cfg.lr) == (16, 128, False, True, 0.01)
    _run(["distill", "--recipe", str(recipe), "--k", "64", "--cuda-graph", "--set", "seq_len=256", "--set", "lr=0.5"])
    cfg = seen.pop()
    assert (cfg.k, cfg.seq_len, cfg.cuda_graph, cfg.overwrite, cfg.lr) == (64, 256, True, True, 0.5)
    _run(["distill", "--set", "k=8", "--k", "32"])
    assert seen.pop().k == 32  # the flag wins over --set

    seen = _capture(monkeypatch, "eval")
    _run(["eval", "--no-routing"])
    assert seen.pop().routing is False
    (tmp_path / "e.toml").write_text("routing = false\n")
    _run(["eval", "--recipe", str(tmp_path / "e.toml")])
    assert seen.pop().routing is False


def test_a_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--k", "many"])
    assert stop.value.code == 2
    assert "Invalid value for '--k'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, start", [
    (["distill", "--k", "4.5"], "error: Invalid value for '--k': "),
    (["eval", "--no-such-flag"], "error: No such option: --no-such-flag"),
    (["no-such-command"], "error: No such command 'no-such-command'"),
], ids=["bad type", "unknown option", "unknown command"])
def test_a_usage_error_is_one_line_naming_the_help_and_exit_2(argv, start, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    command = " ".join(["sparsify", *argv[:1]]) if argv[0] != "no-such-command" else "sparsify"
    assert stop.value.code == 2 and err.count("\n") == 1 and "Usage:" not in err, err  # not click's usage box
    assert err.startswith(start) and err.endswith(f"; see '{command} --help'\n"), err


def test_sparsify_alone_still_prints_the_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("Usage: ") and "Commands:" in err and "distill" in err, err


def test_help_into_a_pipe_is_plain_text_that_wraps(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    main(["eval", "--help"])
    shown = capsys.readouterr().out  # captured: not a terminal
    assert "  --k <str>" in shown and "--routing / --no-routing" in shown
    assert "[default: dense,oracle,gate,random]" in shown
    assert "╭" not in shown and "…" not in shown  # no rich panel, nothing cut off
    assert max(len(line) for line in shown.splitlines()) <= 80


DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
COMMAND_LINE = re.compile(r"sparsify (" + "|".join(COMMANDS) + r")\b([^`#|\n]*)")


FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])(?![\w-])")
OPTION_TABLES = {"distill.md": "distill", "eval.md": "eval", "pretrain.md": "pretrain"}  # doc -> its command


def _documented_flags() -> list[tuple[str, str, str]]:
    """(doc, command, flag) for every flag on a `sparsify COMMAND ...` line of the docs and README, and in the first
    column of the option tables of OPTION_TABLES."""
    found = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")  # a command continued over lines
        for match in COMMAND_LINE.finditer(text):
            found += [(doc.name, match[1], flag) for flag in FLAG.findall(match[2])]
        if doc.name in OPTION_TABLES:
            for row in re.findall(r"^\| (`--[^|]*)\|", text, re.MULTILINE):
                found += [(doc.name, OPTION_TABLES[doc.name], flag) for flag in FLAG.findall(row)]
    return found


def test_every_flag_the_docs_show_is_an_option_of_its_command():
    documented = _documented_flags()
    assert len({(c, f) for _, c, f in documented}) > 40  # the scan finds the docs' commands
    options = {name: {o for p in _command(name).params for o in (*p.opts, *p.secondary_opts)} for name in COMMANDS}
    missing = [(doc, command, flag) for doc, command, flag in documented if flag not in options[command]]
    assert not missing
