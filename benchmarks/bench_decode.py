"""KV-cache decoding: one query per sequence against contiguous and paged caches (issue #14).

Implementations (`impl` in the rows), all measured in one run, interleaved pass by pass:
  torch_varlen  ours: torch_varlen.flash_attn_with_kvcache(q, k_cache, v_cache,
                cache_seqlens=...) on the contiguous cache, and with block_table on the paged
                one; num_splits=0 (the default heuristic). At batch <= 8 (contiguous) also
                num_splits=1 (no split), to show what the heuristic buys. Under GQA it packs
                the G query heads of a kv head into G query rows (each kv head's keys read
                once).
  torch_varlen_per_head  (GQA configs only) the same attention through
                torch_varlen.flash_attn_varlen_func (q (B, H, D), seqused_k, the cache as
                packed rows or block_table): no head packing, so each kv head's keys are read
                by its G query heads' programs; shows what the packing buys.
  fa4           flash_attn.cute.interface.flash_attn_varlen_func called directly: q (B, 1, H, D),
                seqused_k, page_table for the paged cache, num_splits=0 (its heuristic; plain
                call if that kwarg is refused). Rows say "fa4: not installed" when it does not
                import (TORCH_VARLEN_FA4_SITE: a site-packages directory to add).
  sdpa          torch.nn.functional.scaled_dot_product_attention on CUDA's flash backend
                (memory-efficient as the fallback, never math), on the contiguous cache viewed
                (B, Hk, L, D) (no copy). Every sequence of a timed config
                has the same length, so no mask is needed. GQA: the G = H / Hk query heads of a
                kv head are folded into the query length, q (B, Hk, G, D): exact for one
                non-causal query per sequence, and what enable_gqa would compute.
  sdpa          (layout "paged") the same after gathering the pages into a contiguous
                (B, L, Hk, D) copy: the gather IS timed (it is what serving a paged cache with
                SDPA costs), so this row moves ~3x the KV bytes.

Grid (default): batch {1, 8, 32, 128, 256} x cache length {1k, 8k, 32k, 128k} x heads
{32/8 (GQA), 32/32 (MHA)}, head dim 128, bf16, cache_seqlens = the cache length for every
sequence; paged caches with block_size 256 and a shuffled block table (block ids a random
permutation, so consecutive pages of a sequence are not adjacent). Configs whose K+V cache
exceeds --kv-limit-gb (40 GB) are skipped and listed (GQA 128x128k, 256x128k; MHA 32x128k,
128x32k and up, 256x32k and up): the contiguous cache, its paged copy and SDPA's gather
buffer are all resident at once (3x the KV bytes).

Prefill with paged KV: torch_varlen.flash_attn_varlen_func, batch 8 x 4096 query tokens
attending causally to their own 4096 keys, packed k/v vs the same keys in a paged cache
(block_table, shuffled), both head configs.

Measured per row: median / best / max of --passes timed passes (us), spread = (max - min) /
median; kv_bytes = sum of cache lengths x Hk x D x 2 (K and V) x 2 bytes (bf16); kv_GBps =
kv_bytes / median; of_copy = kv_GBps / copy_GBps, where copy_GBps = 2 x N / t of a
dst.copy_(src) of N = 1 GiB measured in the same run (read + write bytes: the DRAM traffic a
copy sustains; a decode kernel's traffic is all reads, so of_copy compares total DRAM traffic).
For context the run also measures a read-only stream (src.sum(), N / t: read_GBps) and gives
of_read = kv_GBps / read_GBps. A pass on CUDA: a 256 MB buffer is zeroed (L2 flushed), a
torch.cuda._sleep spin is queued so the host's launch work for the call is hidden (at least
~1 ms, and at least twice the call's issue time in its warm-up: spin_us per row), then CUDA
events bracket one call: the times are GPU time of one decode step, as under a CUDA graph
(host_gaps_possible marks a row whose issue still outlasted 0.9 x its spin). host_us: the
host's median time to issue the call (eager overhead, not in the GPU time).
CPU (--smoke): perf_counter around one call. Two untimed warm-up calls per implementation
first (Triton / FA4 compiles).

Correctness first: before any timing, each implementation (and layout) runs a small case
(3 sequences of 1, 300 and 700 keys, block size as timed, the timed head config) and is
compared with torch_varlen.reference.attention in float64; it must be within 2x the error of
the same reference run in bf16 + 1e-3, or it is refused (rows say "refused: ..." and it is
not timed). The timed configs' outputs are also compared with SDPA's (max_abs_diff_vs_sdpa).

Targets (printed PASS / MISS, recorded in the meta; never fail the run): ours >= 0.9x FA4 and
ours >= 75% of copy bandwidth (of_copy) for caches >= 8k; paged prefill >= 0.95x contiguous.

    python benchmarks/bench_decode.py --out $OUT/decode.json --record benchmarks/results/h200.json
    python benchmarks/bench_decode.py --smoke --out /tmp/decode_smoke.json    # CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_varlen
from torch_varlen import reference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_attention import load_fa4  # noqa: E402
from results_file import record  # noqa: E402

BENCH = "decode"
FA4_MISSING = "fa4: not installed"
HEADS = {"gqa": (32, 8), "mha": (32, 32)}
SMOKE_HEADS = {"gqa": (4, 2), "mha": (4, 4)}
SPIN_CYCLES = 2_000_000  # ~1 ms at the H200's ~2 GHz: longer than issuing one call takes
FLUSH_BYTES = 256 * 2**20
COPY_BYTES = 2**30


def parse_list(s):
    return [int(x.lower().replace("k", "")) * (1024 if x.lower().endswith("k") else 1)
            for x in s.split(",")]


# ---------------------------------------------------------------- timing

class Timer:
    """time(fn) -> (gpu or wall us of one call, host us to issue it)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.measured_spin_us = None
        if self.cuda:
            self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def spin_us(self):
        """GPU time of the spin queued before each timed call (None on the CPU)."""
        if not self.cuda:
            return None
        start, end = self.events
        torch.cuda._sleep(SPIN_CYCLES // 10)  # first call: module load
        start.record()
        torch.cuda._sleep(SPIN_CYCLES)
        end.record()
        end.synchronize()
        self.measured_spin_us = start.elapsed_time(end) * 1e3
        return self.measured_spin_us

    def spin_cycles(self, host_us):
        """Spin cycles that cover twice ``host_us`` of issue work (at least SPIN_CYCLES), so that
        a call whose eager issue is slow still runs on the GPU without gaps inside the bracket."""
        if not self.cuda:
            return 0
        if self.measured_spin_us is None:
            self.spin_us()
        return SPIN_CYCLES * max(1, math.ceil(2 * host_us / self.measured_spin_us))

    def time(self, fn, spin_cycles=SPIN_CYCLES):
        if not self.cuda:
            t = time.perf_counter()
            fn()
            us = (time.perf_counter() - t) * 1e6
            return us, us
        start, end = self.events
        self.flush.zero_()
        torch.cuda._sleep(spin_cycles)
        start.record()
        t = time.perf_counter()
        fn()
        host = (time.perf_counter() - t) * 1e6
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3, host


def sig(x, digits=4):
    """x rounded to `digits` significant digits (tiny CPU smoke rates stay nonzero)."""
    return float(f"{x:.{digits}g}")


def stats(times):
    med = statistics.median(times)
    return {"median_us": round(med, 2), "best_us": round(min(times), 2),
            "max_us": round(max(times), 2),
            "spread": round((max(times) - min(times)) / med, 4) if med > 0 else 0.0,
            "passes": len(times)}


def run_interleaved(fns: dict, timer: Timer, passes: int, warmup: int = 2):
    """{name: fn} -> {name: (stats, host_us) or an error string}; pass p of every fn, then p+1."""
    ok, out, spins = {}, {}, {}
    for name, fn in fns.items():
        try:
            issue = []
            for _ in range(warmup):
                if timer.cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                issue.append((time.perf_counter() - t) * 1e6)
            ok[name] = fn
            spins[name] = timer.spin_cycles(min(issue))  # the fastest warm-up issue: no compile
        except Exception as e:  # one failing implementation must not stop the run
            out[name] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    times = {n: [] for n in ok}
    hosts = {n: [] for n in ok}
    for _ in range(passes):
        for name, fn in ok.items():
            t, h = timer.time(fn, spins[name])
            times[name].append(t)
            hosts[name].append(h)
    for name in ok:
        st = stats(times[name])
        if timer.cuda:
            st["spin_us"] = round(timer.measured_spin_us * spins[name] / SPIN_CYCLES, 1)
        out[name] = (st, round(statistics.median(hosts[name]), 1))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device, timer, passes, nbytes):
    """(copy_GBps counting read + write, read_GBps of a sum) and their rows."""
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    res = run_interleaved({"copy": lambda: dst.copy_(src),
                           "read": lambda: src.sum(dtype=torch.float32)}, timer, passes)
    rows = []
    gbps = {}
    for name, moved in (("copy", 2 * nbytes), ("read", nbytes)):
        st, host = res[name]
        gbps[name] = moved / (st["median_us"] * 1e-6) / 1e9
        rows.append({"bench": BENCH, "case": name, "impl": "torch", "bytes": moved,
                     "what": "dst.copy_(src): read + write bytes" if name == "copy"
                     else "src.sum(): bytes read", **st,
                     "GBps": round(gbps[name], 1), "best_GBps": round(moved / (st["best_us"] * 1e-6) / 1e9, 1),
                     "status": "ok"})
    del src, dst
    return gbps["copy"], gbps["read"], rows


