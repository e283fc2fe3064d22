"""`sparsify`: the Typer front end. Each command parses, calls one library function, and renders with rich.

Errors a user can cause print one line and exit with code 2; anything else exits 1. Set
POSTHOC_SPARSE_DEBUG=1 for full tracebacks.
"""

from __future__ import annotations

import errno
import os
import sys

from posthoc_sparse.errors import UserError

from .app import app, console
from .common import esc


def _register_commands() -> None:
    from . import distill as _distill  # noqa: F401  (commands register themselves on `app`)
    from . import evaluate as _evaluate  # noqa: F401
    from . import generate as _generate  # noqa: F401
    from . import sweep as _sweep  # noqa: F401
    from . import pretrain as _pretrain  # noqa: F401
    from . import corpus as _corpus  # noqa: F401
    from . import absorb as _absorb  # noqa: F401
    from . import harness as _harness  # noqa: F401
    from . import passkey as _passkey  # noqa: F401
    from . import push as _push  # noqa: F401


def _quiet_libraries() -> None:
    """Our own progress bars and messages replace transformers' loading bars and info logs."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


_WRITE_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT)


def _fail(message: str, code: int) -> None:
    console.print(message, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit 0 on success, 2 on a user error (one line), 1 on an internal error."""
    _register_commands()
    _quiet_libraries()
    debug = os.environ.get("POSTHOC_SPARSE_DEBUG", "") not in ("", "0")
    if not sys.stdout.isatty():  # help into a pipe or file: click's plain layout, which wraps at 80 columns where
        app.rich_markup_mode = None  # rich's option table squeezes the help into a narrow column and cuts defaults
    try:
        app(args=argv, standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _fail("interrupted; rerun with --resume to continue from the last checkpoint", 130)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click's (or Typer's vendored click's) usage errors
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        if debug:
            raise
        if isinstance(e, UserError):  # the messages hold user paths and values: escaped, never read as markup
            _fail(f"[bold red]error:[/] {esc(e)}", 2)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            _fail(f"[bold red]error:[/] cannot write {esc(e.filename or 'the output')}: {esc(e.strerror)}; free "
                  "space or fix the permissions, then rerun with --resume", 2)
        _fail(f"[bold red]internal error:[/] {type(e).__name__}: {esc(e)} (set POSTHOC_SPARSE_DEBUG=1 for the "
              "traceback)", 1)


if __name__ == "__main__":
    main()
