"""CUDA graphs of forwards through this project's attention: the capture helper and per-shape forward graphs.

At short context a forward is bound by the host: transformers and the policies launch some thousand small
kernels (about 15 per layer for gated attention) and the GPU waits between them. A CUDA graph replays all of
them with one launch, so dense and sparse forwards alike run at the GPU's pace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .interface import plain_causal_prefill


def captured(fn: Callable, device) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn()`` captured as a CUDA graph after one warm-up call on a side stream (as capture wants: lazy
    initialisations happen outside it), and what the captured call returned (static outputs)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a private memory pool
        out = fn()
    return graph, out


class ForwardGraphs:
    """``fn(ids)`` (a forward of whole causal windows and what follows it, returning tensors) as CUDA graphs,
    one per shape of ``ids``. A shape's first call runs eagerly (the warm-up: Triton compiles, cuDNN plans);
    the second is captured inside ``plain_causal_prefill()``, and every later call copies its ids into the
    graph's and replays it. A capture that fails leaves that shape eager, with the reason in ``failures``.

    The caller promises what ``plain_causal_prefill`` asks: no padding, no packed sequences, no cache, and
    nothing in ``fn`` that must run on the host per call (an observer, a ``.item()``). Each graph's memory
    (one forward's activations) stays reserved while this object lives."""

    def __init__(self, capture: Callable = captured):
        self.capture = capture  # captured(fn, device) -> (graph, static outputs); tests pass a stand-in
        self.graphs: dict = {}  # key -> (static ids, graph, static outputs), or None where the shape stays eager
        self.seen: set = set()
        self.failures: list[str] = []
        self.replays = 0

    @property
    def replayed_shapes(self) -> list[list[int]]:
        return [list(key[0]) for key, entry in self.graphs.items() if entry is not None]

    def __call__(self, fn: Callable, ids: torch.Tensor):
        key = (tuple(ids.shape), ids.dtype, ids.device)
        if key not in self.seen:
            self.seen.add(key)
            return fn(ids)
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn, ids)
        entry = self.graphs[key]
        if entry is None:
            return fn(ids)
        static, graph, out = entry
        static.copy_(ids)
        graph.replay()
        self.replays += 1
        return out.clone() if isinstance(out, torch.Tensor) else type(out)(t.clone() for t in out)

    def _capture(self, fn: Callable, ids: torch.Tensor):
        static = ids.clone()
        try:
            if ids.is_cuda:
                torch.cuda.empty_cache()  # the eager run's blocks, so that the graph's pool takes their place
            with plain_causal_prefill():
                graph, out = self.capture(lambda: fn(static), ids.device)
            return static, graph, out
        except Exception as e:  # noqa: BLE001 - any capture failure: this shape stays eager
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            self.failures.append(f"{tuple(ids.shape)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
