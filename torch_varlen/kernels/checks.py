"""Device-side checks of cu_seqlens values for the CUDA attention launchers, with no host sync.

The CPU kernel reads cu_seqlens on the host and raises (``check_cu_values`` in
_C/cpu/attention.cpp). A CUDA launcher cannot read them without a sync, and the ops run inside
CUDA graphs and compiled steps, so ``check_cu_seqlens`` launches one small program that checks
the same conditions with ``tl.device_assert``, on the stream, before the attention kernels:

- ``cu_seqlens_*[0] == 0`` and ``cu_seqlens_*`` non-decreasing;
- without ``cu_seqlens_*_padded``: ``cu_seqlens_*[-1] <= total`` (the rows of q / k);
- with it: each sequence b starts at or after the end of the previous non-empty one (and at
  or after 0), and its rows ``[start_b, start_b + length_b)`` end inside the buffer.

Messages are the CPU's text without the values (a device assert's message is a string
constant), so one regex matches both devices, e.g. CPU "cu_seqlens_q must be non-decreasing,
got 2 then 1 at index 2", CUDA "cu_seqlens_q must be non-decreasing".

On a GPU a failed assert prints "... Assertion `<message>` failed." to the process's stderr
and leaves its CUDA context unusable ("device-side assert triggered" at the next sync). Under
``TRITON_INTERPRET=1`` (CPU tensors, CI) the call raises RuntimeError(<message>), as the CPU
kernel does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK = 1024  # cu_seqlens entries per loop step: one step for up to 1023 sequences


def _messages(side: str) -> dict:
    """The device-assert messages for cu_seqlens_<side> (side "q" or "k")."""
    cu = f"cu_seqlens_{side}"
    return dict(
        MSG_START=f"{cu} must start at 0",
        MSG_ORDER=f"{cu} must be non-decreasing",
        MSG_LAST=f"{cu}[-1] must be <= {side}.shape[0] (the rows of {side})",
        MSG_PAD_ORDER=(f"{cu}_padded[b] must be >= 0 and >= the end of the previous sequence: "
                       "sequences must be in order and must not overlap"),
        MSG_PAD_ROWS=f"{cu}_padded: sequence b occupies rows [start, start + length) beyond {side}.shape[0]",
    )


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _check_side(CU, START, total, n, PADDED: tl.constexpr, BLOCK: tl.constexpr,
                MSG_START: tl.constexpr, MSG_ORDER: tl.constexpr, MSG_LAST: tl.constexpr,
                MSG_PAD_ORDER: tl.constexpr, MSG_PAD_ROWS: tl.constexpr):
    """Checks cu_seqlens CU (n entries) of a buffer of `total` rows; START: the padded starts
    (PADDED) or unused. Values are widened to int64 so that no sum overflows."""
    first = tl.load(CU).to(tl.int64)
    tl.device_assert(first == 0, MSG_START)
    # Largest end of the non-empty sequences before the current block (0 at first): a start
    # below it overlaps an earlier sequence. (While every check passes, this running maximum
    # is the end of the previous non-empty sequence, which the CPU kernel compares with.)
    prev_end = first * 0
    for c in range(0, n, BLOCK):
        idx = c + tl.arange(0, BLOCK)
        inb = idx < n
        has_prev = inb & (idx > 0)
        cur = tl.load(CU + idx, mask=inb, other=0).to(tl.int64)
        prev = tl.load(CU + idx - 1, mask=has_prev, other=0).to(tl.int64)
        tl.device_assert(~has_prev | (cur >= prev), MSG_ORDER)
        if PADDED:
            seq = idx < n - 1  # sequence idx: physical start START[idx], length CU[idx+1] - CU[idx]
            start = tl.load(START + idx, mask=seq, other=0).to(tl.int64)
            length = tl.load(CU + idx + 1, mask=seq, other=0).to(tl.int64) - cur
            # the end of sequence idx - 1 (0 when it is empty), then the largest of those up to idx
            start_prev = tl.load(START + idx - 1, mask=has_prev, other=0).to(tl.int64)
            end_prev = tl.where(has_prev & (cur > prev), start_prev + (cur - prev), 0)
            before = tl.maximum(tl.associative_scan(end_prev, 0, _max_combine), prev_end)
            tl.device_assert(~seq | (start >= before), MSG_PAD_ORDER)
            tl.device_assert(~seq | (start + length <= total), MSG_PAD_ROWS)
            end = tl.where(seq & (length > 0), start + length, 0)
            prev_end = tl.maximum(prev_end, tl.max(end, 0))
        else:
            tl.device_assert(~inb | (idx != n - 1) | (cur <= total), MSG_LAST)


@triton.jit(debug=True, do_not_specialize=["total_q", "total_k", "n"])
def _check_cu_seqlens_kernel(CU_Q, CU_K, START_Q, START_K, total_q, total_k, n,
                             PADDED_Q: tl.constexpr, PADDED_K: tl.constexpr, BLOCK: tl.constexpr,
                             Q_MSG_START: tl.constexpr, Q_MSG_ORDER: tl.constexpr,
                             Q_MSG_LAST: tl.constexpr, Q_MSG_PAD_ORDER: tl.constexpr,
                             Q_MSG_PAD_ROWS: tl.constexpr, K_MSG_START: tl.constexpr,
                             K_MSG_ORDER: tl.constexpr, K_MSG_LAST: tl.constexpr,
                             K_MSG_PAD_ORDER: tl.constexpr, K_MSG_PAD_ROWS: tl.constexpr):
    """One program checks cu_seqlens_q and cu_seqlens_k (n = batch + 1 entries each).

    PADDED_Q / PADDED_K: START_Q / START_K hold cu_seqlens_*_padded (else they are unused);
    BLOCK: entries per loop step; *_MSG_*: the assert messages (see _messages).
    ``debug=True`` compiles the asserts in (Triton drops them otherwise).
    """
    _check_side(CU_Q, START_Q, total_q, n, PADDED_Q, BLOCK, Q_MSG_START, Q_MSG_ORDER, Q_MSG_LAST,
                Q_MSG_PAD_ORDER, Q_MSG_PAD_ROWS)
    _check_side(CU_K, START_K, total_k, n, PADDED_K, BLOCK, K_MSG_START, K_MSG_ORDER, K_MSG_LAST,
                K_MSG_PAD_ORDER, K_MSG_PAD_ROWS)


_MESSAGES = {**{f"Q_{k}": v for k, v in _messages("q").items()},
             **{f"K_{k}": v for k, v in _messages("k").items()}}


@contextlib.contextmanager
def _interpreter_debug():
    """The interpreter ignores ``triton.jit(debug=True)`` (its one builder keeps debug off, so
    every device_assert is a no-op): switch it on for this launch only, and raise a failed
    assert as RuntimeError(<message>) instead of nested InterpreterErrors."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    saved = builder.options
    builder.options = dataclasses.replace(saved, debug=True)
    try:
        yield
    except Exception as e:  # noqa: BLE001  (look for the assert under the interpreter's wrappers)
        cause = e
        while cause is not None and not isinstance(cause, AssertionError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise RuntimeError(str(cause)) from e
    finally:
        builder.options = saved


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded, cu_seqlens_k_padded,
                     total_q: int, total_k: int) -> None:
    """Launch the value checks of cu_seqlens_q / _k (and their _padded starts) against buffers
    of total_q / total_k rows. Shapes, dtypes and devices must already be checked
    (meta/attention.py check_attention_shapes). Asynchronous: never syncs with the host."""
    padded_q, padded_k = cu_seqlens_q_padded is not None, cu_seqlens_k_padded is not None
    args = (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
            (cu_seqlens_q_padded if padded_q else cu_seqlens_q).contiguous(),
            (cu_seqlens_k_padded if padded_k else cu_seqlens_k).contiguous(),
            int(total_q), int(total_k), cu_seqlens_q.shape[0])
    device = torch.cuda.device(cu_seqlens_q.device) if cu_seqlens_q.is_cuda else contextlib.nullcontext()
    debug = _interpreter_debug() if _INTERPRET else contextlib.nullcontext()
    with device, debug:
        _check_cu_seqlens_kernel[(1,)](*args, PADDED_Q=padded_q, PADDED_K=padded_k, BLOCK=_BLOCK,
                                       num_warps=4, **_MESSAGES)


