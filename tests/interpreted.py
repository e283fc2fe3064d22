"""Triton's interpreter, made faster for the tests: ``patch_the_interpreter_once_per_launch`` (applied by conftest
in the test processes), and a runner for the scripts the tests start under TRITON_INTERPRET=1, which applies it there
too before running the script as ``__main__``:

    python -m tests.interpreted benchmarks/sweep_probe.py --t 70 ...    (from the repository root)

The patch changes no result, only how often the interpreter re-patches ``triton.language``."""

from __future__ import annotations

import runpy
import sys


def patch_the_interpreter_once_per_launch() -> None:
    """Triton's interpreter patches the language modules a function sees (``_patch_lang``: ``inspect.getmembers``
    over ``triton.language`` or its ``core``, and their tensor class) at each launch, then again at every call of a
    ``@triton.jit`` helper inside the kernel, and those repeats are never undone. Our kernels call helpers in their
    loops (``_tile`` at every tile), so a bitmask test spent about 30% of its time there (cProfile: 100,929 calls).
    Within a launch, a helper that sees only modules already patched in it skips the repeat; the launch's own
    patch, undone when the launch ends, is kept. Left as it is where the interpreter lacks these names (another
    Triton version)."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang", None)
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if patch is None or launch is None or getattr(patch, "once_per_launch", False):
        return
    patched: set[int] = set()  # the language modules patched in the launch under way
    state = {"launching": False}

    class _Nothing:  # the scope of a skipped repeat: nothing to undo
        def restore(self) -> None:
            pass

    seen: dict = {}  # function -> the language modules among its globals (a scan of them cost 3% of a test)

    def once(fn):
        langs = seen.get(fn)
        if langs is None:
            langs = seen[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if state["launching"] and patched and langs <= patched:
            return _Nothing()
        if state["launching"]:
            patched.update(langs)
        return patch(fn)

    def counted_launch(self, *args, **kwargs):  # a launch: its first patch is its own, undone at its end
        state["launching"] = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["launching"] = False
            patched.clear()

    once.once_per_launch = True
    interpreter._patch_lang = once
    interpreter.GridExecutor.__call__ = counted_launch


def main(argv: list[str]) -> None:
    """Run the script argv[0] as ``__main__`` with the arguments after it, the interpreter patched first."""
    if not argv:
        raise SystemExit("usage: python -m tests.interpreted SCRIPT [ARGS...]")
    patch_the_interpreter_once_per_launch()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
