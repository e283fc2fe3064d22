"""Gate modules: per layer and query head, a low-rank key selector.

Letters used in shape comments:
    B batch, T queries, S keys, H query heads, Hkv key/value heads, C gate input width
    (hidden size for the "hidden" input, head_dim for the "qk" input), D head_dim, d gate dim (d_g).

For one layer and query head h (docs/method.md):
    G[i, j] = phi(x_i Wq[h]) . phi(x_j Wk[h]) / sqrt(d)
where x is the attention block's input ("hidden") or the model's own post-rotary q and k ("qk"), and phi
applies rotary position embedding on the gate dims for rotary models with the "hidden" input. phi reuses
the model's own rotary cos/sin at d/2 of its frequencies (``freq_idx``), so positions, rope scaling and
padding are handled exactly as the model handles them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..ops.rope import rope_tables, rotate

GATE_INPUTS = ("hidden", "qk")


@dataclass(frozen=True)
class GateSpec:
    """Everything needed to rebuild a gate bank's shapes; saved in ``gate_config.json``."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    d_g: int = 32
    gate_input: str = "hidden"
    rotary: bool = True
    rotary_dim: int = 0  # dims of the model's cos/sin (head_dim * partial_rotary_factor); 0 if no rotary

    @property
    def in_features(self) -> int:
        return self.hidden_size if self.gate_input == "hidden" else self.head_dim

    @property
    def uses_rope(self) -> bool:
        return self.gate_input == "hidden" and self.rotary

    def to_dict(self) -> dict:
        return asdict(self)


def default_freq_idx(spec: GateSpec) -> torch.Tensor:
    """d/2 rotary frequency indices spread evenly over the model's rotary_dim/2 frequencies."""
    half = spec.rotary_dim // 2
    n = spec.d_g // 2
    if half <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, half - 1, n).round().long()  # (d/2,)


