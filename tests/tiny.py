"""Tiny random models of each supported architecture, built from configs with fixed seeds (no network)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              max_position_embeddings=256)


def tiny_config(arch: str, layers: int = 2):
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=layers, head_dim=16, **COMMON)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=layers, **COMMON)
    if arch == "qwen2":
        return Qwen2Config(num_hidden_layers=layers, **COMMON)
    if arch == "mistral":
        return MistralConfig(num_hidden_layers=layers, sliding_window=12, **COMMON)
    if arch == "gemma3":
        return Gemma3TextConfig(num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                **{**COMMON, "num_key_value_heads": 1})
    raise ValueError(arch)


ARCHS = ["qwen3", "llama", "qwen2", "mistral", "gemma3"]


def tiny_model(arch: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return model


def random_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=gen)  # no special ids: Gemma embeds pad (0) as zeros, and zero scores tie


WORDS = ("the a of to and in is was for on that with as by it at from his her they this which "
         "city river king war music art science north south old new first last great small long "
         "house school church army ship song film book game team year day time people world").split()


def tiny_tokenizer():
    """A word-level tokenizer over WORDS (+ specials), built offline; ids stay below VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2} | {w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def save_tiny_checkpoint(path, arch: str = "llama", seed: int = 0, layers: int = 2, sharpen: float = 1.0):
    """Save a tiny model + tokenizer. ``sharpen`` scales q_proj and k_proj so attention is peaked, as in
    trained models (random init gives nearly uniform attention, where top-k is mostly ties)."""
    model = tiny_model(arch, seed=seed, layers=layers)
    with torch.no_grad():
        for mod in model.modules():
            for name in ("q_proj", "k_proj"):
                if hasattr(mod, name):
                    getattr(mod, name).weight.mul_(sharpen)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_corpus(path, n_docs: int = 200, seed: int = 0, words_per_doc: int = 60):
    """Paragraphs separated by blank lines; each repeats a random 6-word phrase with 10% noise, so a model
    predicts well only by attending back to the previous repeat (attention matters, as in real text)."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        phrase = [rng.choice(WORDS) for _ in range(6)]
        words = [rng.choice(WORDS) if rng.random() < 0.1 else phrase[i % 6] for i in range(words_per_doc)]
        docs.append(" ".join(words))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def train_tiny_lm(path, corpus, arch: str = "llama", steps: int = 150, seq_len: int = 32, seed: int = 0):
    """A tiny model briefly trained on ``corpus`` so that it relies on attention; saved with its tokenizer."""
    from posthoc_sparse.data import build_windows

    tok = tiny_tokenizer()
    windows, _ = build_windows(tok, str(corpus), "train", seq_len)
    model = tiny_model(arch, seed=seed)
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = windows[torch.randint(0, len(windows), (8,), generator=gen)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().requires_grad_(False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
