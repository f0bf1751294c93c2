"""torch_varlen's public functions: thin, keyword-friendly calls into torch.ops.varlen.*.

Shape legend: B batch, S padded seqlen, N total packed tokens (sum of lengths), H query heads,
Hk key/value heads (H % Hk == 0), D head dim of q and k, Dv head dim of v, ``*`` any
trailing dims. ``cu_seqlens`` is int32 (B+1,): lengths 2, 4, 3 -> ``[0, 2, 6, 9]``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .kernels.fa4 import BACKENDS

_ops = torch.ops.varlen

__all__ = [
    "unpad_input",
    "pad_input",
    "unpad_input_for_concatenated_sequences",
    "varlen_attention",
    "attention_backend",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_with_kvcache",
]


# ---------------------------------------------------------------- padding


def unpad_input(hidden_states, attention_mask, unused_mask=None, *, capacity: Optional[int] = None):
    """Remove padding: (B, S, *) -> (N, *) packed rows.

    Args:
        hidden_states: (B, S, *) any dtype.
        attention_mask: (B, S), bool or integer; nonzero = valid token.
        unused_mask: (B, S) optional; nonzero = allocated but unused (kept in the packed
            rows and in ``cu_seqlens``, not counted in ``seqused``).
        capacity: optional static row count C. Outputs then have shapes that depend only on
            the input shapes (no host sync, CUDA-graph capturable): ``hidden_unpad`` and
            ``indices`` have exactly C rows, valid rows first, the rest zero, unused indices
            equal ``B*S`` (``pad_input`` ignores them), and ``max_seqlen`` is ``S``. If C is
            smaller than the number of kept tokens the op raises (on CUDA: a device-side
            assert, raised at the next synchronisation, since checking on the host would sync).

    Returns:
        ``(hidden_unpad, indices, cu_seqlens, max_seqlen, seqused)``: (N, *), int64 (N,)
        into the flattened (B*S), int32 (B+1,), int (a SymInt under torch.compile), int32 (B,).

    Example::

        mask = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]  # lengths 2, 4, 3
        -> cu_seqlens [0, 2, 6, 9], max_seqlen 4, indices [0, 1, 4, 5, 6, 7, 8, 9, 10]
    """
    if capacity is None:
        return _ops.unpad(hidden_states, attention_mask, unused_mask)
    hidden_unpad, indices, cu_seqlens, seqused = _ops.unpad_capacity(
        hidden_states, attention_mask, unused_mask, capacity
    )
    return hidden_unpad, indices, cu_seqlens, hidden_states.shape[1], seqused


def pad_input(hidden_states, indices, batch, seqlen):
    """Restore padding: (N, *) rows scattered into zeros (B, S, *) at ``indices``.

    Indices ``>= batch*seqlen`` (the capacity padding of ``unpad_input``) are ignored.
    """
    return _ops.pad(hidden_states, indices, batch, seqlen)


def _check_first_axis(input, indices, name):
    if input.dim() < 2:
        raise ValueError(f"{name}: input must have at least 2 dims (first_axis, *), got shape "
                         f"{tuple(input.shape)}")
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"{name}: indices must be 1-D int64, got {indices.dtype} of shape "
                         f"{tuple(indices.shape)}")


def index_first_axis(input, indices):
    """flash-attn's ``index_first_axis``: ``input[indices]`` for input (N, *), indices int64
    (nnz,) -> (nnz, *), differentiable (the backward scatters into zeros of N rows). It is
    ``gather_rows`` on N rows of one "batch", so an index equal to N gives a zero row (the
    capacity convention) and one past N is an error. Indices must be distinct for the gradient
    (as ``unpad_input`` makes them; flash-attn's scatter has the same rule)."""
    _check_first_axis(input, indices, "index_first_axis")
    return _ops.gather_rows(input.unsqueeze(0), indices)


def index_put_first_axis(values, indices, first_axis_dim):
    """flash-attn's ``index_put_first_axis``: zeros (first_axis_dim, *) with ``values`` (nnz, *)
    at rows ``indices`` (int64, distinct, < first_axis_dim; indices equal to first_axis_dim
    are dropped); differentiable. ``pad`` with one "batch" of first_axis_dim rows."""
    _check_first_axis(values, indices, "index_put_first_axis")
    return _ops.pad(values, indices, 1, first_axis_dim)[0]


def index_first_axis_residual(input, indices):
    """flash-attn's ``index_first_axis_residual``: ``(input[indices], input)`` for a fused
    residual path; the gradient of ``input`` is that of the residual plus the rows'
    gradients scattered back at ``indices``."""
    return index_first_axis(input, indices), input


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Unpad rows that each hold several concatenated samples.

    ``attention_mask_in_length`` (B, S) integer: row r lists the lengths of the samples packed
    at the start of row r, then zeros, e.g. ``[[2, 3, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0]]``.
    Returns ``(hidden_unpad, indices, cu_seqlens, max_seqlen)`` with one sequence per sample:
    for that example cu_seqlens ``[0, 2, 5, 9, 10]`` and max_seqlen 4.
    """
    return _ops.unpad_concat(hidden_states, attention_mask_in_length)


# ---------------------------------------------------------------- attention


# Float parameters default to the int 0, not 0.0: under torch.compile(dynamic=True) Dynamo
# turns a float default into a graph input read back with .item(), while ints stay constants.


def _window(causal: bool, window_size: Sequence[int]):
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    return left, (0 if causal else right)


# The attention backend used when a call passes backend=None: set by ``attention_backend`` and
# initialised from TORCH_VARLEN_ATTENTION_BACKEND at import. The public functions read it and
# pass the string into the op, so under torch.compile it is a constant of the graph: Dynamo
# guards on this global and recompiles when it changes (no graph break).
_default_backend: Optional[str] = os.environ.get("TORCH_VARLEN_ATTENTION_BACKEND") or None


class attention_backend:
    """Context manager: attention calls with ``backend=None`` inside it use ``name``.

    ``name``: ``"auto"`` (FlashAttention-4 when installed and able to run the call, else our
    kernels), ``"torch_varlen"`` (our kernels: the Triton kernels; with TORCH_VARLEN_HOPPER=1,
    on a Hopper GPU, the forward runs the warp-specialized kernel of kernels/hopper.py where it
    supports the call; backwards run on Triton), ``"triton"`` (our Triton kernels only),
    ``"hopper"`` (the Hopper forward with Triton's backward, or an error saying why it cannot
    run the call) or ``"fa4"`` (FlashAttention-4, or an error saying why it cannot run the
    call). On CPU tensors ``"auto"`` and ``"torch_varlen"`` run the CPU kernels; the other names
    need CUDA tensors. Outside any such block the default is the environment variable
    ``TORCH_VARLEN_ATTENTION_BACKEND`` (read when torch_varlen is imported), else ``"auto"``.
    The choice is made when the forward runs; its backward uses the same backend. Enter it
    outside ``torch.compile``d code: a compiled function recompiles for a new value.

    Example::

        with torch_varlen.attention_backend("torch_varlen"):
            out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    """

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise ValueError("attention_backend name must be 'auto', 'torch_varlen', 'triton', "
                             f"'hopper' or 'fa4', got {name!r}")
        self.name = name

    def __enter__(self):
        global _default_backend
        self._previous, _default_backend = _default_backend, self.name
        return self

    def __exit__(self, *exc):
        global _default_backend
        _default_backend = self._previous
        return False


def new_rng_state(device) -> torch.Tensor:
    """A fresh dropout ``rng_state`` = int64 [seed, offset] drawn from torch's generator."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
    softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Sequence[int] = (-1, -1), softcap: float = 0, alibi_slopes=None,
    dropout_p: float = 0, rng_state: Optional[torch.Tensor] = None,
    cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, deterministic: bool = False,
    q_descale=None, k_descale=None, v_descale=None, backend: Optional[str] = None, sink=None,
    block_table=None, seqused_k=None, num_splits: int = 0,
):
    """Attention over packed variable-length sequences -> ``(out, softmax_lse)``.

    q (N_q, H, D), k (N_k, Hk, D), v (N_k, Hk, Dv); cu_seqlens_q / cu_seqlens_k int32 (B+1,);
    out (N_q, H, Dv) in q's dtype; softmax_lse (H, N_q) float32, natural log (float64 for
    float64 inputs). Query i of a sequence with Lq queries and Lk keys sees key j when::

        causal:        j <= i + Lk - Lq                (bottom-right aligned)
        window (l, r): i + Lk - Lq - l <= j <= i + Lk - Lq + r   (-1 = unbounded)

        causal, Lq = 3, Lk = 5:    1 1 1 0 0
                                   1 1 1 1 0
                                   1 1 1 1 1

    Scores are ``softmax_scale * q.k`` (default ``D**-0.5``), then ``softcap * tanh(s/softcap)``
    when ``softcap > 0``, then ALiBi ``- slope[h] * |i + Lk - Lq - j|`` with ``alibi_slopes``
    float32 (H,) or (B, H). A query that sees no key gives 0 and lse -inf. Query head h reads
    kv head ``h // (H // Hk)``. ``cu_seqlens_*_padded`` (B+1,) give each sequence's physical
    start when sequences carry trailing padding; rows outside every sequence give 0 / -inf.
    ``dropout_p`` drops attention weights with the counter-based mask of ``_C/philox.h``,
    keyed by ``rng_state`` = int64 [seed, offset] on q's device (drawn from torch's generator
    when None). ``max_seqlen_*`` (int or SymInt) are sizing hints, never needed for
    correctness. ``deterministic`` makes the backward bitwise reproducible. ``backend``:
    ``"auto"`` / ``"torch_varlen"`` / ``"triton"`` / ``"hopper"`` / ``"fa4"`` (see
    ``attention_backend``, whose value is used when None); FlashAttention-4 runs bfloat16 /
    float16 CUDA calls without dropout, ALiBi or padded cu_seqlens on compute capability 9.x /
    10.x; the Hopper kernel: kernels/hopper.py's ``supported``.

    FP8 forward: q, k, v all ``torch.float8_e4m3fn`` (float8_e5m2 is not supported) with
    float32 ``q_descale`` / ``k_descale`` / ``v_descale``, each None (= 1), ``(1,)`` (per
    tensor) or ``(B, Hk)`` (per sequence and kv head, as FlashAttention-3; a ``q_descale``
    entry applies to every query head of that kv head's group). The result is attention of
    ``q * q_descale``, ``k * k_descale``, ``v * v_descale`` (scores scaled by
    ``softmax_scale`` as usual); out is bfloat16, lse float32. Causal/window, softcap, ALiBi,
    GQA and padded ``cu_seqlens`` work; dropout does not (error). Forward only: a backward
    through an FP8 forward raises.

    Learnable sinks (gpt-oss's ``s_aux``, FA4's ``learnable_sink``, AITER's ``sink_ptr``):
    ``sink`` (H,) float32 (float64 for float64 inputs) on q's device is one logit per query
    head that joins every row's softmax denominator, as a key with no value::

        p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)),   lse_i = log(exp(sink_h) + sum_j exp(s_ij))

    (after softcap and ALiBi, which do not touch the sink). A row that sees no key gives out 0
    and lse ``sink_h``; rows outside every sequence keep 0 / -inf. ``sink`` is differentiable:
    ``dsink_h = sum_i exp(sink_h - lse_i) * (dlse_i - rowsum(dO_i * O_i))``.

    Paged KV (inference: forward only, a backward raises): ``block_table`` int32
    (B, max_blocks) makes k (num_blocks, block_size, Hk, D) and v (num_blocks, block_size, Hk,
    Dv) caches, vLLM's and flash-attn's layout; key j of sequence b is
    ``k[block_table[b, j // block_size], j % block_size]``. block_size is any positive multiple
    of 16 (16, 32, ..., 256, 512, ...). ``seqused_k`` int32 (B,) gives each sequence's key count
    ``Lk = seqused_k[b]`` (with or without a block_table); without it ``Lk = cu_seqlens_k[b+1] -
    cu_seqlens_k[b]``. With seqused_k, cu_seqlens_k does not set the lengths (flash-attn's rule:
    seqused_k wins) and may be None: it is then built from seqused_k. With packed k the keys of
    sequence b are the seqused_k[b] rows from ``cu_seqlens_k_padded[b]`` (or ``cu_seqlens_k[b]``)
    on. Every value is checked: counts >= 0, keys inside k (packed) or within the block table's
    ``max_blocks * block_size`` (paged), and the used blocks' ids in ``[0, num_blocks)`` (a
    RuntimeError on the CPU, a device-side assert on CUDA; never an out-of-bounds read).
    Unused block table entries are not read. Every mask feature works with paged KV. The CPU
    gathers the used keys into a packed copy (one pass); CUDA reads the blocks in the kernel.

    ``num_splits`` (forward only): split-KV (flash-decoding) on CUDA: each query tile's keys in
    that many parts, merged by lse; 0 picks it from the shapes (splits short query runs over
    long caches that would not fill the GPU), 1 = no split. The CPU ignores it.
    """
    window_left, window_right = _window(causal, window_size)
    cu_seqlens_k = _paged_cu_seqlens_k(cu_seqlens_k, seqused_k)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if dropout_p > 0 and rng_state is None:
        rng_state = new_rng_state(q.device)
    return _ops.attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale),
        window_left, window_right, float(softcap), alibi_slopes, cu_seqlens_q_padded,
        cu_seqlens_k_padded, float(dropout_p), rng_state if dropout_p > 0 else None, deterministic,
        q_descale, k_descale, v_descale,
        backend=backend if backend is not None else _default_backend, sink=sink,
        block_table=block_table, seqused_k=seqused_k, num_splits=int(num_splits),
    )


