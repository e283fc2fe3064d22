"""Gated top-k decoding (ops.decode): the kernels against their naive twins, on the CPU through TRITON_INTERPRET=1
(fp32 and fp16: the interpreter's bf16 products are wrong), and on the GPU in bf16 and fp16 at long lengths."""

from __future__ import annotations

import pytest
import torch

from posthoc_sparse.ops import HAVE_TRITON
from posthoc_sparse.ops import decode as dc

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _data(b=2, h=4, g=2, hs=None, s=150, d=16, ds=16, seed=0, dtype=torch.float32, device="cpu"):
    """Selection query and keys (Hs heads), q, k, v, and a left-padding mask: sequence i has its first 23 * i keys
    invalid."""
    gen = torch.Generator().manual_seed(seed)
    hs = hs or h

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    valid = torch.arange(s)[None, :] >= 23 * torch.arange(b)[:, None]  # (B, S)
    return rnd(b, h, ds), rnd(b, hs, s, ds), rnd(b, h, d), rnd(b, g, s, d), rnd(b, g, s, d), valid.to(device)


def _mass(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The summed score of each row's kept keys (idx -1: none): sets compared by what they carry (ties)."""
    return scores.gather(-1, idx.long().clamp(min=0)).masked_fill(idx < 0, 0).sum(-1)


@pytest.mark.parametrize("hs, cap", [(4, None), (2, None), (2, 3.0)])
def test_score_kernel_equals_the_reference(hs, cap):
    """Selection keys per query head (a hidden gate's) or per KV head (the oracle's, GQA), softcap, padding."""
    sq, sk, *_, valid = _data(hs=hs, s=131)
    sc, pm, pl = dc.decode_scores(sq, sk, valid, 0.5, cap, stats=True)
    want = dc.decode_scores_reference(sq, sk, valid, 0.5, cap)
    assert torch.equal(torch.isinf(sc), ~valid[:, None, :].expand_as(sc))
    torch.testing.assert_close(sc, want, atol=1e-5, rtol=1e-5)
    lse = (pm + pl.log()).logsumexp(-1)  # the split statistics give each head's log-sum-exp
    torch.testing.assert_close(lse, want.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s, k", [(150, 13), (77, 64), (40, 40), (40, 200)])
@pytest.mark.parametrize("group", [False, True])
def test_select_kernel_keeps_the_reference_sets(s, k, group):
    """S not a multiple of the tile, k not a power of two, k at and above the valid keys (all of them kept,
    the rest -1), padding, per head and per KV group (the group's mean softmax, as attention.reference)."""
    sq, sk, *_, valid = _data(s=s, seed=s)
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    got = dc.decode_topk(sc, k, 2 if group else None, pm, pl)
    ref_scores = dc.decode_scores_reference(sq, sk, valid, groups=2 if group else None)
    want = dc.decode_topk_reference(ref_scores, k)
    assert got.shape == want.shape == (2, 2 if group else 4, k) and got.dtype == torch.int32
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    n_valid = valid.sum(-1)[:, None]
    assert ((got >= 0).sum(-1) == n_valid.clamp(max=k)).all()


def test_select_kernel_keeps_the_lowest_indices_of_equal_scores():
    """Scores on a coarse grid: many keys tie at the k-th score. The kernel keeps those of lower index; the kept
    score mass equals torch.topk's."""
    gen = torch.Generator().manual_seed(3)
    sc = torch.randint(-3, 4, (2, 3, 200), generator=gen).float()
    sc[1, :, :50] = float("-inf")  # padding
    got = dc.decode_topk(sc, 37)
    want = dc.decode_topk_reference(sc, 37)
    assert torch.equal(_mass(sc, got), _mass(sc, want))
    kth = sc.topk(37, -1).values[..., -1]  # (B, H): the k-th score
    for s, kept, t in zip(sc.flatten(0, 1), got.flatten(0, 1).long(), kth.flatten()):
        tied = (s == t).nonzero().flatten()  # every key at the k-th score, by index
        kept_tied = kept[s[kept] == t]
        assert torch.equal(kept_tied, tied[: len(kept_tied)])  # the lowest indices of them
    assert (got[0].sort(-1).values == got[0]).all()  # written in key order


@pytest.mark.parametrize("group, cap", [(False, None), (True, None), (False, 5.0)])
def test_attention_kernel_equals_the_reference_over_the_same_keys(group, cap):
    """GQA (2 query heads per KV head), sets per head or per KV group, -1 slots, softcap; several splits."""
    _, _, q, k, v, valid = _data(s=90, seed=4)
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 2 if group else 4, 90, generator=gen).masked_fill(~valid[:, None], float("-inf"))
    idx = dc.decode_topk_reference(scores, 80)  # row 1 has 67 valid keys: 13 slots of -1
    got = dc.decode_attention(q, k, v, idx, 0.3, cap)
    assert got.shape == (2, 1, 4, 16) and got.dtype == q.dtype
    torch.testing.assert_close(got, dc.decode_attention_reference(q, k, v, idx, 0.3, cap), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_oracle_decoding_with_every_key_equals_dense_attention(dtype, tol):
    """k >= the valid keys: every key is kept, so the output is dense attention over the valid keys."""
    sq, sk, q, k, v, valid = _data(s=101, dtype=dtype, seed=7)
    got = dc.gated_decode(q, k, q, k, v, valid, 101, 0.25, sel_scale=0.25, group=True)
    qf, kf, vf = (t.float() for t in (q, k, v))
    mask = valid[:, None, None, :]  # (B, 1, 1, S)
    dense = torch.nn.functional.scaled_dot_product_attention(qf[:, :, None], kf, vf, attn_mask=mask, scale=0.25,
                                                             enable_gqa=True)  # (B, H, 1, D)
    torch.testing.assert_close(got.float(), dense.transpose(1, 2), atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["gate", "oracle", "random"])
@pytest.mark.parametrize("group", [False, True])
def test_gated_decode_equals_the_reference(mode, group):
    """The three selection sources as the policy passes them: a gate's own keys per query head (d 32), the
    model's keys by the true scores (the oracle: GQA selection keys, the model's scaling and softcap), and a
    random gate's keys. k = 21 of 150 keys, padding."""
    sq, sk, q, k, v, valid = _data(s=150, ds=32, seed=11)
    if mode == "oracle":
        sq, sk, kw = q, k, dict(sel_scale=0.25, sel_softcap=4.0, softcap=4.0)
    elif mode == "random":
        gen = torch.Generator().manual_seed(12)
        sk, kw = torch.randn(sk.shape, generator=gen), {}
    else:
        kw = {}
    got = dc.gated_decode(sq, sk, q, k, v, valid, 21, 0.25, group=group, **kw)
    want = dc.gated_decode_reference(sq, sk, q, k, v, valid, 21, 0.25, group=group, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_torch_topk_selection_is_the_same_set():
    """TUNING["select"] = "torch" (torch.topk on the scores, for the benchmark's comparison) keeps the same sets."""
    sq, sk, *_, valid = _data(s=120)
    sc, _, _ = dc.decode_scores(sq, sk, valid)
    radix = dc.decode_topk(sc, 30)
    dc.TUNING["select"] = "torch"
    try:
        by_torch = dc.decode_topk(sc, 30)
    finally:
        dc.TUNING["select"] = "radix"
    assert torch.equal(radix.sort(-1).values, by_torch.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s, k, group", [(4099, 256, False), (33001, 2048, False), (33001, 2048, True),
                                         (2000, 4096, True)])
def test_gated_decode_on_the_gpu(dtype, s, k, group):
    """Qwen3-1.7B's head shapes (16 query heads, 8 KV heads, head dim 128, gate dim 32), batch 3 with padding,
    long contexts: the kept sets carry the reference's score mass, and the output equals the reference's over
    the kernel's own sets (and over the reference's where k covers every key)."""
    sq, sk, q, k_, v, valid = _data(b=3, h=16, g=8, s=s, d=128, ds=32, seed=s, dtype=dtype, device="cuda")
    sc, pm, pl = dc.decode_scores(sq, sk, valid, stats=group)
    groups = 8 if group else None
    ref_scores = dc.decode_scores_reference(sq, sk, valid, groups=groups)
    got = dc.decode_topk(sc, k, groups, pm, pl)
    want = dc.decode_topk_reference(ref_scores, k)
    torch.testing.assert_close(_mass(ref_scores, got), _mass(ref_scores, want), atol=1e-3, rtol=1e-5)
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))
    out = dc.decode_attention(q, k_, v, got, 0.088)
    torch.testing.assert_close(out.float(), dc.decode_attention_reference(q, k_, v, got, 0.088), atol=2e-2, rtol=2e-2)
    if k >= s:
        full = dc.gated_decode(sq, sk, q, k_, v, valid, k, 0.088, group=group)
        torch.testing.assert_close(full.float(), dc.gated_decode_reference(sq, sk, q, k_, v, valid, k, 0.088),
                                   atol=2e-2, rtol=2e-2)
