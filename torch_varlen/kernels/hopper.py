"""A warp-specialized Hopper (sm_90a) varlen attention forward in Gluon (issue #15).

A CUDA kernel of varlen::attention_forward on compute capability 9.x for the calls it runs
(``supported``): with backend="hopper", or for backend None / "auto" / "torch_varlen" when
TORCH_VARLEN_HOPPER=1 (opt-in for now: the complete GPU suite has not yet run with it as the
automatic choice; benchmarks/NOTES.md). Every other call, and every backward, runs the Triton
kernels (attention.py), which read this kernel's (out, lse) as their own: same layout, lse in
natural log, -inf and zeros for rows that see no key (DESIGN.md "Semantics"). ``select`` makes
the choice from the op's ``backend`` argument (see kernels/__init__.py) and logs it once per
reason.

Structure (FA3's, written with Triton 3.6's Gluon):
  - one CTA per (128 query rows, query head); three partitions by ``gl.warp_specialize``: a
    producer warp that loads the two 64-row Q tiles once and K / V tiles by TMA into a
    STAGES-deep shared-memory ring guarded by mbarriers (``k_ready`` / ``v_ready`` per stage,
    ``empty`` released by both consumers), and two consumer warpgroups of 64 query rows each;
  - inside a consumer the two GEMMs of consecutive key tiles overlap (S_j = Q K_j^T is issued
    before O += P_{j-1} V_{j-1}, and the softmax of S_j runs while P V is on the tensor cores);
    P stays in registers as the A operand of the P V wgmma;
  - exp2 with softmax_scale * log2(e) folded into one multiply (softcap: tanh first); masks
    only on the key tiles that need them (the window's edges, the last partial tile).

Tiles and sequences: the query tiles of sequence b have ids ``cu_seqlens_q[b] // 128 + b ...``
(attention.py's scheme), so the grid comes from shapes alone (no host sync, ``max_seqlen`` is
not read) and the programs past the last sequence zero the rows after it. TMA reads whole key
tiles: the rows of a sequence's last partial tile past its end belong to the next sequence, a
padding gap or no buffer (zero-filled); the producer zeroes those V rows in shared memory
before the consumers use them, so values outside a sequence (NaN in a padding gap, say) never
reach its output, as with the Triton kernels' masked loads.

Supported (``supported``): float16 / bfloat16; head dims 64, 128 or 256 for q / k and for v
(Triton 3.6's tensors and shared-memory tiles have power-of-two shapes), any pair of them; GQA /
MQA; causal and sliding windows; softcap; ``cu_seqlens_*_padded``; rows after the last
sequence; learnable sinks; softmax_scale >= 0. Not supported, so on the Triton kernels: ALiBi,
dropout, FP8, paged KV / seqused_k, split-KV, other dtypes and head dims (96, 192: a later
version, with TMA boxes wider than the head), strides TMA cannot address (the last dim not
contiguous, heads not dense, or rows not 16-byte aligned).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..meta.attention import check_attention_shapes, check_sink
from . import attention as _triton
from .checks import check_cu_seqlens

log = logging.getLogger("torch_varlen")

BM = 64  # query rows per consumer warpgroup (two per CTA)
STAGES = 2
LOG2E = 1.4426950408889634
HEADDIMS = (64, 128, 256)  # of q / k and of v, any pair
_SMEM_LIMIT = 220 * 1024  # of the H100 / H200's 227 KB per CTA, with room for the barriers
_BLOCK_B = 256  # cu_seqlens entries per vector load when locating a tile's sequence


def block_n(d: int, dv: int) -> int:
    """Keys per tile: 128 where two stages of K / V tiles and the Q tiles fit in shared memory
    and the V tile is at most 128 wide (register budget of S, P and the accumulator), else 64."""
    smem = 2 * BM * d * 2 + STAGES * 128 * (d + dv) * 2
    return 128 if dv <= 128 and smem <= _SMEM_LIMIT else 64


# ---------------------------------------------------------------- device code


@gluon.jit
def _locate_tile(cu, batch, t, BLOCK: gl.constexpr, BLOCK_B: gl.constexpr):
    """-> (b, tile index inside b) for tile id t; b == batch for ids past the last sequence
    (attention.py's _locate_tile). Each warp holds all BLOCK_B entries, so the sum needs no
    shared memory (a cross-warp reduction's scratch raced with the partitions' shared state
    under compute-sanitizer racecheck)."""
    layout: gl.constexpr = gl.BlockedLayout([BLOCK_B // 32], [32], [gl.num_warps()], [0])
    b = t * 0
    for c in range(1, batch + 1, BLOCK_B):
        idx = c + gl.arange(0, BLOCK_B, layout=layout)
        inb = idx <= batch
        g = gl.load(cu + idx, mask=inb, other=0) // BLOCK + idx
        b += gl.sum(((g <= t) & inb).to(gl.int32), 0)
    return b, t - (gl.load(cu + b) // BLOCK + b)


@gluon.jit
def _zero_v_rows(v_tile, first):
    """Zero rows [first, rows) of one V tile in shared memory (8-row slices, one warp)."""
    TN: gl.constexpr = v_tile.shape[0]
    DV: gl.constexpr = v_tile.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
    rows = gl.arange(0, 8, layout=gl.SliceLayout(1, layout))
    for i in gl.static_range(TN // 8):
        if (i + 1) * 8 > first:
            part = v_tile.slice(i * 8, 8, dim=0)
            x = part.load(layout)
            keep = gl.expand_dims(i * 8 + rows < first, 1)
            part.store(gl.where(keep, x, gl.zeros_like(x)))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty,
              tail_bar, q_row, kv_row, q_col, k_col, v_col, n_first, n_blocks, seqlen_k):
    # Tile sizes come from the shared-memory shapes: constexprs do not pass through a
    # warp_specialize argument tuple in Triton 3.6.
    TM: gl.constexpr = q_smem.shape[1]
    TN: gl.constexpr = k_smem.shape[1]
    NS: gl.constexpr = k_smem.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + TM, q_col], q_bar, q_smem.index(1))
    for j in range(n_blocks):
        s = j % NS
        key0 = (n_first + j) * TN  # the tile's first key inside the sequence
        # A fresh barrier passes a wait for parity 1, so the first NS tiles do not wait.
        mbarrier.wait(empty.index(s), ((j // NS) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + key0, k_col], k_ready.index(s),
                                        k_smem.index(s))
        if key0 + TN > seqlen_k:
            # The last tile, partial: its V rows past the sequence's end are zeroed before the
            # consumers see the stage (K needs nothing: its scores there are masked to -inf).
            # Only one tile per CTA takes this path, so tail_bar's phase is 0.
            mbarrier.expect(tail_bar, v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [kv_row + key0, v_col], tail_bar,
                                            v_smem.index(s))
            mbarrier.wait(tail_bar, 0)
            _zero_v_rows(v_smem.index(s), seqlen_k - key0)
            fence_async_shared()
            mbarrier.arrive(v_ready.index(s))
        else:
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [kv_row + key0, v_col], v_ready.index(s),
                                            v_smem.index(s))


@gluon.jit
def _tanh(x):
    return 1.0 - 2.0 / (gl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@gluon.jit
def _softmax_step(s, m_i, l_i, jj, full_lo, full_hi, rows, seqlen_k, off, window_left,
                  window_right, qk_scale, cap_in, cap_out, TN: gl.constexpr,
                  s_layout: gl.constexpr):
    """Scores of key tile jj -> (p, m_new, l_new, alpha), m in the log2 domain. Tiles outside
    [full_lo, full_hi) get the window and sequence-end mask; cap_in > 0 applies the softcap
    cap_out / log2(e) * tanh(s * cap_in) (then qk_scale is 1)."""
    if cap_in > 0.0:
        s = _tanh(s * cap_in) * cap_out
    if (jj < full_lo) | (jj >= full_hi):
        cols = gl.expand_dims(jj * TN + gl.arange(0, TN, layout=gl.SliceLayout(0, s_layout)), 0)
        diag = gl.expand_dims(rows + off, 1)
        visible = ((cols < seqlen_k) & ((window_left < 0) | (cols >= diag - window_left))
                   & ((window_right < 0) | (cols <= diag + window_right)))
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _consumer(q, k_smem, v_smem, q_bar, k_ready, v_ready, empty, o_ptr, lse_ptr, m_lo, q_start,
              seqlen_q, seqlen_k, head, n_first, n_blocks, qk_scale, cap_in, cap_out,
              window_left, window_right, sink_ptr, has_sink, total_q, stride_o_tok, stride_o_head,
              stride_lse_head):
    """One warpgroup's 64 query rows, m_lo the first (inside the sequence); q its Q tile.
    has_sink: sink_ptr (nheads,) holds sink logits that join each row's denominator."""
    TM: gl.constexpr = q.shape[0]
    TN: gl.constexpr = k_smem.shape[1]
    DV: gl.constexpr = v_smem.shape[2]
    NS: gl.constexpr = k_smem.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, TN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q.dtype

    rows = m_lo + gl.arange(0, TM, layout=row_layout)
    off = seqlen_k - seqlen_q  # windows align bottom-right
    # Key tiles [full_lo, full_hi) need no mask for any of this warpgroup's rows (rows past
    # seqlen_q are never stored, so they do not count).
    last = gl.minimum(m_lo + TM, seqlen_q) - 1
    full_lo = 0
    if window_left >= 0:
        full_lo = gl.cdiv(gl.maximum(last + off - window_left, 0), TN)
    limit = seqlen_k
    if window_right >= 0:
        limit = gl.minimum(limit, m_lo + off + window_right + 1)
    full_hi = gl.maximum(limit, 0) // TN
    m_i = gl.full([TM], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([TM], gl.float32, layout=row_layout)
    acc = gl.zeros([TM, DV], gl.float32, layout=o_layout)
    s_zero = gl.zeros([TM, TN], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if n_blocks > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, n_first, full_lo, full_hi, rows,
                                           seqlen_k, off, window_left, window_right, qk_scale,
                                           cap_in, cap_out, TN, s_layout)
        p = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_blocks):
            sj = j % NS
            mbarrier.wait(k_ready.index(sj), (j // NS) & 1)
            s = warpgroup_mma(q, k_smem.index(sj).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            sp = (j - 1) % NS
            mbarrier.wait(v_ready.index(sp), ((j - 1) // NS) & 1)
            acc = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))  # S_j done; P_{j-1} V_{j-1} may still run
            p_new, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, n_first + j, full_lo, full_hi,
                                                   rows, seqlen_k, off, window_left,
                                                   window_right, qk_scale, cap_in, cap_out, TN,
                                                   s_layout)
            # p in the deps keeps its registers live until the wgmma that reads them is done.
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))
            mbarrier.arrive(empty.index(sp))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            p = gl.convert_layout(p_new.to(dtype), p_layout)
        sl = (n_blocks - 1) % NS
        mbarrier.wait(v_ready.index(sl), ((n_blocks - 1) // NS) & 1)
        acc = warpgroup_mma(p, v_smem.index(sl), acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(empty.index(sl))

    if has_sink:
        # One more score (log2 units) with no value: l = l * 2^(m - mx) + 2^(sink - mx), acc
        # rescaled alike; a row that saw no key gets out 0, lse sink (attention.py's kernel).
        sink_log2 = gl.load(sink_ptr + head).to(gl.float32) * 1.4426950408889634
        m_fin = gl.maximum(m_i, sink_log2)
        m_safe = gl.where(m_fin == float("-inf"), 0.0, m_fin)
        o_scale = gl.exp2(m_i - m_safe)
        l_i = l_i * o_scale + gl.exp2(sink_log2 - m_safe)
        acc = acc * gl.expand_dims(gl.convert_layout(o_scale, orow_layout), 1)
        m_i = m_fin
    l_o = gl.convert_layout(l_i, orow_layout)
    out = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)
    orows = m_lo + gl.arange(0, TM, layout=orow_layout)
    ok_o = (orows < seqlen_q) & (q_start + orows < total_q)
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    offs = (gl.expand_dims((q_start + orows).to(gl.int64) * stride_o_tok, 1)
            + head * stride_o_head + gl.expand_dims(cols, 0))
    gl.store(o_ptr + offs, out.to(dtype), mask=gl.expand_dims(ok_o, 1))
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_i)) * 0.6931471805599453)
    ok = (rows < seqlen_q) & (q_start + rows < total_q)
    gl.store(lse_ptr + head * stride_lse_head + (q_start + rows).to(gl.int64), lse, mask=ok)


