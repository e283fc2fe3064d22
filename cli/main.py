"""`sparsify`: the Typer front end. Each command parses, calls one library function, and renders with rich.

Errors a user can cause print one line and exit with code 2; Ctrl-C prints where the resumable state is and exits
with code 130; anything else exits 1. Set POSTHOC_SPARSE_DEBUG=1 for full tracebacks.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from posthoc_sparse.errors import Interrupted, UserError


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


# A write refused by the system, and what to do about it.
_WRITE_ERRNOS = {
    errno.ENOSPC: "free space", errno.EDQUOT: "free space (disk quota)",
    errno.EFBIG: "the file is larger than this file system or the file-size limit (ulimit -f) allows",
    errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
    errno.EROFS: "the file system is read-only: choose another --output",
}
INTERRUPTED_HINT = "interrupted (Ctrl-C); nothing was written"


def _esc(value) -> str:
    from .common import esc  # late: the handler of an early Ctrl-C is in place before anything heavy is imported

    return esc(value)


def _fail(message: str, code: int, hard: bool = False) -> None:
    from .app import console

    console.print(message, highlight=False, soft_wrap=True)
    if hard:  # a SIGINT that landed inside an import run through PyRun_* leaves CPython's "unhandled Ctrl-C" flag set,
        sys.stdout.flush()  # and the interpreter then ends itself by SIGINT (status -2) whatever sys.exit said
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _ctrl_c_before_a_run(signum, frame) -> None:
    """SIGINT until a run takes over its output folder (``runs.output_run`` then makes it a KeyboardInterrupt it
    cleans up after): nothing has been written, so the process ends at once. A KeyboardInterrupt raised here could
    land inside an import that swallows it or turns it into an ImportError, and a swallowed one let the run go on."""
    os.write(2, f"{INTERRUPTED_HINT}\n".encode())
    os._exit(130)


def _click_message(e) -> str:
    """A click usage error (bad type, unknown option or command) as one line, naming the help to read: click's own
    rendering is a usage box of four lines."""
    message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if ctx is None:
        return message
    command = "sparsify" + ctx.command_path[len(ctx.find_root().command_path):]  # not `python -m ...`'s name
    return f"{message}; see '{command} --help'"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit 0 on success, 2 on a user error (one line), 130 on Ctrl-C, 1 on an internal
    error."""
    debug = os.environ.get("POSTHOC_SPARSE_DEBUG", "") not in ("", "0")
    own_process = argv is None  # the console script: exits hard on Ctrl-C; a caller passing argv gets SystemExit
    if own_process:
        signal.signal(signal.SIGINT, _ctrl_c_before_a_run)
    try:
        from .app import app

        _register_commands()
        _quiet_libraries()
        if not sys.stdout.isatty():  # help into a pipe or file: click's plain layout, which wraps at 80 columns where
            app.rich_markup_mode = None  # rich's option table squeezes the help into a narrow column and cuts defaults
        code = app(args=argv, standalone_mode=False)  # Typer returns 130 for a KeyboardInterrupt it caught
    except SystemExit:
        raise
    except Interrupted as e:  # a run stopped at a safe point: it says what it kept
        _fail(f"[bold yellow]interrupted:[/] {_esc(e)}", 130, own_process)
    except KeyboardInterrupt:
        _fail(f"[bold yellow]{INTERRUPTED_HINT}[/]", 130, own_process)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click's (or Typer's vendored click's) usage errors
            if type(e).__name__ == "NoArgsIsHelpError":  # `sparsify` alone: the help
                e.show()
                sys.exit(e.exit_code)
            _fail(f"[bold red]error:[/] {_esc(_click_message(e))}", e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        if debug:
            raise
        if isinstance(e, UserError):
            _fail(f"[bold red]error:[/] {_esc(e)}", 2)  # user paths and values: never read as markup
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            _fail(f"[bold red]error:[/] cannot write {_esc(e.filename or 'the output')}: {_esc(e.strerror)}; "
                  f"{_WRITE_ERRNOS[e.errno]}, then rerun (with --resume where the command has it)", 2)
        _fail(f"[bold red]internal error:[/] {type(e).__name__}: {_esc(e)} (set POSTHOC_SPARSE_DEBUG=1 for the traceback)", 1)
    else:
        if code == 130:
            _fail(f"[bold yellow]{INTERRUPTED_HINT}[/]", 130, own_process)
        if isinstance(code, int) and code:
            sys.exit(code)


if __name__ == "__main__":
    main()