class LayerGate(nn.Module):
    """The gate of one layer: ``wq``, ``wk`` of shape (H, C, d) and the rotary frequencies it uses."""

    def __init__(self, spec: GateSpec):
        super().__init__()
        self.spec = spec
        h, c, d = spec.num_heads, spec.in_features, spec.d_g
        self.wq = nn.Parameter(torch.empty(h, c, d))
        self.wk = nn.Parameter(torch.empty(h, c, d))
        self.register_buffer("freq_idx", default_freq_idx(spec) if spec.uses_rope else torch.zeros(0, dtype=torch.long))

    def rope_tables(self, cos: torch.Tensor | None, sin: torch.Tensor | None, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gate's rotary cos and sin, (B, T, d/2) each in ``dtype``, from the model's (B, T, rotary_dim);
        None when the gate uses no rotary embedding."""
        return rope_tables(cos, sin, self.freq_idx, dtype)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        """t (B, T, X, d) rotated by the gate's frequencies of the model's tables (B, T, rotary_dim)."""
        return rotate(t, cos, sin, self.freq_idx)

    def hidden_projection(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The "hidden" input's gate queries and keys of every head before the rotary embedding: x (B, T, C) ->
        (B, T, 2H, d), queries in heads 0..H-1, keys in H..2H-1, scaled by d**-0.25. One (T, C) x (C, 2 H d)
        product (a per-head einsum would broadcast x to (H, T, C)), in ``dtype`` (default: autocast's, else the
        weights')."""
        b, t, _ = x.shape
        h, _, d = self.wq.shape
        if dtype is None:
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.wq.dtype
        return torch.matmul(x.to(dtype), self._hidden_weight_in(dtype)).view(b, t, 2 * h, d)

    def _hidden_weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        """``hidden_weight()`` in ``dtype``. For a frozen gate (deployed: ``load_gates`` and the random control
        freeze theirs) it is kept between calls while the parameters' storage and version counters are unchanged
        (``load_state_dict`` bumps them), so deployed gating skips re-laying it out on every call. A trainable
        gate lays it out every time: CUDA's fused AdamW updates weights without bumping their version. So does
        torch.compile (dynamo cannot trace the comparison of data pointers; a compiled step replays the layout)."""
        if self.wq.requires_grad or self.wk.requires_grad or torch.compiler.is_compiling():
            return hidden_weights([self], dtype)[0]
        key = (dtype, self.wq.device, self.wq.data_ptr(), self.wk.data_ptr(), self.wq._version, self.wk._version)
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():  # the storages are held, so that their addresses are not reused while cached
                cached = (key, hidden_weights([self], dtype)[0], self.wq.detach(), self.wk.detach())
            self.__dict__["_weight_cache"] = cached
        return cached[1]

    def hidden_weight(self) -> torch.Tensor:
        """``hidden_projection``'s weight: (C, 2 H d), wq's heads then wk's, scaled by d**-0.25."""
        return hidden_weights([self])[0]

    def project(
        self,
        x: torch.Tensor | None,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate queries and keys, both (B, H, T, d), already divided by d**0.25 each.

        ``x``: (B, T, hidden) for the "hidden" input; ``q``: (B, H, T, D) and ``k``: (B, Hkv, S, D) for "qk".
        """
        scale = self.spec.d_g**-0.25
        wq, wk = self.wq, self.wk
        if self.spec.gate_input == "hidden":
            h = wq.shape[0]
            y = self._rope(self.hidden_projection(x), cos, sin).transpose(1, 2)  # (B, 2H, T, d)
            return y[:, :h], y[:, h:]
        rep = self.spec.num_heads // self.spec.num_kv_heads
        k = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # (B, H, S, D)
        gq = torch.einsum("bhtc,hcd->bhtd", q.to(wq.dtype), wq)  # (B, H, T, d)
        gk = torch.einsum("bhsc,hcd->bhsd", k.to(wk.dtype), wk)  # (B, H, S, d)
        return gq * scale, gk * scale


    def folded_query(self, q: torch.Tensor) -> torch.Tensor:
        """For the "qk" input: q (B, H, T, D) -> q' (B, H, T, D), fp32, with q'[h] . k = gq[h] . gk[h] for every
        key k (gq, gk as ``project`` gives them): q' = (q Wq[h]) Wk[h]^T / sqrt(d). A decode step then scores the
        model's cached keys directly instead of projecting every one of them."""
        gq = torch.einsum("bhtc,hcd->bhtd", q.float(), self.wq.float())  # (B, H, T, d)
        return torch.einsum("bhtd,hcd->bhtc", gq, self.wk.float()) * self.spec.d_g**-0.5


class GateBank(nn.Module):
    """All layers' gates. Trainable parameters are exactly ``self.parameters()`` (chosen by object)."""

    def __init__(self, spec: GateSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(LayerGate(spec) for _ in range(spec.num_layers))

    def reset_random(self, seed: int) -> GateBank:
        """Seeded normal init, std 1/sqrt(C): the random control and the learned gate's "random" init."""
        gen = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(self.spec.in_features)
        with torch.no_grad():
            for layer in self.layers:
                for p in (layer.wq, layer.wk):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def init_from_model(self, attention_modules: list[nn.Module]) -> GateBank:
        """Start from the model's own partial dot product over the gate's rotary pairs.

        For the "qk" input, Wq = Wk = c * (selection of the dims of d/2 rotary pairs), so G starts as the
        scores restricted to those pairs. For the "hidden" input, the same rows of the model's q_proj and
        k_proj (times the QK-norm weight where the model has one), so G is the pre-norm partial score.
        ``c`` makes G's scale match ``q.k * scaling``. Raises ValueError if the module has no q_proj/k_proj.
        """
        spec = self.spec
        half_rot = max(spec.rotary_dim, 2) // 2
        with torch.no_grad():
            for layer, attn in zip(self.layers, attention_modules, strict=True):
                idx = layer.freq_idx if layer.freq_idx.numel() else default_freq_idx(
                    GateSpec(**{**spec.to_dict(), "rotary_dim": spec.head_dim})
                )
                sel = torch.cat((idx, idx + (half_rot if spec.rotary_dim else spec.head_dim // 2)))  # (d,)
                scaling = float(getattr(attn, "scaling", spec.head_dim**-0.5))
                c = math.sqrt(scaling * math.sqrt(spec.d_g))
                if spec.gate_input == "qk":
                    eye = torch.eye(spec.head_dim)[:, sel] * c  # (D, d)
                    layer.wq.copy_(eye.expand_as(layer.wq))
                    layer.wk.copy_(eye.expand_as(layer.wk))
                    continue
                if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
                    raise ValueError(f"{type(attn).__name__} has no q_proj/k_proj to initialise the gate from")
                wq = attn.q_proj.weight.detach().float().view(spec.num_heads, spec.head_dim, -1)  # (H, D, C)
                wk = attn.k_proj.weight.detach().float().view(spec.num_kv_heads, spec.head_dim, -1)  # (Hkv, D, C)
                wq, wk = wq * _norm_gain(attn, "q_norm", spec), wk * _norm_gain(attn, "k_norm", spec)
                wk = wk.repeat_interleave(spec.num_heads // spec.num_kv_heads, dim=0)  # (H, D, C)
                layer.wq.copy_(wq[:, sel, :].transpose(1, 2) * c)  # (H, C, d)
                layer.wk.copy_(wk[:, sel, :].transpose(1, 2) * c)
        return self


def random_control(spec: GateSpec, seed: int) -> GateBank:
    """The random control gate: the same architecture, seeded random init, frozen (never trained)."""
    return GateBank(spec).reset_random(seed).requires_grad_(False)


def _norm_gain(attn: nn.Module, name: str, spec: GateSpec) -> torch.Tensor:
    """Per-dim gain of a QK RMSNorm, shaped (1, D, 1); ones where the model has none."""
    norm = getattr(attn, name, None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(1, spec.head_dim, 1)
    w = weight.detach().float()
    # Gemma-style norms scale by (1 + weight) and start at zero; Llama-style start at one.
    if "gemma" in type(norm).__name__.lower():
        w = 1.0 + w
    return w.view(1, -1, 1)


def hidden_weights(gates: list[LayerGate], dtype: torch.dtype | None = None) -> torch.Tensor:
    """(L, C, 2 H d): ``LayerGate.hidden_weight`` of each of L gates of one shape, laid out in one go (a few
    launches for all layers: distillation's fused losses), in ``dtype`` (None: the weights')."""
    h, c, d = gates[0].wq.shape
    w = torch.stack([p for gate in gates for p in (gate.wq, gate.wk)]).view(len(gates), 2 * h, c, d)
    w = w * gates[0].spec.d_g**-0.25
    return (w if dtype is None else w.to(dtype)).permute(0, 2, 1, 3).reshape(len(gates), c, 2 * h * d)
