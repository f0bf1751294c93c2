"""Triton varlen attention, forward and backward: the CUDA kernels of torch.ops.varlen.attention_*.

Semantics are reference.attention's (DESIGN.md "Semantics"). Layout: q (total_q, H, D),
k (total_k, Hk, D), v (total_k, Hk, Dv), any strides; cu_seqlens int32 (batch+1,).

Launch without host sync (DESIGN.md rule 4). A kernel over query tiles of BLOCK_M rows gives
sequence b the tile ids ``g(b) .. g(b+1)-1`` with ``g(b) = cu_seqlens_q[b] // BLOCK_M + b``:
since ``g(b+1) - g(b) >= ceil(L_b / BLOCK_M)`` every tile of b has an id, and
``g(batch) <= cdiv(total_q, BLOCK_M) + batch``, so the grid ``cdiv(total_q, BLOCK_M) + batch``
(an upper bound known from shapes alone) covers every tile. Each program finds its sequence by
counting the b with ``g(b) <= program id`` (one vector load of cu_seqlens) and exits when its
tile lies past the sequence's end. Programs past ``g(batch)`` zero the rows after the last
sequence (when there is no ``cu_seqlens_*_padded``; with it the outputs start zeroed), so rows
outside every sequence give out 0, lse -inf and zero gradients. ``max_seqlen`` is not used.

Key blocks that the window (causal = window_right 0) hides from a whole query tile are never
visited; blocks that it hides from none of the tile's rows run without a mask.

Precision: q.k and p.v take fp16/bf16 operands with float32 accumulation; float32 inputs use
full-precision float32 dots (``input_precision="ieee"``, not tf32), so float32 results are as
accurate as PyTorch's float32 math. float64 inputs compute in float64 throughout (float64
dots, accumulators, softmax statistics, scores and scalars, libdevice exp2/log2; softmax_lse
float64), so gradcheck and the float64 tests run on CUDA too; small tiles, not fast.

Backward: a delta pass (D = rowsum(dO * O) - dlse), a pass over key tiles that accumulates dK
and dV (GQA: over the group's query heads in a fixed order) and a pass over query tiles for dQ.
There are no atomics, so the backward is always bitwise reproducible (``deterministic`` changes
nothing here).

Dropout: keep(head h, packed query row r = cu_seqlens_q[b] + i, key column j) is
``philox(seed, (j, r, h, offset & 0xffffffff))[0] >= threshold`` (_C/philox.h), with seed and
offset loaded in the kernel from the int64 rng_state tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..meta.attention import FP8, FP8_BACKWARD_ERROR, check_attention_shapes, lse_dtype, out_dtype
from ..meta.attention import check_attention_backward_args, check_paged_kv, check_sink
from ..merge import merge_attention_partials
from .checks import check_cu_seqlens, check_kv_lengths

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# float64 exp2/log2 through libdevice (ex2.approx / lg2.approx are float32-only); the
# interpreter has no libdevice (extern calls raise) and runs tl.math's numpy float64 versions.
_F64_LIBDEVICE = tl.constexpr(not _INTERPRET)

# Set by tests: allocate outputs filled with NaN so that a row the kernels fail to write shows.
_poison_outputs = False

LOG2E = 1.4426950408889634
_BLOCK_B = 256  # cu_seqlens entries read per vector load when locating a tile's sequence
_MAX_HEADDIM = 256


# ---------------------------------------------------------------- device helpers


@triton.jit
def _locate_tile(CU, batch, t, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """-> (b, tile index inside b) for tile id t; b == batch for ids past the last sequence.

    BLOCK: rows per tile; BLOCK_B: cu_seqlens entries read per vector load.
    """
    b = t * 0
    for c in range(1, batch + 1, BLOCK_B):
        idx = c + tl.arange(0, BLOCK_B)
        inb = idx <= batch
        g = tl.load(CU + idx, mask=inb, other=0) // BLOCK + idx
        b += tl.sum(((g <= t) & inb).to(tl.int32), 0)
    return b, t - (tl.load(CU + b) // BLOCK + b)


@triton.jit
def _exp2(x):
    """2 ** x in x's dtype: tl.math.exp2 (ex2.approx) for float32, libdevice's exp2 for float64."""
    if x.dtype == tl.float64 and _F64_LIBDEVICE:
        return libdevice.exp2(x)
    else:
        return tl.math.exp2(x)


@triton.jit
def _log2(x):
    """log2(x) in x's dtype: tl.math.log2 for float32, libdevice's log2 for float64."""
    if x.dtype == tl.float64 and _F64_LIBDEVICE:
        return libdevice.log2(x)
    else:
        return tl.math.log2(x)


@triton.jit
def _tanh(x):
    # tanh through exp2, exact at +-inf and within x's dtype's rounding elsewhere.
    return 1.0 - 2.0 / (_exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _scores(qk, ii, jj, off, Lq, Lk, window_left, window_right, scale_log2, softmax_scale, softcap,
            slope_log2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK: tl.constexpr):
    """Scores in log2 units for q.k products qk, query indices ii and key indices jj (any
    broadcastable orientation). Masked entries are -inf.

    HAS_SOFTCAP: apply softcap * tanh(s / softcap); HAS_ALIBI: subtract slope * |i + off - j|;
    MASK: apply the window and the sequence bounds (False for blocks that need no mask).
    """
    if HAS_SOFTCAP:
        s = _tanh(qk * (softmax_scale / softcap)) * (softcap * 1.4426950408889634)
    else:
        s = qk * scale_log2
    if HAS_ALIBI:
        s = s - slope_log2 * tl.abs(ii + off - jj).to(s.dtype)
    if MASK:
        diag = ii + off
        visible = (ii < Lq) & (jj < Lk)
        visible = visible & ((window_left < 0) | (jj >= diag - window_left))
        visible = visible & ((window_right < 0) | (jj <= diag + window_right))
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, offset, head, rows, cols, threshold):
    """Boolean keep mask for packed query rows and key columns (broadcastable int tensors)."""
    shape_zero = (rows + cols) * 0
    c0 = (cols + shape_zero).to(tl.uint32)
    c1 = (rows + shape_zero).to(tl.uint32)
    c2 = (shape_zero + head).to(tl.uint32)
    c3 = (shape_zero + (offset & 0xFFFFFFFF)).to(tl.uint32)
    word, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return word.to(tl.int64) >= threshold.to(tl.int64)


@triton.jit
def _dropout_mask_fwd_kernel(KEEP, RNG, threshold, head, row0, nrows, ncols,
                             BLOCK: tl.constexpr):
    """keep[r, j] for packed rows row0 + r and columns j: exposes _dropout_keep to tests.

    BLOCK: tile edge.
    """
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    r = pid_r * BLOCK + tl.arange(0, BLOCK)
    c = pid_c * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(RNG), tl.load(RNG + 1), head, row0 + r[:, None], c[None, :],
                         threshold)
    tl.store(KEEP + r[:, None] * ncols + c[None, :], keep.to(tl.int8),
             mask=(r[:, None] < nrows) & (c[None, :] < ncols))


@triton.jit
def _block_range(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split [lo, hi) into block starts: masked [start, a), unmasked [a, c), masked [c, hi).

    full_lo/full_hi bound the indices whose whole BLOCK needs no mask.
    """
    start = (tl.maximum(lo, 0) // BLOCK) * BLOCK
    a = tl.minimum(tl.maximum(((full_lo + BLOCK - 1) // BLOCK) * BLOCK, start), hi)
    c = tl.maximum((full_hi // BLOCK) * BLOCK, a)
    c = tl.minimum(c, tl.maximum(hi, a))
    return start, a, c


@triton.jit
def _query_tile_key_blocks(m0, Lq, Lk, window_left, window_right, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Key blocks of the query tile [m0, m0 + BLOCK_M): -> (start, a, c, end), the keys
    [start, end) that any row of the tile may see, split as _block_range does into masked
    [start, a), unmasked [a, c) (every row sees those blocks whole) and masked [c, end)."""
    off = Lk - Lq
    m1 = tl.minimum(m0 + BLOCK_M, Lq)
    lo = 0
    full_lo = 0
    if window_left >= 0:
        lo = tl.maximum(m0 + off - window_left, 0)
        full_lo = m1 - 1 + off - window_left
    hi = Lk
    full_hi = Lk
    if window_right >= 0:
        hi = tl.minimum(m1 + off + window_right, Lk)
        full_hi = tl.minimum(m0 + off + window_right + 1, Lk)
    start, a, c = _block_range(lo, hi, full_lo, full_hi, BLOCK_N)
    return start, a, c, hi


@triton.jit
def _clamp_to_buffer(a, c, row0, total, BLOCK: tl.constexpr):
    """Shrink the unmasked block range [a, c) so that its buffer rows row0 + [a, c) lie inside
    [0, total): then its loads need no row mask even when cu_seqlens are wrong (the blocks cut
    off run in the masked loop after it)."""
    room = tl.maximum(total - row0 - a, 0)
    c2 = tl.minimum(c, a + (room // BLOCK) * BLOCK)
    return tl.where(row0 >= 0, tl.maximum(c2, a), a)


@triton.jit
def _load_rows(ptrs0, rows, total, stride_t, offs_c, NCOLS: tl.constexpr, BLOCK_C: tl.constexpr,
               MASK: tl.constexpr):
    """Rows ``rows`` (int64) of a (total, ...) buffer: ptrs0 + rows * stride_t, columns offs_c.

    NCOLS / BLOCK_C: valid columns and their power of two; MASK: rows may fall outside
    [0, total) (False: the caller guarantees they do not, so only column padding is masked).
    """
    if MASK:
        return tl.load(ptrs0 + rows[:, None] * stride_t,
                       mask=((rows >= 0) & (rows < total))[:, None] & (offs_c[None, :] < NCOLS),
                       other=0.0)
    elif NCOLS == BLOCK_C:
        return tl.load(ptrs0 + rows[:, None] * stride_t)
    else:
        return tl.load(ptrs0 + rows[:, None] * stride_t, mask=offs_c[None, :] < NCOLS, other=0.0)


@triton.jit
def _paged_slots(BT_b, stride_btm, cols, Lk, block_size, max_blocks, num_blocks):
    """Paged KV: (block id, slot in the block, valid) of the logical keys ``cols`` of one
    sequence, whose block table row is BT_b. A key is valid when it is one of the sequence's Lk
    keys and its block id lies in the cache (checks.py asserts that on the device; the mask
    keeps a bad id from ever being read)."""
    valid = (cols >= 0) & (cols < Lk) & (cols < max_blocks * block_size)
    blk = tl.load(BT_b + (cols // block_size) * stride_btm, mask=valid, other=0).to(tl.int64)
    valid = valid & (blk >= 0) & (blk < num_blocks)
    return blk, (cols % block_size).to(tl.int64), valid


@triton.jit
def _paged_tile(BT_b, stride_btm, n, offs_n, block_size, max_blocks, num_blocks):
    """Paged KV, a key tile [n, n + BLOCK_N) inside one cache block (block_size a multiple of
    BLOCK_N, n a multiple of BLOCK_N) and inside the sequence's keys (an unmasked tile):
    (block id, the tile's slots in it). One table read per tile, and contiguous rows, so the
    loads are the packed path's. checks.py asserts the table entry and the key count on the
    device; the clamps only keep a bad entry from ever addressing outside the cache."""
    j = tl.minimum(n // block_size, max_blocks - 1)
    blk = tl.load(BT_b + j * stride_btm).to(tl.int64)
    blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1)
    return blk, (n % block_size + offs_n).to(tl.int64)


@triton.jit
def _sequence_lengths(CU_Q, CU_K, b):
    """(cu_seqlens_q[b], Lq, Lk) of sequence b."""
    row0 = tl.load(CU_Q + b)
    return row0, tl.load(CU_Q + b + 1) - row0, tl.load(CU_K + b + 1) - tl.load(CU_K + b)


@triton.jit
def _store_zero_rows(PTR, rows, total, stride_t, head_off, offs_c, stride_c, NCOLS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Zero rows ``rows`` (int64; those inside [0, total)) of one head (at head_off) of a
    (total, heads, NCOLS) buffer. BLOCK_R / BLOCK_C: rows.shape and offs_c.shape."""
    tl.store(PTR + rows[:, None] * stride_t + head_off + offs_c[None, :] * stride_c,
             tl.zeros((BLOCK_R, BLOCK_C), PTR.dtype.element_ty),
             mask=((rows >= 0) & (rows < total))[:, None] & (offs_c[None, :] < NCOLS))


@triton.jit
def _load_rng(RNG, HAS_DROPOUT: tl.constexpr):
    """(seed, offset) from the int64 rng_state tensor; zeros without dropout."""
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    return seed, rng_offset


@triton.jit
def _alibi_slope_log2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr,
                      ACC: tl.constexpr):
    """ALiBi slope of (sequence b, head h) in log2 units, in the compute dtype ACC; 0 without
    ALiBi."""
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI + b * stride_ab + h * stride_ah).to(ACC) * 1.4426950408889634
    return slope_log2


@triton.jit
def _to_acc(x, ACC: tl.constexpr):
    """A float scalar argument (float64: see _Common.values) in the compute dtype ACC, so that
    float32 kernels compute in float32. tl.full, not x.to(ACC): the interpreter passes Python
    floats."""
    return tl.full((), x, ACC)


# ---------------------------------------------------------------- forward


@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, k_ptrs0, v_ptrs0, K_DESC, V_DESC, desc_col_k,
                         desc_col_v, sk, total_k, n_lo, n_hi,
                         offs_m, offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right,
                         scale_log2, softmax_scale, softcap, slope_log2,
                         seed, rng_offset, threshold, head, row0,
                         stride_kt, stride_vt, BT_b, stride_btm, block_size, max_blocks,
                         num_blocks, stride_kb, stride_vb,
                         HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK: tl.constexpr,
                         USE_TMA: tl.constexpr, P_SCALE: tl.constexpr, PV_WIDE: tl.constexpr,
                         POSITIVE_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         PAGED: tl.constexpr, PAGE_TILE: tl.constexpr):
    """Online softmax over key blocks [n_lo, n_hi) of one query tile (see _attention_fwd_kernel).

    MASK: these blocks need the window / bounds mask; USE_TMA: load K/V blocks through the
    tensor descriptors K_DESC / V_DESC (columns desc_col_*) instead of pointers (unmasked
    blocks only); P_SCALE: P is multiplied by this before its cast to V's dtype (256 for FP8,
    so that probabilities down to 2^-14 stay normal e4m3 numbers; the caller divides it out);
    PV_WIDE: FP8 V is widened to float16 in registers (exactly: e4m3 values are float16
    values) and P @ V runs in float16 (P keeps 10 mantissa bits instead of e4m3's 3; V keeps
    its (total_k, Hk, Dv) layout);
    POSITIVE_SCALE: softmax_scale > 0 (enables the fused unmasked softmax step);
    PAGED: K / V are caches (num_blocks, block_size, ...) read through the block table row
    BT_b: per key in masked blocks; PAGE_TILE (block_size a multiple of BLOCK_N): unmasked
    blocks read one table entry and load contiguous rows without a mask, as the packed path.
    """
    for n in range(n_lo, n_hi, BLOCK_N):
        cols = n + offs_n
        krow = (sk + cols).to(tl.int64)
        if PAGED and PAGE_TILE and not MASK:
            blk, slot = _paged_tile(BT_b, stride_btm, n, offs_n, block_size, max_blocks, num_blocks)
            k = _load_rows(k_ptrs0 + blk * stride_kb, slot, 0, stride_kt, offs_d, HEADDIM, BLOCK_D, False)
        elif PAGED:
            blk, slot, kvalid = _paged_slots(BT_b, stride_btm, cols, Lk, block_size, max_blocks,
                                             num_blocks)
            k = tl.load(k_ptrs0 + (blk * stride_kb + slot * stride_kt)[:, None],
                        mask=kvalid[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)
        elif USE_TMA and not MASK:
            k = K_DESC.load([(sk + n).to(tl.int32), desc_col_k])
        else:
            k = _load_rows(k_ptrs0, krow, total_k, stride_kt, offs_d, HEADDIM, BLOCK_D, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASK or HAS_SOFTCAP or HAS_ALIBI or not POSITIVE_SCALE:
            s = _scores(qk, offs_m[:, None], cols[None, :], off, Lq, Lk, window_left,
                        window_right, scale_log2, softmax_scale, softcap, slope_log2, HAS_SOFTCAP,
                        HAS_ALIBI, MASK)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new) if MASK else m_new
            p = _exp2(s - m_new_safe[:, None])
        else:
            # Plain scores: max(qk) * scale is the max of the scaled scores (scale > 0), and the
            # scaling and max subtraction fuse into one FMA per score.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_new_safe = m_new
            p = _exp2(qk * scale_log2 - m_new[:, None])
        alpha = _exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, head, row0 + offs_m[:, None], cols[None, :],
                                 threshold)
            p = tl.where(keep, p, 0.0)
        if PAGED and PAGE_TILE and not MASK:
            v = _load_rows(v_ptrs0 + blk * stride_vb, slot, 0, stride_vt, offs_dv, HEADDIM_V, BLOCK_DV, False)
        elif PAGED:
            v = tl.load(v_ptrs0 + (blk * stride_vb + slot * stride_vt)[:, None],
                        mask=kvalid[:, None] & (offs_dv[None, :] < HEADDIM_V), other=0.0)
        elif USE_TMA and not MASK:
            v = V_DESC.load([(sk + n).to(tl.int32), desc_col_v])
        else:
            v = _load_rows(v_ptrs0, krow, total_k, stride_vt, offs_dv, HEADDIM_V, BLOCK_DV, MASK)
        if PV_WIDE:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
        else:
            if P_SCALE != 1.0:
                p = p * P_SCALE
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["window_left", "window_right", "threshold", "total_q", "total_k", "batch",
                               "max_blocks", "num_blocks", "stride_btb", "num_splits"])
def _attention_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, START_Q, START_K, ALIBI, RNG, K_DESC, V_DESC,
    Q_DESCALE, K_DESCALE, V_DESCALE, SINK, BT,
    softmax_scale: tl.float64, softcap: tl.float64, window_left, window_right,
    dropout_scale: tl.float64, threshold, total_q, total_k, batch, group,
    stride_btb, stride_btm, block_size, max_blocks, num_blocks, stride_kb, stride_vb,
    stride_os, stride_ls, num_splits,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
    stride_lh, stride_ab, stride_ah, stride_qdb, stride_qdh, stride_kdb, stride_kdh,
    stride_vdb, stride_vdh,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_DESCALE: tl.constexpr, USE_TMA: tl.constexpr, REVERSE: tl.constexpr,
    P_SCALE: tl.constexpr, PV_WIDE: tl.constexpr, POSITIVE_SCALE: tl.constexpr,
    ZERO_TAIL: tl.constexpr, HAS_SINK: tl.constexpr, PAGED: tl.constexpr,
    PAGE_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One (query tile, query head) per program.

    HEADDIM / HEADDIM_V: head dims of q,k / v; BLOCK_D / BLOCK_DV: those rounded up to powers
    of two; BLOCK_M / BLOCK_N: query rows / key columns per tile; BLOCK_B: see _locate_tile;
    HAS_SOFTCAP / HAS_ALIBI / HAS_DROPOUT: features on; HAS_DESCALE: FP8 inputs with descale
    factors Q/K/V_DESCALE indexed (sequence, kv head) through their strides (0 for per-tensor);
    USE_TMA: unmasked K/V blocks load through K_DESC / V_DESC, 2-D descriptors over
    (total_k, nheads_k * headdim); REVERSE: a sequence's last query tile runs first (with a
    causal window it has the most keys); P_SCALE, PV_WIDE, POSITIVE_SCALE: see
    _attention_fwd_inner (with descales the kernel makes the latter hold by flipping q's sign);
    ZERO_TAIL: zero the rows after the last sequence (no cu_seqlens_q_padded); HAS_SINK: SINK
    (nheads,) holds learnable sink logits that join each row's denominator; DOT_PRECISION:
    tl.dot input_precision; ACC: compute dtype of accumulators, softmax statistics, scores and
    the float scalars (float64 for float64 inputs, else float32); PAGED: K / V are caches
    (num_blocks, block_size, nheads_k, d) with strides stride_kb / stride_vb over blocks, key j
    of sequence b at block BT[b, j // block_size] (block table strides stride_btb, stride_btm);
    PAGE_TILE: block_size is a multiple of BLOCK_N (see _attention_fwd_inner).

    Split-KV: program_id(2) is the split s of num_splits: the program visits only the key
    blocks in [s * chunk, (s + 1) * chunk), chunk = the sequence's key blocks / num_splits
    (rounded up, whole blocks), and writes its partial (out, lse) at OUT + s * stride_os,
    LSE + s * stride_ls; the sink joins split 0 only. The launcher merges the partials by lse.
    """
    softmax_scale = _to_acc(softmax_scale, ACC)
    softcap = _to_acc(softcap, ACC)
    dropout_scale = _to_acc(dropout_scale, ACC)
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    OUT += split.to(tl.int64) * stride_os
    LSE += split.to(tl.int64) * stride_ls
    hk = h // group
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b, mt = _locate_tile(CU_Q, batch, t, BLOCK_M, BLOCK_B)
    if b >= batch:
        if ZERO_TAIL:
            rows = (tl.load(CU_Q + batch) + mt * BLOCK_M + offs_m).to(tl.int64)
            _store_zero_rows(OUT, rows, total_q, stride_ot, h * stride_oh, offs_dv, stride_od,
                             HEADDIM_V, BLOCK_M, BLOCK_DV)
            tl.store(LSE + h * stride_lh + rows, tl.full((BLOCK_M,), float("-inf"), ACC),
                     mask=(rows >= 0) & (rows < total_q))
        return
    row0, Lq, Lk = _sequence_lengths(CU_Q, CU_K, b)
    m0 = mt * BLOCK_M
    if m0 >= Lq:
        return
    if REVERSE:
        m0 = (tl.cdiv(Lq, BLOCK_M) - 1 - mt) * BLOCK_M
    sq = tl.load(START_Q + b)
    sk = tl.load(START_K + b)
    off = Lk - Lq
    offs_m = m0 + offs_m  # logical query index inside the sequence
    qrow = (sq + offs_m).to(tl.int64)
    qin = (offs_m < Lq) & (qrow >= 0) & (qrow < total_q)
    q = tl.load(Q + qrow[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=qin[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)

    if HAS_DESCALE:
        softmax_scale = softmax_scale * (tl.load(Q_DESCALE + b * stride_qdb + hk * stride_qdh)
                                         * tl.load(K_DESCALE + b * stride_kdb + hk * stride_kdh))
        if softmax_scale < 0:
            # Keep the scale positive (POSITIVE_SCALE): flip q's sign bit instead, exactly.
            q = (q.to(tl.uint8, bitcast=True) ^ 0x80).to(q.dtype, bitcast=True)
            softmax_scale = -softmax_scale
    scale_log2 = softmax_scale * 1.4426950408889634
    slope_log2 = _alibi_slope_log2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI, ACC)
    seed, rng_offset = _load_rng(RNG, HAS_DROPOUT)

    n_start, n_a, n_c, n_end = _query_tile_key_blocks(m0, Lq, Lk, window_left, window_right, BLOCK_M,
                                                      BLOCK_N)
    if not PAGED:
        n_c = _clamp_to_buffer(n_a, n_c, sk, total_k, BLOCK_N)
    # split-KV: this split's whole key blocks [s_lo, s_hi); every range boundary clamped to it
    chunk = tl.cdiv(tl.cdiv(Lk, BLOCK_N), num_splits) * BLOCK_N
    s_lo = split * chunk
    s_hi = tl.minimum(s_lo + chunk, tl.maximum(n_end, s_lo))
    n_start = tl.minimum(tl.maximum(n_start, s_lo), s_hi)
    n_a = tl.minimum(tl.maximum(n_a, s_lo), s_hi)
    n_c = tl.minimum(tl.maximum(n_c, s_lo), s_hi)
    n_end = tl.minimum(tl.maximum(n_end, s_lo), s_hi)
    bt_b = BT + b.to(tl.int64) * stride_btb

    k_ptrs0 = K + hk * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs0 = V + hk * stride_vh + offs_dv[None, :] * stride_vd
    col_k = (hk * HEADDIM).to(tl.int32)
    col_v = (hk * HEADDIM_V).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_ptrs0, v_ptrs0, K_DESC, V_DESC, col_k, col_v, sk, total_k, n_start,
        n_a, offs_m, offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2,
        softmax_scale, softcap, slope_log2, seed, rng_offset, threshold, h, row0, stride_kt,
        stride_vt, bt_b, stride_btm, block_size, max_blocks, num_blocks, stride_kb, stride_vb,
        HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI,
        HAS_DROPOUT, True, USE_TMA, P_SCALE, PV_WIDE, POSITIVE_SCALE, DOT_PRECISION, PAGED, PAGE_TILE)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_ptrs0, v_ptrs0, K_DESC, V_DESC, col_k, col_v, sk, total_k, n_a,
        n_c, offs_m, offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2,
        softmax_scale, softcap, slope_log2, seed, rng_offset, threshold, h, row0, stride_kt,
        stride_vt, bt_b, stride_btm, block_size, max_blocks, num_blocks, stride_kb, stride_vb,
        HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI,
        HAS_DROPOUT, False, USE_TMA, P_SCALE, PV_WIDE, POSITIVE_SCALE, DOT_PRECISION, PAGED, PAGE_TILE)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_ptrs0, v_ptrs0, K_DESC, V_DESC, col_k, col_v, sk, total_k, n_c,
        n_end, offs_m, offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2,
        softmax_scale, softcap, slope_log2, seed, rng_offset, threshold, h, row0, stride_kt,
        stride_vt, bt_b, stride_btm, block_size, max_blocks, num_blocks, stride_kb, stride_vb,
        HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI,
        HAS_DROPOUT, True, USE_TMA, P_SCALE, PV_WIDE, POSITIVE_SCALE, DOT_PRECISION, PAGED, PAGE_TILE)

    if HAS_SINK:
        # The sink joins the denominator as one more score (log2 units), with no value:
        # l = l * 2^(m - mx) + 2^(sink - mx), acc rescaled alike. A row that saw no key
        # (m = -inf) gets l = 1 at mx = sink: out 0, lse sink. A -inf sink changes nothing.
        sink_log2 = tl.load(SINK + h).to(ACC) * 1.4426950408889634
        sink_log2 = tl.where(split == 0, sink_log2, float("-inf"))  # split-KV: once
        m_fin = tl.maximum(m_i, sink_log2)
        m_fin_safe = tl.where(m_fin == float("-inf"), 0.0, m_fin)
        o_scale = _exp2(m_i - m_fin_safe)
        l_i = l_i * o_scale + _exp2(sink_log2 - m_fin_safe)
        acc = acc * o_scale[:, None]
        m_i = m_fin
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale
    if HAS_DESCALE:
        out = out * (tl.load(V_DESCALE + b * stride_vdb + hk * stride_vdh) / P_SCALE)
    lse = tl.where(seen, (m_i + _log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(OUT + qrow[:, None] * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=qin[:, None] & (offs_dv[None, :] < HEADDIM_V))
    tl.store(LSE + h * stride_lh + qrow, lse, mask=qin)


# ---------------------------------------------------------------- backward


@triton.jit
def _attention_bwd_delta_kernel(OUT, DOUT, DLSE, DELTA, total_q,
                                stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod,
                                stride_dlh, stride_dlt,
                                HEADDIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                                BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
                                ACC: tl.constexpr):
    """delta[h, r] = sum_d dO[r, h, d] * O[r, h, d] - dlse[h, r] over every buffer row.

    HEADDIM_V / BLOCK_DV: v head dim and its power of two; BLOCK_M: rows per program;
    HAS_DLSE: a gradient of softmax_lse is given; ACC: compute dtype (see the forward).
    """
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rin = rows < total_q
    mask = rin[:, None] & (offs_dv[None, :] < HEADDIM_V)
    o = tl.load(OUT + rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(ACC)
    do = tl.load(DOUT + rows[:, None] * stride_dot + h * stride_doh + offs_dv[None, :] * stride_dod,
                 mask=mask, other=0.0).to(ACC)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * stride_dlh + rows * stride_dlt, mask=rin, other=0.0).to(ACC)
    tl.store(DELTA + h * total_q + rows, delta, mask=rin)


@triton.jit
def _attention_bwd_dkdv_inner(dk, dv, k, v, q_ptrs0, do_ptrs0, LSE_H, DELTA_H, sq, total_q,
                              m_lo, m_hi, offs_m, offs_n, offs_d, offs_dv, off, Lq, Lk,
                              window_left, window_right, scale_log2, softmax_scale, softcap,
                              slope_log2, seed, rng_offset, threshold, dropout_scale, head, row0,
                              stride_qt, stride_dot,
                              HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              BLOCK_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                              MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query blocks [m_lo, m_hi) of one query head.

    Works on transposed tiles (keys x queries). MASK: these blocks need the mask.
    """
    for m in range(m_lo, m_hi, BLOCK_M):
        rows = m + offs_m
        qrow = (sq + rows).to(tl.int64)
        q = _load_rows(q_ptrs0, qrow, total_q, stride_qt, offs_d, HEADDIM, BLOCK_D, MASK)
        do = _load_rows(do_ptrs0, qrow, total_q, stride_dot, offs_dv, HEADDIM_V, BLOCK_DV, MASK)
        if MASK:
            qin = (rows < Lq) & (qrow >= 0) & (qrow < total_q)
            lse = tl.load(LSE_H + qrow, mask=qin, other=0.0)
            delta = tl.load(DELTA_H + qrow, mask=qin, other=0.0)
        else:
            lse = tl.load(LSE_H + qrow)
            delta = tl.load(DELTA_H + qrow)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        sT = _scores(qkT, rows[None, :], offs_n[:, None], off, Lq, Lk, window_left, window_right,
                     scale_log2, softmax_scale, softcap, slope_log2, HAS_SOFTCAP, HAS_ALIBI, MASK)
        pT = _exp2(sT - lse[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, head, row0 + rows[None, :], offs_n[:, None],
                                 threshold)
            pdT = tl.where(keep, pT * dropout_scale, 0.0)
            dpT = tl.where(keep, dpT * dropout_scale, 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            tT = _tanh(qkT * (softmax_scale / softcap))
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["window_left", "window_right", "threshold", "total_q", "total_k", "batch"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K, START_Q, START_K, ALIBI, RNG,
    softmax_scale: tl.float64, softcap: tl.float64, window_left, window_right,
    dropout_scale: tl.float64, threshold, total_q, total_k, batch, group,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
    stride_lh, stride_ab, stride_ah,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ZERO_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One (key tile, kv head) per program; loops over the group's query heads in order.

    Constexprs as in _attention_fwd_kernel; BLOCK_N key rows per tile, BLOCK_M query rows per
    step; ZERO_TAIL: zero dK/dV rows after the last sequence (no cu_seqlens_k_padded).
    """
    softmax_scale = _to_acc(softmax_scale, ACC)
    softcap = _to_acc(softcap, ACC)
    dropout_scale = _to_acc(dropout_scale, ACC)
    t = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b, nt = _locate_tile(CU_K, batch, t, BLOCK_N, BLOCK_B)
    if b >= batch:
        if ZERO_TAIL:
            rows = (tl.load(CU_K + batch) + nt * BLOCK_N + offs_n).to(tl.int64)
            _store_zero_rows(DK, rows, total_k, stride_dkt, hk * stride_dkh, offs_d, stride_dkd,
                             HEADDIM, BLOCK_N, BLOCK_D)
            _store_zero_rows(DV, rows, total_k, stride_dvt, hk * stride_dvh, offs_dv, stride_dvd,
                             HEADDIM_V, BLOCK_N, BLOCK_DV)
        return
    row0, Lq, Lk = _sequence_lengths(CU_Q, CU_K, b)
    n0 = nt * BLOCK_N
    if n0 >= Lk:
        return
    sq = tl.load(START_Q + b)
    sk = tl.load(START_K + b)
    off = Lk - Lq
    offs_n = n0 + offs_n  # logical key index inside the sequence
    krow = (sk + offs_n).to(tl.int64)
    kin = (offs_n < Lk) & (krow >= 0) & (krow < total_k)
    k = tl.load(K + krow[:, None] * stride_kt + hk * stride_kh + offs_d[None, :] * stride_kd,
                mask=kin[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)
    v = tl.load(V + krow[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :] * stride_vd,
                mask=kin[:, None] & (offs_dv[None, :] < HEADDIM_V), other=0.0)

    # Query range that may see any key of the tile, and the part that sees all of them.
    n1 = tl.minimum(n0 + BLOCK_N, Lk)
    lo = 0
    full_lo = 0
    if window_right >= 0:
        lo = tl.maximum(n0 - off - window_right, 0)
        full_lo = n1 - 1 - off - window_right
    hi = Lq
    full_hi = Lq
    if window_left >= 0:
        hi = tl.minimum(n1 - off + window_left, Lq)
        full_hi = tl.minimum(n0 - off + window_left + 1, Lq)
    m_start, m_a, m_c = _block_range(lo, hi, full_lo, full_hi, BLOCK_M)
    m_c = _clamp_to_buffer(m_a, m_c, sq, total_q, BLOCK_M)

    scale_log2 = softmax_scale * 1.4426950408889634
    seed, rng_offset = _load_rng(RNG, HAS_DROPOUT)
    dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    for g in range(0, group):
        h = hk * group + g
        slope_log2 = _alibi_slope_log2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI, ACC)
        q_ptrs0 = Q + h * stride_qh + offs_d[None, :] * stride_qd
        do_ptrs0 = DOUT + h * stride_doh + offs_dv[None, :] * stride_dod
        lse_h = LSE + h * stride_lh
        delta_h = DELTA + h * total_q
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs0, do_ptrs0, lse_h, delta_h, sq, total_q, m_start, m_a, offs_m,
            offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2,
            softmax_scale, softcap, slope_log2, seed, rng_offset, threshold, dropout_scale, h, row0,
            stride_qt, stride_dot, HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_SOFTCAP,
            HAS_ALIBI, HAS_DROPOUT, True, DOT_PRECISION)
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs0, do_ptrs0, lse_h, delta_h, sq, total_q, m_a, m_c, offs_m,
            offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2,
            softmax_scale, softcap, slope_log2, seed, rng_offset, threshold, dropout_scale, h, row0,
            stride_qt, stride_dot, HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_SOFTCAP,
            HAS_ALIBI, HAS_DROPOUT, False, DOT_PRECISION)
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs0, do_ptrs0, lse_h, delta_h, sq, total_q, m_c, hi, offs_m,
            offs_n, offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2,
            softmax_scale, softcap, slope_log2, seed, rng_offset, threshold, dropout_scale, h, row0,
            stride_qt, stride_dot, HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_SOFTCAP,
            HAS_ALIBI, HAS_DROPOUT, True, DOT_PRECISION)
    tl.store(DK + krow[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :] * stride_dkd,
             (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=kin[:, None] & (offs_d[None, :] < HEADDIM))
    tl.store(DV + krow[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kin[:, None] & (offs_dv[None, :] < HEADDIM_V))


@triton.jit
def _attention_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs0, v_ptrs0, sk, total_k, n_lo, n_hi,
                            offs_m, offs_n, offs_d, offs_dv, off, Lq, Lk, window_left,
                            window_right, scale_log2, softmax_scale, softcap, slope_log2,
                            seed, rng_offset, threshold, dropout_scale, head, row0,
                            stride_kt, stride_vt,
                            HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                            HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                            MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over key blocks [n_lo, n_hi). MASK: blocks need the mask."""
    for n in range(n_lo, n_hi, BLOCK_N):
        cols = n + offs_n
        krow = (sk + cols).to(tl.int64)
        k = _load_rows(k_ptrs0, krow, total_k, stride_kt, offs_d, HEADDIM, BLOCK_D, MASK)
        v = _load_rows(v_ptrs0, krow, total_k, stride_vt, offs_dv, HEADDIM_V, BLOCK_DV, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = _scores(qk, offs_m[:, None], cols[None, :], off, Lq, Lk, window_left, window_right,
                    scale_log2, softmax_scale, softcap, slope_log2, HAS_SOFTCAP, HAS_ALIBI, MASK)
        p = _exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, head, row0 + offs_m[:, None], cols[None, :],
                                 threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            tq = _tanh(qk * (softmax_scale / softcap))
            ds = ds * (1.0 - tq * tq)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["window_left", "window_right", "threshold", "total_q", "total_k", "batch"])
def _attention_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_Q, CU_K, START_Q, START_K, ALIBI, RNG,
    softmax_scale: tl.float64, softcap: tl.float64, window_left, window_right,
    dropout_scale: tl.float64, threshold, total_q, total_k, batch, group,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh, stride_dqd, stride_lh, stride_ab, stride_ah,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ZERO_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr,
):
    """One (query tile, query head) per program. Constexprs as in _attention_fwd_kernel."""
    softmax_scale = _to_acc(softmax_scale, ACC)
    softcap = _to_acc(softcap, ACC)
    dropout_scale = _to_acc(dropout_scale, ACC)
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // group
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b, mt = _locate_tile(CU_Q, batch, t, BLOCK_M, BLOCK_B)
    if b >= batch:
        if ZERO_TAIL:
            rows = (tl.load(CU_Q + batch) + mt * BLOCK_M + offs_m).to(tl.int64)
            _store_zero_rows(DQ, rows, total_q, stride_dqt, h * stride_dqh, offs_d, stride_dqd,
                             HEADDIM, BLOCK_M, BLOCK_D)
        return
    row0, Lq, Lk = _sequence_lengths(CU_Q, CU_K, b)
    m0 = mt * BLOCK_M
    if m0 >= Lq:
        return
    if REVERSE:
        m0 = (tl.cdiv(Lq, BLOCK_M) - 1 - mt) * BLOCK_M
    sq = tl.load(START_Q + b)
    sk = tl.load(START_K + b)
    off = Lk - Lq
    offs_m = m0 + offs_m
    qrow = (sq + offs_m).to(tl.int64)
    qin = (offs_m < Lq) & (qrow >= 0) & (qrow < total_q)
    q = tl.load(Q + qrow[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=qin[:, None] & (offs_d[None, :] < HEADDIM), other=0.0)
    do = tl.load(DOUT + qrow[:, None] * stride_dot + h * stride_doh + offs_dv[None, :] * stride_dod,
                 mask=qin[:, None] & (offs_dv[None, :] < HEADDIM_V), other=0.0)
    lse = tl.load(LSE + h * stride_lh + qrow, mask=qin, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + h * total_q + qrow, mask=qin, other=0.0)

    scale_log2 = softmax_scale * 1.4426950408889634
    slope_log2 = _alibi_slope_log2(ALIBI, b, h, stride_ab, stride_ah, HAS_ALIBI, ACC)
    seed, rng_offset = _load_rng(RNG, HAS_DROPOUT)

    n_start, n_a, n_c, n_end = _query_tile_key_blocks(m0, Lq, Lk, window_left, window_right, BLOCK_M,
                                                      BLOCK_N)
    n_c = _clamp_to_buffer(n_a, n_c, sk, total_k, BLOCK_N)

    k_ptrs0 = K + hk * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs0 = V + hk * stride_vh + offs_dv[None, :] * stride_vd
    dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs0, v_ptrs0, sk, total_k, n_start, n_a, offs_m, offs_n,
        offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2, softmax_scale,
        softcap, slope_log2, seed, rng_offset, threshold, dropout_scale, h, row0,
        stride_kt, stride_vt, HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP,
        HAS_ALIBI, HAS_DROPOUT, True, DOT_PRECISION)
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs0, v_ptrs0, sk, total_k, n_a, n_c, offs_m, offs_n,
        offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2, softmax_scale,
        softcap, slope_log2, seed, rng_offset, threshold, dropout_scale, h, row0,
        stride_kt, stride_vt, HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP,
        HAS_ALIBI, HAS_DROPOUT, False, DOT_PRECISION)
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs0, v_ptrs0, sk, total_k, n_c, n_end, offs_m, offs_n,
        offs_d, offs_dv, off, Lq, Lk, window_left, window_right, scale_log2, softmax_scale,
        softcap, slope_log2, seed, rng_offset, threshold, dropout_scale, h, row0,
        stride_kt, stride_vt, HEADDIM, HEADDIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP,
        HAS_ALIBI, HAS_DROPOUT, True, DOT_PRECISION)
    tl.store(DQ + qrow[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :] * stride_dqd,
             (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=qin[:, None] & (offs_d[None, :] < HEADDIM))


# ---------------------------------------------------------------- launchers

# Fallback tile configs keyed by the padded head dim max(BLOCK_D, BLOCK_DV):
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Measured on an H200 (benchmarks/NOTES.md). Tuned
# entries for a GPU (kernels/tuned_configs.json, written by ``python -m torch_varlen.tune``)
# take precedence; nothing is tuned at run time, so the first call of a shape costs one compile
# per kernel and nothing more.
_FWD_CONFIGS = {16: (64, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3),
                128: (128, 64, 8, 3), 256: (128, 64, 8, 2)}
_DKDV_CONFIGS = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                 128: (32, 64, 4, 3), 256: (32, 32, 4, 2)}
_DQ_CONFIGS = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
               128: (128, 64, 8, 3), 256: (64, 32, 4, 2)}
# float32 tiles are twice the bytes: halve both tile edges.
# float64 (gradcheck and float64 tests on the GPU; speed does not matter): small tiles, one
# stage, 4 warps. Shared memory is about 16 bytes * head dim * (rows of the loop-invariant tiles
# + rows of the per-step tiles): e.g. dK/dV at head dim 256 holds K, V (BLOCK_N rows) and
# loads Q, dO (BLOCK_M rows), so BLOCK_M + BLOCK_N <= 24 keeps it under 100 KB (sm_86/89 allow
# 99 KB per block). BLOCK_M (dK/dV) and BLOCK_N (forward, dQ) are reduction dims of tl.dot, 16
# at least; the other edge may be 8.
_FP64_CONFIGS = {
    "fwd": {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1), 128: (32, 16, 4, 1),
            256: (16, 16, 4, 1)},
    "dkdv": {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1), 128: (16, 16, 4, 1),
             256: (16, 8, 4, 1)},
    "dq": {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1), 128: (16, 16, 4, 1),
           256: (8, 16, 4, 1)},
}
# Under TRITON_INTERPRET=1 (CI on the CPU) small, unequal tiles keep runs fast and catch
# a BLOCK_M / BLOCK_N mix-up.
_INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
TUNED_CONFIGS_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")


def mask_kind(window_left: int, window_right: int) -> str:
    """'full', 'causal' or 'window': the part of a tuning key that the window decides."""
    if window_left < 0 and window_right < 0:
        return "full"
    return "causal" if window_left < 0 and window_right == 0 else "window"


def tuning_key(kind: str, dtype: torch.dtype, headdim: int, headdim_v: int, mask: str) -> str:
    """Key of one tuned entry for one GPU: e.g. 'fwd|bfloat16|128|128|causal'."""
    return f"{kind}|{str(dtype).replace('torch.', '')}|{headdim}|{headdim_v}|{mask}"


def tuned_entry(table: dict, kind: str, dtype: torch.dtype, headdim: int, headdim_v: int,
                mask: str) -> dict | None:
    """One GPU's tuned entry for a launch, or None. float16 tiles cost what bfloat16 tiles
    cost: float16 uses bfloat16's entry when it has none of its own."""
    for d in (dtype, torch.bfloat16) if dtype == torch.float16 else (dtype,):
        entry = table.get(tuning_key(kind, d, headdim, headdim_v, mask))
        if entry is not None:
            return entry
    return None


@functools.lru_cache(maxsize=None)
def _tuned_table(device_name: str) -> dict:
    path = os.environ.get("TORCH_VARLEN_TUNED_CONFIGS", TUNED_CONFIGS_PATH)
    try:
        with open(path) as f:
            return json.load(f).get("gpus", {}).get(device_name, {})
    except FileNotFoundError:
        return {}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


# A config: tile edges, warps, stages and the switches (see _attention_fwd_kernel; dQ reads
# "reverse" too). fp8_pv False: FP8 inputs run P @ V in float16 (1.7x faster than FP8 P @ V on
# the H200, benchmarks/NOTES.md).
_DEFAULT_SWITCHES = {"tma": False, "reverse": False, "fp8_pv": False}


def _config(kind: str, q: torch.Tensor, v: torch.Tensor, window_left: int, window_right: int,
            override: dict | None = None) -> dict:
    """Launch config of one kernel: an override (the tuner's), else the tuned entry for this
    GPU, else the fallback table."""
    if override is not None:
        return {**_DEFAULT_SWITCHES, **override}
    mask = mask_kind(window_left, window_right)
    # Causal: a sequence's last query tile sees the most keys, so the forward and dQ run it
    # first (H200: forward -1.8%, dQ-side backward -0.5 to -2%; benchmarks/NOTES.md).
    switches = dict(_DEFAULT_SWITCHES, reverse=kind != "dkdv" and mask == "causal")
    if _INTERPRET:
        block_m, block_n, warps, stages = _INTERPRET_CONFIGS[kind]
        return dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages, **switches)
    if q.is_cuda:
        table = _tuned_table(_device_name(q.device.index if q.device.index is not None
                                          else torch.cuda.current_device()))
        entry = tuned_entry(table, kind, q.dtype, q.shape[2], v.shape[2], mask)
        if entry is not None:
            return {**switches, **entry}
    table = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}[kind]
    if q.dtype == torch.float64:
        table = _FP64_CONFIGS[kind]
    block_m, block_n, warps, stages = table[max(_block(q.shape[2]), _block(v.shape[2]))]
    if q.dtype == torch.float32:
        block_m, block_n, stages = max(block_m // 2, 16), max(block_n // 2, 16), min(stages, 2)
    elif q.dtype == FP8 and kind == "fwd" and _block(q.shape[2]) <= 128:
        # One-byte K tiles: twice the keys per block (H200, head dim 128: 1.59 vs 1.85 ms; the
        # FP8 GPU tests, head dims 8-128, ran with these tiles).
        block_n = 128
    return dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages, **switches)