def _paged_cu_seqlens_k(cu_seqlens_k, seqused_k):
    """cu_seqlens_k, or (None with seqused_k) the cumulated seqused_k on its device."""
    if cu_seqlens_k is not None:
        return cu_seqlens_k
    if seqused_k is None:
        raise ValueError("cu_seqlens_k may be None only with seqused_k (which then gives the key counts)")
    if seqused_k.dtype != torch.int32 or seqused_k.dim() != 1:
        raise ValueError(f"seqused_k must be int32 of shape (batch,), got {seqused_k.dtype} of shape "
                         f"{tuple(seqused_k.shape)}")
    return torch.nn.functional.pad(seqused_k.cumsum(0, dtype=torch.int32), (1, 0))


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0, alibi_slopes=None,
    deterministic=False, return_lse=False, return_attn_probs=False, cu_seqlens_q_padded=None,
    cu_seqlens_k_padded=None, *, rng_state=None, q_descale=None, k_descale=None, v_descale=None,
    backend=None, sink=None, logits_soft_cap=None, min_seqlen_q=None, out=None, block_table=None,
    seqused_k=None, sink_ptr=None, num_splits=0,
):
    """flash-attn / AITER compatible varlen attention; see ``varlen_attention`` for semantics.

    Returns ``out`` (N_q, H, Dv); ``(out, softmax_lse)`` with ``return_lse=True``;
    ``(out, softmax_lse, attn_probs)`` with ``return_attn_probs=True``, where attn_probs is
    the (B, H, max_seqlen_q, max_seqlen_k) weight matrix after masking and dropout (dropped
    entries 0, kept ones scaled by 1/(1-p), so out = attn_probs @ v). attn_probs is computed
    by the float64 reference for tests and debugging only: it is slow and syncs the host.
    ``backend`` (keyword): as in ``varlen_attention`` (``"auto"``, ``"torch_varlen"``, ``"triton"``,
    ``"hopper"`` or ``"fa4"``).
    ``q_descale`` / ``k_descale`` / ``v_descale``: the FP8 forward (float8_e4m3fn q, k, v).

    AITER's keyword names: ``logits_soft_cap`` is ``softcap`` (an error if both are given and
    differ); ``min_seqlen_q`` is accepted and unused (a hint, like ``max_seqlen_*``); ``out``
    (N_q, H, Dv) in out's dtype on q's device receives the output (copied in) and is returned
    in its place; ``window_size`` may have a third entry, AITER's count of sink tokens (the
    first keys every query sees besides its window), which must be 0 (only 0 is supported).
    ``block_table`` / ``seqused_k``: paged KV caches and key counts (forward only; see
    ``varlen_attention``; cu_seqlens_k may be None with seqused_k). ``sink_ptr`` is AITER's
    name of ``sink``, the learnable sink logits (H,) (see ``varlen_attention``).
    ``num_splits``: split-KV on CUDA (see ``varlen_attention``).
    """
    cu_seqlens_k = _paged_cu_seqlens_k(cu_seqlens_k, seqused_k)
    softcap = _aiter_softcap(softcap, logits_soft_cap)
    window_size = _aiter_window(window_size)
    if sink_ptr is not None:
        if sink is not None and sink is not sink_ptr:
            raise ValueError("sink and sink_ptr are the same option (sink_ptr is AITER's name): give one")
        sink = sink_ptr
    if dropout_p > 0 and rng_state is None:
        rng_state = new_rng_state(q.device)
    result, lse = varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state,
        cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded,
        deterministic=deterministic, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        backend=backend, sink=sink, block_table=block_table, seqused_k=seqused_k,
        num_splits=num_splits,
    )
    if return_attn_probs:
        if block_table is not None or seqused_k is not None:
            k, v, cu_seqlens_k = _gather_keys(k, v, cu_seqlens_k, cu_seqlens_k_padded, block_table,
                                              seqused_k)
            cu_seqlens_k_padded = None
        probs = _attn_probs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
            softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, dropout_p=dropout_p, rng_state=rng_state,
            cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded,
            q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, sink=sink,
        )
    if out is not None:
        result = _write_out(out, result)
    if return_attn_probs:
        return result, lse, probs
    return (result, lse) if return_lse else result