# ---------------------------------------------------------------- paged KV / seqused_k

# The device-assert messages; the CPU kernel's (gather_keys in _C/cpu/attention.cpp) start
# with the same text and add the values.
KV_MESSAGES = dict(
    MSG_NEG="seqused_k must be >= 0",
    MSG_ROWS="seqused_k: a sequence's keys [start, start + seqused_k) lie beyond k.shape[0]",
    MSG_CAP="paged KV: a sequence's key count exceeds the block_table's capacity max_blocks * block_size",
    MSG_BLOCK="paged KV: block_table holds a block id outside [0, num_blocks)",
)


@triton.jit(debug=True, do_not_specialize=["max_blocks", "num_blocks", "block_size", "total_k",
                                           "stride_btb", "stride_btm"])
def _check_kv_lengths_kernel(CU_K, SEQUSED, START, BT, stride_btb, stride_btm, max_blocks,
                             num_blocks, block_size, total_k, HAS_SEQUSED: tl.constexpr,
                             PAGED: tl.constexpr, BLOCK: tl.constexpr, MSG_NEG: tl.constexpr,
                             MSG_ROWS: tl.constexpr, MSG_CAP: tl.constexpr, MSG_BLOCK: tl.constexpr):
    """One program per sequence b, whose key count is Lk = SEQUSED[b] (HAS_SEQUSED) or
    CU_K[b+1] - CU_K[b]: Lk >= 0; PAGED: Lk <= max_blocks * block_size and the block ids
    BT[b, :ceil(Lk / block_size)] in [0, num_blocks); else the rows [START[b], START[b] + Lk)
    inside [0, total_k). BLOCK: block table entries per loop step; MSG_*: KV_MESSAGES."""
    b = tl.program_id(0).to(tl.int64)
    if HAS_SEQUSED:
        length = tl.load(SEQUSED + b).to(tl.int64)
    else:
        length = tl.load(CU_K + b + 1).to(tl.int64) - tl.load(CU_K + b).to(tl.int64)
    tl.device_assert(length >= 0, MSG_NEG)
    if PAGED:
        capacity = max_blocks.to(tl.int64) * block_size
        tl.device_assert(length <= capacity, MSG_CAP)
        used = (tl.minimum(length, capacity) + block_size - 1) // block_size
        for c in range(0, max_blocks, BLOCK):
            idx = c + tl.arange(0, BLOCK)
            m = idx < used
            ids = tl.load(BT + b * stride_btb + idx * stride_btm, mask=m, other=0)
            tl.device_assert(~m | ((ids >= 0) & (ids < num_blocks)), MSG_BLOCK)
    else:
        start = tl.load(START + b).to(tl.int64)
        tl.device_assert((start >= 0) & (start + length <= total_k), MSG_ROWS)


