"""CPU benchmark: packed varlen attention vs torch's padded scaled_dot_product_attention.

Both run on the same batch: sequences whose lengths leave about half of a padded
(batch, max_seqlen) layout as padding. The padded peer is
torch.nn.functional.scaled_dot_product_attention on (B, H, S, D) with a boolean mask
(key padding, and causal when causal); it computes on the padding too, the packed op
does not. Forward and forward+backward, bf16 and fp32, 12 heads of dim 64; medians over
repeats, at torch's thread count and at 1 thread. Writes benchmarks/results/cpu.json and
prints a table.

    PYTHONPATH=. python benchmarks/bench_cpu.py [--batch 8] [--max-seqlen 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_varlen

HERE = Path(__file__).resolve().parent


def cpu_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_average() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else -1.0


def median_ms(fns, repeats: int, warmup: int = 2):
    """Median milliseconds of each fn; the fns alternate, so that both see the same machine
    load (other processes on a shared machine)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def make_batch(batch, max_seqlen, nheads, headdim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # lengths uniform in [1, S]: about half of the padded layout is padding
    lengths = torch.randint(1, max_seqlen + 1, (batch,), generator=g)
    lengths[0] = max_seqlen  # the padded layout is as long as the longest sequence
    mask = torch.arange(max_seqlen)[None, :] < lengths[:, None]  # (B, S)
    q, k, v = (torch.randn(batch, max_seqlen, nheads, headdim, generator=g).to(dtype) for _ in range(3))
    return lengths, mask, q, k, v


def bench_case(batch, max_seqlen, nheads, headdim, dtype, causal, backward, repeats):
    lengths, mask, q, k, v = make_batch(batch, max_seqlen, nheads, headdim, dtype)
    idx = mask.flatten().nonzero().flatten()
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    max_len = int(lengths.max())
    # packed (N, H, D)
    qp, kp, vp = (t.flatten(0, 1)[idx].contiguous().requires_grad_(backward) for t in (q, k, v))
    # padded (B, H, S, D) and its mask
    qs, ks, vs = (t.transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v))
    attn_mask = mask[:, None, None, :]
    if causal:
        attn_mask = attn_mask & torch.ones(max_seqlen, max_seqlen, dtype=torch.bool).tril()[None, None]
    go_packed = torch.randn(qp.shape, dtype=dtype)
    go_padded = torch.randn(qs.shape, dtype=dtype)

    def packed():
        out = torch_varlen.flash_attn_varlen_func(qp, kp, vp, cu, cu, max_len, max_len, causal=causal)
        if backward:
            torch.autograd.grad(out, (qp, kp, vp), go_packed)

    def padded():
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask)
        if backward:
            torch.autograd.grad(out, (qs, ks, vs), go_padded)

    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        packed_ms, padded_ms = median_ms([packed, padded], repeats)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "pass": "fwd+bwd" if backward else "fwd",
        "causal": causal,
        "batch": batch,
        "max_seqlen": max_seqlen,
        "nheads": nheads,
        "headdim": headdim,
        "tokens": int(lengths.sum()),
        "padding_fraction": round(1 - int(lengths.sum()) / (batch * max_seqlen), 3),
        "packed_ms": round(packed_ms, 3),
        "padded_sdpa_ms": round(padded_ms, 3),
        "speedup": round(padded_ms / packed_ms, 3),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seqlen", type=int, default=512)
    ap.add_argument("--nheads", type=int, default=12)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default=f"{torch.get_num_threads()},1",
                    help="comma-separated thread counts (default: torch's, then 1; one thread is "
                         "less sensitive to other jobs on a shared machine)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cpu.json")
    args = ap.parse_args()

    load_before = load_average()
    rows = []
    header = (f"{'threads':7} {'dtype':9} {'pass':8} {'causal':6} {'tokens':>7} {'pad%':>5} {'packed ms':>10} "
              f"{'padded ms':>10} {'speedup':>8}")
    print(header)
    print("-" * len(header))
    default_threads = torch.get_num_threads()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype in (torch.bfloat16, torch.float32):
            for backward in (False, True):
                for causal in (False, True):
                    r = bench_case(args.batch, args.max_seqlen, args.nheads, args.headdim, dtype, causal, backward,
                                   args.repeats)
                    r = {"threads": threads, **r}
                    rows.append(r)
                    print(f"{threads:7d} {r['dtype']:9} {r['pass']:8} {str(r['causal']):6} {r['tokens']:7d} "
                          f"{100 * r['padding_fraction']:5.1f} {r['packed_ms']:10.2f} {r['padded_sdpa_ms']:10.2f} "
                          f"{r['speedup']:7.2f}x", flush=True)
    torch.set_num_threads(default_threads)
    meta = {
        "cpu": cpu_field("model name") or platform.processor() or platform.machine(),
        "threads": default_threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in cpu_field("flags").split(),
        # other processes share the machine: the 1-minute load average before and after
        "load_average": [load_before, load_average()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peer": "torch.nn.functional.scaled_dot_product_attention on the padded (B, H, S, D) batch, boolean mask",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
