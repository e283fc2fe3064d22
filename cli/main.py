"""`sparsify`: the Typer front end. Each command parses, calls one library function, and renders with rich.

Errors a user can cause print one line and exit with code 2; anything else exits 1. Set
POSTHOC_SPARSE_DEBUG=1 for full tracebacks.
"""

from __future__ import annotations

import os
import sys

from posthoc_sparse.errors import UserError

from .app import app, console


def _register_commands() -> None:
    from . import distill as _distill  # noqa: F401  (commands register themselves on `app`)
    from . import evaluate as _evaluate  # noqa: F401
    from . import generate as _generate  # noqa: F401
    from . import sweep as _sweep  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register_commands()
    debug = os.environ.get("POSTHOC_SPARSE_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; rerun with --resume to continue from the last checkpoint")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if debug:
            raise
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (set POSTHOC_SPARSE_DEBUG=1 for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