def _block(d: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(d))


def _dropout_threshold(p: float) -> int:
    return min(int(math.floor(p * 4294967296.0)), 0xFFFFFFFF)


def _check_supported(q, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, FP8):
        raise TypeError(f"Triton varlen attention supports float16, bfloat16, float32, float64 "
                        f"and float8_e4m3fn (forward) inputs, got {q.dtype}")
    if q.shape[2] > _MAX_HEADDIM or v.shape[2] > _MAX_HEADDIM:
        raise ValueError(f"head dims up to {_MAX_HEADDIM} are supported, got headdim "
                         f"{q.shape[2]} and headdim_v {v.shape[2]}")


class _Common:
    """Arguments shared by the forward and backward launches."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
                 window_right, softcap, alibi_slopes, cu_seqlens_q_padded, cu_seqlens_k_padded,
                 dropout_p, rng_state, q_descale=None, k_descale=None, v_descale=None):
        check_attention_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                               cu_seqlens_q_padded, cu_seqlens_k_padded, window_left, window_right,
                               softcap, dropout_p, rng_state, q_descale, k_descale, v_descale)
        _check_supported(q, v)
        self.batch = cu_seqlens_q.shape[0] - 1
        self.nheads, self.nheads_k = q.shape[1], k.shape[1]
        # FP8 tensor-core dots reduce over at least 32 elements: pad small head dims to 32.
        min_block = 32 if q.dtype == FP8 else 16
        self.block_d, self.block_dv = _block(q.shape[2], min_block), _block(v.shape[2], min_block)
        # The kernels index cu_seqlens as contiguous int32 arrays (a strided view would be
        # read wrongly): copy the rare strided one, as the CPU kernel does.
        self.seq = tuple(t.contiguous() for t in (
            cu_seqlens_q, cu_seqlens_k,
            cu_seqlens_q if cu_seqlens_q_padded is None else cu_seqlens_q_padded,
            cu_seqlens_k if cu_seqlens_k_padded is None else cu_seqlens_k_padded))
        self.padded_q = cu_seqlens_q_padded is not None
        self.padded_k = cu_seqlens_k_padded is not None
        if alibi_slopes is None:
            self.alibi, self.alibi_strides = cu_seqlens_q, (0, 0)
        elif alibi_slopes.dim() == 1:
            self.alibi, self.alibi_strides = alibi_slopes, (0, alibi_slopes.stride(0))
        else:
            self.alibi, self.alibi_strides = alibi_slopes, alibi_slopes.stride()
        has_dropout = dropout_p > 0
        self.rng = rng_state if has_dropout else cu_seqlens_q
        self.values = (float(softmax_scale), float(softcap), int(window_left), int(window_right),
                       1.0 / (1.0 - dropout_p), _dropout_threshold(dropout_p) if has_dropout else 0,
                       q.shape[0], k.shape[0], self.batch, self.nheads // self.nheads_k)
        # Compute dtype: float64 for float64 inputs (then softmax_lse and delta are float64
        # too), float32 otherwise.
        self.acc_dtype = lse_dtype(q)
        self.acc = tl.float64 if self.acc_dtype == torch.float64 else tl.float32
        self.flags = dict(HEADDIM=q.shape[2], HEADDIM_V=v.shape[2], BLOCK_D=self.block_d,
                          BLOCK_DV=self.block_dv, BLOCK_B=_BLOCK_B, HAS_SOFTCAP=softcap > 0,
                          HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=has_dropout,
                          DOT_PRECISION="ieee" if q.dtype in (torch.float32, torch.float64)
                          else "tf32", ACC=self.acc)

    def grid(self, total, block, heads):
        return (triton.cdiv(total, block) + self.batch, heads)


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _new(like_shape_fn, zero, *args, **kwargs):
    """Allocate an output: zeroed where the kernels leave rows untouched (padded layouts),
    NaN-poisoned under tests, else uninitialized."""
    if zero:
        return like_shape_fn(*args, **kwargs).zero_()
    t = like_shape_fn(*args, **kwargs)
    return t.fill_(float("nan")) if _poison_outputs else t


def _descale(t, q):
    """(tensor, (stride over sequences, stride over kv heads)) of a descale factor; None is 1."""
    if t is None:
        return q.new_ones((1,), dtype=torch.float32), (0, 0)
    if t.dim() == 1:
        return t, (0, 0)
    return t, t.stride()


def _descriptor(t2d, block_shape):
    """A 2-D TMA descriptor over t2d (rows, columns with stride 1), or None when TMA cannot
    address it (alignment, empty, not CUDA)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, cols = t2d.shape
    ok = (t2d.is_cuda and rows > 0 and cols > 0 and t2d.stride(1) == 1
          and (t2d.stride(0) * t2d.element_size()) % 16 == 0 and t2d.data_ptr() % 16 == 0)
    return TensorDescriptor(t2d, [rows, cols], [t2d.stride(0), 1], block_shape) if ok else None


