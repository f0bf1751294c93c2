"""varlen::attention_backward as one differentiable dense PyTorch function, for double backward.

``attention_backward_dense`` computes what the attention_backward kernels compute (dq, dk, dv
from grad_out, q, k, v, out, softmax_lse and grad_lse), with plain torch ops over the whole
packed batch, so that autograd through it gives the op's vector-Jacobian product w.r.t. all
seven tensor inputs. autograd.py registers that product as the backward of attention_backward:
second-order gradients of attention (double backward, gradgradcheck, opcheck with inputs that
require grad) come from it. Everything first-order still runs the kernels.

Score matrices are dense over the packed batch, (H, total_q, total_k), with a visibility mask
that keeps each query inside its own sequence: memory O(H * total_q * total_k), meant for the
small problems double backward is used on. Masks are derived on the device from cu_seqlens
(no ``.item()``, no data-dependent shape), so the function traces under fake tensors
(opcheck, torch.compile) and never syncs with the host; so does the dropout mask, which runs
reference.philox_word0 with the seed and offset as 0-d tensors read from rng_state.

Shapes: q (Nq, H, D), k (Nk, Hk, D), v (Nk, Hk, Dv), out and grad_out (Nq, H, Dv),
softmax_lse and grad_lse (H, Nq); cu_seqlens_* int32 (B+1,), as the op's schema (_C/ops.cpp).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from .meta.attention import FP8

_M32 = 0xFFFFFFFF


def _row_layout(cu_seqlens: torch.Tensor, cu_seqlens_padded: Optional[torch.Tensor], total: int):
    """Which sequence each buffer row belongs to -> (seq, pos, valid, lengths), all int64 / bool.

    seq (total,): the sequence index b, or B for rows that belong to no sequence;
    pos (total,): the row's index inside its sequence (meaningless where not valid);
    valid (total,): the row belongs to a sequence; lengths (B+1,): per-sequence lengths and a
    trailing 0 for the "no sequence" index B. Membership is tested against every sequence,
    (total, B), so zero-length sequences and any physical start order are handled.
    """
    cu = cu_seqlens.long()
    start = (cu if cu_seqlens_padded is None else cu_seqlens_padded.long())[:-1]
    length = cu[1:] - cu[:-1]
    batch = length.shape[0]
    r = torch.arange(total, device=cu.device)
    member = (r[:, None] >= start[None, :]) & (r[:, None] < (start + length)[None, :])
    valid = member.any(1)
    seq_ids = torch.arange(batch, device=cu.device)
    seq = torch.where(valid, (member.long() * seq_ids[None, :]).sum(1), batch)
    zero = length.new_zeros(1)
    pos = r - torch.cat([start, zero])[seq]
    return seq, pos, valid, torch.cat([length, zero])


def _dropout_keep(rng_state: torch.Tensor, p: float, nheads: int, rows: torch.Tensor,
                  cols: torch.Tensor) -> torch.Tensor:
    """Keep mask (H, Nq, Nk) of the kernels' dropout (reference.philox_keep), without a host sync.

    rows (Nq,): logical packed query index cu_seqlens_q[b] + i; cols (Nk,): key index j inside
    its sequence. rng_state = int64 [seed, offset] stays on the device: philox_word0 takes the
    seed as a 0-d tensor, and the offset counter word is that tensor broadcast.
    """
    seed, offset = rng_state[0], rng_state[1]
    head = torch.arange(nheads, device=rows.device)[:, None, None]
    head, row, col = torch.broadcast_tensors(head, rows[None, :, None], cols[None, None, :])
    word = reference.philox_word0(seed, col & _M32, row & _M32, head & _M32,
                                  (offset & _M32).expand_as(col))
    return word >= reference.dropout_threshold(p)


def attention_backward_dense(grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                             softmax_scale: float, window_left: int = -1, window_right: int = -1,
                             softcap: float = 0.0, alibi_slopes=None, cu_seqlens_q_padded=None,
                             cu_seqlens_k_padded=None, dropout_p: float = 0.0, rng_state=None,
                             grad_lse=None):
    """-> (dq (Nq, H, D), dk (Nk, Hk, D), dv (Nk, Hk, Dv)), as varlen::attention_backward.

    With S the scores after softcap (s = c * tanh(scale * q.k / c)) and ALiBi, masked to -inf
    where not visible, P = exp(S - lse) (lse -inf read as 0, so rows that see no key give 0),
    dP = grad_out . v (times keep / (1 - p) with dropout), D = rowsum(grad_out * out) - grad_lse,
    dS = P * (dP - D) (times 1 - tanh^2 with softcap): dq = scale * dS k, dk = scale * dS^T q,
    dv = (P * keep / (1 - p))^T grad_out, summed over each kv head's query-head group. out and
    softmax_lse are inputs like any other, so the result is differentiable in all seven
    tensors. Rows outside every sequence get zero gradients. Computes in float32 for float16 /
    bfloat16 inputs (the kernels' accumulator type) and returns q's, k's and v's dtypes.
    """
    if q.dtype == FP8:
        raise ValueError("double backward of varlen attention: FP8 attention (float8_e4m3fn q, k, v) "
                         "is forward-only and has no backward to differentiate")
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    total_q, nheads, _ = q.shape
    total_k, nheads_k, _ = k.shape
    group = nheads // nheads_k
    qseq, i, qvalid, len_q = _row_layout(cu_seqlens_q, cu_seqlens_q_padded, total_q)
    kseq, j, kvalid, len_k = _row_layout(cu_seqlens_k, cu_seqlens_k_padded, total_k)
    diag = i + len_k[qseq] - len_q[qseq]  # (Nq,) key column aligned with each query
    visible = qvalid[:, None] & kvalid[None, :] & (qseq[:, None] == kseq[None, :])
    if window_left >= 0:
        visible = visible & (j[None, :] >= diag[:, None] - window_left)
    if window_right >= 0:
        visible = visible & (j[None, :] <= diag[:, None] + window_right)

    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    go, oa = grad_out.to(acc), out.to(acc)
    k_h = ka.repeat_interleave(group, dim=1)  # (Nk, H, D): query head h reads kv head h // group
    v_h = va.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", qa, k_h) * softmax_scale
    if softcap > 0:
        th = torch.tanh(s / softcap)
        s = softcap * th
    if alibi_slopes is not None:
        if alibi_slopes.dim() == 1:
            slope = alibi_slopes.to(acc)[:, None].expand(nheads, total_q)
        else:
            slopes = torch.cat([alibi_slopes, alibi_slopes.new_zeros(1, nheads)])
            slope = slopes.to(acc)[qseq].transpose(0, 1)  # (H, Nq)
        s = s - slope[:, :, None] * (diag[:, None] - j[None, :]).abs().to(acc)
    s = s.masked_fill(~visible, -math.inf)
    lse = softmax_lse.to(acc)
    lse = lse.masked_fill(lse == -math.inf, 0.0)
    p = torch.exp(s - lse[:, :, None])  # (H, Nq, Nk), 0 where not visible

    dp = torch.einsum("qhd,khd->hqk", go, v_h)
    p_kept = p
    if dropout_p > 0:
        cu_q_ext = torch.cat([cu_seqlens_q, cu_seqlens_q.new_zeros(1)]).long()
        keep = _dropout_keep(rng_state, dropout_p, nheads, cu_q_ext[qseq] + i, j)
        kept = keep.to(acc) / (1.0 - dropout_p)
        dp = dp * kept
        p_kept = p * kept
    delta = (go * oa).sum(-1).transpose(0, 1)  # (H, Nq)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    ds = p * (dp - delta[:, :, None])
    if softcap > 0:
        ds = ds * (1 - th * th)

    dq = torch.einsum("hqk,khd->qhd", ds, k_h) * softmax_scale
    dk = (torch.einsum("hqk,qhd->khd", ds, qa) * softmax_scale).unflatten(1, (nheads_k, group)).sum(2)
    dv = torch.einsum("hqk,qhd->khd", p_kept, go).unflatten(1, (nheads_k, group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
