"""Triton varlen attention vs torch.nn.attention.varlen.varlen_attn on one GPU.

bf16, 16 heads, head dim 128, 65,536 packed tokens, lengths uniform in [mean/4, 2*mean] (fixed
seed), causal and not; forward and forward+backward, triton.testing.do_bench medians. FLOPs:
4 * Lq * Lk * H * D per sequence (halved when causal), backward 2.5x forward. Rows are merged
into benchmarks/results/h200.json (other benchmarks' rows are kept).

    python benchmarks/bench_attention_gpu.py            # the recorded comparison
    python benchmarks/bench_attention_gpu.py --sweep    # also time tile configs for head dim 128
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import platform
import random
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import torch_varlen
from torch_varlen.kernels import attention as triton_attention

RESULTS = Path(__file__).resolve().parent / "results" / "h200.json"


def lengths_for(total, mean, seed=0):
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(rng.randint(mean // 4, 2 * mean))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def flops(lengths, nheads, headdim, causal):
    f = sum(4 * n * n * nheads * headdim for n in lengths)
    return f / 2 if causal else f


def make_inputs(lengths, nheads, headdim, dtype=torch.bfloat16):
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(total, nheads, headdim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    return q, k, v, cu, max(lengths)


def varlen_attn_fn(causal):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kw = {"window_size": (-1, 0) if causal else (-1, -1)}
    else:
        kw = {"is_causal": causal}
    return lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, **kw)


def ours_fn(causal):
    return lambda q, k, v, cu, m: torch_varlen.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal)


def time_pass(fn, inputs, pass_):
    q, k, v, cu, m = inputs
    if pass_ == "fwd":
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v, cu, m), warmup=50, rep=200, return_mode="median")
    do = torch.randn(q.shape[0], q.shape[1], v.shape[2], device="cuda", dtype=q.dtype)
    return do_bench(lambda: fn(q, k, v, cu, m).backward(do), warmup=50, rep=200,
                    grad_to_none=[q, k, v], return_mode="median")


def measure(mean, total, nheads, headdim, impls=("torch_varlen", "varlen_attn")):
    lengths = lengths_for(total, mean)
    inputs = make_inputs(lengths, nheads, headdim)
    rows = []
    for causal in (False, True):
        fwd_flops = flops(lengths, nheads, headdim, causal)
        for impl in impls:
            fn = ours_fn(causal) if impl == "torch_varlen" else varlen_attn_fn(causal)
            for pass_ in ("fwd", "fwd_bwd"):
                ms = time_pass(fn, inputs, pass_)
                f = fwd_flops * (1 if pass_ == "fwd" else 3.5)
                rows.append({"bench": "attention", "impl": impl, "pass": pass_, "dtype": "bfloat16",
                             "headdim": headdim, "nheads": nheads, "nheads_k": nheads,
                             "causal": causal, "total_tokens": total, "mean_len": mean,
                             "ms": round(ms, 4), "tflops": round(f / ms * 1e-9, 1)})
    return rows


def sweep(mean, total, nheads, headdim):
    """Time tile configs of each kernel at head dim 128 (forward alone; backward as fwd+bwd
    with the forward config fixed)."""
    lengths = lengths_for(total, mean)
    inputs = make_inputs(lengths, nheads, headdim)
    key = triton_attention._block(headdim)
    candidates = {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
                (64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2)],
        "dkdv": [(64, 128, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 3),
                 (32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 4, 3)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 128, 8, 2),
               (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    }
    tables = {"fwd": triton_attention._FWD_CONFIGS, "dkdv": triton_attention._DKDV_CONFIGS,
              "dq": triton_attention._DQ_CONFIGS}
    print(f"sweep at head dim {headdim} (key {key}): ms non-causal / causal")
    for kind, configs in candidates.items():
        default = tables[kind][key]
        for cfg in configs:
            tables[kind][key] = cfg
            try:
                times = [time_pass(ours_fn(c), inputs, "fwd" if kind == "fwd" else "fwd_bwd")
                         for c in (False, True)]
                print(f"  {kind:5s} {cfg}: {times[0]:.3f} / {times[1]:.3f}", flush=True)
            except Exception as e:  # a config over the shared-memory or register budget
                print(f"  {kind:5s} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
        tables[kind][key] = default


def save(rows):
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"meta": {}, "rows": []}
    mine = lambda r: r.get("bench") == "attention" and r.get("impl") in ("torch_varlen", "varlen_attn")
    data["rows"] = [r for r in data["rows"] if not mine(r)] + rows
    data.setdefault("meta", {})["attention"] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "timer": "triton.testing.do_bench median",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mean", type=int, default=2048)
    ap.add_argument("--total", type=int, default=65536)
    ap.add_argument("--nheads", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.sweep:
        sweep(args.mean, args.total, args.nheads, args.headdim)
    rows = measure(args.mean, args.total, args.nheads, args.headdim)
    print(f"{'impl':13s} {'pass':8s} {'causal':6s} {'ms':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        print(f"{r['impl']:13s} {r['pass']:8s} {str(r['causal']):6s} {r['ms']:8.3f} {r['tflops']:8.1f}")
    for causal in (False, True):
        for pass_ in ("fwd", "fwd_bwd"):
            t = {r["impl"]: r["ms"] for r in rows if r["causal"] == causal and r["pass"] == pass_}
            print(f"ratio torch_varlen / varlen_attn, causal={causal}, {pass_}: "
                  f"{t['torch_varlen'] / t['varlen_attn']:.2f}")
    if not args.no_save:
        save(rows)


if __name__ == "__main__":
    main()