def _gather_keys(*args):
    from . import reference

    return reference.gather_keys(*args)


def _aiter_softcap(softcap, logits_soft_cap):
    """AITER's logits_soft_cap is softcap under another name."""
    if logits_soft_cap is None:
        return softcap
    if softcap and float(softcap) != float(logits_soft_cap):
        raise ValueError(f"softcap ({softcap}) and logits_soft_cap ({logits_soft_cap}) are the same "
                         "option (logits_soft_cap is AITER's name): give one, or equal values")
    return logits_soft_cap


def _aiter_window(window_size):
    """AITER's (left, right, sink_tokens) -> (left, right); only 0 sink tokens are supported."""
    if len(window_size) == 3:
        if int(window_size[2]) != 0:
            raise NotImplementedError(
                f"window_size={tuple(window_size)!r}: sink tokens (AITER's third window_size entry, "
                "the first keys every query sees besides its window) are not supported; the third "
                "entry must be 0. Learnable sink logits are supported: sink= (or sink_ptr=)")
        return tuple(window_size[:2])
    return window_size


def _write_out(out, result):
    """Copy result into the caller's out (same shape, dtype and device) and return out."""
    if out.shape != result.shape or out.dtype != result.dtype or out.device != result.device:
        raise ValueError(f"out must be {result.dtype} of shape {tuple(result.shape)} on {result.device}, "
                         f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}")
    return out.copy_(result)


