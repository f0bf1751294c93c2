"""Varlen attention: every implementation side by side on identical inputs (issue #5).

Implementations (`impl` in the rows):
  torch_varlen      ours, default kernels (Triton on CUDA), torch.ops.varlen.attention_forward
  torch_varlen_fa4  ours with backend="fa4" (only when FA4 imports)
  varlen_attn       torch.nn.attention.varlen.varlen_attn (causal as window_size=(-1, 0))
  fa4               flash_attn.cute.interface.flash_attn_varlen_func, called directly
  flex              compiled flex_attention on the packed (1, H, total, D) layout with a
                    document mask (create_block_mask outside the timed region)
  padded_sdpa       scaled_dot_product_attention, flash backend, on (B, H, Lmax, D) padded
                    copies made outside the timed region. The flash backend takes no mask: causal
                    uses is_causal (exact for real tokens, padding is trailing); non-causal attends
                    the padded keys too. It is a speed reference only: its FLOPs count useful
                    tokens, its output is not compared.
  torch_varlen with dtype float8_e4m3fn: ours, forward, fp8 q/k/v with (batch, nheads_k) float32
                    descales (all ones), bf16 output.

Inputs: 65,536 packed tokens, lengths uniform in [mean/4, 2*mean] (seed 0, last one trimmed to
the total). Every impl gets the same q, k, v values (copied into its own layout outside timing);
outputs are compared with ours (printed as max |diff|). FLOPs per sequence 4*L*L*H*D (H = query
heads), halved when causal; forward+backward counts 3.5x the forward. Time: first call (compile,
JIT, tuning) untimed, then the median of triton.testing.do_bench(warmup=25 ms,
rep=max(100 ms, 8 calls)). Forward runs under no_grad; forward+backward is out.backward(grad)
through each impl's autograd.

Default run (new groups stop after --budget-s, 360 s): head dim 128, bf16, 16 heads: all impls, means 512,
2048, 8192, causal and not, fwd and fwd_bwd, plus the fp8 forward; head dims 64 and 256, fp16 at
head dim 128, and GQA 32/8: all impls but padded_sdpa at mean 2048 only. --full: every group at
every mean with every impl. Rows are merged into benchmarks/results/h200.json after every
(config, causal) group (other benchmarks' rows kept; a run without --impls/--means filters
replaces every earlier "attention" row, a filtered run replaces rows with the same key), then
results/attention.md and results/attention.png are rewritten from the JSON.

    python benchmarks/bench_attention.py                     # the recorded comparison (GPU)
    python benchmarks/bench_attention.py --impls torch_varlen,varlen_attn --means 2048
    python benchmarks/bench_attention.py --render --readme   # md/png/README from the JSON only
    python benchmarks/bench_attention.py --device cpu --tiny --no-save   # plumbing smoke test
    python benchmarks/bench_attention.py --sweep             # tile configs of ours, head dim 128

FA4: set TORCH_VARLEN_FA4_SITE to the site-packages directory that holds flash_attn.cute.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import random
import re
import site
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import torch_varlen

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
README = HERE.parent / "README.md"
README_BEGIN = "<!-- attention-table:begin (benchmarks/bench_attention.py --render --readme) -->"
README_END = "<!-- attention-table:end -->"

IMPLS = ("torch_varlen", "torch_varlen_fa4", "varlen_attn", "fa4", "flex", "padded_sdpa")
FP8 = "torch_varlen_fp8"  # --impls name of the fp8 rows (impl "torch_varlen", dtype float8_e4m3fn)
PASSES = ("fwd", "fwd_bwd")
MEANS = (512, 2048, 8192)
TOTAL = 65536
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
KEY = ("bench", "impl", "pass", "dtype", "headdim", "nheads", "nheads_k", "causal",
       "total_tokens", "mean_len")


@dataclass(frozen=True)
class Config:
    dtype: str
    nheads: int
    nheads_k: int
    headdim: int
    mean: int
    total: int = TOTAL

    def label(self):
        return (f"{self.dtype} H{self.nheads}/{self.nheads_k} D{self.headdim} "
                f"mean {self.mean} total {self.total}")


MAIN = dict(dtype="bfloat16", nheads=16, nheads_k=16, headdim=128)
EXTRA = (dict(dtype="bfloat16", nheads=16, nheads_k=16, headdim=64),
         dict(dtype="bfloat16", nheads=16, nheads_k=16, headdim=256),
         dict(dtype="float16", nheads=16, nheads_k=16, headdim=128),
         dict(dtype="bfloat16", nheads=32, nheads_k=8, headdim=128))


# ---------------------------------------------------------------- inputs and FLOPs

def lengths_for(total, mean, seed=0):
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(rng.randint(mean // 4, 2 * mean))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def flops(lengths, nheads, headdim, causal, pass_="fwd"):
    f = sum(4 * n * n * nheads * headdim for n in lengths)
    f = f / 2 if causal else f
    return f * (3.5 if pass_ == "fwd_bwd" else 1.0)


class Inputs:
    """One configuration's packed q, k, v, grad, cu_seqlens and the layouts derived from them."""

    def __init__(self, cfg: Config, device, seed=0):
        self.cfg = cfg
        self.device = device
        self.lengths = lengths_for(cfg.total, cfg.mean)
        self.batch = len(self.lengths)
        self.max_len = max(self.lengths)
        dtype = DTYPES[cfg.dtype]
        g = torch.Generator(device=device).manual_seed(seed)
        t, d = cfg.total, cfg.headdim
        make = lambda h: torch.randn(t, h, d, generator=g, device=device, dtype=dtype)
        self.q, self.k, self.v = make(cfg.nheads), make(cfg.nheads_k), make(cfg.nheads_k)
        self.grad = make(cfg.nheads)
        lens = torch.tensor(self.lengths, device=device)
        self.cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        # doc[i] = sequence of packed token i; pos[i] = its position inside that sequence.
        self.doc = torch.repeat_interleave(torch.arange(self.batch, device=device), lens)
        self.pos = torch.arange(t, device=device) - self.cu.long()[self.doc]
        self.scale = d ** -0.5

    def pad(self, x):
        """(total, h, d) -> (B, h, Lmax, d), a transposed view of (B, Lmax, h, d), zeros beyond."""
        out = x.new_zeros(self.batch, self.max_len, *x.shape[1:])
        out[self.doc, self.pos] = x
        return out.transpose(1, 2)

    def unpad(self, x):
        return x.transpose(1, 2)[self.doc, self.pos]


