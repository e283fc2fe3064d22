"""CUDA graphs of work that runs through this project's attention: one helper for the distillation step and the
eval forward.

At short context a forward is bound by the host: transformers and the policies launch some thousand small
kernels and the GPU waits between them. A CUDA graph replays all of them with one launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ..errors import first_line
from .interface import plain_causal_prefill

# (label, context manager factory): how a capture is tried; the label goes into the failure message
Attempt = tuple[str, Callable[[], contextlib.AbstractContextManager]]
PLAIN: tuple[Attempt, ...] = (("", contextlib.nullcontext),)


def captured(fn: Callable, device) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn()`` captured as a CUDA graph after one warm-up call on a side stream (lazy initialisations happen
    outside the capture), and what the captured call returned (its static outputs)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a private memory pool
        out = fn()
    return graph, out


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(t) for t in out)
    return out


class ShapeGraphs:
    """``fn(*inputs)`` as CUDA graphs, one per key (``key[0]``: the inputs' shape).

    A key's first call runs ``fn`` eagerly (Triton compiles, cuDNN plans); the second captures ``capturable``
    (default ``fn``) on copies of the inputs inside ``plain_causal_prefill()``, tried under each of ``attempts``
    in turn; later calls copy their inputs in, replay, and return a clone of the outputs. A key marked
    ``keep_eager``, or whose capture failed (``failures``), stays eager. ``capture`` is replaceable for tests."""

    def __init__(self, capture: Callable = captured, attempts: Sequence[Attempt] = PLAIN):
        self.capture = capture  # captured(fn, device) -> (graph, static outputs)
        self.attempts = tuple(attempts)
        self.graphs: dict = {}  # key -> (static inputs, graph, static outputs), or None: the key stays eager
        self.seen: set = set()
        self.failures: list[str] = []
        self.retried: list[str] = []
        self.replays = 0

    @property
    def replayed_shapes(self) -> list[list[int]]:
        return [list(key[0]) for key, entry in self.graphs.items() if entry is not None]

    def keep_eager(self, key) -> None:
        """Never capture ``key`` (its eager run left the path a graph can hold)."""
        self.seen.add(key)
        self.graphs[key] = None

    def __call__(self, key, fn: Callable, *inputs: torch.Tensor | None, capturable: Callable | None = None):
        if key not in self.seen:
            self.seen.add(key)
            return fn(*inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key, capturable or fn, inputs)
        entry = self.graphs[key]
        if entry is None:
            return fn(*inputs)
        static, graph, out = entry
        for s, x in zip(static, inputs):
            if s is not None:
                s.copy_(x)
        graph.replay()
        self.replays += 1
        return _clone(out)

    def _capture(self, key, fn: Callable, inputs: tuple):
        static = tuple(None if x is None else x.clone() for x in inputs)
        device = next(x.device for x in inputs if x is not None)
        errors = []
        for label, context in self.attempts:
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the eager run's blocks, so that the graph's pool takes their place
                with plain_causal_prefill(), context():
                    graph, out = self.capture(lambda: fn(*static), device)
                self.retried += errors
                return static, graph, out
            except Exception as e:  # noqa: BLE001 - any capture failure: this attempt failed
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                errors.append(f"{tuple(key[0])}{label}: {type(e).__name__}: {first_line(e, 200)}")
        self.failures += errors
        return None