def _attn_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    from . import reference

    if q.dtype != torch.float8_e4m3fn:  # the reference dequantizes FP8 in float64 itself
        q, k, v = q.double(), k.double(), v.double()
    with torch.no_grad():
        _, _, probs = reference.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)
    out = q.new_zeros((len(probs), q.shape[1], max_seqlen_q, max_seqlen_k), dtype=torch.float32)
    for b, p in enumerate(probs):
        out[b, :, : p.shape[1], : p.shape[2]] = p
    return out


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    *args, **kwargs):
    """As ``flash_attn_varlen_func`` with kv (N_k, 2, Hk, D) packed."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, *args, **kwargs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kwargs):
    """As ``flash_attn_varlen_func`` with qkv (N, 3, H, D) packed (self-attention)."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, *args, **kwargs)


# ---------------------------------------------------------------- fixed length (B, S, H, D)


def _check_fixed(name, t, batch=None):
    if t.dim() != 4:
        raise ValueError(f"flash_attn_func: {name} must be (batch, seqlen, nheads, headdim), got shape "
                         f"{tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"flash_attn_func: {name} must have q's batch size {batch}, got shape "
                         f"{tuple(t.shape)}")


def _rows(t):
    """(B, S, H, D) -> (B*S, H, D): a view whenever the batch and sequence dims merge (as for a
    contiguous tensor or a slice of a packed qkv / kv); reshape copies only otherwise."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


def flash_attn_func(q, k, v, dropout_p=0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                    **kwargs):
    """flash-attn's fixed-length attention: every sequence of the batch has the full length.

    q (B, S_q, H, D), k (B, S_k, Hk, D), v (B, S_k, Hk, Dv) -> out (B, S_q, H, Dv); with
    ``return_attn_probs=True``, ``(out, softmax_lse (B, H, S_q) float32, attn_probs
    (B, H, S_q, S_k))`` as flash-attn returns ``(out, softmax_lse, S_dmask)``; attn_probs is
    ``flash_attn_varlen_func``'s (the weights after masking and dropout, from the float64
    reference: for tests only), not flash-attn's sign-encoded S_dmask. The options and their
    semantics are ``varlen_attention``'s (causal aligned bottom-right when S_q != S_k).
    ``kwargs``: the keyword-only options of ``flash_attn_varlen_func`` (``sink``, ``backend``,
    ``rng_state``, FP8 descales, ...).

    This is one varlen call, with no copy of q, k or v: (B, S, H, D) is viewed as
    (B*S, H, D) and ``cu_seqlens = [0, S, 2S, ..., B*S]`` (an arange on q's device). out is a
    view of the op's output, softmax_lse a (B, H, S_q) view of its (H, B*S_q) lse.
    """
    _check_fixed("q", q)
    _check_fixed("k", k, q.shape[0])
    _check_fixed("v", v, q.shape[0])
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    cu = lambda s: torch.arange(0, (batch + 1) * s, s, dtype=torch.int32, device=q.device)  # noqa: E731
    result = flash_attn_varlen_func(
        _rows(q), _rows(k), _rows(v), cu(seqlen_q), cu(seqlen_k), seqlen_q, seqlen_k,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_lse=return_attn_probs, return_attn_probs=return_attn_probs, **kwargs,
    )
    out = (result[0] if return_attn_probs else result).view(batch, seqlen_q, nheads, -1)
    if not return_attn_probs:
        return out
    lse = result[1].view(nheads, batch, seqlen_q).transpose(0, 1)
    return out, lse, result[2]


def flash_attn_kvpacked_func(q, kv, *args, **kwargs):
    """As ``flash_attn_func`` with kv (B, S_k, 2, Hk, D) packed (k and v are views of it)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_attn_kvpacked_func: kv must be (batch, seqlen_k, 2, nheads_k, headdim), "
                         f"got shape {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], *args, **kwargs)


def flash_attn_qkvpacked_func(qkv, *args, **kwargs):
    """As ``flash_attn_func`` with qkv (B, S, 3, H, D) packed (self-attention; views of it)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attn_qkvpacked_func: qkv must be (batch, seqlen, 3, nheads, headdim), "
                         f"got shape {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], *args, **kwargs)


# ---------------------------------------------------------------- KV-cache decoding


def _rotary(x, cos, sin, interleaved):
    """flash-attn's rotary embedding of the first ``2 * cos.shape[-1]`` dims of x (B, S, H, D)
    with cos / sin (B, S, rotary_dim / 2) gathered at each token's position, in float32
    (float64 for float64 x). interleaved (GPT-J): pairs (0, 1), (2, 3), ...; else (GPT-NeoX)
    halves (i, i + rotary_dim/2)."""
    rd = 2 * cos.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_ro, x_pass = x[..., :rd].to(acc), x[..., rd:]
    cos, sin = cos[:, :, None].to(acc), sin[:, :, None].to(acc)
    if interleaved:
        x1, x2 = x_ro[..., 0::2], x_ro[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
    else:
        x1, x2 = x_ro.chunk(2, -1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)
    return torch.cat((rotated.to(x.dtype), x_pass), -1)


def _rotary_at(x, rotary_cos, rotary_sin, positions, interleaved):
    torch._assert_async((positions < rotary_cos.shape[0]).all(),
                        "kvcache: rotary_cos / rotary_sin must have a row for every rotated position "
                        "(cache_seqlens + seqlen_new tokens)")
    # clamped so that a bad position never reads outside the tables (the assert reports it)
    positions = positions.clamp(0, max(rotary_cos.shape[0] - 1, 0))
    return _rotary(x, rotary_cos[positions], rotary_sin[positions], interleaved)


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
    return_softmax_lse=False, *, sink=None, backend=None,
):
    """flash-attn 2's KV-cache attention (decoding): append k, v to the caches in place, then
    attend q to each sequence's cached keys.

    q (B, S_q, H, D); k_cache (B_c, S_c, Hk, D) and v_cache (B_c, S_c, Hk, Dv), or paged
    (num_blocks, block_size, Hk, D) with ``block_table`` int32 (B, max_blocks) (block_size a
    multiple of 16). ``cache_seqlens``: int or int32 (B,), the tokens already in each sequence's
    cache (None: the whole cache, S_c or max_blocks * block_size). ``k`` (B, S_new, Hk, D) /
    ``v`` (B, S_new, Hk, Dv), optional: written into the caches in place at positions
    ``cache_seqlens[b] .. cache_seqlens[b] + S_new - 1`` (``torch.ops.varlen.kvcache_append``,
    whose schema declares the mutation); cache_seqlens itself is not updated. Sequence b then
    attends to its cache positions ``[cache_leftpad[b], cache_seqlens[b] + S_new)`` (leftpad
    default 0) as ``varlen_attention`` with Lq = S_q and Lk = that count: causal / window are
    bottom-right aligned (the queries are the last S_q tokens), as are ALiBi distances.
    ``cache_batch_idx`` int32 (B,): sequence b uses cache row cache_batch_idx[b] (default b).
    ``rotary_cos`` / ``rotary_sin`` (seqlen_ro, rotary_dim / 2): rotary embedding of the first
    rotary_dim dims of k at its positions cache_seqlens[b] + i, and of q at cache_seqlens[b] + i
    when causal or windowed, else at cache_seqlens[b] for every query (flash-attn's rule);
    ``rotary_interleaved`` True pairs dims (0, 1), (2, 3), ... (GPT-J), False pairs i and
    i + rotary_dim / 2 (GPT-NeoX). ``num_splits``: split-KV on CUDA (0 = heuristic, see
    ``varlen_attention``). ``sink`` (H,) and ``backend``: as in ``varlen_attention``.

    Returns out (B, S_q, H, Dv), and softmax_lse (B, H, S_q) float32 with
    ``return_softmax_lse=True``. Forward only (no backward). Bad values (cache_seqlens + S_new
    beyond the cache, block ids out of range, cache_batch_idx out of range, cache_leftpad
    outside [0, cache_seqlens]) raise a RuntimeError on the CPU and a device-side assert on
    CUDA; nothing syncs with the host, so a decode step runs inside a CUDA graph.
    ``cache_batch_idx`` and ``cache_leftpad`` need a contiguous (not paged) cache, as in
    flash-attn.
    """
    if q.dim() != 4:
        raise ValueError(f"flash_attn_with_kvcache: q must be (batch, seqlen_q, nheads, headdim), got "
                         f"shape {tuple(q.shape)}")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: give both k and v (the new tokens), or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: give both rotary_cos and rotary_sin, or neither")
    paged = block_table is not None
    if paged and cache_batch_idx is not None:
        raise ValueError("flash_attn_with_kvcache: cache_batch_idx is not supported with a block_table "
                         "(as in flash-attn): index the block_table's rows instead")
    if paged and cache_leftpad is not None:
        raise ValueError("flash_attn_with_kvcache: cache_leftpad is not supported with a block_table "
                         "(as in flash-attn)")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"flash_attn_with_kvcache: k_cache / v_cache must be 4-D, got shapes "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    batch, seqlen_q, nheads, _ = q.shape
    device = q.device
    if paged and (block_table.dim() != 2 or block_table.dtype != torch.int32):
        raise ValueError(f"flash_attn_with_kvcache: block_table must be int32 (batch, max_blocks), got "
                         f"{block_table.dtype} of shape {tuple(block_table.shape)}")
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    seqlen_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: cache_seqlens is required with k, v (it gives "
                             "the positions they are written at)")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
                    ("cache_leftpad", cache_leftpad)):
        if t is not None and (t.dtype != torch.int32 or tuple(t.shape) != (batch,) or t.device != device):
            raise ValueError(f"flash_attn_with_kvcache: {name} must be int32 of shape ({batch},) on q's "
                             f"device {device}, got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    torch._assert_async(((cache_seqlens >= 0) & (cache_seqlens + seqlen_new <= capacity)).all(),
                        "kvcache: cache_seqlens + seqlen_new must be <= the cache's capacity (seqlen_cache, "
                        "or max_blocks * block_size with a block_table)")
    if cache_leftpad is not None:
        torch._assert_async(((cache_leftpad >= 0) & (cache_leftpad <= cache_seqlens)).all(),
                            "kvcache: cache_leftpad must be in [0, cache_seqlens]")
    if cache_batch_idx is not None:
        torch._assert_async(((cache_batch_idx >= 0) & (cache_batch_idx < k_cache.shape[0])).all(),
                            "kvcache: cache_batch_idx must be in [0, k_cache.shape[0])")
    window_left, window_right = _window(causal, _aiter_window(window_size))
    if rotary_cos is not None:
        start = cache_seqlens.to(torch.int64)[:, None]
        if window_left >= 0 or window_right >= 0:  # causal or local: each query at its position
            pos_q = start + torch.arange(seqlen_q, device=device)
        else:
            pos_q = start.expand(batch, seqlen_q)
        q = _rotary_at(q, rotary_cos, rotary_sin, pos_q, rotary_interleaved)
        if k is not None:
            k = _rotary_at(k, rotary_cos, rotary_sin, start + torch.arange(seqlen_new, device=device),
                           rotary_interleaved)
    if k is not None:
        _ops.kvcache_append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
    lengths = cache_seqlens + seqlen_new
    if cache_leftpad is not None:
        lengths = lengths - cache_leftpad
    lengths = lengths.to(torch.int32)
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    if paged:
        keys, values, cu_k, starts = k_cache, v_cache, _paged_cu_seqlens_k(None, lengths), None
    else:
        # (B_c * S_c, Hk, D) views of the caches (a copy only for caches whose first two dims do
        # not merge); sequence b reads rows starts[b] .. starts[b] + lengths[b] - 1. Its
        # cu_seqlens_k are all zeros: with seqused_k the lengths come from seqused_k, and the
        # starts (cu_seqlens_k_padded) need then only lie inside the cache, in any order.
        s_c = k_cache.shape[1]
        keys = k_cache.reshape(k_cache.shape[0] * s_c, *k_cache.shape[2:])
        values = v_cache.reshape(v_cache.shape[0] * s_c, *v_cache.shape[2:])
        rows = torch.arange(batch, device=device) if cache_batch_idx is None else cache_batch_idx.to(torch.int64)
        starts = rows * s_c
        if cache_leftpad is not None:
            starts = starts + cache_leftpad
        starts = torch.nn.functional.pad(starts.to(torch.int32), (0, 1))  # (B+1,): the last unused
        cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    # GQA packing (decoding): with one query per sequence, the G = H / Hk query heads of a kv
    # head become G query rows of one sequence under that kv head, so each kv head's keys are
    # read once, not G times. Exact when every row sees the same keys with the same scores: one
    # query (a causal or right window keeps all Lk keys), no left window, no per-head ALiBi
    # slope or sink. Shapes decide it, so a captured or compiled step keeps one path.
    head_dim, nheads_k = q.shape[-1], k_cache.shape[2]
    group = nheads // nheads_k if nheads % nheads_k == 0 else 1
    packed = seqlen_q == 1 and group > 1 and window_left < 0 and alibi_slopes is None and sink is None
    if packed:
        q_rows = q.reshape(batch, nheads_k, group, head_dim).transpose(1, 2).reshape(-1, nheads_k, head_dim)
        cu_q, rows_q, window_right = cu_q * group, group, -1
    else:
        q_rows, rows_q = q.reshape(batch * seqlen_q, nheads, head_dim), seqlen_q
    out, lse = _ops.attention_forward(
        q_rows, keys, values, cu_q, cu_k, rows_q,
        capacity, float(softmax_scale), window_left, window_right, float(softcap), alibi_slopes,
        None, starts, backend=backend if backend is not None else _default_backend, sink=sink,
        block_table=block_table, seqused_k=lengths, num_splits=int(num_splits),
    )
    if packed:  # rows (b, g) of kv head j -> query head j * G + g
        out = out.view(batch, group, nheads_k, out.shape[-1]).transpose(1, 2)
        lse = lse.view(nheads_k, batch, group).permute(1, 0, 2)
    else:
        lse = lse.view(nheads, batch, seqlen_q).transpose(0, 1)
    out = out.reshape(batch, seqlen_q, nheads, out.shape[-1])
    if not return_softmax_lse:
        return out
    return out, lse.reshape(batch, nheads, seqlen_q)
