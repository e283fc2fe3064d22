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


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its KV cache by: "cache" (transformers >= 5.24) or "past_key_values"."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DecodeStep:
    """One greedy decoding step with a transformers StaticCache, every sequence one token: eager, or replayed as a
    CUDA graph.

    Letters: B batch, L the cache's length, V vocabulary. Static device buffers: ``ids`` (B, 1) the tokens in,
    ``pos`` (B, 1) their positions, ``mask`` (B, L) the padding mask over the cache's whole length (1 past the
    tokens written: the causal mask hides them). A call runs the model on them, writes the greedy next tokens
    into ``ids``, advances ``pos`` and returns the step's logits (B, V) (the graph's static output: copy it to
    keep it). Nothing is read back by the host, so a whole generation replays without waiting for the device.
    With ``graph``, the first call runs eagerly on a side stream (Triton compiles, lazy state settles), the
    second captures and replays, later calls replay.
    """

    def __init__(self, model, cache, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, graph: bool):
        self.model, self.cache, self.ids, self.pos, self.mask = model, cache, ids, pos, mask
        self.use_graph, self.graph, self.logits, self.calls = graph, None, None, 0
        self._cache_kw = cache_kwarg(model)

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                         **{self._cache_kw: self.cache})
        logits = out.logits[:, -1]  # (B, V)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if not self.use_graph:
            return self._step()
        if self.graph is None and self.calls == 1:
            side = torch.cuda.Stream(self.ids.device)
            side.wait_stream(torch.cuda.current_stream(self.ids.device))
            with torch.cuda.stream(side):
                logits = self._step()
            torch.cuda.current_stream(self.ids.device).wait_stream(side)
            return logits
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits
