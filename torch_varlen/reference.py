"""Pure-PyTorch specification of every torch_varlen operator.

This file is the contract (DESIGN.md "Semantics"): every kernel, on every device, is tested
against these functions run in float64. They favour clarity over speed: attention builds the
full (Lq, Lk) score matrix of one sequence at a time. Gradients of the attention reference
come from autograd through ``attention``.
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------- padding


def _keep_rows(attention_mask: torch.Tensor, unused_mask: torch.Tensor | None) -> torch.Tensor:
    keep = attention_mask != 0
    if unused_mask is not None:
        keep = keep | (unused_mask != 0)
    return keep


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.to(torch.int64).cumsum(0), (1, 0)).to(torch.int32)


def unpad(hidden_states, attention_mask, unused_mask=None):
    """-> (hidden_unpad, indices, cu_seqlens, max_seqlen, seqused)."""
    keep = _keep_rows(attention_mask, unused_mask)
    indices = keep.flatten().nonzero().flatten()
    lengths = keep.sum(1)
    hidden_unpad = hidden_states.flatten(0, 1)[indices]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    seqused = (attention_mask != 0).sum(1).to(torch.int32)
    return hidden_unpad, indices, _cu(lengths), max_seqlen, seqused


def unpad_capacity(hidden_states, attention_mask, unused_mask, capacity):
    """Static-shape unpad -> (hidden_unpad, indices, cu_seqlens, seqused); see ops.unpad_input."""
    hidden_unpad, indices, cu_seqlens, _, seqused = unpad(hidden_states, attention_mask, unused_mask)
    nnz = indices.numel()
    if nnz > capacity:
        raise ValueError(f"capacity ({capacity}) is smaller than the number of kept tokens ({nnz})")
    batch, seqlen = attention_mask.shape
    out = hidden_states.new_zeros((capacity,) + hidden_states.shape[2:])
    out[:nnz] = hidden_unpad
    idx = torch.full((capacity,), batch * seqlen, dtype=torch.int64, device=indices.device)
    idx[:nnz] = indices
    return out, idx, cu_seqlens, seqused


def unpad_concat(hidden_states, attention_mask_in_length):
    """-> (hidden_unpad, indices, cu_seqlens, max_seqlen), one sequence per nonzero length."""
    lengths_2d = attention_mask_in_length.to(torch.int64)
    seqlen = lengths_2d.shape[1]
    row_len = lengths_2d.sum(1)
    keep = torch.arange(seqlen, device=lengths_2d.device)[None, :] < row_len[:, None]
    indices = keep.flatten().nonzero().flatten()
    flat = lengths_2d.flatten()
    lengths = flat[flat != 0]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return hidden_states.flatten(0, 1)[indices], indices, _cu(lengths), max_seqlen


def pad(hidden_unpad, indices, batch, seqlen):
    """Scatter rows into zeros (batch, seqlen, *rest); indices >= batch*seqlen are dropped."""
    out = hidden_unpad.new_zeros((batch * seqlen,) + hidden_unpad.shape[1:])
    valid = indices < batch * seqlen
    out[indices[valid]] = hidden_unpad[valid]
    return out.view((batch, seqlen) + hidden_unpad.shape[1:])


def gather_rows(padded, indices):
    """(batch, seqlen, *rest) -> (nnz, *rest); indices >= batch*seqlen give zero rows."""
    flat = padded.flatten(0, 1)
    valid = indices < flat.shape[0]
    out = flat.new_zeros((indices.numel(),) + flat.shape[1:])
    out[valid] = flat[indices[valid]]
    return out


# ---------------------------------------------------------------- dropout


def philox_word0(seed: int, c0, c1, c2, c3) -> torch.Tensor:
    """Philox4x32-10, first output word, on int64 tensors holding uint32 values."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0


def _mulhilo(a: int, b: torch.Tensor):
    # a * b for 32-bit a, b without int64 overflow: split a into 16-bit halves.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    lo_part = a_lo * b  # < 2^48
    hi_part = a_hi * b  # < 2^48
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    hi = ((hi_part >> 16) + ((lo_part + ((hi_part & 0xFFFF) << 16)) >> 32)) & _M32
    return hi, lo


