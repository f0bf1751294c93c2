"""Issue #15 prototype: a warp-specialized Hopper (sm_90a) varlen attention forward in Gluon.

Not wired into torch.ops.varlen: this file is the measured prototype the issue asks for before
choosing a tool. Structure (FA3's, written with Triton 3.6's Gluon):
  - one CTA per (128 query rows, sequence, head); three partitions by gl.warp_specialize:
    a producer warp (24 registers) that loads Q once and K/V tiles by TMA into a STAGES-deep
    shared-memory ring guarded by mbarriers (k_ready / v_ready per stage, `empty` counted by
    both consumers), and two consumer warpgroups of 64 query rows each (240 registers);
  - inside a consumer, the two GEMMs of consecutive key tiles overlap (S_j = Q K_j^T is issued
    before O += P_{j-1} V_{j-1}, and the softmax of S_j runs while P V is on the tensor cores);
    P stays in registers as the A operand of the P V wgmma;
  - exp2 with softmax_scale * log2(e) folded into one multiply-add; masks only on the key
    tiles that need them (the last partial tile, the causal diagonal); causal is bottom-right
    aligned (flash-attn), and the grid runs causal query tiles last-first (the longest first).
Features: bf16 / fp16, head dims 64 / 128 (one tile shape, BN = 128), GQA / MQA, causal or not,
ragged cu_seqlens. Output o (total_q, H, D) and lse (H, total_q) in natural log, -inf for a
row that sees no key (DESIGN.md).

Modes: --compile (here, without a GPU: registers, spills, setmaxnreg, shared memory),
--check (GPU: against torch_varlen.reference in float64, NaN-poisoned outputs),
--bench --out F (GPU: ours Triton, FA4 direct, this prototype, one run, warm medians).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

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

BM = 64  # query rows per consumer warpgroup (two per CTA)
BN = 128  # keys per tile
STAGES = 2
LOG2E = 1.4426950408889634


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty,
              q_row, kv_row, q_col, kv_col, n_blocks):
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
        # A fresh barrier passes a wait for parity 1, so the first NS tiles do not wait.
        mbarrier.wait(empty.index(s), ((j // NS) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * TN, kv_col], k_ready.index(s),
                                        k_smem.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * TN, kv_col], v_ready.index(s),
                                        v_smem.index(s))


@gluon.jit
def _softmax_step(s, m_i, l_i, j, first_masked, rows, seqlen_k, diag, causal, qk_scale,
                  TN: gl.constexpr, s_layout: gl.constexpr):
    """Masks tile j when it needs it; -> (p, m_new, l_new, alpha), m in the log2 domain."""
    if j >= first_masked:
        cols = j * TN + gl.arange(0, TN, layout=gl.SliceLayout(0, s_layout))
        # keys [0, limit) of each row: all of them, or up to the bottom-right diagonal
        limit = gl.where(causal != 0, gl.minimum(rows + diag + 1, seqlen_k), seqlen_k)
        s = gl.where(gl.expand_dims(cols, 0) < gl.expand_dims(limit, 1), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _consumer(q, k_smem, v_smem, q_bar, k_ready, v_ready, empty, o_ptr, lse_ptr,
              m_lo, q_start, seqlen_q, seqlen_k, head, n_blocks, qk_scale, causal,
              stride_o_tok, stride_o_head, stride_lse_head):
    """One warpgroup's 64 query rows, m_lo the first; q its Q tile in shared memory."""
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
    diag = seqlen_k - seqlen_q
    # Tiles before first_masked need no mask: all their keys exist, and under causal all are
    # on or left of the diagonal for this warpgroup's first row.
    first_masked = seqlen_k // TN
    if causal:
        first_masked = gl.maximum(gl.minimum(first_masked, (m_lo + diag + 1) // TN), 0)
    m_i = gl.full([TM], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([TM], gl.float32, layout=row_layout)
    acc = gl.zeros([TM, DV], gl.float32, layout=o_layout)
    s_zero = gl.zeros([TM, TN], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if n_blocks > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, first_masked, rows, seqlen_k, diag,
                                           causal, qk_scale, TN, s_layout)
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
            p_new, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j, first_masked, rows, seqlen_k,
                                                   diag, causal, qk_scale, TN, s_layout)
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

    l_o = gl.convert_layout(l_i, orow_layout)
    out = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)
    orows = m_lo + gl.arange(0, TM, layout=orow_layout)
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    offs = (gl.expand_dims((q_start + orows).to(gl.int64) * stride_o_tok, 1)
            + head * stride_o_head + gl.expand_dims(cols, 0))
    gl.store(o_ptr + offs, out.to(dtype), mask=gl.expand_dims(orows < seqlen_q, 1))
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_i)) * 0.6931471805599453)
    gl.store(lse_ptr + head * stride_lse_head + q_start + rows, lse, mask=rows < seqlen_q)


