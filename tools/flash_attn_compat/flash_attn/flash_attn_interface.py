"""``flash_attn.flash_attn_interface`` backed by torch_varlen.

The seven attention functions are torch_varlen's (``torch_varlen.ops``), with flash-attn 2's
positional order. Two things differ from flash-attn, both about ``return_attn_probs=True``:

- flash-attn returns ``(out, softmax_lse, S_dmask)`` where S_dmask is its kernel's score
  matrix, meaningful only with dropout. torch_varlen's ``attn_probs`` is the exact (float64
  reference) weight matrix after dropout. This module turns it into the encoding flash-attn's
  tests decode (``convert_flash_attn_S_to_softmax`` / ``normalize_flash_attn_S``): shape
  ``(B, H, max_seqlen_q, max_seqlen_k)`` (flash-attn rounds up to multiples of 128; its tests
  accept either), entry ``+a`` where the key was kept and ``-a`` where dropout removed it, with
  ``a = p / max_j p`` (p the softmax weight before dropout, max over the row). That is the
  "unnormalized" ``exp(s - m)`` with m the row max over all keys, which
  ``normalize_flash_attn_S`` maps back to p when it treats the keys as one block: hence
  ``_get_block_size_n`` below returns a size no sequence reaches.
- With ``dropout_p == 0`` the third value is ``None`` (flash-attn returns no S_dmask then
  either) and nothing beyond the kernel runs; with dropout the weights come from the float64
  reference (slow; tests only).

Not provided: the private ``_flash_attn_forward`` family and ``flash_attn_gpu`` (the tests that
import them inside their bodies, ``test_flash_attn_varlen_paged_kv_num_splits`` and
``test_flash_attn_generator_arg_must_be_none``, are not claimed).
"""

from __future__ import annotations

import torch

import torch_varlen as _tv
from torch_varlen import flash_attn_with_kvcache  # noqa: F401  (same signature and semantics)

USE_TRITON_ROCM = False


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block size flash-attn's tests assume S_dmask was produced with: one block.

    flash-attn returns its kernel's tile width (64 or 128), because its S_dmask entries are
    ``exp(s - m)`` with m the running max up to each tile. torch_varlen's S_dmask is normalized
    by the max over the whole row (see the module docstring), so the tests must split the keys
    into a single block: any size >= max_seqlen_k does that.
    """
    return 2**31 - 1


def _s_dmask(probs_dropped, probs):
    """flash-attn's sign-encoded S_dmask from the weights after (``probs_dropped``, dropped = 0)
    and before (``probs``) dropout, both (B, H, Sq, Sk)."""
    scale = probs.amax(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(probs_dropped != 0, probs, -probs) / scale


def _dropout_p(args, kwargs, index):
    return float(args[index]) if len(args) > index else float(kwargs.get("dropout_p", 0.0))


def _without_dropout(args, kwargs, index):
    if len(args) > index:
        return args[:index] + (0.0,) + args[index + 1:], kwargs
    return args, {**kwargs, "dropout_p": 0.0}


def _varlen(fn, dropout_index):
    """flash-attn's return_attn_probs for a torch_varlen varlen function (see module docstring)."""

    def wrapper(*args, return_attn_probs=False, **kwargs):
        if not return_attn_probs:
            return fn(*args, **kwargs)
        if _dropout_p(args, kwargs, dropout_index) == 0:
            out, lse = fn(*args, return_lse=True, **kwargs)
            return out, lse, None
        out, lse, probs_dropped = fn(*args, return_attn_probs=True, **kwargs)
        with torch.no_grad():
            a, kw = _without_dropout(args, kwargs, dropout_index)
            probs = fn(*a, return_attn_probs=True, **kw)[2]
        return out, lse, _s_dmask(probs_dropped, probs)

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


flash_attn_varlen_func = _varlen(_tv.flash_attn_varlen_func, 7)
flash_attn_varlen_kvpacked_func = _varlen(_tv.flash_attn_varlen_kvpacked_func, 6)
flash_attn_varlen_qkvpacked_func = _varlen(_tv.flash_attn_varlen_qkvpacked_func, 3)


def flash_attn_func(q, k, v, dropout_p=0.0, *args, return_attn_probs=False, **kwargs):
    """torch_varlen.flash_attn_func; ``return_attn_probs`` as the module docstring says.

    With dropout_p == 0 it calls torch_varlen.flash_attn_varlen_func (return_lse=True) on the
    (B*S, H, D) views, because torch_varlen.flash_attn_func returns lse only together with the
    reference attn_probs.
    """
    if not return_attn_probs:
        return _tv.flash_attn_func(q, k, v, dropout_p, *args, **kwargs)
    if dropout_p == 0:
        batch, seqlen_q, nheads, _ = q.shape
        seqlen_k = k.shape[1]
        cu = lambda s: torch.arange(0, (batch + 1) * s, s, dtype=torch.int32, device=q.device)  # noqa: E731
        rows = lambda t: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])  # noqa: E731
        out, lse = _tv.flash_attn_varlen_func(rows(q), rows(k), rows(v), cu(seqlen_q), cu(seqlen_k),
                                              seqlen_q, seqlen_k, 0.0, *args, return_lse=True, **kwargs)
        return (out.view(batch, seqlen_q, nheads, -1),
                lse.view(nheads, batch, seqlen_q).transpose(0, 1), None)
    out, lse, probs_dropped = _tv.flash_attn_func(q, k, v, dropout_p, *args, return_attn_probs=True,
                                                  **kwargs)
    with torch.no_grad():
        probs = _tv.flash_attn_func(q, k, v, 0.0, *args, return_attn_probs=True, **kwargs)[2]
    return out, lse, _s_dmask(probs_dropped, probs)


def flash_attn_kvpacked_func(q, kv, *args, **kwargs):
    """As flash_attn_func with kv (B, S_k, 2, Hk, D)."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], *args, **kwargs)


def flash_attn_qkvpacked_func(qkv, *args, **kwargs):
    """As flash_attn_func with qkv (B, S, 3, H, D)."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], *args, **kwargs)
