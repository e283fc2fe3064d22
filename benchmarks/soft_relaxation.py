"""Which soft relaxation really sparsifies: tiny CPU runs of `sparsify pretrain --gate-mode soft-learned|soft-random`
under each candidate relaxation, logging the attention mass outside the gate's top-k at every step.

    python benchmarks/soft_relaxation.py --out docs/data/soft-relaxation-cpu.json [--steps 100]

Model: a 2-layer GPT-2 (d_model 64, 2 heads, d_ff 256) on windows of 128 tokens of the embedded Wikipedia leads
(a byte-level BPE of 2,048 tokens trained here on the training documents, so the output layer does not dominate a
CPU step), batch 8, k = 16 (12.5% of the keys, as 64 of 512), gate d_g 16, seed 0, the same data order for
every run. Candidates: the raw scores at tau 1 (the relaxation before issue 20),
standardized per row at a constant tau 0.25, standardized annealed 0.5 -> 0.05. For each run: the mass outside
(first, last, mean of the last 10% of logged steps, and the curve), held-out perplexity as trained, the gate's
gradient, and how the learned gate's raw score scale moved (the ratio of its score std on held-out rows, end / init:
a gate that switches itself off shrinks it toward 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = {  # name -> (gate_scores, gate_tau, gate_tau_end)
    "raw-tau1": ("raw", 1.0, 0.0),
    "std-tau0.25": ("standardized", 0.25, 0.0),
    "std-anneal-0.5-0.05": ("standardized", 0.5, 0.05),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _ScoreStd:
    """A dense policy that also records the std of a gate's raw scores over the causal pairs of each layer."""

    needs_inputs = True

    def __init__(self, bank):
        from posthoc_sparse.attention.selectors import GateSelector

        self.selector, self.stds = GateSelector(bank), []

    def __call__(self, call):
        import torch

        from posthoc_sparse.attention.call import chunked_attention

        prepared = self.selector.prepare(call)

        def probs(a, e, s, allowed):
            g = self.selector.select(prepared, a, e, s)  # (B, H, C, S)
            self.stds.append(float(g[allowed.expand_as(g)].std()))
            return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)

        return chunked_attention(call, probs, None)


def score_std(run: Path, seed: int, windows) -> tuple[float, float]:
    """Mean std of the gate's raw scores over causal pairs, for the saved gate and for its seeded init."""
    import torch
    from transformers import AutoModelForCausalLM

    from posthoc_sparse.attention.interface import SparseAttention
    from posthoc_sparse.gates.io import load_gates
    from posthoc_sparse.gates.modules import GateBank

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    trained, _ = load_gates(run / "gate")
    out = []
    for bank in (trained, GateBank(trained.spec).reset_random(seed)):
        policy = _ScoreStd(bank)
        with torch.no_grad(), SparseAttention(model, policy):
            model(input_ids=windows)
        out.append(sum(policy.stds) / len(policy.stds))
    return out[0], out[1]


def bpe_tokenizer(folder: Path, vocab: int = 2048):
    """A byte-level BPE of ``vocab`` tokens trained on the training split of the embedded Wikipedia leads (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posthoc_sparse.data import load_documents

    if not (folder / "tokenizer.json").is_file():
        docs, _ = load_documents("embedded:wiki-leads", "train")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
                                ).save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/data/soft-relaxation-cpu.json")
    ap.add_argument("--work", default="/tmp/soft-relaxation")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    a = ap.parse_args()
    import torch

    from posthoc_sparse.data import build_windows
    from posthoc_sparse.experiments.pretrain import PretrainConfig, pretrain
    from posthoc_sparse.tokenizers import load_tokenizer
    from posthoc_sparse.training import versions

    torch.set_num_threads(2)
    tokenizer = bpe_tokenizer(Path(a.work) / "bpe-2048")
    base = dict(dataset="embedded:wiki-leads", tokenizer=tokenizer, arch="gpt2", n_layer=2, d_model=64,
                n_head=2, d_ff=256, seq_len=128, steps=a.steps, batch_size=8, lr=3e-3, min_lr=3e-4,
                warmup=a.steps // 10, eval_every=a.steps, eval_windows=8, checkpoint_every=10 * a.steps,
                log_every=5, max_train_windows=4000, gate_k=16, gate_d_g=16, seed=0, device="cpu", overwrite=True)
    held, _ = build_windows(load_tokenizer(tokenizer), "embedded:wiki-leads", "heldout", 128, max_windows=4)
    runs = {}
    for name in [c.strip() for c in a.candidates.split(",") if c.strip()]:
        scores, tau, tau_end = CANDIDATES[name]
        for mode in ("soft-learned", "soft-random"):
            out = Path(a.work) / f"{name}-{mode}"
            cfg = PretrainConfig(**base, output=str(out), gate_mode=mode, gate_scores=scores, gate_tau=tau,
                                 gate_tau_end=tau_end)
            t0 = time.perf_counter()
            res = pretrain(cfg)
            logged = json.loads((out / "pretrain_log.json").read_text())
            m = logged["mass_outside"]
            gg = logged["gate_grad"]
            std_end, std_init = score_std(out, 0, held)
            runs[f"{name}/{mode}"] = {
                "scores": scores, "tau": tau, "tau_end": tau_end, "mode": mode, "heldout_ppl": res.heldout_ppl,
                "mass_outside_first": m["first"], "mass_outside_last": m["last"],
                "mass_outside_last_10pct": m["last_10pct_mean"], "mass_outside_curve": m["curve"],
                "gate_grad_steps": gg["steps_with_gradient"], "gate_grad_mean": gg["sum_norm"] / max(1, gg["steps"]),
                "gate_score_std_end": std_end, "gate_score_std_init": std_init,
                "seconds": time.perf_counter() - t0,
            }
            log(f"{name} {mode}: mass outside {m['first']:.3f} -> {m['last']:.3f} (last 10% {m['last_10pct_mean']:.3f}), "
                f"ppl {res.heldout_ppl:.1f}, gate score std {std_init:.3f} -> {std_end:.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
    report = {"setup": {k: v for k, v in base.items() if k not in ("overwrite",)}, "candidates": CANDIDATES,
              "runs": runs, "device": "cpu", "versions": versions(),
              "definition": "mass outside: mean over layers, heads and query rows with more than k allowed keys of "
                            "the soft-gated attention probability on keys outside the gate's hard top-k, per "
                            "training step"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