# ---------------------------------------------------------------- implementations
# Each builder returns (call, to_layout, from_layout): call(q, k, v) -> out in the impl's layout;
# to_layout / from_layout convert a packed (total, h, d) tensor to that layout and back.

packed = (lambda x: x, lambda x: x)


def load_fa4():
    """(flash_attn_varlen_func, version) or (None, reason)."""
    extra = os.environ.get("TORCH_VARLEN_FA4_SITE")
    if extra:
        site.addsitedir(extra)
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func
    except Exception as e:  # not installed, or no CUDA toolchain for it
        return None, f"{type(e).__name__}: {e}"
    try:
        version = importlib.metadata.version("flash-attn-4")
    except Exception:
        version = "unknown"
    return flash_attn_varlen_func, version


def build_ours(x: Inputs, causal, backend, fp8=False):
    m = x.max_len
    if not fp8:
        def call(q, k, v):
            return torch_varlen.varlen_attention(q, k, v, x.cu, x.cu, m, m, softmax_scale=x.scale,
                                                 causal=causal, backend=backend)[0]
        return call, *packed
    ones = torch.ones(x.batch, x.cfg.nheads_k, device=x.device, dtype=torch.float32)
    descales = dict(q_descale=ones, k_descale=ones, v_descale=ones.clone())

    def call8(q, k, v):  # the op itself, unit descales
        return torch.ops.varlen.attention_forward(
            q, k, v, x.cu, x.cu, m, m, x.scale, window_left=-1, window_right=0 if causal else -1,
            backend=backend, **descales)[0]
    return call8, lambda t: t.to(torch.float8_e4m3fn), lambda t: t