# ---------------------------------------------------------------- caches and implementations

class Case:
    """q, a contiguous cache and the same keys in a shuffled paged cache."""

    def __init__(self, lengths, nheads, nheads_k, headdim, dtype, device, block_size, seed=0,
                 cache_len=None):
        self.lengths = list(lengths)
        self.batch = len(lengths)
        self.nheads, self.nheads_k, self.headdim = nheads, nheads_k, headdim
        self.block_size = block_size
        g = torch.Generator(device=device).manual_seed(seed)
        self.cache_len = cache_len or max(lengths)
        nblk = math.ceil(self.cache_len / block_size)
        self.cache_len_padded = nblk * block_size  # contiguous cache rows: the paged capacity
        shape = (self.batch, self.cache_len_padded, nheads_k, headdim)
        self.q = torch.randn(self.batch, 1, nheads, headdim, generator=g, device=device, dtype=dtype)
        self.k = torch.randn(shape, generator=g, device=device, dtype=dtype)
        self.v = torch.randn(shape, generator=g, device=device, dtype=dtype)
        self.seqlens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        # paged: block j of sequence b goes to slot perm[b * nblk + j]
        perm = torch.randperm(self.batch * nblk, generator=torch.Generator().manual_seed(seed + 1))
        perm = perm.to(device)
        self.block_table = perm.view(self.batch, nblk).to(torch.int32)
        self.kp = torch.empty((self.batch * nblk, block_size, nheads_k, headdim), device=device, dtype=dtype)
        self.vp = torch.empty_like(self.kp)
        self.kp[perm] = self.k.view(-1, block_size, nheads_k, headdim)
        self.vp[perm] = self.v.view(-1, block_size, nheads_k, headdim)
        self.scale = headdim ** -0.5

    def kv_bytes(self):
        return sum(self.lengths) * self.nheads_k * self.headdim * 2 * self.k.element_size()

    def reference(self, dtype):
        """reference.attention of every sequence in `dtype` -> (B, 1, H, D)."""
        q = self.q.reshape(self.batch, self.nheads, self.headdim).to(dtype)
        ks = torch.cat([self.k[b, :n] for b, n in enumerate(self.lengths)]).to(dtype)
        vs = torch.cat([self.v[b, :n] for b, n in enumerate(self.lengths)]).to(dtype)
        cu_q = torch.arange(self.batch + 1, dtype=torch.int32, device=q.device)
        cu_k = F.pad(self.seqlens.cumsum(0, dtype=torch.int32), (1, 0))
        out = reference.attention(q, ks, vs, cu_q, cu_k, softmax_scale=self.scale)[0]
        return out.view(self.batch, 1, self.nheads, self.headdim)