def check_kv_lengths(cu_seqlens_k, seqused_k, starts, block_table, num_blocks: int,
                     block_size: int, total_k: int) -> None:
    """Launch the value checks of paged KV (block_table) or seqused_k: every sequence's key
    count is >= 0 and its keys lie in the cache (paged: within the block table, whose used
    entries are valid block ids) or in k's rows from ``starts[b]`` (packed). Shapes must already
    be checked (meta/attention.py check_paged_kv). Asynchronous: never syncs with the host."""
    batch = cu_seqlens_k.shape[0] - 1
    if batch <= 0:
        return
    paged = block_table is not None
    bt = block_table if paged else cu_seqlens_k
    device = torch.cuda.device(cu_seqlens_k.device) if cu_seqlens_k.is_cuda else contextlib.nullcontext()
    debug = _interpreter_debug() if _INTERPRET else contextlib.nullcontext()
    with device, debug:
        _check_kv_lengths_kernel[(batch,)](
            cu_seqlens_k.contiguous(), (seqused_k if seqused_k is not None else cu_seqlens_k).contiguous(),
            starts, bt, bt.stride(0) if paged else 0, bt.stride(1) if paged else 0,
            block_table.shape[1] if paged else 0, int(num_blocks), int(block_size), int(total_k),
            HAS_SEQUSED=seqused_k is not None, PAGED=paged, BLOCK=128, num_warps=1, **KV_MESSAGES)