@gluon.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, cu_q, cu_k, qk_scale, causal,
                stride_o_tok, stride_o_head, stride_lse_head,
                GROUP: gl.constexpr, STAGES_: gl.constexpr):
    TM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    TN: gl.constexpr = k_desc.block_type.shape[0]
    DV: gl.constexpr = v_desc.block_type.shape[1]
    m_block = gl.program_id(0)
    if causal:  # the last query tiles see the most keys: start them first
        m_block = gl.num_programs(0) - 1 - m_block
    b = gl.program_id(1)
    head = gl.program_id(2)
    q_start = gl.load(cu_q + b)
    seqlen_q = gl.load(cu_q + b + 1) - q_start
    k_start = gl.load(cu_k + b)
    seqlen_k = gl.load(cu_k + b + 1) - k_start
    if m_block * 2 * TM < seqlen_q:
        n_end = seqlen_k
        if causal:
            n_end = gl.maximum(gl.minimum(n_end, (m_block + 1) * 2 * TM + seqlen_k - seqlen_q), 0)
        n_blocks = gl.cdiv(n_end, TN)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, TM, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES_, TN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES_, TN, DV], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES_):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumer warpgroups release a stage
        fence_async_shared()

        kv_head = head // GROUP
        ring = (k_smem, v_smem, q_bar, k_ready, v_ready, empty, o_ptr, lse_ptr)
        tail = (q_start, seqlen_q, seqlen_k, head, n_blocks, qk_scale, causal,
                stride_o_tok, stride_o_head, stride_lse_head)
        m_lo = m_block * 2 * TM
        gl.warp_specialize([
            (_consumer, (q_smem.index(0), ) + ring + (m_lo, ) + tail),
            (_consumer, (q_smem.index(1), ) + ring + (m_lo + TM, ) + tail),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready,
                         empty, q_start + m_block * 2 * TM, k_start, head * D, kv_head * D,
                         n_blocks)),
        ], [4, 1], [240, 24])