@gluon.jit
def _zero_tail(o_ptr, lse_ptr, first_row, total_q, head, stride_o_tok, stride_o_head,
               stride_lse_head, ROWS: gl.constexpr, DV: gl.constexpr):
    """out 0 and lse -inf for rows [first_row, first_row + ROWS) below total_q."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, layout))
    ok = (rows >= 0) & (rows < total_q)
    offs = (gl.expand_dims(rows.to(gl.int64) * stride_o_tok, 1) + head * stride_o_head
            + gl.expand_dims(cols, 0))
    zeros = gl.zeros([ROWS, DV], o_ptr.dtype.element_ty, layout=layout)
    gl.store(o_ptr + offs, zeros, mask=gl.expand_dims(ok, 1))
    lse = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, layout))
    gl.store(lse_ptr + head * stride_lse_head + rows.to(gl.int64), lse, mask=ok)


@gluon.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, cu_q, cu_k, start_q, start_k, qk_scale,
                cap_in, cap_out, window_left, window_right, sink_ptr, has_sink, total_q, batch,
                stride_o_tok,
                stride_o_head, stride_lse_head, GROUP: gl.constexpr, STAGES_: gl.constexpr,
                REVERSE: gl.constexpr, ZERO_TAIL: gl.constexpr, BLOCK_B: gl.constexpr):
    """Program (tile id, query head). REVERSE: a sequence's last query tile first (with a
    right window it sees the most keys); ZERO_TAIL: zero the rows after the last sequence."""
    TM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    TN: gl.constexpr = k_desc.block_type.shape[0]
    DV: gl.constexpr = v_desc.block_type.shape[1]
    head = gl.program_id(1)
    b, mt = _locate_tile(cu_q, batch, gl.program_id(0), 2 * TM, BLOCK_B)
    if b >= batch:
        if ZERO_TAIL:
            _zero_tail(o_ptr, lse_ptr, gl.load(cu_q + batch) + mt * 2 * TM, total_q, head,
                       stride_o_tok, stride_o_head, stride_lse_head, 2 * TM, DV)
    else:
        row0 = gl.load(cu_q + b)
        seqlen_q = gl.load(cu_q + b + 1) - row0
        seqlen_k = gl.load(cu_k + b + 1) - gl.load(cu_k + b)
        if mt * 2 * TM < seqlen_q:
            m0 = mt * 2 * TM
            if REVERSE:
                m0 = (gl.cdiv(seqlen_q, 2 * TM) - 1 - mt) * 2 * TM
            q_start = gl.load(start_q + b)
            k_start = gl.load(start_k + b)
            # Keys any of the rows [m0, m1) may see: [lo, hi), as whole tiles from n_first.
            off = seqlen_k - seqlen_q
            m1 = gl.minimum(m0 + 2 * TM, seqlen_q)
            lo = 0
            if window_left >= 0:
                lo = gl.maximum(m0 + off - window_left, 0)
            hi = seqlen_k
            if window_right >= 0:
                hi = gl.minimum(hi, m1 + off + window_right)
            n_first = lo // TN
            n_blocks = gl.maximum(gl.cdiv(gl.maximum(hi, 0), TN) - n_first, 0)

            q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, TM, D], q_desc.layout)
            k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES_, TN, D], k_desc.layout)
            v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES_, TN, DV], v_desc.layout)
            q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            tail_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            k_ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
            v_ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
            mbarrier.init(q_bar, count=1)
            mbarrier.init(tail_bar, count=1)
            for i in gl.static_range(STAGES_):
                mbarrier.init(k_ready.index(i), count=1)
                mbarrier.init(v_ready.index(i), count=1)
                mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release it
            fence_async_shared()

            kv_head = head // GROUP
            ring = (k_smem, v_smem, q_bar, k_ready, v_ready, empty, o_ptr, lse_ptr)
            tail = (q_start, seqlen_q, seqlen_k, head, n_first, n_blocks, qk_scale, cap_in,
                    cap_out, window_left, window_right, sink_ptr, has_sink, total_q,
                    stride_o_tok, stride_o_head, stride_lse_head)
            gl.warp_specialize([
                (_consumer, (q_smem.index(0), ) + ring + (m0, ) + tail),
                (_consumer, (q_smem.index(1), ) + ring + (m0 + TM, ) + tail),
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready,
                             v_ready, empty, tail_bar, q_start + m0, k_start, head * D,
                             kv_head * D, kv_head * DV, n_first, n_blocks, seqlen_k)),
            ], [4, 1], [240, 24])


# ---------------------------------------------------------------- what it runs


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> tuple:
    return torch.cuda.get_device_capability(index)


def _tma_view(t: torch.Tensor):
    """t (total, heads, d) as the 2-D (total, heads * d) view TMA reads, or None when TMA cannot
    address it: the last dim contiguous, heads dense, rows 16-byte aligned."""
    total, heads, d = t.shape
    if t.stride(2) != 1 or (heads > 1 and t.stride(1) != d):
        return None
    if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    return t.as_strided((total, heads * d), (t.stride(0) if total > 1 else heads * d, 1))


def supported(q, k, v, *, softmax_scale=1.0, alibi_slopes=None, dropout_p=0.0, q_descale=None,
              k_descale=None, v_descale=None, paged=False, num_splits=0,
              capability: Optional[tuple] = None) -> tuple[bool, str]:
    """Can this kernel run the forward? -> ``(ok, reason)``; reason says why not ('' if ok).

    Reads shapes, strides, dtypes, flags and the GPU's compute capability (never tensor values).
    ``capability`` stands in for the GPU's (tests); None reads q's device.
    """
    if paged:
        return False, "paged KV (block_table) and seqused_k run on the Triton kernels"
    if num_splits > 1:
        return False, "split-KV (num_splits > 1) runs on the Triton kernels"
    if dropout_p > 0:
        return False, "dropout runs on the Triton kernels"
    if alibi_slopes is not None:
        return False, "ALiBi (alibi_slopes) runs on the Triton kernels"
    if q_descale is not None or k_descale is not None or v_descale is not None:
        return False, "FP8 (q/k/v_descale) runs on the Triton kernels"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"{q.dtype} inputs run on the Triton kernels (the Hopper kernel takes float16 / bfloat16)"
    if not softmax_scale >= 0:
        return False, f"softmax_scale {softmax_scale} < 0 runs on the Triton kernels"
    d, dv = q.shape[-1], v.shape[-1]
    if d not in HEADDIMS or dv not in HEADDIMS:
        return False, (f"head dims (headdim, headdim_v) = ({d}, {dv}) run on the Triton kernels "
                       f"(the Hopper kernel takes {HEADDIMS} for each)")
    if capability is None:
        if q.device.type != "cuda":
            return False, f"the Hopper kernel runs on CUDA GPUs only, got {q.device.type} tensors"
        capability = _capability(q.device.index)
    if capability[0] != 9:
        return False, (f"compute capability {capability[0]}.{capability[1]} runs the Triton "
                       "kernels (the Hopper kernel needs 9.x)")
    if any(_tma_view(t) is None for t in (q, k, v)):
        return False, ("q, k or v has strides TMA cannot address (last dim contiguous, heads "
                       "dense, rows 16-byte aligned): the Triton kernels run the call")
    return True, ""


_logged: set = set()


def enabled() -> bool:
    """Whether backend None / "auto" / "torch_varlen" may choose this kernel: only with
    TORCH_VARLEN_HOPPER=1, for now (opt-in until a complete `make test-gpu` runs with it on;
    benchmarks/NOTES.md). backend="hopper" chooses it whatever the variable says."""
    return os.environ.get("TORCH_VARLEN_HOPPER", "0") == "1"


def select(backend: Optional[str], q, k, v, batch: int = 1, **features) -> bool:
    """True when this forward runs on the Hopper kernel; ``batch`` is the number of sequences,
    ``features`` are ``supported``'s.

    backend None / "auto" / "torch_varlen": when ``enabled()``, supported and not
    decoding-like (short query runs: the Triton kernels' small query tiles and automatic
    split-KV serve those), else the Triton kernels, logged once per reason; "hopper": this
    kernel or a RuntimeError saying why it cannot; "triton": never.
    """
    if backend == "triton" or (backend != "hopper" and not enabled()):
        return False
    ok, reason = supported(q, k, v, **features)
    if backend == "hopper":
        if not ok:
            raise RuntimeError(f"backend='hopper' cannot run this call: {reason}")
        return True
    if ok and features.get("num_splits", 0) == 0 and q.shape[0] <= 16 * max(batch, 1):
        ok, reason = False, ("short query runs (at most 16 rows per sequence on average, as in "
                             "decoding) run on the Triton kernels")
    key = (ok, reason)
    if key not in _logged:
        _logged.add(key)
        if ok:
            log.info("torch_varlen attention: the forward runs on the Hopper (sm_90a) kernel; "
                     "the backward on the Triton kernels")
        else:
            log.info("torch_varlen attention: the forward runs on the Triton kernels: %s", reason)
    return ok


# ---------------------------------------------------------------- launch


def _descriptor(view, block, dtype):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, gdtype)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), block, layout)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left=-1, window_right=-1,
            softcap=0.0, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=None):
    """-> (out (total_q, H, Dv) in q's dtype, lse (H, total_q) float32), for a call that
    ``supported`` accepts."""
    check_attention_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, None, cu_seqlens_q_padded,
                           cu_seqlens_k_padded, window_left, window_right, softcap)
    check_sink(q, sink)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded, cu_seqlens_k_padded,
                     q.shape[0], k.shape[0])
    total_q, nheads, d = q.shape
    total_k, nheads_k, dv = v.shape
    padded_q = cu_seqlens_q_padded is not None
    out = _triton._new(q.new_empty, padded_q, (total_q, nheads, dv))
    lse = q.new_empty((nheads, total_q), dtype=torch.float32)
    if padded_q:
        lse.fill_(float("-inf"))
    elif _triton._poison_outputs:
        lse.fill_(float("nan"))
    batch = cu_seqlens_q.shape[0] - 1
    if total_q > 0 and batch > 0:
        cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        start_q = cu_q if cu_seqlens_q_padded is None else cu_seqlens_q_padded.contiguous()
        start_k = cu_k if cu_seqlens_k_padded is None else cu_seqlens_k_padded.contiguous()
        bn = block_n(d, dv)
        q2, k2, v2 = (_tma_view(t) for t in (q, k, v))
        if total_k == 0:  # TMA needs a non-empty tensor; no key is read
            k2, v2 = (t.new_zeros((1, t.shape[1])) for t in (k2, v2))
        descs = (_descriptor(q2, [BM, d], q.dtype), _descriptor(k2, [bn, d], q.dtype),
                 _descriptor(v2, [bn, dv], q.dtype))
        if softcap > 0:
            qk_scale, cap_in, cap_out = 1.0, float(softmax_scale) / softcap, softcap * LOG2E
        else:
            qk_scale, cap_in, cap_out = float(softmax_scale) * LOG2E, 0.0, 0.0
        grid = (triton.cdiv(total_q, 2 * BM) + batch, nheads)
        with torch.cuda.device(q.device):
            _fwd_kernel[grid](*descs, out, lse, cu_q, cu_k, start_q, start_k, qk_scale, cap_in,
                              cap_out, int(window_left), int(window_right),
                              lse if sink is None else sink.contiguous(), int(sink is not None),
                              total_q, batch,
                              out.stride(0), out.stride(1), lse.stride(0),
                              GROUP=nheads // nheads_k, STAGES_=STAGES,
                              REVERSE=window_right >= 0, ZERO_TAIL=not padded_q,
                              BLOCK_B=_BLOCK_B, num_warps=4)
    return out, lse
