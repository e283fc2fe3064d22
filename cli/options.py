"""Typer options built from a config dataclass, so that a default and its help are written once, in the field.

Each field declared with ``posthoc_sparse.config.option`` becomes one option: ``--field-name`` (or the field's
``flags``), the field's type, its ``metadata["help"]``, and the field's default as the option's default, which
``--help`` shows. Only the flags a user typed reach the config, so an absent flag never overrides a recipe value.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from posthoc_sparse.runs import check_resume_folder

from .common import make_config


def flag_names(field: dataclasses.Field) -> tuple[str, ...]:
    """The option's names: the field's ``flags``, else ``--name``; a bool defaulting to True gets ``--no-name``."""
    if "flags" in field.metadata:
        return field.metadata["flags"]
    flag = "--" + field.name.replace("_", "-")
    return (f"{flag}/--no-{flag[2:]}",) if field.default is True else (flag,)


def config_parameters(cls) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls`` (but those declared ``cli=False``), annotated the way Typer
    builds an option from it: the field's type, default and help."""
    hints = typing.get_type_hints(cls)  # the configs' modules use `from __future__ import annotations`
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=Annotated[
                hints[f.name], typer.Option(*flag_names(f), help=f.metadata.get("help"))])
            for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


_RECIPE_PARAMETERS = [
    inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help="A recipe name (recipes/) or TOML path; --set and the flags given override "
                                         "its values.")]),
    inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a key: --set key=value (repeatable).")]),
]


def config_command(cls, *, recipes: bool = True) -> Callable[[Callable[[Any], None]], Callable[..., None]]:
    """Decorate ``body(cfg)`` into a Typer command whose options are the fields of ``cls`` (plus --recipe and
    --set when ``recipes``); the command builds ``cfg`` from the recipe, the --set pairs and the flags given."""

    def decorate(body: Callable[[Any], None]) -> Callable[..., None]:
        def command(ctx: typer.Context, recipe: str | None = None, set_: list[str] | None = None, **values: Any):
            given = {name: value for name, value in values.items()
                     if ctx.get_parameter_source(name).name == "COMMANDLINE"}  # not a default: the user typed it
            cfg = make_config(cls, recipe, set_, given)
            if getattr(cfg, "resume", False):  # the library starts a run that has nothing to resume; a typed
                check_resume_folder(cfg.output)  # --resume of a folder that does not exist is a mistake
            return body(cfg)

        ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        params = [ctx_param, *config_parameters(cls), *(_RECIPE_PARAMETERS if recipes else [])]
        command.__signature__ = inspect.Signature(params)
        command.__name__, command.__qualname__, command.__doc__ = body.__name__, body.__qualname__, body.__doc__
        command.__module__ = body.__module__
        return command

    return decorate
