"""sample_inputs(device, dtype) per op family (DESIGN.md "Testing conventions").

Each generator yields fresh random inputs (never zeros) covering zero-length and length-1
sequences, GQA, Lq != Lk, odd head dims; correctness, gradient and opcheck tests all use them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch


def cu_seqlens(lengths, device) -> torch.Tensor:
    t = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)
    return t.to(torch.int32).to(device)


def random_mask(batch, seqlen, device, *, lengths=None, generator=None) -> torch.Tensor:
    """Right-padded mask (B, S) with the given (or random) lengths, 0 and S included."""
    if lengths is None:
        lengths = torch.randint(0, seqlen + 1, (batch,), generator=generator).tolist()
    ar = torch.arange(seqlen)[None, :]
    return (ar < torch.tensor(lengths)[:, None]).to(device)


# ---------------------------------------------------------------- padding


@dataclasses.dataclass
class PaddingSample:
    hidden_states: torch.Tensor  # (B, S, *rest)
    attention_mask: torch.Tensor  # (B, S)
    unused_mask: Optional[torch.Tensor]
    name: str


def padding_sample_inputs(device, dtype=torch.float32, requires_grad=False) -> Iterator[PaddingSample]:
    def hidden(*shape):
        h = torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)
        return h.requires_grad_(requires_grad) if dtype.is_floating_point else h

    yield PaddingSample(hidden(3, 4, 8), random_mask(3, 4, device, lengths=[2, 4, 3]), None, "lengths_2_4_3")
    yield PaddingSample(hidden(4, 7, 3), random_mask(4, 7, device, lengths=[0, 1, 7, 0]), None, "empty_and_len1")
    yield PaddingSample(hidden(1, 5, 2, 3), random_mask(1, 5, device, lengths=[5]), None, "batch1_all_valid_2d_rest")
    scattered = torch.rand(5, 9) > 0.5  # holes anywhere, not only right padding
    yield PaddingSample(hidden(5, 9, 1), scattered.to(device), None, "scattered_mask_hidden1")
    unused = (~scattered) & (torch.rand(5, 9) > 0.5)
    yield PaddingSample(hidden(5, 9, 4), scattered.to(device), unused.to(device), "with_unused_mask")
    yield PaddingSample(hidden(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool, device=device), None, "all_padding")
    yield PaddingSample(hidden(2, 6), random_mask(2, 6, device, lengths=[3, 6]).to(torch.int32), None, "no_rest_int_mask")


def concat_sample_inputs(device, dtype=torch.float32, requires_grad=False):
    """(hidden_states, attention_mask_in_length) pairs."""
    rows = [
        ([[2, 3, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0]], 6),
        ([[1, 0, 0, 0], [0, 0, 0, 0], [2, 1, 1, 0]], 4),
        ([[5, 0, 0, 0, 0]], 5),
    ]
    for lengths, seqlen in rows:
        m = torch.tensor(lengths, dtype=torch.int32, device=device)
        h = torch.randn(m.shape[0], seqlen, 3, dtype=torch.float64).to(dtype).to(device)
        yield h.requires_grad_(requires_grad), m


# ---------------------------------------------------------------- attention


@dataclasses.dataclass
class AttentionSample:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    kwargs: dict  # softmax_scale, causal, window_size, softcap, alibi_slopes, padded cu_seqlens
    name: str


def make_attention_sample(lengths_q, lengths_k, nheads, nheads_k, headdim, headdim_v, device,
                          dtype, requires_grad=False, name="", pad_q=0, pad_k=0, **kwargs):
    """Build q/k/v for the given per-sequence lengths. pad_q / pad_k > 0 insert that many
    trailing padding rows after each sequence and pass cu_seqlens_*_padded."""
    def buf(lengths, pad, h, d):
        total = sum(lengths) + pad * len(lengths)
        t = torch.randn(total, h, d, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    q = buf(lengths_q, pad_q, nheads, headdim)
    k = buf(lengths_k, pad_k, nheads_k, headdim)
    v = buf(lengths_k, pad_k, nheads_k, headdim_v)
    if pad_q:
        kwargs["cu_seqlens_q_padded"] = cu_seqlens([n + pad_q for n in lengths_q], device)
    if pad_k:
        kwargs["cu_seqlens_k_padded"] = cu_seqlens([n + pad_k for n in lengths_k], device)
    return AttentionSample(q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device),
                           max(lengths_q, default=0), max(lengths_k, default=0), kwargs, name)


def attention_sample_inputs(device, dtype=torch.float32, requires_grad=False) -> Iterator[AttentionSample]:
    """Every feature and several combinations, at sizes small enough for float64 gradcheck."""
    mk = lambda *a, **kw: make_attention_sample(*a, device=device, dtype=dtype, requires_grad=requires_grad, **kw)
    slopes = lambda *shape: (torch.rand(*shape) * 0.5 + 0.05).float().to(device)
    yield mk([2, 4, 3], [2, 4, 3], 2, 2, 16, 16, name="basic")
    yield mk([3, 0, 1, 5], [3, 0, 1, 5], 2, 1, 8, 8, name="zero_and_len1_mqa")
    yield mk([3, 5], [6, 2], 4, 2, 8, 12, causal=True, name="causal_lq_ne_lk_gqa_dv")
    yield mk([5, 1], [3, 4], 2, 2, 7, 5, causal=True, name="causal_lq_gt_lk_odd_dims")
    yield mk([6, 4], [6, 7], 2, 2, 8, 8, window_size=(2, 1), name="window")
    yield mk([6, 4], [6, 4], 2, 2, 8, 8, window_size=(1, -1), causal=True, name="window_causal")
    yield mk([5, 3], [5, 3], 2, 2, 8, 8, softcap=2.0, name="softcap")
    yield mk([5, 3], [4, 6], 4, 2, 8, 8, alibi_slopes=slopes(4), causal=True, name="alibi_heads")
    yield mk([5, 3], [5, 3], 2, 2, 8, 8, alibi_slopes=slopes(2, 2), softcap=1.5, window_size=(3, 2),
             name="alibi_batch_softcap_window")
    yield mk([3, 0, 4], [2, 3, 4], 2, 1, 8, 6, pad_q=2, pad_k=1, causal=True, name="padded_cu_seqlens")
    yield mk([4, 3], [4, 3], 2, 2, 8, 8, softmax_scale=0.3, name="scale")


def assert_compiled_step_matches_eager(loss_fn, layer, width, batches, device="cuda",
                                       dtype=torch.bfloat16):
    """torch.compile(loss_fn, fullgraph=True, dynamic=True)(layer, x, cu_seqlens, max_seqlen)
    over packed batches of the given lengths: loss and parameter gradients match eager, and one
    compile serves every batch (no graph break, no recompile)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=True)
    for lengths in batches:
        cu = cu_seqlens(lengths, device)
        x = torch.randn(sum(lengths), width, device=device, dtype=dtype)
        loss = step(layer, x, cu, max(lengths))
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        loss_e = loss_fn(layer, x, cu, max(lengths))
        grads_e = torch.autograd.grad(loss_e, list(layer.parameters()))
        torch.testing.assert_close(loss, loss_e, rtol=2e-2, atol=1e-3)
        for g, ge in zip(grads, grads_e):
            torch.testing.assert_close(g, ge, rtol=5e-2, atol=5e-3)
    assert counter.frame_count == 1