def dropout_threshold(p: float) -> int:
    return min(int(math.floor(p * 4294967296.0)), _M32)


def philox_keep(seed: int, offset: int, head, row, col, p: float) -> torch.Tensor:
    """Boolean keep mask, broadcast over head/row/col int64 tensors (see _C/philox.h)."""
    head, row, col = torch.broadcast_tensors(
        torch.as_tensor(head, dtype=torch.int64),
        torch.as_tensor(row, dtype=torch.int64),
        torch.as_tensor(col, dtype=torch.int64),
    )
    word = philox_word0(seed, col & _M32, row & _M32, head & _M32, torch.full_like(col, offset & _M32))
    return word >= dropout_threshold(p)


# ---------------------------------------------------------------- attention


def attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    rng_state=None,
    cu_seqlens_q_padded=None,
    cu_seqlens_k_padded=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    sink=None,
    block_table=None,
    seqused_k=None,
):
    """Varlen attention, one sequence at a time -> (out, softmax_lse, probs).

    q (total_q, H, D), k (total_k, Hk, D), v (total_k, Hk, Dv). ``probs`` is a list with one
    (H, Lq, Lk) matrix per sequence: the attention weights after masking and dropout (dropped
    entries 0, kept ones scaled by 1/(1-p)), so that out = probs @ v. Rows that belong to no
    sequence get out 0 and lse -inf. Differentiable in q, k, v.

    FP8: q, k, v float8_e4m3fn are dequantized in float64, ``q * q_descale`` etc., and the
    rest runs in float64 (out, lse and probs float64, for comparison with the op's bfloat16
    out). Each descale is None (1), a (1,) per-tensor factor or a (batch, Hk) factor per
    sequence and kv head; a q_descale entry applies to the query heads of that kv head's group.

    sink (H,): a learnable logit per query head that joins every row's softmax as one more
    score with no value: ``lse = logsumexp(scores of the row, sink_h)``, ``p = exp(s - lse)``
    (probs exclude the sink; its weight is ``exp(sink_h - lse)``). A row that sees no key has
    out 0 and lse sink_h. Differentiable in sink.

    Paged KV / seqused_k: the attention over the keys ``gather_keys`` returns (see there).
    """
    if block_table is not None or seqused_k is not None:
        k, v, cu_seqlens_k = gather_keys(k, v, cu_seqlens_k, cu_seqlens_k_padded, block_table, seqused_k)
        cu_seqlens_k_padded = None
    fp8 = q.dtype == torch.float8_e4m3fn
    if not fp8 and any(d is not None for d in (q_descale, k_descale, v_descale)):
        raise ValueError(f"q/k/v_descale need float8_e4m3fn q, k, v, got {q.dtype}")
    if fp8:
        q, k, v = q.double(), k.double(), v.double()
    total_q, nheads, headdim = q.shape
    nheads_k = k.shape[1]
    group = nheads // nheads_k
    scale = softmax_scale if softmax_scale is not None else headdim ** -0.5
    left, right = window_size
    if causal:
        right = 0
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    start_q = cu_seqlens_q_padded.tolist() if cu_seqlens_q_padded is not None else cu_q
    start_k = cu_seqlens_k_padded.tolist() if cu_seqlens_k_padded is not None else cu_k
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs = q.new_zeros((total_q, nheads, v.shape[2]))
    lse = torch.full((nheads, total_q), -math.inf, dtype=lse_dtype, device=q.device)
    probs = []
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        sq, sk = start_q[b], start_k[b]
        qb = q[sq : sq + lq].transpose(0, 1)  # (H, lq, D)
        kb = k[sk : sk + lk].transpose(0, 1)  # (Hk, lk, D)
        vb = v[sk : sk + lk].transpose(0, 1)
        if fp8:
            qb = qb * _descale(q_descale, b, nheads_k, q.device).repeat_interleave(group)[:, None, None]
            kb = kb * _descale(k_descale, b, nheads_k, q.device)[:, None, None]
            vb = vb * _descale(v_descale, b, nheads_k, q.device)[:, None, None]
        kb, vb = kb.repeat_interleave(group, 0), vb.repeat_interleave(group, 0)
        s = torch.matmul(qb, kb.transpose(1, 2)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        diag = i + lk - lq  # the key column aligned with query i (bottom-right)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s - slopes.to(s.dtype)[:, None, None] * (diag - j).abs()
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if left >= 0:
            visible &= j >= diag - left
        if right >= 0:
            visible &= j <= diag + right
        s = s.masked_fill(~visible, -math.inf)
        if sink is not None:  # one more column, the sink logit, in every row's denominator
            sink_col = sink.to(s.dtype)[:, None, None].expand(nheads, lq, 1)
            logits = torch.cat([s, sink_col], -1)
            dead = (logits == -math.inf).all(-1, keepdim=True)  # no key and a -inf sink
            # masked before logsumexp, so its backward never forms exp(-inf - -inf) = nan
            row_lse = torch.logsumexp(logits.masked_fill(dead, 0), dim=-1).masked_fill(dead[..., 0], -math.inf)
        else:
            row_lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
        p = torch.exp(s - row_lse[..., None].masked_fill(row_lse[..., None] == -math.inf, 0))
        p = p.masked_fill(~visible, 0)
        if dropout_p > 0:
            seed, offset = (int(x) for x in rng_state.tolist())
            h = torch.arange(nheads, device=q.device)[:, None, None]
            keep = philox_keep(seed, offset, h, (cu_q[b] + i)[None], j[None], dropout_p)
            p = p * keep / (1 - dropout_p)
        outs[sq : sq + lq] = torch.matmul(p, vb).transpose(0, 1)
        lse[:, sq : sq + lq] = row_lse.to(lse_dtype)
        probs.append(p)
    return outs, lse, probs


def _descale(descale, b, nheads_k, device):
    """The float64 (Hk,) factors of sequence b: 1 for None, per tensor (1,), per (batch, Hk)."""
    if descale is None:
        return torch.ones(nheads_k, dtype=torch.float64, device=device)
    d = descale.to(device, torch.float64)
    return d.expand(nheads_k) if d.dim() == 1 else d[b]


def gather_keys(k, v, cu_seqlens_k, cu_seqlens_k_padded=None, block_table=None, seqused_k=None):
    """The keys each sequence reads, packed -> (k, v, cu_seqlens_k) (differentiable in k, v).

    Sequence b has ``Lk = seqused_k[b]`` keys when seqused_k is given, else
    ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``. Packed k (total_k, Hk, D): its keys are the rows
    from ``cu_seqlens_k_padded[b]`` (or ``cu_seqlens_k[b]``) on. Paged k (num_blocks,
    block_size, Hk, D) with block_table (B, max_blocks): key j is
    ``k[block_table[b, j // block_size], j % block_size]``.
    """
    cu = cu_seqlens_k.tolist()
    batch = len(cu) - 1
    lengths = seqused_k.tolist() if seqused_k is not None else [cu[b + 1] - cu[b] for b in range(batch)]
    starts = cu_seqlens_k_padded.tolist() if cu_seqlens_k_padded is not None else cu
    ks, vs = [], []
    for b in range(batch):
        j = torch.arange(lengths[b], device=k.device)
        if block_table is None:
            ks.append(k[starts[b] + j])
            vs.append(v[starts[b] + j])
        else:
            bs = k.shape[1]
            blocks = block_table[b].to(torch.int64)[j // bs]
            ks.append(k[blocks, j % bs])
            vs.append(v[blocks, j % bs])
    cu_out = _cu(torch.tensor(lengths, dtype=torch.int64)).to(cu_seqlens_k.device)
    return torch.cat(ks) if ks else k.new_zeros((0,) + k.shape[-2:]), \
        torch.cat(vs) if vs else v.new_zeros((0,) + v.shape[-2:]), cu_out
