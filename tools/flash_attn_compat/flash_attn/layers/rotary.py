"""``flash_attn.layers.rotary.apply_rotary_emb`` in plain PyTorch (flash-attn's semantics).

flash-attn's tests use it only to build their reference (the rotary embedding that
``flash_attn_with_kvcache`` applies inside); the Triton kernel, ``inplace`` and the varlen
(``cu_seqlens``) form are not provided.
"""

from __future__ import annotations

from typing import Union

import torch


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False,
                     seqlen_offsets: Union[int, torch.Tensor] = 0, cu_seqlens=None, max_seqlen=None):
    """Rotate the first ``rotary_dim = 2 * cos.shape[-1]`` dims of x; the rest pass through.

    x (B, S, H, D); cos / sin (seqlen_ro, rotary_dim / 2). Token s of sequence b is at position
    ``s + seqlen_offsets`` (an int, or int32/int64 (B,) per sequence) and uses that row of cos /
    sin. interleaved (GPT-J) rotates pairs (0, 1), (2, 3), ...; otherwise (GPT-NeoX) pairs
    (i, i + rotary_dim / 2). Computed in float32, returned in x's dtype (flash-attn rounds
    cos / sin to x's dtype first, as its callers pass them in x's dtype).
    """
    if inplace or cu_seqlens is not None:
        raise NotImplementedError("apply_rotary_emb stand-in: inplace and cu_seqlens are not supported")
    batch, seqlen = x.shape[:2]
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} exceeds head dim {x.shape[-1]}")
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).to(torch.int64).reshape(-1, 1)
    positions = (offsets + torch.arange(seqlen, device=x.device)).expand(batch, seqlen)
    if positions.max().item() >= cos.shape[0] if positions.numel() else False:
        raise ValueError(f"apply_rotary_emb: positions up to {positions.max().item()} need that many rows "
                         f"of cos / sin, which have {cos.shape[0]}")
    c = cos[positions][:, :, None].float()  # (B, S, 1, rotary_dim / 2)
    s = sin[positions][:, :, None].float()
    x_ro = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = x_ro[..., 0::2], x_ro[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = x_ro.chunk(2, -1)
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), -1)
