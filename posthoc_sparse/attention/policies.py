"""Selection policies run inside the attention function: dense, and deployed top-k by a selector (oracle, gate,
random). ``policy_for`` builds the policy of an evaluation mode.

Letters: B batch, H query heads, Hkv key/value heads, T queries, S keys, C query chunk, D head_dim, d gate dim.
A policy receives one ``LayerCall`` (what transformers handed the attention function plus the captured gate
inputs) and returns the attention output (B, T, H, D), as transformers' own attention functions do.
Policies never compute losses; an optional observer sees per-chunk scores and selections (for metrics).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import UserError
from ..gates.modules import GateBank
from ..ops import block_sparse as bsp
from ..ops import decode as dc
from ..ops import head_topk as ht
from ..ops import mask_attention as ma
from ..ops import token_select as ts
from .call import LayerCall, Observer, causal_pads, causal_prefix, chunked_attention, query_chunk_size
from .reference import group_scores, masked_softmax, scores, topk_keep
from .selectors import GateSelector, OracleSelector

# top-k per query head (docs/method.md); one top-k shared by each KV group; key blocks shared by each KV group and
# query block (ops/block_sparse: the fast deployed path)
SELECTIONS = ("head", "group", "block")
BLOCK_SCORES = ("bound", "exact")  # how the gate scores a key block (GateSelector.block_mass)
DEFAULT_BLOCK = 64
MODES = ("dense", "oracle", "gate", "random")  # dense attention, top-k by the true scores, by a gate, by a random gate


def check_selection(selection: str, block_size: int, block_score: str,
                    names: tuple[str, str, str] = ("selection", "block_size", "block_score")) -> None:
    """One clear UserError for a bad selection, block size or block score; ``names`` are what the caller calls
    them (Python arguments by default, or CLI flags)."""
    for name, value, allowed in zip(names, (selection, block_size, block_score),
                                    (SELECTIONS, bsp.BLOCK_SIZES, BLOCK_SCORES)):
        if value not in allowed:
            raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


class DensePolicy:
    """Exactly the model's stock attention (transformers' SDPA function), optionally observed."""

    needs_inputs = False

    def __init__(self, observer: Observer | None = None):
        self.observer = observer

    def __call__(self, call: LayerCall) -> torch.Tensor:
        if self.observer is not None:
            t, s = call.query.shape[2], call.key.shape[2]
            step = query_chunk_size(call.query.shape[0], call.query.shape[1], s)
            for a in range(0, t, step):
                e = min(t, a + step)
                sc = scores(call.query[:, :, a:e], call.key, call.scaling, call.softcap)
                self.observer(call.layer, sc, call.allowed(a, e), None)
        out, _ = sdpa_attention_forward(
            call.module, call.query, call.key, call.value, call.attention_mask,
            dropout=call.dropout, scaling=call.scaling, **call.kwargs,
        )
        return out


class TopKPolicy:
    """Deployed hard top-k: keep the selector's top-k allowed keys per query, softmax the true scores over them.

    ``selection``: per query head (the method), per KV group, or key blocks (``ops.block_sparse``). Plain CUDA
    prefill takes the Triton kernels where they serve (per head: ``ops.head_topk`` at k <= its MAX_K, else
    ``ops.token_select``; per group: ``ops.token_select``), and so do CUDA decode steps (one query per sequence,
    ``ops.decode``) per head or per group; everything else the chunked reference, never more than one
    (B, H, C, S) chunk of scores at a time.
    """

    def __init__(self, selector, k: int, observer: Observer | None = None, query_chunk: int | None = None,
                 selection: str = "head", block: int = DEFAULT_BLOCK):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if selection == "block" and block not in bsp.BLOCK_SIZES:
            raise ValueError(f"block size must be one of {bsp.BLOCK_SIZES}, got {block}")
        self.selector, self.k, self.observer, self.query_chunk = selector, k, observer, query_chunk
        self.selection, self.block = selection, block

    @property
    def needs_inputs(self) -> bool:
        return isinstance(self.selector, GateSelector)

    def __call__(self, call: LayerCall) -> torch.Tensor:
        if self.selection == "block":
            return self._blocks(call)
        if self._decode_kernels(call):
            return self._decode(call)
        call = self._static_prefill(call)
        if self.selection == "head" and self._head_kernels(call):
            return self._heads(call)
        if self._token_kernels(call):
            return self._tokens(call)
        pads = self._left_pads(call)
        if pads is not None:
            return self._padded(call, pads)
        prepared = self.selector.prepare(call)
        n_rep = call.query.shape[1] // call.key.shape[1] if self.selection == "group" else 1

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            keep = topk_keep(group_scores(self.selector.select(prepared, a, e, s), allowed, n_rep), allowed, self.k)
            if self.observer is not None:
                self.observer(call.layer, s, allowed, keep)
            return masked_softmax(s, keep)

        return chunked_attention(call, probs, self.query_chunk)

    def _static_prefill(self, call: LayerCall) -> LayerCall:
        """A prompt's prefill into a static cache (``generate(..., cache_implementation="static")``) comes with a
        mask over the cache's whole preallocated length; where it is plain causal over the prompt's keys
        (``causal_prefix``) and the prefill kernels serve that, the call over those keys alone, else ``call``
        (the chunked reference then serves it, as any masked call)."""
        if call.attention_mask is None or call.query.shape[2] < 2 or self.selection not in ("head", "group") \
                or not self._plain_prefill(replace(call, attention_mask=None)):
            return call
        prefix = causal_prefix(call)
        if prefix is None or not ((self.selection == "head" and self._head_kernels(prefix))
                                  or self._token_kernels(prefix)):
            return call
        return prefix

    def _inference_call(self, call: LayerCall) -> bool:
        """Nothing needs gradients or per-chunk scores (an observer), values of the head dim: what the Triton
        kernels serve (on CUDA)."""
        q = call.query
        return (self.observer is None and not call.dropout
                and not (torch.is_grad_enabled() and (q.requires_grad or call.key.requires_grad
                                                      or call.value.requires_grad))
                and call.value.shape[-1] == q.shape[-1])

    def _plain_prefill(self, call: LayerCall) -> bool:
        """A CUDA ``_inference_call`` with plain causal masking: what the prefill kernels serve. Everything else
        takes the chunked reference."""
        return call.query.is_cuda and self._inference_call(call) and call.attention_mask is None

    def fast_path(self, call: LayerCall) -> bool:
        """Whether block selection's attention runs as the Triton kernel (``_plain_prefill``, kernel shapes)."""
        return self._plain_prefill(call) and bsp.kernels_ok(call.query, call.key, self.block)

    def _selection_dim(self, call: LayerCall) -> int | None:
        """The dimension a decode step selects by: head_dim for the oracle and the "qk" gate (their scores are
        dot products with the model's cached keys), the gate dim for a "hidden" gate; None for other selectors."""
        sel = self.selector
        if type(sel) is OracleSelector:
            return call.query.shape[-1]
        if type(sel) is GateSelector:
            return sel.bank.spec.d_g if sel.bank.spec.gate_input == "hidden" else call.query.shape[-1]
        return None

    def _decode_kernels(self, call: LayerCall) -> bool:
        """A CUDA decode step (one query per sequence) per head or per group by the oracle or a gate (hidden or
        qk input: the learned or the random one), with nothing needing gradients or per-chunk scores, in
        shapes ``ops.decode`` takes: the fused decode path. Padding and sliding-window masks are allowed."""
        dim = self._selection_dim(call)
        return (call.query.shape[2] == 1 and dim is not None and self.selection in ("head", "group")
                and self._inference_call(call) and dc.kernels_ok(call.query, call.value, dim))

    def _decode(self, call: LayerCall) -> torch.Tensor:
        """One decode step through ``ops.decode.gated_decode``: the selection query and keys of the selector (the
        gate's cached keys for the hidden input; the model's keys for the oracle and, with the query folded
        through the gate, for the qk input), the top k per head or per KV group, attention over them."""
        q, key = call.query, call.key
        sel_scale, sel_cap = 1.0, None
        if type(self.selector) is OracleSelector:
            sq, sk, sel_scale, sel_cap = q[:, :, 0], key, call.scaling, call.softcap
        elif self.selector.bank.spec.gate_input == "hidden":
            sq, sk = self.selector.decode_inputs(call)  # (B, H, d), (B, H, S, d): the gate key cache
        else:
            sq, sk = self.selector.bank.layers[call.layer].folded_query(q)[:, :, 0], key
        valid = None if call.attention_mask is None else call.allowed()[:, 0, 0]  # (B, S)
        sq, sk, qd, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (sq, sk, q[:, :, 0], key, call.value))
        return dc.gated_decode(sq, sk, qd, k, v, valid, self.k, call.scaling, call.softcap, sel_scale, sel_cap,
                               group=self.selection == "group")

    def _prefill_dim(self, call: LayerCall) -> int | None:
        """The selection dimension of prefill's kernels: head_dim for the oracle (the true scores), the gate's d
        for a gate (what ``prepare`` gives); None for selectors they do not serve."""
        sel = self.selector
        if type(sel) is OracleSelector:
            return call.query.shape[-1]
        if type(sel) is GateSelector:
            return sel.bank.spec.d_g
        return None

    def _head_kernels(self, call: LayerCall) -> bool:
        """Per-head selection by the gate or the oracle through ``ops.head_topk``: plain prefill, k <= ht.MAX_K,
        kernel shapes."""
        dim = self._prefill_dim(call)
        if dim is None:
            return False
        return self._plain_prefill(call) and ht.kernels_ok(call.query, call.key, self.k, dim)

    def _token_kernels(self, call: LayerCall) -> bool:
        """Selection by the gate or the oracle through ``ops.token_select``: per KV group at any k, per head where
        ``_head_kernels`` does not serve (k > ht.MAX_K); plain prefill, kernel shapes."""
        dim = self._prefill_dim(call)
        if dim is None or self.selection not in ("head", "group"):
            return False
        return self._plain_prefill(call) and ts.kernels_ok(call.query, call.key, self.k, dim)

    def _selection_inputs(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The selection query (B, H, T, d), key (B, H or Hkv, T, d) and scale: the model's own with its scaling
        for the oracle (the true scores), the gate's (``prepare``) with 1 for a gate."""
        if type(self.selector) is OracleSelector:
            a, b, scale = call.query, call.key, call.scaling
        else:
            (a, b), scale = self.selector.prepare(call), 1.0
        a, b = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, b))
        return a, b, scale

    def _left_pads(self, call: LayerCall) -> list[int] | None:
        """A left-padded batch's prefill (``causal_pads``: every row causal after its sequence's padding) where
        the prefill kernels serve each sequence's unpadded part: each sequence's padding; None otherwise (the
        chunked reference then serves it)."""
        t = call.query.shape[2]
        if call.attention_mask is None or t < 2 or call.key.shape[2] < t:
            return None
        plain = replace(call, key=call.key[:, :, :t], value=call.value[:, :, :t], attention_mask=None)
        return None if self._kernel_attention(plain) is None else causal_pads(call)

    def _kernel_attention(self, call: LayerCall):
        """The prefill kernels' attention that serves ``call`` (``_head_attention`` where ``_head_kernels`` does,
        else ``_token_attention`` where ``_token_kernels`` does), or None."""
        if self.selection == "head" and self._head_kernels(call):
            return self._head_attention
        return self._token_attention if self._token_kernels(call) else None

    def _padded(self, call: LayerCall, pads: list[int]) -> torch.Tensor:
        """A left-padded batch's prefill, one sequence at a time over its unpadded queries and keys through the
        prefill kernels, as ``_heads`` or ``_tokens`` serve a plain one (the selection inputs made once for the
        batch, so a gate key cache records every row); the rows of padding see no key: zeros, as the reference
        gives them. A static cache's prefill is served on the prompt's T keys, as ``causal_prefix`` does; a mask
        with no padding (plain causal, spelt out) on the whole batch at once."""
        t, s = call.query.shape[2], call.key.shape[2]
        if s > t:
            call = replace(call, key=call.key[:, :, :t], value=call.value[:, :, :t], cached_keys=s)
        a, b, scale = self._selection_inputs(call)
        q, key, value = call.query, call.key, call.value
        attention = self._kernel_attention(replace(call, attention_mask=None))
        if not any(pads):  # a plain causal mask spelt out: the batch at once
            return attention(replace(call, attention_mask=None), (a, b, scale))
        out = q.new_zeros(q.shape[0], t, q.shape[1], value.shape[-1], dtype=value.dtype)  # (B, T, H, D)
        for i, p in enumerate(pads):
            if p < t:
                one = replace(call, query=q[i:i + 1, :, p:], key=key[i:i + 1, :, p:], value=value[i:i + 1, :, p:],
                              attention_mask=None)
                out[i:i + 1, p:] = attention(one, (a[i:i + 1, :, p:], b[i:i + 1, :, p:], scale))
        return out

    def _heads(self, call: LayerCall) -> torch.Tensor:
        return self._head_attention(call, self._selection_inputs(call))

    def _head_attention(self, call: LayerCall, inputs: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        """Per-head top-k through ``ops.head_topk``: the k causal keys of largest selection score per row and
        head (exactly min(k, causal keys), as ``topk_keep``), then attention over those keys. (The softcap keeps
        the order of the oracle's scores.)"""
        a, b, scale = inputs
        idx = ht.head_topk(a, b, self.k, scale)
        return ht.index_attention(call.query, call.key, call.value, idx, call.scaling, call.softcap)

    def _tokens(self, call: LayerCall) -> torch.Tensor:
        return self._token_attention(call, self._selection_inputs(call))

    def _token_attention(self, call: LayerCall, inputs: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        """Top-k per head or per KV group through ``ops.token_select``: the k causal keys of largest selection
        score per row (per group: of the group's summed softmax of the selection scores, softcapped for the
        oracle, the order of ``group_scores``' mean), then attention over them, a group's heads sharing theirs:
        over key tiles on the tensor cores (``ops.mask_attention``, the kept sets as a bitmask) where top-k keeps a
        large enough share of the causal pairs (``ma.dense_enough``), else by gathering each row's kept keys."""
        a, b, scale = inputs
        group = call.query.shape[1] // call.key.shape[1] if self.selection == "group" else 1
        softcap = call.softcap if type(self.selector) is OracleSelector else None
        k = min(self.k, call.key.shape[2])  # no row has more keys: no slots that could only hold -1
        n_sets = call.query.shape[1] // group
        if ma.dense_enough(call.key.shape[2], k, per_head=group == 1) and ma.supports(call.query, call.key, n_sets):
            bits = ts.token_select(a, b, k, scale, group, softcap, bits=True)
            return ma.mask_attention(call.query, call.key, call.value, bits, call.scaling, call.softcap)
        idx = ts.token_select(a, b, k, scale, group, softcap)
        return ts.gather_attention(call.query, call.key, call.value, idx, call.scaling, call.softcap)

    def _blocks(self, call: LayerCall) -> torch.Tensor:
        q, key = call.query, call.key
        s_len, t = key.shape[2], q.shape[2]
        groups = key.shape[1]
        mass = bsp.group_sum(self.selector.block_mass(call, self.block), groups)
        idx = bsp.select(mass, bsp.n_blocks(self.k, self.block), s_len - t, self.block)  # (B, G, NQ, n)
        if self.fast_path(call):
            return bsp.block_attention_fused(q, key, call.value, idx, self.block, call.scaling, call.softcap)

        def probs(a: int, e: int, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            keep = bsp.block_keep(idx, self.block, s_len, s_len - t, q.shape[1] // groups, a, e) & allowed
            if self.observer is not None:
                self.observer(call.layer, s, allowed, keep)
            return masked_softmax(s, keep)

        return chunked_attention(call, probs, self.query_chunk)


def policy_for(mode: str, k: int | None = None, bank: GateBank | None = None, *, selection: str = "head",
               block_size: int = DEFAULT_BLOCK, block_score: str = "bound", observer: Observer | None = None):
    """The policy of one mode (``MODES``): ``DensePolicy`` for "dense", else deployed top-k of ``k`` keys selected
    by the true scores ("oracle") or by ``bank``'s scores ("gate" and "random": the learned gate or the random
    control, which the caller builds, e.g. with ``gates.modules.random_control``)."""
    if mode == "dense":
        return DensePolicy(observer)
    if mode == "oracle":
        selector = OracleSelector()
    elif mode in ("gate", "random"):
        if bank is None:
            raise ValueError(f"mode {mode!r} needs a gate bank")
        selector = GateSelector(bank, block_score=block_score)
    else:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    return TopKPolicy(selector, k, observer, selection=selection, block=block_size)
