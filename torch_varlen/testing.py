"""Test helpers with the names and returns of flash-attn's (and AITER's ``test_mha_common``):
``generate_random_padding_mask`` and ``generate_qkv``, so tests written for those run with
``from torch_varlen.testing import generate_qkv, generate_random_padding_mask``.

Shape legend as in ops.py: B batch, S padded seqlen, H / Hk query / kv heads, D head dim.
"""

from __future__ import annotations

import torch

from .ops import pad_input, unpad_input

__all__ = ["generate_random_padding_mask", "generate_qkv"]


def generate_random_padding_mask(max_seqlen, batch_size, device, mode="random", zero_lengths=False):
    """A right-padded bool mask (B, max_seqlen): row b keeps its first ``length_b`` tokens.

    mode "full": every length is max_seqlen; "random": lengths uniform in
    [max(1, max_seqlen - 20), max_seqlen] (from 0 with ``zero_lengths``); "third": uniform in
    [max_seqlen // 3, max_seqlen]. ``zero_lengths``: also sets the lengths of rows 0, 5, 10, ...
    and of the last row to 0.
    """
    if mode not in ("full", "random", "third"):
        raise ValueError(f"mode must be 'full', 'random' or 'third', got {mode!r}")
    if mode == "full":
        lengths = torch.full((batch_size,), max_seqlen, device=device, dtype=torch.int64)
    else:
        low = (max(0 if zero_lengths else 1, max_seqlen - 20) if mode == "random" else max_seqlen // 3)
        lengths = torch.randint(low, max_seqlen + 1, (batch_size,), device=device)
    if zero_lengths:
        lengths[::5] = 0
        lengths[-1] = 0
    return torch.arange(max_seqlen, device=device)[None, :] < lengths[:, None]


def _flat(t):
    """(B, S, *) -> (B*S, *), and back for a given batch size."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _cu_full(batch, seqlen, device):
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _side(x, mask, batch, seqlen):
    """Unpad x (B, S, ...) with mask (or take every row) -> (x_unpad, cu_seqlens, max_seqlen,
    pad_fn) where pad_fn puts packed rows back to (B, S, ...)."""
    if mask is not None:
        x_unpad, indices, cu, max_seqlen, _ = unpad_input(x, mask)
        return x_unpad, cu, max_seqlen, lambda rows: pad_input(rows, indices, batch, seqlen)
    return (_flat(x), _cu_full(batch, seqlen, x.device), seqlen,
            lambda rows: rows.reshape(batch, seqlen, *rows.shape[1:]))


def generate_qkv(q, k, v, query_padding_mask=None, key_padding_mask=None, kvpacked=False,
                 qkvpacked=False):
    """Packed (varlen) inputs and their padded twins, as flash-attn's tests build them.

    q (B, S_q, H, D), k / v (B, S_k, Hk, D); masks (B, S_q) / (B, S_k) bool (None = all valid).
    Returns, each input detached with ``requires_grad=True``:

    - default: ``(q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, q, k, v, output_pad_fn, dq_pad_fn, dk_pad_fn)``;
    - ``kvpacked``: ``(q_unpad, kv_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, q, kv, output_pad_fn, dq_pad_fn, dkv_pad_fn)`` with kv (B, S_k, 2, Hk, D);
    - ``qkvpacked``: ``(qkv_unpad, cu_seqlens_q, max_seqlen_q, qkv, output_pad_fn,
      dqkv_pad_fn)`` with qkv (B, S, 3, H, D) (needs equal masks and H == Hk).

    The ``*_pad_fn`` turn packed rows (an output or a gradient) back into the padded layout.
    """
    if kvpacked and qkvpacked:
        raise ValueError("kvpacked and qkvpacked are exclusive")
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if k.shape != (batch, seqlen_k, nheads_k, d) or v.shape[:3] != (batch, seqlen_k, nheads_k):
        raise ValueError(f"k and v must be (batch, seqlen_k, nheads_k, headdim) with q's batch and "
                         f"head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    q_unpad, cu_q, max_q, output_pad_fn = _side(q, query_padding_mask, batch, seqlen_q)
    k_unpad, cu_k, max_k, dk_pad_fn = _side(k, key_padding_mask, batch, seqlen_k)
    v_unpad = _side(v, key_padding_mask, batch, seqlen_k)[0]
    leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
    if qkvpacked:
        same = (query_padding_mask is None) == (key_padding_mask is None) and (
            query_padding_mask is None or bool((query_padding_mask == key_padding_mask).all()))
        if not same or nheads != nheads_k or seqlen_q != seqlen_k:
            raise ValueError("qkvpacked needs q and k of one shape and equal padding masks")
        qkv_unpad = torch.stack([q_unpad, k_unpad, v_unpad], 1)
        return (leaf(qkv_unpad), cu_q, max_q, leaf(torch.stack([q, k, v], 2)), output_pad_fn,
                output_pad_fn)
    if kvpacked:
        kv_unpad = torch.stack([k_unpad, v_unpad], 1)
        return (leaf(q_unpad), leaf(kv_unpad), cu_q, cu_k, max_q, max_k, leaf(q),
                leaf(torch.stack([k, v], 2)), output_pad_fn, output_pad_fn, dk_pad_fn)
    return (leaf(q_unpad), leaf(k_unpad), leaf(v_unpad), cu_q, cu_k, max_q, max_k, leaf(q),
            leaf(k), leaf(v), output_pad_fn, output_pad_fn, dk_pad_fn)