def _kv_descriptors(k, v, block_n):
    """TMA descriptors for unmasked K/V blocks, or None (then the kernel loads through
    pointers): (total_k, nheads_k * headdim) views with blocks (block_n, headdim)."""
    descs = []
    for t in (k, v):
        total, heads, d = t.shape
        if d != _block(d) or t.stride(2) != 1 or t.stride(1) != d:
            return None
        desc = _descriptor(t.as_strided((total, heads * d), (t.stride(0), 1)), [block_n, d])
        if desc is None:
            return None
        descs.append(desc)
    return descs


def _fp8_v_transposed(v):
    """v (total_k, Hk, Dv) float8 -> the same values as a (total_k, Hk, Dv) view whose rows are
    contiguous (strides (1, Dv*T, T), T = total_k rounded up to 16): FP8 tensor-core dots want
    the reduction (key) dimension contiguous in the P @ V operand."""
    total, heads, dv = v.shape
    padded = triton.cdiv(max(total, 1), 16) * 16
    buf = v.new_empty((heads, dv, padded))
    buf[:, :, :total].copy_(v.permute(1, 2, 0))
    return buf[:, :, :total].permute(2, 0, 1)


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
                      alibi_slopes=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None,
                      dropout_p=0.0, rng_state=None, deterministic=False, q_descale=None,
                      k_descale=None, v_descale=None, backend=None, sink=None, block_table=None,
                      seqused_k=None, num_splits=0, config=None):
    """varlen::attention_forward on Triton -> (out, softmax_lse). max_seqlen_* are unused.

    ``config`` (tuner only) overrides the launch config (keys as _config returns). ``sink``:
    learnable sink logits (nheads,), folded into the softmax in the kernel (the backward
    kernels need only the lse that includes them). ``block_table``: paged K / V caches, read
    through the table in the kernel; ``seqused_k``: the key counts (a cumsum on the device
    gives the kernel its cu_seqlens_k); both checked by kernels/checks.py's device asserts.
    ``num_splits`` (0 = _num_splits's heuristic): split-KV, partials merged by
    merge.merge_attention_partials.
    """
    k3, v3 = check_paged_kv(q, k, v, cu_seqlens_q, cu_seqlens_k_padded, block_table, seqused_k,
                            num_splits)
    paged = block_table is not None
    c = _Common(q, k3, v3, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right,
                softcap, alibi_slopes, cu_seqlens_q_padded, cu_seqlens_k_padded, dropout_p,
                rng_state, q_descale, k_descale, v_descale)
    check_sink(q, sink)
    # cu_seqlens values, as the CPU kernel checks them: device asserts, no host sync (a paged
    # cu_seqlens_k has no buffer to end inside)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded, cu_seqlens_k_padded,
                     q.shape[0], _NO_BOUND if paged else k.shape[0])
    if paged or seqused_k is not None:
        check_kv_lengths(cu_seqlens_k, seqused_k, c.seq[3], block_table, k.shape[0],
                         k.shape[1] if paged else 1, k.shape[0])
    if seqused_k is not None:  # the kernel reads Lk = CU_K[b+1] - CU_K[b]
        c.seq = (c.seq[0], F.pad(seqused_k.cumsum(0, dtype=torch.int32), (1, 0)), *c.seq[2:])
    fp8 = q.dtype == FP8
    total_q = q.shape[0]
    cfg = _config("fwd", q, v3, window_left, window_right, config)
    block_m, block_n = cfg["block_m"], cfg["block_n"]
    grid = c.grid(total_q, block_m, c.nheads)
    # Keys one sequence may have, from shapes: a page table's span, else the packed keys'
    # average (a (B, S) cache reshaped to B * S rows gives S). Busy programs: with short query
    # runs most of grid[0]'s cdiv(total_q, block_m) + batch tiles are empty; about one a sequence.
    key_capacity = block_table.shape[1] * k.shape[1] if paged else -(-k.shape[0] // max(c.batch, 1))
    busy = min(grid[0], max(1, min(c.batch, total_q))) * grid[1]
    splits = _num_splits(num_splits, q, c.batch, busy, key_capacity)
    if splits > 1:  # partial (out, lse) per split in the compute dtype, merged below
        out = _new(q.new_empty, c.padded_q, (splits, total_q, c.nheads, v.shape[-1]), dtype=c.acc_dtype)
        lse = q.new_empty((splits, c.nheads, total_q), dtype=c.acc_dtype)
    else:
        out = _new(q.new_empty, c.padded_q, (total_q, c.nheads, v.shape[-1]), dtype=out_dtype(q))
        lse = q.new_empty((c.nheads, total_q), dtype=c.acc_dtype)
    if c.padded_q:
        lse.fill_(float("-inf"))
    elif _poison_outputs:
        lse.fill_(float("nan"))
    # FP8 loads through pointers: a TMA path for its keys-fastest V hit an illegal instruction
    # on the H200 (benchmarks/NOTES.md) and was removed. Paged K / V load through the table.
    descs = _kv_descriptors(k, v, block_n) if cfg["tma"] and not fp8 and not paged else None
    # FP8 P @ V (fp8_pv) wants V keys-fastest; the other FP8 variant widens V to float16.
    fp8_pv = fp8 and cfg["fp8_pv"] and not paged
    if fp8_pv:
        v = _fp8_v_transposed(v)
    (qd, qd_strides), (kd, kd_strides), (vd, vd_strides) = (
        _descale(t, q) for t in (q_descale, k_descale, v_descale))
    # Triton 3.6 on sm_90 miscompiles P @ V when the forward's V tile is narrower than its q/k
    # tile (BLOCK_DV < BLOCK_D): lse right, out wrong for (40, 24), (24, 8), (56, 8), (48, 24) at
    # one stage, and an illegal memory access for (72, 8) (benchmarks/NOTES.md "Head-dim pairs").
    # The forward never compiles that tile pair: its V tile is at least as wide as the q/k tile
    # (loads and stores stay masked to headdim_v; the extra columns are zeros).
    flags = dict(c.flags, BLOCK_DV=max(c.block_dv, c.block_d))
    if paged:  # (token, head, dim) strides of one block's slots, and the block strides
        k_strides, v_strides = k.stride()[1:], v.stride()[1:]
        paging = (block_table, *block_table.stride(), k.shape[1], block_table.shape[1], k.shape[0],
                  k.stride(0), v.stride(0))
    else:
        k_strides, v_strides = k.stride(), v.stride()
        paging = (cu_seqlens_q, 0, 0, 1, 0, 0, 0, 0)
    out_rows = out[0] if splits > 1 else out
    split_strides = (out.stride(0), lse.stride(0)) if splits > 1 else (0, 0)
    if grid[0] > 0 and total_q > 0:
        with _device(q):
            _attention_fwd_kernel[grid + (splits,)](
                q, k, v, out, lse, *c.seq, c.alibi, c.rng, *(descs or (k, v)), qd, kd, vd,
                lse if sink is None else sink.contiguous(), paging[0], *c.values, *paging[1:],
                *split_strides, splits, *q.stride(), *k_strides,
                *v_strides, *out_rows.stride(), lse.stride(-2),
                *c.alibi_strides, *qd_strides, *kd_strides, *vd_strides, BLOCK_M=block_m,
                BLOCK_N=block_n, HAS_DESCALE=fp8, USE_TMA=descs is not None,
                P_SCALE=256.0 if fp8_pv else 1.0, PV_WIDE=fp8 and not fp8_pv,
                POSITIVE_SCALE=softmax_scale >= 0,
                REVERSE=cfg["reverse"], ZERO_TAIL=not c.padded_q, HAS_SINK=sink is not None,
                PAGED=paged, PAGE_TILE=paged and k.shape[1] % block_n == 0, num_warps=cfg["warps"],
                num_stages=cfg["stages"], **flags)
    if splits > 1:
        out, lse = merge_attention_partials(list(out.unbind(0)), list(lse.unbind(0)),
                                            out_dtype=out_dtype(q))
    return out, lse


_NO_BOUND = 2**31 - 1  # total_k for the cu_seqlens_k checks of a paged call


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(requested: int, q, batch: int, programs: int, key_capacity: int) -> int:
    """Split-KV parts of a forward: ``requested`` when > 0. The heuristic (0) splits only on a
    GPU, for short query runs (at most 16 query rows per sequence on average, as in decoding)
    whose busy programs do not fill the GPU, over long key ranges (key_capacity: keys a sequence
    may have, read from shapes only): about 2 programs per SM, at least 1024 keys per split, at most
    32 splits. Shapes only, so CUDA graphs and compiled steps keep one launch config."""
    if requested > 0:
        return int(requested)
    if _INTERPRET or not q.is_cuda:
        return 1
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if q.shape[0] > 16 * max(batch, 1) or programs >= sms or key_capacity < 2048:
        return 1
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), key_capacity // 1024, 32))


