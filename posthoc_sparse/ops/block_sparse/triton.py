"""Block-sparse Triton kernels: gate block summaries, block mass, oracle block mass, block selection and
attention over the selected key blocks (forward only). Each equals its twin in ``naive.py`` (tests hold them
equal, on the CPU through TRITON_INTERPRET=1 and on the GPU). Letters as in ``naive.py``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the naive path serves
    triton = None


if triton is not None:
    NEG = tl.constexpr(-1.0e30)
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _block_mass(GQ, GKP, MASS, sgb, sgh, sgt, spb, sph, spn, smb, smh, smq,
                    H, T, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, DG: tl.constexpr):
        i = tl.program_id(0)  # query block
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = i * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < T
        offs_g = tl.arange(0, DG)
        gq = tl.load(GQ + b * sgb + h * sgh + rows[:, None] * sgt + offs_g[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full([BLOCK], NEG, tl.float32)
        l = tl.zeros([BLOCK], tl.float32)
        for start in range(0, i, BLOCK_B):  # candidate blocks are 0 .. i-1
            cols = start + tl.arange(0, BLOCK_B)
            ok = cols < i
            kp = tl.load(GKP + b * spb + h * sph + cols[:, None] * spn + offs_g[None, :], mask=ok[:, None], other=0.0)
            s = tl.where(ok[None, :], tl.dot(gq, tl.trans(kp)), NEG)
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
        inv = tl.where(row_ok & (l > 0), 1.0 / tl.maximum(l, 1e-30), 0.0)
        for start in range(0, i, BLOCK_B):
            cols = start + tl.arange(0, BLOCK_B)
            ok = cols < i
            kp = tl.load(GKP + b * spb + h * sph + cols[:, None] * spn + offs_g[None, :], mask=ok[:, None], other=0.0)
            s = tl.where(ok[None, :], tl.dot(gq, tl.trans(kp)), NEG)
            p = tl.exp(s - m[:, None]) * inv[:, None]
            tl.store(MASS + b * smb + h * smh + i * smq + cols, tl.sum(p, 0), mask=ok)

    @triton.jit
    def _gate_summaries(Y, C, S, FIDX, GQ2, GK, GKB, syb, syt, syh, scb, sct, scd, sgb, sgh, sgt, skb, skh, skt,
                        sbb, sbh, sbn, H, T, DH: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr):
        # One program: one block of positions of one head. From the raw projection Y (B, T, 2H, d): the
        # rotary gate query and key, the query's bound summary [q+, q-] (GQ2), the key (GK, for the decode
        # cache) and the block's per-channel key max and min (GKB), with d = 2 DH. The rotary tables are the
        # model's C, S (B|1, T, rotary_dim) at the gate's DH frequencies FIDX, rounded to Y's dtype.
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = i * BLOCK + tl.arange(0, BLOCK)
        ok = (rows < T)[:, None]
        half = tl.arange(0, DH)[None, :]
        yq = Y + b * syb + rows[:, None] * syt + h * syh + half
        yk = Y + b * syb + rows[:, None] * syt + (H + h) * syh + half
        q1 = tl.load(yq, mask=ok, other=0.0).to(tl.float32)
        q2 = tl.load(yq + DH, mask=ok, other=0.0).to(tl.float32)
        k1 = tl.load(yk, mask=ok, other=0.0).to(tl.float32)
        k2 = tl.load(yk + DH, mask=ok, other=0.0).to(tl.float32)
        if ROPE:  # x * [c, c] + [-x2, x1] * [s, s]
            cols = tl.load(FIDX + half) * scd
            yt = Y.dtype.element_ty
            c = tl.load(C + b * scb + rows[:, None] * sct + cols, mask=ok, other=0.0).to(yt).to(tl.float32)
            s = tl.load(S + b * scb + rows[:, None] * sct + cols, mask=ok, other=0.0).to(yt).to(tl.float32)
            q1, q2 = q1 * c - q2 * s, q2 * c + q1 * s
            k1, k2 = k1 * c - k2 * s, k2 * c + k1 * s
        gq = GQ2 + b * sgb + h * sgh + rows[:, None] * sgt + half
        ty = GQ2.dtype.element_ty
        tl.store(gq, tl.maximum(q1, 0.0).to(ty), mask=ok)
        tl.store(gq + DH, tl.maximum(q2, 0.0).to(ty), mask=ok)
        tl.store(gq + 2 * DH, tl.minimum(q1, 0.0).to(ty), mask=ok)
        tl.store(gq + 3 * DH, tl.minimum(q2, 0.0).to(ty), mask=ok)
        gk = GK + b * skb + h * skh + rows[:, None] * skt + half
        tl.store(gk, k1.to(ty), mask=ok)
        tl.store(gk + DH, k2.to(ty), mask=ok)
        k1 = k1.to(ty).to(tl.float32)  # the block summaries of the keys as stored
        k2 = k2.to(ty).to(tl.float32)
        out = GKB + b * sbb + h * sbh + i * sbn + tl.arange(0, DH)
        tl.store(out, tl.max(tl.where(ok, k1, -float("inf")), 0).to(ty))
        tl.store(out + DH, tl.max(tl.where(ok, k2, -float("inf")), 0).to(ty))
        tl.store(out + 2 * DH, tl.min(tl.where(ok, k1, float("inf")), 0).to(ty))
        tl.store(out + 3 * DH, tl.min(tl.where(ok, k2, float("inf")), 0).to(ty))

    @triton.jit
    def _log2_scores(q, k, scaling, softcap, SOFTCAP: tl.constexpr):
        # q . k * scaling, tanh soft-capped when SOFTCAP, in log2 units (for exp2)
        s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s = s * scaling / softcap
            s = softcap * (2.0 * tl.sigmoid(2.0 * s) - 1.0)
        else:
            s = s * scaling
        return s * LOG2E

    @triton.jit
    def _oracle_mass(Q, K, MASS, sqb, sqh, sqt, skb, skh, skt, smb, smh, smq,
                     H, T, n_rep, scaling, softcap,
                     D: tl.constexpr, BLOCK: tl.constexpr, SOFTCAP: tl.constexpr):
        # Two passes over the causal key blocks of one query block and head: the rows' log-sum-exp, then
        # the dense attention mass each earlier block carries, summed over the rows.
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        g = h // n_rep
        rows = i * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < T
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full([BLOCK], NEG, tl.float32)
        l = tl.zeros([BLOCK], tl.float32)
        for j in range(0, i + 1):
            kpos = j * BLOCK + offs_n
            k = tl.load(K + b * skb + g * skh + kpos[:, None] * skt + offs_d[None, :], mask=(kpos < T)[:, None],
                        other=0.0)
            s = _log2_scores(q, k, scaling, softcap, SOFTCAP)
            valid = (kpos[None, :] <= rows[:, None]) & (kpos < T)[None, :]
            s = tl.where(valid, s, NEG)
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.where(valid, tl.exp2(s - m_new[:, None]), 0.0), 1)
            m = m_new
        inv = tl.where(row_ok, 1.0 / tl.maximum(l, 1e-30), 0.0)
        for j in range(0, i):  # earlier blocks: every key is allowed for every row
            kpos = j * BLOCK + offs_n
            k = tl.load(K + b * skb + g * skh + kpos[:, None] * skt + offs_d[None, :])
            s = _log2_scores(q, k, scaling, softcap, SOFTCAP)
            p = tl.exp2(s - m[:, None]) * inv[:, None]
            tl.store(MASS + b * smb + h * smh + i * smq + j, tl.sum(tl.sum(p, 1), 0))

    @triton.jit
    def _attend_tile(q, K, V, kpos, mask, rows, m, l, acc, kbase, vbase, skt, svt, scaling, softcap,
                     D: tl.constexpr, SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
        offs_d = tl.arange(0, D)
        if MASKED:
            k = tl.load(kbase + kpos[:, None] * skt + offs_d[None, :], mask=mask[:, None], other=0.0)
        else:
            k = tl.load(kbase + kpos[:, None] * skt + offs_d[None, :])
        s = _log2_scores(q, k, scaling, softcap, SOFTCAP)
        if MASKED:
            valid = mask[None, :] & (kpos[None, :] <= rows[:, None])
            s = tl.where(valid, s, NEG)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        if MASKED:
            p = tl.where(valid, p, 0.0)
            v = tl.load(vbase + kpos[:, None] * svt + offs_d[None, :], mask=mask[:, None], other=0.0)
        else:
            v = tl.load(vbase + kpos[:, None] * svt + offs_d[None, :])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @triton.jit
    def _block_attn_fwd(Q, K, V, IDX, O,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sib, sig, siq, sob, soh, sot,
                        H, T, n_rep, n_sel, scaling, softcap,
                        D: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, SOFTCAP: tl.constexpr):
        # One program: one query block of HEADS query heads of one KV group, stacked as HEADS * BLOCK rows
        # that share every loaded key/value block (GQA). IDX rows are as select_blocks returns them for
        # queries from position 0: query block i's first min(n_sel - 1, i) entries are earlier blocks
        # (whole, unmasked tiles), its last entry is the diagonal block i (causal mask).
        i = tl.program_id(0)  # query block
        pid = tl.program_id(1)
        tiles = H // HEADS
        b = pid // tiles
        h0 = (pid % tiles) * HEADS
        g = h0 // n_rep
        r = tl.arange(0, HEADS * BLOCK)
        head = h0 + r // BLOCK
        rows = i * BLOCK + r % BLOCK
        row_ok = rows < T
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + rows[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        m = tl.full([HEADS * BLOCK], NEG, tl.float32)
        l = tl.zeros([HEADS * BLOCK], tl.float32)
        acc = tl.zeros([HEADS * BLOCK, D], tl.float32)
        kbase = K + b * skb + g * skh
        vbase = V + b * svb + g * svh
        sel = IDX + b * sib + g * sig + i * siq
        for j in range(0, tl.minimum(n_sel - 1, i)):
            kpos = tl.load(sel + j) * BLOCK + offs_n
            m, l, acc = _attend_tile(q, K, V, kpos, kpos < T, rows, m, l, acc, kbase, vbase, skt, svt, scaling,
                                     softcap, D, SOFTCAP, False)
        kpos = i * BLOCK + offs_n
        m, l, acc = _attend_tile(q, K, V, kpos, kpos < T, rows, m, l, acc, kbase, vbase, skt, svt, scaling, softcap,
                                 D, SOFTCAP, True)
        out = acc / tl.maximum(l, 1e-30)[:, None]
        tl.store(O + b * sob + head[:, None] * soh + rows[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


if triton is not None:

    @triton.jit
    def _select_top(MASS, IDX, smb, smg, smq, sib, sig, siq, G, NQ, NB, q_first, n_top,
                    NB_PAD: tl.constexpr):
        # One program per (batch, group, query block): n_top rounds of argmax over the candidate blocks
        # (j < the query block), then the diagonal block; -1 where no candidate is left.
        pid = tl.program_id(0)
        b = pid // (G * NQ)
        g = (pid // NQ) % G
        qi = pid % NQ
        qb = q_first + qi
        cols = tl.arange(0, NB_PAD)
        row = tl.load(MASS + b * smb + g * smg + qi * smq + cols, mask=cols < NB, other=0.0)
        row = tl.where(row == row, row, 0.0)  # NaN counts as no mass, as in select_blocks
        row = tl.where(cols < qb, row, -float("inf"))
        out = IDX + b * sib + g * sig + qi * siq
        for j in range(n_top):
            best = tl.max(row, 0)
            pos = tl.min(tl.where(row == best, cols, NB_PAD), 0)  # the lowest index among equal maxima
            tl.store(out + j, tl.where(best > -float("inf"), pos, -1))
            row = tl.where(cols == pos, -float("inf"), row)
        tl.store(out + n_top, qb)


def select_blocks_fused(mass: torch.Tensor, n: int, q_offset: int, block: int) -> torch.Tensor:
    """Triton twin of ``select_blocks``: the same sets when masses are distinct (equal masses resolve to the
    lower block index here, in an unspecified order in torch.topk)."""
    b, g, nq, nb = mass.shape
    kk = min(n - 1, nb)
    mass = mass.float().contiguous()
    idx = torch.empty(b, g, nq, kk + 1, dtype=torch.int32, device=mass.device)
    _select_top[(b * g * nq,)](mass, idx, *mass.stride()[:3], *idx.stride()[:3], g, nq, nb, q_offset // block, kk,
                               NB_PAD=triton.next_power_of_2(nb), num_warps=4)
    return idx


def block_mass_fused(gq: torch.Tensor, gkp: torch.Tensor, block: int) -> torch.Tensor:
    """Triton twin of ``block_mass_reference`` for q_offset 0 (queries and keys of one length)."""
    b, h, t, dg = gq.shape
    nq, nb = -(-t // block), gkp.shape[2]
    gkp = gkp.to(gq.dtype).contiguous()
    gq = gq.contiguous()
    mass = torch.zeros(b, h, nq, nb, dtype=torch.float32, device=gq.device)
    _block_mass[(nq, b * h)](gq, gkp, mass, *gq.stride()[:3], *gkp.stride()[:3], *mass.stride()[:3], h, t,
                             BLOCK=block, BLOCK_B=64, DG=dg, num_warps=4)
    return mass


def gate_summaries_fused(y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, block: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pool_bound`` of the rotary gate queries and keys, straight from the raw projection, in one pass.

    y (B, T, 2H, d): ``LayerGate.hidden_projection``; ``rope``: (cos (B|1, T, rotary_dim), sin, freq_idx (d/2,))
    or None. Returns (B, H, T, 2d) query summaries, (B, H, NB, 2d) block summaries and the rotary gate keys
    (B, H, T, d), in y's dtype. The kernel gathers the gate's frequencies itself, saving launches."""
    b, t, h2, d = y.shape
    assert y.stride(-1) == 1, "the projection's last dimension must be contiguous"
    h, nb = h2 // 2, -(-t // block)
    gq2 = torch.empty(b, h, t, 2 * d, dtype=y.dtype, device=y.device)
    gk = torch.empty(b, h, t, d, dtype=y.dtype, device=y.device)
    gkb = torch.empty(b, h, nb, 2 * d, dtype=y.dtype, device=y.device)
    if rope is not None:
        c, s, fidx = rope
        if c.shape[-2] != t or c.shape[0] not in (1, b) or s.shape != c.shape or c.stride() != s.stride():
            raise ValueError(f"rotary tables of shapes {tuple(c.shape)}, {tuple(s.shape)} do not fit {b} sequences "
                             f"of {t} positions")
        if fidx.numel() != d // 2:
            raise ValueError(f"{fidx.numel()} rotary frequencies for a gate of dimension {d}")
        fidx = fidx.to(y.device)  # int64 as the gate keeps it: a conversion would cost a launch per layer
    else:  # unused without rotary
        c = s = fidx = y
    c_batch = c.stride(0) if c.shape[0] > 1 else 0  # transformers passes one table for the whole batch
    _gate_summaries[(nb, b * h)](y, c, s, fidx, gq2, gk, gkb, y.stride(0), y.stride(1), y.stride(2), c_batch,
                                 c.stride(-2), c.stride(-1), *gq2.stride()[:3], *gk.stride()[:3], *gkb.stride()[:3],
                                 h, t, DH=d // 2, BLOCK=block, ROPE=rope is not None, num_warps=4)
    return gq2, gkb, gk


def oracle_block_mass_fused(q, k, block: int, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Triton twin of the oracle's block scores (``block_mass_from_probs`` of the dense causal softmax) for
    queries and keys of one length: (B, H, NQ, NB) fp32, no (T, S) tensor."""
    b, h, t, d = q.shape
    nq = -(-t // block)
    mass = torch.zeros(b, h, nq, nq, dtype=torch.float32, device=q.device)
    _oracle_mass[(nq, b * h)](q, k, mass, *q.stride()[:3], *k.stride()[:3], *mass.stride()[:3], h, t, h // k.shape[1],
                              float(scaling), float(softcap or 1.0), D=d, BLOCK=block, SOFTCAP=bool(softcap),
                              num_warps=4, num_stages=2)
    return mass


# Launch settings of the attention kernel: rows per program (query heads of a group times the block, capped),
# warps and pipeline stages; benchmarks/perf.py --parts attention times the alternatives on a GPU.
TUNING = {"max_rows": 128, "num_warps": 4, "num_stages": 2}


def heads_per_program(n_rep: int, block: int, max_rows: int | None = None) -> int:
    """Query heads of one KV group stacked in one program: the largest power of two dividing ``n_rep`` with
    at most ``max_rows`` rows (1 for non-power-of-two groups such as 3)."""
    cap = max(1, (max_rows or TUNING["max_rows"]) // block)
    heads = 1
    while heads * 2 <= cap and n_rep % (heads * 2) == 0:
        heads *= 2
    return heads


def block_attention_fused(q, k, v, idx, block: int, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Triton twin of ``block_attention_reference`` for queries and keys of one length; forward only.
    ``idx`` as ``select_blocks`` returns it for q_offset 0 (valid earlier blocks first, the diagonal last).
    Returns (B, T, H, D) in q's dtype, the layout transformers' attention functions return."""
    b, h, t, d = q.shape
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
    idx = idx.contiguous()
    n_rep = h // k.shape[1]
    heads = heads_per_program(n_rep, block)
    _block_attn_fwd[(-(-t // block), b * h // heads)](
        q, k, v, idx, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3],
        out.stride(0), out.stride(2), out.stride(1), h, t, n_rep, idx.shape[-1], float(scaling),
        float(softcap or 1.0), D=d, BLOCK=block, HEADS=heads, SOFTCAP=bool(softcap),
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    return out