def build_varlen_attn(x: Inputs, causal):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"scale": x.scale} if "scale" in params else {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if x.cfg.nheads != x.cfg.nheads_k:
        if "enable_gqa" not in params:
            raise NotImplementedError("this varlen_attn has no enable_gqa")
        kw["enable_gqa"] = True
    m = x.max_len
    return (lambda q, k, v: varlen_attn(q, k, v, x.cu, x.cu, m, m, **kw)), *packed


def build_fa4(x: Inputs, causal, fa4):
    m = x.max_len

    def call(q, k, v):
        out = fa4(q, k, v, cu_seqlens_q=x.cu, cu_seqlens_k=x.cu, max_seqlen_q=m, max_seqlen_k=m,
                  softmax_scale=x.scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out
    return call, *packed


_FLEX = {}


def build_flex(x: Inputs, causal, compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if compiled not in _FLEX:
        _FLEX[compiled] = (torch.compile(flex_attention, dynamic=False) if compiled
                           else flex_attention)
    flex = _FLEX[compiled]
    doc = x.doc.to(torch.int32)
    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]
    t = x.cfg.total
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=x.device)
    gqa = x.cfg.nheads != x.cfg.nheads_k
    call = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=x.scale, enable_gqa=gqa)
    return (call, lambda t_: t_.transpose(0, 1).unsqueeze(0).contiguous(),
            lambda t_: t_[0].transpose(0, 1))