def _layout(block, torch_dtype):
    gdtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[torch_dtype]
    return gl.NVMMASharedLayout.get_default_for(block, gdtype)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale=None,
              causal=False):
    """-> (out (total_q, H, Dv), lse (H, total_q)); q, k, v contiguous packed (total, H, D)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    total_q, nheads, d = q.shape
    total_k, nheads_k, dv = v.shape
    if q.dtype not in (torch.bfloat16, torch.float16) or not (k.dtype == v.dtype == q.dtype):
        raise ValueError(f"q, k, v: expected one of bfloat16 / float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d not in (64, 128) or dv != d:
        raise ValueError(f"head dims: the prototype has one tile shape for 64 and 128, got {d}, {dv}")
    if nheads % nheads_k:
        raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k})")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty(total_q, nheads, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(nheads, total_q, device=q.device, dtype=torch.float32)
    q2, k2, v2 = (t.reshape(t.shape[0], -1) for t in (q, k, v))
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BM, d], _layout([BM, d], q.dtype))
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BN, d], _layout([BN, d], q.dtype))
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BN, dv], _layout([BN, dv], q.dtype))
    batch = cu_seqlens_q.numel() - 1
    grid = (triton.cdiv(max_seqlen_q, 2 * BM), batch, nheads)
    _fwd_kernel[grid](q_desc, k_desc, v_desc, out, lse, cu_seqlens_q, cu_seqlens_k,
                      scale * LOG2E, int(causal), out.stride(0), out.stride(1), lse.stride(0),
                      GROUP=nheads // nheads_k, STAGES_=STAGES, num_warps=4)
    return out, lse


# ---------------------------------------------------------------- --compile (no GPU needed)

def _resource_usage(cubin):
    """Registers and spill stores from cuobjdump (n_regs needs a GPU to load the kernel)."""
    import shutil, subprocess, tempfile
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def compile_report(d=128, group=1, dtype="bf16"):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def desc(block):
        return f"tensordesc<{dtype}{list(block)},{_layout(list(block), tdt)!r}>"

    sig = {"q_desc": desc([BM, d]), "k_desc": desc([BN, d]), "v_desc": desc([BN, d]),
           "o_ptr": f"*{dtype}", "lse_ptr": "*fp32", "cu_q": "*i32", "cu_k": "*i32",
           "qk_scale": "fp32", "causal": "i32", "stride_o_tok": "i32", "stride_o_head": "i32",
           "stride_lse_head": "i32", "GROUP": "constexpr", "STAGES_": "constexpr"}
    src = GluonASTSource(_fwd_kernel, sig, constexprs={"GROUP": group, "STAGES_": STAGES})
    t0 = time.time()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    report = {
        "head_dim": d, "group": group, "dtype": dtype, "compile_s": round(time.time() - t0, 1),
        "shared_bytes": k.metadata.shared, **_resource_usage(k.asm["cubin"]),
        "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32 (\d+)", ptx))),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "p_through_shared": bool(re.search(r"st\.shared.*\n.*wgmma.*\.bf16\.bf16", ptx)),
    }
    return report


# ---------------------------------------------------------------- --check (GPU)

def _ragged(lengths, device):
    lens = torch.tensor(lengths, device=device)
    return torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)


def check(device="cuda"):
    from torch_varlen import reference

    cases = []
    shapes = [  # (q lengths, k lengths, H, Hk, D)
        ([1, 63, 64, 65, 127, 128, 129, 300, 1000], None, 4, 4, 128),
        ([17, 256, 513, 2048], None, 8, 2, 128),   # GQA
        ([5, 130, 700], None, 6, 1, 128),           # MQA
        ([1, 100, 129, 640], None, 4, 4, 64),
        ([40, 200, 7], [300, 60, 7], 4, 2, 128),    # more and fewer keys than queries
    ]
    failures = []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for lq, lk, h, hk, d in shapes:
            lk = lk or lq
            for causal in (False, True):
                cq, ck = _ragged(lq, device), _ragged(lk, device)
                q = torch.randn(sum(lq), h, d, device=device, dtype=dtype, generator=g)
                k = torch.randn(sum(lk), hk, d, device=device, dtype=dtype, generator=g)
                v = torch.randn(sum(lk), hk, d, device=device, dtype=dtype, generator=g)
                torch.cuda.synchronize()
                out, lse = attention(q, k, v, cq, ck, max(lq), causal=causal)
                # poison: any row the kernel leaves unwritten shows up as NaN
                out_p = torch.full_like(out, float("nan"))
                lse_p = torch.full_like(lse, float("nan"))
                out_p.copy_(out)
                lse_p.copy_(lse)
                ref_o, ref_lse, _ = reference.attention(q.double(), k.double(), v.double(), cq, ck,
                                                        causal=causal)
                low_o, _, _ = reference.attention(q, k, v, cq, ck, causal=causal)
                err = (out.double() - ref_o).abs().max().item()
                base = (low_o.double() - ref_o).abs().max().item()
                finite = torch.isfinite(ref_lse)
                lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
                lse_inf_ok = bool((lse[~finite] == float("-inf")).all())
                ok = (not torch.isnan(out).any().item()) and err <= 2 * base + 1e-5 and lse_err <= 1e-3 \
                    and lse_inf_ok
                cases.append(dict(dtype=str(dtype), q_lengths=lq, k_lengths=lk, heads=[h, hk], d=d,
                                  causal=causal, max_err=err, ref_low_precision_err=base,
                                  lse_err=lse_err, ok=ok))
                if not ok:
                    failures.append(cases[-1])
    return {"cases": len(cases), "failed": len(failures), "failures": failures, "all": cases}


# ---------------------------------------------------------------- --bench (GPU)

def bench(out_path, rounds=5):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import bench_attention as ba
    from triton.testing import do_bench

    import torch_varlen

    fa4, fa4_version = ba.load_fa4()
    rows = []
    for mean in (512, 2048, 8192):
        cfg = ba.Config(mean=mean, total=65536, dtype="bfloat16", nheads=16, nheads_k=16, headdim=128)
        x = ba.Inputs(cfg, "cuda")
        for causal in (False, True):
            impls = {
                "torch_varlen": lambda: torch_varlen.varlen_attention(
                    x.q, x.k, x.v, x.cu, x.cu, x.max_len, x.max_len, softmax_scale=x.scale,
                    causal=causal)[0],
                "prototype": lambda: attention(x.q, x.k, x.v, x.cu, x.cu, x.max_len, x.scale,
                                               causal)[0],
            }
            if fa4 is not None:
                fa4_call = ba.build_fa4(x, causal, fa4)[0]
                impls["fa4"] = lambda f=fa4_call: f(x.q, x.k, x.v)
            ref = impls["torch_varlen"]().float()
            f = ba.flops(x.lengths, cfg.nheads, cfg.headdim, causal)
            times = {name: [] for name in impls}
            diffs = {}
            for name, fn in impls.items():
                diffs[name] = (fn().float() - ref).abs().max().item()  # also the warm-up call
            for _ in range(rounds):  # every impl in each round, so drift hits all alike
                for name, fn in impls.items():
                    times[name].append(do_bench(fn, warmup=25, rep=200, return_mode="median"))
            for name in impls:
                ms = statistics.median(times[name])
                rows.append(dict(mean=mean, causal=causal, impl=name, ms=ms,
                                 tflops=f / ms / 1e9, rounds_ms=times[name],
                                 max_abs_diff_vs_torch_varlen=diffs[name]))
                print(f"mean {mean:5d} causal {causal!s:5} {name:13s} {ms:8.3f} ms "
                      f"{f / ms / 1e9:6.0f} TFLOP/s  diff {diffs[name]:.2e}", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, fa4=fa4_version if fa4 is not None else None,
                method=f"triton.testing.do_bench(warmup=25 ms, rep=200 ms, median) per impl, "
                       f"{rounds} rounds with every impl in each round, median of the rounds; "
                       "one warm-up call each before the rounds; bf16, hd128, 16 heads, "
                       "65,536 tokens, lengths uniform in [mean/4, 2*mean] (bench_attention)")
    with open(out_path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = {}
    if args.compile:
        result["compile"] = [compile_report(d, g) for d, g in ((128, 1), (64, 1), (128, 4))]
        print(json.dumps(result["compile"], indent=1), flush=True)
    if args.check:
        result["check"] = check()
        print(json.dumps({k: v for k, v in result["check"].items() if k != "all"}, indent=1),
              flush=True)
    if args.out and result:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.bench:
        bench(args.out.replace(".json", "_bench.json") if args.out else "proto_bench.json")
    return 1 if result.get("check", {}).get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