def attention_backward(grad_out, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, softmax_scale, window_left=-1, window_right=-1,
                       softcap=0.0, alibi_slopes=None, cu_seqlens_q_padded=None,
                       cu_seqlens_k_padded=None, dropout_p=0.0, rng_state=None,
                       deterministic=False, grad_lse=None, backend=None, config=None):
    """varlen::attention_backward on Triton -> (grad_q, grad_k, grad_v).

    Always bitwise reproducible (no atomics), so ``deterministic`` needs no special path.
    ``config`` (tuner only): {"dkdv": ..., "dq": ...} launch config overrides.
    """
    torch._check(q.dtype != FP8, lambda: FP8_BACKWARD_ERROR)
    c = _Common(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right,
                softcap, alibi_slopes, cu_seqlens_q_padded, cu_seqlens_k_padded, dropout_p,
                rng_state)
    check_attention_backward_args(grad_out, q, v, out, softmax_lse, grad_lse)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded, cu_seqlens_k_padded,
                     q.shape[0], k.shape[0])
    total_q, total_k = q.shape[0], k.shape[0]
    softmax_lse = softmax_lse.contiguous()  # its dtype, lse_dtype(q), is checked above
    dq = _new(torch.empty_like, c.padded_q, q)
    dk = _new(torch.empty_like, c.padded_k, k)
    dv = _new(torch.empty_like, c.padded_k, v)
    delta = q.new_empty((c.nheads, total_q), dtype=c.acc_dtype)
    if total_q == 0 and total_k == 0:
        return dq, dk, dv
    dlse = grad_lse if grad_lse is not None else softmax_lse
    with _device(q):
        if total_q > 0:
            delta_block = 64
            _attention_bwd_delta_kernel[(triton.cdiv(total_q, delta_block), c.nheads)](
                out, grad_out, dlse, delta, total_q, *out.stride(), *grad_out.stride(),
                *dlse.stride(), HEADDIM_V=v.shape[2], BLOCK_DV=c.block_dv, BLOCK_M=delta_block,
                HAS_DLSE=grad_lse is not None, ACC=c.acc)
        cfg = _config("dkdv", q, v, window_left, window_right, (config or {}).get("dkdv"))
        block_m, block_n, warps, stages = cfg["block_m"], cfg["block_n"], cfg["warps"], cfg["stages"]
        grid = c.grid(total_k, block_n, c.nheads_k)
        if grid[0] > 0:
            _attention_bwd_dkdv_kernel[grid](
                q, k, v, grad_out, softmax_lse, delta, dk, dv, *c.seq, c.alibi, c.rng, *c.values,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
                *dv.stride(), softmax_lse.stride(0), *c.alibi_strides, BLOCK_M=block_m,
                BLOCK_N=block_n, ZERO_TAIL=not c.padded_k, num_warps=warps, num_stages=stages,
                **c.flags)
        cfg = _config("dq", q, v, window_left, window_right, (config or {}).get("dq"))
        block_m, block_n, warps, stages = cfg["block_m"], cfg["block_n"], cfg["warps"], cfg["stages"]
        grid = c.grid(total_q, block_m, c.nheads)
        if grid[0] > 0 and total_q > 0:
            _attention_bwd_dq_kernel[grid](
                q, k, v, grad_out, softmax_lse, delta, dq, *c.seq, c.alibi, c.rng, *c.values,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
                softmax_lse.stride(0), *c.alibi_strides, BLOCK_M=block_m, BLOCK_N=block_n,
                ZERO_TAIL=not c.padded_q, REVERSE=cfg["reverse"], num_warps=warps,
                num_stages=stages, **c.flags)
    return dq, dk, dv


def dropout_keep_mask(rng_state, head, row0, nrows, ncols, dropout_p):
    """(nrows, ncols) bool: the dropout keep mask the kernels apply for query head ``head``,
    packed query rows row0 .. row0+nrows-1 and key columns 0 .. ncols-1 (for tests)."""
    keep = torch.empty((nrows, ncols), dtype=torch.int8, device=rng_state.device)
    block = 32
    with _device(rng_state):
        _dropout_mask_fwd_kernel[(triton.cdiv(nrows, block), triton.cdiv(ncols, block))](
            keep, rng_state, _dropout_threshold(dropout_p), head, row0, nrows, ncols, BLOCK=block)
    return keep.bool()
