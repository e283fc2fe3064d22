"""Triton's interpreter, made faster for the tests: ``patch_the_interpreter_once_per_launch``, and its ``tl.dot``
made independent of the tiles' shapes as a GPU's is: ``patch_the_interpreter_dot`` (both applied by conftest in the
test processes), and a runner for the scripts the tests start under TRITON_INTERPRET=1, which applies them there
too before running the script as ``__main__``:

    python -m tests.interpreted benchmarks/sweep_probe.py --t 70 ...    (from the repository root)

The first patch changes no result, only how often the interpreter re-patches ``triton.language``; the second
rounds each dot once, from float64."""

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


def patch_the_interpreter_dot() -> None:
    """Make the interpreter's ``tl.dot`` give each element the same bits whatever the shape of the tiles around it,
    as a GPU's does (for a given reduction length, a tensor-core or FMA dot adds an element's products in one
    order, whatever the tile's rows and columns). The interpreter calls ``np.matmul``, whose BLAS may add them in
    an order that depends on the matrix shape and the CPU (seen on an AMD EPYC: a score computed by two kernels with
    different tiles differed in its last bit, and the token selection, which counts band keys in one kernel and
    writes them in another, read a slot it never wrote). Here floating dots of 16 bits and more are computed in
    float64 (each product exact, the sum's rounding far below float32's) and rounded once to the accumulator's
    type. Left as it is where the interpreter lacks these names (another Triton version)."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    dot = getattr(builder, "create_dot", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if dot is None or handle is None or getattr(dot, "shape_independent", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.is_floating() and b.dtype.is_floating() and min(a.dtype.primitive_bitwidth,
                                                                     b.dtype.primitive_bitwidth) >= 16:
            out = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(d.data.dtype)
            return handle(out + d.data, d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.shape_independent = True
    builder.create_dot = create_dot


def main(argv: list[str]) -> None:
    """Run the script argv[0] as ``__main__`` with the arguments after it, the interpreter patched first."""
    if not argv:
        raise SystemExit("usage: python -m tests.interpreted SCRIPT [ARGS...]")
    patch_the_interpreter_once_per_launch()
    patch_the_interpreter_dot()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
