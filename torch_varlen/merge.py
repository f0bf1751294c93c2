"""Merge partial attention results by their log-sum-exp (DESIGN.md "Round 2": written once).

Attention of a query row over a key set split into parts S_1 .. S_n gives, per part, a partial
``(out_s, lse_s)`` (each the softmax attention over that part alone). The attention over all the
keys is::

    lse = logsumexp_s lse_s
    out = sum_s exp(lse_s - lse) * out_s

A part the row sees nothing of has ``lse_s = -inf`` (and out 0): it gets weight 0. A row that
sees no key in any part keeps out 0 and lse -inf, as varlen_attention gives. The context-parallel
ring (distributed.py) and split-KV decoding both use this function; it is pure torch, so it is
differentiable (no NaN gradients from -inf rows) and traceable by torch.compile.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["merge_attention_partials"]


def merge_attention_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], *,
                             out_dtype: Optional[torch.dtype] = None):
    """Combine partial attention results -> ``(out, lse)``.

    Args:
        outs: n >= 1 tensors (N, H, Dv), the partial outputs (varlen_attention's layout).
        lses: n tensors (H, N), their natural-log softmax_lse (float32, or float64).
        out_dtype: dtype of the merged out; default ``outs[0].dtype``. The merge itself runs in
            the promoted dtype of the inputs (float32 for bfloat16 outs with float32 lses), so
            a running merge can keep a float32 accumulator as ``outs[0]``.

    Returns:
        ``out`` (N, H, Dv) and ``lse`` (H, N) in the lses' promoted dtype.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge_attention_partials needs as many outs as lses, at least one; "
                         f"got {len(outs)} outs and {len(lses)} lses")
    n, h = outs[0].shape[0], outs[0].shape[1]
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.dim() != 3 or tuple(o.shape) != tuple(outs[0].shape):
            raise ValueError(f"outs[{i}] must be (N, H, Dv) = {tuple(outs[0].shape)}, got {tuple(o.shape)}")
        if tuple(l.shape) != (h, n):
            raise ValueError(f"lses[{i}] must be (H, N) = ({h}, {n}), got {tuple(l.shape)}")
    if out_dtype is None:
        out_dtype = outs[0].dtype
    compute = lses[0].dtype
    for t in list(outs) + list(lses):
        compute = torch.promote_types(compute, t.dtype)
    lse_stack = torch.stack([l.to(compute) for l in lses])  # (n, H, N)
    # logsumexp written out so that all -inf rows give lse -inf with zero (not NaN) gradients
    m = lse_stack.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    sumexp = torch.exp(lse_stack - m).sum(0)
    seen = sumexp > 0
    lse = torch.where(seen, m + torch.log(torch.where(seen, sumexp, torch.ones_like(sumexp))),
                      torch.full_like(sumexp, float("-inf")))
    lse_safe = torch.where(seen, lse, torch.zeros_like(lse))
    out = None
    for o, l in zip(outs, lse_stack):
        w = torch.exp(l - lse_safe).transpose(0, 1).unsqueeze(-1)  # (N, H, 1); 0 where l = -inf
        term = w * o.to(compute)
        out = term if out is None else out + term
    return out.to(out_dtype), lse
