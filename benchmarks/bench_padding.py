"""Padding kernels on the GPU: torch_varlen vs the flash-attn algorithm vs a plain device copy.

For each shape (bf16, lengths uniform in [0.2*S, S], so about 40% padding) it times, in one run:
  copy            a plain device-to-device copy of the same number of bytes (the ceiling)
  torch_varlen    unpad_input (eager: one host read) and pad_input
  flash_attn_algo the flash-attn algorithm re-created with torch ops: nonzero + cumsum + gather
                  (gather with an index expanded over the hidden dim, as index_first_axis does)
                  for unpad; zeros + index_put for pad
and variants of ours: unpad_input(capacity=nnz) (same bytes, no host sync: one memset and one
launch), and gather_rows with the same indices (the row copy alone, no mask work).

Bytes counted (the fewest the op must move): unpad reads the mask and nnz rows and writes
nnz rows + nnz int64 indices; pad reads nnz rows + nnz indices and writes B*S rows. GBps =
those bytes / time; fraction_of_copy = GBps / the copy's GBps for the same byte count.

Usage: python benchmarks/bench_padding.py [--out benchmarks/results/h200.json]
Rows with "bench" in {"unpad", "pad"} in the results file are replaced; other rows are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_varlen
from torch_varlen.bert_padding import pad_input, unpad_input

SHAPES = [(64, 2048, 4096), (256, 512, 768)]
DTYPE = torch.bfloat16


def time_ms(fn, reps=20, rounds=9):
    """Median over rounds of the mean time of `reps` back-to-back calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def fa_unpad(hidden, mask):
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen = seqlens.max().item()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden.reshape(hidden.shape[0] * hidden.shape[1], -1)
    rows = torch.gather(flat, 0, indices[:, None].expand(-1, flat.shape[1]))
    return rows.reshape(-1, *hidden.shape[2:]), indices, cu_seqlens, max_seqlen, seqlens


def fa_pad(hidden, indices, batch, seqlen):
    out = torch.zeros(batch * seqlen, *hidden.shape[1:], device=hidden.device, dtype=hidden.dtype)
    out[indices] = hidden
    return out.view(batch, seqlen, *hidden.shape[1:])


def copy_ms(nbytes):
    """A plain device copy moving nbytes in total (nbytes/2 read + nbytes/2 written)."""
    n = nbytes // 2 // 2
    src = torch.randn(n, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def row(bench, impl, shape, ms, nbytes, **extra):
    return {"bench": bench, "impl": impl, "dtype": str(DTYPE).replace("torch.", ""),
            "shape": list(shape), "ms": round(ms, 5), "GBps": round(nbytes / ms / 1e6, 1), **extra}


def bench_shape(shape):
    batch, seqlen, hidden = shape
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(0.2 * seqlen), seqlen + 1, (batch,), generator=gen)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).cuda()
    h = torch.randn(batch, seqlen, hidden, device="cuda", dtype=DTYPE)
    nnz = int(lengths.sum())
    row_bytes = hidden * h.element_size()

    # correctness against the peer before timing
    ours = unpad_input(h, mask)
    peer = fa_unpad(h, mask)
    assert torch.equal(ours[0], peer[0]) and torch.equal(ours[1], peer[1]) and ours[3] == peer[3]
    assert torch.equal(pad_input(ours[0], ours[1], batch, seqlen), fa_pad(peer[0], peer[1], batch, seqlen))
    hu, idx = ours[0], ours[1]

    rows = []
    unpad_bytes = batch * seqlen * mask.element_size() + 2 * nnz * row_bytes + nnz * 8
    pad_bytes = nnz * (row_bytes + 8) + batch * seqlen * row_bytes
    for bench, nbytes, ours_fn, peer_fn, variants in [
        ("unpad", unpad_bytes, lambda: unpad_input(h, mask), lambda: fa_unpad(h, mask),
         {"capacity_eq_nnz": lambda: unpad_input(h, mask, capacity=nnz),
          "gather_rows_kernel": lambda: torch.ops.varlen.gather_rows(h, idx)}),
        ("pad", pad_bytes, lambda: pad_input(hu, idx, batch, seqlen), lambda: fa_pad(hu, idx, batch, seqlen),
         {}),
    ]:
        copy = copy_ms(nbytes)
        copy_gbps = nbytes / copy / 1e6
        peer_ms = time_ms(peer_fn)
        ours_ms = time_ms(ours_fn)
        rows.append(row(bench, "copy", shape, copy, nbytes))
        rows.append(row(bench, "flash_attn_algo", shape, peer_ms, nbytes))
        rows.append(row(bench, "torch_varlen", shape, ours_ms, nbytes,
                        fraction_of_copy=round(nbytes / ours_ms / 1e6 / copy_gbps, 3),
                        speedup_vs_peer=round(peer_ms / ours_ms, 2)))
        for variant, fn in variants.items():
            ms = time_ms(fn)
            rows.append(row(bench, "torch_varlen", shape, ms, nbytes, variant=variant,
                            fraction_of_copy=round(nbytes / ms / 1e6 / copy_gbps, 3),
                            speedup_vs_peer=round(peer_ms / ms, 2)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "h200.json"))
    parser.add_argument("--existing", default=None, help="results file to merge into (default: --out)")
    args = parser.parse_args()
    rows = [r for shape in SHAPES for r in bench_shape(shape)]

    existing_path = Path(args.existing or args.out)
    results = json.loads(existing_path.read_text()) if existing_path.exists() else {"meta": {}, "rows": []}
    results["rows"] = [r for r in results["rows"] if r.get("bench") not in ("unpad", "pad")] + rows
    results["meta"].update({
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_varlen": torch_varlen.__version__,
        "padding_bench_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "padding_bench_method": "CUDA events, median of 9 rounds of 20 back-to-back calls; "
                                "bf16, lengths uniform in [0.2*S, S] (about 40% padding)",
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    print(f"{'bench':6} {'impl':16} {'variant':18} {'shape':18} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'vs peer':>8}")
    for r in rows:
        print(f"{r['bench']:6} {r['impl']:16} {r.get('variant', ''):18} {str(r['shape']):18} {r['ms']:9.4f} "
              f"{r['GBps']:8.0f} {r.get('fraction_of_copy', ''):>8} {r.get('speedup_vs_peer', ''):>8}")


if __name__ == "__main__":
    main()
