"""The small causal LM ``sparsify pretrain`` trains, built from a transformers config: ``gpt2`` (learned absolute
positions, pre-norm LayerNorm, GELU MLP) or ``llama`` (rotary, RMSNorm, SwiGLU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .pretrain import PretrainConfig


def model_config(cfg: PretrainConfig, vocab_size: int, bos_token_id: int | None = None,
                 eos_token_id: int | None = None):
    """The transformers config of the model ``cfg`` describes, for a vocabulary of ``vocab_size``."""
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_inner=cfg.d_ff, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                          attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, **ids)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                       max_position_embeddings=cfg.seq_len, attention_dropout=cfg.dropout,
                       tie_word_embeddings=cfg.tie_embeddings, **ids)


def build_model(cfg: PretrainConfig, vocab_size: int, bos_token_id: int | None = None,
                eos_token_id: int | None = None):
    """A freshly initialised causal LM (seeded by ``cfg.seed``), fp32, SDPA attention through the interface."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(model_config(cfg, vocab_size, bos_token_id, eos_token_id),
                                            attn_implementation="sdpa")


def count_parameters(model) -> int:
    """Parameters, each counted once (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def describe_model(cfg: PretrainConfig, vocab_size: int, parameters: int) -> str:
    """One line: ``gpt2: 6 layers, d_model 256, 4 heads, d_ff 1024, context 512, vocab 50257, untied
    embeddings, 30,601,728 parameters (30.6M)``."""
    tie = "tied" if cfg.tie_embeddings else "untied"
    return (f"{cfg.arch}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, d_ff {cfg.d_ff}, "
            f"context {cfg.seq_len}, vocab {vocab_size}, {tie} embeddings, {parameters:,} parameters "
            f"({parameters / 1e6:.1f}M)")