def ours(case: Case, paged: bool, num_splits: int = 0):
    if paged:
        return lambda: torch_varlen.flash_attn_with_kvcache(
            case.q, case.kp, case.vp, cache_seqlens=case.seqlens, block_table=case.block_table,
            softmax_scale=case.scale, num_splits=num_splits)
    return lambda: torch_varlen.flash_attn_with_kvcache(
        case.q, case.k, case.v, cache_seqlens=case.seqlens, softmax_scale=case.scale,
        num_splits=num_splits)


def ours_per_head(case: Case, paged: bool):
    """The decode attention through flash_attn_varlen_func (one program row per query head)
    -> (B, 1, H, D), as the other implementations."""
    b, s_c = case.batch, case.cache_len_padded
    q = case.q.view(b, case.nheads, case.headdim)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    if paged:
        k, v, cu_k, extra = case.kp, case.vp, None, dict(block_table=case.block_table)
    else:
        k, v = (t.view(b * s_c, case.nheads_k, case.headdim) for t in (case.k, case.v))
        cu_k, extra = torch.arange(0, (b + 1) * s_c, s_c, dtype=torch.int32, device=q.device), {}
    return lambda: torch_varlen.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 1, s_c, softmax_scale=case.scale, seqused_k=case.seqlens, **extra)[:, None]


