"""Every recipe in recipes/ (recursively) loads into the config of the command its first line runs.

A recipe's first line is the exact command that runs it: ``# sparsify COMMAND --recipe NAME`` (NAME is the file's
stem for recipes at the top level, which `--recipe` finds by name, else the path from the repository root).
COMMAND decides the dataclass; an unknown command, an unknown key or an invalid value fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posthoc_sparse.config import DistillConfig, build_config, load_recipe
from posthoc_sparse.corpus import CorpusConfig
from posthoc_sparse.errors import UserError
from posthoc_sparse.evaluate.perplexity import EvalConfig
from posthoc_sparse.experiments.absorb import AbsorbConfig
from posthoc_sparse.experiments.pretrain import PretrainConfig
from posthoc_sparse.experiments.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "recipes"
RECIPES = sorted(RECIPE_DIR.rglob("*.toml"))
KINDS = {"distill": DistillConfig, "eval": EvalConfig, "unfreeze-sweep": SweepConfig, "pretrain": PretrainConfig,
         "corpus": CorpusConfig, "absorb": AbsorbConfig}
FIRST_LINE = re.compile(r"# sparsify (?P<command>[a-z-]+) --recipe (?P<name>\S+)(?: .*)?")


def test_the_recipes_are_found():
    names = {p.stem for p in RECIPES}
    assert {"paper-31m", "paper-31m-distill", "paper-31m-eval", "qwen3-1.7b-distill", "qwen3-1.7b-unfreeze",
            "paper-31m-absorb"} <= names
    assert len(RECIPES) >= 7


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(RECIPE_DIR)) for p in RECIPES])
def test_every_recipe_loads_into_its_config(path):
    first = path.read_text().splitlines()[0]
    match = FIRST_LINE.fullmatch(first)
    assert match, f"{path.name}: the first line must be the command that runs it, got {first!r}"
    command, name = match["command"], match["name"]
    assert command in KINDS, f"{path.name}: unknown command {command!r}"
    top_level = path.parent == RECIPE_DIR
    assert name == (path.stem if top_level else str(path.relative_to(ROOT))), f"{path.name}: --recipe {name}"
    cfg = build_config(KINDS[command], load_recipe(str(path)))  # unknown keys raise
    if top_level:
        assert load_recipe(name) == load_recipe(str(path))  # `--recipe NAME` finds this very file
    if hasattr(cfg, "validate"):
        cfg.validate()
    if isinstance(cfg, EvalConfig):
        cfg.k_list(), cfg.mode_list()
    if isinstance(cfg, CorpusConfig):
        cfg.source_list()


def test_every_recipe_command_takes_a_recipe():
    import typer.main

    from sparsify_cli.app import app
    from sparsify_cli.main import _register_commands

    _register_commands()
    for command in KINDS:
        info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
        params = {p.name for p in typer.main.get_command_from_info(
            info, pretty_exceptions_short=True, rich_markup_mode=None).params}
        assert "recipe" in params, command


def test_an_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("# sparsify pretrain --recipe bad\nn_layers = 6\n")
    with pytest.raises(UserError, match="unknown PretrainConfig key 'n_layers'"):
        build_config(PretrainConfig, load_recipe(str(bad)))