def build_padded_sdpa(x: Inputs, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gqa = x.cfg.nheads != x.cfg.nheads_k

    def call(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, is_causal=causal, scale=x.scale, enable_gqa=gqa)
    return call, x.pad, x.unpad


# ---------------------------------------------------------------- timing

def bench(fn, grad_to_none, device):
    fn()  # first call: compile / JIT / tune, untimed
    if device == "cpu":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep = max(100.0, 8 * start.elapsed_time(end))  # at least ~8 timed calls for slow configs
    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def sync(device):
    if device != "cpu":
        torch.cuda.synchronize()


def failed(what, e, args):
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    print(f"    {what} FAILED: {type(e).__name__}: {first}", flush=True)
    if args.verbose:
        traceback.print_exc()


def measure_impl(impl, x: Inputs, causal, passes, builder, ref, args):
    """Rows for one impl at one (config, causal); ref: {causal: packed fwd output of ours}."""
    rows = []
    call, to_layout, from_layout = builder()
    fp8 = impl == FP8
    q, k, v = (to_layout(t) for t in (x.q, x.k, x.v))
    cfg = x.cfg
    for pass_ in passes:
        t0 = time.perf_counter()
        try:
            if pass_ == "fwd":
                with torch.no_grad():
                    out = call(q, k, v)
                    sync(args.device)
                    ms = bench(lambda: call(q, k, v), None, args.device)
            else:
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                grad = to_layout(x.grad)
                out = call(*leaves)
                ms = bench(lambda: call(*leaves).backward(grad), leaves, args.device)
                del leaves, grad
        except Exception as e:  # one failing peer must not stop the run
            failed(f"{impl:17s} {pass_:7s}", e, args)
            continue
        out = from_layout(out.detach()).float()
        if ref is not None and pass_ == "fwd" and impl == "torch_varlen":
            ref[causal] = out
        diff = ""
        if ref is not None and causal in ref and impl != "torch_varlen":
            if impl == "padded_sdpa" and not causal:
                diff = "  (padded keys attended: not compared)"
            else:
                diff = f"  max|out-ours| {(out - ref[causal]).abs().max().item():.3g}"
        del out
        f = flops(x.lengths, cfg.nheads, cfg.headdim, causal, pass_)
        row = {"bench": "attention", "impl": "torch_varlen" if fp8 else impl, "pass": pass_,
               "dtype": "float8_e4m3fn" if fp8 else cfg.dtype, "headdim": cfg.headdim,
               "nheads": cfg.nheads, "nheads_k": cfg.nheads_k, "causal": causal,
               "total_tokens": cfg.total, "mean_len": cfg.mean,
               "ms": round(ms, 4), "tflops": round(f / ms * 1e-9, 1)}
        rows.append(row)
        print(f"    {impl:17s} {pass_:7s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s"
              f"  ({time.perf_counter() - t0:.1f} s){diff}", flush=True)
    return rows


def run_config(cfg: Config, impls, passes, args, fa4, on_rows):
    x = Inputs(cfg, args.device)
    print(f"== {cfg.label()}: {x.batch} sequences, max {x.max_len} "
          f"[{time.perf_counter() - args.t_start:.0f} s]", flush=True)
    for causal in (False, True):
        if args.budget_s and time.perf_counter() - args.t_start > args.budget_s:
            print(f"  budget of {args.budget_s:.0f} s spent: skipping causal={causal}", flush=True)
            continue
        print(f"  causal={causal}", flush=True)
        ref, rows = {}, []
        for impl in impls:
            builders = {
                "torch_varlen": lambda: build_ours(x, causal, "torch_varlen"),
                "torch_varlen_fa4": lambda: build_ours(x, causal, "fa4"),
                FP8: lambda: build_ours(x, causal, "torch_varlen", fp8=True),
                "varlen_attn": lambda: build_varlen_attn(x, causal),
                "fa4": lambda: build_fa4(x, causal, fa4),
                "flex": lambda: build_flex(x, causal, not args.flex_eager),
                "padded_sdpa": lambda: build_padded_sdpa(x, causal),
            }
            try:
                rows += measure_impl(impl, x, causal, ("fwd",) if impl == FP8 else passes,
                                     builders[impl], ref, args)
            except Exception as e:  # the builder itself (block mask, import, layout copy)
                failed(f"{impl:17s}", e, args)
            gc.collect()
        on_rows(rows)
        del ref
    del x
    gc.collect()
    if args.device != "cpu":
        torch.cuda.empty_cache()


def plan(args, have_fa4):
    """[(Config, impls)] in run order: the head-dim-128 comparison first."""
    impls = [i for i in IMPLS if have_fa4 or i not in ("torch_varlen_fa4", "fa4")]
    extra_impls = [i for i in impls if args.full or i != "padded_sdpa"]
    keep = lambda names: [i for i in names if args.impls is None or i in args.impls]
    means = args.means or MEANS
    extra_means = [m for m in means if args.full or m == 2048]
    out = []
    for mean in means:
        out.append((Config(**MAIN, mean=mean, total=args.total), keep(impls + [FP8])))
    for e in EXTRA:
        for mean in extra_means:
            out.append((Config(**e, mean=mean, total=args.total), keep(extra_impls)))
    return [(c, i) for c, i in out if i]


def tiny_plan(args, have_fa4):
    """CPU plumbing check: small shapes, impls that run on the CPU (the rest fail visibly)."""
    impls = [i for i in IMPLS + (FP8,) if (args.impls is None or i in args.impls)
             and (have_fa4 or i not in ("torch_varlen_fa4", "fa4"))]
    return [(Config("bfloat16", 2, 2, 32, 48, total=256), impls),
            (Config("bfloat16", 4, 2, 16, 96, total=256), impls)]


# ---------------------------------------------------------------- results

def row_key(r):
    return tuple(r.get(k) for k in KEY)


def merge(path: Path, rows, replace_all, meta):
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    keys = {row_key(r) for r in rows}
    old = data.get("rows", [])
    kept = [r for r in old if r.get("bench") != "attention"
            or (not replace_all and row_key(r) not in keys)]
    data["rows"] = kept + rows
    data.setdefault("meta", {})["attention"] = meta
    if any(r.get("dtype") == "float8_e4m3fn" for r in rows):
        data["meta"].pop("fp8_rows_note", None)  # this run measured the fp8 rows itself
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def run_meta(device, fa4_version):
    import triton

    return {"device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "fa4": fa4_version, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timer": ("perf_counter median of 3" if device == "cpu" else
                      "triton.testing.do_bench median (warmup 25 ms, rep max(100 ms, 8 calls))")
                     + ", after an untimed first call",
            "command": " ".join(sys.argv[1:])}


# Targets of issue #5: (name, selection, peer, min ratio); ratio = peer ms / our ms, so
# 1.3 means ours takes 1/1.3 of the peer's time.
def targets():
    hd128 = lambda r: (r["dtype"] == "bfloat16" and r["headdim"] == 128 and r["nheads"] == 16
                       and r["nheads_k"] == 16)
    return [
        ("fwd >= 1.30x varlen_attn (hd128, mean 2048/8192)", "torch_varlen", "varlen_attn", 1.30,
         lambda r: hd128(r) and r["pass"] == "fwd" and r["mean_len"] in (2048, 8192)),
        ("fwd >= 1.15x varlen_attn (hd128, mean 512)", "torch_varlen", "varlen_attn", 1.15,
         lambda r: hd128(r) and r["pass"] == "fwd" and r["mean_len"] == 512),
        ("fwd+bwd >= 1.15x varlen_attn (hd128)", "torch_varlen", "varlen_attn", 1.15,
         lambda r: hd128(r) and r["pass"] == "fwd_bwd"),
        ("never slower than flex", "torch_varlen", "flex", 1.0,
         lambda r: r["dtype"] != "float8_e4m3fn"),
        ("hd 64/256 >= 1.0x varlen_attn", "torch_varlen", "varlen_attn", 1.0,
         lambda r: r["headdim"] in (64, 256)),
        ("stretch: >= 0.85x fa4 (hd128)", "torch_varlen", "fa4", 0.85, hd128),
        ("fa4 backend >= 0.97x fa4 direct", "torch_varlen_fa4", "fa4", 0.97, lambda r: True),
    ]


def config_key(r):
    return (r["dtype"], r["nheads"], r["nheads_k"], r["headdim"], r["total_tokens"],
            r["mean_len"], r["causal"], r["pass"])


def index(rows):
    """{config_key: {impl: row}} for attention rows; fp8 rows under the impl name FP8."""
    out = {}
    for r in rows:
        if r.get("bench") != "attention":
            continue
        if r["dtype"] == "float8_e4m3fn":
            out.setdefault(config_key({**r, "dtype": "bfloat16"}), {})[FP8] = r
        else:
            out.setdefault(config_key(r), {})[r["impl"]] = r
    return out


def target_rows(idx):
    """[(target name, config text, ratio, min, met)] for every measured pair."""
    out = []
    for name, ours, peer, need, sel in targets():
        for key, by_impl in sorted(idx.items(), key=lambda kv: sort_key(kv[0])):
            if ours in by_impl and peer in by_impl and sel(by_impl[ours]):
                ratio = by_impl[peer]["ms"] / by_impl[ours]["ms"]
                out.append((name, config_text(key), ratio, need, ratio >= need))
    for key, by_impl in sorted(idx.items(), key=lambda kv: sort_key(kv[0])):
        if FP8 in by_impl and "torch_varlen" in by_impl and key[5] == 8192:
            ratio = by_impl["torch_varlen"]["ms"] / by_impl[FP8]["ms"]
            out.append(("fp8 fwd >= 1.5x our bf16 fwd (mean 8192)", config_text(key), ratio, 1.5,
                        ratio >= 1.5))
    return out


def sort_key(key):
    dtype, h, hk, d, total, mean, causal, pass_ = key
    main = (dtype, h, hk, d) == ("bfloat16", 16, 16, 128)
    return (not main, d, dtype, h, hk, total, mean, pass_, causal)


def config_text(key):
    dtype, h, hk, d, total, mean, causal, pass_ = key
    heads = f"{h}" if h == hk else f"{h}/{hk}"
    tokens = "" if total == TOTAL else f" total {total}"
    return (f"{'fp16' if dtype == 'float16' else 'bf16'} D{d} H{heads} mean {mean}{tokens} "
            f"{'causal' if causal else 'full'} {pass_.replace('_', '+')}")


def cell(r):
    return f"{r['ms']:.3f} ({r['tflops']:.0f})" if r else ""


def ratio_cell(by_impl, ours, peer):
    if ours in by_impl and peer in by_impl:
        return f"{by_impl[peer]['ms'] / by_impl[ours]['ms']:.2f}"
    return ""


RATIOS = (("ours vs varlen_attn", "torch_varlen", "varlen_attn"),
          ("ours vs flex", "torch_varlen", "flex"),
          ("ours vs fa4", "torch_varlen", "fa4"),
          ("fa4 backend vs fa4", "torch_varlen_fa4", "fa4"),
          ("fp8 vs bf16 (ours)", FP8, "torch_varlen"))


def results_table(idx, keys):
    cols = [i for i in IMPLS + (FP8,) if any(i in idx[k] for k in keys)]
    ratios = [r for r in RATIOS if any(ratio_cell(idx[k], r[1], r[2]) for k in keys)]
    head = ["config"] + ["torch_varlen fp8" if c == FP8 else c for c in cols] + [r[0] for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for k in keys:
        b = idx[k]
        lines.append("| " + " | ".join([config_text(k)] + [cell(b.get(c)) for c in cols]
                                       + [ratio_cell(b, o, p) for _, o, p in ratios]) + " |")
    return lines


def targets_table(idx):
    lines = ["| target | config | ratio | needed | met |", "| --- | --- | ---: | ---: | --- |"]
    for name, cfg, ratio, need, met in target_rows(idx):
        lines.append(f"| {name} | {cfg} | {ratio:.2f} | {need:.2f} | {'yes' if met else '**no**'} |")
    return lines


def render_markdown(data):
    idx = index(data["rows"])
    meta = data.get("meta", {}).get("attention", {})
    keys = sorted(idx, key=sort_key)
    main = [k for k in keys if k[:4] == ("bfloat16", 16, 16, 128)]
    other = [k for k in keys if k not in main]
    rows = target_rows(idx)
    met = sum(1 for r in rows if r[4])
    lines = [
        "# Varlen attention benchmark",
        "",
        f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, Triton {meta.get('triton', '?')}, "
        f"FA4 {meta.get('fa4') or 'not installed'}, {meta.get('date', '?')}. "
        "Written by `benchmarks/bench_attention.py` from `results/h200.json`.",
        "",
        f"{TOTAL:,} packed tokens, lengths uniform in [mean/4, 2*mean] (seed 0). Cells: ms "
        "(TFLOP/s); FLOPs 4·L²·H·D per sequence, halved causal, fwd+bwd 3.5x fwd. Ratios are "
        "peer ms / our ms (above 1: ours faster). `padded_sdpa` (flash backend, padded batch) "
        "counts only useful tokens; non-causal it also attends the padded keys (no mask in the "
        "flash backend): a speed reference, not the same computation. `torch_varlen fp8`: "
        "float8_e4m3fn q/k/v, unit descales, bf16 output.",
        "",
    ]
    note = data.get("meta", {}).get("fp8_rows_note")
    if note:  # rows merged from another run say so (the JSON's meta keeps the why)
        lines += [f"Note: {note}.", ""]
    if main:
        lines += ["## bf16, head dim 128, 16 heads", "", *results_table(idx, main), ""]
    if other:
        lines += ["## Other head dims, fp16, GQA", "", *results_table(idx, other), ""]
    lines += [f"## Targets (issue #5): {met} of {len(rows)} met", "", *targets_table(idx), ""]
    return "\n".join(lines)


def readme_block(data):
    idx = index(data["rows"])
    main = [k for k in sorted(idx, key=sort_key) if k[:4] == ("bfloat16", 16, 16, 128)]
    rows = target_rows(idx)
    missed = [r for r in rows if not r[4]]
    meta = data.get("meta", {}).get("attention", {})
    lines = [README_BEGIN,
             f"GPU attention ({meta.get('device', '?')}, {meta.get('date', '?')[:10]}; bf16, head "
             f"dim 128, 16 heads, {TOTAL:,} tokens; ms (TFLOP/s), ratios = peer ms / our ms; "
             "other head dims, fp16, GQA and the target table in "
             "[`benchmarks/results/attention.md`](benchmarks/results/attention.md)):",
             "", *results_table(idx, main), "",
             f"Issue #5 targets met: {len(rows) - len(missed)} of {len(rows)}"
             + ("; missed:" if missed else "."),
             *[f"- {name}: " + ", ".join(f"{c} {r:.2f}" for n, c, r, _, _ in missed if n == name)
               for name in dict.fromkeys(n for n, *_ in missed)],
             README_END]
    return "\n".join(lines)


def render_plot(data, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not importable: no {path.name}", flush=True)
        return None
    idx = index(data["rows"])
    keys = sorted(idx, key=sort_key)
    groups = [("bf16 D128 H16, forward", lambda k: k[:4] == ("bfloat16", 16, 16, 128) and k[7] == "fwd"),
              ("bf16 D128 H16, forward+backward",
               lambda k: k[:4] == ("bfloat16", 16, 16, 128) and k[7] == "fwd_bwd"),
              ("other configs, forward", lambda k: k[:4] != ("bfloat16", 16, 16, 128) and k[7] == "fwd"),
              ("other configs, forward+backward",
               lambda k: k[:4] != ("bfloat16", 16, 16, 128) and k[7] == "fwd_bwd")]
    groups = [(t, [k for k in keys if sel(k)]) for t, sel in groups]
    groups = [(t, ks) for t, ks in groups if ks]
    if not groups:
        return None
    impls = [i for i in IMPLS + (FP8,) if any(i in idx[k] for k in keys)]
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.2 * len(groups)), squeeze=False)
    width = 0.8 / len(impls)
    for ax, (title, ks) in zip(axes[:, 0], groups):
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(ks))]
            ys = [idx[k][impl]["tflops"] if impl in idx[k] else 0 for k in ks]
            ax.bar(xs, ys, width, label=impl.replace(FP8, "torch_varlen fp8"))
        labels = []
        for k in ks:
            dtype, h, hk, d = k[:4]
            prefix = "" if k[:4] == ("bfloat16", 16, 16, 128) else (
                f"{'fp16' if dtype == 'float16' else 'bf16'} D{d} H{h}/{hk}\n")
            labels.append(f"{prefix}mean {k[5]} {'causal' if k[6] else 'full'}")
        ax.set_xticks(range(len(ks)), labels, fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=len(impls))
    meta = data.get("meta", {}).get("attention", {})
    fig.suptitle(f"varlen attention, {TOTAL:,} tokens, {meta.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(data, out_dir: Path, readme: bool):
    md = out_dir / "attention.md"
    md.write_text(render_markdown(data))
    png = render_plot(data, out_dir / "attention.png")
    print(f"wrote {md}" + (f" and {png}" if png else ""), flush=True)
    if readme:
        text = README.read_text()
        pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
        if not pattern.search(text):
            print(f"no attention-table markers in {README}: not updated", flush=True)
            return
        README.write_text(pattern.sub(lambda _: readme_block(data), text))
        print(f"updated the table in {README}", flush=True)


# ---------------------------------------------------------------- tile sweep (ours)

def sweep(args):
    """Time tile configs of our Triton kernels at head dim 128 (mean --means[0] or 2048)."""
    from torch_varlen.kernels import attention as ka

    tables = {k: getattr(ka, n, None) for k, n in
              (("fwd", "_FWD_CONFIGS"), ("dkdv", "_DKDV_CONFIGS"), ("dq", "_DQ_CONFIGS"))}
    if any(t is None for t in tables.values()):
        print("tile tables not found in torch_varlen.kernels.attention: no sweep", flush=True)
        return
    candidates = {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
                (64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2)],
        "dkdv": [(64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 3),
                 (32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 4, 3)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2),
               (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    }
    x = Inputs(Config(**MAIN, mean=(args.means or [2048])[0], total=args.total), args.device)
    key = 128
    print(f"sweep at head dim 128, mean {x.cfg.mean}: ms non-causal / causal", flush=True)
    for kind, configs in candidates.items():
        default = tables[kind][key]
        pass_ = "fwd" if kind == "fwd" else "fwd_bwd"
        for cfg in configs:
            tables[kind][key] = cfg
            try:
                times = []
                for causal in (False, True):
                    call = build_ours(x, causal, "torch_varlen")[0]
                    if pass_ == "fwd":
                        with torch.no_grad():
                            times.append(bench(lambda: call(x.q, x.k, x.v), None, args.device))
                    else:
                        leaves = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
                        times.append(bench(lambda: call(*leaves).backward(x.grad), leaves,
                                           args.device))
                print(f"  {kind:5s} {cfg}: {times[0]:.3f} / {times[1]:.3f}", flush=True)
            except Exception as e:  # a config over the shared-memory or register budget
                print(f"  {kind:5s} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
        tables[kind][key] = default


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help="every config group at every mean with every impl (default: the extra "
                         "groups at mean 2048 without padded_sdpa)")
    ap.add_argument("--quick", dest="full", action="store_false", help="the default run")
    ap.add_argument("--impls", type=lambda s: s.split(","),
                    help=f"comma list of {', '.join(IMPLS + (FP8,))}")
    ap.add_argument("--means", type=lambda s: [int(m) for m in s.split(",")])
    ap.add_argument("--passes", type=lambda s: s.split(","), default=list(PASSES))
    ap.add_argument("--total", type=int, default=TOTAL)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU plumbing check)")
    ap.add_argument("--flex-eager", action="store_true",
                    help="flex_attention uncompiled (smoke tests only; default with --tiny)")
    ap.add_argument("--budget-s", type=float, default=360,
                    help="start no new (config, causal) group after this many seconds (0: none)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                    help="where h200.json, attention.md, attention.png go; h200.json is read "
                         "from here if present, else from benchmarks/results")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite attention.md/png from the JSON (no GPU needed)")
    ap.add_argument("--readme", action="store_true",
                    help="with --render: also rewrite the table block in README.md")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failures")
    args = ap.parse_args(argv)
    if args.impls:
        unknown = set(args.impls) - set(IMPLS + (FP8,))
        if unknown:
            ap.error(f"--impls: unknown {sorted(unknown)}; expected some of {IMPLS + (FP8,)}")
    out_json = args.out_dir / "h200.json"
    if args.render:
        src = out_json if out_json.exists() else RESULTS_DIR / "h200.json"
        render(json.loads(src.read_text()), args.out_dir, args.readme)
        return 0
    if args.tiny:
        args.flex_eager = True
        args.total = 256
    if args.device != "cpu" and not torch.cuda.is_available():
        ap.error("no CUDA device: use --device cpu --tiny --no-save for the smoke test")
    args.t_start = time.perf_counter()

    for name in ("recompile_limit", "cache_size_limit"):  # flex compiles per config
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    fa4, fa4_version = load_fa4() if args.device != "cpu" else (None, "not loaded on CPU")
    if fa4 is None:
        print(f"FA4 not available ({fa4_version}): no fa4 / torch_varlen_fa4 rows", flush=True)
        fa4_version = None
    else:
        print(f"FA4 {fa4_version}", flush=True)
    if args.sweep:
        sweep(args)
    todo = tiny_plan(args, fa4 is not None) if args.tiny else plan(args, fa4 is not None)
    passes = [p for p in PASSES if p in args.passes]
    meta = run_meta(args.device, fa4_version)
    replace_all = args.impls is None and args.means is None and not args.tiny
    src = out_json if out_json.exists() else RESULTS_DIR / "h200.json"
    if not args.no_save and src != out_json and src.exists():
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(src.read_text())
    run_rows = []

    def on_rows(rows):
        run_rows.extend(rows)
        if not args.no_save and rows:
            data = merge(out_json, run_rows, replace_all, meta)
            (args.out_dir / "attention.md").write_text(render_markdown(data))  # png at the end

    print(f"{len(todo)} configs; passes {passes}; budget {args.budget_s:.0f} s", flush=True)
    for cfg, impls in todo:
        run_config(cfg, impls, passes, args, fa4, on_rows)
    elapsed = time.perf_counter() - args.t_start
    print(f"done in {elapsed:.0f} s: {len(run_rows)} rows", flush=True)
    data = {"meta": {"attention": meta}, "rows": run_rows}
    if not args.no_save and out_json.exists():
        data = json.loads(out_json.read_text())
        render(data, args.out_dir, readme=False)
    else:
        print(render_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