def _sdpa_call(q, k, v, scale):
    """q (B, 1, H, D), k / v (B, L, Hk, D) -> (B, 1, H, D); GQA folded into the query length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, _, h, d = q.shape
    hk = k.shape[2]
    qf = q.reshape(b, hk, h // hk, d)  # query head h = kv head * G + g
    # flash first; never the math backend on CUDA (it would materialise the scores)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.reshape(b, 1, h, d)


def sdpa(case: Case, paged: bool):
    equal = len(set(case.lengths)) == 1
    lengths = case.lengths

    def contiguous_keys():
        return case.k, case.v

    def gathered_keys():  # the pages of every sequence, in order: one copy each of K and V
        bt = case.block_table.long()
        shape = (case.batch, -1, case.nheads_k, case.headdim)
        return case.kp[bt].view(shape), case.vp[bt].view(shape)

    keys = gathered_keys if paged else contiguous_keys

    def call():
        k, v = keys()
        if equal:
            n = lengths[0]
            return _sdpa_call(case.q, k[:, :n], v[:, :n], case.scale)
        return torch.cat([_sdpa_call(case.q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], case.scale)
                          for b, n in enumerate(lengths)])
    return call


class FA4:
    """flash_attn.cute's flash_attn_varlen_func in decode form, or the reason it is missing."""

    def __init__(self, device):
        self.fn, self.version = (None, "not loaded on the CPU") if device.type != "cuda" else load_fa4()
        self.import_error = None
        if self.fn is None:
            self.import_error, self.version = self.version, None
        self.kwargs = {"num_splits": 0}

    def call(self, case: Case, paged: bool):
        fn, kw = self.fn, self.kwargs
        extra = dict(page_table=case.block_table) if paged else {}
        k, v = (case.kp, case.vp) if paged else (case.k, case.v)

        def run():
            out = fn(case.q, k, v, seqused_k=case.seqlens, softmax_scale=case.scale, **extra, **kw)
            return out[0] if isinstance(out, tuple) else out
        return run


def impls(case: Case, fa4: FA4, layouts, small_batch_nosplit: bool):
    """{(impl, layout, num_splits): callable or a status string}."""
    out = {}
    for paged in layouts:
        layout = "paged" if paged else "contiguous"
        out[("torch_varlen", layout, 0)] = ours(case, paged)
        if small_batch_nosplit and not paged:
            out[("torch_varlen", layout, 1)] = ours(case, paged, 1)
        if case.nheads != case.nheads_k:
            out[("torch_varlen_per_head", layout, 0)] = ours_per_head(case, paged)
        out[("fa4", layout, 0)] = fa4.call(case, paged) if fa4.fn else FA4_MISSING
        out[("sdpa", layout, 0)] = sdpa(case, paged)
    return out


# ---------------------------------------------------------------- correctness gate

def check_impls(heads, dims, dtype, device, block_size, fa4: FA4, smoke):
    """Small case vs the float64 reference -> {(impl, layout): None (ok) or refusal text}."""
    h, hk, d = dims
    lengths = [1, 60, 37] if smoke else [1, 300, 700]
    case = Case(lengths, h, hk, d, dtype, device, block_size, seed=123)
    ref64 = case.reference(torch.float64)
    err_same = (case.reference(dtype).double() - ref64).abs().max().item()
    bound = 2 * err_same + 1e-3
    verdict = {}
    for (impl, layout, splits), fn in impls(case, fa4, (False, True), False).items():
        if isinstance(fn, str):
            verdict[(impl, layout)] = fn
            continue
        attempts = [fa4.kwargs, {}] if impl == "fa4" else [None]
        msg = None
        for kw in attempts:
            if impl == "fa4":
                fa4.kwargs = kw
                fn = fa4.call(case, layout == "paged")
            try:
                out = fn()
                sync(device)
                err = (out.double() - ref64).abs().max().item()
                msg = None if err <= bound else f"refused: max err {err:.3g} > bound {bound:.3g}"
            except Exception as e:
                msg = f"refused: {type(e).__name__}: {str(e).strip()[:200]}"
            if msg is None:
                break
        verdict[(impl, layout)] = msg
        print(f"  check {heads} {impl:12s} {layout:10s}: "
              f"{'ok' if msg is None else msg} (bound {bound:.3g})", flush=True)
    return verdict


def check_prefill(heads, dims, dtype, device, block_size, smoke):
    """Paged and packed prefill (causal) vs the float64 reference on 2 sequences."""
    lengths = [40, 23] if smoke else [300, 517]
    p = Prefill(lengths, *dims, dtype, device, block_size, seed=7)
    ref64 = reference.attention(p.q.double(), p.k.double(), p.v.double(), p.cu, p.cu, causal=True)[0]
    refd = reference.attention(p.q, p.k, p.v, p.cu, p.cu, causal=True)[0]
    bound = 2 * (refd.double() - ref64).abs().max().item() + 1e-3
    verdict = {}
    for layout, fn in (("contiguous", p.call(False)), ("paged", p.call(True))):
        try:
            err = (fn().double() - ref64).abs().max().item()
            verdict[layout] = None if err <= bound else f"refused: max err {err:.3g} > bound {bound:.3g}"
        except Exception as e:
            verdict[layout] = f"refused: {type(e).__name__}: {str(e).strip()[:200]}"
        print(f"  check {heads} prefill {layout:10s}: {verdict[layout] or 'ok'} (bound {bound:.3g})", flush=True)
    return verdict


class Prefill:
    def __init__(self, lengths, h, hk, d, dtype, device, block_size, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        total = sum(lengths)
        self.lengths = lengths
        self.q = torch.randn(total, h, d, generator=g, device=device, dtype=dtype)
        self.k = torch.randn(total, hk, d, generator=g, device=device, dtype=dtype)
        self.v = torch.randn(total, hk, d, generator=g, device=device, dtype=dtype)
        self.cu = F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)
        self.max_len = max(lengths)
        nblk = math.ceil(self.max_len / block_size)
        b = len(lengths)
        perm = torch.randperm(b * nblk, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        self.block_table = perm.view(b, nblk).to(torch.int32)
        self.kp = torch.zeros((b * nblk, block_size, hk, d), device=device, dtype=dtype)
        self.vp = torch.zeros_like(self.kp)
        for i, n in enumerate(lengths):  # key j of sequence i -> page bt[i, j // bs], slot j % bs
            j = torch.arange(n, device=device)
            blocks = self.block_table[i].long()[j // block_size]
            start = int(self.cu[i])
            self.kp[blocks, j % block_size] = self.k[start:start + n]
            self.vp[blocks, j % block_size] = self.v[start:start + n]
        self.scale = d ** -0.5
        self.flops = sum(4 * n * n * h * d for n in lengths) / 2  # causal

    def call(self, paged):
        m = self.max_len
        if paged:
            return lambda: torch_varlen.flash_attn_varlen_func(
                self.q, self.kp, self.vp, self.cu, self.cu, m, m, softmax_scale=self.scale,
                causal=True, block_table=self.block_table)
        return lambda: torch_varlen.flash_attn_varlen_func(
            self.q, self.k, self.v, self.cu, self.cu, m, m, softmax_scale=self.scale, causal=True)


# ---------------------------------------------------------------- the run

def decode_rows(case: Case, heads, block_size, fa4, verdict, timer, passes, copy_gbps, read_gbps,
                nosplit):
    fns = impls(case, fa4, (False, True), nosplit)
    timed = {k: f for k, f in fns.items() if not isinstance(f, str) and verdict.get(k[:2]) is None}
    res = run_interleaved(timed, timer, passes)
    ref_out = None
    if ("sdpa", "contiguous", 0) in timed:
        try:
            ref_out = timed[("sdpa", "contiguous", 0)]().float()
        except Exception:
            ref_out = None
    kv = case.kv_bytes()
    rows = []
    for key, fn in fns.items():
        impl, layout, splits = key
        row = {"bench": BENCH, "case": "decode", "impl": impl, "layout": layout,
               "block_size": block_size if layout == "paged" else None, "heads": heads,
               "nheads": case.nheads, "nheads_k": case.nheads_k, "headdim": case.headdim,
               "dtype": str(case.q.dtype).replace("torch.", ""), "batch": case.batch,
               "cache_len": case.lengths[0], "num_splits": splits, "kv_bytes": kv}
        if impl == "fa4" and fa4.fn is not None:
            row["fa4_kwargs"] = dict(fa4.kwargs)
        if isinstance(fn, str):
            row["status"] = fn
        elif verdict.get(key[:2]) is not None:
            row["status"] = verdict[key[:2]]
        elif isinstance(res.get(key), str):
            row["status"] = res[key]
        else:
            st, host = res[key]
            gbps = kv / (st["median_us"] * 1e-6) / 1e9
            row.update(st, host_us=host, kv_GBps=sig(gbps), of_copy=sig(gbps / copy_gbps),
                       of_read=sig(gbps / read_gbps), status="ok")
            if ref_out is not None and key != ("sdpa", "contiguous", 0):
                row["max_abs_diff_vs_sdpa"] = round((fn().float() - ref_out).abs().max().item(), 5)
        rows.append(row)
    return rows


def prefill_rows(heads, dims, dtype, device, block_size, batch, qlen, verdict, timer, passes):
    p = Prefill([qlen] * batch, *dims, dtype, device, block_size)
    fns = {layout: p.call(layout == "paged") for layout in ("contiguous", "paged")
           if verdict.get(layout) is None}
    res = run_interleaved(fns, timer, passes)
    diff = None
    if len(fns) == 2 and all(not isinstance(res[k], str) for k in fns):
        diff = round((fns["paged"]().float() - fns["contiguous"]().float()).abs().max().item(), 5)
    rows = []
    for layout in ("contiguous", "paged"):
        row = {"bench": BENCH, "case": "prefill", "impl": "torch_varlen", "layout": layout,
               "block_size": block_size if layout == "paged" else None, "heads": heads,
               "nheads": dims[0], "nheads_k": dims[1], "headdim": dims[2],
               "dtype": str(dtype).replace("torch.", ""), "batch": batch, "q_len": qlen,
               "cache_len": qlen, "causal": True}
        if verdict.get(layout) is not None:
            row["status"] = verdict[layout]
        elif isinstance(res[layout], str):
            row["status"] = res[layout]
        else:
            st, host = res[layout]
            row.update(st, host_us=host, tflops=round(p.flops / (st["median_us"] * 1e-6) / 1e12, 1),
                       status="ok")
            if layout == "paged" and diff is not None:
                row["max_abs_diff_vs_contiguous"] = diff
        rows.append(row)
    del p
    return rows


def targets(rows):
    """[(target, config text, value, needed, 'PASS' / 'MISS' / 'n/a: why')]."""
    out = []
    ok = lambda r: r.get("status") == "ok"
    dec = {(r["heads"], r["layout"], r["batch"], r["cache_len"], r["impl"], r["num_splits"]): r
           for r in rows if r.get("case") == "decode"}
    for key, r in sorted(dec.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        heads, layout, batch, L, impl, splits = key
        if impl != "torch_varlen" or splits != 0 or L < 8192:
            continue
        cfg = f"{heads} {layout} B{batch} L{L // 1024}k"
        if not ok(r):
            out.append(("ours >= 75% of copy bandwidth (cache >= 8k)", cfg, None, 0.75, f"n/a: {r['status']}"))
            out.append(("ours >= 0.9x fa4 (cache >= 8k)", cfg, None, 0.9, f"n/a: {r['status']}"))
            continue
        out.append(("ours >= 75% of copy bandwidth (cache >= 8k)", cfg, r["of_copy"], 0.75,
                    "PASS" if r["of_copy"] >= 0.75 else "MISS"))
        f = dec.get((heads, layout, batch, L, "fa4", 0))
        if f is None or not ok(f):
            out.append(("ours >= 0.9x fa4 (cache >= 8k)", cfg, None, 0.9,
                        f"n/a: {f['status'] if f else 'no fa4 row'}"))
        else:
            ratio = f["median_us"] / r["median_us"]
            out.append(("ours >= 0.9x fa4 (cache >= 8k)", cfg, round(ratio, 3), 0.9,
                        "PASS" if ratio >= 0.9 else "MISS"))
    pre = {(r["heads"], r["layout"]): r for r in rows if r.get("case") == "prefill"}
    for heads in sorted({h for h, _ in pre}):
        c, p = pre.get((heads, "contiguous")), pre.get((heads, "paged"))
        cfg = f"{heads} B{c['batch'] if c else '?'} x {c['q_len'] if c else '?'} causal"
        if c and p and ok(c) and ok(p):
            ratio = c["median_us"] / p["median_us"]
            out.append(("paged prefill >= 0.95x contiguous", cfg, round(ratio, 3), 0.95,
                        "PASS" if ratio >= 0.95 else "MISS"))
        else:
            why = next((r["status"] for r in (c, p) if r and not ok(r)), "missing rows")
            out.append(("paged prefill >= 0.95x contiguous", cfg, None, 0.95, f"n/a: {why}"))
    return out


def print_table(rows):
    print(f"\n{'heads':5} {'layout':10} {'bs':>4} {'batch':>5} {'cache':>6} {'impl':12} {'spl':>3} "
          f"{'median us':>10} {'best us':>9} {'spread':>7} {'host us':>8} {'KV GB':>7} {'GB/s':>7} "
          f"{'of copy':>7} {'diff':>8}  status")
    for r in rows:
        if r.get("case") not in ("decode", "prefill"):
            continue
        ok = r.get("status") == "ok"
        cache = f"{r['cache_len'] // 1024}k" if r["cache_len"] >= 1024 else str(r["cache_len"])
        kvgb = f"{r['kv_bytes'] / 1e9:7.3f}" if "kv_bytes" in r else f"{'':7}"
        impl = r["impl"] if r["case"] == "decode" else "prefill"
        diff = r.get("max_abs_diff_vs_sdpa", r.get("max_abs_diff_vs_contiguous", ""))
        if ok:
            bw = (f"{r['kv_GBps']:7.0f} {r['of_copy']:7.3f}" if "kv_GBps" in r
                  else f"{r['tflops']:5.0f}TF {'':7}")
            timing = f"{r['median_us']:10.1f} {r['best_us']:9.1f} {r['spread']:7.3f} {r['host_us']:8.0f}"
        else:
            bw, timing = f"{'':7} {'':7}", f"{'':10} {'':9} {'':7} {'':8}"
        print(f"{r['heads']:5} {r['layout']:10} {r['block_size'] or '':>4} {r['batch']:5} {cache:>6} "
              f"{impl:12} {r.get('num_splits', ''):>3} {timing} {kvgb} {bw} {diff!s:>8}  "
              f"{'' if ok else r['status']}")


def git_commit():
    try:
        root = HERE.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except Exception:
        return None


METHOD = ("Decode: one query per sequence, all sequences of a config with cache_seqlens = cache_len; "
          "paged caches hold the same keys in shuffled blocks. Per implementation two untimed "
          "warm-up calls, then --passes timed passes interleaved across implementations; a CUDA "
          "pass zeroes a 256 MB buffer (L2 flush), queues a torch.cuda._sleep spin so the host's "
          "launch work is hidden (spin_us: at least ~1 ms and twice the call's warm-up issue time), and "
          "brackets one call with CUDA events (GPU time, as under a CUDA graph; host_us is the eager "
          "issue time, not included; host_gaps_possible: host_us > 0.9 x spin_us). median / best / max over passes, "
          "spread = (max - min) / median. kv_bytes = sum(cache_seqlens) * Hk * D * 2 (K, V) * 2 B; "
          "kv_GBps = kv_bytes / median. copy_GBps = 2 * 1 GiB / median time of dst.copy_(src) (read + "
          "write bytes) in the same run; of_copy = kv_GBps / copy_GBps (decode traffic is all reads, "
          "so this compares total DRAM traffic); read_GBps = 1 GiB / src.sum() time, of_read = kv_GBps "
          "/ read_GBps (context only). sdpa: flash backend, GQA folded into the query length; its paged "
          "rows include gathering the pages into a contiguous copy (timed). fa4: flash_attn.cute "
          "flash_attn_varlen_func(q (B,1,H,D), cache, seqused_k, page_table, num_splits=0). Prefill: "
          "flash_attn_varlen_func causal, packed k/v vs block_table. Correctness gate: each impl vs "
          "reference.attention in float64 on a small case, bound 2x the bf16 reference's error + 1e-3, "
          "refused impls not timed.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (ours and SDPA)")
    ap.add_argument("--out", type=Path, help="write {meta, rows} of this run here")
    ap.add_argument("--record", type=Path, help="merge the rows into this results file "
                    "(e.g. benchmarks/results/h200.json), replacing earlier 'decode' rows")
    ap.add_argument("--batches", type=parse_list, default=[1, 8, 32, 128, 256])
    ap.add_argument("--cache-lens", type=parse_list, default=parse_list("1k,8k,32k,128k"))
    ap.add_argument("--heads", type=lambda s: s.split(","), default=["gqa", "mha"])
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--kv-limit-gb", type=float, default=40.0,
                    help="skip configs whose K+V cache exceeds this (3x is resident)")
    ap.add_argument("--budget-s", type=float, default=130.0,
                    help="start no new decode config after this many seconds (0: none)")
    ap.add_argument("--prefill", type=parse_list, default=[8, 4096], metavar="BATCH,QLEN")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        args.device = args.device or "cpu"
        args.batches, args.cache_lens, args.block_size = [1, 3], [64, 200], 16
        args.passes, args.prefill = 3, [2, 48]
        head_table, headdim = SMOKE_HEADS, 32
    else:
        head_table, headdim = HEADS, 128
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke and args.device is None:
        ap.error("no CUDA device: run --smoke on the CPU (or --device cpu with a small grid)")
    if args.passes < 3:
        ap.error("--passes must be >= 3")
    dtype = torch.bfloat16
    timer = Timer(device)
    fa4 = FA4(device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"{'fa4 ' + str(fa4.version) if fa4.fn else FA4_MISSING}", flush=True)
    spin_us = timer.spin_us()

    copy_gbps, read_gbps, rows = bandwidth(device, timer, max(args.passes, 5),
                                           2**24 if args.smoke else COPY_BYTES)
    print(f"copy {copy_gbps:.0f} GB/s (read + write), read-only sum {read_gbps:.0f} GB/s", flush=True)

    print("correctness gate:", flush=True)
    verdicts, pre_verdicts = {}, {}
    for heads in args.heads:
        dims = (*head_table[heads], headdim)
        verdicts[heads] = check_impls(heads, dims, dtype, device, args.block_size, fa4, args.smoke)
        pre_verdicts[heads] = check_prefill(heads, dims, dtype, device, args.block_size, args.smoke)

    pb, pq = args.prefill
    for heads in args.heads:
        dims = (*head_table[heads], headdim)
        rows += prefill_rows(heads, dims, dtype, device, args.block_size, pb, pq, pre_verdicts[heads],
                             timer, args.passes)
        gc.collect()

    skipped = []
    grid = [(L, B, heads) for L in args.cache_lens for B in args.batches for heads in args.heads]
    for L, B, heads in grid:  # cache length outermost: a spent budget drops the longest caches
        h, hk = head_table[heads]
        kv = B * L * hk * headdim * 2 * 2
        label = f"{heads} B{B} L{L}"
        if kv > args.kv_limit_gb * 1e9:
            skipped.append(f"{label}: KV {kv / 1e9:.1f} GB > {args.kv_limit_gb:g} GB")
            continue
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{label}: time budget of {args.budget_s:g} s spent")
            continue
        t1 = time.perf_counter()
        case = Case([L] * B, h, hk, headdim, dtype, device, args.block_size)
        new = decode_rows(case, heads, args.block_size, fa4, verdicts[heads], timer,
                          args.passes, copy_gbps, read_gbps, nosplit=B <= 8)
        for r in new:  # the spin did not cover the host's issue time: GPU idle inside
            if spin_us is not None and r.get("host_us", 0) > 0.9 * r.get("spin_us", spin_us):
                r["host_gaps_possible"] = True
        rows += new
        best = [r for r in new if r["impl"] == "torch_varlen" and r.get("status") == "ok"]
        print(f"  {label:18s} KV {kv / 1e9:6.2f} GB  ours "
              + ", ".join(f"{r['layout'][:5]}/s{r['num_splits']} {r['median_us']:.0f} us "
                          f"{r['of_copy']:.2f} of copy" for r in best)
              + f"  ({time.perf_counter() - t1:.1f} s)", flush=True)
        del case, new
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(rows)
    tg = targets(rows)
    print("\ntargets:")
    for name, cfg, value, need, verdict in tg:
        print(f"  {verdict[:4] if verdict in ('PASS', 'MISS') else 'n/a '}  {name}: {cfg} "
              f"{'' if value is None else f'{value:.3f}'} (need {need}){'' if value is not None else '  ' + verdict}")
    if skipped:
        print("\nskipped:\n  " + "\n  ".join(skipped))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "fa4": fa4.version, "fa4_import_error": fa4.import_error, "python": platform.python_version(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv[1:] if argv is None else argv), "smoke": args.smoke,
            "spin_us": None if spin_us is None else round(spin_us, 1), "copy_GBps": round(copy_gbps, 1), "read_GBps": round(read_gbps, 1), "method": METHOD,
            "skipped": skipped, "targets": [dict(target=n, config=c, value=v, needed=need, verdict=vd)
                                            for n, c, v, need, vd in tg],
            "seconds": round(time.perf_counter() - t0, 1)}
    print(f"\ndone in {meta['seconds']} s, {len(rows)} rows", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.record:
        record(args.record, BENCH, meta, rows)
        print(f"recorded {len(rows)} rows (bench {BENCH!r}) in {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
